"""`python -m tether.deployment`: run one deployment process (see `tether.deployment`)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tether.deployment", description=__doc__)
    parser.add_argument("--base-model", required=True, help="model name or local HF directory")
    parser.add_argument(
        "--model-path", default=None, help="local HF directory of --base-model (else resolved)"
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="where the last good weights are recorded (restart resumes them)",
    )
    parser.add_argument("--transition", choices=["SYNC", "ASYNC"], default="ASYNC")
    parser.add_argument(
        "--model-name",
        action="append",
        default=[],
        help="another name OpenAI requests may use for this deployment (repeatable)",
    )
    parser.add_argument("--torch-threads", type=int, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    import os

    import uvicorn

    from tether.deployment import build_deployment
    from tether.types.deployment_contract import ADMIN_TOKEN_ENV

    app, served = build_deployment(
        args.base_model,
        state_dir=args.state_dir,
        transition=args.transition,
        model_names=args.model_name,
        model_path=args.model_path,
        admin_token=os.environ.pop(ADMIN_TOKEN_ENV, None) or None,
    )
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        served.backend.close()


if __name__ == "__main__":
    main()
