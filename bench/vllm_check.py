"""Tether's sampler weights load into vLLM and give tether's logprobs (issue 12's interoperability check).

Two steps, in two interpreters, so vLLM (which pins its own torch) needs no tether install:

1. `prepare` (tether's environment): on the test model (`tether/tiny-qwen3`, or `--model`), an
   in-process trainer trains a LoRA adapter (attention + MLP; vLLM serves no LoRA on the LM head)
   and a full fine-tuning copy a few AdamW steps, saves both with `save_sampler_weights` (what the
   SDK's `save_weights_for_sampler` runs: a PEFT adapter, a full Hugging Face snapshot), and writes
   the logprobs tether computes for a fixed token sequence, plus the base model's, to
   `OUT/expected.json`.
2. `compare` (vLLM's environment): loads the base model with the adapter, and the full snapshot,
   into vLLM (bf16, eager), reads the prompt logprobs of the same sequence and prints the largest
   difference from tether's for each (pass: within `--atol`, default 1e-2), and how far the trained
   weights moved the logprobs from the base model's (so a pass is not vacuous).
   Without vLLM it prints "vllm not installed: step skipped" and exits 0.

Run both (the default) with `python bench/vllm_check.py --device cuda --dtype bfloat16
[--vllm-python /opt/vllm/bin/python]`. The GPU machine has no network: install vLLM beforehand into
its own virtual environment, e.g. on a machine with the same platform
`pip download vllm -d wheels/`, copy `wheels/` over, then
`python -m venv /opt/vllm && /opt/vllm/bin/pip install --no-index --find-links wheels/ vllm`
(or install it into tether's environment if the torch versions agree).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

SEQUENCE = [(7 * i + 3) % 250 + 1 for i in range(48)]
"""The fixed token sequence whose logprobs are compared (ids below the test model's 256 bytes)."""


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("step", nargs="?", choices=["all", "prepare", "compare"], default="all")
    parser.add_argument("--out", type=Path, default=Path("/tmp/tether-vllm-check"))
    parser.add_argument("--model", default="tether/tiny-qwen3")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--atol", type=float, default=1e-2)
    parser.add_argument("--vllm-python", default=sys.executable, help="interpreter that has vllm")
    return parser.parse_args()


def prepare(args: argparse.Namespace) -> None:
    import numpy as np

    from tether.trainer.config import EngineSettings
    from tether.trainer.local import InProcessTrainer
    from tether.types import ops
    from tether.types.wire import AdamParams, LoraConfig

    settings = EngineSettings(data_dir=args.out / "data", device=args.device, dtype=args.dtype)
    trainer = InProcessTrainer(args.model, settings)
    tokens = np.array(SEQUENCE, dtype=np.int64)
    datum = ops.TrainingDatum(
        input_tokens=tokens[:-1],
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": np.ones(len(tokens) - 1, np.float32)},
    )
    # train toward a different sequence, so the weights move the logprobs of the checked one
    rng = np.random.default_rng(0)
    other = rng.integers(1, 250, size=len(tokens)).astype(np.int64)
    train = ops.TrainingDatum(
        input_tokens=other[:-1],
        loss_fn_inputs={"target_tokens": other[1:], "weights": np.ones(len(other) - 1, np.float32)},
    )

    def run(op: ops.Op, model: str):
        return trainer.submit(op, stream=model).result(600)

    def logprobs(model: str) -> list[float]:
        out = run(ops.Forward(model_id=model, data=[datum], loss_fn="cross_entropy"), model).outputs[0]
        return [float(x) for x in out["logprobs"]]

    expected: dict[str, object] = {"sequence": SEQUENCE, "base_model_dir": "", "dtype": args.dtype}
    try:
        lora = LoraConfig(rank=8, seed=0, train_unembed=False)
        for name, config in (("base", lora), ("lora", lora), ("full", None)):
            run(ops.CreateModel(model_id=name, lora_config=config), name)
            if name != "base":
                for _ in range(3):
                    run(ops.ForwardBackward(model_id=name, data=[train], loss_fn="cross_entropy"), name)
                    run(ops.OptimStep(model_id=name, adam_params=AdamParams(learning_rate=2e-3)), name)
            expected[f"{name}_logprobs"] = logprobs(name)
            if name != "base":
                path = f"tinker://vllm-check/sampler_weights/{name}"
                op = ops.SaveSamplerWeights(model_id=name, kind="sampler", owner="bench", path=path)
                expected[f"{name}_dir"] = run(op, name).directory
        expected["base_model_dir"] = str(trainer.executor.base.path)
    finally:
        trainer.close()
    (args.out / "expected.json").write_text(json.dumps(expected, indent=1))
    moved = {
        name: max(
            abs(a - b)
            for a, b in zip(expected[f"{name}_logprobs"], expected["base_logprobs"], strict=True)  # type: ignore[call-overload]
        )
        for name in ("lora", "full")
    }
    print(f"tether ({args.device} {args.dtype}): adapter and full snapshot written under {args.out}")
    print(
        f"training moved the checked logprobs from the base model's by up to {moved['lora']:.3f} (LoRA), "
        f"{moved['full']:.3f} (full)"
    )


def compare(args: argparse.Namespace) -> int:
    try:
        import vllm  # noqa: F401
    except ImportError:
        print("vllm not installed: step skipped")
        return 0
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    expected = json.loads((args.out / "expected.json").read_text())
    sequence = expected["sequence"]
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
    common = dict(
        dtype=expected["dtype"],
        enforce_eager=True,
        gpu_memory_utilization=0.15,
        max_model_len=256,
        skip_tokenizer_init=True,
        seed=0,
    )

    def prompt_logprobs(llm, lora_request=None) -> list[float]:
        out = llm.generate([TokensPrompt(prompt_token_ids=sequence)], params, lora_request=lora_request)
        entries = out[0].prompt_logprobs[1:]  # the first token has no logprob
        return [entry[token].logprob for entry, token in zip(entries, sequence[1:], strict=True)]

    results = {}
    llm = LLM(model=expected["base_model_dir"], enable_lora=True, max_lora_rank=8, max_loras=1, **common)
    results["lora"] = prompt_logprobs(llm, LoRARequest("tether-lora", 1, expected["lora_dir"]))
    results["base"] = prompt_logprobs(llm)
    del llm
    llm = LLM(model=expected["full_dir"], **common)
    results["full"] = prompt_logprobs(llm)
    failed = False
    for name in ("base", "lora", "full"):
        diff = max(abs(a - b) for a, b in zip(results[name], expected[f"{name}_logprobs"], strict=True))
        ok = diff <= args.atol
        failed |= not ok
        print(
            f"vLLM {vllm.__version__} vs tether, {name}: max |logprob diff| {diff:.4f} "
            f"over {len(sequence) - 1} tokens (atol {args.atol:g}): {'pass' if ok else 'FAIL'}"
        )
    return 1 if failed else 0


def main() -> None:
    args = parse()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.step in ("all", "prepare"):
        prepare(args)
    if args.step == "compare":
        raise SystemExit(compare(args))
    if args.step == "all":
        command = [args.vllm_python, __file__, "compare", "--out", str(args.out), "--atol", str(args.atol)]
        raise SystemExit(subprocess.call(command))


if __name__ == "__main__":
    main()
