"""A trainer job's checkpoints without a live trainer: list, delete, promote, export (part of `JobManager`).

The control plane opens the job's own catalogue (`<job dir>/data/tether.db`) and checkpoint files, so
a job's checkpoints stay available while it is stopped and after it is deleted, until the retention
period ends. Blocking: call off the event loop.
"""

from __future__ import annotations

import builtins
import json
import threading
from pathlib import Path

from tether.jobs.errors import JobConflictError
from tether.jobs.promote import PromotedModels, export_hf_model
from tether.jobs.store import JobStore
from tether.server.auth import owner_of_key
from tether.server.catalogue import Catalogue
from tether.types.errors import NotFoundError, UserInputError
from tether.types.paths import parse_checkpoint_path
from tether.types.wire_jobs import ExportedModel, JobCheckpoint, validate_job_id


def _key(owner: str, job_id: str) -> tuple[str, str]:
    return owner, job_id


class JobCheckpoints:
    """The checkpoint half of `JobManager` (tether/jobs/manager.py), which provides these attributes."""

    store: JobStore
    root: Path
    promoted: PromotedModels
    _lock: threading.RLock
    _catalogues: dict[tuple[str, str], Catalogue]

    def job_dir(self, owner: str, job_id: str) -> Path:
        raise NotImplementedError

    def _api_key(self, owner: str, job_id: str) -> str:
        raise NotImplementedError

    def allowed_models(self, owner: str) -> builtins.list[str]:
        raise NotImplementedError

    def _model_aliases(self, owner: str) -> dict[str, str]:
        raise NotImplementedError

    def _job_catalogue(self, owner: str, job_id: str) -> tuple[Catalogue, str] | None:
        """The job's own catalogue and the owner its rows carry, or None if the job never wrote one."""
        path = self.job_dir(owner, job_id) / "data" / "tether.db"
        if not path.exists():
            return None
        with self._lock:
            catalogue = self._catalogues.get(_key(owner, job_id))
            if catalogue is None:
                catalogue = self._catalogues[_key(owner, job_id)] = Catalogue(path)
        return catalogue, owner_of_key(self._api_key(owner, job_id))

    def list_checkpoints(self, owner: str, job_id: str) -> builtins.list[JobCheckpoint]:
        """Every checkpoint the job wrote (all its runs), oldest first; also for stopped and deleted jobs."""
        self.store.get(owner, job_id)
        opened = self._job_catalogue(owner, job_id)
        if opened is None:
            return []
        catalogue, inner_owner = opened
        rows, _ = catalogue.list_checkpoints(inner_owner, limit=100_000)
        return [
            JobCheckpoint(
                name=f"trainerJobs/{job_id}/checkpoints/{r.run_id}/{r.checkpoint_id}",
                tinker_path=r.tinker_path,
                checkpoint_type=r.checkpoint_type,
                create_time=r.created_at,
                size_bytes=r.size_bytes,
                promotable=r.checkpoint_type == "sampler",
                resumable=r.checkpoint_type == "training",
            )
            for r in reversed(rows)
        ]

    def _checkpoint(self, owner: str, job_id: str, tinker_path: str):
        """The job's catalogue, the parsed path, the row and the owner its rows carry, for one of the
        job's checkpoints; NotFoundError if the job (or the checkpoint) is unknown."""
        self.store.get(owner, job_id)
        parsed = parse_checkpoint_path(tinker_path, field="tinker_path")
        opened = self._job_catalogue(owner, job_id)
        if opened is None:
            raise NotFoundError(f"unknown checkpoint {tinker_path}")
        catalogue, inner_owner = opened
        row = catalogue.get_checkpoint(parsed.training_run_id, parsed.checkpoint_id, inner_owner)
        return catalogue, parsed, row, inner_owner

    def delete_checkpoint(self, owner: str, job_id: str, tinker_path: str) -> None:
        """Delete one of the job's checkpoints (files, then its row); NotFoundError if it has none such."""
        from tether.server.checkpoints import CheckpointFiles

        catalogue, parsed, _, inner_owner = self._checkpoint(owner, job_id, tinker_path)
        CheckpointFiles(self.job_dir(owner, job_id) / "data").delete(inner_owner, parsed)
        catalogue.delete_checkpoint(parsed.training_run_id, parsed.checkpoint_id)

    def _sampler_checkpoint(self, owner: str, job_id: str, tinker_path: str, use: str):
        """The job's checkpoint files and the parsed path and inner owner of its sampler checkpoint
        `tinker_path`; NotFoundError if it has none such, UserInputError if it is a training
        checkpoint (those are not `use`: "promotable", "hot-loadable")."""
        from tether.server.checkpoints import CheckpointFiles

        _, parsed, row, inner_owner = self._checkpoint(owner, job_id, tinker_path)
        if row.checkpoint_type != "sampler":
            raise UserInputError(
                f"{tinker_path} is a {row.checkpoint_type} checkpoint; only sampler checkpoints "
                f"(save_weights_for_sampler) are {use}",
                field="tinker_path",
            )
        return CheckpointFiles(self.job_dir(owner, job_id) / "data"), parsed, inner_owner

    def _sampler_weights(self, owner: str, job_id: str, tinker_path: str):
        """The job's sampler checkpoint `tinker_path`, loaded and verified (UserInputError if it is a
        training checkpoint: those are not promotable)."""
        files, parsed, inner_owner = self._sampler_checkpoint(owner, job_id, tinker_path, "promotable")
        return files.store(inner_owner).load_hf_weights(parsed)

    def sampler_directory(self, owner: str, tinker_path: str, job_id: str | None = None) -> Path:
        """Where the sampler checkpoint `tinker_path` of job `job_id` (without one: of whichever of the
        owner's jobs wrote it) lies, for a deployment to hot-load it, also while the job is stopped.
        NotFoundError if no such job has it; UserInputError if it is a training checkpoint."""
        job_ids = [job_id] if job_id else [job.job_id for job in self.store.list(owner)]
        for candidate in job_ids:
            try:
                files, parsed, inner_owner = self._sampler_checkpoint(
                    owner, candidate, tinker_path, "hot-loadable"
                )
            except NotFoundError:
                if job_id:
                    raise
                continue
            return files.directory(inner_owner, parsed)
        raise NotFoundError(
            f"checkpoint {tinker_path} does not exist (neither this server's nor a trainer job's)"
        )

    def _export(
        self, owner: str, job_id: str, tinker_path: str, target: Path, name: str | None
    ) -> ExportedModel:
        from tether.engine.model_loading import resolve_model_path

        weights = self._sampler_weights(owner, job_id, tinker_path)
        base_dir = resolve_model_path(weights.base_model, self._model_aliases(owner))
        provenance = {
            "name": name,
            "base_model": weights.base_model,
            "source": tinker_path,
            "job_id": job_id,
            "merged_lora": weights.is_lora,
        }
        export_hf_model(weights, base_dir, target, provenance=provenance)
        return ExportedModel(
            name=name,
            path=str(target),
            base_model=weights.base_model,
            source=tinker_path,
            merged_lora=weights.is_lora,
        )

    def promote_checkpoint(
        self, owner: str, job_id: str, tinker_path: str, output_model_id: str
    ) -> ExportedModel:
        """Make a sampler checkpoint the owner's model `output_model_id` (a LoRA one merged): from then
        on a valid `base_model` for the owner's jobs. Works for stopped and deleted jobs too.

        Raises UserInputError (bad id, not a sampler checkpoint), NotFoundError, JobConflictError (the
        name is taken)."""
        try:
            validate_job_id(output_model_id)
        except ValueError as exc:
            raise UserInputError(str(exc).replace("job id", "model id"), field="output_model_id") from None
        if output_model_id in self.allowed_models(owner):
            raise JobConflictError(
                f"a model named {output_model_id!r} exists already", field="output_model_id"
            )
        return self._export(
            owner, job_id, tinker_path, self.promoted.directory(owner, output_model_id), output_model_id
        )

    def export_merged(self, owner: str, job_id: str, tinker_path: str) -> ExportedModel:
        """Write a sampler checkpoint as a full Hugging Face model (LoRA merged) under
        `<data_dir>/exports/<owner>/<job_id>/<run>-<name>/` on the control plane's machine."""
        parsed = parse_checkpoint_path(tinker_path, field="tinker_path")
        target = self.root.parent / "exports" / owner / job_id / f"{parsed.training_run_id}-{parsed.name}"
        if (target / "config.json").exists():
            info = json.loads((target / "tether_promoted.json").read_text())
            return ExportedModel(
                name=None,
                path=str(target),
                base_model=info["base_model"],
                source=tinker_path,
                merged_lora=info["merged_lora"],
            )
        return self._export(owner, job_id, tinker_path, target, None)
