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

from tether.client import routes
from tether.client.api_future import APIFuture
from tether.client.session import ClientSession
from tether.client.transport import Transport
from tether.client.wire_convert import model_input_wire
from tether.types.data import GetSamplerResponse, ModelInput, SampleResponse, SamplingParams
from tether.types.errors import UserInputError
from tether.types.wire import CreateSamplingSessionRequest, SampleRequest, make_wire


class SamplingClient:
    """Samples from the weights of one sampling session."""

    def __init__(
        self,
        session: ClientSession,
        sampling_session_id: str,
        base_model: str | None,
        *,
        first_seq_id: int = 0,
        record_stability_info: bool = False,
    ) -> None:
        self._session = session
        self.record_stability_info = record_stability_info
        """Every sample is recorded for stable_reinforce; its sequences' `sequence_id`s name them."""
        self.sampling_session_id = sampling_session_id
        self._base_model = base_model
        self._seq = itertools.count(first_seq_id)
        self._seq_lock = threading.Lock()

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        """Pickle as connection details, so rollout workers in other processes can sample too."""
        transport = self._session.transport
        return _restore, (
            transport.base_url,
            transport.api_key,
            self.sampling_session_id,
            self._base_model,
            self.record_stability_info,
        )

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
        body = make_wire(
            SampleRequest,
            num_samples=num_samples,
            prompt=model_input_wire(prompt),
            sampling_params=params,
            sampling_session_id=self.sampling_session_id,
            seq_id=self._next_seq_id(),
            prompt_logprobs=include_prompt_logprobs or topk_prompt_logprobs > 0,
            topk_prompt_logprobs=topk_prompt_logprobs,
            record_stability_info=self.record_stability_info,
        )
        return self._session.run(self._session.transport.call(routes.SAMPLE, body), "sample")

    def compute_logprobs(self, prompt: ModelInput) -> APIFuture[list[float | None]]:
        """log p(prompt[i] | prompt[:i]) for every position; None at position 0."""
        prompt = ModelInput.coerce(prompt)
        if prompt.length == 0:
            raise UserInputError("is empty", field="prompt")
        body = SampleRequest(
            num_samples=1,
            prompt=model_input_wire(prompt),
            sampling_params=SamplingParams(max_tokens=1),
            sampling_session_id=self.sampling_session_id,
            seq_id=self._next_seq_id(),
            prompt_logprobs=True,
            record_stability_info=False,
        )

        async def run() -> list[float | None]:
            response = await self._session.transport.call(routes.SAMPLE, body)
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


def _restore(
    base_url: str,
    api_key: str,
    sampling_session_id: str,
    base_model: str | None,
    record_stability_info: bool = False,
) -> SamplingClient:
    """An unpickled SamplingClient: its own connection, and seq ids in a fresh random block.

    The server deduplicates samples by (sampling session, seq_id), so a copy must never reuse the
    original's numbers; each copy numbers from a random multiple of 1e9 (as the Tinker SDK's clones).
    """
    session = ClientSession(Transport(base_url, api_key))
    first = random.randint(1, 1_000_000_000) * 1_000_000_000
    return SamplingClient(
        session,
        sampling_session_id,
        base_model,
        first_seq_id=first,
        record_stability_info=record_stability_info,
    )


async def _get_sampler(session: ClientSession, sampler_id: str) -> GetSamplerResponse:
    return await session.transport.call(routes.GET_SAMPLER.at(sampler_id=sampler_id))


async def create_sampling_client(
    session: ClientSession,
    *,
    model_path: str | None,
    base_model: str | None,
    record_stability_info: bool = False,
) -> SamplingClient:
    """Open a sampling session on a sampler checkpoint (`tinker://...`) or a base model."""
    if (model_path is None) == (base_model is None):
        raise UserInputError("give exactly one of model_path and base_model", field="model_path")
    if model_path is not None and not model_path.startswith("tinker://"):
        raise UserInputError(f"must start with tinker://, got {model_path!r}", field="model_path")
    body = make_wire(
        CreateSamplingSessionRequest,
        session_id=await session.session_id(),
        sampling_session_seq_id=session.next_sampling_session_seq_id(),
        model_path=model_path,
        base_model=base_model,
    )
    sampler_id = (await session.transport.call(routes.CREATE_SAMPLING_SESSION, body)).sampling_session_id
    if base_model is None:
        base_model = (await _get_sampler(session, sampler_id)).base_model
    return SamplingClient(session, sampler_id, base_model, record_stability_info=record_stability_info)
