"""The trainer: executes typed operations (`tether.types.ops`) on one base model.

- `interface`: the one interface, `Trainer.submit(op, stream=, seq_id=) -> Future[result]`.
- `local`: `InProcessTrainer`, the executor and its ordered worker in this process (the default).
- `remote`: `RemoteTrainer`, the same ops over a socket to a `tether trainer` process
  (`tether serve --trainer-process`), encoded by `tether.types.op_codec`.
- `process`: the `tether trainer` process itself.
- `executor`: `OpExecutor`, the one dispatch from an op to the training and sampling engines.

The server imports only `interface`, `config` and `remote` at module level: those need no torch.
The trainer knows nothing about HTTP routes, API keys' meaning, sessions or the catalogue.
"""
