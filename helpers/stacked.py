"""The stacked-ensemble backend of the engine: many small MLPs of different shapes trained, retrained, and
differentiated as ONE batched model (chapter 2's Iris sweeps: 280 networks per sweep).

Every member is a slice of a *stacked* network (:class:`Stack`) as deep and as wide as the largest member, with its
own depth (deeper layers skipped exactly: ``torch.where`` passes the input through), width (surplus units held at
exactly zero: zero weights get exactly zero gradient) and L2 coefficient λ (in the member's auxiliary data). A
member starts from the very initial weights ``helpers.models.mlp(..., depth, width)`` draws for its seed
(:meth:`Stack.embed`), follows the trajectory that model would follow on its own up to floating-point round-off,
and is extracted back into that model (:meth:`Stack.extract`). Plain members or Bayesian ones (the paper's
variational density propagation, ``Stack(bayesian=True)``).

This is a backend behind the engine's interface, as :mod:`helpers.closed_form` is for softmax regression: its
training runs :func:`helpers.train.train_ensemble` with a stacked
:class:`helpers.train.MemberObjective` (no optimiser of its own), its Hessians are
:func:`helpers.curvature.hessian_operator` or closed-form last-layer blocks checked against it, and its solves
are :func:`helpers.solvers.solve`.

* Model and objective: :class:`Stack`, :func:`stack_losses`, :func:`stack_member_losses`, :func:`stack_features`,
  :func:`stack_objective`, :func:`stack_objective_at`.
* Training: :func:`fit_stack` → :class:`StackFit`.
* Retraining (ground truth per member, with drift): :func:`retrain_stack` (all layers, warm start),
  :func:`retrain_last_layer` (a batched logistic regression on frozen features), :func:`retraining_curve`
  → :class:`helpers.retrain.GroundTruth` (:func:`member_ground_truth`: one row per member).
* Influence of the last layer for every member at once: :func:`last_layer_influence`,
  :func:`batched_last_layer_influence`, :func:`paper_inverse_influence`, :func:`bnn_last_layer_influence`, with
  the closed-form blocks :func:`softmax_layer_terms`.
* Curvature: :func:`stack_hessian_spectra`, :func:`hessian_spectrum`, :func:`lanczos_check`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import grad_and_value, vmap

from helpers import models
from helpers.curvature import hessian_operator, spectrum_summary
from helpers.influence import predict_removal
from helpers.objective import removal_weights
from helpers.retrain import GroundTruth
from helpers.solvers import solve
from helpers.train import MemberObjective, Recipe, model_with, train_ensemble


__all__ = [
    "Stack",
    "StackFit",
    "member_ground_truth",
    "stack_objective",
    "stack_losses",
    "stack_member_losses",
    "stack_features",
    "stack_objective_at",
    "fit_stack",
    "retrain_stack",
    "retrain_last_layer",
    "retraining_curve",
    "last_layer_influence",
    "softmax_layer_terms",
    "batched_last_layer_influence",
    "paper_inverse_influence",
    "bnn_last_layer_influence",
    "hessian_spectrum",
    "stack_hessian_spectra",
    "lanczos_check",
]


# ============================================================================================ stacked networks


@dataclass(frozen=True)
class Stack:
    """A stacked MLP: ``max_depth`` hidden layers of ``max_width`` units holding any smaller MLP as a member.

    The parameters of one member are one flat vector θ ``[size]`` (one tensor, so the ensemble's Adam update is a
    handful of kernels, not a handful per layer). Layout: for each hidden layer l, ``h{l}.weight``
    ``[max_width, d_in or max_width]``, ``h{l}.bias`` (and ``h{l}.rho`` ``[max_width, 1]`` if Bayesian), then
    ``out.weight`` ``[n_classes, max_width]``, ``out.bias`` (``out.rho``).

    A member of depth d and width w uses the top-left blocks of the first d hidden layers and of the output layer;
    everything else is zero (:meth:`embed`). Hidden layers l ≥ d are skipped (identity), so its outputs equal those
    of ``models.mlp(d_in, n_classes, d, w)`` (or ``models.bayesian_mlp``). Deterministic members need no unit
    mask: a unit with zero in- and out-weights has exactly zero gradient and stays zero. Bayesian members do
    (their variance path would otherwise leak through the zero units' positive weight variances): ``umask``.
    """

    d_in: int
    n_classes: int
    max_depth: int
    max_width: int
    bayesian: bool = False
    activation: str = "selu"

    def __post_init__(self) -> None:
        for name in ("d_in", "n_classes", "max_depth", "max_width"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"Stack.{name} must be >= 1, got {getattr(self, name)}")

    # -- layout -----------------------------------------------------------------------------------------------
    @property
    def layout(self) -> list[tuple[str, tuple[int, ...]]]:
        """``[(name, shape), ...]`` in flat order."""
        out: list[tuple[str, tuple[int, ...]]] = []
        W = self.max_width
        for l in range(self.max_depth):
            out += [(f"h{l}.weight", (W, self.d_in if l == 0 else W)), (f"h{l}.bias", (W,))]
            if self.bayesian:
                out.append((f"h{l}.rho", (W, 1)))
        out += [("out.weight", (self.n_classes, W)), ("out.bias", (self.n_classes,))]
        if self.bayesian:
            out.append(("out.rho", (self.n_classes, 1)))
        return out

    @property
    def size(self) -> int:
        """Number of scalars in θ."""
        return sum(math.prod(s) for _, s in self.layout)

    def split(self, theta: Tensor) -> dict[str, Tensor]:
        """θ ``[..., size]`` → ``{name: view [..., *shape]}`` (works inside ``vmap`` and on stacked θ)."""
        if theta.shape[-1] != self.size:
            raise ValueError(f"θ must end in this stack's size {self.size}, got shape {tuple(theta.shape)}")
        sizes = [math.prod(s) for _, s in self.layout]
        lead = tuple(theta.shape[:-1])
        return {name: part.reshape(lead + shape) for (name, shape), part in zip(self.layout, theta.split(sizes, dim=-1))}

    def _check(self, depth: int, width: int) -> None:
        if not (1 <= depth <= self.max_depth and 1 <= width <= self.max_width):
            raise ValueError(f"member depth {depth} / width {width} does not fit this stack (max depth "
                             f"{self.max_depth}, max width {self.max_width})")

    def _real_name(self, depth: int, stack_name: str) -> str:
        layer, kind = stack_name.split(".")
        i = depth if layer == "out" else int(layer[1:])
        if self.bayesian:
            return f"layers.{i}.rho" if kind == "rho" else f"layers.{i}.mean.{kind}"
        return f"net.{2 * i}.{kind}"

    def _blocks(self, depth: int, width: int) -> list[tuple[str, tuple[slice, ...]]]:
        """``(stack name, block slices)`` of every tensor a member of this depth and width uses."""
        self._check(depth, width)
        out = []
        for l in range(depth):
            cols = slice(0, self.d_in) if l == 0 else slice(0, width)
            out += [(f"h{l}.weight", (slice(0, width), cols)), (f"h{l}.bias", (slice(0, width),))]
            if self.bayesian:
                out.append((f"h{l}.rho", (slice(0, width), slice(0, 1))))
        out += [("out.weight", (slice(None), slice(0, width))), ("out.bias", (slice(None),))]
        if self.bayesian:
            out.append(("out.rho", (slice(None), slice(0, 1))))
        return out

    def build(self, depth: int, width: int, dtype: torch.dtype = torch.float64) -> nn.Module:
        """The real model of a member: ``models.mlp`` (this activation) or ``models.bayesian_mlp`` (tanh)."""
        self._check(depth, width)
        if self.bayesian:
            return models.bayesian_mlp(self.d_in, self.n_classes, depth, width, dtype=dtype)
        return models.mlp(self.d_in, self.n_classes, depth, width, self.activation, dtype=dtype)

    def embed(self, params: Mapping[str, Tensor], depth: int, width: int) -> Tensor:
        """The real model's parameters (names as in :meth:`build`) placed into a zero θ ``[size]``."""
        theta = torch.zeros(self.size, dtype=next(iter(params.values())).dtype)
        views = self.split(theta)
        for name, block in self._blocks(depth, width):
            real = self._real_name(depth, name)
            if real not in params:
                raise KeyError(f"params lack {real!r} for a member of depth {depth}, width {width}")
            views[name][block] = params[real].detach().reshape(views[name][block].shape).to(theta.dtype)
        return theta

    def extract(self, theta: Tensor, depth: int, width: int) -> dict[str, Tensor]:
        """θ ``[size]`` → the real model's parameters ``{name: tensor}`` (copies)."""
        views = self.split(theta)
        return {self._real_name(depth, name): views[name][block].clone() for name, block in self._blocks(depth, width)}

    def masks(self, depth: int, width: int, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor, Tensor]:
        """``(dmask [max_depth], umask [max_width], amask [size])``: active layers, units and parameters (1/0)."""
        self._check(depth, width)
        dmask = (torch.arange(self.max_depth) < depth).to(dtype)
        umask = (torch.arange(self.max_width) < width).to(dtype)
        amask = torch.zeros(self.size, dtype=dtype)
        views = self.split(amask)
        for name, block in self._blocks(depth, width):
            views[name][block] = 1.0
        return dmask, umask, amask

    # -- forward ----------------------------------------------------------------------------------------------
    def hidden(self, theta: Tensor, x: Tensor, dmask: Tensor, umask: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        """The last hidden layer's output ``[n, max_width]`` (Bayesian: its mean and variance)."""
        p = self.split(theta)
        if self.bayesian:
            m, v = x, torch.zeros_like(x)
            for l in range(self.max_depth):
                nm, nv = _bayes_linear(m, v, p[f"h{l}.weight"], p[f"h{l}.bias"], p[f"h{l}.rho"])
                t = torch.tanh(nm)
                nv = nv * (1 - t * t) ** 2 * umask
                nm = t * umask
                if l == 0:
                    m, v = nm, nv
                else:
                    keep = dmask[l] > 0
                    m, v = torch.where(keep, nm, m), torch.where(keep, nv, v)
            return m, v
        act = _ACTIVATIONS[self.activation]
        h = act(F.linear(x, p["h0.weight"], p["h0.bias"]))
        for l in range(1, self.max_depth):
            h = torch.where(dmask[l] > 0, act(F.linear(h, p[f"h{l}.weight"], p[f"h{l}.bias"])), h)
        return h

    def forward(self, theta: Tensor, x: Tensor, dmask: Tensor, umask: Tensor) -> Tensor | models.Moments:
        """Logits ``[n, n_classes]``, or for a Bayesian stack the output :class:`helpers.models.Moments`."""
        p = self.split(theta)
        h = self.hidden(theta, x, dmask, umask)
        if not self.bayesian:
            return F.linear(h, p["out.weight"], p["out.bias"])
        m, v = _bayes_linear(h[0], h[1], p["out.weight"], p["out.bias"], p["out.rho"])
        prob = torch.softmax(m, dim=-1)
        jac = torch.diag_embed(prob) - prob.unsqueeze(-1) * prob.unsqueeze(-2)
        return models.Moments(prob, ((jac * jac) @ v.unsqueeze(-1)).squeeze(-1), m, v)

    def kl(self, theta: Tensor, amask: Tensor, prior_var: float = 1.0) -> Tensor:
        """KL(q ‖ N(0, prior_var)) over the member's active Gaussian weights (as :func:`models.bayesian_kl`)."""
        p, a = self.split(theta), self.split(amask)
        total = theta.new_zeros(())
        for l in [f"h{i}" for i in range(self.max_depth)] + ["out"]:
            mu = p[f"{l}.weight"]
            s = F.softplus(p[f"{l}.rho"]).expand_as(mu)
            total = total + (0.5 * ((s + mu * mu) / prior_var - 1.0 - torch.log(s / prior_var)) * a[f"{l}.weight"]).sum()
        return total


_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {"selu": F.selu, "relu": F.relu, "tanh": torch.tanh}


def _bayes_linear(m: Tensor, v: Tensor, w: Tensor, b: Tensor, rho: Tensor) -> tuple[Tensor, Tensor]:
    """Moments through a Gaussian-weight linear layer, exactly :class:`helpers.models.BayesianLinear`."""
    s = F.softplus(rho).expand_as(w)
    return F.linear(m, w, b), F.linear(v + m * m, s) + F.linear(v, w * w)


def stack_member_losses(stack: Stack, theta: Tensor, x: Tensor, y: Tensor, dmask: Tensor, umask: Tensor,
                         var_floor: float) -> Tensor:
    out = stack.forward(theta, x, dmask, umask)
    if stack.bayesian:
        fit, logdet = models.bayesian_nll_terms(out, y, var_floor)
        return fit + logdet
    return F.cross_entropy(out, y, reduction="none")


def stack_losses(stack: Stack, theta: Tensor, x: Tensor, y: Tensor, dmask: Tensor, umask: Tensor,
                 var_floor: float = 1e-4) -> Tensor:
    """Per-sample losses of k members, ``[k, n]``: cross-entropy (nats), or for a Bayesian stack the Gaussian
    NLL's likelihood part fit + logdet (the loss its influence uses). ``theta [k, size]``, masks ``[k, ...]``."""
    return vmap(lambda t, d, u: stack_member_losses(stack, t, x, y, d, u, var_floor))(theta, dmask, umask)


def stack_features(stack: Stack, theta: Tensor, x: Tensor, dmask: Tensor, umask: Tensor) -> Tensor:
    """The last hidden layer of k deterministic members, ``[k, n, max_width]`` (the last layer's input)."""
    if stack.bayesian:
        raise ValueError("stack_features is for deterministic stacks; a Bayesian layer's input is a mean and a variance")
    return vmap(lambda t, d, u: stack.hidden(t, x, d, u))(theta, dmask, umask)


def stack_objective(stack: Stack, *, per_member_x: bool = False, prior_var: float = 1.0,
                    var_floor: float = 1e-4) -> MemberObjective:
    """The member objective of a stack for :func:`helpers.train.train_ensemble` (params ``{"theta": [size]}``).

    aux = ``(w [n], lam [], dmask, umask, amask, loss_weights [3][, x [n, d_in]])``:

    * deterministic: Σ_i w_i CE_i + (λ/2)‖θ‖² (zero entries of θ add nothing, so the L2 term covers exactly the
      member's own parameters);
    * Bayesian: Σ_i w_i (a·fit_i + b·logdet_i) + c·KL over the active weights, (a, b, c) = ``loss_weights``
      (:func:`helpers.models.balanced_loss_weights`).

    ``per_member_x``: the member's own inputs come last in aux (the leave-one-out fits, each standardised on its
    own training part); the shared ``x`` of the ensemble is then ignored.
    """

    def member_objective(params, aux, xb, yb, idx, scale):
        theta = params["theta"]
        w, lam, dmask, umask, amask, lw = aux[:6]
        if per_member_x:
            if idx is not None:
                raise ValueError("per-member inputs need full-batch training (batch_size=None)")
            xb = aux[6]
        wb = w if idx is None else w[idx] * scale
        if not stack.bayesian:
            losses = F.cross_entropy(stack.forward(theta, xb, dmask, umask), yb, reduction="none")
            return (wb * losses).sum() + 0.5 * lam * (theta * theta).sum()
        fit, logdet = models.bayesian_nll_terms(stack.forward(theta, xb, dmask, umask), yb, var_floor)
        return (wb * (lw[0] * fit + lw[1] * logdet)).sum() + lw[2] * stack.kl(theta, amask, prior_var)

    return member_objective


# ============================================================================================ training


@dataclass
class StackFit:
    """k members of a :class:`Stack` trained as one ensemble.

    Attributes:
        stack: the stack; members: one row per member (``depth``, ``width``, ``l2``, ``seed`` and any labels).
        theta: ``[k, size]`` trained parameters in the recipe's dtype (the SWA average if the recipe averages).
        aux: the members' auxiliary tensors (weights, λ, masks, loss weights[, inputs]) as used in training.
        loss, grad_norm, lr: ``[k]`` final objective, ‖∇R‖₂ and learning rate; history ``[k, epochs]``.
        recipe: ``Recipe.to_dict()``.
        floor_epoch, epochs_run: ``[k]`` the epoch at which the plateau lr reached its floor (-1: never) and the
            epochs computed (see :attr:`helpers.train.Recipe.stop_at_floor`).
        last: with SWA, ``[k, size]`` the last iterates (``theta`` is then the average); None otherwise.
    """

    stack: Stack
    members: pd.DataFrame
    theta: Tensor
    aux: tuple
    loss: np.ndarray
    grad_norm: np.ndarray
    lr: np.ndarray
    history: np.ndarray
    recipe: dict[str, Any]
    floor_epoch: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    epochs_run: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    last: Tensor | None = None

    @property
    def masks(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(dmask [k, D], umask [k, W], amask [k, size])``."""
        return self.aux[2], self.aux[3], self.aux[4]


def _member_inits(stack: Stack, members: pd.DataFrame, dtype: torch.dtype) -> Tensor:
    rows = []
    for depth, width, seed in members[["depth", "width", "seed"]].itertuples(index=False):
        real = stack.build(int(depth), int(width), dtype=torch.float64)
        rows.append(stack.embed(models.init_params(real, int(seed)), int(depth), int(width)))
    return torch.stack(rows).to(dtype)


def _loss_weights(stack: Stack, members: pd.DataFrame, x: Tensor, y: Tensor, theta0: Tensor,
                  x_members: Tensor | None, var_floor: float) -> Tensor:
    """(a, b, c) per Bayesian member from its own initial weights (``balanced_loss_weights``); ones otherwise."""
    k = len(members)
    if not stack.bayesian:
        return torch.ones(k, 3, dtype=theta0.dtype)
    out = []
    for j, (depth, width) in enumerate(members[["depth", "width"]].itertuples(index=False)):
        real = model_with(stack.build(int(depth), int(width)), stack.extract(theta0[j].double(), int(depth), int(width)))
        xj = x if x_members is None else x_members[j]
        lw = models.balanced_loss_weights(real, xj.double(), y, var_floor=var_floor)
        out.append([lw["fit_weight"], lw["logdet_weight"], lw["kl_weight"]])
    return torch.tensor(out, dtype=theta0.dtype)


def fit_stack(stack: Stack, members: pd.DataFrame, x: Tensor, y: Tensor, recipe: Recipe, *,
              weights: Tensor | None = None, x_members: Tensor | None = None, var_floor: float = 1e-4,
              progress: bool = False) -> StackFit:
    """Train every member of ``members`` (columns ``depth``, ``width``, ``l2``, ``seed``) as one ensemble.

    Member j starts from ``init_params(stack.build(depth_j, width_j), seed_j)`` — the initialisation of the real
    model — and minimises its objective (:func:`stack_objective`) with λ_j = ``l2``; the recipe's own
    ``weight_decay`` must be 0 (λ is per member). ``weights`` ``[k, n]`` (default 1/n); ``x_members``
    ``[k, n, d_in]`` gives each member its own inputs (labels shared). Cost: one vmapped forward/backward of k
    stacked members per epoch.
    """
    need = {"depth", "width", "l2", "seed"}
    if not need <= set(members.columns):
        raise KeyError(f"members needs columns {sorted(need)}; it has {list(members.columns)}")
    if recipe.weight_decay != 0:
        raise ValueError("fit_stack takes λ per member from members['l2']: set the recipe's weight_decay to 0")
    dt = recipe.torch_dtype
    k, n = len(members), x.shape[0]
    theta0 = _member_inits(stack, members, dt)
    masks = [stack.masks(int(d), int(w), dt) for d, w in members[["depth", "width"]].itertuples(index=False)]
    dmask, umask, amask = (torch.stack([m[i] for m in masks]) for i in range(3))
    w = torch.full((k, n), 1.0 / n, dtype=dt) if weights is None else torch.as_tensor(weights).to(dt)
    if w.shape != (k, n):
        raise ValueError(f"weights must be [k, n] = [{k}, {n}], got {tuple(w.shape)}")
    lam = torch.tensor(members["l2"].to_numpy(np.float64), dtype=dt)
    lw = _loss_weights(stack, members, x, y, theta0, x_members, var_floor)
    aux: tuple = (w, lam, dmask, umask, amask, lw)
    if x_members is not None:
        if x_members.shape[:2] != (k, n):
            raise ValueError(f"x_members must be [k, n, d] = [{k}, {n}, ...], got {tuple(x_members.shape)}")
        aux = aux + (x_members.to(dt),)
    xc, yc = x.to(dt), y.long()
    res = train_ensemble(recipe, stack_objective(stack, per_member_x=x_members is not None, var_floor=var_floor),
                         {"theta": theta0}, aux, xc, yc, progress=progress)
    return StackFit(stack, members.reset_index(drop=True), res.params["theta"].detach(), aux, res.loss,
                    res.grad_norm, res.lr, res.history, recipe.to_dict(), res.floor_epoch, res.epochs_run,
                    None if res.last is None else res.last["theta"].detach())


# ============================================================================================ retraining


def member_ground_truth(delta: np.ndarray, drift: np.ndarray, ref_loss: np.ndarray, grad_norm: np.ndarray,
                        removed: np.ndarray, protocol: str, recipe: dict[str, Any], floor_epoch: np.ndarray,
                        epochs_run: np.ndarray, lr: np.ndarray) -> GroundTruth:
    """Warm-started leave-one-out retraining of k members, m removals each, plus one drift run per member, as
    the engine's one result type :class:`helpers.retrain.GroundTruth` (one row per member).

    Args:
        delta: ``[k, m]`` Δ_true = ℓ(z_test, θ₋ᵢ) − ℓ(z_test, θ̂) (nats; positive: removing i raised the test loss).
        drift: ``[k]`` the same retraining with nothing removed, minus ℓ(z_test, θ̂): what the protocol does by itself.
        ref_loss: ``[k]`` ℓ(z_test, θ̂); grad_norm ``[k, m + 1]`` final ‖∇‖ of every retraining (drift last).
        removed: ``[k, m]`` training indices; protocol: ``"all_layers"`` or ``"last_layer"``; recipe.
        floor_epoch, epochs_run: ``[k, m + 1]`` per retraining, the epoch its plateau lr reached the floor (-1:
            never) and the epochs computed (:attr:`helpers.train.Recipe.stop_at_floor`); lr ``[k, m + 1]`` final.
    """
    test_losses = (np.concatenate([delta, drift[:, None]], axis=1) + ref_loss[:, None]).T
    return GroundTruth(protocol=protocol, delta=delta, drift=drift, removed=removed, recipe=recipe,
                       test_losses=test_losses, ref_loss=ref_loss, grad_norm=grad_norm, floor_epoch=floor_epoch,
                       epochs_run=epochs_run, lr=lr)


def _removal_rows(n: int, removed: np.ndarray, loo: str, dtype: torch.dtype) -> Tensor:
    """``[k·(m+1), n]``: for each member its m leave-one-out weight rows, then its drift row."""
    return torch.cat([removal_weights(n, [int(i) for i in row] + [-1], loo, dtype=dtype) for row in removed])


def _chunks(k: int, per_member: int, max_members: int) -> list[slice]:
    step = max(1, max_members // per_member)
    return [slice(s, min(k, s + step)) for s in range(0, k, step)]


def retrain_stack(fit: StackFit, x: Tensor, y: Tensor, test: tuple[Tensor, Tensor], removed: np.ndarray,
                  recipe: Recipe, *, loo: str = "reaverage", var_floor: float = 1e-4, max_members: int = 4096,
                  progress: bool = False, also_last: bool = False) -> GroundTruth | tuple[GroundTruth, GroundTruth]:
    """All-layer warm-start retraining of every member without each of its ``removed`` points, and once without
    removing anything (drift), as ensembles of at most ``max_members`` members.

    Each retraining starts at the member's θ̂ with a fresh optimizer (the recipe: the paper's fresh Adam, 7,500
    epochs, SWA if the regime averages) and minimises the member's objective with the point's weight set to zero
    (``loo="reaverage"``: the others 1/(n−1), the paper's ``np.delete``; ``"drop"``: they keep 1/n). The test
    loss of θ̂ is evaluated by the same kernel as the members', so a member that does not move has drift 0.

    Args:
        removed: ``[k, m]`` training indices per member. test: ``(x_t [1, d], y_t [1])``, the shared test point.
        also_last: with an SWA recipe, also return the retraining *without* averaging (its last iterates: SWA
            does not change the trajectory), as a second :class:`~helpers.retrain.GroundTruth` with the SWA-free recipe.
    Cost: k·(m + 1) members for the recipe's epochs (until each one's floor with ``stop_at_floor``).
    """
    if also_last and recipe.swa_start is None:
        raise ValueError("also_last needs an SWA recipe (without SWA the last iterates are the result)")
    if recipe.weight_decay != 0:
        raise ValueError("retrain_stack takes λ per member from the fit: set the recipe's weight_decay to 0")
    removed = np.asarray(removed, dtype=np.int64)
    k, m = removed.shape
    if k != fit.theta.shape[0]:
        raise ValueError(f"removed has {k} rows but the fit has {fit.theta.shape[0]} members")
    dt, n = recipe.torch_dtype, x.shape[0]
    xc, yc = x.to(dt), y.long()
    xt, yt = test[0].to(dt), test[1].long()
    per_member_x = len(fit.aux) > 6
    if per_member_x:
        raise ValueError("retrain_stack needs a fit on shared inputs")
    theta_hat = fit.theta.to(dt)
    views = ("params", "last") if also_last else ("params",)
    out = {v: (np.zeros((k, m)), np.zeros(k), np.zeros(k), np.zeros((k, m + 1))) for v in views}
    fe, er, lr = (np.zeros((k, m + 1), dtype=np.int64), np.zeros((k, m + 1), dtype=np.int64), np.zeros((k, m + 1)))
    # Retrain each architecture in a stack of exactly its size: the retraining ensembles are large (k·(m + 1)
    # members) and compute-bound, so skipping the unused layers and units of the shared stack pays for itself.
    for (d_, w_), g in fit.members.groupby(["depth", "width"], sort=False):
        d_, w_ = int(d_), int(w_)
        sub = Stack(fit.stack.d_in, fit.stack.n_classes, d_, w_, fit.stack.bayesian, fit.stack.activation)
        objective = stack_objective(sub, var_floor=var_floor)
        idx = g.index.to_numpy()
        th_sub = torch.stack([sub.embed(fit.stack.extract(theta_hat[j], d_, w_), d_, w_) for j in idx])
        dm, um, am = (t.to(dt) for t in sub.masks(d_, w_, dt))
        lam, lw = fit.aux[1][idx.copy()].to(dt), fit.aux[5][idx.copy()].to(dt)
        for sl in _chunks(len(idx), m + 1, max_members):
            rows = idx[sl]
            kk = len(rows)
            start = {"theta": th_sub[sl].repeat_interleave(m + 1, dim=0)}
            w = _removal_rows(n, removed[rows], loo, dt)
            K = kk * (m + 1)
            aux = (w, lam[sl].repeat_interleave(m + 1), dm.expand(K, -1), um.expand(K, -1), am.expand(K, -1),
                   lw[sl].repeat_interleave(m + 1, dim=0))
            res = train_ensemble(recipe, objective, start, aux, xc, yc, progress=progress)
            for view in views:
                final = (res.params if view == "params" else res.last)["theta"].detach()
                thetas = torch.cat([final, th_sub[sl]])
                KK = thetas.shape[0]
                losses = stack_losses(sub, thetas, xt, yt, dm.expand(KK, -1), um.expand(KK, -1),
                                      var_floor)[:, 0].double().numpy()
                members, refs = losses[:-kk].reshape(kk, m + 1), losses[-kk:]
                delta, drift, ref, gn = out[view]
                delta[rows] = members[:, :m] - refs[:, None]
                drift[rows] = members[:, m] - refs
                ref[rows] = refs
                if view == "params":
                    gn[rows] = res.grad_norm.reshape(kk, m + 1)
                else:  # the gradient norm at the last iterates, not at the average
                    gn[rows] = _stack_grad_norms(objective, final, aux, xc, yc).reshape(kk, m + 1)
            fe[rows], er[rows], lr[rows] = (a.reshape(kk, m + 1) for a in (res.floor_epoch, res.epochs_run, res.lr))
    results = tuple(member_ground_truth(*out[v], removed, "all_layers",
                                        (recipe if v == "params" else recipe.replace(swa_start=None)).to_dict(), fe, er, lr)
                    for v in views)
    return results if also_last else results[0]


def _values_and_grad_norms(objective: MemberObjective, theta: Tensor, aux: tuple, x: Tensor, y: Tensor
                           ) -> tuple[np.ndarray, np.ndarray]:
    """``[k]`` R and ``[k]`` ‖∇R‖₂ of each member of a stacked θ ``[k, size]`` under its own aux (full batch)."""
    g, val = vmap(grad_and_value(objective), in_dims=(0, 0, None, None, None, None))({"theta": theta}, aux, x, y,
                                                                                   None, 1.0)
    return val.double().numpy(), g["theta"].double().pow(2).sum(1).sqrt().numpy()


def _stack_grad_norms(objective: MemberObjective, theta: Tensor, aux: tuple, x: Tensor, y: Tensor) -> np.ndarray:
    """``[k]`` ‖∇R‖₂ of each member of a stacked θ ``[k, size]`` under its own aux (full batch)."""
    return _values_and_grad_norms(objective, theta, aux, x, y)[1]


def stack_objective_at(stack: Stack, theta: Tensor, aux: tuple, x: Tensor, y: Tensor
                       ) -> tuple[np.ndarray, np.ndarray]:
    """The training objective R and its gradient norm ‖∇R‖₂ of every member of a stacked θ ``[k, size]`` under
    its own aux (:func:`stack_objective`, full batch): two ``[k]`` float64 arrays."""
    return _values_and_grad_norms(stack_objective(stack), theta, aux, x.to(theta.dtype), y.long())


def _linear_objective(n_classes: int) -> MemberObjective:
    """Member objective of a last-layer retraining: aux = (w [n], lam [], features [n, f]); mini-batches index
    the member's own features (the batch term scaled by n/|B|, as :func:`helpers.train.weighted_objective`)."""

    def member_objective(params, aux, xb, yb, idx, scale):
        w, lam, feats = aux
        if idx is not None:
            feats, w = feats[idx], w[idx] * scale
        logits = F.linear(feats, params["weight"], params["bias"])
        data = (w * F.cross_entropy(logits, yb, reduction="none")).sum()
        return data + 0.5 * lam * ((params["weight"] ** 2).sum() + (params["bias"] ** 2).sum())

    return member_objective


def retrain_last_layer(features: Tensor, y: Tensor, weight: Tensor, bias: Tensor, lam: Sequence[float] | Tensor,
                       test_features: Tensor, test_y: Tensor, removed: np.ndarray, recipe: Recipe, *,
                       loo: str = "reaverage", max_members: int = 4096, max_elements: int = 2**28,
                       progress: bool = False) -> GroundTruth:
    """Warm-start retraining of the last layer only (the body frozen), batched over k models and their removals.

    With the body frozen, the last layer is a multinomial logistic regression on the features, so this is
    ``helpers.retrain.warm_start(..., params="last")`` for k models at once (their features differ).

    Args:
        features: ``[k, n, f]`` the last layer's inputs on the training set, per model.
        y: ``[n]`` labels. weight ``[k, C, f]``, bias ``[k, C]``: θ̂'s last layer. lam: ``[k]`` its L2 coefficient.
        test_features: ``[k, f]`` (one test point per model) or ``[k, 1, f]``; test_y ``[k]``.
        removed: ``[k, m]``. recipe: the fine-tuning (``weight_decay`` must be 0: λ comes from ``lam``); its
            ``batch_size`` selects mini-batches (the same for every member).
        max_members, max_elements: an ensemble holds at most this many members and member × n × f feature
            entries (each member trains on its own copy of its model's features); models are chunked to fit.
            The features' device is where the retraining runs; results come back as numpy.

    Cost: k·(m + 1) logistic regressions on n × f features for the recipe's epochs.
    """
    if recipe.weight_decay != 0:
        raise ValueError("retrain_last_layer takes λ from `lam`: set the recipe's weight_decay to 0")
    removed = np.asarray(removed, dtype=np.int64)
    k, m = removed.shape
    dt = recipe.torch_dtype
    feats = torch.as_tensor(features).to(dt)
    if feats.dim() != 3 or feats.shape[0] != k:
        raise ValueError(f"features must be [k={k}, n, f], got {tuple(feats.shape)}")
    n = feats.shape[1]
    tf = torch.as_tensor(test_features).to(dt).reshape(k, -1)
    ty = torch.as_tensor(test_y).long().reshape(k)
    lam_t = torch.tensor(np.array(lam, dtype=np.float64), dtype=dt).reshape(k)
    W, b = torch.as_tensor(weight).to(dt), torch.as_tensor(bias).to(dt)
    yc = torch.as_tensor(y).long()
    objective = _linear_objective(W.shape[1])
    delta, drift, ref, gn = (np.zeros((k, m)), np.zeros(k), np.zeros(k), np.zeros((k, m + 1)))
    fe, er, lr = (np.zeros((k, m + 1), dtype=np.int64), np.zeros((k, m + 1), dtype=np.int64), np.zeros((k, m + 1)))

    def test_loss(Wk: Tensor, bk: Tensor, f: Tensor, t: Tensor) -> Tensor:
        return F.cross_entropy((f @ Wk.transpose(-1, -2)).squeeze(-2) + bk, t, reduction="none")

    dev = feats.device
    tf, ty, lam_t, W, b, yc = (t.to(dev) for t in (tf, ty, lam_t, W, b, yc))
    per_model = (m + 1) * n * feats.shape[2]
    cap = (m + 1) * max(1, min(max_members // (m + 1), max_elements // per_model))
    for sl in _chunks(k, m + 1, cap):
        kk = sl.stop - sl.start
        rep = lambda a: a[sl].repeat_interleave(m + 1, dim=0)  # noqa: E731
        start = {"weight": rep(W), "bias": rep(b)}
        aux = (_removal_rows(n, removed[sl], loo, dt).to(dev), rep(lam_t), rep(feats))
        res = train_ensemble(recipe, objective, start, aux, feats[0], yc, progress=progress)
        Wm = torch.cat([res.params["weight"], W[sl]])
        bm = torch.cat([res.params["bias"], b[sl]])
        fm = torch.cat([rep(tf), tf[sl]])[:, None, :]
        tm = torch.cat([rep(ty), ty[sl]])
        losses = test_loss(Wm, bm, fm, tm).double().cpu().numpy()
        members, refs = losses[:-kk].reshape(kk, m + 1), losses[-kk:]
        delta[sl] = members[:, :m] - refs[:, None]
        drift[sl] = members[:, m] - refs
        ref[sl] = refs
        gn[sl] = res.grad_norm.reshape(kk, m + 1)
        fe[sl], er[sl], lr[sl] = (a.reshape(kk, m + 1) for a in (res.floor_epoch, res.epochs_run, res.lr))
    return member_ground_truth(delta, drift, ref, gn, removed, "last_layer", recipe.to_dict(), fe, er, lr)


def retraining_curve(fit: StackFit, member: int, x: Tensor, y: Tensor, test: tuple[Tensor, Tensor],
                     removed: Sequence[int], recipe: Recipe, lengths: Sequence[int], *, loo: str = "reaverage",
                     progress: bool = False) -> pd.DataFrame:
    """Δ_true and drift of one member's all-layer warm-start retraining for several retraining lengths.

    Returns a long table (``epochs``, ``candidate``, ``delta``, ``drift``): how many of the retraining epochs
    change anything (the paper's Fig. 5: test-loss difference against the retraining epoch). One ensemble per
    length (a fresh optimizer each time, as the protocol prescribes).
    """
    single = StackFit(fit.stack, fit.members.iloc[[member]].reset_index(drop=True), fit.theta[member:member + 1],
                      tuple(a[member:member + 1] for a in fit.aux), fit.loss[member:member + 1],
                      fit.grad_norm[member:member + 1], fit.lr[member:member + 1], fit.history[member:member + 1],
                      fit.recipe)
    rows = []
    for epochs in lengths:
        r = retrain_stack(single, x, y, test, np.asarray([list(removed)]), recipe.replace(epochs=int(epochs)),
                          loo=loo, progress=progress)
        for c, d in zip(removed, r.delta[0]):
            rows.append({"epochs": int(epochs), "candidate": int(c), "delta": float(d), "drift": float(r.drift[0])})
    return pd.DataFrame(rows)


# ============================================================================================ influence


def last_layer_influence(features: Tensor, y: Tensor, test_features: Tensor, test_y: Tensor, weight: Tensor,
                         bias: Tensor, *, l2: float = 0.0, include_bias: bool = True, include_l2: bool = True,
                         method: str = "pinv", damping: float = 0.0, **solver_options: Any) -> tuple[Tensor, dict]:
    """Last-layer influence ``[n_test, n]`` in the book's convention, from the frozen features.

    With the body frozen the network's loss depends on the last layer only through ``features @ Wᵀ + b``, so
    its last-layer influence is exactly that of a multinomial logistic regression on the features
    (:func:`helpers.influence.predict_removal` on ``models.logistic_regression``), w_i = 1/n.

    Variants (STUDY.md §3 item 5):
        * the paper's: ``include_bias=False, include_l2=False`` — the Hessian of the mean cross-entropy in W
          alone. It is exactly singular (adding one vector to every class's weights leaves the softmax unchanged:
          a width-f layer has an f-dimensional null space), so ``method="pinv"`` (the minimum-norm solution on the
          range, where the gradients lie) is the well-defined version of the paper's ``torch.inverse``.
        * the objective's: weight and bias, H of the training objective including its L2 term λ.

    Returns ``(values [n_test, n], info)`` with info the solve's summary (relative residual, zero eigenvalues).
    Inputs in float64 for exactness. Cost: n per-sample gradients and one d×d eigendecomposition, d = C·(f + 1).
    """
    f, C = features.shape[1], weight.shape[0]
    lr_model = models.logistic_regression(f, C, bias=True, dtype=torch.float64)
    lr_model = model_with(lr_model, {"linear.weight": weight.double(), "linear.bias": bias.double()})
    params = "all" if include_bias else ["linear.weight"]
    res = predict_removal(lr_model, (features.double(), y.long()), (test_features.double(), test_y.long()),
                          params=params, l2=float(l2), include_l2_in_hessian=include_l2, method=method,
                          damping=float(damping), **solver_options)
    info = res.summary()
    info["n_zero"] = int(res.solve.info.get("n_zero", 0))
    return res.values, info


def softmax_layer_terms(features: Tensor, y: Tensor, weight: Tensor, bias: Tensor, *,
                        include_bias: bool = True, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """Per-sample gradients and the Hessian of a softmax layer on fixed features, for k models (float64).

    With a_i the features (and a trailing 1 when the bias is a parameter) and p_i the softmax outputs:
    g_i = (p_i − e_{y_i}) ⊗ a_i and H = (1/n) Σ_i (diag p_i − p_i p_iᵀ) ⊗ a_i a_iᵀ, the Hessian of the mean
    cross-entropy (no L2 term). Flat order: class-major, the bias last within each class.

    Args: features ``[k, n, f]``, y ``[n]`` or ``[k, n]``, weight ``[k, C, f]``, bias ``[k, C]``; ``dtype``
    float64 (default) or float32 (to reproduce the paper's single-precision arithmetic).
    Returns ``(g [k, n, d], H [k, d, d])`` with d = C·(f + 1) (C·f without the bias). Cost: O(k·n·d²).
    """
    phi = features.to(dtype)
    W, b = weight.to(dtype), bias.to(dtype)
    k, n, _ = phi.shape
    C = W.shape[1]
    y = torch.as_tensor(y).long()
    y = y.expand(k, -1) if y.dim() == 1 else y
    p = torch.softmax(phi @ W.transpose(1, 2) + b[:, None, :], dim=-1)
    a = torch.cat([phi, torch.ones_like(phi[..., :1])], -1) if include_bias else phi
    g = ((p - F.one_hot(y, C).to(dtype))[..., :, None] * a[..., None, :]).flatten(-2)
    fp = a.shape[-1]
    blocks = torch.einsum("kic,kij,kil->kcjl", p, a, a) / n  # diag(p) ⊗ a aᵀ, one block per class
    B = (p[..., :, None] * a[..., None, :]).flatten(-2)  # p ⊗ a per sample: the p pᵀ ⊗ a aᵀ part is BᵀB
    H = -(B.transpose(1, 2) @ B) / n
    for c in range(C):
        H[:, c * fp:(c + 1) * fp, c * fp:(c + 1) * fp] += blocks[:, c]
    return g, 0.5 * (H + H.transpose(1, 2))


def batched_last_layer_influence(features: Tensor, y: Tensor, test_features: Tensor, test_y: Tensor,
                                 weight: Tensor, bias: Tensor, l2: Tensor | Sequence[float], *,
                                 include_bias: bool = True, include_l2: bool = True, damping: float = 0.0,
                                 rcond: float | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """:func:`last_layer_influence` with ``method="pinv"`` for k models at once, in closed form (float64).

    Δ_pred[t, i] = (1/n) g_tᵀ (H + λI + δI)⁺ g_i with g, H from :func:`softmax_layer_terms` and the pseudo-inverse
    on eigenvalues above ``rcond`` (default 100·d·eps, as :mod:`helpers.solvers`) times the largest. The tests
    check it against :func:`helpers.influence.predict_removal` to round-off.

    Args: features ``[k, n, f]``, y ``[n]``, test_features ``[k, t, f]``, test_y ``[t]`` or ``[k, t]``,
    weight ``[k, C, f]``, bias ``[k, C]``, l2 ``[k]``. Returns ``(values [k, t, n], {"n_zero": [k]})``.
    Cost: k eigendecompositions of d = C·(f + 1) and O(k·n·d²) to build the Hessians.
    """
    k, n = features.shape[:2]
    lam = (torch.tensor(np.array(l2, dtype=np.float64)).reshape(k) if include_l2
           else torch.zeros(k, dtype=torch.float64))
    g, H = softmax_layer_terms(features, y, weight, bias, include_bias=include_bias)
    yt = torch.as_tensor(test_y).long()
    gt, _ = softmax_layer_terms(test_features, yt, weight, bias, include_bias=include_bias)
    d = H.shape[-1]
    vals, V = torch.linalg.eigh(H)
    shifted = vals + lam[:, None] + damping
    cut = (100.0 * d * torch.finfo(torch.float64).eps if rcond is None else rcond) * shifted.abs().amax(1, keepdim=True)
    keep = shifted.abs() > cut
    inv = torch.where(keep, 1.0 / torch.where(keep, shifted, torch.ones_like(shifted)), torch.zeros_like(shifted))
    x = V @ (inv[..., None] * (V.transpose(1, 2) @ gt.transpose(1, 2)))  # [k, d, t]
    values = (x.transpose(1, 2) @ g.transpose(1, 2)) / n
    return values, {"n_zero": (~keep).sum(1)}


def paper_inverse_influence(features: Tensor, y: Tensor, test_features: Tensor, test_y: Tensor, weight: Tensor,
                            bias: Tensor) -> tuple[Tensor, Tensor]:
    """The paper's own computation, reproduced: H of the mean cross-entropy in the last weight alone (no bias, no
    L2), in float32, inverted with ``torch.linalg.inv`` — a plain inverse of an exactly singular matrix
    (STUDY.md §3 item 5), so the result is whatever rounding leaves in its null space.

    Same shapes as :func:`batched_last_layer_influence`. Returns ``(values [k, t, n] float64, info [k])`` with
    info the LU status (non-zero: torch found an exactly zero pivot; those rows are NaN).
    """
    n = features.shape[1]
    g, H = softmax_layer_terms(features, y, weight, bias, include_bias=False, dtype=torch.float32)
    gt, _ = softmax_layer_terms(test_features, torch.as_tensor(test_y).long(), weight, bias, include_bias=False,
                                dtype=torch.float32)
    inv, info = torch.linalg.inv_ex(H)
    values = ((gt @ inv.transpose(1, 2)) @ g.transpose(1, 2)).double() / n
    values[info != 0] = float("nan")
    return values, info


def stack_hessian_spectra(stack: Stack, theta: Tensor, x: Tensor, y: Tensor, members: pd.DataFrame, *,
                          chunk_size: int = 8, var_floor: float = 1e-4, rtol: float = 1e-8) -> pd.DataFrame:
    """:func:`hessian_spectrum` of k stacked members, batched per architecture (float64).

    Members of the same depth and width are re-embedded into a stack of exactly their size (every coordinate
    active, so the stacked Hessian *is* the real model's) and their Hessians of the mean per-sample loss come from
    one ``vmap`` of ``torch.func.hessian``; ``torch.linalg.eigvalsh`` decomposes them in one batch. The L2 term
    enters as the shift λ (H = H_data + λI). Returns one row per member with the columns of
    :func:`hessian_spectrum`. Cost: d forward-over-reverse products per member, ``chunk_size`` members at a time.
    """
    theta = theta.double()
    xd = x.double()
    lam = members["l2"].to_numpy(np.float64) if not stack.bayesian else np.zeros(len(members))
    out: list[dict[str, Any] | None] = [None] * len(members)
    for (d_, w_), g in members.reset_index(drop=True).groupby(["depth", "width"], sort=False):
        d_, w_ = int(d_), int(w_)
        sub = Stack(stack.d_in, stack.n_classes, d_, w_, stack.bayesian, stack.activation)
        rows = g.index.to_numpy()
        th = torch.stack([sub.embed(stack.extract(theta[r], d_, w_), d_, w_) for r in rows])
        dm, um, _ = sub.masks(d_, w_, torch.float64)

        def f(t: Tensor) -> Tensor:
            return stack_member_losses(sub, t, xd, y, dm, um, var_floor).mean()

        with torch.no_grad():
            H = vmap(torch.func.hessian(f), chunk_size=chunk_size)(th)
        data = torch.linalg.eigvalsh(0.5 * (H + H.transpose(1, 2)))  # ascending, without the L2 term
        for r, ev in zip(rows, data):
            full = ev + lam[r]
            out[r] = {"top": float(full[-1]), "bottom": float(full[0]), "top_no_l2": float(ev[-1]),
                      "bottom_no_l2": float(ev[0]),
                      "neg_share": float((ev < -rtol * abs(float(ev[-1]))).double().mean()),
                      "neg_share_l2": float((full < -rtol * abs(float(full[-1]))).double().mean()),
                      "dim": int(ev.numel())}
    return pd.DataFrame(out)


def bnn_last_layer_influence(model: models.BayesianMLP, x: Tensor, y: Tensor, x_test: Tensor, y_test: Tensor, *,
                             damping: float = 1e-3, var_floor: float = 1e-4) -> tuple[Tensor, dict]:
    """The paper's Bayesian-network influence ``[n_test, n]``: last layer's *mean weights*, likelihood part only.

    Per-sample loss ℓ_i = fit_i + logdet_i (:func:`helpers.models.bayesian_per_sample_nll`, no KL), Hessian of
    its mean over the training set with respect to the flat mean weight μ_W of the last layer, plus damping δI
    (the paper: 1e-3); Δ_pred = (1/n) g_testᵀ (H + δI)⁻¹ g_i. The Hessian of this non-convex loss can be indefinite:
    the solve then falls back to the eigendecomposition and ``info["n_negative"]`` counts the negative directions.
    Float64. Cost: one dense Hessian of d = C·width, by ``torch.func.hessian``.
    """
    name = "layers.{}.mean.weight".format(len(model.layers) - 1)
    w0 = dict(model.named_parameters())[name].detach().double()
    model = model.double()

    def nll(flat: Tensor, xb: Tensor, yb: Tensor) -> Tensor:
        return models.bayesian_per_sample_nll(model, {name: flat.view_as(w0)}, xb, yb, var_floor=var_floor)

    flat = w0.reshape(-1)
    with torch.no_grad():
        H = torch.func.hessian(lambda t: nll(t, x.double(), y).mean())(flat)
        # per-sample gradients as the Jacobian of the loss vector (one_hot inside the loss cannot be vmapped)
        g_train = torch.func.jacrev(lambda t: nll(t, x.double(), y))(flat)
        g_test = torch.func.jacrev(lambda t: nll(t, x_test.double(), y_test))(flat)
    res = solve(0.5 * (H + H.T), g_test.T.contiguous(), method="exact", damping=float(damping), fallback="eig")
    values = (res.x.T @ g_train.T) / x.shape[0]
    eig = torch.linalg.eigvalsh(0.5 * (H + H.T))
    return values, {"method": res.method, "damping": float(damping), "max_relative_residual": res.max_relative_residual,
                    "n_negative": int((eig < 0).sum()), "hessian_min": float(eig[0]), "hessian_max": float(eig[-1])}


def hessian_spectrum(model: nn.Module, x: Tensor, y: Tensor, *, l2: float = 0.0, bayesian: bool = False,
                     var_floor: float = 1e-4, rtol: float = 1e-8) -> dict[str, float]:
    """Extreme eigenvalues of the Hessian over *all* parameters at the model's weights (float64, dense).

    Deterministic models: H of R(θ) = mean CE + (λ/2)‖θ‖² (:func:`helpers.curvature.hessian_operator`); the
    spectrum without the L2 term is the same shifted by −λ (H = H_data + λI), reported as ``*_no_l2``. Bayesian:
    H of the mean likelihood part (fit + logdet). Returns ``top``, ``bottom``, ``top_no_l2``, ``bottom_no_l2``,
    ``neg_share`` (share of eigenvalues of H_data below −rtol·|top|: how much negative curvature there is), ``dim``.
    The dense eigendecomposition is exact for these small models (d ≤ a few hundred); Lanczos
    (:func:`helpers.curvature.spectrum_summary`) gives the same extremes and is what large models use.
    Cost: d Hessian-vector products and one O(d³) eigendecomposition.
    """
    model = model.double()
    names = [n for n, _ in model.named_parameters()]
    params = {k: v.detach() for k, v in model.named_parameters()}
    if bayesian:
        shapes = [params[k].shape for k in names]
        sizes = [params[k].numel() for k in names]

        def f(flat: Tensor) -> Tensor:
            p = {k: t.view(s) for k, t, s in zip(names, flat.split(sizes), shapes)}
            return models.bayesian_per_sample_nll(model, p, x.double(), y, var_floor=var_floor).mean()

        with torch.no_grad():
            H = torch.func.hessian(f)(torch.cat([params[k].reshape(-1) for k in names]))
        lam = 0.0
    else:
        lam = float(l2)
        H = hessian_operator(model, params, x.double(), y, l2=lam).dense()
    vals = torch.linalg.eigvalsh(0.5 * (H + H.T)).double()
    data = vals - lam
    top = float(vals[-1])
    return {"top": top, "bottom": float(vals[0]), "top_no_l2": float(data[-1]), "bottom_no_l2": float(data[0]),
            "neg_share": float((data < -rtol * abs(float(data[-1]))).double().mean()),
            "neg_share_l2": float((vals < -rtol * abs(top)).double().mean()), "dim": int(vals.numel())}


def lanczos_check(model: nn.Module, x: Tensor, y: Tensor, *, l2: float) -> dict[str, float]:
    """Top and bottom eigenvalue of the same Hessian by Lanczos (:func:`helpers.curvature.spectrum_summary`), to
    check :func:`hessian_spectrum`'s dense values on a sample of models."""
    model = model.double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    # a few dozen products: tracing the product (linearize) would cost more than it saves here
    s = spectrum_summary(hessian_operator(model, params, x.double(), y, l2=float(l2), linearize=False),
                         method="lanczos")
    return {"top": s.top, "bottom": s.bottom}
