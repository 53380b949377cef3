"""Hot-load latency: time from save_sampler_checkpoint_ext returning to the deployment serving the
new weights, ÷ the time the save took to write the checkpoint. Target ≤ 1.5.

A full fine-tuning of the default tiny model (fp32, CPU) saves, per round, a base and then one
delta per optimizer step; after each save the deployment core (`tether.deployment.served.
ServedWeights` on tether's sampling engine, in this process, no HTTP) hot-loads it with an ASYNC
transition, and a greedy request confirms the new identity is served. Each row is one save;
medians per checkpoint type at the end (the first base also pays the deployment's first-load
warm-up, so it is shown but several rounds give the base median).

    PYTHONPATH=. python bench/hotload.py [--rounds 3] [--deltas 3] [--lr 1e-4]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from bench.delta_size import batch
from tether.deployment.backend import EngineBackend
from tether.deployment.served import ServedWeights
from tether.engine.default_model import DEFAULT_MODEL_NAME
from tether.engine.model_loading import load_base_model
from tether.engine.sampling import SampleRequest
from tether.engine.training_engine import TrainingEngine
from tether.engine.training_types import AdamWParams
from tether.storage import LocalCheckpointStore, StoredHfWeights
from tether.storage.sampler_chain import save_sampler_checkpoint_ext


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="bases saved (each followed by deltas)")
    parser.add_argument("--deltas", type=int, default=3, help="deltas after each base")
    parser.add_argument("--lr", type=float, default=1e-4)
    args = parser.parse_args()
    base = load_base_model(DEFAULT_MODEL_NAME)
    trainer = TrainingEngine(base)
    trainer.create_model("m", lora=None)
    backend = EngineBackend(load_base_model(DEFAULT_MODEL_NAME))
    served = ServedWeights(backend, base_model=DEFAULT_MODEL_NAME, state_dir=None)
    ratios: dict[str, list[float]] = {"base": [], "delta": []}
    print(f"model {DEFAULT_MODEL_NAME} fp32, full fine-tuning, lr {args.lr}")
    print(f"{'save':>8} {'type':>6} {'MB':>7} {'write s':>8} {'load s':>8} {'load/write':>11}")
    with tempfile.TemporaryDirectory() as tmp:
        store = LocalCheckpointStore(Path(tmp))
        for step in range(args.rounds * (args.deltas + 1)):
            if step:
                trainer.forward_backward("m", batch(step, 8, 64, base.vocab_size), "cross_entropy")
                trainer.optim_step("m", AdamWParams(learning_rate=args.lr))
            weights = trainer.sampler_weights("m")
            started = time.perf_counter()
            saved = save_sampler_checkpoint_ext(
                store,
                f"tinker://bench:train:0/sampler_weights/step-{step}",
                StoredHfWeights(base_model=DEFAULT_MODEL_NAME, tensors=weights.tensors),
                checkpoint_type="base" if step % (args.deltas + 1) == 0 else "delta",
                base_model_dir=base.path,
                tokenizer_dir=base.tokenizer_path,
            )
            written = time.perf_counter()
            served.hotload(str(store.directory(saved.info.path)))
            future, identity = served.submit(
                SampleRequest(prompt_tokens=[1, 2, 3], max_tokens=1, temperature=0)
            )
            future.result()
            loaded = time.perf_counter()
            assert identity == saved.link.identity
            write_s, load_s = written - started, loaded - written
            ratios[saved.checkpoint_type].append(load_s / write_s)
            print(
                f"{step:8d} {saved.checkpoint_type:>6} {saved.stored_bytes / 1e6:7.2f} {write_s:8.3f} "
                f"{load_s:8.3f} {load_s / write_s:11.2f}"
            )
    backend.close()
    for kind, values in ratios.items():
        if values:
            print(f"{kind}: median load/write {statistics.median(values):.2f} (target <= 1.5)")


if __name__ == "__main__":
    main()
