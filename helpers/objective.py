"""The training objective every other module differentiates.

    R(θ) = Σ_i w_i ℓ(z_i, θ) + (λ/2) ‖θ‖²,      w_i = 1/n by default   (STUDY.md §1)

Parameters are passed as a dict ``{name: tensor}`` in the style of :func:`torch.func.functional_call`.
The dict may hold a *subset* of the model's parameters (e.g. only the last layer): the others are read
from the module itself, which by convention holds the trained weights θ̂. The L2 term covers exactly the
parameters in the dict, so its Hessian restricted to any subset is λ·I.

Removing training point i is a zero weight: :func:`removal_weights` builds the weight vectors for both
leave-one-out objectives the book distinguishes:

* ``"drop"``: the others keep weight 1/n — exactly the ε = −1/n perturbation the influence estimate
  linearises (the book's default);
* ``"reaverage"``: the others get 1/(n−1) — "retrain on the n−1 points left", which with an L2 term
  slightly strengthens the regulariser and shifts every Δ_true by nearly the same small offset.
"""

from __future__ import annotations

from typing import Literal, Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call

Params = Mapping[str, Tensor]
LossName = Literal["cross_entropy", "mse"]
LooObjective = Literal["drop", "reaverage"]

LOSS_NAMES: tuple[str, ...] = ("cross_entropy", "mse")

#: where an engine function computes: ``"auto"`` (a closed-form backend where one applies, e.g.
#: :func:`helpers.models.is_softmax_regression`, else autodiff), or insisting on ``"autodiff"`` / ``"closed_form"``
Backend = Literal["auto", "autodiff", "closed_form"]
BACKENDS: tuple[str, ...] = ("auto", "autodiff", "closed_form")


def loss_from_outputs(outputs: Tensor, y: Tensor, loss: LossName = "cross_entropy") -> Tensor:
    """Per-sample loss from model outputs.

    Args:
        outputs: ``[n, c]`` logits (cross-entropy) or predictions (mse; ``[n]`` or ``[n, c]``).
        y: ``[n]`` integer class labels (cross-entropy) or targets shaped like ``outputs`` (mse).
        loss: ``"cross_entropy"`` (natural log, nats) or ``"mse"`` (½‖ŷ − y‖² per sample).

    Returns:
        ``[n]`` losses.
    """
    if loss == "cross_entropy":
        return torch.nn.functional.cross_entropy(outputs, y, reduction="none")
    if loss == "mse":
        diff = outputs - y.to(outputs.dtype)
        return 0.5 * (diff * diff).reshape(diff.shape[0], -1).sum(dim=1)
    raise ValueError(f"unknown loss {loss!r}: use one of {LOSS_NAMES}")


def per_sample_losses(
    model: nn.Module, params: Params, x: Tensor, y: Tensor, loss: LossName = "cross_entropy"
) -> Tensor:
    """ℓ(z_i, θ) for every row of ``x``: ``[n]``. ``params`` may be a subset of the model's parameters."""
    return loss_from_outputs(functional_call(model, dict(params), (x,)), y, loss)


def l2_term(params: Params, l2: float) -> Tensor:
    """(λ/2) Σ‖θ‖² over exactly the tensors in ``params``."""
    total = sum((p * p).sum() for p in params.values())
    return 0.5 * l2 * total


def objective(
    model: nn.Module,
    params: Params,
    x: Tensor,
    y: Tensor,
    *,
    weights: Tensor | None = None,
    l2: float = 0.0,
    loss: LossName = "cross_entropy",
) -> Tensor:
    """R(θ) = Σ_i w_i ℓ(z_i, θ) + (λ/2)‖θ‖², a scalar.

    Args:
        weights: ``[n]`` per-sample weights; ``None`` means 1/n each (the mean loss).
        l2: λ, the coefficient of the L2 term (not to be confused with damping, which never enters here).
    """
    losses = per_sample_losses(model, params, x, y, loss)
    data_term = losses.mean() if weights is None else (weights.to(losses.dtype) * losses).sum()
    return data_term + l2_term(params, l2) if l2 else data_term


def removal_weights(
    n: int, removed: Tensor | list[int], objective: LooObjective = "drop", dtype: torch.dtype = torch.float64
) -> Tensor:
    """Per-sample weight vectors for leave-one-out fits: ``[k, n]``, row j drops point ``removed[j]``.

    A removed index of ``-1`` means "remove nothing" (a drift run): that row is the full-data weights 1/n.
    """
    removed = torch.as_tensor(removed, dtype=torch.long).reshape(-1)
    if removed.numel() and (removed.max() >= n or removed.min() < -1):
        raise ValueError(f"removal indices must lie in [0, {n}) (or -1 for 'nothing removed'), got {removed.tolist()}")
    if objective not in ("drop", "reaverage"):
        raise ValueError(f"unknown leave-one-out objective {objective!r}: use 'drop' or 'reaverage'")
    k = removed.numel()
    w = torch.full((k, n), 1.0 / n, dtype=dtype)
    rows = torch.nonzero(removed >= 0).reshape(-1)
    if objective == "reaverage":
        w[rows] = 1.0 / (n - 1)
    w[rows, removed[rows]] = 0.0
    return w


def model_params(model: nn.Module, names: list[str] | None = None, detach: bool = True) -> dict[str, Tensor]:
    """The model's parameters as a dict (all, or the given names), detached copies by default."""
    named = dict(model.named_parameters())
    if names is not None:
        missing = [n for n in names if n not in named]
        if missing:
            raise KeyError(f"model has no parameters {missing}; it has {list(named)}")
        named = {n: named[n] for n in names}
    return {k: (v.detach().clone() if detach else v) for k, v in named.items()}


def param_names(model: nn.Module, which: str | list[str] = "all") -> list[str]:
    """Names of a parameter subset: ``"all"``, ``"last"`` (the parameters of ``model.last_layer``) or a list.

    Every model in :mod:`helpers.models` exposes its final layer as ``model.last_layer``.
    """
    if isinstance(which, (list, tuple)):
        return list(which)
    names = [n for n, _ in model.named_parameters()]
    if which == "all":
        return names
    if which == "last":
        last = getattr(model, "last_layer", None)
        if last is None:
            raise AttributeError(
                f"{type(model).__name__} has no `last_layer` attribute: define a `last_layer` property returning the "
                "final nn.Module (on nn.Sequential an attribute would register the layer twice), or pass the "
                "parameter names explicitly"
            )
        ids = {id(p) for p in last.parameters()}
        return [n for n, p in model.named_parameters() if id(p) in ids]
    raise ValueError(f"unknown parameter subset {which!r}: use 'all', 'last' or a list of names")
