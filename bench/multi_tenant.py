"""Many LoRA tenants on one base model: fused forward/backward versus one tenant at a time.

Eight LoRA models (tenants) on one base each train for a few steps; a step is a `ForwardBackward` of
2 datums x 128 tokens followed by an `OptimStep`, submitted to an `InProcessTrainer` as the server
would (typed ops, one stream per model, numbered `seq_id`s). Two trainers run the same ops:

- fused: every tenant drives its own loop from its own thread (submit the step's two ops, wait for
  both, next step), and the trainer's worker fuses the `ForwardBackward`s that are ready together
  into one batched pass (`EngineSettings.fuse_lora_ops`);
- one tenant at a time: fusing off, the tenants' loops run one after another.

Rounds alternate (fused, sequential, fused, ...) so load on the machine affects both alike; the
median aggregate tokens/s of each is printed with their ratio (fused / one at a time) and the sizes
of the fused batches the worker formed.

    python bench/multi_tenant.py                       # 8 tenants, 2 x 128 tokens, the default model
    python bench/multi_tenant.py --tenants 4 --steps 3 --rounds 5 --threads 1
"""

from __future__ import annotations

import argparse
import collections
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from tether.engine.default_model import DEFAULT_MODEL_NAME
from tether.trainer.config import EngineSettings
from tether.trainer.local import InProcessTrainer
from tether.types import ops
from tether.types.wire import AdamParams, LoraConfig

ADAM = AdamParams(learning_rate=1e-4)


def _batch(tenant: int, step: int, rows: int, seq_len: int, vocab: int) -> list[ops.TrainingDatum]:
    rng = np.random.default_rng(1000 * tenant + step)
    data = []
    for _ in range(rows):
        tokens = rng.integers(0, vocab, size=seq_len + 1)
        data.append(
            ops.TrainingDatum(
                input_tokens=tokens[:-1].astype(np.int64),
                loss_fn_inputs={
                    "target_tokens": tokens[1:].astype(np.int64),
                    "weights": np.ones(seq_len, np.float32),
                },
            )
        )
    return data


class Tenants:
    """One trainer, its tenants' models and each tenant's next `seq_id`."""

    def __init__(self, args: argparse.Namespace, data_dir: Path, fuse: bool) -> None:
        settings = EngineSettings(
            data_dir=data_dir,
            device=args.device,
            dtype=args.dtype,
            torch_threads=args.threads,
            fuse_lora_ops=fuse,
            fuse_wait_ms=args.fuse_wait_ms,
        )
        self.args = args
        self.trainer = InProcessTrainer(args.model, settings)
        self.batch_sizes: collections.Counter = collections.Counter()
        if fuse:
            inner = self.trainer.worker._execute_batch
            self.trainer.worker._execute_batch = lambda batch: (
                self.batch_sizes.update([len(batch)]),
                inner(batch),
            )[1]
        self.vocab = self.trainer.submit(ops.DescribeBase()).result(600).vocab_size
        self.seq = {}
        for t in range(args.tenants):
            model = f"tenant-{t}"
            self.trainer.submit(
                ops.CreateModel(model_id=model, lora_config=LoraConfig(rank=args.rank, seed=t)), stream=model
            ).result(600)
            self.seq[model] = 1

    def run_tenant(self, tenant: int, steps: int, first_step: int) -> None:
        model = f"tenant-{tenant}"
        for step in range(first_step, first_step + steps):
            data = _batch(tenant, step, self.args.rows, self.args.seq_len, self.vocab)
            seq = self.seq[model]
            self.seq[model] = seq + 2
            fb = self.trainer.submit(
                ops.ForwardBackward(model_id=model, data=data, loss_fn="cross_entropy"),
                stream=model,
                seq_id=seq,
            )
            step_done = self.trainer.submit(
                ops.OptimStep(model_id=model, adam_params=ADAM), stream=model, seq_id=seq + 1
            )
            fb.result(600)
            step_done.result(600)

    def round(self, concurrent: bool, first_step: int) -> float:
        """Seconds for every tenant to take `args.steps` steps."""
        start = time.perf_counter()
        if concurrent:
            threads = [
                threading.Thread(target=self.run_tenant, args=(t, self.args.steps, first_step))
                for t in range(self.args.tenants)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        else:
            for t in range(self.args.tenants):
                self.run_tenant(t, self.args.steps, first_step)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL_NAME)
    parser.add_argument("--tenants", type=int, default=8)
    parser.add_argument("--rows", type=int, default=2, help="datums per forward_backward")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2, help="steps per tenant per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--fuse-wait-ms",
        type=float,
        default=EngineSettings.model_fields["fuse_wait_ms"].default,
        help="how long a lone forward_backward waits for peers (EngineSettings.fuse_wait_ms)",
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        fused = Tenants(args, Path(tmp) / "fused", fuse=True)
        plain = Tenants(args, Path(tmp) / "plain", fuse=False)
        try:
            fused.round(True, 0)  # warm-up: first passes allocate
            plain.round(False, 0)
            fused.batch_sizes.clear()
            times: dict[str, list[float]] = {"fused": [], "plain": []}
            for r in range(1, args.rounds + 1):
                times["fused"].append(fused.round(True, r * args.steps))
                times["plain"].append(plain.round(False, r * args.steps))
        finally:
            fused.trainer.close()
            plain.trainer.close()

    tokens = args.tenants * args.steps * args.rows * args.seq_len
    fused_tps = tokens / statistics.median(times["fused"])
    plain_tps = tokens / statistics.median(times["plain"])
    print(
        f"model {args.model}, {args.tenants} LoRA tenants (rank {args.rank}), each {args.steps} steps/round of "
        f"{args.rows}x{args.seq_len} tokens + optim_step, {args.rounds} rounds, device {args.device}, fuse wait {args.fuse_wait_ms} ms"
    )
    print(f"{'':28}{'fused':>12}{'one at a time':>16}")
    print(
        f"{'median round (s)':28}{statistics.median(times['fused']):>12.3f}{statistics.median(times['plain']):>16.3f}"
    )
    print(f"{'aggregate tokens/s':28}{fused_tps:>12.0f}{plain_tps:>16.0f}")
    print(f"fused batch sizes (ops per pass: count): {dict(sorted(fused.batch_sizes.items()))}")
    print(f"ratio fused / one at a time: {fused_tps / plain_tps:.2f}")


if __name__ == "__main__":
    main()
