"""The `tether` command: `serve`, `trainer`, `quickstart`, `sft`, `grpo`, `dpo`, `rl`, `distill`, `deployments`.

Each subcommand is a typed config model plus a function that runs it; the options are generated
from the model (`tether.cli_args`), so the CLI and the Python API can never disagree.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import sys
from collections.abc import Callable, Sequence
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
    group: str | None = None  # "jobs": the command is `tether jobs <name>`

    def load(self, ref: str):
        module, _, attr = ref.partition(":")
        return getattr(importlib.import_module(module), attr)


COMMANDS: tuple[Command, ...] = (
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


def _job_command(group: str, name: str, help: str, config: str, run: str) -> Command:
    return Command(name, help, f"tether.cli_jobs:{config}", f"tether.cli_jobs:{run}", group=group)


COMMANDS += (
    _job_command(
        "jobs",
        "create",
        "Create a dedicated trainer job (and wait until it is ready).",
        "CreateArgs",
        "create",
    ),
    _job_command("jobs", "list", "List your trainer jobs.", "ListArgs", "list_jobs"),
    _job_command("jobs", "get", "Show one trainer job.", "JobArgs", "get"),
    _job_command(
        "jobs", "delete", "Delete a trainer job (its checkpoints stay listable).", "JobArgs", "delete"
    ),
    _job_command("jobs", "resume", "Resume a stopped trainer job.", "ResumeArgs", "resume"),
    _job_command("jobs", "cancel", "Stop a running trainer job (resumable).", "JobArgs", "cancel"),
    _job_command(
        "checkpoints",
        "list",
        "List a trainer job's checkpoints (also after it is gone).",
        "JobArgs",
        "list_checkpoints",
    ),
    _job_command(
        "checkpoints",
        "promote",
        "Promote a sampler checkpoint to a named model (LoRA merged).",
        "PromoteArgs",
        "promote_checkpoint",
    ),
    _job_command(
        "checkpoints",
        "export",
        "Export a sampler checkpoint as a merged Hugging Face model.",
        "DeleteCheckpointArgs",
        "export_merged",
    ),
    _job_command(
        "checkpoints",
        "delete",
        "Delete one of a trainer job's checkpoints.",
        "DeleteCheckpointArgs",
        "delete_checkpoint",
    ),
)

GROUP_HELP = {
    "jobs": "Dedicated trainer jobs on a control plane.",
    "checkpoints": "Checkpoints of trainer jobs.",
}


def _named(command: Command, argv: Sequence[str]) -> bool:
    """Whether `argv` (the arguments after `tether`) runs `command`."""
    words = list(argv[:2])
    return words[: 2 if command.group else 1] == (
        [command.group, command.name] if command.group else [command.name]
    )


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The `tether` parser. With `argv`, only the command it names gets its options: loading a command's
    config model imports its module (a recipe imports torch), which `tether serve` must not wait for."""
    parser = argparse.ArgumentParser(
        prog="tether", description="tether: a self-hosted training API for LLMs."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    for command in COMMANDS:
        parent = sub
        if command.group is not None:
            if command.group not in groups:
                group_parser = sub.add_parser(command.group, help=GROUP_HELP[command.group])
                groups[command.group] = group_parser.add_subparsers(
                    dest="subcommand", metavar="SUBCOMMAND", required=True
                )
            parent = groups[command.group]
        sub_parser = parent.add_parser(command.name, help=command.help, description=command.help)
        if argv is None or _named(command, argv):
            add_config_arguments(sub_parser, command.load(command.config))
    from tether import cli_deployments

    cli_deployments.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    collecting = gc.isenabled()
    gc.disable()  # while parsing and importing the command's modules: see `_resume_collection`
    try:
        return _main(argv, lambda: _resume_collection(collecting))
    finally:
        _resume_collection(collecting)


def _resume_collection(collecting: bool) -> None:
    """Start-up (parsing, importing a command's modules) runs without the cyclic garbage collector: it
    allocates long-lived objects only, and collecting them over and over while torch and transformers
    import took about a fifth of start-up's CPU time. `tether serve` keeps collection off until its
    base models are loaded (`tether.server.main.serve`)."""
    if collecting:
        gc.enable()


def _main(argv: Sequence[str], started: Callable[[], None]) -> int:
    args = build_parser(argv).parse_args(argv)
    if args.command == "deployments":
        import httpx

        from tether import cli_deployments

        try:
            return cli_deployments.run(args)
        except (TetherError, httpx.HTTPError) as exc:
            print(f"tether deployments: {exc}", file=sys.stderr)
            return 2
    command = next(
        c
        for c in COMMANDS
        if (c.group, c.name)
        == ((args.command, args.subcommand) if getattr(args, "subcommand", None) else (None, args.command))
    )
    try:
        config = build_config(command.load(command.config), args, env_prefix=command.env_prefix)
        run = command.load(command.run)
        started()
        result = run(config)
    except TetherError as exc:
        print(f"tether {' '.join(filter(None, (command.group, command.name)))}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
