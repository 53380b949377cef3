"""`tether deployments`: the server and key options work before or after the action, as a new
user types them (`tether deployments list --base-url URL` was an "unrecognized arguments" error)."""

from __future__ import annotations

import pytest

from tether.cli import build_parser


@pytest.mark.parametrize(
    ("argv", "url", "key"),
    [
        (["deployments", "--base-url", "http://a:1", "--api-key", "tml-k", "list"], "http://a:1", "tml-k"),
        (["deployments", "list", "--base-url", "http://b:2"], "http://b:2", "tml-local"),
        (
            ["deployments", "--base-url", "http://a:1", "get", "dep", "--api-key", "tml-q"],
            "http://a:1",
            "tml-q",
        ),
        (
            ["deployments", "hotload", "dep", "tinker://r/sampler_weights/s", "--base-url", "http://c:3"],
            "http://c:3",
            "tml-local",
        ),
    ],
)
def test_server_options_before_or_after_the_action(argv, url, key, monkeypatch):
    monkeypatch.delenv("TETHER_BASE_URL", raising=False)
    monkeypatch.delenv("TETHER_API_KEY", raising=False)
    args = build_parser().parse_args(argv)
    assert (args.base_url, args.api_key) == (url, key)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:  # bound then closed: nothing listens on it
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_an_unreachable_server_is_named_with_the_way_to_point_at_one(capsys, monkeypatch):
    from tether.cli import main

    monkeypatch.delenv("TETHER_BASE_URL", raising=False)
    url = f"http://127.0.0.1:{_free_port()}"
    assert main(["deployments", "list", "--base-url", url]) == 2
    err = capsys.readouterr().err
    assert f"cannot reach the tether server at {url}" in err and "--base-url" in err


def test_a_job_command_error_names_the_whole_command(capsys, monkeypatch):
    from tether.cli import main

    monkeypatch.delenv("TETHER_BASE_URL", raising=False)
    assert main(["jobs", "list"]) == 2
    assert capsys.readouterr().err.startswith("tether jobs list: ")
