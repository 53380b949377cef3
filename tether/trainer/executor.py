"""`OpExecutor`: the one dispatch from a trainer op to the engines of one base model.

`execute(op)` matches on the op's type and calls the method of the same name; each method turns
the op's plain data into the engine's objects (one builder each: `LoraSpec.from_config`,
`AdamWParams.from_adam_params`, `engine_datum`, `sample_request`) and the engine's answer into a
result type of `tether.types.ops`. The base model, training engine and sampling engine are built on
first use. Training ops reach this from one ordered worker thread (`tether.trainer.local`);
sampling ops from any thread (the sampling engine batches them on its own thread).

It knows nothing about HTTP, API keys, sessions or the catalogue: an op names an owner only to find
the owner's checkpoint files.
"""

from __future__ import annotations

import concurrent.futures
import threading
from typing import Any

import numpy as np
import torch

from tether.engine.lora import LoraSpec
from tether.engine.model_loading import LoadedBaseModel, load_base_model
from tether.engine.pass_counts import PassCounts
from tether.engine.sampling import SampleRequest, SamplingEngine
from tether.engine.training_engine import TrainingEngine
from tether.engine.training_types import AdamWParams, EngineDatum, ForwardResult, GraphHandle, LossRequest
from tether.trainer.checkpoint_io import TrainerCheckpoints
from tether.trainer.config import EngineSettings
from tether.types import ops
from tether.types.errors import NotFoundError, UserInputError
from tether.types.paths import parse_checkpoint_path


def engine_datum(datum: ops.TrainingDatum) -> EngineDatum:
    """The engine's datum (torch tensors sharing the arrays' memory) from an op's datum."""
    inputs = {name: torch.from_numpy(_writable(array)) for name, array in datum.loss_fn_inputs.items()}
    return EngineDatum(
        input_tokens=torch.from_numpy(_writable(datum.input_tokens.astype(np.int64, copy=False))),
        loss_fn_inputs=inputs,
    )


def _writable(array: np.ndarray) -> np.ndarray:
    return array if array.flags.writeable and array.flags.c_contiguous else np.array(array, order="C")


def forward_output(result: ForwardResult) -> ops.ForwardOutput:
    return ops.ForwardOutput(
        outputs=[
            {name: value.detach().cpu().numpy() for name, value in datum.items()} for datum in result.outputs
        ],
        metrics={key: float(value) for key, value in result.metrics.items()},
    )


def sample_request(op: ops.Sample, weights_id: str | None) -> SampleRequest:
    """The sampling engine's request from a `Sample` op."""
    params = op.sampling_params
    return SampleRequest(
        prompt_tokens=op.prompt_tokens,
        num_samples=op.num_samples,
        max_tokens=params.max_tokens,
        temperature=params.temperature,
        top_k=params.top_k,
        top_p=params.top_p,
        seed=params.seed,
        stop=params.stop,
        weights_id=weights_id,
        include_prompt_logprobs=op.include_prompt_logprobs,
        topk_prompt_logprobs=op.topk_prompt_logprobs,
        topk_sample_logprobs=op.topk_sample_logprobs,
    )


def sample_output(result: Any) -> ops.SampleOutput:
    return ops.SampleOutput(
        sequences=[
            ops.SampledSequenceOutput(
                tokens=list(s.tokens),
                logprobs=list(s.logprobs),
                stop_reason=s.stop_reason,
                topk_logprobs=s.topk_logprobs,
            )
            for s in result.sequences
        ],
        prompt_logprobs=result.prompt_logprobs,
        topk_prompt_logprobs=result.topk_prompt_logprobs,
        prompt_cache_hit_tokens=int(getattr(result, "prompt_cache_hit_tokens", 0)),
    )


class OpExecutor:
    """Executes ops on one base model's training engine, sampling engine and checkpoint files."""

    def __init__(self, base_model: str, settings: EngineSettings) -> None:
        self.base_model = base_model
        self.settings = settings
        self.checkpoints = TrainerCheckpoints(settings.data_dir)
        self._lock = threading.Lock()
        self._base: LoadedBaseModel | None = None
        self._training: TrainingEngine | None = None
        self._sampling: SamplingEngine | None = None
        self._samplers: set[str] = set()
        """Sampler ids with weights registered in the sampling engine."""

    # ---- engines, built on first use --------------------------------------------------------

    @property
    def base(self) -> LoadedBaseModel:
        with self._lock:
            if self._base is None:
                if self.settings.torch_threads is not None:
                    torch.set_num_threads(self.settings.torch_threads)
                self._base = self._load_base()
            return self._base

    def _load_base(self, *, weights: bool = True) -> LoadedBaseModel:
        """Load this executor's base model with its settings (aliases, device, dtype); `weights=False`
        gives a meta-device skeleton (`load_base_model`)."""
        return load_base_model(
            self.base_model,
            aliases=self.settings.model_aliases,
            device=self.settings.device,
            dtype=self.settings.dtype,
            weights=weights,
        )

    @property
    def training(self) -> TrainingEngine:
        base = self.base
        with self._lock:
            if self._training is None:
                self._training = self._new_training_engine(base)
            return self._training

    def _new_training_engine(self, base: LoadedBaseModel) -> TrainingEngine:
        """The training engine over `base`, built once on first use (hook: the distributed executor's is FSDP)."""
        return TrainingEngine(
            base,
            max_tokens_per_micro_batch=self.settings.max_tokens_per_micro_batch,
            on_nonfinite=self.settings.on_nonfinite,
            frozen=self.settings.forward_only,
        )

    @property
    def sampling(self) -> SamplingEngine:
        base = self.base
        with self._lock:
            if self._sampling is None:
                self._sampling = SamplingEngine(
                    base, kv_cache_budget_tokens=self.settings.kv_cache_budget_tokens
                )
            return self._sampling

    @property
    def sampling_ready(self) -> bool:
        """Whether the sampling engine exists (building it loads the base model)."""
        return self._sampling is not None

    def close(self) -> None:
        with self._lock:
            if self._sampling is not None:
                self._sampling.close()

    def housekeeping(self) -> None:
        """Between ops: free custom-loss graphs whose backward did not come in time."""
        if self._training is not None:
            self._training.reap_expired_graphs()

    # ---- the dispatch ------------------------------------------------------------------------

    def execute(self, op: Any) -> Any:
        """Run one op to completion and return its result (`Sample` answers a future of one)."""
        match op:
            case ops.CreateModel():
                return self.create_model(op)
            case ops.DeleteModel():
                return self.delete_model(op)
            case ops.Forward():
                return self.forward(op)
            case ops.ForwardBackward():
                return self.forward_backward(op)
            case ops.OptimStep():
                return self.optim_step(op)
            case ops.ForwardKeepGraph():
                return self.forward_keep_graph(op)
            case ops.BackwardFromLogprobGrads():
                return self.backward_from_logprob_grads(op)
            case ops.SaveState():
                return self.save_state(op)
            case ops.LoadState():
                return self.load_state(op)
            case ops.SaveSamplerWeights():
                return self.save_sampler_weights(op)
            case ops.SaveWeightsForSamplerExt():
                return self.save_weights_for_sampler_ext(op)
            case ops.CreateSampler():
                return self.create_sampler(op)
            case ops.DeleteSampler():
                return self.delete_sampler(op)
            case ops.Sample():
                return self.sample(op)
            case ops.DescribeBase():
                return self.describe_base(op)
        raise UserInputError(f"unknown operation {type(op).__name__}", field="op")

    # ---- fusing: several LoRA models' forward(_backward)s in one pass -------------------------

    def pass_stats(self) -> dict[str, int]:
        """The training engine's pass counts (`tether.engine.pass_counts.PassCounts.snapshot`): how many
        forward(_backward) passes ran and how many ops they carried; zeros before it is built."""
        training = self._training
        return (training.pass_counts if training is not None else PassCounts()).snapshot()

    def fusible(self, op: Any) -> str | None:
        """The fusion key of `op`: "lora_forward" for a `Forward`/`ForwardBackward` of an existing LoRA
        model, else None (runs alone; full fine-tuning models are never fused). Quick, never blocks."""
        training = self._training
        if training is None or training.frozen or not isinstance(op, (ops.Forward, ops.ForwardBackward)):
            return None
        return "lora_forward" if training.is_lora(op.model_id) else None

    def execute_batch(self, batch: list[Any]) -> list[Any]:
        """Run fusible ops (see `fusible`) as one pass: one `ForwardOutput` or exception per op, in order.

        Each op's datums are converted and validated on their own, so one tenant's bad data fails
        only its op (`TrainingEngine.forward_backward_fused`)."""
        requests: list[LossRequest | None] = []
        results: list[Any] = [None] * len(batch)
        for index, op in enumerate(batch):
            try:
                if not isinstance(op, (ops.Forward, ops.ForwardBackward)):
                    raise UserInputError(f"{type(op).__name__} cannot be fused", field="op")
                requests.append(
                    LossRequest(
                        op.model_id,
                        [engine_datum(d) for d in op.data],
                        op.loss_fn,
                        op.loss_fn_config,
                        backward=isinstance(op, ops.ForwardBackward),
                    )
                )
            except Exception as exc:  # noqa: BLE001 - fails this op only
                requests.append(None)
                results[index] = exc
        runnable = [(i, r) for i, r in enumerate(requests) if r is not None]
        outcomes = self.training.forward_backward_fused([r for _, r in runnable])
        for (index, _), outcome in zip(runnable, outcomes, strict=True):
            if isinstance(outcome, Exception):
                results[index] = outcome
                continue
            try:
                results[index] = forward_output(outcome)
            except Exception as exc:  # noqa: BLE001 - fails this op only
                results[index] = exc
        return results

    # ---- training ----------------------------------------------------------------------------

    def create_model(self, op: ops.CreateModel) -> ops.Done:
        spec = LoraSpec.from_config(op.lora_config) if op.lora_config is not None else None
        self.training.create_model(op.model_id, lora=spec)
        return ops.Done()

    def delete_model(self, op: ops.DeleteModel) -> ops.Done:
        if self.training.has_model(op.model_id):
            self.training.delete_model(op.model_id)
        return ops.Done()

    def forward(self, op: ops.Forward) -> ops.ForwardOutput:
        data = [engine_datum(d) for d in op.data]
        return forward_output(self.training.forward(op.model_id, data, op.loss_fn, op.loss_fn_config))

    def forward_backward(self, op: ops.ForwardBackward) -> ops.ForwardOutput:
        data = [engine_datum(d) for d in op.data]
        return forward_output(
            self.training.forward_backward(op.model_id, data, op.loss_fn, op.loss_fn_config)
        )

    def optim_step(self, op: ops.OptimStep) -> ops.MetricsOutput:
        metrics = self.training.optim_step(
            op.model_id,
            AdamWParams.from_adam_params(op.adam_params),
            normalization=op.grad_accumulation_normalization,
        )
        return ops.MetricsOutput(metrics={k: float(v) for k, v in metrics.items()})

    def forward_keep_graph(self, op: ops.ForwardKeepGraph) -> ops.ForwardOutput:
        data = [engine_datum(d) for d in op.data]
        _, result = self.training.forward_keep_graph(op.model_id, data, graph_id=op.graph_id, ttl_s=op.ttl_s)
        return forward_output(result)

    def backward_from_logprob_grads(self, op: ops.BackwardFromLogprobGrads) -> ops.MetricsOutput:
        grads = [torch.from_numpy(_writable(g.astype(np.float32, copy=False))) for g in op.logprob_grads]
        metrics = self.training.backward_from_logprob_grads(GraphHandle(op.graph_id, op.model_id), grads)
        return ops.MetricsOutput(metrics={k: float(v) for k, v in metrics.items()})

    # ---- checkpoints -------------------------------------------------------------------------

    def save_state(self, op: ops.SaveState) -> ops.CheckpointWritten | ops.Done:
        path = parse_checkpoint_path(op.path)
        state = self.training.export_state(op.model_id, include_optimizer=True)
        info = self.checkpoints.save_training_state(op.owner, path, state, overwrite=op.overwrite)
        return ops.CheckpointWritten(
            path=path.tinker_path,
            directory=str(self.checkpoints.stores.directory(op.owner, path)),
            size_bytes=info.size_bytes,
        )

    def load_state(self, op: ops.LoadState) -> ops.Done:
        path = parse_checkpoint_path(op.path)
        if not op.create_model:
            self.training.model_info(op.model_id)  # NotFoundError before reading files
        state = self.checkpoints.load_training_state(op.owner, path, include_optimizer=op.include_optimizer)
        self.training.import_state(op.model_id, state, include_optimizer=op.include_optimizer)
        return ops.Done()

    def save_sampler_weights(self, op: ops.SaveSamplerWeights) -> ops.CheckpointWritten | ops.Done:
        weights = self.training.sampler_weights(op.model_id)
        if op.kind == "ephemeral":
            if op.sampler_id is None:
                raise UserInputError("an ephemeral save names its sampler", field="sampler_id")
            self._register(op.sampler_id, weights)
            return ops.Done()
        if op.path is None:
            raise UserInputError("a named save needs a path", field="path")
        path = parse_checkpoint_path(op.path)
        info = self.checkpoints.save_hf_weights(op.owner, path, weights, self.base)
        return ops.CheckpointWritten(
            path=path.tinker_path,
            directory=str(self.checkpoints.stores.directory(op.owner, path)),
            size_bytes=info.size_bytes,
        )

    def save_weights_for_sampler_ext(
        self, op: ops.SaveWeightsForSamplerExt
    ) -> ops.CheckpointWritten | ops.Done:
        from tether.storage.sampler_chain import save_sampler_checkpoint_ext

        path = parse_checkpoint_path(op.path)
        weights = self.training.sampler_weights(op.model_id)
        base = self.base
        saved = save_sampler_checkpoint_ext(
            self.checkpoints.stores.store(op.owner),
            path.tinker_path,
            self.checkpoints.stored_hf_weights(weights),
            checkpoint_type=op.checkpoint_type,
            base_model_dir=base.path,
            tokenizer_dir=base.tokenizer_path,
        )
        return ops.CheckpointWritten(
            path=path.tinker_path,
            directory=str(self.checkpoints.stores.directory(op.owner, path)),
            size_bytes=saved.info.size_bytes,
            checkpoint_type=saved.checkpoint_type,
            full_bytes=saved.full_bytes,
        )

    # ---- sampling ----------------------------------------------------------------------------

    def _register(self, sampler_id: str, weights: Any) -> None:
        if weights.lora_spec is not None:
            self.sampling.register_lora(sampler_id, weights.lora_spec, weights.tensors)
        else:
            self.sampling.register_full(sampler_id, weights.tensors)
        with self._lock:
            self._samplers.add(sampler_id)

    def create_sampler(self, op: ops.CreateSampler) -> ops.Done:
        path = parse_checkpoint_path(op.path, field="model_path")
        self._register(op.sampler_id, self.checkpoints.load_sampler_weights(op.owner, path))
        return ops.Done()

    def delete_sampler(self, op: ops.DeleteSampler) -> ops.Done:
        with self._lock:
            registered = op.sampler_id in self._samplers
            self._samplers.discard(op.sampler_id)
        if registered:
            self.sampling.unregister(op.sampler_id)
        return ops.Done()

    def sample(self, op: ops.Sample) -> concurrent.futures.Future:
        """A future of the `SampleOutput` (the sampling engine completes it on its own thread).
        Cancelling it (e.g. the service's `cancel_future`) cancels the request in the engine,
        which stops generating and frees its KV cache."""
        with self._lock:
            if op.sampler_id is not None and op.sampler_id not in self._samplers:
                raise NotFoundError(f"sampler {op.sampler_id!r} has no weights registered here")
        weights_id = op.sampler_id
        engine_future = self.sampling.submit(sample_request(op, weights_id))
        answer: concurrent.futures.Future = concurrent.futures.Future()

        def finish(done: concurrent.futures.Future) -> None:
            if done.cancelled():
                answer.cancel()
                return
            try:
                exc = done.exception()
                if exc is not None:
                    answer.set_exception(exc)
                    return
                try:
                    answer.set_result(sample_output(done.result()))
                except BaseException as err:  # noqa: BLE001 - reported through the future
                    answer.set_exception(err)
            except concurrent.futures.InvalidStateError:  # the answer was cancelled meanwhile
                pass

        engine_future.add_done_callback(finish)
        answer.add_done_callback(lambda a: a.cancelled() and self.sampling.cancel(engine_future))
        return answer

    def describe_base(self, op: ops.DescribeBase) -> ops.BaseModelInfo:
        base = self.base
        return ops.BaseModelInfo(
            arch=getattr(base.model.config, "model_type", None),
            tokenizer_id=str(base.tokenizer_path),
            vocab_size=int(base.vocab_size),
            max_context_length=int(base.max_context_length),
            eos_token_ids=[int(t) for t in base.eos_token_ids],
        )
