"""`SamplingClient`: generate from, and score prompts under, one set of weights on the server.

A sampling client is bound to a server-side sampling session (base model, a sampler checkpoint, or
a snapshot of a training model). Its requests are independent: unlike training, sampling needs no
ordering, so every `sample` is posted and awaited concurrently.
"""

from __future__ import annotations

import itertools
import random
import threading
from typing import Any

from tether.client.api_future import APIFuture
from tether.client.session import ClientSession
from tether.client.transport import Transport
from tether.client.wire_convert import model_input_json, sample_response_from_wire
from tether.types.data import GetSamplerResponse, ModelInput, SampleResponse, SamplingParams
from tether.types.errors import UserInputError
from tether.types.proto import decode_sample_response


class SamplingClient:
    """Samples from the weights of one sampling session."""

    def __init__(
        self, session: ClientSession, sampling_session_id: str, base_model: str | None, *, first_seq_id: int = 0
    ) -> None:
        self._session = session
        self.sampling_session_id = sampling_session_id
        self._base_model = base_model
        self._seq = itertools.count(first_seq_id)
        self._seq_lock = threading.Lock()

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        """Pickle as connection details, so rollout workers in other processes can sample too."""
        transport = self._session.transport
        return _restore, (transport.base_url, transport.api_key, self.sampling_session_id, self._base_model)

    def _next_seq_id(self) -> int:
        with self._seq_lock:
            return next(self._seq)

    def sample(
        self,
        prompt: ModelInput,
        num_samples: int,
        sampling_params: SamplingParams,
        include_prompt_logprobs: bool = False,
        topk_prompt_logprobs: int = 0,
    ) -> APIFuture[SampleResponse]:
        """Generate `num_samples` continuations of `prompt`."""
        prompt = ModelInput.coerce(prompt)
        params = SamplingParams.coerce(sampling_params)
        if prompt.length == 0:
            raise UserInputError("is empty", field="prompt")
        if not isinstance(num_samples, int) or num_samples < 1:
            raise UserInputError(f"must be a positive int, got {num_samples!r}", field="num_samples")
        if topk_prompt_logprobs < 0:
            raise UserInputError("must be >= 0", field="topk_prompt_logprobs")
        body = {
            "num_samples": num_samples,
            "prompt": model_input_json(prompt),
            "sampling_params": params.model_dump(exclude_none=True),
            "sampling_session_id": self.sampling_session_id,
            "seq_id": self._next_seq_id(),
            "prompt_logprobs": include_prompt_logprobs or topk_prompt_logprobs > 0,
            "topk_prompt_logprobs": topk_prompt_logprobs,
            "topk_sample_logprobs": 0,
            "prompt_alt_tokens_k": 0,
            "record_stability_info": False,
            "type": "sample",
        }
        return self._session.run(self._sample(body), "sample")

    async def _sample(self, body: dict[str, Any]) -> SampleResponse:
        transport = self._session.transport
        submitted = await transport.post_json("/api/v1/asample", body)
        raw = await transport.retrieve_future(submitted["request_id"], expect_proto=True)
        return sample_response_from_wire(decode_sample_response(raw), submitted.get("sample_sequence_ids"))

    def compute_logprobs(self, prompt: ModelInput) -> APIFuture[list[float | None]]:
        """log p(prompt[i] | prompt[:i]) for every position; None at position 0."""
        prompt = ModelInput.coerce(prompt)
        if prompt.length == 0:
            raise UserInputError("is empty", field="prompt")
        body = {
            "num_samples": 1,
            "prompt": model_input_json(prompt),
            "sampling_params": {"max_tokens": 1, "temperature": 1.0, "top_k": -1, "top_p": 1.0},
            "sampling_session_id": self.sampling_session_id,
            "seq_id": self._next_seq_id(),
            "prompt_logprobs": True,
            "topk_prompt_logprobs": 0,
            "topk_sample_logprobs": 0,
            "prompt_alt_tokens_k": 0,
            "record_stability_info": False,
            "type": "sample",
        }

        async def run() -> list[float | None]:
            response = await self._sample(body)
            return list(response.prompt_logprobs or [])

        return self._session.run(run(), "compute_logprobs")

    def get_base_model(self) -> str:
        if self._base_model is None:
            info = self._session.run_sync(_get_sampler(self._session, self.sampling_session_id))
            self._base_model = info.base_model
        return self._base_model

    def get_tokenizer(self) -> Any:
        from tether.client.tokenizer import load_tokenizer

        base_model = self.get_base_model()
        return load_tokenizer(base_model, session=self._session, base_model=base_model)


def _restore(base_url: str, api_key: str, sampling_session_id: str, base_model: str | None) -> SamplingClient:
    """An unpickled SamplingClient: its own connection, and seq ids in a fresh random block.

    The server deduplicates samples by (sampling session, seq_id), so a copy must never reuse the
    original's numbers; each copy numbers from a random multiple of 1e9 (as the Tinker SDK's clones).
    """
    session = ClientSession(Transport(base_url, api_key))
    first = random.randint(1, 1_000_000_000) * 1_000_000_000
    return SamplingClient(session, sampling_session_id, base_model, first_seq_id=first)


async def _get_sampler(session: ClientSession, sampler_id: str) -> GetSamplerResponse:
    return GetSamplerResponse.model_validate(await session.transport.get_json(f"/api/v1/samplers/{sampler_id}"))


async def create_sampling_client(
    session: ClientSession, *, model_path: str | None, base_model: str | None
) -> SamplingClient:
    """Open a sampling session on a sampler checkpoint (`tinker://...`) or a base model."""
    if (model_path is None) == (base_model is None):
        raise UserInputError("give exactly one of model_path and base_model", field="model_path")
    if model_path is not None and not model_path.startswith("tinker://"):
        raise UserInputError(f"must start with tinker://, got {model_path!r}", field="model_path")
    body: dict[str, Any] = {
        "session_id": await session.session_id(),
        "sampling_session_seq_id": session.next_sampling_session_seq_id(),
        "type": "create_sampling_session",
    }
    if model_path is not None:
        body["model_path"] = model_path
    if base_model is not None:
        body["base_model"] = base_model
    answer = await session.transport.post_json("/api/v1/create_sampling_session", body)
    sampler_id = str(answer["sampling_session_id"])
    if base_model is None:
        base_model = (await _get_sampler(session, sampler_id)).base_model
    return SamplingClient(session, sampler_id, base_model)
