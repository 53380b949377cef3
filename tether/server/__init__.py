"""`tether serve`: the Tinker-protocol HTTP service (plus tether's extensions).

Entry points: `tether.server.config.ServerConfig` (every setting, documented once),
`tether.server.main.create_app` / `serve` / `ServerThread`. Routes live in `routes_*.py` by protocol
family; operations reach the engines through `model_hosts` (one ordered worker per base model);
durable state is the SQLite `catalogue` plus per-owner checkpoint stores (`checkpoints`). Nothing
here does tensor math, and nothing imports torch until a model is first used.
"""
