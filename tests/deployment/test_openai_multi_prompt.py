"""`/v1/completions` with several prompts: all are queued at once on one weights version (the engine
batches them), and the answer is the per-prompt answers side by side.

References: the same prompts sent one per request with the same seed (tokens, text and finish
reasons equal; logprobs within 1e-5, the float noise of batched prefill and decoding, see
tests/engine/sampling/test_batched_prefill.py). An ASYNC hot-load that completes while the first
prompt is generating (inside its first token callback) must not reach the others. Driven by the
official `openai` package; no sleeps or timings.
"""

from __future__ import annotations

import threading

import openai
import pytest
from fastapi.testclient import TestClient
from transformers import AutoTokenizer

from tether.deployment.app import IDENTITY_HEADER, create_app
from tether.deployment.backend import EngineBackend
from tether.deployment.served import BASE_IDENTITY, ServedWeights
from tether.engine.model_loading import load_base_model

from .helpers import make_chain

MODEL = "my-deployment"
TOLERANCE = 1e-5
PROMPTS = ["hello", "The quick brown fox", "ab", "12345 678"]


class Recording:
    """Wraps the engine backend: records the version of every request submitted; once `arm(hook)`
    is called, `hook()` runs inside the next request's first token callback (the engine's thread)."""

    def __init__(self, inner: EngineBackend) -> None:
        self.inner = inner
        self.base = inner.base
        self.versions: list[str | None] = []
        self.hook = None
        self.hooked = threading.Event()

    def arm(self, hook) -> None:
        self.hooked.clear()
        self.hook = hook

    def load(self, *args) -> None:
        self.inner.load(*args)

    def unload(self, version: str) -> None:
        self.inner.unload(version)

    def submit(self, request, version, on_token=None):
        self.versions.append(version)
        hook, self.hook = self.hook, None
        if hook is None:
            return self.inner.submit(request, version, on_token)

        def relay(*token) -> None:
            if not self.hooked.is_set():
                hook()
                self.hooked.set()
            if on_token is not None:
                on_token(*token)

        return self.inner.submit(request, version, relay)

    def close(self) -> None:
        self.inner.close()


@pytest.fixture(scope="module")
def base(model_dir):
    return load_base_model(str(model_dir))


@pytest.fixture(scope="module")
def trained(model_dir, tmp_path_factory):
    """One base checkpoint of weights trained one step (they answer differently from the base model)."""
    return make_chain(model_dir, tmp_path_factory.mktemp("multi") / "store", steps=0, trained_base=True)[0]


@pytest.fixture
def deployment(base, model_dir):
    backend = Recording(EngineBackend(base))
    served = ServedWeights(backend, base_model=str(model_dir), state_dir=None)
    app = create_app(served, model_names=[MODEL], tokenizer=AutoTokenizer.from_pretrained(str(model_dir)))
    with TestClient(app) as http:
        client = openai.OpenAI(
            api_key="unused", base_url="http://testserver/v1", http_client=http, max_retries=0
        )
        yield client, served, backend
    backend.close()


def assert_same_choice(got, want, index: int) -> None:
    assert got.index == index
    assert got.text == want.text and got.finish_reason == want.finish_reason
    assert got.model_extra["raw_output"] == want.model_extra["raw_output"]
    if want.logprobs is None:
        assert got.logprobs is None
        return
    assert got.logprobs.tokens == want.logprobs.tokens
    assert got.logprobs.text_offset == want.logprobs.text_offset
    got_lps, want_lps = got.logprobs.token_logprobs, want.logprobs.token_logprobs
    assert [lp is None for lp in got_lps] == [lp is None for lp in want_lps]  # echo: the first is None
    assert [lp for lp in got_lps if lp is not None] == pytest.approx(
        [lp for lp in want_lps if lp is not None], rel=TOLERANCE, abs=TOLERANCE
    )
    for got_top, want_top in zip(
        got.logprobs.top_logprobs or [], want.logprobs.top_logprobs or [], strict=True
    ):
        if want_top is None:
            assert got_top is None
            continue
        assert list(got_top) == list(want_top)
        assert list(got_top.values()) == pytest.approx(list(want_top.values()), abs=TOLERANCE)


def alone(client, prompts, **kw):
    """Each prompt's answer from a request of its own."""
    return [client.completions.create(model=MODEL, prompt=prompt, **kw) for prompt in prompts]


@pytest.mark.parametrize(
    "options",
    [
        {"n": 2, "temperature": 1.0, "seed": 7, "logprobs": 2, "max_tokens": 6},
        {"n": 1, "temperature": 0.8, "seed": 3, "logprobs": 1, "echo": True, "max_tokens": 4, "stop": ["e"]},
        {"n": 3, "temperature": 1.0, "seed": 11, "max_tokens": 5, "extra_body": {"top_k": 20}},
    ],
    ids=["samples-with-logprobs", "echo-and-stop", "no-logprobs"],
)
def test_several_prompts_answer_as_each_prompt_alone(deployment, options):
    client, _, backend = deployment
    backend.versions.clear()
    together = client.completions.with_raw_response.create(model=MODEL, prompt=PROMPTS, **options)
    answer = together.parse()
    assert backend.versions == [None] * len(PROMPTS)  # one request per prompt, on the same weights
    assert answer.model_extra["weights_identity"] == together.headers[IDENTITY_HEADER] == BASE_IDENTITY
    single = alone(client, PROMPTS, **options)
    n = options["n"]
    assert len(answer.choices) == len(PROMPTS) * n
    for number, each in enumerate(single):
        for sample in range(n):  # prompt i's samples are choices i*n .. i*n + n-1
            assert_same_choice(answer.choices[number * n + sample], each.choices[sample], number * n + sample)
    assert answer.usage.prompt_tokens == sum(each.usage.prompt_tokens for each in single)
    assert answer.usage.completion_tokens == sum(each.usage.completion_tokens for each in single)
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens


def test_token_id_prompts_answer_as_each_prompt_alone(deployment):
    client, _, _ = deployment
    prompts = [[5, 17, 101, 33], [9], [200, 201, 202]]
    options = {"temperature": 1.0, "seed": 5, "logprobs": 0, "max_tokens": 5}
    answer = client.completions.create(model=MODEL, prompt=prompts, **options)
    for number, each in enumerate(alone(client, prompts, **options)):
        assert_same_choice(answer.choices[number], each.choices[0], number)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_an_async_hotload_while_the_first_prompt_generates_does_not_reach_the_others(
    deployment, trained, stream
):
    """Every prompt is queued before the first token of any: a hot-load that completes while the first
    prompt generates leaves all of them on the weights the answer names."""
    client, served, backend = deployment
    options = {"temperature": 1.0, "seed": 9, "max_tokens": 6, "stop": []}
    before = alone(client, PROMPTS, **options)  # the base model's answers
    backend.arm(lambda: served.hotload(str(trained), transition="ASYNC"))
    raw = client.completions.with_raw_response.create(model=MODEL, prompt=PROMPTS, stream=stream, **options)
    assert raw.headers[IDENTITY_HEADER] == BASE_IDENTITY
    if stream:
        texts = [""] * len(PROMPTS)
        for chunk in raw.parse():
            for choice in chunk.choices:
                texts[choice.index] += choice.text
    else:
        answer = raw.parse()
        assert answer.model_extra["weights_identity"] == BASE_IDENTITY
        texts = [choice.text for choice in answer.choices]
    assert backend.hooked.is_set() and served.current.identity != BASE_IDENTITY  # it did switch meanwhile
    assert texts == [each.choices[0].text for each in before]
    after = alone(client, PROMPTS, **options)  # the new weights answer otherwise
    assert [each.choices[0].text for each in after] != texts
    assert {each.model_extra["weights_identity"] for each in after} == {served.current.identity}


def test_a_bad_prompt_among_several_is_a_400_and_leaves_nothing_running(deployment):
    client, served, backend = deployment
    engine = backend.inner.engine
    before = engine.stats()
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model=MODEL, prompt=[[5, 17, 101], [9, 10**9]], max_tokens=40, stop=[])
    assert "outside the vocabulary" in str(refused.value.body)
    stats = engine.wait_for_stats(  # the first prompt's request, queued already, was cancelled
        lambda s: (
            s.cancelled == before.cancelled + 1 and s.waiting_requests == 0 and s.running_sequences == 0
        ),
        60,
    )
    assert stats.reserved_tokens == 0 and stats.completed == before.completed and served._inflight == 0
