"""Timing marks for `bench/service_profile.py`, loaded into the server and trainer processes it starts
(this directory leads their PYTHONPATH). With `$TETHER_PROFILE_MARKS` set, each process appends
`<mark> <time.perf_counter()>` lines to that file (perf_counter is CLOCK_MONOTONIC on Linux, so the
bench can compare times across processes): when a route submits an op, when the worker starts and
ends it, when the server's result thread starts and ends its `finish`, when a long poll is answered,
when a request enters the server's middleware and when its response's last byte is handed to the socket.
With `$TETHER_PROFILE_NULL_TRAINER=1` too, the worker answers each forward_backward and optim_step
with the result of the first one it ran (no compute): the step time is then the service's floor.
Without the variables it does nothing."""

import os

_PATH = os.environ.get("TETHER_PROFILE_MARKS")

if _PATH:
    import importlib.abc
    import sys
    import time

    _out = open(_PATH, "a", buffering=1)  # noqa: SIM115 - open for the process's lifetime

    def mark(name: str) -> None:
        _out.write(f"{name} {time.perf_counter():.6f}\n")

    _NULL = os.environ.get("TETHER_PROFILE_NULL_TRAINER") == "1"
    _canned: dict = {}

    def _patch_worker(module) -> None:  # type: ignore[no-untyped-def]
        run_one = module.ModelWorker._run_one

        def timed(self, item):  # type: ignore[no-untyped-def]
            kind = type(item.op).__name__
            mark(f"worker-start-{kind}")
            if _NULL and kind in _canned:  # the service's floor: the op's earlier result, no compute
                item.future.set_result(_canned[kind])
            else:
                run_one(self, item)
                if _NULL and kind in ("ForwardBackward", "OptimStep") and not item.future.exception():
                    _canned[kind] = item.future.result()
            mark(f"worker-end-{kind}")

        module.ModelWorker._run_one = timed

    def _patch_operations(module) -> None:  # type: ignore[no-untyped-def]
        submit_op, chain = module.submit_op, module.chain

        def timed_submit(state, trainer, op, **kwargs):  # type: ignore[no-untyped-def]
            mark(f"submit-{type(op).__name__}")
            return submit_op(state, trainer, op, **kwargs)

        def timed_chain(state, source, finish, *args, **kwargs):  # type: ignore[no-untyped-def]
            if finish is not None:
                inner = finish

                def finish(result):  # type: ignore[no-untyped-def]
                    mark(f"finish-start-{type(result).__name__}")
                    try:
                        return inner(result)
                    finally:
                        mark(f"finish-end-{type(result).__name__}")

            return chain(state, source, finish, *args, **kwargs)

        module.submit_op, module.chain = timed_submit, timed_chain

    def _patch_futures(module) -> None:  # type: ignore[no-untyped-def]
        wait = module.FutureStore.wait

        async def timed_wait(self, request_id, owner, timeout_s):  # type: ignore[no-untyped-def]
            mark(f"poll-start-{request_id.split('-')[0]}")
            outcome = await wait(self, request_id, owner, timeout_s)
            mark(f"poll-answer-{request_id.split('-')[0]}")
            return outcome

        module.FutureStore.wait = timed_wait

    def _patch_guard(module) -> None:  # type: ignore[no-untyped-def]
        call = module.RequestGuard.__call__

        async def timed_call(self, scope, receive, send):  # type: ignore[no-untyped-def]
            route = scope.get("path", "").rstrip("/").rpartition("/")[2]
            mark(f"http-in-{route}")

            async def timed_send(message):  # type: ignore[no-untyped-def]
                await send(message)
                if message.get("type") == "http.response.body" and not message.get("more_body"):
                    mark(f"http-out-{route}")

            await call(self, scope, receive, timed_send)

        module.RequestGuard.__call__ = timed_call

    _PATCHES = {
        "tether.server.guard": _patch_guard,
        "tether.engine.worker": _patch_worker,
        "tether.server.operations": _patch_operations,
        "tether.server.futures": _patch_futures,
    }

    class _Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):  # type: ignore[no-untyped-def]
            if name not in _PATCHES:
                return None
            sys.meta_path.remove(self)
            try:
                import importlib.util

                spec = importlib.util.find_spec(name)
            finally:
                sys.meta_path.insert(0, self)
            if spec is None or spec.loader is None:
                return spec
            loader, patch = spec.loader, _PATCHES[name]

            class _Loader(importlib.abc.Loader):
                def create_module(self, spec):  # type: ignore[no-untyped-def]
                    return loader.create_module(spec)

                def exec_module(self, module):  # type: ignore[no-untyped-def]
                    loader.exec_module(module)
                    patch(module)

            spec.loader = _Loader()
            return spec

    sys.meta_path.insert(0, _Finder())
