"""AdamW over one training model's named tensors, with hyperparameters given per step.

Each training model owns one `ModelOptimizer`, so its moments and gradients never touch another
model's tensors. The moments export to and import from a flat dict of named tensors
(`exp_avg.<name>`, `exp_avg_sq.<name>`, `step.<name>`, and `master.<name>` for the tensors below),
which is what a checkpoint stores; a model restored with them continues bit-exactly like one that
never stopped.

fp32 master weights: a trainable tensor of lower precision (bfloat16, float16: the weights of a
full fine-tuning copy of a bf16 base model, the default on a GPU) is not stepped in its own dtype,
where an update under half a unit in the last place (most of them at lr 1e-5) would be rounded
away. The optimizer keeps an fp32 master copy of it: the step takes its gradient into fp32 (the
normalisation, the norm and the clipping are computed on the fp32 gradients), AdamW updates the
master (moments fp32 too), and the model's tensor becomes the master rounded to nearest. A master
is made from the model's tensor at its first step (or when moments are imported), and from then on
it, not the rounded tensor, is the weight the optimizer steps: nothing else may write the model's
weights. It costs 4 bytes per such trainable element (beside 8 for the fp32 moments), and a step
briefly holds the fp32 copy of its gradients (4 more). fp32 tensors are stepped in place as they
always were (no copy, results unchanged). Moments imported without a `master.<name>` (a state
saved before masters existed, or by a model that held that tensor in fp32) start the master from
the model's tensor as loaded; a master saved for a tensor this model holds in fp32 is ignored (the
weight loaded from the state is what it steps). Sampler weights and exported weights are the
model's tensors, in the model's dtype.

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
from collections.abc import Iterator, Mapping
from typing import Literal

import torch

from tether.engine.grad_accumulation import GradAccMode, check_mode
from tether.engine.training_types import AdamWParams
from tether.types.errors import UserInputError

MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "step")
MASTER_KEY = "master"
"""Saved fp32 master weight of a lower-precision tensor (`master.<name>`), beside its moments."""
LOW_PRECISION = (torch.bfloat16, torch.float16)
"""Trainable dtypes the optimizer keeps an fp32 master copy of."""
_CHECK_CHUNK = 1 << 22
"""Elements per chunk when predicting an update (scratch memory: a few chunks of float32)."""


class NonFiniteStepError(UserInputError):
    """An optimizer step would have made weights or moments NaN or infinite; nothing was changed."""


class ModelOptimizer:
    """torch's AdamW (decoupled weight decay) plus global-norm clipping, over a fixed set of tensors.

    Tensors of a `LOW_PRECISION` dtype are stepped through fp32 master copies (module docstring).
    """

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
        self._low = {name for name, t in self.named_params.items() if t.dtype in LOW_PRECISION}
        """Names of the tensors stepped through an fp32 master."""
        self._slots = {name: index for index, name in enumerate(self.named_params)}
        """Each name's place in AdamW's parameter list (where its master replaces it)."""
        self._masters: dict[str, torch.Tensor] = {}
        """fp32 masters by name, made at a tensor's first step or import; AdamW steps them in its place."""
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
        (unless "none"). Gradients of lower-precision tensors are taken into fp32 first (norm,
        division and clipping in fp32). Raises UserInputError for an unknown mode, and
        NonFiniteStepError (weights, masters and moments unchanged) if the gradients or the update
        are not finite, unless `on_nonfinite="skip"`, which skips the step and reports it.
        """
        params.validate()
        check_mode(normalization)
        divisor = self.divisor(normalization)
        by_name = self._step_grads()
        grads = list(by_name.values())
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
        if not self._update_is_finite(params, coef / divisor, by_name):
            return self._nonfinite(
                params,
                float(grad_norm),
                f"this step's update would make weights or moments non-finite (learning rate "
                f"{params.learning_rate}, gradient norm {float(grad_norm):.3g}); the weights, moments and "
                "gradients are unchanged: retry with a smaller learning rate",
                field="adam_params.learning_rate",
            )
        self._attach_grads(by_name)
        if divisor != 1.0 and grads:
            torch._foreach_div_(grads, divisor)
        if params.grad_clip_norm > 0 and grads:
            torch.nn.utils.clip_grads_with_norm_(self._stepped_tensors(), params.grad_clip_norm, grad_norm)
        return self._apply_update(params, float(grad_norm), normalization, divisor)

    # ---- fp32 masters ------------------------------------------------------------------------

    def _stepped(self, name: str) -> torch.Tensor:
        """The tensor AdamW steps (and keys its state by) for `name`: its master if it has one."""
        return self._masters.get(name, self.named_params[name])

    def _stepped_tensors(self) -> list[torch.Tensor]:
        return [self._stepped(name) for name in self.named_params]

    def _step_grads(self) -> dict[str, torch.Tensor]:
        """The gradients a step uses, by name: fp32 copies for lower-precision tensors, else the
        tensors' own (the model's gradients stay as they are until `_attach_grads`)."""
        return {
            name: t.grad.to(torch.float32) if name in self._low else t.grad
            for name, t in self.named_params.items()
            if t.grad is not None
        }

    def _attach_grads(self, grads: Mapping[str, torch.Tensor]) -> None:
        """Commit to a step: lower-precision tensors' fp32 gradients go to their masters (made now
        from the weights if new) and the model's own gradients are dropped."""
        for name in self._low.intersection(grads):
            master = self._masters.get(name)
            if master is None:
                master = self._set_master(name)
            master.grad = grads[name]
            self.named_params[name].grad = None

    def _set_master(self, name: str, value: torch.Tensor | None = None) -> torch.Tensor:
        """Make `value` (fp32, laid out like the tensor; default: the tensor's current values in
        fp32) the master of `name`, in the tensor's place in AdamW (its state moves along)."""
        tensor = self.named_params[name]
        master = (value if value is not None else tensor.detach().to(torch.float32)).detach()
        self._replace_stepped(name, master)
        self._masters[name] = master
        return master

    def _drop_masters(self) -> None:
        """Forget every master: AdamW steps the model's tensors again until new ones are made."""
        for name in list(self._masters):
            self._replace_stepped(name, self.named_params[name])
            del self._masters[name]

    def _replace_stepped(self, name: str, new: torch.Tensor) -> None:
        old = self._stepped(name)
        self._optimizer.param_groups[0]["params"][self._slots[name]] = new  # the one group, in order
        state = self._optimizer.state.pop(old, None)
        if state:
            self._optimizer.state[new] = state

    @torch.no_grad()
    def _write_back_masters(self) -> None:
        """The model's tensors = their just-stepped masters, rounded to nearest."""
        for name, master in self._masters.items():
            if master.grad is not None:
                self.named_params[name].detach().copy_(master)

    # ---- the update --------------------------------------------------------------------------

    def _apply_update(
        self, params: AdamWParams, grad_norm: float, normalization: GradAccMode, divisor: float
    ) -> dict[str, float]:
        """AdamW with `params` on the (already normalised, clipped and attached) gradients, the
        masters rounded into the model, then clear the gradients and their counts; the step's metrics."""
        for group in self._optimizer.param_groups:
            group["lr"] = params.learning_rate
            group["betas"] = (params.beta1, params.beta2)
            group["eps"] = params.eps
            group["weight_decay"] = params.weight_decay
        self._optimizer.step()
        self._write_back_masters()
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

    def _check_items(
        self, grads: Mapping[str, torch.Tensor]
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, Mapping[str, torch.Tensor], torch.dtype]]:
        """Per tensor with a gradient: (the weight AdamW steps — its master if it has one, else the
        tensor, whose fp32 value a new master would be —, the step's gradient, its AdamW state, the
        model's dtype). `DistributedOptimizer` gives this rank's shards."""
        for name, grad in grads.items():
            stepped = self._stepped(name)
            state = self._optimizer.state.get(stepped) or {}
            yield stepped.detach(), grad, state, self.named_params[name].dtype

    @torch.no_grad()
    def _update_is_finite(self, params: AdamWParams, coef: float, grads: Mapping[str, torch.Tensor]) -> bool:
        """Whether AdamW with `params` (`grads` scaled by `coef`) keeps every weight and moment finite.

        Mirrors torch's AdamW arithmetic (decay, lerp of the first moment, second moment, bias
        corrections) on chunks of fp32 scratch copies of the stepped weights (masters where they
        exist); the new weight must also stay finite in the model's dtype. Nothing is modified.
        """
        lr, wd, eps = params.learning_rate, params.weight_decay, params.eps
        beta1, beta2 = params.beta1, params.beta2
        for weight, grad, state, dtype in self._check_items(grads):
            step = float(state["step"]) + 1 if "step" in state else 1.0
            bc1 = 1 - beta1**step
            bc2_sqrt = math.sqrt(1 - beta2**step)
            if bc1 <= 0 or bc2_sqrt <= 0:
                continue  # beta 0 with step 1 is fine; torch divides by these, a zero is caught below
            pieces = [weight.reshape(-1), grad.reshape(-1)]
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
                    and bool(torch.isfinite(new_p.to(dtype)).all())
                ):
                    return False
        return True

    def zero_grad(self) -> None:
        """Drop the accumulated gradients (the model's and the masters') and their counts."""
        self._optimizer.zero_grad(set_to_none=True)
        for name in self._low:
            self.named_params[name].grad = None
        self.loss_tokens = 0
        self.sequences = 0

    # ---- state -------------------------------------------------------------------------------

    def export_moments(self) -> dict[str, torch.Tensor]:
        """Detached copies of every moment, by `<moment>.<tensor name>`, and of every fp32 master
        (`master.<tensor name>`, for the tensors that have state)."""
        out: dict[str, torch.Tensor] = {}
        for name in self.named_params:
            state = self._optimizer.state.get(self._stepped(name))
            if not state:
                continue
            for key in MOMENT_KEYS:
                out[f"{key}.{name}"] = state[key].detach().clone()
            if name in self._masters:
                out[f"{MASTER_KEY}.{name}"] = self._masters[name].detach().clone()
        return out

    @torch.no_grad()
    def import_moments(self, moments: Mapping[str, torch.Tensor], num_steps: int) -> None:
        """Replace all moments (and masters) with `moments` (as `export_moments` returns them).

        Call it after the weights are loaded: a lower-precision tensor with moments but no
        `master.<name>` (an older state) gets its master from the tensor as it is. Moments are cast
        to the stepped tensor's dtype (fp32 for a master). Raises UserInputError (nothing changed)
        if names or shapes do not fit (`check_moments`).
        """
        check_moments(moments, {name: tuple(t.shape) for name, t in self.named_params.items()})
        self._drop_masters()
        self._optimizer.state.clear()
        for name in self.named_params:
            if f"step.{name}" not in moments:
                continue
            if name in self._low:
                master = self._set_master(name)  # from the loaded weights
                saved = moments.get(f"{MASTER_KEY}.{name}")
                if saved is not None:
                    master.copy_(self._moment_for(MASTER_KEY, saved, master))
            stepped = self._stepped(name)
            self._optimizer.state[stepped] = {
                key: self._moment_for(key, moments[f"{key}.{name}"], stepped) for key in MOMENT_KEYS
            }
        self.num_steps = num_steps

    def _moment_for(self, key: str, value: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
        """The optimizer-state tensor for saved `key` of stepped tensor `tensor`: a copy on its
        device, in its dtype (but `step`, which keeps its own)."""
        dtype = value.dtype if key == "step" else tensor.dtype
        return value.detach().to(device=tensor.device, dtype=dtype, copy=True)


def check_moments(moments: Mapping[str, torch.Tensor], param_shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Raise `UserInputError` unless `moments` fit tensors of `param_shapes` (names, shapes): every
    tensor with any entry has all of `MOMENT_KEYS`; `master.<name>` is optional."""
    for key, value in moments.items():
        moment, _, name = key.partition(".")
        if moment not in (*MOMENT_KEYS, MASTER_KEY) or name not in param_shapes:
            raise UserInputError(f"unexpected optimizer tensor {key!r}", field="state.optimizer")
        expected = () if moment == "step" else tuple(param_shapes[name])
        if tuple(value.shape) != expected:
            raise UserInputError(
                f"optimizer tensor {key!r} has shape {tuple(value.shape)}, expected {expected}",
                field="state.optimizer",
            )
        if any(f"{k}.{name}" not in moments for k in MOMENT_KEYS):
            raise UserInputError(f"incomplete optimizer state for {name!r}", field="state.optimizer")
