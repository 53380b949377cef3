"""The `tether` command: `serve`, `trainer`, `quickstart`, `sft`, `grpo`, `dpo`, `rl`, `distill`, `deployments`.

Each subcommand is a typed config model plus a function that runs it; the options are generated
from the model (`tether.cli_args`), so the CLI and the Python API can never disagree.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from tether.cli_args import add_config_arguments, build_config
from tether.types.errors import TetherError


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    config: str  # "module:ConfigClass"
    run: str  # "module:function" taking the config
    env_prefix: str | None = None

    def load(self, ref: str):
        module, _, attr = ref.partition(":")
        return getattr(importlib.import_module(module), attr)


COMMANDS = (
    Command(
        "serve",
        "Run the tether server (Tinker protocol + tether API). Every option can also be set as TETHER_<OPTION>.",
        "tether.server.config:ServerConfig",
        "tether.server.main:serve",
        env_prefix="TETHER_",
    ),
    Command(
        "trainer",
        "Run one base model's trainer process: it executes the ops a `tether serve` sends over a socket.",
        "tether.trainer.config:TrainerConfig",
        "tether.trainer.process:main",
        env_prefix="TETHER_",
    ),
    Command(
        "quickstart",
        "Teach the embedded default model a task end to end on this machine: SFT, then GRPO.",
        "tether.recipes.quickstart:Config",
        "tether.recipes.quickstart:main",
    ),
    Command(
        "sft",
        "Supervised fine-tuning on JSONL conversations.",
        "tether.recipes.sft:Config",
        "tether.recipes.sft:main",
    ),
    Command(
        "grpo",
        "Group-relative policy optimisation with a reward function.",
        "tether.recipes.grpo:Config",
        "tether.recipes.grpo:main",
    ),
    Command(
        "dpo",
        "Direct preference optimisation on JSONL preference pairs, anchored at the initial weights.",
        "tether.recipes.dpo:Config",
        "tether.recipes.dpo:main",
    ),
    Command(
        "rl",
        "Asynchronous off-policy RL: sampling on the latest weights overlaps training, staleness bounded.",
        "tether.recipes.rl:Config",
        "tether.recipes.rl:main",
    ),
    Command(
        "distill",
        "On-policy distillation: the student samples, a served teacher scores, reverse KL is the advantage.",
        "tether.recipes.distill:Config",
        "tether.recipes.distill:main",
    ),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tether", description="tether: a self-hosted training API for LLMs.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        sub_parser = sub.add_parser(command.name, help=command.help, description=command.help)
        add_config_arguments(sub_parser, command.load(command.config))
    from tether import cli_deployments

    cli_deployments.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "deployments":
        import httpx

        from tether import cli_deployments

        try:
            return cli_deployments.run(args)
        except (TetherError, httpx.HTTPError) as exc:
            print(f"tether deployments: {exc}", file=sys.stderr)
            return 2
    command = next(c for c in COMMANDS if c.name == args.command)
    try:
        config = build_config(command.load(command.config), args, env_prefix=command.env_prefix)
        result = command.load(command.run)(config)
    except TetherError as exc:
        print(f"tether {command.name}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
