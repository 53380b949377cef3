"""A client that cannot read the server's tokenizer directory gets the tokenizer from the server.

The remote machine is simulated by a client in another working directory whose get_info names a
tokenizer directory that does not exist there; the SDK must download the server's tokenizer files,
cache them by content digest, and produce a tokenizer that encodes exactly as the server's.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from conftest import MODEL

import tether.client.tokenizer as client_tokenizer
from tether.client import ServiceClient
from tether.server.config import ServerConfig
from tether.server.routes_tokenizer import client_tokenizer_id

TEXTS = ["hello world", "<|im_start|>user\nhéllo ✓<|im_end|>", "<think>\nx\n</think>\n\n42"]


@pytest.fixture()
def remote(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Another working directory, an empty tokenizer cache, and no tokenizer loaded yet."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setattr(client_tokenizer, "cache_root", lambda: tmp_path / "cache")
    monkeypatch.setattr(client_tokenizer, "_LOADED", {})
    client_tokenizer._from_pretrained.cache_clear()
    return tmp_path / "cache"


def _count_downloads(monkeypatch: pytest.MonkeyPatch, service: ServiceClient) -> list[str]:
    transport = service._session.transport
    seen: list[str] = []
    original = transport._send

    async def counting(method, path, *args, **kwargs):
        if "/files/" in path:
            seen.append(path)
        return await original(method, path, *args, **kwargs)

    monkeypatch.setattr(transport, "_send", counting)
    return seen


def test_a_remote_client_loads_the_servers_tokenizer_and_caches_it(
    service: ServiceClient, remote: Path, default_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoTokenizer

    training = service.create_lora_training_client(MODEL, rank=2).result()
    training._info = training._info.model_copy(
        update={
            "model_data": training._info.model_data.model_copy(update={"tokenizer_id": "/srv/not/here/tok"})
        }
    )
    downloads = _count_downloads(monkeypatch, service)
    tokenizer = training.get_tokenizer()
    local = AutoTokenizer.from_pretrained(default_model_dir)
    for text in TEXTS:
        assert tokenizer.encode(text, add_special_tokens=False) == local.encode(
            text, add_special_tokens=False
        )
    assert tokenizer.chat_template == local.chat_template
    assert downloads and all("tokenizer" in path for path in downloads)
    (cached,) = [p for p in remote.iterdir() if not p.name.startswith(".")]
    assert (cached / "tokenizer.json").is_file() and not (cached / "config.json").exists()

    # A second process (nothing loaded in memory) reuses the cache: it lists, but downloads nothing.
    downloads.clear()
    monkeypatch.setattr(client_tokenizer, "_LOADED", {})
    client_tokenizer._from_pretrained.cache_clear()
    again = training.get_tokenizer()
    assert downloads == []
    assert again.encode(TEXTS[1], add_special_tokens=False) == local.encode(
        TEXTS[1], add_special_tokens=False
    )


def test_a_sampling_client_gets_the_tokenizer_by_base_model(service: ServiceClient, remote: Path) -> None:
    sampler = service.create_sampling_client(base_model=MODEL).result()
    assert sampler.get_tokenizer().encode("hi", add_special_tokens=False) == [104, 105]


def test_tokenizer_routes_need_a_key_and_serve_only_tokenizer_files(server_url: str) -> None:
    base = f"{server_url}/api/v1/tether/tokenizer/{MODEL}/files"
    headers = {"X-API-Key": "tml-test"}
    assert httpx.get(base).status_code == 401
    listing = httpx.get(base, headers=headers).json()
    names = {f["name"] for f in listing["files"]}
    assert "tokenizer.json" in names and not names & {"config.json", "model.safetensors"}
    assert httpx.get(f"{base}/tokenizer.json", headers=headers).status_code == 200
    for name in ("config.json", "model.safetensors", "..%2Fconfig.json", "%2E%2E"):
        assert httpx.get(f"{base}/{name}", headers=headers).status_code == 404, name
    assert httpx.get(
        f"{server_url}/api/v1/tether/tokenizer/../../etc/files", headers=headers
    ).status_code in (400, 404)
    unknown = httpx.get(f"{server_url}/api/v1/tether/tokenizer/Org/not-served/files", headers=headers)
    assert unknown.status_code == 400 and "not served" in unknown.text


def test_get_info_names_the_hub_id_where_the_model_has_one(tmp_path: Path) -> None:
    config = ServerConfig(models=["Qwen/Qwen3-8B", "mine", MODEL], model_aliases={"mine": "Org/Hub-Model"},
                          data_dir=tmp_path)  # fmt: skip
    local = tmp_path / "tok"
    assert client_tokenizer_id(config, "Qwen/Qwen3-8B", local) == "Qwen/Qwen3-8B"
    assert client_tokenizer_id(config, "mine", local) == "Org/Hub-Model"
    assert client_tokenizer_id(config, MODEL, local) == str(local)
