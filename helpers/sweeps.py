"""The seed paper's non-convex experiments as functions (chapter 2, STUDY.md §3).

Iris (the paper's Figs. 1 and 3)
--------------------------------
The protocol of Epifano et al. (2023), read from their code: one test point (the one with the highest
leave-one-out loss, :func:`iris_loo_losses`), the other 149 points standardised on themselves; an MLP trained by
full-batch Adam (lr 1e-3, ÷10 after 100 epochs without improvement) in one of five *regimes* (:data:`REGIMES`);
the 25 training points with the highest training loss as candidates; the influence estimate from the exact
Hessian of the last layer; the ground truth by warm-started retraining without each candidate (fresh Adam, all
layers — or, the paper's unpublished variant, only the last layer); Spearman per run, over repetitions.

The repetitions, depths/widths and regimes of one sweep train as **one vectorised ensemble**: every member is a
slice of a *stacked* network (:class:`Stack`) as deep and as wide as the largest setting, with its own depth
(deeper layers skipped exactly: ``torch.where`` passes the input through), width (surplus units held at exactly
zero: zero weights get exactly zero gradient) and L2 coefficient λ (in the member's auxiliary data, so the
regimes with and without weight decay share one run). A member starts from the very initial weights
``helpers.models.mlp(..., depth, width)`` draws for its seed (:meth:`Stack.embed`), follows the trajectory that
model would follow on its own up to floating-point round-off, and is extracted back into that model for
influence and curvature (:meth:`Stack.extract`). All 25 + 1 retrainings of every member run as one more ensemble
(:func:`retrain_stack`), the last-layer variant as a batched logistic regression on frozen features
(:func:`retrain_last_layer`).

Larger models (the paper's Fig. 2)
----------------------------------
:func:`run_deep`: an ensemble of models on an image set, the maximum-loss test point, last-layer influence
(exact, and LiSSA with the paper's damping and scale), the 40 points with the largest |estimate|, last-layer
warm-start fine-tuning; optionally all-parameter influence (CG) and all-layer warm-start retraining.

Conventions: every estimate is ``helpers.influence``'s Δ_pred (predicted change in test loss when the point is
removed, in nats, positive = the point helped), every truth the change of test loss after retraining minus
before, and every protocol reports its *drift*: the same retraining with nothing removed.

Results are tidy :class:`pandas.DataFrame` s and are memoised with :func:`helpers.cache.memoize`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import scipy.stats as st
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, grad_and_value, vmap

from helpers import data as data_mod
from helpers import models
from helpers.cache import memoize
from helpers.curvature import CurvatureOperator, extreme_eigenvalues, hessian_operator, spectrum_summary
from helpers.influence import per_sample_grads, predict_removal
from helpers.objective import param_names, removal_weights
from helpers.solvers import solve
from helpers.train import (EnsembleResult, MemberObjective, Recipe, fit_ensemble, floor_bound, model_with,
                           train_ensemble)

__all__ = [
    "REGIMES", "Regime", "IrisData", "Stack", "StackFit", "Retrained", "IrisSweepConfig", "IrisSweepResult",
    "DeepConfig", "DeepResult", "iris_data",
    "iris_loo_losses", "stack_objective", "stack_losses", "stack_features", "fit_stack", "retrain_stack",
    "retrain_last_layer", "retraining_curve", "last_layer_influence", "softmax_layer_terms",
    "batched_last_layer_influence", "paper_inverse_influence", "bnn_last_layer_influence", "hessian_spectrum",
    "stack_hessian_spectra", "lanczos_check", "run_iris_chunk", "run_iris_sweeps", "floor_table",
    "full_length_check", "full_length_tasks", "compare_full_length", "member_retraining_curve", "summarize_runs",
    "compare_bars", "regime_gap", "tag_runs", "difference_reasons", "setting_mean_ci", "FLATTER", "run_deep",
]


# ============================================================================================ correlations


def _corr_rows(est: np.ndarray, true: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise signed (Spearman, Pearson) of ``[k, m]`` arrays; NaN for a constant row."""
    est, true = np.asarray(est, float), np.asarray(true, float)
    ok = (np.ptp(est, axis=1) > 0) & (np.ptp(true, axis=1) > 0)
    sp = np.full(est.shape[0], np.nan)
    pe = np.full(est.shape[0], np.nan)
    if ok.any():
        pe[ok] = st.pearsonr(est[ok], true[ok], axis=1).statistic
        sp[ok] = st.pearsonr(st.rankdata(est[ok], axis=1), st.rankdata(true[ok], axis=1), axis=1).statistic
    return sp, pe


# ============================================================================================ regimes and data


@dataclass(frozen=True)
class Regime:
    """A training regime of the Iris sweeps: L2 coefficient λ (coupled, in the objective), SWA, Bayesian net."""

    l2: float = 0.0
    swa: bool = False
    bayesian: bool = False


#: The paper's five regimes (Fig. 1): weight decay 0.005 or none, each with and without SWA over the last 25 %
#: of training, and the mean/variance-propagation network (no weight decay, tanh).
REGIMES: dict[str, Regime] = {
    "nol2": Regime(0.0, False, False),
    "l2": Regime(0.005, False, False),
    "nol2_swa": Regime(0.0, True, False),
    "l2_swa": Regime(0.005, True, False),
    "bnn": Regime(0.0, False, True),
}


@dataclass(frozen=True, eq=False)
class IrisData(data_mod.TrainTest):
    """The paper's Iris split: one test point, the other 149 standardised on themselves (StandardScaler).

    ``x_train [149, 4]``, ``y_train [149]``, ``x_test [1, 4]``, ``y_test [1]``; ``idx_train`` the dataset index of
    every training row (the test index removed); float64.
    """

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    idx_train: Tensor
    test_index: int


def _iris_raw() -> tuple[Tensor, Tensor]:
    split = data_mod.load("iris", seed=0, test_fraction=0.0, standardize=False)
    order = torch.argsort(split.idx_train)  # scikit-learn's order, so that index 83 is the paper's 83
    return split.x_train[order].double(), split.y_train[order]


def iris_data(test_index: int) -> IrisData:
    """The Iris split of the paper for one held-out test point (0–149 in scikit-learn's order)."""
    x, y = _iris_raw()
    n = x.shape[0]
    if not 0 <= int(test_index) < n:
        raise ValueError(f"test_index must lie in [0, {n}), got {test_index}")
    keep = torch.tensor([i for i in range(n) if i != int(test_index)])
    mean = x[keep].mean(0)
    std = x[keep].std(0, correction=0)  # population std, as sklearn's StandardScaler
    z = (x - mean) / std
    return IrisData(z[keep], y[keep], z[int(test_index):int(test_index) + 1], y[int(test_index):int(test_index) + 1],
                    keep, int(test_index))


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


def _stack_member_losses(stack: Stack, theta: Tensor, x: Tensor, y: Tensor, dmask: Tensor, umask: Tensor,
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
    return vmap(lambda t, d, u: _stack_member_losses(stack, t, x, y, d, u, var_floor))(theta, dmask, umask)


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


@dataclass
class Retrained:
    """Warm-started leave-one-out retraining of k members, m removals each, plus one drift run per member.

    Attributes:
        delta: ``[k, m]`` Δ_true = ℓ(z_test, θ₋ᵢ) − ℓ(z_test, θ̂) (nats; positive: removing i raised the test loss).
        drift: ``[k]`` the same retraining with nothing removed, minus ℓ(z_test, θ̂): what the protocol does by itself.
        ref_loss: ``[k]`` ℓ(z_test, θ̂); grad_norm ``[k, m + 1]`` final ‖∇‖ of every retraining (drift last).
        removed: ``[k, m]`` training indices; protocol: ``"all_layers"`` or ``"last_layer"``; recipe.
        floor_epoch, epochs_run: ``[k, m + 1]`` per retraining, the epoch its plateau lr reached the floor (-1:
            never) and the epochs computed (:attr:`helpers.train.Recipe.stop_at_floor`); lr ``[k, m + 1]`` final.
    """

    delta: np.ndarray
    drift: np.ndarray
    ref_loss: np.ndarray
    grad_norm: np.ndarray
    removed: np.ndarray
    protocol: str
    recipe: dict[str, Any]
    floor_epoch: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=np.int64))
    epochs_run: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=np.int64))
    lr: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))


def _removal_rows(n: int, removed: np.ndarray, loo: str, dtype: torch.dtype) -> Tensor:
    """``[k·(m+1), n]``: for each member its m leave-one-out weight rows, then its drift row."""
    return torch.cat([removal_weights(n, [int(i) for i in row] + [-1], loo, dtype=dtype) for row in removed])


def _chunks(k: int, per_member: int, max_members: int) -> list[slice]:
    step = max(1, max_members // per_member)
    return [slice(s, min(k, s + step)) for s in range(0, k, step)]


def retrain_stack(fit: StackFit, x: Tensor, y: Tensor, test: tuple[Tensor, Tensor], removed: np.ndarray,
                  recipe: Recipe, *, loo: str = "reaverage", var_floor: float = 1e-4, max_members: int = 4096,
                  progress: bool = False, also_last: bool = False) -> Retrained | tuple[Retrained, Retrained]:
    """All-layer warm-start retraining of every member without each of its ``removed`` points, and once without
    removing anything (drift), as ensembles of at most ``max_members`` members.

    Each retraining starts at the member's θ̂ with a fresh optimizer (the recipe: the paper's fresh Adam, 7,500
    epochs, SWA if the regime averages) and minimises the member's objective with the point's weight set to zero
    (``loo="reaverage"``: the others 1/(n−1), the paper's ``np.delete``; ``"drop"``: they keep 1/n). The test
    loss of θ̂ is evaluated by the same kernel as the members', so a member that does not move has drift 0.

    Args:
        removed: ``[k, m]`` training indices per member. test: ``(x_t [1, d], y_t [1])``, the shared test point.
        also_last: with an SWA recipe, also return the retraining *without* averaging (its last iterates: SWA
            does not change the trajectory), as a second :class:`Retrained` with the SWA-free recipe.
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
    results = tuple(Retrained(*out[v], removed, "all_layers",
                              (recipe if v == "params" else recipe.replace(swa_start=None)).to_dict(), fe, er, lr)
                    for v in views)
    return results if also_last else results[0]


def _stack_grad_norms(objective: MemberObjective, theta: Tensor, aux: tuple, x: Tensor, y: Tensor) -> np.ndarray:
    """``[k]`` ‖∇R‖₂ of each member of a stacked θ ``[k, size]`` under its own aux (full batch)."""
    g, _ = vmap(grad_and_value(objective), in_dims=(0, 0, None, None, None, None))({"theta": theta}, aux, x, y,
                                                                                 None, 1.0)
    return g["theta"].double().pow(2).sum(1).sqrt().numpy()


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
                       progress: bool = False) -> Retrained:
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
    return Retrained(delta, drift, ref, gn, removed, "last_layer", recipe.to_dict(), fe, er, lr)


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
            return _stack_member_losses(sub, t, xd, y, dm, um, var_floor).mean()

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


# ============================================================================================ the Iris protocol


def iris_loo_losses(seeds: Sequence[int], *, depth: int = 1, width: int = 5, l2: float = 0.005,
                    epochs: int = 1000, dtype: str = "float32", progress: bool = False,
                    cache: bool = True) -> pd.DataFrame:
    """Leave-one-out test loss of every Iris point, for several initialisation seeds (the paper's test-point choice).

    For each point j: standardise the other 149 on themselves, train the paper's network (``models.mlp`` SELU,
    Adam lr 1e-3, coupled weight decay ``l2``, ÷10 after 100 stalled epochs; the paper's ``find_max_loss``:
    width 5, depth 1, 1,000 epochs) without j, and record the cross-entropy of j. All 150 × len(seeds) fits run
    as one ensemble (each member with its own standardised inputs and a zero weight on its held-out point).

    Returns a long table (``seed``, ``index``, ``loss``); the paper's test point is the argmax (it reports 83).
    Memoised (:func:`helpers.cache.memoize`) unless ``cache=False``.
    """
    key = {"seeds": [int(s) for s in seeds], "depth": depth, "width": width, "l2": float(l2), "epochs": epochs,
           "dtype": dtype}
    if cache:
        return memoize("iris_loo", key, lambda: iris_loo_losses(seeds, depth=depth, width=width, l2=l2, epochs=epochs,
                                                                 dtype=dtype, progress=progress, cache=False))
    x, y = _iris_raw()
    n = x.shape[0]
    seeds = [int(s) for s in seeds]
    xs, ws = [], []
    for j in range(n):
        d = iris_data(j)
        z = torch.empty_like(x)
        z[d.idx_train] = d.x_train
        z[j] = d.x_test[0]
        xs.append(z)
        w = torch.full((n,), 1.0 / (n - 1), dtype=torch.float64)
        w[j] = 0.0
        ws.append(w)
    x_members = torch.stack(xs).repeat(len(seeds), 1, 1)
    weights = torch.stack(ws).repeat(len(seeds), 1)
    members = pd.DataFrame({"depth": depth, "width": width, "l2": l2,
                            "seed": np.repeat(seeds, n), "index": np.tile(np.arange(n), len(seeds))})
    stack = Stack(4, 3, depth, width)
    recipe = Recipe(optimizer="adam", lr=1e-3, epochs=epochs, schedule="plateau", patience=100, dtype=dtype)
    fit = fit_stack(stack, members, x, y, recipe, weights=weights, x_members=x_members, progress=progress)
    dmask, umask, _ = fit.masks
    theta = fit.theta.double()
    losses = vmap(lambda t, xm, d, u: _stack_member_losses(stack, t, xm, y, d, u, 1e-4))(
        theta, x_members.double(), dmask.double(), umask.double())
    idx = torch.as_tensor(members["index"].to_numpy().copy())
    return pd.DataFrame({"seed": members["seed"], "index": members["index"],
                         "loss": losses[torch.arange(len(members)), idx].numpy()})


@dataclass(frozen=True)
class IrisSweepConfig:
    """Everything that defines the Iris sweeps (the paper's settings are the defaults).

    Attributes:
        depths: hidden layers of the depth sweep (width 5); widths: units of the width sweep (depth 1).
        depth_regimes, width_regimes: regimes (keys of :data:`REGIMES`) run in each sweep.
        last_layer_regimes: regimes whose members are also retrained on the last layer only (the paper's
            unpublished ``l2_toplayer`` variant; cheap: a logistic regression on frozen features).
        reps: repetitions (random initialisations) per setting.
        epochs, retrain_epochs: training and retraining lengths (the paper: 60,000 and 7,500).
        n_candidates: training points with the highest training loss (the paper's code: 25).
        test_index: the held-out Iris point (the paper's: 83, the highest leave-one-out loss).
        swa_start: fraction of training after which SWA averages (0.75: the last 25 %).
        loo: leave-one-out objective of the retraining (``"reaverage"``: the paper deletes the point).
        dtype: training dtype (the paper's: float32; influence and curvature are float64). A member's float32
            trajectory does not depend on the other members of its ensemble (no batch of one is ever computed:
            :func:`helpers.train._batched_call`), so a stored member can be recomputed on its own. float64 is
            not the protocol: the plateau schedule fires later for the networks without weight decay.
        seed: first initialisation seed (repetition r uses ``seed + r``).
        bnn_damping: damping of the Bayesian network's influence (the paper: 1e-3).
        max_members: largest retraining ensemble (memory).
        stop_at_floor: stop each training and retraining once its plateau learning rate is at the floor (1e-8);
            the protocol's lengths stay ``epochs`` / ``retrain_epochs`` (:attr:`helpers.train.Recipe.stop_at_floor`
            and :func:`helpers.train.floor_bound`: what the skipped epochs could have changed is recorded).
    """

    depths: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8)
    widths: tuple[int, ...] = (8, 14, 20, 30, 40, 50)
    depth_regimes: tuple[str, ...] = ("nol2", "l2", "nol2_swa", "l2_swa", "bnn")
    width_regimes: tuple[str, ...] = ("nol2", "l2", "nol2_swa", "l2_swa", "bnn")
    last_layer_regimes: tuple[str, ...] = ("l2",)
    reps: int = 50
    epochs: int = 60000
    retrain_epochs: int = 7500
    n_candidates: int = 25
    test_index: int = 83
    swa_start: float = 0.75
    loo: str = "reaverage"
    dtype: str = "float32"
    seed: int = 0
    lr: float = 1e-3
    patience: int = 100
    bnn_damping: float = 1e-3
    depth_width: int = 5
    max_members: int = 4096
    stop_at_floor: bool = True

    def __post_init__(self) -> None:
        for name in ("depth_regimes", "width_regimes", "last_layer_regimes"):
            bad = [r for r in getattr(self, name) if r not in REGIMES]
            if bad:
                raise ValueError(f"{name} has unknown regimes {bad}: use {list(REGIMES)}")
        if any(REGIMES[r].bayesian for r in self.last_layer_regimes):
            raise ValueError("the last-layer protocol is for deterministic regimes; remove 'bnn' from last_layer_regimes")
        if self.reps < 1 or self.epochs < 1 or self.retrain_epochs < 1:
            raise ValueError("reps, epochs and retrain_epochs must be >= 1")
        if self.n_candidates < 3:
            raise ValueError(f"n_candidates must be >= 3 (a correlation needs three points), got {self.n_candidates}")

    def recipe(self, epochs: int, swa: bool) -> Recipe:
        """The paper's optimiser: full-batch Adam, ÷10 after ``patience`` stalled epochs (λ is per member)."""
        return Recipe(optimizer="adam", lr=self.lr, epochs=int(epochs), schedule="plateau", patience=self.patience,
                      swa_start=self.swa_start if swa else None, dtype=self.dtype, stop_at_floor=self.stop_at_floor)

    def chunks(self, block: int | None = None) -> list[dict[str, Any]]:
        """The independent pieces of the sweeps: one per (sweep, family, depth or width, block of ``block``
        repetitions).

        Each is a dict of keyword arguments of :func:`run_iris_chunk` (without the config) and carries its own
        seeds (repetition r uses ``seed + r``), so a chunk computes the same numbers wherever it runs. A chunk is
        also the unit of exact recomputation: float32 rounding depends on the batch a member is computed in
        (torch's batched kernels block differently for different batch sizes), so a member's numbers are
        reproduced exactly by recomputing its chunk, not by computing it alone.
        """
        block = self.reps if block is None else int(block)
        if block < 1:
            raise ValueError(f"block must be >= 1 repetitions, got {block}")
        return [{"sweep": s, "family": f, "values": [v], "rep_start": r, "rep_stop": min(self.reps, r + block)}
                for s, f in self.groups() for v in (self.depths if s == "depth" else self.widths)
                for r in range(0, self.reps, block)]

    def groups(self) -> list[tuple[str, str]]:
        """``(sweep, family)`` groups that train as one ensemble: family ``plain`` (with and without weight decay,
        each with and without SWA: averaging does not change the trajectory, so the SWA regimes share the training
        of their plain twins) or ``bnn``."""
        out = []
        for sweep, regimes in (("depth", self.depth_regimes), ("width", self.width_regimes)):
            for family in ("plain", "bnn"):
                if any(_family(r) == family for r in regimes):
                    out.append((sweep, family))
        return out


def _family(regime: str) -> str:
    return "bnn" if REGIMES[regime].bayesian else "plain"


@dataclass
class IrisSweepResult:
    """Tidy results of :func:`run_iris_sweeps` (one group or all).

    Attributes:
        runs: one row per (sweep, regime, value, rep, protocol, estimator): signed ``spearman`` / ``pearson``,
            ``drift``, ``delta_mean``, ``delta_sd``, ``drift_ratio`` = |drift| / sd(Δ_true), ``retrain_grad_norm``.
        models: one row per trained model (sweep, regime, value, rep): training loss, ‖∇R‖, accuracy, final lr,
            test loss, Hessian spectrum (``top``, ``top_no_l2``, ``bottom``, ``neg_share``), solver diagnostics.
        points: one row per (model, candidate): the estimates and the truths (the scatter plots).
        history: the training loss curves, mean and quantiles over repetitions per setting, at ~200 epochs.
        lanczos: dense vs Lanczos top/bottom eigenvalue for a sample of models (a check of the spectrum).
        full_check: :func:`full_length_check`'s table when :func:`run_iris_sweeps` was asked for it.
    """

    runs: pd.DataFrame
    models: pd.DataFrame
    points: pd.DataFrame
    history: pd.DataFrame
    lanczos: pd.DataFrame = field(default_factory=pd.DataFrame)
    full_check: pd.DataFrame = field(default_factory=pd.DataFrame)

    @staticmethod
    def concat(parts: Sequence["IrisSweepResult"]) -> "IrisSweepResult":
        return IrisSweepResult(*(pd.concat([getattr(p, f.name) for p in parts], ignore_index=True)
                                 for f in dataclasses.fields(IrisSweepResult)))


def _history_frame(members: pd.DataFrame, history: np.ndarray, n_points: int = 200) -> pd.DataFrame:
    epochs = history.shape[1]
    at = np.unique(np.round(np.geomspace(1, epochs, n_points)).astype(int)) - 1
    rows = []
    for (sweep, regime, value), g in members.groupby(["sweep", "regime", "value"], sort=True):
        h = history[g.index.to_numpy()][:, at]
        for e, col in zip(at, h.T):
            rows.append({"sweep": sweep, "regime": regime, "value": int(value), "epoch": int(e) + 1,
                         "loss_mean": float(col.mean()), "loss_low": float(np.quantile(col, 0.1)),
                         "loss_high": float(np.quantile(col, 0.9))})
    return pd.DataFrame(rows)


def run_iris_chunk(config: IrisSweepConfig, sweep: str, family: str, rep_start: int = 0, rep_stop: int | None = None,
                   *, values: Sequence[int] | None = None, regimes: Sequence[str] | None = None,
                   progress: bool = False, cache: bool = True) -> IrisSweepResult:
    """One piece of the Iris sweeps: one sweep, one regime family, repetitions ``rep_start .. rep_stop - 1``
    (e.g. the depth sweep's ``plain`` regimes, no L2 and L2 together, repetitions 0–4).

    Steps (the paper's protocol, STUDY.md §3): train every (regime, value, rep) member; per member pick the
    ``n_candidates`` highest training losses; estimate their influence on the test point from the last layer
    (paper variant: weight only, no L2, pseudo-inverse; objective variant: weight and bias, the objective's L2
    term; Bayesian: mean weights, likelihood part, damping); the Hessian spectrum over all parameters; retrain all
    layers from θ̂ without each candidate (and once without removing anything: drift); for the regimes in
    ``last_layer_regimes`` also retrain only the last layer. Memoised on ``(config, sweep, family, reps)``.
    ``values`` and ``regimes`` narrow the chunk (by default every value and regime of the sweep runs); the
    stack (the shared network shape) is sized to the chunk's values. In float32 a member's numbers depend on
    the batch it is computed in, so they are reproduced exactly only by the same chunk.
    """
    rep_stop = config.reps if rep_stop is None else int(rep_stop)
    if not 0 <= rep_start < rep_stop <= config.reps:
        raise ValueError(f"repetitions [{rep_start}, {rep_stop}) must lie in [0, reps={config.reps})")
    key = {"config": dataclasses.asdict(config), "sweep": sweep, "family": family, "reps": [rep_start, rep_stop],
           "values": None if values is None else list(values), "regimes": None if regimes is None else list(regimes)}
    compute = lambda: _run_iris_chunk(config, sweep, family, rep_start, rep_stop, progress, values,  # noqa: E731
                                      regimes)
    return memoize("iris_chunk", key, compute) if cache else compute()


def _run_iris_chunk(config: IrisSweepConfig, sweep: str, family: str, rep_start: int, rep_stop: int,
                    progress: bool, only_values: Sequence[int] | None = None,
                    only_regimes: Sequence[str] | None = None) -> IrisSweepResult:
    if sweep not in ("depth", "width"):
        raise ValueError(f"sweep must be 'depth' or 'width', got {sweep!r}")
    regimes = [r for r in (config.depth_regimes if sweep == "depth" else config.width_regimes) if _family(r) == family]
    if not regimes:
        raise ValueError(f"no {family} regimes in the {sweep} sweep of this config")
    values = list(config.depths if sweep == "depth" else config.widths)
    largest = max(values)  # the sweep's largest setting (where the Lanczos check runs)
    bayes = family == "bnn"
    for name, subset, full in (("values", only_values, values), ("regimes", only_regimes, regimes)):
        if subset is not None and (not subset or not set(subset) <= set(full)):
            raise ValueError(f"{name} {list(subset)} must be a non-empty subset of this chunk's {full}")
    values = values if only_values is None else [v for v in values if v in set(only_values)]
    regimes = regimes if only_regimes is None else [r for r in regimes if r in set(only_regimes)]
    stack = (Stack(4, 3, max(values), config.depth_width, bayes, "selu") if sweep == "depth"
             else Stack(4, 3, 1, max(values), bayes, "selu"))
    rows = [{"sweep": sweep, "regime": r, "value": v, "rep": rep,
             "depth": v if sweep == "depth" else 1, "width": config.depth_width if sweep == "depth" else v,
             "l2": REGIMES[r].l2, "seed": config.seed + rep}
            for r in regimes for v in values for rep in range(rep_start, rep_stop)]
    members = pd.DataFrame(rows)
    d = iris_data(config.test_index)
    x, y = d.train
    n = x.shape[0]
    swa = members["regime"].map(lambda r: REGIMES[r].swa).to_numpy()
    train_recipe = config.recipe(config.epochs, bool(swa.any()))
    fit = _fit_shared(stack, members, swa, x, y, train_recipe, progress)
    dmask, umask, amask = (m.double() for m in fit.masks)
    theta = fit.theta.double()
    train_losses = stack_losses(stack, theta, x, y, dmask, umask)  # [k, n], float64
    test_losses = stack_losses(stack, theta, d.x_test, d.y_test, dmask, umask)[:, 0]
    candidates = torch.argsort(train_losses, dim=1, descending=True)[:, :config.n_candidates].numpy()
    k = len(members)

    # --- estimates (per architecture, batched over its members) and Hessian spectra, float64
    est: dict[str, np.ndarray] = {}
    info = pd.DataFrame(index=range(k))
    if bayes:
        est["bnn"] = np.zeros((k, n))
        for j in range(k):
            depth, width = int(members.at[j, "depth"]), int(members.at[j, "width"])
            real = model_with(stack.build(depth, width), stack.extract(theta[j], depth, width))
            vals, inf = bnn_last_layer_influence(real, x, y, d.x_test, d.y_test, damping=config.bnn_damping)
            est["bnn"][j] = vals[0].numpy()
            for a in ("max_relative_residual", "n_negative", "hessian_min", "hessian_max"):
                info.loc[j, f"bnn_{a}"] = inf[a]
    else:
        feats = stack_features(stack, theta, x, dmask, umask)
        feats_t = stack_features(stack, theta, d.x_test, dmask, umask)
        out = stack.split(theta)
        for width, g in members.groupby("width", sort=False):
            rows = torch.as_tensor(g.index.to_numpy().copy())
            w_ = int(width)
            args = (feats[rows][:, :, :w_], y, feats_t[rows][:, :, :w_], d.y_test, out["out.weight"][rows][:, :, :w_],
                    out["out.bias"][rows], g["l2"].to_numpy())
            for name, kw in (("paper", dict(include_bias=False, include_l2=False)),
                             ("objective", dict(include_bias=True, include_l2=True))):
                vals, inf = batched_last_layer_influence(*args, **kw)
                est.setdefault(name, np.zeros((k, n)))[g.index.to_numpy()] = vals[:, 0].numpy()
                info.loc[g.index, f"{name}_n_zero"] = inf["n_zero"].numpy()
            # the paper's float32 plain inverse, from θ̂ in float32 (the paper trained in float32). The inverse of a
            # singular matrix is rounding noise, so this estimate alone depends on the batch it is computed in.
            th32, m32 = fit.theta[rows].float(), [mk[rows].float() for mk in fit.masks[:2]]
            f32 = stack_features(stack, th32, x.float(), *m32)
            f32_t = stack_features(stack, th32, d.x_test.float(), *m32)
            sp32 = stack.split(th32)
            vals, lu = paper_inverse_influence(f32[:, :, :w_], y, f32_t[:, :, :w_], d.y_test,
                                               sp32["out.weight"][:, :, :w_], sp32["out.bias"])
            est.setdefault("paper_inv32", np.zeros((k, n)))[g.index.to_numpy()] = vals[:, 0].numpy()
            info.loc[g.index, "inv32_lu_status"] = lu.numpy()
    info = pd.concat([info, stack_hessian_spectra(stack, theta, x, y, members)], axis=1)
    first = members[(members["rep"] == 0) & (members["value"] == largest)].index[:1]
    lanczos_rows = []
    if not bayes:
        for j in first:
            depth, width, lam = int(members.at[j, "depth"]), int(members.at[j, "width"]), float(members.at[j, "l2"])
            real = model_with(stack.build(depth, width), stack.extract(theta[j], depth, width))
            lz = lanczos_check(real, x, y, l2=lam)
            lanczos_rows.append({"sweep": sweep, "regime": members.at[j, "regime"], "value": int(members.at[j, "value"]),
                                 "dense_top": info.at[j, "top"], "lanczos_top": lz["top"],
                                 "dense_bottom": info.at[j, "bottom"], "lanczos_bottom": lz["bottom"]})

    # --- ground truths
    truths = {"all_layers": _retrain_shared(fit, swa, x, y, d.test, candidates, config, progress)}
    last_idx = np.flatnonzero(members["regime"].isin(config.last_layer_regimes).to_numpy())
    if not bayes and last_idx.size:
        sub = torch.as_tensor(last_idx)
        sp = stack.split(fit.theta[sub])  # θ̂ in the training dtype, as the all-layer retraining starts from
        f32 = stack_features(stack, fit.theta[sub], x.to(fit.theta.dtype), fit.masks[0][sub], fit.masks[1][sub])
        f32_t = stack_features(stack, fit.theta[sub], d.x_test.to(fit.theta.dtype), fit.masks[0][sub], fit.masks[1][sub])
        lt = retrain_last_layer(f32, y, sp["out.weight"], sp["out.bias"], members["l2"].to_numpy()[last_idx],
                                f32_t[:, 0], d.y_test.repeat(len(last_idx)), candidates[last_idx],
                                config.recipe(config.retrain_epochs, False),
                                loo=config.loo, max_members=config.max_members, progress=progress)
        truths["last_layer"] = lt

    # --- tidy tables
    labels = members[["sweep", "regime", "value", "rep"]]
    acc = (vmap(lambda t, dm, um: stack.forward(t, x, dm, um) if not bayes else stack.forward(t, x, dm, um).logit_mean)(
        theta, dmask, umask).argmax(-1) == y).double().mean(1).numpy()
    skipped = floor_bound(train_recipe, fit.epochs_run, fit.lr)
    model_tab = pd.concat([labels, pd.DataFrame({
        "train_loss": fit.loss, "grad_norm": fit.grad_norm, "final_lr": fit.lr, "train_acc": acc,
        "test_loss": test_losses.numpy(), "mean_candidate_loss": np.take_along_axis(
            train_losses.numpy(), candidates, 1).mean(1),
        "floor_epoch": fit.floor_epoch, "epochs_run": fit.epochs_run, "floor_bound_param": skipped,
        "floor_bound_nats": skipped * _test_grad_l1(stack, theta, d.x_test, d.y_test, dmask, umask)}), info], axis=1)
    run_rows, point_rows = [], []
    for protocol, truth in truths.items():
        idx = np.arange(k) if protocol == "all_layers" else last_idx
        for name, values in est.items():
            e = np.take_along_axis(values[idx], candidates[idx], 1)
            sp_, pe_ = _corr_rows(e, truth.delta)
            sd = truth.delta.std(1)
            run_rows.append(pd.concat([labels.iloc[idx].reset_index(drop=True), pd.DataFrame({
                "protocol": protocol, "estimator": name, "spearman": sp_, "pearson": pe_,
                "drift": truth.drift, "delta_mean": truth.delta.mean(1), "delta_sd": sd,
                "drift_ratio": np.abs(truth.drift) / np.where(sd > 0, sd, np.nan),
                "retrain_grad_norm": np.median(truth.grad_norm, 1),
                "retrain_floor_median": np.median(np.where(truth.floor_epoch < 0, np.nan, truth.floor_epoch), 1),
                "retrain_floor_max": truth.floor_epoch.max(1), "retrain_no_floor": (truth.floor_epoch < 0).sum(1),
                "retrain_epochs_run_max": truth.epochs_run.max(1)})], axis=1))
        m_ = candidates.shape[1]
        pts = labels.iloc[np.repeat(idx, m_)].reset_index(drop=True)
        pts["protocol"] = protocol
        pts["candidate"] = d.idx_train.numpy()[candidates[idx].reshape(-1)]
        pts["delta"] = truth.delta.reshape(-1)
        pts["drift"] = np.repeat(truth.drift, m_)
        for name, values in est.items():
            pts[f"est_{name}"] = np.take_along_axis(values[idx], candidates[idx], 1).reshape(-1)
        point_rows.append(pts)
    runs = pd.concat(run_rows, ignore_index=True)
    for col in ("spearman", "pearson"):
        runs[f"abs_{col}"] = runs[col].abs()
    return IrisSweepResult(runs, model_tab, pd.concat(point_rows, ignore_index=True), _history_frame(members, fit.history),
                           pd.DataFrame(lanczos_rows))


def _fit_shared(stack: Stack, members: pd.DataFrame, swa: np.ndarray, x: Tensor, y: Tensor, recipe: Recipe,
                progress: bool) -> StackFit:
    """Train each distinct (depth, width, λ, seed) once — with SWA tracked when any member averages — and give
    every member row its θ̂: the average for SWA regimes, the last iterate for the others (same trajectory)."""
    keys = ["depth", "width", "l2", "seed"]
    distinct = members.drop_duplicates(keys).reset_index(drop=True)
    row = members.merge(distinct.reset_index()[keys + ["index"]], on=keys, how="left")["index"].to_numpy()
    fit = fit_stack(stack, distinct, x, y, recipe, progress=progress)
    rows = torch.as_tensor(row.copy())
    last = fit.theta if fit.last is None else fit.last
    sel = torch.as_tensor(swa.copy())[:, None]
    theta = torch.where(sel, fit.theta[rows], last[rows])
    aux = tuple(a[rows] for a in fit.aux)
    loss, gn = fit.loss[row].copy(), fit.grad_norm[row].copy()
    if fit.last is not None and (~swa).any():
        # the objective and gradient of the plain members are those at the last iterate, not at the average
        plain = np.flatnonzero(~swa)
        objective = stack_objective(stack)
        sub_aux = tuple(a[plain] for a in aux)
        g, val = vmap(grad_and_value(objective), in_dims=(0, 0, None, None, None, None))(
            {"theta": theta[plain]}, sub_aux, x.to(theta.dtype), y.long(), None, 1.0)
        loss[plain] = val.double().numpy()
        gn[plain] = g["theta"].double().pow(2).sum(1).sqrt().numpy()
    return StackFit(stack, members.reset_index(drop=True), theta, aux, loss, gn, fit.lr[row], fit.history[row],
                    fit.recipe, fit.floor_epoch[row], fit.epochs_run[row], None)


def _retrain_shared(fit: StackFit, swa: np.ndarray, x: Tensor, y: Tensor, test: tuple[Tensor, Tensor],
                    candidates: np.ndarray, config: IrisSweepConfig, progress: bool) -> Retrained:
    """All-layer warm-start retraining of every member, SWA regimes with the SWA recipe. A plain member and its
    SWA twin that start from the same θ̂ (bit for bit: the floor came before averaging began) are retrained once,
    with SWA tracked: the last iterates are the plain retraining, the average the SWA one."""
    plain_recipe = config.recipe(config.retrain_epochs, False)
    swa_recipe = config.recipe(config.retrain_epochs, True)
    k, m = candidates.shape
    keys = ["depth", "width", "l2", "seed"]
    twin = np.full(k, -1)
    if swa.any():
        index = {tuple(r): j for j, r in enumerate(fit.members[keys].itertuples(index=False)) if not swa[j]}
        for j in np.flatnonzero(swa):
            t = index.get(tuple(fit.members.loc[j, keys]))
            if t is not None and torch.equal(fit.theta[j], fit.theta[t]):
                twin[j] = t
    shared = np.unique(twin[twin >= 0])
    alone_plain = np.setdiff1d(np.flatnonzero(~swa), shared)
    alone_swa = np.flatnonzero(swa & (twin < 0))
    parts: dict[int, tuple[Retrained, int]] = {}

    def run(idx: np.ndarray, recipe: Recipe, also_last: bool = False):
        if not idx.size:
            return None
        sub = _subfit(fit, idx)
        return retrain_stack(sub, x, y, test, candidates[idx], recipe, loo=config.loo,
                             max_members=config.max_members, progress=progress, also_last=also_last)

    if shared.size:
        avg, last = run(shared, swa_recipe, also_last=True)
        for i, j in enumerate(shared):
            parts[int(j)] = (last, i)
        for j in np.flatnonzero(twin >= 0):
            parts[int(j)] = (avg, int(np.searchsorted(shared, twin[j])))
    for idx, recipe in ((alone_plain, plain_recipe), (alone_swa, swa_recipe)):
        r = run(idx, recipe)
        for i, j in enumerate(idx):
            parts[int(j)] = (r, i)
    fields = ("delta", "drift", "ref_loss", "grad_norm", "floor_epoch", "epochs_run", "lr")
    merged = {f: np.stack([getattr(parts[j][0], f)[parts[j][1]] for j in range(k)]) for f in fields}
    return Retrained(removed=candidates, protocol="all_layers",
                     recipe={"plain": plain_recipe.to_dict(), "swa": swa_recipe.to_dict()}, **merged)


def _subfit(fit: StackFit, idx: np.ndarray) -> StackFit:
    """The members ``idx`` of a fit, as a fit of their own."""
    t = torch.as_tensor(idx)
    return StackFit(fit.stack, fit.members.iloc[idx].reset_index(drop=True), fit.theta[t],
                    tuple(a[t] for a in fit.aux), fit.loss[idx], fit.grad_norm[idx], fit.lr[idx], fit.history[idx],
                    fit.recipe, fit.floor_epoch[idx], fit.epochs_run[idx], None)


def _test_grad_l1(stack: Stack, theta: Tensor, x_test: Tensor, y_test: Tensor, dmask: Tensor, umask: Tensor
                  ) -> np.ndarray:
    """``[k]`` ‖∇_θ ℓ(z_test, θ_j)‖₁ per member (float64): turns a per-coordinate bound into nats, to first order."""
    th = theta.detach().double().clone().requires_grad_(True)
    # members are independent, so the gradient of the sum is every member's own gradient, row by row
    stack_losses(stack, th, x_test.double(), y_test, dmask, umask)[:, 0].sum().backward()
    return th.grad.abs().sum(1).numpy()


def run_iris_sweeps(config: IrisSweepConfig, *, block: int | None = None, scheduler: str | None = None,
                    n_jobs: int = 1, progress: bool = False, cache: bool = True,
                    on_result: Callable[[dict[str, Any], IrisSweepResult], None] | None = None,
                    skip: Callable[[dict[str, Any]], bool] | None = None,
                    full_check: dict[str, Any] | None = None,
                    order: Callable[[dict[str, Any]], Any] | None = None) -> IrisSweepResult:
    """Every chunk of the Iris sweeps (:meth:`IrisSweepConfig.chunks`), dispatched by
    :func:`helpers.dispatch.run_many`: serially by default, to ``n_jobs`` local processes, or to the Dask cluster
    at ``scheduler`` (or ``$BOOK_DASK_SCHEDULER``). Each chunk is memoised on its own, and the result is the same
    on every backend.

    Args:
        block: repetitions per chunk (default: all of them, one chunk per sweep × family).
        on_result: called in this process as each chunk finishes, with its task and result (e.g. to store it).
        skip: chunks for which it returns True are not run (e.g. already stored) and are not in the result.
        full_check: keyword arguments of :func:`full_length_check` (``sweep``, ``values``, ``regimes``,
            ``rep_stop``): its two runs are dispatched with the chunks and its table is ``result.full_check``.
        order: a sort key for the chunks (default: :meth:`IrisSweepConfig.chunks`' order).
    """
    from helpers.dispatch import run_many

    tasks = [t for t in config.chunks(block) if skip is None or not skip(t)]
    if order is not None:
        tasks = sorted(tasks, key=order)
    # the full-length check's two runs go to the same workers as the chunks, first: the run to every epoch is
    # the longest single piece, and starting it last would leave the other workers idle at the end
    extra = [] if full_check is None else full_length_tasks(config, **full_check)
    calls = [dict(t, cache=cache) for t in extra] + [dict(t, config=config, cache=cache) for t in tasks]
    n_extra = len(extra)
    results = run_many(run_iris_chunk, calls, scheduler=scheduler, n_jobs=n_jobs, progress=progress,
                       desc="iris chunks", on_result=None if on_result is None else
                       (lambda i, r: on_result(tasks[i - n_extra], r) if i >= n_extra else None))
    chunks = results[n_extra:]
    out = (IrisSweepResult.concat(chunks) if chunks
           else IrisSweepResult(*(pd.DataFrame() for _ in dataclasses.fields(IrisSweepResult))))
    if extra:
        out.full_check = compare_full_length(*results[:n_extra])
    return out


# ============================================================================================ the schedule's floor


def floor_table(result: IrisSweepResult) -> pd.DataFrame:
    """The learning-rate floor, measured: one row per (sweep, regime, value) with the epochs at which training
    reached the floor (median, min, max over repetitions), the same for the all-layer and last-layer
    retrainings (median and max over every retraining of every repetition), how many never reached it, the
    gradient norm at θ̂ (median; a run that never reached the floor counts in ``*_no_floor``, not in the epochs),
    and the floor-termination bounds (largest over repetitions: per coordinate, and
    in nats of test loss to first order, :func:`helpers.train.floor_bound`)."""
    keys = ["sweep", "regime", "value"]
    models = result.models.assign(floor_epoch=result.models["floor_epoch"].where(result.models["floor_epoch"] > 0),
                                  never=(result.models["floor_epoch"] < 0).astype(int))
    m = models.groupby(keys).agg(
        train_floor_median=("floor_epoch", "median"), train_floor_min=("floor_epoch", "min"),
        train_floor_max=("floor_epoch", "max"), train_no_floor=("never", "sum"),
        grad_norm_median=("grad_norm", "median"), bound_param_max=("floor_bound_param", "max"),
        bound_nats_max=("floor_bound_nats", "max"), n=("rep", "size"))
    main = result.runs[result.runs["estimator"].isin(["paper", "bnn"])]
    r = main.pivot_table(index=keys, columns="protocol", aggfunc={
        "retrain_floor_median": "median", "retrain_floor_max": "max", "retrain_no_floor": "sum"})
    r.columns = [f"{proto}_{name.removeprefix('retrain_')}" for name, proto in r.columns]
    return m.join(r).reset_index()


def full_length_tasks(config: IrisSweepConfig, sweep: str, values: Sequence[int], regimes: Sequence[str],
                      rep_stop: int = 1) -> list[dict[str, Any]]:
    """The two :func:`run_iris_chunk` calls of :func:`full_length_check` (stopped at the floor, every epoch run),
    as keyword dicts including their config, so they can be dispatched beside the sweeps' own chunks."""
    kw = dict(sweep=sweep, family=_family(regimes[0]), rep_start=0, rep_stop=rep_stop, values=list(values),
              regimes=list(regimes))
    return [dict(kw, config=dataclasses.replace(config, stop_at_floor=stop)) for stop in (True, False)]


def compare_full_length(stop: IrisSweepResult, full: IrisSweepResult) -> pd.DataFrame:
    """One row per (member, protocol, estimator): the floor-stopped and the full-length run's numbers and their
    differences — test loss of θ̂, mean and largest difference of the truths, drift, Spearman — beside the floor
    bound in nats (what the skipped training epochs could change θ̂'s test loss by, to first order)."""
    member = ["sweep", "regime", "value", "rep"]
    keys = member + ["protocol", "estimator"]
    cols = ["spearman", "delta_mean", "drift"]
    runs = stop.runs[keys + cols].merge(full.runs[keys + cols], on=keys, suffixes=("_stop", "_full"))
    pts = stop.points.merge(full.points, on=member + ["protocol", "candidate"], suffixes=("_stop", "_full"))
    pts["abs_diff"] = (pts["delta_stop"] - pts["delta_full"]).abs()
    worst = pts.groupby(member + ["protocol"])["abs_diff"].max().rename("delta_max_abs_diff").reset_index()
    mod = stop.models[member + ["test_loss", "floor_epoch", "floor_bound_nats", "grad_norm"]].merge(
        full.models[member + ["test_loss", "grad_norm"]], on=member, suffixes=("_stop", "_full"))
    out = runs.merge(worst, on=member + ["protocol"]).merge(mod, on=member)
    for c in ("spearman", "delta_mean", "drift", "test_loss"):
        out[f"{c}_diff"] = out[f"{c}_stop"] - out[f"{c}_full"]
    return out


def full_length_check(config: IrisSweepConfig, sweep: str, values: Sequence[int], regimes: Sequence[str],
                      rep_stop: int = 1, *, cache: bool = True) -> pd.DataFrame:
    """Floor termination against the full protocol: the same members (``values`` × ``regimes`` × repetitions
    ``0 .. rep_stop - 1`` of ``sweep``) run once stopped at the floor and once for every one of the config's
    epochs (training and retraining), compared by :func:`compare_full_length`."""
    stop, full = (run_iris_chunk(**t, cache=cache) for t in full_length_tasks(config, sweep, values, regimes, rep_stop))
    return compare_full_length(stop, full)


def member_retraining_curve(config: IrisSweepConfig, depth: int, regime: str, rep: int,
                            lengths: Sequence[int], *, cache: bool = True) -> pd.DataFrame:
    """The paper's Fig. 5 for one member of the depth sweep: its θ̂ trained by the config's protocol, then
    warm-started retraining without each of its candidates (and with nothing removed: drift) for each of
    ``lengths`` epochs — each a fresh start, stopped at the floor if the config says so. Columns ``epochs``,
    ``candidate``, ``delta``, ``drift``, ``est_paper``, ``est_objective`` (the two last-layer estimates)."""
    key = {"config": dataclasses.asdict(config), "depth": depth, "regime": regime, "rep": rep,
           "lengths": [int(v) for v in lengths]}
    compute = lambda: _member_retraining_curve(config, depth, regime, rep, lengths)  # noqa: E731
    return memoize("iris_member_curve", key, compute) if cache else compute()


def _member_retraining_curve(config: IrisSweepConfig, depth: int, regime: str, rep: int,
                             lengths: Sequence[int]) -> pd.DataFrame:
    if REGIMES[regime].bayesian:
        raise ValueError("the retraining curve is drawn for deterministic regimes")
    d = iris_data(config.test_index)
    stack = Stack(4, 3, depth, config.depth_width)
    lam = REGIMES[regime].l2
    members = pd.DataFrame([{"depth": depth, "width": config.depth_width, "l2": lam, "seed": config.seed + rep}])
    recipe = config.recipe(config.epochs, REGIMES[regime].swa)
    fit = fit_stack(stack, members, *d.train, recipe)
    th = fit.theta.double()
    dm, um, _ = (m.double() for m in fit.masks)
    cand = torch.argsort(stack_losses(stack, th, *d.train, dm, um)[0], descending=True)[:config.n_candidates]
    feats = stack_features(stack, th, d.x_train, dm, um)
    feats_t = stack_features(stack, th, d.x_test, dm, um)
    sp = stack.split(th)
    est = {}
    for name, kw in (("paper", dict(include_bias=False, include_l2=False)), ("objective", {})):
        v, _ = batched_last_layer_influence(feats, d.y_train, feats_t, d.y_test, sp["out.weight"], sp["out.bias"],
                                            [lam], **kw)
        est[name] = v[0, 0].numpy()[cand.numpy()]
    curve = retraining_curve(fit, 0, *d.train, d.test, cand.tolist(),
                             config.recipe(config.retrain_epochs, REGIMES[regime].swa), lengths, loo=config.loo)
    curve["est_paper"] = np.tile(est["paper"], len(lengths))
    curve["est_objective"] = np.tile(est["objective"], len(lengths))
    return curve


# ============================================================================================ summaries


SHOW_RUNS = 5  # a group of at most this many runs is shown as its runs, not as a bootstrap interval


def summarize_runs(runs: pd.DataFrame, by: Sequence[str], *, columns: Sequence[str] = ("spearman", "pearson"),
                   extra: Sequence[str] = ("drift", "drift_ratio"), n_resamples: int = 2000, seed: int = 0,
                   confidence: float = 0.95) -> pd.DataFrame:
    """Bars with confidence intervals: per group of ``by``, the mean of each signed column and of its absolute
    value, each with a bootstrap CI (:func:`helpers.stats.mean_ci`), the share of negative values, and the mean
    (with CI) of the ``extra`` columns present. Runs whose correlation is undefined (NaN) are dropped and counted
    in ``n_undefined``.

    A group of at most :data:`SHOW_RUNS` runs gets no bootstrap interval (with n = 3 there are 10 distinct
    resamples): ``low`` / ``high`` are the smallest and largest run, ``<column>_runs`` lists the runs
    (``;``-separated, for :func:`helpers.plots.paired_bars` to draw) and ``<column>_interval`` says which of the two it is.
    """
    from helpers.stats import mean_ci

    rows = []
    for key, g in runs.groupby(list(by), sort=True):
        key = key if isinstance(key, tuple) else (key,)
        row: dict[str, Any] = dict(zip(by, key))
        row["n"] = int(len(g))
        row["n_undefined"] = int(g[list(columns)].isna().any(axis=1).sum())
        for col in columns:
            v = g[col].dropna().to_numpy()
            for name, arr in ((col, v), (f"abs_{col}", np.abs(v))):
                # every run undefined (e.g. a solver that diverged each time): NaN, counted in n_undefined
                if not v.size:
                    m, lo, hi = np.nan, np.nan, np.nan
                elif v.size <= SHOW_RUNS:
                    m, lo, hi = float(arr.mean()), float(arr.min()), float(arr.max())
                    row[f"{name}_runs"] = ";".join(f"{a:.17g}" for a in arr)
                else:
                    m, lo, hi = mean_ci(arr, confidence=confidence, n_resamples=n_resamples, seed=seed)
                row[f"{name}_interval"] = "runs" if 0 < v.size <= SHOW_RUNS else f"bootstrap {confidence:.0%}"
                row.update({name: m, f"{name}_low": lo, f"{name}_high": hi})
            row[f"{col}_neg_share"] = float((v < 0).mean()) if v.size else np.nan
        for col in extra:
            if col in g.columns:
                v = g[col].dropna().to_numpy()
                if v.size:
                    m, lo, hi = mean_ci(v, confidence=confidence, n_resamples=n_resamples, seed=seed)
                    row.update({col: m, f"{col}_low": lo, f"{col}_high": hi})
        rows.append(row)
    return pd.DataFrame(rows)


def compare_bars(book: pd.DataFrame, paper: pd.DataFrame, on: Sequence[str],
                 columns: Sequence[str] = ("abs_spearman", "spearman")) -> pd.DataFrame:
    """Put the book's and the paper's bars side by side (both from :func:`summarize_runs`).

    For each column c: ``paper_c``, ``paper_c_low/high``, ``book_c``, ``book_c_low/high``, ``diff_c`` (book −
    paper) and ``separate_c`` (True when the two 95 % intervals do not overlap: a difference beyond the noise of
    either estimate).
    """
    keep = list(on)
    cols = [c for col in columns for c in (col, f"{col}_low", f"{col}_high")]
    merged = pd.merge(paper[keep + cols + ["n"]].rename(columns={c: f"paper_{c}" for c in cols + ["n"]}),
                      book[keep + cols + ["n"]].rename(columns={c: f"book_{c}" for c in cols + ["n"]}),
                      on=keep, how="inner")
    for col in columns:
        merged[f"diff_{col}"] = merged[f"book_{col}"] - merged[f"paper_{col}"]
        merged[f"separate_{col}"] = ((merged[f"book_{col}_low"] > merged[f"paper_{col}_high"])
                                     | (merged[f"book_{col}_high"] < merged[f"paper_{col}_low"]))
    return merged


def regime_gap(comparison: pd.DataFrame, regime: str, column: str = "abs_spearman") -> dict[str, Any]:
    """One regime's bars beside the paper's (rows of :func:`compare_bars`): how many settings both sides ran, how
    many have disjoint 95 % intervals, and a sentence listing every setting (book value and interval, paper's).

    Returns ``{"n", "n_separate", "n_below", "text"}`` (``n_below``: disjoint with the book's interval below the
    paper's); ``text`` says so when the regime has no bar on one of the sides.
    """
    need = {"sweep", "regime", "value", f"book_{column}", f"paper_{column}", f"separate_{column}"}
    if not need <= set(comparison.columns):
        raise ValueError(f"comparison lacks {sorted(need - set(comparison.columns))}: pass compare_bars()'s frame")
    part = comparison[comparison.regime == regime].sort_values(["sweep", "value"])
    if part.empty:
        return {"n": 0, "n_separate": 0, "n_below": 0,
                "text": f"the {regime} regime has no bar on both sides in this profile"}
    pieces = [f"{r.sweep} {r.value}: {getattr(r, 'book_' + column):.2f} "
              f"({getattr(r, 'book_' + column + '_low'):.2f}–{getattr(r, 'book_' + column + '_high'):.2f}) "
              f"against {getattr(r, 'paper_' + column):.2f} "
              f"({getattr(r, 'paper_' + column + '_low'):.2f}–{getattr(r, 'paper_' + column + '_high'):.2f})"
              for r in part.itertuples()]
    n_sep = int(part[f"separate_{column}"].sum())
    n_below = int((part[f"book_{column}_high"] < part[f"paper_{column}_low"]).sum())
    return {"n": int(len(part)), "n_separate": n_sep, "n_below": n_below,
            "text": f"{'; '.join(pieces)}. The intervals are disjoint in {n_sep} of {len(part)} settings, the book's "
                    f"below the paper's in {n_below}"}


def tag_runs(frame: pd.DataFrame, side: str) -> pd.DataFrame:
    """Suffix ``side`` (e.g. ``"_paper"``) to the ``*_runs`` / ``*_interval`` columns of :func:`summarize_runs`'s
    frame, so that a small group's runs keep the side they belong to through a merge of two sides' bars."""
    return frame.rename(columns={c: c + side for c in frame.columns if c.endswith(("_runs", "_interval"))})


#: "far flatter": the paper's whole interval of the mean top eigenvalue lies below this fraction of the lower end
#: of the book's (the networks were trained much further towards zero loss)
FLATTER = 0.01


def _mean_ci_of(frame: pd.DataFrame, column: str, key: tuple, n_bootstrap: int, seed: int) -> tuple[float, ...]:
    sel = frame[(frame.sweep == key[0]) & (frame.regime == key[1]) & (frame.value == key[2])][column].dropna()
    from helpers.stats import mean_ci

    return mean_ci(sel, n_resamples=n_bootstrap, seed=seed) if len(sel) else (np.nan,) * 3


def difference_reasons(separate: pd.DataFrame, book_bars: pd.DataFrame, paper_runs: pd.DataFrame,
                       models: pd.DataFrame, *, test_point: int, n_bootstrap: int, seed: int,
                       flatter: float = FLATTER) -> pd.DataFrame:
    """Why a book bar's interval is disjoint from the paper's: the first computed variant that reaches it.

    For each row of ``separate`` (rows of :func:`compare_bars` whose |ρ| intervals are disjoint) the variants are
    tried in order: the test point is not the paper's (83); the paper's networks are far flatter (its interval of
    the mean top Hessian eigenvalue below ``flatter`` × the lower end of the book's: ``paper_runs.top_eig`` against
    ``models.top_no_l2``); the paper's float32 inverse (``book_bars`` estimator ``paper_inv32``) reaches the paper's
    interval; the other retraining protocol does; else "not explained".

    Returns ``separate`` with ``book_inv32``, ``book_other_protocol`` (those variants' mean |ρ|, NaN where not run)
    and ``reason``. Cost: two bootstraps per row.
    """
    keys = ["sweep", "regime", "value"]
    variant = {pe: g.set_index(keys)[["abs_spearman", "abs_spearman_low", "abs_spearman_high"]]
               for pe, g in book_bars.groupby(["protocol", "estimator"])}
    out = separate.copy()

    def base(r: Any) -> tuple:
        return r.sweep, r.regime.removesuffix("_toplayer"), r.value

    def protocols(r: Any) -> tuple[str, str]:
        own = "last_layer" if r.regime.endswith("_toplayer") else "all_layers"
        return own, "all_layers" if own == "last_layer" else "last_layer"

    def overlaps(r: Any, proto: str, est: str) -> tuple[float, bool]:
        tab = variant.get((proto, est))
        if tab is None or base(r) not in tab.index:
            return np.nan, False
        v = tab.loc[base(r)]
        return v.abs_spearman, bool(v.abs_spearman_low <= r.paper_abs_spearman_high
                                     and v.abs_spearman_high >= r.paper_abs_spearman_low)

    def saturated(r: Any) -> bool:
        p_ = _mean_ci_of(paper_runs, "top_eig", base(r), n_bootstrap, seed)
        b_ = _mean_ci_of(models, "top_no_l2", base(r), n_bootstrap, seed)
        return bool(np.isfinite(p_[2]) and np.isfinite(b_[1]) and p_[2] < flatter * b_[1])

    def reason(r: Any) -> str:
        own, other = protocols(r)
        if test_point != 83:
            return "test point"
        if saturated(r):
            return "paper's networks far flatter"
        if overlaps(r, own, "paper_inv32")[1]:
            return "float32 inverse"
        if overlaps(r, other, "paper")[1]:
            return f"protocol ({other.replace('_', ' ')})"
        return "not explained"

    rows = list(out.itertuples())
    out["book_inv32"] = [overlaps(r, protocols(r)[0], "paper_inv32")[0] for r in rows]
    out["book_other_protocol"] = [overlaps(r, protocols(r)[1], "paper")[0] for r in rows]
    out["reason"] = [reason(r) for r in rows]
    return out


def setting_mean_ci(frame: pd.DataFrame, column: str, key: tuple, *, n_bootstrap: int, seed: int
                    ) -> tuple[float, float, float]:
    """Mean of ``column`` over the runs of one setting ``key = (sweep, regime, value)`` with its bootstrap 95 %
    interval (:func:`helpers.stats.mean_ci`); NaNs where the setting has no run."""
    return tuple(float(v) for v in _mean_ci_of(frame, column, key, n_bootstrap, seed))


# ============================================================================================ larger models


@dataclass(frozen=True)
class DeepConfig:
    """One model of the paper's Fig. 2 protocol on an image set.

    Attributes:
        dataset: ``mnist5k``, ``mnist1d``, ``digits`` or a local torchvision set (``mnist``, ``cifar10``, ...).
        model: ``fc<w>`` (784-w-10 ReLU; ``fc128`` is the paper's FC-128), ``lenet5`` (tanh, average pooling),
            ``small_cnn`` (two 3×3 convolutions of ``cnn_width`` channels), ``vgg13`` or ``vgg_tiny``.
        n_train, n_test: sizes of the split (None: all); reps: models trained (one ensemble).
        epochs: full-batch Adam (+ AMSGrad, coupled weight decay ``weight_decay``) epochs; the paper: 5,000.
        finetune_epochs: last-layer fine-tuning without each point (the paper: 2,000, fresh optimizer).
        n_top: points with the largest |estimate| that are removed (the paper: 40).
        lissa_damping, lissa_scale, lissa_depth: LiSSA in the book's convention, δ = the paper's 0.01 × scale 10.
        all_params: also estimate with all parameters (CG, damping ``all_params_damping``) and retrain all layers
            from θ̂ (``all_params_epochs``).
        dtype: training dtype; pad_to: zero-pad images to this side (VGG13 needs 32 on MNIST's 28).
        root: folder of the torchvision sets (default ``$BOOK_DATA_ROOT`` or ``./data``).
        loo: leave-one-out objective of the retrainings (``"reaverage"``: the paper deletes the point).
        batch_size: mini-batches for training and fine-tuning (None: full batch, as the paper's FC nets; its
            convolutional nets used data loaders — full MNIST / CIFAR-10 with VGG13 need them).
        device: where the ensembles train (``"auto"``: CUDA if available); influence is computed on the CPU in
            float64. chunk: rows per forward pass when features and test losses are evaluated.

    Images keep pixel values in [0, 1] (the paper's x / 255, no standardisation); mnist1d is standardised.
    """

    dataset: str = "mnist5k"
    model: str = "fc128"
    n_train: int | None = None
    n_test: int | None = None
    reps: int = 10
    epochs: int = 5000
    finetune_epochs: int = 2000
    lr: float = 1e-3
    weight_decay: float = 1e-3
    amsgrad: bool = True
    patience: int = 100
    n_top: int = 40
    lissa_damping: float = 0.1
    lissa_scale: float = 10.0
    lissa_depth: int = 1000
    all_params: bool = False
    all_params_epochs: int = 1000
    all_params_damping: float = 0.01
    cg_maxiter: int = 200
    cnn_width: int = 8
    dtype: str = "float32"
    seed: int = 0
    pad_to: int | None = None
    root: str | None = None
    loo: str = "reaverage"
    batch_size: int | None = None
    device: str = "auto"
    chunk: int = 2048

    def recipe(self, epochs: int) -> Recipe:
        return Recipe(optimizer="adam", lr=self.lr, epochs=int(epochs), schedule="plateau", patience=self.patience,
                      amsgrad=self.amsgrad, weight_decay=self.weight_decay, dtype=self.dtype,
                      batch_size=self.batch_size)

    @property
    def torch_device(self) -> torch.device:
        """``device="auto"``: CUDA when available, else the CPU."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


@dataclass
class DeepResult:
    """Tidy results of :func:`run_deep`: ``runs`` (one row per rep × estimator × protocol: signed ``spearman``,
    ``pearson``, ``drift``, ``delta_mean``, ``delta_sd``), ``points`` (estimates and truths of every removed point),
    ``models`` (per rep: test index and loss, accuracies, solver diagnostics), ``history`` ``[reps, epochs]``."""

    runs: pd.DataFrame
    points: pd.DataFrame
    models: pd.DataFrame
    history: np.ndarray


def _deep_model(cfg: DeepConfig, feature_shape: tuple[int, ...], n_classes: int) -> nn.Module:
    dt = torch.float64
    m = re.fullmatch(r"fc(\d+)", cfg.model)
    if m:
        return models.mlp(int(np.prod(feature_shape)), n_classes, 1, int(m.group(1)), "relu", dtype=dt)
    if len(feature_shape) != 3:
        raise ValueError(f"model {cfg.model!r} needs images [C, H, W]; {cfg.dataset} has features of shape "
                         f"{feature_shape}: use an fc<width> model")
    c, side = feature_shape[0], feature_shape[1]
    if cfg.model == "lenet5":
        return models.lenet5(c, n_classes, "tanh", side, dtype=dt)
    if cfg.model == "small_cnn":
        return models.small_cnn(c, n_classes, cfg.cnn_width, side, dtype=dt)
    if cfg.model in ("vgg13", "vgg11", "vgg16", "vgg_tiny"):
        return models.vgg(cfg.model, c, n_classes, side, dtype=dt)
    raise ValueError(f"unknown model {cfg.model!r}: use fc<width>, lenet5, small_cnn, vgg13 or vgg_tiny")


def _deep_data(cfg: DeepConfig) -> data_mod.Split:
    flat = re.fullmatch(r"fc\d+", cfg.model) is not None
    # Images keep their pixel scale in [0, 1] as in the paper (x / 255): per-pixel standardisation would blow up
    # the near-constant border pixels of a test image into huge logits. mnist1d's signals are standardised.
    split = data_mod.load(cfg.dataset, seed=cfg.seed, n_train=cfg.n_train, n_test=cfg.n_test, flatten=flat,
                          root=cfg.root, standardize=cfg.dataset == "mnist1d")
    if cfg.pad_to is not None and not flat:
        side = split.x_train.shape[-1]
        pad = (cfg.pad_to - side) // 2
        if pad < 0 or 2 * pad + side != cfg.pad_to:
            raise ValueError(f"pad_to={cfg.pad_to} cannot be reached from {side} pixels by symmetric padding")
        split = dataclasses.replace(split, x_train=F.pad(split.x_train, (pad,) * 4),
                                    x_test=F.pad(split.x_test, (pad,) * 4),
                                    feature_shape=(split.feature_shape[0], cfg.pad_to, cfg.pad_to))
    return split


def _last_layer_input(model: nn.Module, x: Tensor, chunk: int = 2048) -> Tensor:
    """The input of ``model.last_layer`` on ``x`` (a forward hook: works for every model of helpers.models),
    evaluated ``chunk`` rows at a time; on ``x``'s device."""
    got: list[Tensor] = []
    handle = model.last_layer.register_forward_hook(lambda mod, inp, out: got.append(inp[0].detach()))
    try:
        with torch.no_grad():
            for s in range(0, x.shape[0], chunk):
                model(x[s:s + chunk])
    finally:
        handle.remove()
    return torch.cat(got)


def _logits(model: nn.Module, x: Tensor, chunk: int = 2048) -> Tensor:
    with torch.no_grad():
        return torch.cat([model(x[s:s + chunk]) for s in range(0, x.shape[0], chunk)])


def run_deep(config: DeepConfig, *, progress: bool = False, cache: bool = True) -> DeepResult:
    """The paper's Fig. 2 protocol for one model (memoised on the config; see :class:`DeepConfig`).

    Per repetition: the test point with the maximum loss; last-layer influence on every training point, exact
    (weight and bias, the objective's L2 term, Cholesky/eigh) and by LiSSA (the paper's damping and scale; a
    diverging recursion is reported, not hidden); the ``n_top`` points with the largest |exact estimate|; their
    truth by last-layer warm-start fine-tuning (all repetitions' removals in one batched ensemble), with drift.
    With ``all_params``: all-parameter influence by CG (damping reported) and all-layer warm-start retraining
    (:func:`helpers.retrain.warm_start`) of its own top points.
    """
    if not cache:
        return _run_deep(config, progress)
    return memoize("deep", {"config": dataclasses.asdict(config)}, lambda: _run_deep(config, progress))


def _run_deep(cfg: DeepConfig, progress: bool) -> DeepResult:
    from helpers import retrain as retrain_mod

    split = _deep_data(cfg)
    model = _deep_model(cfg, split.feature_shape, split.n_classes)
    x, y = split.train
    xt_all, yt_all = split.test
    n = x.shape[0]
    recipe = cfg.recipe(cfg.epochs)
    dt = recipe.torch_dtype
    dev = cfg.torch_device
    ens = fit_ensemble(recipe, model, x.to(device=dev, dtype=dt), y.to(dev),
                       seeds=[cfg.seed + r for r in range(cfg.reps)], progress=progress)
    params_cpu = {k: v.detach().cpu() for k, v in ens.params.items()}
    last_names = param_names(model, "last")
    w_name = [n_ for n_ in last_names if n_.endswith("weight")][0]
    b_name = [n_ for n_ in last_names if n_.endswith("bias")][0]
    model_rows, point_rows, run_rows = [], [], []
    feats_all, w_all, b_all, tf_all, ty_all, top_all, est_exact, est_lissa = [], [], [], [], [], [], [], []
    x64, xt64 = x.to(device=dev, dtype=torch.float64), xt_all.to(device=dev, dtype=torch.float64)
    for r in range(cfg.reps):
        theta = {k: v[r].double() for k, v in params_cpu.items()}
        # θ̂ in float64 on the training device: losses and features in chunks, then everything on the CPU
        mr = model_with(model, theta, device=dev).requires_grad_(False)
        test_logits = _logits(mr, xt64, cfg.chunk).cpu()
        test_losses = F.cross_entropy(test_logits, yt_all, reduction="none")
        train_acc = float((_logits(mr, x64, cfg.chunk).cpu().argmax(-1) == y).double().mean())
        test_acc = float((test_logits.argmax(-1) == yt_all).double().mean())
        t = int(test_losses.argmax())
        xt, yt = xt_all[t:t + 1], yt_all[t:t + 1]
        phi = _last_layer_input(mr, x64, cfg.chunk).cpu()
        phi_t = _last_layer_input(mr, xt64[t:t + 1], cfg.chunk).cpu()
        g_tr, H = softmax_layer_terms(phi[None], y, theta[w_name][None], theta[b_name][None])
        g_te, _ = softmax_layer_terms(phi_t[None], yt, theta[w_name][None], theta[b_name][None])
        A = CurvatureOperator.from_matrix(H[0] + cfg.weight_decay * torch.eye(H.shape[-1], dtype=torch.float64))
        exact = solve(A, g_te[0].T.contiguous(), method="exact", fallback="eig")
        ex = ((exact.x.T @ g_tr[0].T) / n)[0].numpy()
        lissa_status, li = "ok", np.full(n, np.nan)
        try:
            lres = solve(A, g_te[0].T.contiguous(), method="lissa", damping=cfg.lissa_damping,
                         scale=cfg.lissa_scale, depth=cfg.lissa_depth)
            li = ((lres.x.T @ g_tr[0].T) / n)[0].numpy()
            lissa_residual = lres.max_relative_residual
        except FloatingPointError as err:  # LiSSA diverges when scale < λ_max(H + δI)/2
            lissa_status, lissa_residual = f"diverged: {str(err).splitlines()[0][:120]}", float("nan")
        lam_max = float(extreme_eigenvalues(A, 1, "LA")[0])
        ex_info = {"max_relative_residual": exact.max_relative_residual}
        top = np.argsort(-np.abs(ex), kind="stable")[:cfg.n_top]
        # the fine-tuning starts from θ̂'s last layer in the training dtype, on these features (its reference loss
        # is evaluated on the same ones, so the cast cannot show up as drift)
        feats_all.append(phi.to(dt))
        tf_all.append(phi_t[0].to(dt))
        w_all.append(params_cpu[w_name][r])
        b_all.append(params_cpu[b_name][r])
        ty_all.append(int(yt[0]))
        top_all.append(top)
        est_exact.append(ex)
        est_lissa.append(li)
        model_rows.append({"rep": r, "test_row": t, "test_index": int(split.idx_test[t]),
                           "test_loss": float(test_losses[t]), "train_acc": train_acc, "test_acc": test_acc,
                           "train_loss": float(ens.loss[r]), "grad_norm": float(ens.grad_norm[r]),
                           "exact_residual": ex_info["max_relative_residual"], "lissa_status": lissa_status,
                           "lissa_residual": lissa_residual, "last_layer_lambda_max": lam_max,
                           "lissa_converges": bool(cfg.lissa_scale > 0.5 * (lam_max + cfg.lissa_damping))})
    top_arr = np.stack(top_all)
    ft = cfg.recipe(cfg.finetune_epochs).replace(weight_decay=0.0)
    truth = retrain_last_layer(torch.stack(feats_all).to(dev), y, torch.stack(w_all), torch.stack(b_all),
                               np.full(cfg.reps, cfg.weight_decay), torch.stack(tf_all), torch.tensor(ty_all),
                               top_arr, ft, loo=cfg.loo, progress=progress)
    for name, est in (("exact", est_exact), ("lissa", est_lissa)):
        e = np.stack([est[r][top_arr[r]] for r in range(cfg.reps)])
        ok = np.isfinite(e).all(1)
        sp_, pe_ = np.full(cfg.reps, np.nan), np.full(cfg.reps, np.nan)
        if ok.any():
            sp_[ok], pe_[ok] = _corr_rows(e[ok], truth.delta[ok])
        run_rows.append(pd.DataFrame({"dataset": cfg.dataset, "model": cfg.model, "rep": np.arange(cfg.reps),
                                      "protocol": "last_layer", "estimator": name, "spearman": sp_, "pearson": pe_,
                                      "drift": truth.drift, "delta_mean": truth.delta.mean(1),
                                      "delta_sd": truth.delta.std(1)}))
    for r in range(cfg.reps):
        for c, i in enumerate(top_arr[r]):
            point_rows.append({"dataset": cfg.dataset, "model": cfg.model, "rep": r, "rank": c,
                               "protocol": "last_layer", "train_index": int(split.idx_train[i]),
                               "est_exact": float(est_exact[r][i]), "est_lissa": float(est_lissa[r][i]),
                               "delta": float(truth.delta[r, c]), "drift": float(truth.drift[r])})
    if cfg.all_params:
        rec_all = cfg.recipe(cfg.all_params_epochs)
        sp_l, pe_l, dr_l, dm_l, ds_l, res_l = [], [], [], [], [], []
        for r in range(cfg.reps):
            theta = {k: v[r].double() for k, v in params_cpu.items()}
            mr = model_with(model, theta)
            t = model_rows[r]["test_row"]
            test = (xt_all[t:t + 1].double(), yt_all[t:t + 1])
            inf = predict_removal(mr, (x.double(), y), test, params="all", l2=cfg.weight_decay, method="cg",
                                  damping=cfg.all_params_damping, maxiter=cfg.cg_maxiter, rtol=1e-6)
            e = inf.values[0].numpy()
            top = np.argsort(-np.abs(e), kind="stable")[:cfg.n_top]
            gt = retrain_mod.warm_start(model, {k: v[r] for k, v in params_cpu.items()}, (x.to(dt), y),
                                        (xt_all[t:t + 1].to(dt), yt_all[t:t + 1]), top.tolist(), rec_all,
                                        loo=cfg.loo, progress=progress, cache=False)
            s, p = _corr_rows(e[top][None], gt.delta[0][None])
            sp_l.append(s[0]); pe_l.append(p[0]); dr_l.append(float(gt.drift[0]))  # noqa: E702
            dm_l.append(float(gt.delta[0].mean())); ds_l.append(float(gt.delta[0].std()))  # noqa: E702
            res_l.append(inf.solve.max_relative_residual)
            model_rows[r]["all_params_residual"] = inf.solve.max_relative_residual
            for c, i in enumerate(top):
                point_rows.append({"dataset": cfg.dataset, "model": cfg.model, "rep": r, "rank": c,
                                   "protocol": "all_layers", "train_index": int(split.idx_train[i]),
                                   "est_all": float(e[i]), "delta": float(gt.delta[0, c]), "drift": float(gt.drift[0])})
        run_rows.append(pd.DataFrame({"dataset": cfg.dataset, "model": cfg.model, "rep": np.arange(cfg.reps),
                                      "protocol": "all_layers", "estimator": "all_params_cg", "spearman": sp_l,
                                      "pearson": pe_l, "drift": dr_l, "delta_mean": dm_l, "delta_sd": ds_l}))
    runs = pd.concat(run_rows, ignore_index=True)
    runs["abs_spearman"] = runs["spearman"].abs()
    runs["abs_pearson"] = runs["pearson"].abs()
    runs["drift_ratio"] = runs["drift"].abs() / runs["delta_sd"].where(runs["delta_sd"] > 0)
    return DeepResult(runs, pd.DataFrame(point_rows), pd.DataFrame(model_rows), ens.history)


# ============================================================================================ figures
