"""`tether deployments create|list|get|delete|restart|hotload`: manage a server's deployments from a shell.

Talks to `tether serve` through `tether.client.deployments.DeploymentManager`; prints JSON.
The server and key come from --base-url / --api-key or $TETHER_BASE_URL / $TETHER_API_KEY.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from typing import Any

HELP = "Manage deployments (serving processes with hot-loaded weights) of a tether server."


def add_parser(sub: Any) -> None:
    parser = sub.add_parser("deployments", help=HELP, description=HELP)
    parser.add_argument(
        "--base-url",
        default=os.environ.get("TETHER_BASE_URL", "http://127.0.0.1:8000"),
        help="the tether server ($TETHER_BASE_URL, else http://127.0.0.1:8000)",
    )
    parser.add_argument(
        "--api-key", default=os.environ.get("TETHER_API_KEY", "tml-local"), help="($TETHER_API_KEY)"
    )
    # the same options after the action too (`tether deployments list --base-url URL`); SUPPRESS
    # keeps an action's unset option from overwriting the one given before it
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--base-url", default=argparse.SUPPRESS, help="the tether server")
    common.add_argument("--api-key", default=argparse.SUPPRESS)
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    create = actions.add_parser(
        "create", help="create a deployment (or get it if it exists)", parents=[common]
    )
    create.add_argument("deployment_id")
    create.add_argument("--base-model", required=True)
    create.add_argument("--transition", choices=["SYNC", "ASYNC"], default="ASYNC")
    create.add_argument("--wait", action="store_true", help="wait until it is READY")
    actions.add_parser("list", help="list deployments", parents=[common])
    for name, text in (
        ("get", "show one deployment"),
        ("delete", "stop and delete a deployment"),
        ("restart", "start a FAILED deployment again on the last weights it loaded"),
    ):
        action = actions.add_parser(name, help=text, parents=[common])
        action.add_argument("deployment_id")
    action.add_argument("--wait", action="store_true", help="wait until it is READY")  # restart's
    hotload = actions.add_parser(
        "hotload", help="load a sampler checkpoint (tinker:// path) onto a deployment", parents=[common]
    )
    hotload.add_argument("deployment_id")
    hotload.add_argument("path", help="tinker://<run>/sampler_weights/<name>")
    hotload.add_argument("--transition", choices=["SYNC", "ASYNC"], default=None)
    hotload.add_argument("--no-wait", action="store_true", help="return once the load has started")


def _info(info: Any) -> dict[str, Any]:
    data = asdict(info)
    data.pop("raw", None)
    return data


def run(args: argparse.Namespace) -> int:
    """Run one action and print its JSON; 1 if the deployment or load is missing, 2 (with the reason
    on stderr) when the server cannot be reached."""
    import httpx

    try:
        return _run(args)
    except httpx.TransportError as exc:  # "[Errno 111] Connection refused" alone names no server
        print(
            f"tether deployments: cannot reach the tether server at {args.base_url} ({exc}); start "
            "`tether serve` or pass --base-url (or set $TETHER_BASE_URL)",
            file=sys.stderr,
        )
        return 2


def _run(args: argparse.Namespace) -> int:
    from tether.client.deployments import DeploymentConfig, DeploymentManager
    from tether.types.errors import NotFoundError

    manager = DeploymentManager(args.base_url, args.api_key)
    try:
        if args.action == "create":
            result: Any = _info(
                manager.create_or_get(
                    DeploymentConfig(
                        deployment_id=args.deployment_id,
                        base_model=args.base_model,
                        hot_load_transition_type=args.transition,
                    )
                )
            )
            if args.wait:
                result = _info(manager.wait_for_ready(args.deployment_id))
        elif args.action == "list":
            result = [_info(d) for d in manager.list()]
        elif args.action == "get":
            info = manager.get(args.deployment_id)
            if info is None:  # like every other refusal: a message on stderr and exit code 2
                raise NotFoundError(f"deployment {args.deployment_id!r} does not exist")
            result = _info(info)
        elif args.action == "restart":
            result = _info(manager.restart(args.deployment_id))
            if args.wait:
                result = _info(manager.wait_for_ready(args.deployment_id))
        elif args.action == "delete":
            manager.delete(args.deployment_id)
            result = {"deployment_id": args.deployment_id, "state": "DELETED"}
        else:
            if args.no_wait:
                result = manager.hotload(args.deployment_id, "", args.path, transition=args.transition)
            else:
                if not manager.hotload_and_wait(
                    args.deployment_id, "", args.path, transition=args.transition
                ):
                    print(json.dumps({"error": f"{args.path} was not serving before the timeout"}))
                    return 1
                result = _info(manager.get(args.deployment_id))
    finally:
        manager.close()
    print(json.dumps(result, indent=2))
    return 0
