"""`tether jobs create|list|get|delete|resume|cancel`, `tether checkpoints list|promote|export|delete`.

Each subcommand's options are generated (tether/cli_args.py) from a config model built on the SDK's
own `TrainerJobConfig`, so the CLI, the SDK and the REST body share one definition. Every command
talks to a control plane through `TrainerJobManager` (base URL and key from the options, else
$TETHER_BASE_URL and $TETHER_API_KEY) and prints the answer as JSON.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, Field

from tether.client.jobs import TrainerJobConfig, TrainerJobManager


class Connection(BaseModel):
    base_url: str | None = Field(None, description="The control plane's address ($TETHER_BASE_URL).")
    api_key: str | None = Field(None, description="API key ($TETHER_API_KEY).")

    def manager(self) -> TrainerJobManager:
        return TrainerJobManager(self.base_url, self.api_key)


class CreateArgs(TrainerJobConfig, Connection):
    wait: bool = Field(
        True, description="Wait until the job is ready (RUNNING and healthy) and print its endpoint."
    )
    poll_interval_s: float = Field(5.0, gt=0, description="Seconds between polls while waiting.")
    timeout_s: float = Field(900.0, gt=0, description="Most seconds to wait for the job once it is placed.")


class JobArgs(Connection):
    job_id: str = Field(description="The trainer job's id.")


class ResumeArgs(JobArgs):
    wait: bool = Field(True, description="Wait until the resumed job is ready.")
    poll_interval_s: float = Field(5.0, gt=0, description="Seconds between polls while waiting.")
    timeout_s: float = Field(900.0, gt=0, description="Most seconds to wait.")


class ListArgs(Connection):
    show_deleted: bool = Field(False, description="Also list deleted jobs (tombstones within retention).")


class DeleteCheckpointArgs(JobArgs):
    tinker_path: str = Field(description="The checkpoint (tinker://<run>/<kind>/<name>).")


class PromoteArgs(DeleteCheckpointArgs):
    output_model_id: str = Field(description="Name of the new model (1-63 of [a-z0-9-]).")


def _print(value: Any) -> int:
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    elif isinstance(value, list):
        value = [v.model_dump(mode="json") if isinstance(v, BaseModel) else v for v in value]
    elif hasattr(value, "__dataclass_fields__"):
        value = dict(vars(value))
    print(json.dumps(value, indent=2, default=str))
    return 0


def create(args: CreateArgs) -> int:
    manager = args.manager()
    config = TrainerJobConfig.model_validate(args.model_dump(include=set(TrainerJobConfig.model_fields)))
    if not args.wait:
        return _print(manager.get(manager.create(config).job_id))
    return _print(
        manager.create_and_wait(config, poll_interval_s=args.poll_interval_s, timeout_s=args.timeout_s)
    )


def list_jobs(args: ListArgs) -> int:
    return _print(args.manager().list(show_deleted=args.show_deleted))


def get(args: JobArgs) -> int:
    return _print(args.manager().get(args.job_id))


def delete(args: JobArgs) -> int:
    manager = args.manager()
    manager.delete(args.job_id)
    return _print(manager.get(args.job_id))


def resume(args: ResumeArgs) -> int:
    manager = args.manager()
    if not args.wait:
        return _print(manager.resume(args.job_id))
    return _print(
        manager.resume_and_wait(args.job_id, poll_interval_s=args.poll_interval_s, timeout_s=args.timeout_s)
    )


def cancel(args: JobArgs) -> int:
    return _print(args.manager().cancel(args.job_id))


def list_checkpoints(args: JobArgs) -> int:
    return _print(args.manager().list_checkpoints(args.job_id))


def delete_checkpoint(args: DeleteCheckpointArgs) -> int:
    args.manager().delete_checkpoint(args.job_id, args.tinker_path)
    return _print({"deleted": args.tinker_path})


def promote_checkpoint(args: PromoteArgs) -> int:
    return _print(args.manager().promote_checkpoint(args.job_id, args.tinker_path, args.output_model_id))


def export_merged(args: DeleteCheckpointArgs) -> int:
    return _print(args.manager().export_merged(args.job_id, args.tinker_path))
