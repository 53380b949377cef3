"""Start-up reconciliation: catalogue and disk agree, interrupted writes are recovered at once."""

from __future__ import annotations

import shutil

import torch

from tether.server.catalogue import Catalogue
from tether.server.config import ServerConfig
from tether.server.main import DATABASE_FILE, create_app
from tether.server.reconcile import DataDirLock, reconcile_storage
from tether.storage import LocalCheckpointStore, StoredTrainingState
from tether.storage.atomic import _OLD, _STAGING, _work_dir
from tether.types.paths import parse_checkpoint_path

OWNER = "local"
RUN = "sess-1:train:0"


def _save(data_dir, name: str, catalogue: Catalogue | None, value: float = 1.0):
    store = LocalCheckpointStore(data_dir / "checkpoints" / OWNER)
    path = parse_checkpoint_path(f"tinker://{RUN}/weights/{name}")
    info = store.save_training_state(path, StoredTrainingState(weights={"w": torch.full((2,), value)}))
    if catalogue is not None:
        catalogue.add_checkpoint(
            RUN,
            path.checkpoint_id,
            OWNER,
            checkpoint_type="training",
            directory=str(store.directory(path)),
            size_bytes=info.size_bytes,
            ttl_seconds=None,
            user_metadata={},
        )
    return store, path


def test_reconcile_unlists_lost_files_removes_orphans_and_recovers_at_once(tmp_path):
    catalogue = Catalogue(tmp_path / DATABASE_FILE)
    store, kept = _save(tmp_path, "kept", catalogue)
    _, orphan = _save(tmp_path, "orphan", None)  # committed, then killed before it was listed
    _, lost = _save(tmp_path, "lost", catalogue)
    shutil.rmtree(store.directory(lost))  # listed, files gone
    _, swapped = _save(tmp_path, "swapped", catalogue, value=1.0)
    final = store.directory(swapped)  # an overwrite killed between its two renames, seconds ago
    staging = _work_dir(final.parent, final.name, _STAGING)
    shutil.copytree(final, staging, dirs_exist_ok=True)
    import os

    os.replace(final, _work_dir(final.parent, final.name, _OLD))

    lock = reconcile_storage(tmp_path, catalogue)
    try:
        assert lock.held
        listed = {row.checkpoint_id for row in catalogue.list_checkpoints(OWNER)[0]}
        assert listed == {kept.checkpoint_id, swapped.checkpoint_id}
        reopened = LocalCheckpointStore(tmp_path / "checkpoints" / OWNER)
        assert reopened.exists(kept) and reopened.exists(swapped)
        assert not reopened.directory(orphan).exists()
        assert float(reopened.load_training_state(swapped).weights["w"][0]) == 1.0
        assert not [p for p in (tmp_path / "checkpoints").rglob(".*") if p.is_dir()]
    finally:
        lock.release()
        catalogue.close()


def test_a_second_server_on_the_same_data_dir_leaves_young_work_alone(tmp_path):
    catalogue = Catalogue(tmp_path / DATABASE_FILE)
    _, orphan = _save(tmp_path, "maybe-in-progress", None)
    first = DataDirLock(tmp_path)
    try:
        assert first.held
        second = reconcile_storage(tmp_path, catalogue)
        assert not second.held
        store = LocalCheckpointStore(tmp_path / "checkpoints" / OWNER)
        assert store.directory(orphan).is_dir()  # it may be another live server's save
        second.release()
    finally:
        first.release()
        catalogue.close()


def test_the_server_reconciles_when_it_starts(tmp_path):
    catalogue = Catalogue(tmp_path / DATABASE_FILE)
    _, orphan = _save(tmp_path, "orphan", None)
    catalogue.close()
    create_app(ServerConfig(port=0, data_dir=tmp_path))
    assert not LocalCheckpointStore(tmp_path / "checkpoints" / OWNER).directory(orphan).exists()
