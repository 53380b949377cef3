"""A minimal in-process Tinker-protocol server for SDK unit tests (served via httpx.MockTransport).

Its "model" is one torch parameter `W` (vocab x vocab): logprob of target t after token x is
log_softmax(W[x])[t]. That is enough to check gradients end to end: forward_backward accumulates
into `W.grad`, and the tether extension routes keep the forward graph and chain client gradients.
It records every numbered request `(route, seq_id)` in arrival order, and can be told to fail.
`observer`, when set, sees every request before it is answered (the SDK's own task is running it).
"""

from __future__ import annotations

import itertools
import json
import threading
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np
import torch

from tether.types.proto import (
    SampleResponseBody,
    WireSampledSequence,
    decode_forward_backward_request,
    encode_forward_backward_output,
    encode_sample_response,
)

VOCAB = 16


class FakeServer:
    def __init__(self, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.W = torch.randn(VOCAB, VOCAB, generator=gen, requires_grad=True)
        self.lock = threading.Lock()
        self.results: dict[str, tuple[str, Any]] = {}
        self.graphs: dict[str, list[torch.Tensor]] = {}
        self.numbered: list[tuple[str, int]] = []
        self.requests: list[str] = []
        self.ids = itertools.count()
        self.fail_next: dict[str, int] = {}  # path -> number of 503s to answer first
        self.fail_future: dict[str, str] = {}  # path -> category of a failed future
        self.api_keys: list[str] = []
        self.observer: Callable[[httpx.Request], None] | None = None

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    # ---- model math

    def logprobs(self, datum) -> torch.Tensor:
        tokens = torch.as_tensor(datum.input_tokens())
        targets = torch.as_tensor(datum.loss_fn_inputs["target_tokens"])
        return torch.log_softmax(self.W[tokens], dim=-1).gather(1, targets[:, None])[:, 0]

    # ---- HTTP

    def _future(self, kind: str, payload: Any) -> httpx.Response:
        request_id = f"req-{next(self.ids)}"
        self.results[request_id] = (kind, payload)
        return httpx.Response(200, json={"request_id": request_id})

    def handle(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if self.observer is not None:
            self.observer(request)
        with self.lock:
            self.requests.append(path)
            self.api_keys.append(request.headers.get("X-API-Key", ""))
            if self.fail_next.get(path, 0) > 0:
                self.fail_next[path] -= 1
                return httpx.Response(503, json={"detail": "try later"})
            return self._route(path, request)

    def _route(self, path: str, request: httpx.Request) -> httpx.Response:
        if path == "/api/v1/create_session":
            return httpx.Response(200, json={"session_id": "sess"})
        if path in ("/api/v1/session_heartbeat", "/api/v1/sessions/sess/finish"):
            return httpx.Response(200, json={})
        if path == "/api/v1/create_model":
            body = json.loads(request.content)
            return self._future("json", {"model_id": f"sess:train:{body['model_seq_id']}"})
        if path == "/api/v1/get_info":
            body = json.loads(request.content)
            return httpx.Response(
                200,
                json={
                    "model_id": body["model_id"],
                    "model_data": {"model_name": "fake", "tokenizer_id": None},
                },
            )
        if path == "/api/v1/retrieve_future":
            return self._retrieve(json.loads(request.content)["request_id"])
        if path in self.fail_future:
            return self._future("error", {"error": f"{path} refused", "category": self.fail_future[path]})
        if path in ("/api/v1/forward_backward", "/api/v1/tether/forward_keep_graph"):
            body = decode_forward_backward_request(request.content)
            self.numbered.append((path, body.seq_id))
            lps = [self.logprobs(d) for d in body.data]
            loss = sum(
                (-lp * torch.as_tensor(d.loss_fn_inputs["weights"])).sum()
                for lp, d in zip(lps, body.data, strict=True)
            )
            if path.endswith("forward_keep_graph"):
                request_id = f"req-{next(self.ids)}"
                self.graphs[request_id] = lps
                out = encode_forward_backward_output(
                    [{"logprobs": lp.detach().numpy()} for lp in lps], {"loss:sum": float(loss.detach())}
                )
                self.results[request_id] = ("proto", out)
                return httpx.Response(200, json={"request_id": request_id})
            if not body.forward_only:
                loss.backward()
            outputs = [{"logprobs": lp.detach().numpy()} for lp in lps]
            return self._future(
                "proto", encode_forward_backward_output(outputs, {"loss:sum": float(loss.detach())})
            )
        if path == "/api/v1/tether/backward_from_logprob_grads":
            body = json.loads(request.content)
            self.numbered.append((path, body["seq_id"]))
            lps = self.graphs.pop(body["graph_id"])
            grads = [
                torch.tensor(g["data"], dtype=torch.float32).reshape(g["shape"])
                for g in body["logprob_grads"]
            ]
            torch.autograd.backward(lps, grads)
            return self._future(
                "json", {"metrics": {"backward_tokens:sum": float(sum(g.numel() for g in grads))}}
            )
        if path == "/api/v1/optim_step":
            body = json.loads(request.content)
            self.numbered.append((path, body["seq_id"]))
            lr = body["adam_params"]["learning_rate"]
            if self.W.grad is not None:
                with torch.no_grad():
                    self.W -= lr * self.W.grad
                    self.W.grad = None
            return self._future("json", {"metrics": {"learning_rate:mean": lr}})
        if path == "/api/v1/save_weights":
            body = json.loads(request.content)
            self.numbered.append((path, body["seq_id"]))
            return self._future("json", {"path": f"tinker://{body['model_id']}/weights/{body['path']}"})
        if path == "/api/v1/save_weights_for_sampler":
            body = json.loads(request.content)
            self.numbered.append((path, body["seq_id"]))
            if "path" in body:
                return self._future(
                    "json", {"path": f"tinker://{body['model_id']}/sampler_weights/{body['path']}"}
                )
            return self._future("json", {"sampling_session_id": "sess:sample:0"})
        if path == "/api/v1/load_weights":
            body = json.loads(request.content)
            return self._future(
                "json", {"model_id": f"sess:train:{body['model_seq_id']}", "path": body["path"]}
            )
        if path == "/api/v1/weights_info":
            return httpx.Response(200, json={"base_model": "fake", "is_lora": True, "lora_rank": 4})
        if path.startswith("/api/v1/training_runs/") and "/checkpoints/" in path:
            return httpx.Response(200)  # ttl, publish, unpublish, delete: answers are ignored
        if path == "/api/v1/create_sampling_session":
            return httpx.Response(200, json={"sampling_session_id": "sess:sample:0"})
        if path == "/api/v1/samplers/sess:sample:0":
            return httpx.Response(200, json={"sampler_id": "sess:sample:0", "base_model": "fake"})
        if path == "/api/v1/asample":
            body = json.loads(request.content)
            prompt = [t for c in body["prompt"]["chunks"] for t in c["tokens"]]
            sequences = [
                WireSampledSequence(tokens=[prompt[-1], i], logprobs=[-0.5, -0.25], stop_reason="length")
                for i in range(body["num_samples"])
            ]
            prompt_lps = (
                [None] + [-1.0 * i for i in range(1, len(prompt))] if body["prompt_logprobs"] else None
            )
            out = encode_sample_response(SampleResponseBody(sequences=sequences, prompt_logprobs=prompt_lps))
            resp = self._future("proto", out)
            payload = json.loads(resp.content)
            payload["sample_sequence_ids"] = [f"s{i}" for i in range(body["num_samples"])]
            return httpx.Response(200, json=payload)
        return httpx.Response(404, json={"detail": f"no route {path}"})

    def _retrieve(self, request_id: str) -> httpx.Response:
        kind, payload = self.results[request_id]
        if kind == "proto":
            return httpx.Response(200, content=payload, headers={"content-type": "application/x-protobuf"})
        return httpx.Response(200, json=payload)

    def grad_copy(self) -> np.ndarray:
        return self.W.grad.detach().numpy().copy()
