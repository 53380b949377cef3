"""What `tether serve`'s control plane and a deployment process it launches agree on, outside HTTP bodies.

Both sides import this (the server may not import `tether.deployment` at module top, and a
deployment never imports the server).
"""

from __future__ import annotations

ADMIN_TOKEN_ENV = "TETHER_DEPLOYMENT_ADMIN_TOKEN"
"""Environment variable through which the control plane hands a deployment process the token its
`POST /hot_load` requires (`Authorization: Bearer <token>`); fresh per launch, never on the command
line (which other users of the machine can read)."""
