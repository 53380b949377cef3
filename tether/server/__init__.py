"""`tether serve`: the Tinker-protocol HTTP service (plus tether's extensions).

Entry points: `tether.server.config.ServerConfig` (every setting, documented once),
`tether.server.main.create_app` / `serve` / `ServerThread`. Routes live in `routes_*.py` by protocol
family; a route builds a typed op (`tether.types.ops`) and submits it to its base model's trainer
(`trainers`: in-process or a `tether trainer` process), recording results when they arrive;
durable state is the SQLite `catalogue` plus per-owner checkpoint stores (`checkpoints`). Nothing
here does tensor math, and nothing imports torch until a model is first used.
"""
