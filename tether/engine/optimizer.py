"""AdamW over one training model's named tensors, with hyperparameters given per step.

Each training model owns one `ModelOptimizer`, so its moments and gradients never touch another
model's tensors. The moments export to and import from a flat dict of named tensors
(`exp_avg.<name>`, `exp_avg_sq.<name>`, `step.<name>`), which is what a checkpoint stores; a model
restored with them continues bit-exactly like one that never stopped.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from tether.engine.training_types import AdamWParams
from tether.types.errors import UserInputError

MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "step")


class ModelOptimizer:
    """torch's AdamW (decoupled weight decay) plus global-norm clipping, over a fixed set of tensors."""

    def __init__(self, named_params: Mapping[str, torch.Tensor]) -> None:
        self.named_params = dict(named_params)
        defaults = AdamWParams()
        self._optimizer = torch.optim.AdamW(
            list(self.named_params.values()),
            lr=defaults.learning_rate,
            betas=(defaults.beta1, defaults.beta2),
            eps=defaults.eps,
            weight_decay=defaults.weight_decay,
            foreach=True,  # one kernel per op over all tensors; on CPU torch would loop per tensor
        )
        self.num_steps = 0

    def step(self, params: AdamWParams) -> dict[str, float]:
        """Clip, apply one AdamW step with `params`, clear the gradients; return the step's metrics."""
        params.validate()
        tensors = list(self.named_params.values())
        grads = [t.grad for t in tensors if t.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        if params.grad_clip_norm > 0 and grads:
            torch.nn.utils.clip_grads_with_norm_(tensors, params.grad_clip_norm, grad_norm)
        for group in self._optimizer.param_groups:
            group["lr"] = params.learning_rate
            group["betas"] = (params.beta1, params.beta2)
            group["eps"] = params.eps
            group["weight_decay"] = params.weight_decay
        self._optimizer.step()
        self._optimizer.zero_grad(set_to_none=True)
        self.num_steps += 1
        return {"grad_norm:mean": float(grad_norm), "learning_rate:mean": float(params.learning_rate)}

    def zero_grad(self) -> None:
        self._optimizer.zero_grad(set_to_none=True)

    def export_moments(self) -> dict[str, torch.Tensor]:
        """Detached copies of every moment, by `<moment>.<tensor name>`."""
        out: dict[str, torch.Tensor] = {}
        for name, tensor in self.named_params.items():
            state = self._optimizer.state.get(tensor)
            if not state:
                continue
            for key in MOMENT_KEYS:
                out[f"{key}.{name}"] = state[key].detach().clone()
        return out

    def import_moments(self, moments: Mapping[str, torch.Tensor], num_steps: int) -> None:
        """Replace all moments with `moments` (as `export_moments` returns them)."""
        check_moments(moments, {name: tuple(t.shape) for name, t in self.named_params.items()})
        self._optimizer.state.clear()
        for name, tensor in self.named_params.items():
            if f"step.{name}" not in moments:
                continue
            self._optimizer.state[tensor] = {
                key: moments[f"{key}.{name}"].detach().clone().to(tensor.device) for key in MOMENT_KEYS
            }
        self.num_steps = num_steps


def check_moments(moments: Mapping[str, torch.Tensor], param_shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Raise `UserInputError` unless `moments` fit tensors of `param_shapes` (names, shapes)."""
    for key, value in moments.items():
        moment, _, name = key.partition(".")
        if moment not in MOMENT_KEYS or name not in param_shapes:
            raise UserInputError(f"unexpected optimizer tensor {key!r}", field="state.optimizer")
        expected = () if moment == "step" else tuple(param_shapes[name])
        if tuple(value.shape) != expected:
            raise UserInputError(
                f"optimizer tensor {key!r} has shape {tuple(value.shape)}, expected {expected}", field="state.optimizer"
            )
        if any(f"{k}.{name}" not in moments for k in MOMENT_KEYS):
            raise UserInputError(f"incomplete optimizer state for {name!r}", field="state.optimizer")
