"""Shared by the distributed tests and the script their torchrun ranks run: a tiny model and fixed batches.

`run_cases(engine)` drives a training engine through every built-in loss (full fine-tuning and
LoRA) and three optimizer steps, returning named tensors to compare between a single-process
engine and a multi-rank one. Run as a script under torchrun it writes rank 0's tensors to a file.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from tether.engine.lora import LoraSpec
from tether.engine.losses import LOSSES
from tether.engine.optimizer import NonFiniteStepError
from tether.engine.training_types import AdamWParams, EngineDatum

LENGTHS = [14, 3, 5, 4, 6]
BUDGET = 8
"""Tokens per micro-batch: small, so ranks run different numbers of micro-batches."""


def make_model(path: str) -> None:
    """A 2-layer Qwen3 with tied embeddings, saved to `path` (the same on every call)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=48,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        eos_token_id=1,
    )
    torch.manual_seed(0)
    Qwen3ForCausalLM(config).save_pretrained(path)


def make_batch(loss_fn: str, lengths=LENGTHS) -> list[EngineDatum]:
    generator = torch.Generator().manual_seed(1234)
    data = []
    for n in lengths:
        tokens = torch.randint(0, 48, (n + 1,), generator=generator)
        inputs = {"target_tokens": tokens[1:].clone()}
        for key in LOSSES[loss_fn].required_inputs:
            if key == "weights":
                inputs[key] = torch.rand(n, generator=generator)
            elif key == "advantages":
                inputs[key] = torch.randn(n, generator=generator)
            elif key == "logprobs":
                inputs[key] = -torch.rand(n, generator=generator) * 4
            elif key == "sampled_mask":
                inputs[key] = (torch.rand(n, generator=generator) > 0.3).float()
        data.append(EngineDatum(input_tokens=tokens[:-1].clone(), loss_fn_inputs=inputs))
    return data


ADAM = AdamWParams(learning_rate=1e-2, grad_clip_norm=1.0, weight_decay=0.01)


def run_cases(engine) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for mode, lora in (("full", None), ("lora", LoraSpec(rank=4, seed=7))):
        engine.create_model(mode, lora=lora)
        trained = engine._models[mode]
        for loss_fn in sorted(LOSSES):
            config = {"beta": 0.1} if loss_fn == "dro" else None
            result = engine.forward_backward(mode, make_batch(loss_fn), loss_fn, config)
            out[f"{mode}.{loss_fn}.loss"] = torch.tensor(result.metrics["loss:sum"], dtype=torch.float64)
            for i, datum in enumerate(result.outputs):
                for key, value in datum.items():
                    out[f"{mode}.{loss_fn}.{i}.{key}"] = value.detach().clone()
            for name, grad in engine.accumulated_gradients(mode).items():
                out[f"{mode}.{loss_fn}.grad.{name}"] = grad
            trained.optimizer.zero_grad()
        # one datum: rank 1 has no share and runs a zero-weighted pass in step with rank 0
        single = engine.forward_backward(mode, make_batch("importance_sampling", [6]), "importance_sampling")
        out[f"{mode}.single.logprobs"] = single.outputs[0]["logprobs"].detach().clone()
        for name, grad in engine.accumulated_gradients(mode).items():
            out[f"{mode}.single.grad.{name}"] = grad
        trained.optimizer.zero_grad()
        single = engine.forward(mode, make_batch("cross_entropy", [5]), "cross_entropy")
        out[f"{mode}.single.forward"] = single.outputs[0]["elementwise_loss"].detach().clone()
        batch = make_batch("cross_entropy")
        handle, kept = engine.forward_keep_graph(mode, batch)
        metrics = engine.backward_from_logprob_grads(
            handle, [-d.loss_fn_inputs["weights"] * 0.5 for d in batch]
        )
        out[f"{mode}.custom.loss"] = torch.tensor(metrics["loss:sum"], dtype=torch.float64)
        for i, datum in enumerate(kept.outputs):
            out[f"{mode}.custom.{i}.logprobs"] = datum["logprobs"].detach().clone()
        for name, grad in engine.accumulated_gradients(mode).items():
            out[f"{mode}.custom.grad.{name}"] = grad
        trained.optimizer.zero_grad()
        for step in range(3):
            engine.forward_backward(mode, make_batch("cross_entropy", [3 + step, 8, 2]), "cross_entropy")
            metrics = engine.optim_step(mode, ADAM)
            out[f"{mode}.step{step}.grad_norm"] = torch.tensor(metrics["grad_norm:mean"], dtype=torch.float64)
        # gradient-accumulation normalisation: each rank counts its share, the step divides by the sums
        for step, normalization in enumerate(("num_loss_tokens", "num_sequences")):
            batch = make_batch("cross_entropy", [7, 2, 5])
            batch[0].loss_fn_inputs["weights"][:3] = 0.0
            first = engine.forward_backward(mode, batch, "cross_entropy")
            out[f"{mode}.norm{step}.response_tokens"] = torch.tensor(
                first.metrics["response_tokens:sum"], dtype=torch.float64
            )
            engine.forward_backward(mode, make_batch("importance_sampling", [4, 9]), "importance_sampling")
            out[f"{mode}.norm{step}.counts"] = torch.tensor(engine.accumulated_counts(mode))
            metrics = engine.optim_step(mode, ADAM, normalization=normalization)
            for key in ("grad_norm:mean", "grad_accumulation_divisor:mean"):
                out[f"{mode}.norm{step}.{key}"] = torch.tensor(metrics[key], dtype=torch.float64)
        # a diverged loss: the step is refused on every rank alike and nothing changes
        diverged = make_batch("cross_entropy", [4, 6])
        for datum in diverged:
            datum.loss_fn_inputs["weights"] = datum.loss_fn_inputs["weights"] * 1e38
        engine.forward_backward(mode, diverged, "cross_entropy")
        try:
            engine.optim_step(mode, ADAM)
            out[f"{mode}.refused"] = torch.tensor(0)
        except NonFiniteStepError:
            out[f"{mode}.refused"] = torch.tensor(1)
        for name, value in engine.export_state(mode, include_optimizer=True).weights.items():
            out[f"{mode}.weights.{name}"] = value.detach().clone()
        forward = engine.forward(mode, make_batch("cross_entropy"), "cross_entropy")
        out[f"{mode}.after.loss"] = torch.tensor(forward.metrics["loss:sum"], dtype=torch.float64)
        engine.delete_model(mode)
    return {k: v.contiguous() for k, v in out.items()}


def run_mixed(engine) -> dict[str, torch.Tensor]:
    """bf16 compute with fp32 weights: losses of a few steps, and the dtypes the state keeps."""
    out: dict[str, torch.Tensor] = {}
    for mode, lora in (("full", None), ("lora", LoraSpec(rank=4, seed=7))):
        engine.create_model(mode, lora=lora)
        for step in range(2):
            result = engine.forward_backward(mode, make_batch("cross_entropy"), "cross_entropy")
            out[f"{mode}.loss{step}"] = torch.tensor(result.metrics["loss:sum"], dtype=torch.float64)
            engine.optim_step(mode, ADAM)
        state = engine.export_state(mode, include_optimizer=True)
        out[f"{mode}.fp32_weights"] = torch.tensor(
            all(t.dtype == torch.float32 for t in state.weights.values())
        )
        out[f"{mode}.fp32_moments"] = torch.tensor(
            all(t.dtype == torch.float32 for k, t in state.optimizer.items() if not k.startswith("step."))
        )
        engine.delete_model(mode)
    return out


class LargestTensor:
    """The largest floating-point tensor (bytes) any aten op allocates while active: the most of one
    weight a rank materialises. A DTensor counts as its local shard; views (of a memory-mapped
    safetensors file, say) and byte buffers (pickled plans) do not count."""

    def __init__(self) -> None:
        from torch.distributed.tensor import DTensor
        from torch.utils._python_dispatch import TorchDispatchMode

        def _local(t):
            return t.to_local() if isinstance(t, DTensor) else t

        def _storage(t):
            t = _local(t)
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                return None
            return t.untyped_storage().data_ptr()

        recorder = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                inputs = {_storage(t) for t in torch.utils._pytree.tree_leaves((args, kwargs))}
                for t in torch.utils._pytree.tree_leaves(out):
                    t = _local(t)
                    if (
                        isinstance(t, torch.Tensor)
                        and t.is_floating_point()
                        and t.device.type != "meta"
                        and _storage(t) not in inputs  # made here, not a view (of a mapped file, say)
                    ):
                        recorder.bytes = max(recorder.bytes, t.numel() * t.element_size())
                return out

        self.bytes = 0
        self._mode = _Mode()

    def __enter__(self) -> LargestTensor:
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)


def run_sharded_loads(engine, model_dir: str, checkpoint_dir: str) -> dict[str, torch.Tensor]:
    """On a skeleton base: what each rank materialises creating models and loading a DCP state, and
    that the sharded load is exact; plus the full-tensor load path as a control the measure catches."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.tensor import DTensor

    from tether.engine.training_state import TrainingState
    from tether.storage.formats import read_dcp_state

    out: dict[str, torch.Tensor] = {}
    out["base_on_meta"] = torch.tensor(all(p.is_meta for p in engine.base.model.parameters()))
    with LargestTensor() as created:
        engine.create_model("full", lora=None)
    out["create_full_bytes"] = torch.tensor(created.bytes)
    module = engine._models["full"].module
    out["all_dtensors"] = torch.tensor(all(isinstance(p, DTensor) for p in module.parameters()))
    out["largest_param_bytes"] = torch.tensor(max(p.numel() * p.element_size() for p in module.parameters()))
    out["largest_local_bytes"] = torch.tensor(
        max(p.to_local().numel() * p.element_size() for p in module.parameters())
    )
    engine.forward_backward("full", make_batch("cross_entropy"), "cross_entropy")
    engine.optim_step("full", ADAM)
    flat, metadata = engine.sharded_state("full")
    dcp.save(flat, checkpoint_id=checkpoint_dir)
    reader = FileSystemReader(checkpoint_dir)
    shapes = {k: tuple(v.size) for k, v in reader.read_metadata().state_dict_metadata.items()}
    with LargestTensor() as loaded:
        engine.import_sharded_state(
            "again", metadata, shapes, lambda t: dcp.load(t, storage_reader=reader), include_optimizer=True
        )
    out["sharded_load_bytes"] = torch.tensor(loaded.bytes)
    again, _ = engine.sharded_state("again")
    out["exact"] = torch.tensor(
        sorted(again) == sorted(flat)
        and all(
            torch.equal(
                again[k].full_tensor() if isinstance(again[k], DTensor) else again[k],
                flat[k].full_tensor() if isinstance(flat[k], DTensor) else flat[k],
            )
            for k in flat
        )
    )
    forward = [
        engine.forward(m, make_batch("cross_entropy"), "cross_entropy").metrics["loss:sum"]
        for m in ("full", "again")
    ]
    out["same_loss"] = torch.tensor(forward[0] == forward[1])
    with LargestTensor() as control:  # the full-tensor path: every rank reads whole tensors
        stored = read_dcp_state(Path(checkpoint_dir), {"metadata": metadata}, include_optimizer=True)
        engine.import_state(
            "control",
            TrainingState(stored.weights, stored.optimizer, stored.metadata),
            include_optimizer=True,
        )
    out["full_load_bytes"] = torch.tensor(control.bytes)
    with LargestTensor() as lora:
        engine.create_model("lora", lora=LoraSpec(rank=4, seed=7))
    out["create_lora_bytes"] = torch.tensor(lora.bytes)
    out["lora_base_dtensors"] = torch.tensor(
        all(isinstance(p, DTensor) for n, p in engine._lora_model.named_parameters() if ".adapters." not in n)
    )
    # a checkpoint whose names are not the model's: rank 0 loads it whole and broadcasts the shards
    from tether.engine.training_engine import _full_copy

    copy = engine._shard(_full_copy(engine.base.model), fill=False)
    engine._broadcast_base_from_rank0(copy)
    read = engine._shard(_full_copy(engine.base.model))
    out["broadcast_equals_read"] = torch.tensor(
        all(
            isinstance(a, DTensor) and torch.equal(a.full_tensor(), b.full_tensor())
            for a, b in zip(copy.parameters(), read.parameters(), strict=True)
        )
    )
    out["rank"] = torch.tensor(dist.get_rank())
    return out


BF16_ADAM = AdamWParams(learning_rate=1e-5, grad_clip_norm=1.0, weight_decay=0.01)


def run_bf16(engine, checkpoint_dir: str) -> dict[str, torch.Tensor]:
    """A bf16 full fine-tune at lr 1e-5 on sharded bf16 weights: its fp32 masters (sharded like the
    weights), weights that are the masters rounded, and a sharded DCP save -> load -> continue (and
    the full-tensor load) that equals the uninterrupted run bit for bit; a state without masters
    (the older format) still loads."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.tensor import DTensor

    def train(model_id: str, steps: range) -> None:
        for step in steps:
            batch = make_batch("cross_entropy", [3 + step % 4, 8, 2])
            engine.forward_backward(model_id, batch, "cross_entropy")
            engine.optim_step(model_id, BF16_ADAM)

    out: dict[str, torch.Tensor] = {}
    engine.create_model("full", lora=None)
    start = engine.export_state("full", include_optimizer=False).weights
    train("full", range(4))
    flat, metadata = engine.sharded_state("full")
    masters = {k: v for k, v in flat.items() if k.startswith("optimizer/master.")}
    out["sharded_fp32_masters"] = torch.tensor(
        len(masters) == len(start)
        and all(isinstance(v, DTensor) and v.dtype == torch.float32 for v in masters.values())
    )
    dcp.save(flat, checkpoint_id=checkpoint_dir)
    reader = FileSystemReader(checkpoint_dir)
    shapes = {k: tuple(v.size) for k, v in reader.read_metadata().state_dict_metadata.items()}

    def load(tensors: dict[str, torch.Tensor]) -> None:
        dcp.load(tensors, storage_reader=reader)

    engine.import_sharded_state("resumed", metadata, shapes, load, include_optimizer=True)
    # the older format: no masters, and bf16 moments (AdamW stepped the bf16 weights themselves)
    older_flat = {
        k: v.to(torch.bfloat16) if k.startswith("optimizer/exp_avg") else v
        for k, v in flat.items()
        if not k.startswith("optimizer/master.")
    }
    dcp.save(older_flat, checkpoint_id=checkpoint_dir + ".older")
    older_reader = FileSystemReader(checkpoint_dir + ".older")
    older_shapes = {k: tuple(v.size) for k, v in older_reader.read_metadata().state_dict_metadata.items()}
    engine.import_sharded_state(
        "older",
        metadata,
        older_shapes,
        lambda tensors: dcp.load(tensors, storage_reader=older_reader),
        include_optimizer=True,
    )
    older = engine.export_state("older", include_optimizer=True).optimizer
    expected = {k.removeprefix("optimizer/"): v for k, v in older_flat.items() if k.startswith("optimizer/")}
    weights_now = engine.export_state("full", include_optimizer=False).weights
    expected.update({f"master.{n}": w.float() for n, w in weights_now.items()})

    def full(t: torch.Tensor) -> torch.Tensor:
        return t.full_tensor() if isinstance(t, DTensor) else t

    out["older_moments_fp32_masters_from_weights"] = torch.tensor(
        older is not None
        and older.keys() == expected.keys()
        and all(
            (k.startswith("step.") or older[k].dtype == torch.float32)
            and torch.equal(older[k], full(expected[k]).to(older[k].dtype))
            for k in expected
        )
    )
    engine.import_state(
        "full_tensors", engine.export_state("full", include_optimizer=True), include_optimizer=True
    )
    states = {}
    for model_id in ("full", "resumed", "full_tensors", "older"):
        train(model_id, range(4, 7))
        state = engine.export_state(model_id, include_optimizer=True)
        states[model_id] = {**{f"w.{k}": v for k, v in state.weights.items()}, **state.optimizer}
    final = states["full"]

    def same(other: dict[str, torch.Tensor]) -> bool:
        return other.keys() == final.keys() and all(torch.equal(other[k], final[k]) for k in final)

    out["resumed_exact"] = torch.tensor(same(states["resumed"]))
    out["full_tensors_exact"] = torch.tensor(same(states["full_tensors"]))
    out["older_loaded_and_drifted"] = torch.tensor(
        states["older"].keys() == final.keys() and not same(states["older"])
    )
    names = list(start)
    out["weights_bf16"] = torch.tensor(all(final[f"w.{n}"].dtype == torch.bfloat16 for n in names))
    out["state_fp32"] = torch.tensor(
        all(v.dtype == torch.float32 for k, v in final.items() if not k.startswith(("w.", "step.")))
    )
    out["weights_are_rounded_masters"] = torch.tensor(
        all(torch.equal(final[f"w.{n}"], final[f"master.{n}"].to(torch.bfloat16)) for n in names)
    )
    changed = sum(int((final[f"w.{n}"] != start[n]).sum()) for n in names)
    out["moved"] = torch.tensor(changed / sum(t.numel() for t in start.values()), dtype=torch.float64)
    return out


def main(model_dir: str, out_file: str, mixed_precision: str = "none") -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file

    from tether.engine.fsdp import DistributedTrainingEngine
    from tether.engine.fsdp_collectives import leave_process_group
    from tether.engine.model_loading import load_base_model

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    dtype = "bfloat16" if mixed_precision == "bf16_weights" else "float32"
    engine = DistributedTrainingEngine(
        load_base_model(model_dir, device="cpu", dtype=dtype, weights=False),
        max_tokens_per_micro_batch=BUDGET,
        mixed_precision=None if mixed_precision in ("sharded", "bf16_weights") else mixed_precision,
    )
    if mixed_precision == "bf16_weights":
        results = run_bf16(engine, out_file + ".dcp")
        if dist.get_rank() == 0:
            save_file(results, out_file)
        leave_process_group(together=True)
        return
    if mixed_precision == "sharded":
        results = run_sharded_loads(engine, model_dir, out_file + ".dcp")
        save_file(results, f"{out_file}.rank{dist.get_rank()}")
        leave_process_group(together=True)
        return
    results = run_cases(engine) if mixed_precision == "none" else run_mixed(engine)
    if dist.get_rank() == 0:
        save_file(results, out_file)
    leave_process_group(together=True)


if __name__ == "__main__":
    from tether.engine.fsdp_collectives import exit_process

    main(*sys.argv[1:])
    exit_process(0)
