"""The SDK splits a big forward_backward into chunks sent in parallel (lowest seq_id last); the
server must still run them as one model's ordered operations and give the same result."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from tether.server.config import ServerConfig
from tether.server.main import ServerThread
from tether.types.proto import (
    ForwardBackwardRequestBody,
    WireDatum,
    WireTextChunk,
    decode_forward_backward_output,
    encode_forward_backward_request,
)

tinker = pytest.importorskip("tinker")
from tinker import types  # noqa: E402

KEY = "tml-chunks"
BASE = "tether/tiny-qwen3"
TEXTS = ["first example", "second one here", "third", "and a fourth"]
LR = 0.02


def _ids(text: str) -> list[int]:
    return list(text.encode())


def test_parallel_chunks_equal_one_unchunked_request(tmp_path, default_model_dir, trainer_mode):
    config = ServerConfig(
        port=0,
        data_dir=tmp_path,
        long_poll_s=5,
        fwdbwd_max_chunk_len=1,
        trainer_process=trainer_mode == "trainer-process",
    )
    with ServerThread(config) as url:
        service = tinker.ServiceClient(base_url=url, api_key=KEY)
        chunked = service.create_lora_training_client(base_model=BASE, rank=2, seed=9).result()
        data = [
            types.Datum(
                model_input=types.ModelInput.from_ints(_ids(t)[:-1]),
                loss_fn_inputs={"target_tokens": _ids(t)[1:], "weights": [1.0] * (len(t) - 1)},
            )
            for t in TEXTS
        ]
        out = chunked.forward_backward(data, "cross_entropy")
        chunked.optim_step(types.AdamParams(learning_rate=LR)).result()
        out = out.result()
        assert [o["logprobs"].to_numpy().shape[0] for o in out.loss_fn_outputs] == [len(t) - 1 for t in TEXTS]
        after_chunked = chunked.forward(data, "cross_entropy").result()

        # the same step as one raw request on a twin model
        headers = {"X-API-Key": KEY}
        with httpx.Client(base_url=url, timeout=60) as http:
            session = http.post(
                "/api/v1/create_session", json={"tags": [], "sdk_version": "t"}, headers=headers
            )
            twin = http.post(
                "/api/v1/create_model",
                headers=headers,
                json={
                    "session_id": session.json()["session_id"],
                    "model_seq_id": 0,
                    "base_model": BASE,
                    "lora_config": {"rank": 2, "seed": 9},
                },
            ).json()

            def wait(request_id: str):
                while True:
                    answer = http.post(
                        "/api/v1/retrieve_future", json={"request_id": request_id}, headers=headers
                    )
                    if answer.headers["content-type"].startswith("application/x-protobuf"):
                        return answer.content
                    if answer.json().get("type") != "try_again":
                        return answer.json()

            wait(twin["request_id"])
            wire_data = [
                WireDatum(
                    [WireTextChunk(np.asarray(_ids(t)[:-1], dtype=np.int32))],
                    {
                        "target_tokens": np.asarray(_ids(t)[1:], dtype=np.int64),
                        "weights": np.ones(len(t) - 1, dtype=np.float32),
                    },
                )
                for t in TEXTS
            ]

            def fwd(seq_id: int, forward_only: bool):
                body = encode_forward_backward_request(
                    ForwardBackwardRequestBody(
                        twin["model_id"], seq_id, forward_only, "cross_entropy", None, wire_data
                    )
                )
                rid = http.post(
                    "/api/v1/forward_backward",
                    content=body,
                    headers={**headers, "Content-Type": "application/x-protobuf"},
                ).json()["request_id"]
                return decode_forward_backward_output(wait(rid))

            whole = fwd(1, False)
            wait(
                http.post(
                    "/api/v1/optim_step",
                    headers=headers,
                    json={"model_id": twin["model_id"], "seq_id": 2, "adam_params": {"learning_rate": LR}},
                ).json()["request_id"]
            )
            after_whole = fwd(3, True)
        service.close("success")

    assert out.metrics["loss:sum"] == pytest.approx(whole.metrics["loss:sum"], rel=1e-5)
    # the SDK sums `name:sum` metrics over its chunks: response_tokens:sum survives chunking
    assert (
        out.metrics["response_tokens:sum"]
        == whole.metrics["response_tokens:sum"]
        == sum(len(t) - 1 for t in TEXTS)
    )
    assert after_chunked.metrics["loss:sum"] == pytest.approx(after_whole.metrics["loss:sum"], rel=1e-5)
    for chunk_out, whole_out in zip(after_chunked.loss_fn_outputs, after_whole.loss_fn_outputs, strict=True):
        np.testing.assert_allclose(chunk_out["logprobs"].to_numpy(), whole_out["logprobs"], atol=1e-5)
