"""The FSDP2 training engine on 2 gloo ranks (started with torchrun) equals the single-process engine.

Every built-in loss, full fine-tuning and LoRA: logprobs, losses and gradients to 1e-5 (fp32), and
weights after 3 AdamW steps with clipping. The batch is split unevenly across ranks and the small
micro-batch budget makes the ranks run different numbers of micro-batches.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import dist_cases
import pytest
import torch

HERE = Path(__file__).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node nproc ARGS` on loopback; its output is in the result."""
    env = {**os.environ, "PYTHONPATH": str(HERE.parent.parent), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        *args,
    ]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("dist-model")
    dist_cases.make_model(str(path))
    return str(path)


@pytest.fixture(scope="module")
def two_rank_results(model_dir, tmp_path_factory) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = tmp_path_factory.mktemp("dist-out") / "results.safetensors"
    done = torchrun(2, str(HERE / "dist_cases.py"), model_dir, str(out))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return load_file(str(out))


@pytest.fixture(scope="module")
def single_results(model_dir) -> dict[str, torch.Tensor]:
    from tether.engine.model_loading import load_base_model
    from tether.engine.training_engine import TrainingEngine

    base = load_base_model(model_dir, device="cpu", dtype="float32")
    return dist_cases.run_cases(TrainingEngine(base, max_tokens_per_micro_batch=dist_cases.BUDGET))


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_two_ranks_equal_one_process(two_rank_results, single_results, model_dir, mode):
    keys = sorted(k for k in single_results if k.startswith(mode + "."))
    assert keys and set(keys) == {k for k in two_rank_results if k.startswith(mode + ".")}
    assert any(".grad." in k for k in keys) and any(".weights." in k for k in keys)
    assert int(two_rank_results[f"{mode}.refused"]) == 1  # the diverged step was refused on 2 ranks too
    for key in keys:
        torch.testing.assert_close(two_rank_results[key], single_results[key], rtol=1e-5, atol=1e-5, msg=key)
    # the steps really trained: LoRA's B (zero at first) and the full copy's embeddings moved
    moved = [
        k for k in keys if ".weights." in k and (k.endswith("lora_B") or k.endswith("embed_tokens.weight"))
    ]
    assert moved and all(float(two_rank_results[k].abs().max()) > 0 for k in moved)
    if mode == "full":
        from safetensors.torch import load_file

        base = load_file(str(Path(model_dir) / "model.safetensors"))
        assert not torch.equal(base["model.embed_tokens.weight"], two_rank_results[moved[0]])


def test_bf16_mixed_precision_keeps_fp32_state_and_trains_close_to_fp32(model_dir, tmp_path):
    from safetensors.torch import load_file

    from tether.engine.model_loading import load_base_model
    from tether.engine.training_engine import TrainingEngine

    out = tmp_path / "mixed.safetensors"
    done = torchrun(2, str(HERE / "dist_cases.py"), model_dir, str(out), "bfloat16")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    mixed = load_file(str(out))
    reference = dist_cases.run_mixed(
        TrainingEngine(
            load_base_model(model_dir, device="cpu", dtype="float32"),
            max_tokens_per_micro_batch=dist_cases.BUDGET,
        )
    )
    for mode in ("full", "lora"):
        assert bool(mixed[f"{mode}.fp32_weights"]) and bool(mixed[f"{mode}.fp32_moments"])
        for step in range(2):
            key = f"{mode}.loss{step}"
            assert float(mixed[key]) == pytest.approx(float(reference[key]), rel=2e-2)  # bf16 compute
            assert float(mixed[key]) != float(reference[key])  # and it really computed in bf16


def test_bf16_weights_train_through_sharded_fp32_masters_and_resume_exactly(model_dir, tmp_path):
    """bf16 weights without mixed precision (the GPU default dtype): AdamW steps sharded fp32
    masters, so lr 1e-5 moves the weights; DCP save -> load -> continue is bit-exact."""
    from safetensors.torch import load_file

    out = tmp_path / "bf16.safetensors"
    done = torchrun(2, str(HERE / "dist_cases.py"), model_dir, str(out), "bf16_weights")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    r = load_file(str(out))
    for flag in (
        "sharded_fp32_masters",
        "resumed_exact",
        "full_tensors_exact",
        "older_loaded_and_drifted",
        "older_moments_fp32_masters_from_weights",
        "weights_bf16",
        "state_fp32",
        "weights_are_rounded_masters",
    ):
        assert bool(r[flag]), flag
    assert float(r["moved"]) > 0.3, float(r["moved"])


def test_leave_process_group_waits_for_every_rank(tmp_path):
    """A rank that ends first waits for its peers before it destroys the group: under gloo, leaving
    while a peer is still busy sometimes aborts the process at exit (SIGABRT), which torchrun
    reports as the whole run failing."""
    done = torchrun(2, str(HERE / "leave_cases.py"), "waits", str(tmp_path), timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (tmp_path / "rank0.txt").read_text() == "waited"
    # exit_process ends without the interpreter's shutdown, yet flushes what was printed
    assert "rank 0 left" in done.stdout and "rank 1 left" in done.stdout


def test_leave_process_group_does_not_hang_on_a_dead_peer(tmp_path):
    done = torchrun(2, str(HERE / "leave_cases.py"), "peer_gone", str(tmp_path), timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (tmp_path / "rank0.txt").read_text().startswith("left after")
    assert "leaving anyway" in done.stderr


def test_split_by_tokens_balances_and_covers_every_datum():
    from tether.engine.fsdp import split_by_tokens
    from tether.engine.micro_batching import plan_micro_batches

    groups = split_by_tokens(dist_cases.LENGTHS, 2)
    assert sorted(i for g in groups for i in g) == list(range(len(dist_cases.LENGTHS)))
    assert groups == [[0, 1], [2, 3, 4]]  # 14+3 tokens vs 5+4+6
    # and the ranks need different numbers of micro-batches, so the zero-weighted passes are exercised
    plans = [plan_micro_batches([dist_cases.LENGTHS[i] for i in g], dist_cases.BUDGET) for g in groups]
    assert len(plans[0]) != len(plans[1])
    assert split_by_tokens([5], 3) == [[0], [], []]


def test_each_rank_materialises_only_its_shards(model_dir, tmp_path):
    """From a meta-device skeleton, creating models and loading a DCP state never makes a full-size
    tensor on any rank (every aten op's tensors are measured); the full-tensor path, as a control, does."""
    from safetensors.torch import load_file

    out = tmp_path / "sharded"
    done = torchrun(2, str(HERE / "dist_cases.py"), model_dir, str(out), "sharded")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for rank in (0, 1):
        r = {k: v.item() for k, v in load_file(f"{out}.rank{rank}").items()}
        assert r["base_on_meta"] and r["all_dtensors"] and r["lora_base_dtensors"]
        assert r["exact"] and r["same_loss"]  # the sharded load restores weights and moments bit for bit
        assert r["broadcast_equals_read"]  # the fallback for renamed checkpoints loads the same shards
        full, shard = r["largest_param_bytes"], r["largest_local_bytes"]
        assert shard == full // 2
        assert r["full_load_bytes"] >= full  # the measure sees whole tensors when a rank reads them
        for key in ("create_full_bytes", "sharded_load_bytes", "create_lora_bytes"):
            assert r[key] <= shard, (key, r[key], shard, full)
