"""AdamW over one training model's named tensors, with hyperparameters given per step.

Each training model owns one `ModelOptimizer`, so its moments and gradients never touch another
model's tensors. The moments export to and import from a flat dict of named tensors
(`exp_avg.<name>`, `exp_avg_sq.<name>`, `step.<name>`), which is what a checkpoint stores; a model
restored with them continues bit-exactly like one that never stopped.

A step that would make any weight or moment non-finite is refused before anything changes
(`NonFiniteStepError`, a user error): non-finite gradients (a diverged loss, e.g. loss weights of
1e38) are discarded, since no step can use them; an update that overflows (e.g. a learning rate
of 1e30) leaves the gradients for a retry with saner hyperparameters. The check predicts AdamW's
update from the current moments in chunks, so it costs one extra pass over the tensors and a
bounded amount of scratch memory. With `on_nonfinite="skip"` such a step is skipped instead and
reported in the metrics (`skipped_nonfinite:sum` = 1). Bounds on the hyperparameters themselves
(finite, non-negative, betas in [0, 1), `MAX_LEARNING_RATE`) are `AdamWParams.validate`'s.

Gradient-accumulation normalisation (Fireworks' `grad_accumulation_normalization`): the optimizer
also counts what the gradients were accumulated over since the last step (`accumulate`: loss
tokens and sequences, as `tether.engine.grad_accumulation` defines them) and `step` may divide the
accumulated gradients by either count before clipping and the update ("none" leaves them as they
are). The counts live and die with the gradients: cleared whenever the gradients are (a step, a
skipped step, discarded non-finite gradients), kept when a step is refused with the gradients kept.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal

import torch

from tether.engine.grad_accumulation import GradAccMode, check_mode
from tether.engine.training_types import AdamWParams
from tether.types.errors import UserInputError

MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "step")
_CHECK_CHUNK = 1 << 22
"""Elements per chunk when predicting an update (scratch memory: a few chunks of float32)."""


class NonFiniteStepError(UserInputError):
    """An optimizer step would have made weights or moments NaN or infinite; nothing was changed."""


class ModelOptimizer:
    """torch's AdamW (decoupled weight decay) plus global-norm clipping, over a fixed set of tensors."""

    def __init__(
        self, named_params: Mapping[str, torch.Tensor], *, on_nonfinite: Literal["refuse", "skip"] = "refuse"
    ) -> None:
        self.on_nonfinite = on_nonfinite
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
        self.loss_tokens = 0
        """Loss tokens the current gradients were accumulated over (this process's share)."""
        self.sequences = 0
        """Sequences (datums) the current gradients were accumulated over (this process's share)."""

    def accumulate(self, *, loss_tokens: int, sequences: int) -> None:
        """Count a backward's loss tokens and sequences into the current gradients' totals."""
        self.loss_tokens += int(loss_tokens)
        self.sequences += int(sequences)

    def accumulated_counts(self) -> tuple[int, int]:
        """(loss tokens, sequences) the current gradients hold; a distributed optimizer sums its ranks'."""
        return self.loss_tokens, self.sequences

    def divisor(self, normalization: GradAccMode) -> float:
        """What `step(normalization=...)` divides the gradients by: 1 for "none", else the count
        (at least 1: with nothing counted the gradients are left as they are)."""
        if normalization == "none":
            return 1.0
        loss_tokens, sequences = self.accumulated_counts()
        return float(max(1, loss_tokens if normalization == "num_loss_tokens" else sequences))

    def step(self, params: AdamWParams, *, normalization: GradAccMode = "none") -> dict[str, float]:
        """Normalise, clip, apply one AdamW step with `params`, clear the gradients; return the metrics.

        `normalization` ("none", "num_loss_tokens", "num_sequences") divides the accumulated
        gradients by `divisor(normalization)` first; `grad_norm:mean` is the norm after that
        division, before clipping, and `grad_accumulation_divisor:mean` reports the divisor
        (unless "none"). Raises UserInputError for an unknown mode, and NonFiniteStepError
        (weights and moments unchanged) if the gradients or the update are not finite, unless
        `on_nonfinite="skip"`, which skips the step and reports it.
        """
        params.validate()
        check_mode(normalization)
        divisor = self.divisor(normalization)
        tensors = list(self.named_params.values())
        grads = [t.grad for t in tensors if t.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        if divisor != 1.0:
            grad_norm = grad_norm / divisor
        if not bool(torch.isfinite(grad_norm)):
            self.zero_grad()  # no step can ever use them
            return self._nonfinite(
                params,
                float(grad_norm),
                f"the accumulated gradients are not finite (norm {float(grad_norm)}): the loss diverged; "
                "they were discarded, and the weights and optimizer moments are unchanged",
                field="gradients",
            )
        coef = 1.0
        if params.grad_clip_norm > 0 and grads:
            coef = min(1.0, params.grad_clip_norm / (float(grad_norm) + 1e-6))
        if not self._update_is_finite(params, coef / divisor):
            return self._nonfinite(
                params,
                float(grad_norm),
                f"this step's update would make weights or moments non-finite (learning rate "
                f"{params.learning_rate}, gradient norm {float(grad_norm):.3g}); the weights, moments and "
                "gradients are unchanged: retry with a smaller learning rate",
                field="adam_params.learning_rate",
            )
        if divisor != 1.0 and grads:
            torch._foreach_div_(grads, divisor)
        if params.grad_clip_norm > 0 and grads:
            torch.nn.utils.clip_grads_with_norm_(tensors, params.grad_clip_norm, grad_norm)
        return self._apply_update(params, float(grad_norm), normalization, divisor)

    def _apply_update(
        self, params: AdamWParams, grad_norm: float, normalization: GradAccMode, divisor: float
    ) -> dict[str, float]:
        """AdamW with `params` on the (already normalised and clipped) gradients, then clear them and
        their counts; the step's metrics."""
        for group in self._optimizer.param_groups:
            group["lr"] = params.learning_rate
            group["betas"] = (params.beta1, params.beta2)
            group["eps"] = params.eps
            group["weight_decay"] = params.weight_decay
        self._optimizer.step()
        self.zero_grad()
        self.num_steps += 1
        return self._metrics(params, grad_norm, normalization, divisor)

    @staticmethod
    def _metrics(
        params: AdamWParams, grad_norm: float, normalization: GradAccMode, divisor: float
    ) -> dict[str, float]:
        metrics = {"grad_norm:mean": grad_norm, "learning_rate:mean": float(params.learning_rate)}
        if normalization != "none":
            metrics["grad_accumulation_divisor:mean"] = divisor
        return metrics

    def _nonfinite(self, params: AdamWParams, grad_norm: float, why: str, *, field: str) -> dict[str, float]:
        if self.on_nonfinite == "refuse":
            raise NonFiniteStepError(f"optimizer step refused: {why}", field=field)
        self.zero_grad()
        return {
            "grad_norm:mean": grad_norm,
            "learning_rate:mean": float(params.learning_rate),
            "skipped_nonfinite:sum": 1.0,
        }

    @torch.no_grad()
    def _update_is_finite(self, params: AdamWParams, coef: float) -> bool:
        """Whether AdamW with `params` (gradients scaled by `coef`) keeps every weight and moment finite.

        Mirrors torch's AdamW arithmetic (decay, lerp of the first moment, second moment, bias
        corrections) on chunks of scratch copies; nothing is modified.
        """
        lr, wd, eps = params.learning_rate, params.weight_decay, params.eps
        beta1, beta2 = params.beta1, params.beta2
        for tensor in self.named_params.values():
            if tensor.grad is None:
                continue
            state = self._optimizer.state.get(tensor) or {}
            step = float(state["step"]) + 1 if "step" in state else 1.0
            bc1 = 1 - beta1**step
            bc2_sqrt = math.sqrt(1 - beta2**step)
            if bc1 <= 0 or bc2_sqrt <= 0:
                continue  # beta 0 with step 1 is fine; torch divides by these, a zero is caught below
            pieces = [tensor.detach().reshape(-1), tensor.grad.reshape(-1)]
            if "exp_avg" in state:
                pieces += [state["exp_avg"].reshape(-1), state["exp_avg_sq"].reshape(-1)]
            for start in range(0, pieces[0].numel(), _CHECK_CHUNK):
                p, g, *moments = (x[start : start + _CHECK_CHUNK].float() for x in pieces)
                g = g * coef
                m = moments[0] * beta1 + g * (1 - beta1) if moments else g * (1 - beta1)
                v = moments[1] * beta2 + g * g * (1 - beta2) if moments else g * g * (1 - beta2)
                new_p = p * (1 - lr * wd) - (lr / bc1) * m / (v.sqrt() / bc2_sqrt + eps)
                if not (
                    bool(torch.isfinite(m).all())
                    and bool(torch.isfinite(v).all())
                    and bool(torch.isfinite(new_p.to(tensor.dtype)).all())
                ):
                    return False
        return True

    def zero_grad(self) -> None:
        """Drop the accumulated gradients and their counts."""
        self._optimizer.zero_grad(set_to_none=True)
        self.loss_tokens = 0
        self.sequences = 0

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
                key: self._moment_for(key, moments[f"{key}.{name}"], tensor) for key in MOMENT_KEYS
            }
        self.num_steps = num_steps

    def _moment_for(self, key: str, value: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
        """The optimizer-state tensor for saved moment `key` of parameter `tensor` (a copy on its device)."""
        return value.detach().clone().to(tensor.device)


def check_moments(moments: Mapping[str, torch.Tensor], param_shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Raise `UserInputError` unless `moments` fit tensors of `param_shapes` (names, shapes)."""
    for key, value in moments.items():
        moment, _, name = key.partition(".")
        if moment not in MOMENT_KEYS or name not in param_shapes:
            raise UserInputError(f"unexpected optimizer tensor {key!r}", field="state.optimizer")
        expected = () if moment == "step" else tuple(param_shapes[name])
        if tuple(value.shape) != expected:
            raise UserInputError(
                f"optimizer tensor {key!r} has shape {tuple(value.shape)}, expected {expected}",
                field="state.optimizer",
            )
        if any(f"{k}.{name}" not in moments for k in MOMENT_KEYS):
            raise UserInputError(f"incomplete optimizer state for {name!r}", field="state.optimizer")
