"""One trainer over many ranks (torchrun): rank 0 serves the op socket, every rank runs each op in lock-step.

Started as `torchrun --nproc-per-node N [--nnodes M --rdzv-backend c10d --rdzv-endpoint HOST:PORT]
-m tether.trainer.distributed CONFIG.json` (`tether trainer --nproc-per-node N` and
`tether serve --trainer-process --nproc-per-node N` run that command for you). Rank 0 listens like a
single-process `tether trainer` (`tether.trainer.process`); each op that touches the training
engine is encoded with `tether.types.op_codec` and broadcast as a length and uint8 bytes (never
pickle) over a gloo control group that has no timeout, since a trainer may sit idle for hours.
All ranks then execute it with a `DistributedTrainingEngine` (FSDP2) and exchange their outcome:

- every rank succeeded: rank 0's result is the answer;
- every rank failed (a user error is found before any collective, the same on every rank): rank 0's
  error is the answer and nothing changed;
- some ranks failed: the op fails naming the rank and its error. After a read-only op (forward,
  saves) the trainer goes on; after an op that changes state the ranks may disagree, so every rank
  logs why and exits (torchrun then stops the job and the server reports the trainer's exit).

A rank that dies (SIGKILL, OOM-kill) is seen by torchrun's elastic agent, which stops the other
ranks; a rank stuck in a training collective gives up after `collective_timeout_s`.

Memory: every rank starts from a meta-device skeleton of the base model and holds only its shards
of the training copies (read from the base's safetensors, and on `load_state` from the checkpoint,
each rank reading only its slices). Sampling and sampler registration run on rank 0 alone, on a
full copy of the base model that rank 0 loads the first time something samples: one unsharded
base in the weights' dtype on rank 0 (16 GB for an 8B model in bf16), never on the other ranks.
Gathering it on demand from the shards instead would make every sample a collective of all ranks.
Sampler weights of full fine-tuning are gathered tensor by tensor and kept by rank 0 only. Files
are written by rank 0 (gathered weights) or by every rank (DCP shards); `data_dir` must be storage
every node can read.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from tether.engine.fsdp import DistributedTrainingEngine, all_gather_bytes, broadcast_bytes
from tether.engine.fsdp_collectives import exit_process, leave_process_group
from tether.engine.model_loading import LoadedBaseModel
from tether.engine.sampling import SamplingEngine
from tether.engine.training_types import GraphHandle
from tether.engine.worker import ModelWorker
from tether.storage.formats import DCP_DIR, training_state_reader, verify_training_state
from tether.storage.manifest import CorruptCheckpointError
from tether.trainer.config import EngineSettings, TrainerConfig
from tether.trainer.executor import OpExecutor
from tether.trainer.local import InProcessTrainer
from tether.types import ops
from tether.types.errors import ServerError
from tether.types.op_codec import HEADER_SIZE, decode_op, encode_op, read_header
from tether.types.paths import parse_checkpoint_path

log = logging.getLogger("tether.trainer")

RANK0_ONLY = (ops.Sample, ops.CreateSampler, ops.DeleteSampler, ops.DescribeBase)
"""Ops rank 0 runs alone (the sampling engine and its registry live there)."""
READ_ONLY = (ops.Forward, ops.SaveState, ops.SaveSamplerWeights, ops.SaveWeightsForSamplerExt)
"""Ops after which ranks that disagree about success still hold the same training state."""
_OP, _STOP, _REAP = 1, 2, 3
_EXIT_INCONSISTENT = 3


class RanksDisagree(ServerError):
    """Some ranks failed an op that changes state and others did not: the trainer must stop."""


class ControlChannel:
    """Rank 0 -> all ranks: op frames and stop, over a gloo group that never times out."""

    def __init__(self) -> None:
        self.group = dist.new_group(backend="gloo", timeout=timedelta(days=3650))
        self.rank = dist.get_rank()

    def send(self, kind: int, payload: bytes = b"") -> None:
        broadcast_bytes(bytes([kind]) + payload, group=self.group)

    def receive(self) -> tuple[int, bytes]:
        message = broadcast_bytes(None, group=self.group)
        return message[0], message[1:]

    def statuses(self, error: str) -> list[str]:
        """Every rank's error message ('' = succeeded), in rank order."""
        return [s.decode(errors="replace") for s in all_gather_bytes(error.encode(), group=self.group)]


class DistributedExecutor(OpExecutor):
    """`OpExecutor` with a sharded training engine; only rank 0 writes files and samples."""

    def __init__(self, base_model: str, settings: EngineSettings) -> None:
        super().__init__(base_model, settings)
        self.rank = dist.get_rank()
        self._full_base: LoadedBaseModel | None = None
        self._full_base_lock = threading.Lock()

    @property
    def base(self) -> LoadedBaseModel:
        """The base model's skeleton (meta-device parameters): the sharded engine reads its shards itself."""
        with self._lock:
            if self._base is None:
                self._base = self._load_base(weights=False)
            return self._base

    @property
    def sampling(self) -> SamplingEngine:
        """Rank 0's sampling engine, on a full copy of the base model loaded when first needed.

        Sampling runs on rank 0 alone, so it needs the whole model there: one unsharded copy of
        the base in the weights' dtype on rank 0's device (e.g. 16 GB for an 8B model in bf16),
        held only once something samples (never on the other ranks).
        """
        with self._full_base_lock:  # not the executor's lock: training ops go on while it loads
            if self._full_base is None:
                self._full_base = self._load_base()
        with self._lock:
            if self._sampling is None:
                self._sampling = SamplingEngine(
                    self._full_base, kv_cache_budget_tokens=self.settings.kv_cache_budget_tokens
                )
            return self._sampling

    def load_state(self, op: ops.LoadState) -> ops.Done:
        """Every rank reads only the slices of the stored tensors its shards hold (DCP or safetensors)."""
        path = parse_checkpoint_path(op.path)
        if not op.create_model:
            self.training.model_info(op.model_id)  # NotFoundError before reading files
        wanted = ("weights/", "optimizer/") if op.include_optimizer else ("weights/",)

        def read(directory: Path, manifest: dict[str, Any]) -> None:
            # the files' sizes were checked on every rank; their sha256 (reading every byte) on rank 0
            # alone, which tells the others the outcome, so each rank then reads only its slices
            problem = ""
            if self.rank == 0:
                try:
                    verify_training_state(directory, manifest, include_optimizer=op.include_optimizer)
                except CorruptCheckpointError as exc:
                    problem = str(exc)
            problem = broadcast_bytes(problem.encode() if self.rank == 0 else None).decode()
            if problem:
                raise CorruptCheckpointError(problem)
            reader, stored = training_state_reader(directory, manifest)
            shapes = {key: info.shape for key, info in stored.items() if key.startswith(wanted)}

            def load(flat: dict[str, torch.Tensor]) -> None:
                dcp.load({stored[key].key: tensor for key, tensor in flat.items()}, storage_reader=reader)

            self.training.import_sharded_state(
                op.model_id,
                manifest.get("metadata", {}),
                shapes,
                load,
                include_optimizer=op.include_optimizer,
            )

        self.checkpoints.stores.store(op.owner).read_training_state_files(
            path, read, include_optimizer=op.include_optimizer, hashes=False
        )
        return ops.Done()

    @property
    def training(self) -> DistributedTrainingEngine:
        return cast(DistributedTrainingEngine, super().training)

    def _new_training_engine(self, base: LoadedBaseModel) -> DistributedTrainingEngine:
        return DistributedTrainingEngine(
            base,
            max_tokens_per_micro_batch=self.settings.max_tokens_per_micro_batch,
            mixed_precision=self.settings.mixed_precision,
            on_nonfinite=self.settings.on_nonfinite,
        )

    def housekeeping(self) -> None:
        """Nothing on a rank's own clock: rank 0 decides which kept graphs expired (`DistributedTrainer`)."""

    def release_graphs(self, handles: list[GraphHandle]) -> None:
        for handle in handles:
            self.training.release_graph(handle)

    def save_state(self, op: ops.SaveState) -> ops.CheckpointWritten | ops.Done:
        """A DCP checkpoint: rank 0 stages the directory and tells the others where; every rank writes its shards."""
        path = parse_checkpoint_path(
            op.path
        )  # a bad path or model fails on every rank, before any collective
        flat, metadata = self.training.sharded_state(op.model_id)
        if self.rank != 0:
            target = broadcast_bytes(None).decode()
            if target:  # empty: rank 0 failed before staging (it reports the error)
                dcp.save(flat, checkpoint_id=target)
            return ops.Done()
        announced = False

        def write(staging: Path) -> dict[str, Any]:
            nonlocal announced
            target = staging / DCP_DIR
            target.mkdir()
            broadcast_bytes(str(target).encode())
            announced = True
            dcp.save(flat, checkpoint_id=str(target))
            return {"dcp": DCP_DIR, "has_optimizer": True, "ranks": dist.get_world_size()}

        try:
            store = self.checkpoints.stores.store(op.owner)
            info = store.save_training_state_files(path, write, metadata=metadata, overwrite=op.overwrite)
        finally:
            if not announced:
                broadcast_bytes(b"")
        return ops.CheckpointWritten(
            path=path.tinker_path,
            directory=str(self.checkpoints.stores.directory(op.owner, path)),
            size_bytes=info.size_bytes,
        )

    def save_weights_for_sampler_ext(
        self, op: ops.SaveWeightsForSamplerExt
    ) -> ops.CheckpointWritten | ops.Done:
        parse_checkpoint_path(op.path)  # a bad path fails on every rank, before the gather
        if self.rank == 0:
            return super().save_weights_for_sampler_ext(op)
        self.training.sampler_weights(op.model_id, keep=False)  # the gather rank 0 is doing
        return ops.Done()

    def save_sampler_weights(self, op: ops.SaveSamplerWeights) -> ops.CheckpointWritten | ops.Done:
        if self.rank == 0:
            return super().save_sampler_weights(op)
        self.training.sampler_weights(op.model_id, keep=False)  # the gather rank 0 is doing
        return ops.Done()


def run_everywhere(executor: DistributedExecutor, channel: ControlChannel, op: Any) -> Any:
    """Execute `op` on this rank, then agree with the other ranks on the outcome (see the module docstring).

    Raises this rank's own error, or `ServerError` naming another rank's, or `RanksDisagree`.
    """
    error: BaseException | None = None
    result = None
    log.debug("running %s", type(op).__name__)
    try:
        result = executor.execute(op)
    except Exception as exc:  # noqa: BLE001 - reported to every rank below
        error = exc
    statuses = channel.statuses("" if error is None else f"{type(error).__name__}: {error}")
    failed = [rank for rank, status in enumerate(statuses) if status]
    name = type(op).__name__
    if failed and len(failed) < len(statuses) and not isinstance(op, READ_ONLY):
        detail = "; ".join(f"rank {r}: {statuses[r]}" for r in failed)
        raise RanksDisagree(
            f"{name} failed on some ranks only ({detail}); their states may differ, so the trainer stops"
        )
    if error is not None:
        raise error
    if failed:
        raise ServerError(f"{name} failed on rank {failed[0]}: {statuses[failed[0]]}")
    return result


class DistributedTrainer(InProcessTrainer):
    """Rank 0's `Trainer`: training ops are broadcast and run on every rank; sampling stays here."""

    executor: DistributedExecutor

    def __init__(self, base_model: str, settings: EngineSettings, channel: ControlChannel) -> None:
        self.base_model = base_model
        self.channel = channel
        self.executor = DistributedExecutor(base_model, settings)
        self.worker = ModelWorker(
            base_model, self._execute_everywhere, housekeeping=self._reap_expired_graphs
        )
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=2, thread_name_prefix=f"tether-trainer-{base_model}"
        )
        self._stopped = False

    def submit(
        self, op: ops.Op, *, stream: str | None = None, seq_id: int | None = None
    ) -> concurrent.futures.Future:
        if stream is None and not isinstance(op, RANK0_ONLY):
            stream = "tether-distributed"  # every collective op goes through the one worker thread
        return super().submit(op, stream=stream, seq_id=seq_id)

    def _execute_everywhere(self, op: Any) -> Any:
        if isinstance(op, RANK0_ONLY):
            return self.executor.execute(op)
        self.channel.send(_OP, encode_op(ops.OpEnvelope(op_id=0, op=op)))
        try:
            return run_everywhere(self.executor, self.channel, op)
        except RanksDisagree as exc:
            log.critical("%s", exc)
            threading.Timer(2.0, os._exit, (_EXIT_INCONSISTENT,)).start()  # after the answer is sent
            raise

    def _reap_expired_graphs(self) -> None:
        """On the worker thread, between ops: graphs past their TTL by rank 0's clock are freed on every rank."""
        training = self.executor._training
        if training is None or self._stopped:
            return
        expired = training.expired_graphs()  # type: ignore[attr-defined]
        if expired:
            self.channel.send(_REAP, "\n".join(f"{h.model_id}\0{h.graph_id}" for h in expired).encode())
            self.executor.release_graphs(expired)

    def close(self) -> None:
        self.worker.close()
        if not self._stopped:
            self._stopped = True
            self.channel.send(_STOP)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.executor.close()


def follow(executor: DistributedExecutor, channel: ControlChannel) -> None:
    """Ranks other than 0: run every broadcast op until rank 0 says stop."""
    while True:
        kind, payload = channel.receive()
        if kind == _STOP:
            return
        if kind == _REAP:
            handles = [
                GraphHandle(graph_id=g, model_id=m)
                for m, _, g in (line.partition("\0") for line in payload.decode().split("\n"))
            ]
            executor.release_graphs(handles)
            continue
        _, op_id = read_header(payload[:HEADER_SIZE])
        op = decode_op(op_id, payload[HEADER_SIZE:]).op
        try:
            run_everywhere(executor, channel, op)
        except RanksDisagree as exc:
            log.critical("%s", exc)
            time.sleep(2.0)  # let rank 0 answer the client before torchrun stops the job
            sys.exit(_EXIT_INCONSISTENT)
        except Exception:  # noqa: BLE001 - rank 0 answers for every rank
            pass


def init_distributed(settings: EngineSettings) -> EngineSettings:
    """Join torchrun's process group (NCCL on GPUs, else gloo); the settings with this rank's device."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    wants_cuda = settings.device != "cpu" and torch.cuda.is_available()
    timeout = timedelta(seconds=settings.collective_timeout_s)
    if wants_cuda:
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", timeout=timeout, device_id=torch.device("cuda", local_rank))
        return settings.model_copy(update={"device": f"cuda:{local_rank}"})
    dist.init_process_group("gloo", timeout=timeout)
    return settings.model_copy(update={"device": "cpu"})


def serve_distributed(config: TrainerConfig, *, exit_on_disconnect: bool = False) -> None:
    """This rank's part of a multi-rank trainer. When rank 0's server stops, every rank leaves the
    process group together and its process exits 0 (`exit_process`); an error propagates."""
    from tether.trainer.process import serve_trainer

    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=config.log_level.upper(), format=f"%(asctime)s %(levelname)s rank{rank} %(name)s: %(message)s"
    )
    settings = init_distributed(config.engine_settings())
    if settings.torch_threads is not None:
        torch.set_num_threads(settings.torch_threads)
    channel = ControlChannel()
    ended_cleanly = False
    try:
        if dist.get_rank() == 0:
            trainer = DistributedTrainer(config.base_model, settings, channel)
            serve_trainer(config, exit_on_disconnect=exit_on_disconnect, trainer=trainer)
        else:
            follow(DistributedExecutor(config.base_model, settings), channel)
        ended_cleanly = True
    finally:
        leave_process_group(together=ended_cleanly)
    exit_process(0)


def torchrun_command(config_file: Path, nproc_per_node: int, *, exit_on_disconnect: bool) -> list[str]:
    """The command that starts a single-node trainer of `nproc_per_node` ranks from a config file."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc_per_node),
        "--standalone",
        "-m",
        "tether.trainer.distributed",
        str(config_file),
    ]
    return command + (["--exit-on-disconnect"] if exit_on_disconnect else [])


if __name__ == "__main__":
    serve_distributed(
        TrainerConfig.model_validate_json(Path(sys.argv[1]).read_text()),
        exit_on_disconnect="--exit-on-disconnect" in sys.argv[2:],
    )
