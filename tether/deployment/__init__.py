"""A deployment: one base model served by its own process, with weights hot-loaded from chain
checkpoints (base, delta, merged base) and OpenAI-compatible endpoints.

`python -m tether.deployment --base-model NAME --port N --state-dir DIR` runs one. The control
plane (`tether serve`, `tether.server.routes_deployments`) starts these as subprocesses; nothing in
the server imports this package at module top. The model runs behind `backend.ServingBackend`
(tether's sampling engine today; a vLLM backend can be added behind an optional extra).
"""

from typing import cast

from tether.deployment.served import BASE_IDENTITY, TRANSITIONS, ServedWeights, Transition

__all__ = ["BASE_IDENTITY", "TRANSITIONS", "ServedWeights", "build_deployment"]


def build_deployment(
    base_model: str,
    *,
    state_dir=None,
    transition: str = "ASYNC",
    model_names: list[str] | None = None,
    restore: bool = True,
    model_path: str | None = None,
    admin_token: str | None = None,
    **engine_options,
):
    """Load `base_model`, restore the last good weights from `state_dir`, and build the app.

    Returns `(app, served)`. `model_names`: names OpenAI requests may use (the base model's name
    is always one). `model_path`: where `base_model` lives, if not resolvable from its name.
    `admin_token`: what `POST /hot_load` requires (`create_app`).
    """
    from transformers import AutoTokenizer

    from tether.deployment.app import create_app
    from tether.deployment.backend import EngineBackend
    from tether.engine.model_loading import load_base_model

    base = load_base_model(base_model, aliases={base_model: model_path} if model_path else None)
    served = ServedWeights(
        EngineBackend(base, **engine_options),
        base_model=base_model,
        state_dir=state_dir,
        transition=cast(Transition, transition),
    )  # checked there
    if restore:
        served.restore()
    tokenizer = AutoTokenizer.from_pretrained(str(base.tokenizer_path))
    names = list(dict.fromkeys([base_model, *(model_names or [])]))
    return create_app(served, model_names=names, tokenizer=tokenizer, admin_token=admin_token), served
