"""Direct preference optimisation on JSONL preference pairs: the `tether dpo` recipe.

The reference policy is pinned to the run's *initial* weights: before the first step they are
saved as a sampler checkpoint (`save_weights_for_sampler`, LoRA or full fine-tuning alike), its
path is kept in `<log_dir>/reference.json`, and each answer's reference log-probability is
computed once with `compute_logprobs` and cached in `<log_dir>/reference_logprobs.jsonl`. A
resumed run reads both back, so its anchor is the original policy, never the resumed weights (the
cookbook's `create_dpo_clients` re-anchors on resume).

One step = one `forward_backward_custom` on the batch's chosen and rejected answers, interleaved,
with the DPO loss computed locally in torch (tether's one-pass custom loss: a single forward on
the server), then one `optim_step` at the scheduled rate. With
    r_c = beta * (log pi(chosen) - log pi_ref(chosen)),  r_r = beta * (log pi(rejected) - log pi_ref(rejected))
the loss is mean over pairs of -log sigmoid(r_c - r_r). Metrics: `dpo_loss`, `accuracy` (fraction of
pairs with r_c > r_r; ties count as wrong, so it is 0 at step 0), `margin` (mean r_c - r_r),
`chosen_reward`, `rejected_reward`, `num_pairs`, `num_tokens`; `test/...` on held-out pairs every
`eval_every` steps, before the step. Checkpoints and exact resume work as in SFT.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from tether.recipes.batching import BatchPlan
from tether.recipes.clients import new_training_client, resume_training_client
from tether.recipes.compat import SdkTypes
from tether.recipes.preference import PreferencePair, load_preference_pairs, pair_datums, sequence_logprob
from tether.recipes.progress import progress_bar
from tether.recipes.run_log import CheckpointRecord, RunLog
from tether.recipes.run_settings import RunSettings, connect_run
from tether.recipes.schedules import LrSchedule, lr_multiplier
from tether.renderers import Renderer, renderer_for_model
from tether.types.data import Datum, ModelInput
from tether.types.errors import ServerError, UserInputError

log = logging.getLogger("tether.recipes.dpo")

REFERENCE_FILE = "reference.json"
REFERENCE_CACHE_FILE = "reference_logprobs.jsonl"
METRIC_KEYS = (
    "dpo_loss",
    "accuracy",
    "margin",
    "chosen_reward",
    "rejected_reward",
    "num_pairs",
    "num_tokens",
)


class Config(RunSettings):
    """Settings of a DPO run."""

    dataset_path: Path | None = Field(
        None,
        description='JSONL of preference pairs: {"chosen": [messages], "rejected": [messages]} sharing all but'
        ' the last (assistant) message, or {"prompt": [messages], "chosen": message, "rejected": message}.',
    )
    eval_dataset_path: Path | None = Field(
        None, description="JSONL of held-out pairs; if unset, `test_size` pairs of the dataset are held out."
    )
    test_size: int = Field(0, ge=0, description="Pairs held out for evaluation when no eval file is given.")
    log_dir: Path = Field(
        Path("runs/dpo"),
        description="Where metrics.jsonl, config.json, checkpoints.jsonl and the reference go.",
    )
    model_name: str = Field("tether/tiny-qwen3", description="Base model, as the server names it.")
    load_checkpoint_path: str | None = Field(
        None,
        description="Start from (and anchor the reference at) the weights of this tinker:// state checkpoint,"
        " e.g. the end of an SFT run.",
    )
    renderer_name: str | None = Field(
        None, description="Chat format; unset: chosen from the model name and tokenizer."
    )
    lora_rank: int = Field(32, ge=0, description="LoRA rank; 0 trains all weights (full fine-tuning).")
    beta: float = Field(
        0.1, gt=0, description="DPO temperature: how far the policy may move from the reference."
    )
    learning_rate: float = Field(1e-5, gt=0, description="Peak learning rate of AdamW.")
    lr_schedule: LrSchedule = Field(
        "linear", description="Decay after warmup: constant, linear or cosine (to 0)."
    )
    warmup_steps: int = Field(0, ge=0, description="Steps of linear warmup from 0 to the peak learning rate.")
    batch_size: int = Field(32, ge=1, description="Preference pairs per optimizer step (2 datums each).")
    num_epochs: int = Field(1, ge=1, description="Passes over the training pairs.")
    max_steps: int | None = Field(
        None,
        ge=1,
        description="Stop after this many steps in total; the learning-rate schedule still spans all epochs.",
    )
    max_length: int | None = Field(
        2048, ge=2, description="Tokens kept per answer's conversation (the start is kept)."
    )
    eval_every: int | None = Field(
        10, ge=1, description="Held-out DPO metrics every this many steps (unset: never)."
    )
    save_every: int | None = Field(
        20,
        ge=1,
        description="Checkpoint (weights + optimizer) every this many steps (unset: only at the end).",
    )
    seed: int = Field(0, description="Seed of the data order, the held-out split and new LoRA weights.")


@dataclass
class DPOResult:
    training_client: Any
    renderer: Renderer
    steps_run: int
    final_state_path: str | None
    reference_path: str
    metrics: list[dict[str, Any]] = field(default_factory=list)


# ---- the loss


def dpo_statistics(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The DPO loss (mean over pairs) and its metrics, from 1-D float tensors of answer logprobs.

    `chosen[i]`, `rejected[i]`: log pi of pair i's answers under the policy (may require grad);
    the reference tensors: the same under the reference policy.
    """
    chosen_reward = beta * (chosen - reference_chosen)
    rejected_reward = beta * (rejected - reference_rejected)
    margin = chosen_reward - rejected_reward
    loss = -torch.nn.functional.logsigmoid(margin).mean()
    metrics = {
        "dpo_loss": float(loss.detach()),
        "accuracy": float((margin.detach() > 0).float().mean()),
        "margin": float(margin.detach().mean()),
        "chosen_reward": float(chosen_reward.detach().mean()),
        "rejected_reward": float(rejected_reward.detach().mean()),
        "num_pairs": float(chosen.shape[0]),
    }
    return loss, metrics


def dpo_loss_fn(
    reference: Sequence[tuple[float, float]], beta: float
) -> Callable[[list[Datum], list[torch.Tensor]], tuple[torch.Tensor, dict[str, float]]]:
    """A `forward_backward_custom` loss for datums [chosen_0, rejected_0, chosen_1, ...].

    `reference[i]` = (log pi_ref(chosen_i), log pi_ref(rejected_i)). Each datum's answer logprob is
    sum(weights * logprobs) over its targets.
    """

    def loss_fn(data: list[Datum], logprobs: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        if len(data) != 2 * len(reference) or len(logprobs) != len(data):
            raise UserInputError(
                f"got {len(data)} datums for {len(reference)} pairs (want chosen, rejected per pair)",
                field="data",
            )
        weights = [d.loss_fn_inputs["weights"].to_torch().to(torch.float32) for d in data]
        sums = torch.stack([(w * lp).sum() for w, lp in zip(weights, logprobs, strict=True)])
        ref = torch.tensor(reference, dtype=torch.float32).reshape(-1, 2)
        loss, metrics = dpo_statistics(sums[0::2], sums[1::2], ref[:, 0], ref[:, 1], beta)
        metrics["num_tokens"] = float(sum(float(w.sum()) for w in weights))
        return loss, metrics

    return loss_fn


# ---- the reference policy


def _pair_key(chosen: Datum, rejected: Datum) -> str:
    digest = hashlib.sha1()
    for datum in (chosen, rejected):
        digest.update(json.dumps(datum.model_input.to_ints()).encode())
        digest.update(json.dumps(datum.loss_fn_inputs["target_tokens"].tolist()).encode())
        digest.update(json.dumps(datum.loss_fn_inputs["weights"].tolist()).encode())
    return digest.hexdigest()


class ReferenceScores:
    """Reference log-probabilities of answers under the run's pinned initial weights, computed once.

    Scores are appended to `<log_dir>/reference_logprobs.jsonl` as they are computed, keyed by the
    pair's tokens and weights, so a resumed run (or a later epoch) never scores a pair again.
    """

    def __init__(self, log_dir: Path, sampler_path: str, service: Any) -> None:
        self.sampler_path = sampler_path
        self._service = service
        self._client: Any = None
        self._cache_path = log_dir / REFERENCE_CACHE_FILE
        self._cache: dict[str, tuple[float, float]] = {}
        if self._cache_path.exists():
            for line in self._cache_path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a torn last line of an interrupted run: that pair is scored again
                if row.get("reference") == sampler_path:
                    self._cache[row["key"]] = (float(row["chosen"]), float(row["rejected"]))

    @classmethod
    def pin(cls, log_dir: Path, training_client: Any, service: Any) -> ReferenceScores:
        """Save the training client's current weights as the reference (a new run)."""
        path = training_client.save_weights_for_sampler("dpo-reference").result().path
        (log_dir / REFERENCE_FILE).write_text(json.dumps({"sampler_path": path}) + "\n")
        (log_dir / REFERENCE_CACHE_FILE).unlink(missing_ok=True)
        return cls(log_dir, path, service)

    @classmethod
    def load(cls, log_dir: Path, service: Any) -> ReferenceScores:
        """The reference of the run in `log_dir` (a resumed run)."""
        try:
            path = json.loads((log_dir / REFERENCE_FILE).read_text())["sampler_path"]
        except (OSError, ValueError, KeyError):
            raise UserInputError(
                f"{log_dir} has a checkpoint but no readable {REFERENCE_FILE}; use a new log_dir or resume=false",
                field="resume",
            ) from None
        return cls(log_dir, path, service)

    def _sampling_client(self) -> Any:
        if self._client is None:
            self._client = self._service.create_sampling_client(model_path=self.sampler_path).result()
        return self._client

    def _score(self, datum: Datum) -> Future:
        client = self._sampling_client()
        tokens = datum.model_input.to_ints() + [int(datum.loss_fn_inputs["target_tokens"].tolist()[-1])]
        return client.compute_logprobs(SdkTypes(client).model_input(ModelInput.from_ints(tokens)))

    def scores(self, pairs: Sequence[tuple[Datum, Datum]]) -> list[tuple[float, float]]:
        """(log pi_ref(chosen), log pi_ref(rejected)) for each pair; missing ones computed in parallel."""
        keys = [_pair_key(c, r) for c, r in pairs]
        missing = {k: p for k, p in zip(keys, pairs, strict=True) if k not in self._cache}
        futures = {k: (self._score(c), self._score(r)) for k, (c, r) in missing.items()}
        with self._cache_path.open("a") as cache:
            for key, (chosen_future, rejected_future) in futures.items():
                chosen, rejected = missing[key]
                values = []
                for datum, future in ((chosen, chosen_future), (rejected, rejected_future)):
                    logprobs = future.result()
                    if len(logprobs) != datum.model_input.length + 1 or any(x is None for x in logprobs[1:]):
                        raise ServerError("compute_logprobs returned no logprob for some answer token")
                    values.append(sequence_logprob(datum, logprobs[1:]))
                self._cache[key] = (values[0], values[1])
                row = {"reference": self.sampler_path, "key": key, "chosen": values[0], "rejected": values[1]}
                cache.write(json.dumps(row) + "\n")
        return [self._cache[k] for k in keys]


# ---- the run


def split_pairs(
    config: Config, pairs: list[PreferencePair]
) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """(train, held-out): the eval file if one is configured, else `test_size` pairs drawn with `seed`."""
    if config.eval_dataset_path is not None:
        return pairs, load_preference_pairs(config.eval_dataset_path, field="eval_dataset_path")
    if config.test_size >= len(pairs):
        raise UserInputError(
            f"is {config.test_size} but the dataset has {len(pairs)} pairs", field="test_size"
        )
    order = list(range(len(pairs)))
    random.Random(f"split:{config.seed}").shuffle(order)
    held = set(order[: config.test_size])
    return [p for i, p in enumerate(pairs) if i not in held], [pairs[i] for i in sorted(held)]


def _plan_fingerprint(plan: BatchPlan, beta: float) -> dict[str, Any]:
    return {
        "num_examples": plan.num_examples,
        "batch_size": plan.batch_size,
        "num_epochs": plan.num_epochs,
        "seed": plan.seed,
        "beta": beta,
    }


def _interleaved(pairs: Sequence[tuple[Datum, Datum]]) -> list[Datum]:
    return [d for pair in pairs for d in pair]


def _evaluate(
    training_client: Any, pairs: Sequence[tuple[Datum, Datum]], reference: ReferenceScores, beta: float
) -> dict[str, float]:
    data = _interleaved(pairs)
    outputs = (
        training_client.forward(SdkTypes(training_client).data(data), "cross_entropy")
        .result()
        .loss_fn_outputs
    )
    sums = [sequence_logprob(d, o["logprobs"].tolist()) for d, o in zip(data, outputs, strict=True)]
    ref = torch.tensor(reference.scores(pairs), dtype=torch.float64).reshape(-1, 2)
    policy = torch.tensor(sums, dtype=torch.float64)
    _, metrics = dpo_statistics(policy[0::2], policy[1::2], ref[:, 0], ref[:, 1], beta)
    return {f"test/{k}": v for k, v in metrics.items() if k != "num_pairs"}


def train_dpo(
    config: Config,
    service: Any,
    train_pairs: Sequence[PreferencePair],
    eval_pairs: Sequence[PreferencePair] = (),
    *,
    training_client: Any = None,
    on_step_end: Callable[[int, dict[str, Any]], None] | None = None,
) -> DPOResult:
    """Run (or resume) DPO with an existing service client.

    `training_client` continues a model in hand (its current weights become the reference);
    `on_step_end(step, metrics)` may add metrics before they are logged.
    """
    run_log = RunLog(config.log_dir, wandb_project=config.wandb_project, wandb_name=config.wandb_name)
    run_log.write_config(config)
    plan = BatchPlan(len(train_pairs), config.batch_size, config.num_epochs, config.seed)
    total_steps = min(plan.total_steps, config.max_steps or plan.total_steps)

    start_step = 0
    checkpoint = run_log.last_checkpoint() if config.resume else None
    if checkpoint is not None:
        if checkpoint.extra.get("plan") != _plan_fingerprint(plan, config.beta):
            raise UserInputError(
                f"{config.log_dir} holds a run with a different dataset, batching or beta; use a new log_dir"
                " or resume=false",
                field="resume",
            )
        reference = ReferenceScores.load(config.log_dir, service)
        training_client = resume_training_client(service, checkpoint.state_path)
        start_step = checkpoint.next_step
        run_log.truncate_metrics(start_step)
        log.info(
            "resuming from %s at step %d (reference %s)",
            checkpoint.state_path,
            start_step,
            reference.sampler_path,
        )
    else:
        if training_client is None and config.load_checkpoint_path:
            training_client = service.create_training_client_from_state(config.load_checkpoint_path).result()
        elif training_client is None:
            training_client = new_training_client(service, config.model_name, config.lora_rank, config.seed)
        reference = ReferenceScores.pin(config.log_dir, training_client, service)

    sdk = SdkTypes(training_client)
    renderer = renderer_for_model(config.model_name, training_client.get_tokenizer(), config.renderer_name)
    train_data = [pair_datums(renderer, p, config.max_length) for p in train_pairs]
    eval_data = [pair_datums(renderer, p, config.max_length) for p in eval_pairs]

    final_state_path = checkpoint.state_path if checkpoint is not None else None
    bar = progress_bar(total=total_steps, initial=start_step, desc="DPO", enabled=config.progress)
    for step in range(start_step, total_steps):
        metrics: dict[str, Any] = {"epoch": plan.epoch_of(step)}
        if eval_data and config.eval_every and step % config.eval_every == 0:
            metrics.update(_evaluate(training_client, eval_data, reference, config.beta))
        learning_rate = config.learning_rate * lr_multiplier(
            config.lr_schedule, step, plan.total_steps, config.warmup_steps
        )
        batch = [train_data[i] for i in plan.indices(step)]
        loss_fn = dpo_loss_fn(reference.scores(batch), config.beta)
        backward = training_client.forward_backward_custom(sdk.data(_interleaved(batch)), loss_fn)
        optim = training_client.optim_step(sdk.adam_params(learning_rate))
        output_metrics = backward.result().metrics or {}
        optim_metrics = optim.result().metrics or {}
        metrics.update({k: output_metrics[k] for k in METRIC_KEYS if k in output_metrics})
        metrics["learning_rate"] = learning_rate
        metrics.update({f"optim/{k}": v for k, v in optim_metrics.items()})
        if on_step_end is not None:
            on_step_end(step, metrics)
        # Log before saving: a crash in between leaves a row that resume truncates, never a gap.
        run_log.log_metrics(step, metrics)
        next_step = step + 1
        if next_step == total_steps or (config.save_every and next_step % config.save_every == 0):
            name = f"dpo-{next_step:06d}"
            final_state_path = training_client.save_state(name).result().path
            run_log.record_checkpoint(
                CheckpointRecord(
                    name=name,
                    next_step=next_step,
                    state_path=final_state_path,
                    extra={"plan": _plan_fingerprint(plan, config.beta), "reference": reference.sampler_path},
                )
            )
        bar.update(1)
        bar.set_postfix(loss=f"{metrics.get('dpo_loss', float('nan')):.3f}")
    bar.close()
    run_log.close()
    return DPOResult(
        training_client,
        renderer,
        total_steps - start_step,
        final_state_path,
        reference.sampler_path,
        run_log.metrics(),
    )


def main(config: Config) -> DPOResult:
    """`tether dpo`: load the pairs, connect, train."""
    if config.dataset_path is None:
        raise UserInputError("is required", field="dataset_path")
    train, held_out = split_pairs(config, load_preference_pairs(config.dataset_path))
    service = connect_run(config)
    try:
        return train_dpo(config, service, train, held_out)
    finally:
        service.close()
