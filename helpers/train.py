"""Training: a :class:`Recipe` (data), :func:`fit` for one model, :func:`fit_ensemble` for k models at once.

Every fit minimises the project's objective (STUDY.md §1, :mod:`helpers.objective`)

    R(θ) = Σ_i w_i ℓ(z_i, θ) + (λ/2) ‖θ‖²,      λ = ``recipe.weight_decay`` (coupled: it is in ∇R),

over a chosen parameter subset (``"all"``, ``"last"`` or names; the rest stay frozen at the module's values).

Removing a training point is a zero weight (:func:`helpers.objective.removal_weights`), so k leave-one-out
fits differ only in their weight vectors and can run **as one vectorised ensemble**: the parameters of the k
members are stacked along a leading axis and one ``torch.func.vmap`` of ``functional_call`` computes all k
losses and gradients per step. The optimizers of the ensemble (Adam / AMSGrad / SGD with momentum, the
plateau / cosine / step schedules, SWA) are written here on stacked tensors so that member j follows exactly
the trajectory ``torch.optim`` would give it on its own — :func:`fit` *uses* ``torch.optim`` and
``torch.optim.lr_scheduler.ReduceLROnPlateau``, which is what the tests compare against. Plateau schedules are
per member (each member's learning rate drops when *its* loss stalls). Mini-batch order is one permutation
stream drawn from ``recipe.seed`` and shared by all members, so member j equals the separate fit with that seed.

Full-batch Newton (``Recipe(optimizer="newton")``: dense Hessian via ``torch.func``, backtracking line search)
solves small convex problems to a gradient-norm tolerance, k members at once. Cost per iteration: one dense
Hessian — d Hessian-vector products, d² floats of memory — and one O(d³) Cholesky solve. L-BFGS
(``torch.optim.LBFGS``, strong-Wolfe) is the cheaper alternative.

:func:`fit_to_tolerance` trains one model to ‖∇R‖ < tol without ever forming H: scipy's L-BFGS, then Newton–CG
with Hessian-vector products, recording where the gradient norm first fell below given thresholds (early
stopping). It is what the convex chapter uses, with the closed-form backend of :mod:`helpers.closed_form` for
softmax regression (d = 7,840 on MNIST in seconds) and autodiff for any other model.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Literal, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import grad_and_value, vmap

from helpers import memory
from helpers.progress import progress_bar
from helpers.models import init_params, is_softmax_regression
from helpers.objective import BACKENDS, LOSS_NAMES, Params, objective, param_names

OptimizerName = Literal["newton", "lbfgs", "adam", "sgd"]
ScheduleName = Literal["none", "plateau", "cosine", "step"]

OPTIMIZERS: tuple[str, ...] = ("newton", "lbfgs", "adam", "sgd")
SCHEDULES: tuple[str, ...] = ("none", "plateau", "cosine", "step")
DTYPES: dict[str, torch.dtype] = {"float64": torch.float64, "float32": torch.float32}

# ReduceLROnPlateau's defaults, passed explicitly to torch in `fit` and mirrored by the batched schedule.
PLATEAU_THRESHOLD = 1e-4  # relative improvement that counts as "better"
PLATEAU_EPS = 1e-8  # a reduction smaller than this is skipped
# Newton: Armijo constant, halvings before a member is declared stalled, and the memory one chunk of dense
# Hessians may take (members are processed in chunks so that k·d² floats never exceed it).
ARMIJO_C = 1e-4
MAX_HALVINGS = 60
HESSIAN_BYTES = 2**28
LBFGS_MAX_LS = 25

# A member objective: (params, aux, xb, yb, idx, scale) -> scalar. `params` and the tensors of `aux` are one
# member's (vmap strips the leading k axis); xb, yb are the current batch (shared by all members); idx are the
# batch's indices into the training set (None for the full batch) and `scale` = n / |batch| makes the batch
# term an unbiased estimate of the full sum Σ_i w_i ℓ_i.
MemberObjective = Callable[[dict, tuple, Tensor, Tensor, "Tensor | None", float], Tensor]

# Called after each epoch of a first-order ensemble with the epoch number (1, 2, ...) and the stacked parameters
# {name: [k, ...]} as they are then (read them, do not modify them).
EpochHook = Callable[[int, dict[str, Tensor]], None]


@dataclass(frozen=True)
class Recipe:
    """How a model is trained — data, recorded next to every result so "retrain without z" is well defined.

    Attributes:
        optimizer: ``"newton"`` (full-batch exact Newton, small d), ``"lbfgs"`` (full batch, strong Wolfe),
            ``"adam"`` or ``"sgd"`` (``torch.optim`` semantics).
        lr: learning rate (Adam / SGD), or L-BFGS's initial step (use 1.0); ignored by Newton.
        epochs: passes over the data (Adam / SGD); one step per epoch when ``batch_size`` is None.
        tol: gradient-norm tolerance ‖∇R‖₂ (L2 term included) where Newton / L-BFGS stop; for Adam / SGD it only
            sets the ``converged`` flag of the result.
        max_iter: iteration cap of Newton / L-BFGS.
        weight_decay: λ of the L2 term (λ/2)‖θ‖² of the objective — *coupled* (it enters ∇R, like
            ``torch.optim.Adam(weight_decay=λ)``), over the trained parameters only.
        schedule: ``"none"``; ``"plateau"`` (lr ÷ ``factor`` once the epoch loss has not improved by a relative
            1e-4 for more than ``patience`` epochs — ``ReduceLROnPlateau``; the paper: ÷10 after 100);
            ``"cosine"`` (lr·(1 + cos(π e/epochs))/2 at epoch e); ``"step"`` (lr ÷ ``factor`` every
            ``step_size`` epochs).
        factor, patience, step_size: the schedule's knobs (``factor`` divides, so 10 means ×0.1).
        swa_start: fraction of the epochs after which the parameters are averaged (equal weights, after each
            epoch), e.g. 0.75 → SWA over the last 25 %; None = off. The result holds the average.
        seed: the seed of the mini-batch permutation stream (shared by all members of an ensemble). Random
            initialisation is separate: :func:`helpers.models.init_params` / ``fit_ensemble(seeds=...)``.
        batch_size: None = full batch.
        dtype: ``"float64"`` or ``"float32"``: model copy, data and parameters are cast to it.
        loss: ``"cross_entropy"`` or ``"mse"`` (see :func:`helpers.objective.loss_from_outputs`).
        amsgrad: Adam's AMSGrad variant.
        momentum: SGD momentum (``torch.optim.SGD``, no dampening, no Nesterov).
        betas, eps: Adam's constants.
        stop_at_floor: with the plateau schedule, stop a member as soon as its learning rate is at the floor
            (the next ÷factor would change it by less than ReduceLROnPlateau's eps = 1e-8, so it never changes
            again). The remaining epochs would run at that rate; :func:`floor_bound` bounds what they could
            still change. SWA, if on, is completed as if the parameters had stayed where they stopped. The
            protocol's length (``epochs``) is unchanged; only the epochs after the floor are skipped.
    """

    optimizer: str = "adam"
    lr: float = 1e-3
    epochs: int = 1000
    tol: float = 1e-8
    max_iter: int = 100
    weight_decay: float = 0.0
    schedule: str = "none"
    factor: float = 10.0
    patience: int = 100
    step_size: int = 1000
    swa_start: float | None = None
    seed: int = 0
    batch_size: int | None = None
    dtype: str = "float64"
    loss: str = "cross_entropy"
    amsgrad: bool = False
    momentum: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    stop_at_floor: bool = False

    def __post_init__(self) -> None:
        # Normalise the forms a JSON round trip or a caller may produce, so equal recipes hash equally.
        if isinstance(self.dtype, torch.dtype):
            names = {v: k for k, v in DTYPES.items()}
            if self.dtype not in names:
                raise ValueError(f"dtype {self.dtype} not supported: use one of {list(DTYPES)}")
            object.__setattr__(self, "dtype", names[self.dtype])
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}: use one of {OPTIMIZERS}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}: use one of {SCHEDULES}")
        if self.loss not in LOSS_NAMES:
            raise ValueError(f"unknown loss {self.loss!r}: use one of {LOSS_NAMES}")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}: use one of {list(DTYPES)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.epochs < 1 or self.max_iter < 0:
            raise ValueError(f"epochs must be >= 1 and max_iter >= 0, got {self.epochs}, {self.max_iter}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay (λ) must be >= 0, got {self.weight_decay}")
        if self.schedule in ("plateau", "step") and not self.factor > 1:
            raise ValueError(f"factor divides the lr and must be > 1 (10 means ×0.1), got {self.factor}")
        if self.swa_start is not None and not 0 <= self.swa_start < 1:
            raise ValueError(f"swa_start is a fraction of training in [0, 1) (0.75 = last 25 %), got {self.swa_start}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 or None (full batch), got {self.batch_size}")
        if self.optimizer in ("newton", "lbfgs") and self.batch_size is not None:
            raise ValueError(f"{self.optimizer} is full batch: set batch_size=None")
        if len(self.betas) != 2:
            raise ValueError(f"betas must be a pair, got {self.betas}")
        if self.stop_at_floor and self.schedule != "plateau":
            raise ValueError("stop_at_floor needs schedule='plateau' (only the plateau schedule has a floor)")

    @property
    def torch_dtype(self) -> torch.dtype:
        """The ``torch.dtype`` named by :attr:`dtype`."""
        return DTYPES[self.dtype]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of every field; ``Recipe(**r.to_dict()) == r``."""
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    def replace(self, **changes: Any) -> "Recipe":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


@dataclass
class FitResult:
    """One trained model.

    Attributes:
        params: the trained parameters ``{name: tensor}`` (only the trained subset; SWA average if on).
        loss: final objective R(θ) (full data, L2 term included).
        grad_norm: final ‖∇R(θ)‖₂ over the trained parameters.
        history: objective per epoch (Adam / SGD: the epoch's (size-weighted mean) batch objective, before the
            step) or per iteration (Newton / L-BFGS: at each iterate), as a numpy array.
        converged: ``grad_norm < recipe.tol``.
        lr: the learning rate at the end (after any schedule).
        floor_epoch: plateau schedule: the epoch at whose end the lr reached its floor (-1: never).
        epochs_run: epochs computed (fewer than ``recipe.epochs`` when ``stop_at_floor`` stopped it).
    """

    params: dict[str, Tensor]
    loss: float
    grad_norm: float
    history: np.ndarray
    converged: bool
    lr: float = float("nan")
    floor_epoch: int = -1
    epochs_run: int = -1


@dataclass
class EnsembleResult:
    """k models trained as one vectorised ensemble.

    Attributes:
        params: stacked trained parameters ``{name: [k, ...]}``.
        loss: ``[k]`` final objective per member; grad_norm: ``[k]`` final ‖∇R‖₂; converged: ``[k]`` bool.
        history: ``[k, epochs]`` (Adam / SGD) or ``[k, iterations + 1]`` (Newton / L-BFGS; NaN after a member
            stopped).
        lr: ``[k]`` final learning rate per member.
        floor_epoch: ``[k]`` the epoch (1-based count) at whose end the member's plateau learning rate reached
            its floor, -1 if it never did (always -1 without the plateau schedule); empty for Newton / L-BFGS.
        epochs_run: ``[k]`` epochs actually computed per member (``recipe.epochs`` unless it stopped at the
            floor); empty for Newton / L-BFGS.
        last: with SWA, the last iterates (``params`` holds the average): SWA does not change the trajectory, so
            one SWA run also gives the run without averaging. None without SWA.
    """

    params: dict[str, Tensor]
    loss: np.ndarray
    grad_norm: np.ndarray
    history: np.ndarray
    converged: np.ndarray
    lr: np.ndarray = field(default_factory=lambda: np.zeros(0))
    floor_epoch: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    epochs_run: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    last: dict[str, Tensor] | None = None

    def __len__(self) -> int:
        return int(self.loss.shape[0])

    def member(self, j: int) -> dict[str, Tensor]:
        """The parameters of member j as an unstacked dict."""
        return {k: v[j] for k, v in self.params.items()}


# ----------------------------------------------------------------------------------------------- set-up


def model_with(model: nn.Module, params: Params | None = None, *, dtype: torch.dtype | None = None,
               device: torch.device | str | None = None) -> nn.Module:
    """A private copy of ``model`` (cast to ``dtype`` / ``device``) holding ``params`` where given.

    Training never mutates the caller's module: frozen parameters are read from this copy.
    """
    work = copy.deepcopy(model)
    if dtype is not None or device is not None:
        work = work.to(device=device, dtype=dtype)
    if params:
        named = dict(work.named_parameters())
        missing = [k for k in params if k not in named]
        if missing:
            raise KeyError(f"model has no parameters {missing}; it has {list(named)}")
        with torch.no_grad():
            for k, v in params.items():
                if tuple(v.shape) != tuple(named[k].shape):
                    raise ValueError(f"parameter {k!r}: shape {tuple(v.shape)} does not match the model's "
                                     f"{tuple(named[k].shape)}")
                named[k].copy_(v)
    return work


def _cast_data(x: Tensor, y: Tensor, recipe: Recipe) -> tuple[Tensor, Tensor]:
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} rows but y has {y.shape[0]}: they must match")
    if x.is_floating_point():
        x = x.to(recipe.torch_dtype)
    if recipe.loss == "cross_entropy":
        if y.is_floating_point():
            raise ValueError("cross_entropy needs integer class labels y; got floating targets (use loss='mse'?)")
        y = y.long()
    else:
        y = y.to(device=x.device, dtype=recipe.torch_dtype)
    return x, y


def weighted_objective(model: nn.Module, recipe: Recipe) -> MemberObjective:
    """The member objective of ordinary training: aux = (w,), w ``[n]`` the member's per-sample weights.

    On a batch the data term is ``scale · Σ_{i∈batch} w_i ℓ_i`` with scale = n/|batch| (unbiased for the full
    Σ_i w_i ℓ_i); the L2 term (λ/2)‖θ‖² is added whole.
    """

    def member_objective(params, aux, xb, yb, idx, scale):
        (w,) = aux
        wb = w if idx is None else w[idx]
        if scale != 1.0:
            wb = wb * scale
        return objective(model, params, xb, yb, weights=wb, l2=recipe.weight_decay, loss=recipe.loss)

    return member_objective


def _batches(n: int, recipe: Recipe, gen: torch.Generator | None, device: torch.device
             ) -> Iterator[tuple[Tensor | None, float]]:
    """Indices and scale n/|B| of one epoch's batches; full batch → (None, 1.0)."""
    if recipe.batch_size is None or recipe.batch_size >= n:
        yield None, 1.0
        return
    perm = torch.randperm(n, generator=gen).to(device)
    for start in range(0, n, recipe.batch_size):
        idx = perm[start:start + recipe.batch_size]
        yield idx, n / idx.numel()


def _scheduled_lr(recipe: Recipe, epoch: int) -> float:
    """The lr of the closed-form schedules (cosine, step) at 0-based ``epoch``."""
    if recipe.schedule == "cosine":
        return recipe.lr * 0.5 * (1.0 + math.cos(math.pi * epoch / recipe.epochs))
    if recipe.schedule == "step":
        return recipe.lr * (1.0 / recipe.factor) ** (epoch // recipe.step_size)
    return recipe.lr


def _swa_first_epoch(recipe: Recipe) -> int | None:
    """First 0-based epoch whose end-of-epoch parameters enter the SWA average (None: SWA off)."""
    if recipe.swa_start is None:
        return None
    return min(int(math.floor(recipe.swa_start * recipe.epochs)), recipe.epochs - 1)


def _non_finite(epoch: int | str, what: str, recipe: Recipe, member: int | None = None) -> FloatingPointError:
    who = "" if member is None else f" (ensemble member {member})"
    return FloatingPointError(
        f"non-finite {what} at {epoch}{who} with optimizer {recipe.optimizer!r}, lr {recipe.lr}, dtype "
        f"{recipe.dtype}: training diverged — lower the learning rate, use dtype='float64', or check the data "
        "for NaN/inf")


def _progress(total: int, progress: bool, desc: str):
    return progress_bar(total, desc, progress)


def _names_and_model(recipe: Recipe, model: nn.Module, x: Tensor, params: str | list[str],
                     frozen_values: Params | None) -> tuple[nn.Module, list[str]]:
    names = param_names(model, params)
    if not names:
        raise ValueError(f"parameter subset {params!r} selects no parameters of {type(model).__name__}")
    work = model_with(model, None, dtype=recipe.torch_dtype, device=x.device)
    if frozen_values:
        frozen = {k: v for k, v in frozen_values.items() if k not in names}
        if frozen:
            work = model_with(work, {k: v.to(device=x.device, dtype=recipe.torch_dtype) for k, v in frozen.items()})
    # torch.func differentiates the params it is given; frozen ones requiring grad would only make every
    # forward pass record a useless autograd graph (and results that "require grad").
    work.requires_grad_(False)
    return work, names


# ------------------------------------------------------------------------------------------- one model


def fit(recipe: Recipe, model: nn.Module, x: Tensor, y: Tensor, *, weights: Tensor | None = None,
        init: Params | None = None, params: str | list[str] = "all", progress: bool = True,
        cache: bool = False) -> FitResult:
    """Train one model on (x, y) by ``recipe``; the caller's module is never modified.

    Args:
        recipe: the :class:`Recipe`.
        model: the module; parameters outside ``params`` stay frozen at its values (or at ``init``'s).
        x: ``[n, ...]`` inputs; y: ``[n]`` labels (cross-entropy) or targets (mse).
        weights: ``[n]`` per-sample weights w_i (e.g. a row of :func:`helpers.objective.removal_weights`);
            default 1/n each.
        init: starting values ``{name: tensor}`` (e.g. θ̂ for a warm start); default the module's values.
            Entries for frozen parameters set the frozen values.
        params: the trained subset: ``"all"``, ``"last"`` (``model.last_layer``) or a list of names.
        progress: show a bar (:mod:`helpers.progress`: terminal and notebook, never in the rendered book).
        cache: memoise the result on disk (:mod:`helpers.cache`), keyed by recipe, model (architecture and
            values), data, weights, init and subset — so a chapter's θ̂ is bit-for-bit the same on a rebuild and
            every result keyed on it is reused.

    Returns:
        :class:`FitResult`. Adam / SGD use ``torch.optim`` (and ``ReduceLROnPlateau`` for ``"plateau"``);
        Newton and L-BFGS run to ``recipe.tol`` on ‖∇R‖₂ or ``recipe.max_iter`` iterations.

    Raises:
        FloatingPointError: a non-finite loss or gradient (names the epoch; lower lr or use float64).
    """
    if cache:
        from helpers.cache import memoize

        key = {"recipe": recipe.to_dict(), "model": model, "data": [x, y], "weights": weights, "init": init,
               "params": params}
        return memoize("fit", key, lambda: fit(recipe, model, x, y, weights=weights, init=init, params=params,
                                               progress=progress))
    x, y = _cast_data(x, y, recipe)
    work, names = _names_and_model(recipe, model, x, params, init)
    start = _start_values(work, names, init, x.device, recipe.torch_dtype)
    n = x.shape[0]
    w = _weights(weights, n, x, recipe)
    member_objective = weighted_objective(work, recipe)
    if recipe.optimizer in ("adam", "sgd"):
        return _fit_torch_optim(recipe, member_objective, start, (w,), x, y, progress)
    if recipe.optimizer == "lbfgs":
        return _fit_lbfgs(recipe, member_objective, start, (w,), x, y, progress)
    res = _newton_ensemble(recipe, member_objective, {k: v[None] for k, v in start.items()}, (w[None],), x, y,
                           progress)
    return FitResult({k: v[0] for k, v in res.params.items()}, float(res.loss[0]), float(res.grad_norm[0]),
                     res.history[0][~np.isnan(res.history[0])], bool(res.converged[0]), float(res.lr[0]))


def _start_values(work: nn.Module, names: list[str], init: Params | None, device, dtype) -> dict[str, Tensor]:
    named = dict(work.named_parameters())
    if init is None:
        return {k: named[k].detach().clone() for k in names}
    missing = [k for k in names if k not in init]
    if missing:
        raise KeyError(f"init lacks the trained parameters {missing}: give all of {names}")
    out = {}
    for k in names:
        v = init[k].detach().to(device=device, dtype=dtype).clone()
        if v.shape != named[k].shape:
            raise ValueError(f"init[{k!r}] has shape {tuple(v.shape)}, the model's is {tuple(named[k].shape)}")
        out[k] = v
    return out


def _weights(weights: Tensor | None, n: int, x: Tensor, recipe: Recipe) -> Tensor:
    if weights is None:
        return torch.full((n,), 1.0 / n, dtype=recipe.torch_dtype, device=x.device)
    w = torch.as_tensor(weights).to(device=x.device, dtype=recipe.torch_dtype)
    if w.shape != (n,):
        raise ValueError(f"weights must be [n] = [{n}], got {tuple(w.shape)}")
    if not torch.isfinite(w).all():
        raise ValueError("weights contain NaN/inf")
    return w


def _final_eval(member_objective: MemberObjective, params: dict, aux: tuple, x: Tensor, y: Tensor
                ) -> tuple[float, float]:
    g, val = grad_and_value(member_objective)(params, aux, x, y, None, 1.0)
    gn = torch.sqrt(sum((t * t).sum() for t in g.values()))
    return float(val), float(gn)


def _fit_torch_optim(recipe: Recipe, member_objective: MemberObjective, start: dict, aux: tuple,
                     x: Tensor, y: Tensor, progress: bool) -> FitResult:
    """Adam / SGD with torch.optim on leaf tensors; gradients come from torch.func (frozen params untouched)."""
    leaves = {k: v.clone().requires_grad_(True) for k, v in start.items()}
    plist = list(leaves.values())
    if recipe.optimizer == "adam":
        opt = torch.optim.Adam(plist, lr=recipe.lr, betas=recipe.betas, eps=recipe.eps, amsgrad=recipe.amsgrad,
                               foreach=False)
    else:
        opt = torch.optim.SGD(plist, lr=recipe.lr, momentum=recipe.momentum, foreach=False)
    sched = None
    if recipe.schedule == "plateau":
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt, mode="min", factor=1.0 / recipe.factor, patience=recipe.patience, threshold=PLATEAU_THRESHOLD,
            threshold_mode="rel", eps=PLATEAU_EPS)
    gen = torch.Generator().manual_seed(recipe.seed)
    n = x.shape[0]
    vg = grad_and_value(member_objective)
    swa_first, swa, swa_count = _swa_first_epoch(recipe), None, 0
    history = np.empty(recipe.epochs)
    floor_epoch, epochs_run = -1, recipe.epochs
    bar = _progress(recipe.epochs, progress, f"fit {recipe.optimizer}")
    for epoch in range(recipe.epochs):
        if recipe.schedule in ("cosine", "step"):
            opt.param_groups[0]["lr"] = _scheduled_lr(recipe, epoch)
        epoch_loss = 0.0
        for idx, scale in _batches(n, recipe, gen, x.device):
            xb, yb = (x, y) if idx is None else (x[idx], y[idx])
            g, val = vg({k: v.detach() for k, v in leaves.items()}, aux, xb, yb, idx, scale)
            if not math.isfinite(float(val)):
                raise _non_finite(f"epoch {epoch}", "training loss", recipe)
            for k, p in leaves.items():
                if not torch.isfinite(g[k]).all():
                    raise _non_finite(f"epoch {epoch}", f"gradient of {k!r}", recipe)
                p.grad = g[k].detach()
            opt.step()
            # Same accumulation as the ensemble: the full-batch value itself, else the size-weighted mean.
            epoch_loss = float(val) if idx is None else epoch_loss + (idx.numel() / n) * float(val)
        history[epoch] = epoch_loss
        if sched is not None:
            sched.step(epoch_loss)
        if swa_first is not None and epoch >= swa_first:
            with torch.no_grad():
                if swa is None:
                    swa = {k: v.detach().clone() for k, v in leaves.items()}
                else:
                    for k, v in leaves.items():
                        swa[k] += (v.detach() - swa[k]) / (swa_count + 1)
                swa_count += 1
        bar.update(1)
        if sched is not None and floor_epoch < 0 and bool(_at_floor(
                torch.tensor([opt.param_groups[0]["lr"]], dtype=torch.float64), recipe)):
            floor_epoch = epoch + 1
            if recipe.stop_at_floor:
                epochs_run = epoch + 1
                break
    bar.close()
    if swa_first is not None and epochs_run < recipe.epochs:
        # complete the average with the parameters held for the skipped epochs (see Recipe.stop_at_floor)
        total = recipe.epochs - swa_first
        with torch.no_grad():
            swa = {k: (swa_count * (swa[k] if swa is not None else 0) + (total - swa_count) * v.detach()) / total
                   for k, v in leaves.items()}
    final = swa if swa is not None else {k: v.detach().clone() for k, v in leaves.items()}
    loss, gn = _final_eval(member_objective, final, aux, x, y)
    if not (math.isfinite(loss) and math.isfinite(gn)):
        raise _non_finite("the end of training", "loss or gradient", recipe)
    history[epochs_run:] = history[epochs_run - 1]
    return FitResult(final, loss, gn, history, gn < recipe.tol, float(opt.param_groups[0]["lr"]), floor_epoch,
                     epochs_run)


def _fit_lbfgs(recipe: Recipe, member_objective: MemberObjective, start: dict, aux: tuple, x: Tensor,
               y: Tensor, progress: bool) -> FitResult:
    """torch.optim.LBFGS (strong Wolfe), one iteration per ``step`` call so ‖∇R‖₂ can be checked each time.

    LBFGS keeps its curvature pairs in its state between calls, so this is the same algorithm as one long call;
    its own stopping rules (∞-norm, loss change) are switched off in favour of ‖∇R‖₂ < tol.
    """
    leaves = {k: v.clone().requires_grad_(True) for k, v in start.items()}
    opt = torch.optim.LBFGS(list(leaves.values()), lr=recipe.lr, max_iter=1, max_eval=1 + LBFGS_MAX_LS,
                            tolerance_grad=0.0, tolerance_change=0.0, history_size=100,
                            line_search_fn="strong_wolfe")
    vg = grad_and_value(member_objective)
    cached: dict[str, Any] = {}

    def evaluate():
        g, val = vg({k: v.detach() for k, v in leaves.items()}, aux, x, y, None, 1.0)
        return g, val

    def closure():
        # The first call of each step is at the point just checked: reuse that evaluation.
        g, val = cached.pop("pending") if "pending" in cached else evaluate()
        if not math.isfinite(float(val)):
            raise _non_finite(f"L-BFGS iteration {cached.get('it')}", "training loss", recipe)
        for k, p in leaves.items():
            p.grad = g[k].detach().clone()
        return val.detach()

    history = []
    gn = float("inf")
    bar = _progress(recipe.max_iter, progress, "fit lbfgs")
    for it in range(recipe.max_iter + 1):
        g, val = evaluate()
        gn = float(torch.sqrt(sum((t * t).sum() for t in g.values())))
        if not (math.isfinite(float(val)) and math.isfinite(gn)):
            raise _non_finite(f"L-BFGS iteration {it}", "loss or gradient", recipe)
        history.append(float(val))
        if gn < recipe.tol or it == recipe.max_iter:
            break
        before = torch.cat([v.detach().reshape(-1) for v in leaves.values()])
        cached["pending"], cached["it"] = (g, val), it
        opt.step(closure)
        after = torch.cat([v.detach().reshape(-1) for v in leaves.values()])
        if torch.equal(before, after):  # line search found no progress: stalled at round-off level
            break
        bar.update(1)
    bar.close()
    final = {k: v.detach().clone() for k, v in leaves.items()}
    return FitResult(final, history[-1], gn, np.asarray(history), gn < recipe.tol, recipe.lr)


# ------------------------------------------------------------------------------------------- ensembles


def fit_ensemble(recipe: Recipe, model: nn.Module, x: Tensor, y: Tensor, *, weights: Tensor | None = None,
                 inits: Params | None = None, seeds: list[int] | None = None, params: str | list[str] = "all",
                 progress: bool = True, on_epoch: EpochHook | None = None) -> EnsembleResult:
    """Train k models at once as one vectorised ensemble (vmap over stacked parameters).

    Member j behaves exactly like ``fit(recipe, model, x, y, weights=weights[j], init=inits[j])`` (or
    ``init=init_params(model, seeds[j], params)``) — same optimizer, per-member schedule and SWA, same
    mini-batch order — up to floating-point round-off.

    Args:
        weights: ``[k, n]`` per-member sample weights (rows of :func:`helpers.objective.removal_weights`), or
            None (1/n for every member).
        inits: starting values, stacked ``{name: [k, ...]}`` or a single dict broadcast to all members (a single
            dict may also hold frozen parameters' values); default the module's values.
        seeds: k seeds for a random initialisation of each member (:func:`helpers.models.init_params`);
            excludes ``inits``.
        params: trained subset, as in :func:`fit`.
        on_epoch: called after every epoch as ``on_epoch(epoch, stacked_params)`` (Adam / SGD without
            ``stop_at_floor``; see :data:`EpochHook`) — how :func:`helpers.retrain.warm_start` records trajectories.

    Returns:
        :class:`EnsembleResult` (stacked params ``[k, ...]``).

    Cost: one vmapped forward/backward over k members per step — memory k × (parameters + activations), the
    members vmapped in chunks that fit :func:`helpers.memory.budget` (:func:`member_chunk`; all at once when they
    fit, which leaves the numbers exactly as before). Newton: k dense Hessians, processed in chunks of at most
    256 MB. L-BFGS has no batched form here: its members run one after another.
    """
    x, y = _cast_data(x, y, recipe)
    single_init = inits is not None and _is_single(model, inits)
    work, names = _names_and_model(recipe, model, x, params, inits if single_init else None)
    k = _ensemble_size(weights, inits, seeds, single_init)
    dtype, dev = recipe.torch_dtype, x.device
    if seeds is not None:
        if inits is not None:
            raise ValueError("give either inits or seeds, not both")
        # Drawn from the caller's module (its dtype), exactly as fit(init=init_params(model, s)) would be.
        per = [init_params(model, s, names) for s in seeds]
        start = {n_: torch.stack([p[n_] for p in per]).to(device=dev, dtype=dtype) for n_ in names}
    elif inits is None or single_init:
        one = _start_values(work, names, inits, dev, dtype)
        start = {n_: v.unsqueeze(0).expand(k, *v.shape).clone() for n_, v in one.items()}
    else:
        extra = [n_ for n_ in inits if n_ not in names]
        if extra:
            raise ValueError(f"stacked inits hold frozen parameters {extra}: frozen values cannot differ per "
                             "member — pass them in a single (unstacked) dict or train them too")
        start = {}
        for n_ in names:
            if n_ not in inits:
                raise KeyError(f"inits lacks the trained parameter {n_!r}")
            start[n_] = inits[n_].detach().to(device=dev, dtype=dtype).clone()
    n = x.shape[0]
    if weights is None:
        w = torch.full((k, n), 1.0 / n, dtype=dtype, device=dev)
    else:
        w = torch.as_tensor(weights).to(device=dev, dtype=dtype)
        if w.shape != (k, n):
            raise ValueError(f"weights must be [k, n] = [{k}, {n}], got {tuple(w.shape)}")
        if not torch.isfinite(w).all():
            raise ValueError("weights contain NaN/inf")
    return train_ensemble(recipe, weighted_objective(work, recipe), start, (w,), x, y, progress=progress,
                          on_epoch=on_epoch)


def _is_single(model: nn.Module, inits: Params) -> bool:
    named = dict(model.named_parameters())
    singles = [k for k, v in inits.items() if k in named and tuple(v.shape) == tuple(named[k].shape)]
    if singles and len(singles) != len(inits):
        raise ValueError("inits mixes stacked [k, ...] and single tensors: stack all or none")
    return bool(singles)


def _ensemble_size(weights, inits, seeds, single_init) -> int:
    sizes = {}
    if weights is not None:
        sizes["weights"] = int(torch.as_tensor(weights).shape[0])
    if seeds is not None:
        sizes["seeds"] = len(seeds)
    if inits is not None and not single_init:
        sizes["inits"] = int(next(iter(inits.values())).shape[0])
    if not sizes:
        raise ValueError("cannot tell the ensemble size k: give weights [k, n], stacked inits or k seeds")
    if len(set(sizes.values())) != 1:
        raise ValueError(f"inconsistent ensemble sizes {sizes}: they must agree")
    return next(iter(sizes.values()))


def train_ensemble(recipe: Recipe, member_objective: MemberObjective, start: dict[str, Tensor], aux: tuple,
                   x: Tensor, y: Tensor, *, progress: bool = True, on_epoch: EpochHook | None = None
                   ) -> EnsembleResult:
    """Minimise a custom per-member objective for k stacked members (the engine behind :func:`fit_ensemble`).

    Args:
        member_objective: ``f(params, aux, xb, yb, idx, scale) -> scalar`` for one member (see
            :data:`MemberObjective`); vmapped over the leading axis of ``start`` and of every tensor of ``aux``.
        start: stacked initial values ``{name: [k, ...]}`` (not modified).
        aux: tuple of per-member tensors ``[k, ...]`` (e.g. the weights ``[k, n]``).
        x, y: training data, already in the recipe's dtype.

    Used directly by :mod:`helpers.retrain` for the PBRF objective. ``on_epoch``: see :func:`fit_ensemble`.
    """
    if on_epoch is not None and (recipe.optimizer not in ("adam", "sgd") or recipe.stop_at_floor):
        raise ValueError(f"on_epoch needs an epoch-based recipe (Adam or SGD) without stop_at_floor, got optimizer "
                         f"{recipe.optimizer!r}, stop_at_floor={recipe.stop_at_floor}")
    if recipe.optimizer == "newton":
        return _newton_ensemble(recipe, member_objective, start, aux, x, y, progress)
    if recipe.optimizer == "lbfgs":
        results = [_fit_lbfgs(recipe, member_objective, {k: v[j] for k, v in start.items()},
                              tuple(a[j] for a in aux), x, y, progress) for j in range(_k_of(start))]
        hist_len = max(len(r.history) for r in results)
        hist = np.full((len(results), hist_len), np.nan)
        for j, r in enumerate(results):
            hist[j, :len(r.history)] = r.history
        return EnsembleResult({k: torch.stack([r.params[k] for r in results]) for k in start},
                              np.array([r.loss for r in results]), np.array([r.grad_norm for r in results]),
                              hist, np.array([r.converged for r in results]), np.array([r.lr for r in results]))
    return _first_order_ensemble(recipe, member_objective, start, aux, x, y, progress, on_epoch)


def _at_floor(lr: Tensor, recipe: Recipe) -> Tensor:
    """Which plateau learning rates can no longer fall: ReduceLROnPlateau skips a reduction smaller than eps."""
    return ~(lr - lr * (1.0 / recipe.factor) > PLATEAU_EPS)


# Adam's largest step per coordinate, in units of lr, for t large enough that the bias corrections are ~1:
# |m_t| <= (1-b1) Σ_s b1^(t-s) |g_s| and, by Cauchy-Schwarz against v_t = (1-b2) Σ_s b2^(t-s) g_s²,
# |m_t| / sqrt(v_t) <= (1-b1) / sqrt((1-b2)(1 - b1²/b2)).  For (0.9, 0.999): 7.27. (Typical steps are ~1·lr.)
def adam_step_bound(betas: tuple[float, float] = (0.9, 0.999)) -> float:
    """The largest |Adam step| per coordinate divided by lr (bias corrections ≈ 1; eps only shrinks the step)."""
    b1, b2 = betas
    if not b1 * b1 < b2:
        raise ValueError(f"the bound needs b1² < b2, got betas {betas}")
    return (1 - b1) / math.sqrt((1 - b2) * (1 - b1 * b1 / b2))


def floor_bound(recipe: Recipe, epochs_run: np.ndarray | int, lr_floor: np.ndarray | float) -> np.ndarray:
    """What the epochs skipped by ``stop_at_floor`` could still have changed, per coordinate (∞-norm).

    A member stopped after ``epochs_run`` of ``recipe.epochs`` epochs at learning rate ``lr_floor``; each
    remaining epoch moves a coordinate by at most ``adam_step_bound · lr`` (Adam) or ``lr · |g|`` (SGD: not
    bounded without |g|, so SGD raises). The same bound holds for the SWA average, an average of such points.
    Multiply by ‖∇ℓ‖₁ for a first-order bound on a loss (nats).
    """
    if recipe.optimizer != "adam":
        raise ValueError("floor_bound is for Adam (its step is bounded independently of the gradient)")
    remaining = recipe.epochs - np.asarray(epochs_run, dtype=np.float64)
    return adam_step_bound(recipe.betas) * np.asarray(lr_floor, dtype=np.float64) * remaining


def _batched_call(fn: Callable, params: dict[str, Tensor], aux: tuple, *rest: Any, chunk: int | None = None
                  ) -> tuple[dict[str, Tensor], Tensor]:
    """``fn(params, aux, *rest)`` of a vmapped member function, never on a batch of one member.

    torch takes another kernel path for a batch of one (e.g. ``mm`` for ``bmm``); a lone member (an ensemble of
    one, or the last member left after the others stopped at their floor) is paired with a copy of itself so
    that every step runs on the batched path. Batched kernels still block differently for different batch
    sizes, so in float32 a member's trajectory depends on its ensemble: the ensemble, not the member, is the
    unit of exact recomputation (:meth:`helpers.experiments.nonconvex.IrisSweepConfig.chunks`).

    ``chunk``: at most that many members per call (:func:`member_chunk`; None: all at once), results concatenated.
    """
    k = _k_of(params)
    if chunk is not None and k > chunk:
        parts = [_batched_call(fn, {n: v[s:s + chunk] for n, v in params.items()},
                               tuple(a[s:s + chunk] for a in aux), *rest) for s in range(0, k, chunk)]
        return {n: torch.cat([g[n] for g, _ in parts]) for n in parts[0][0]}, torch.cat([v for _, v in parts])
    if k != 1:
        return fn(params, aux, *rest)
    g, val = fn({k: torch.cat([v, v]) for k, v in params.items()}, tuple(torch.cat([a, a]) for a in aux), *rest)
    return {k: v[:1] for k, v in g.items()}, val[:1]


def call_in_chunks(fn: Callable, params: dict[str, Tensor], aux: tuple, *rest: Any, chunk: int | None = None
                   ) -> tuple[dict[str, Tensor], Tensor]:
    """A vmapped member function ``fn(params, aux, *rest)`` (e.g. ``vmap(grad_and_value(member_objective))``) on
    the stacked members ``[k, ...]``, at most ``chunk`` members per call (:func:`member_chunk`), never a batch of
    one: ``(gradients {name: [k, ...]}, values [k])``, as one call would give them. Members are independent, so
    the chunks change the memory, not the numbers (up to the blocking of batched kernels: see
    :func:`_batched_call`)."""
    return _batched_call(fn, params, aux, *rest, chunk=chunk)


def member_chunk(member_objective: MemberObjective, start: dict[str, Tensor], aux: tuple, x: Tensor, y: Tensor,
                 batch_rows: int | None = None) -> int | None:
    """Members per vmapped call of ``grad_and_value(member_objective)`` on batches of ``batch_rows`` rows (None: all
    n) so that their activations fit in :func:`helpers.memory.budget`; None when all k members fit at once.

    One member's activation bytes per row are measured on a few rows (:func:`helpers.memory.row_bytes`, the
    objective called with ``idx = arange(m)``), times :data:`helpers.memory.GRAD_FACTOR`, plus its parameters,
    gradients and optimizer state (five copies). If the measurement fails (an objective that cannot be called on a
    few rows) the ensemble runs unchunked, as before.
    """
    k, n = _k_of(start), x.shape[0]
    rows = n if batch_rows is None else min(n, int(batch_rows))
    one = {name: v[0].detach() for name, v in start.items()}
    aux_one = tuple(a[0] for a in aux)
    try:
        leaves = {name: v.clone().requires_grad_(True) for name, v in one.items()}

        def loss_of_rows(xr: Tensor, yr: Tensor) -> Tensor:
            idx = torch.arange(xr.shape[0], device=xr.device)
            return member_objective(leaves, aux_one, xr, yr, idx, 1.0)

        per_row = memory.row_bytes(loss_of_rows, x, y)
    except Exception:  # noqa: BLE001 - the measurement is an optimisation only
        return None
    state = 5 * sum(v.numel() * v.element_size() for v in one.values())
    c = memory.chunk(k, memory.GRAD_FACTOR * per_row * rows + state)
    return None if c >= k else c


def _k_of(start: dict[str, Tensor]) -> int:
    return int(next(iter(start.values())).shape[0])


def _bcast(v: Tensor, like: Tensor) -> Tensor:
    """A [k] tensor viewed as [k, 1, ...] to scale a stacked parameter."""
    return v.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def _check_finite(val: Tensor, g: dict[str, Tensor], where: str, recipe: Recipe) -> None:
    # One reduction per member (NaN/inf propagate through sums) and one host sync per step.
    total = val.detach() + sum(t.detach().flatten(1).sum(1) for t in g.values())
    ok = torch.isfinite(total)
    if not bool(ok.all()):
        j = int((~ok).nonzero()[0, 0])
        raise _non_finite(where, "loss or gradient", recipe, member=j)


def _first_order_ensemble(recipe: Recipe, member_objective: MemberObjective, start: dict, aux: tuple,
                          x: Tensor, y: Tensor, progress: bool, on_epoch: EpochHook | None = None
                          ) -> EnsembleResult:
    """Batched Adam / AMSGrad / SGD(+momentum) with per-member lr schedules and SWA.

    The update formulas are those of ``torch.optim`` (single-tensor path), written on stacked tensors. With
    ``recipe.stop_at_floor`` a member leaves the ensemble at the end of the epoch in which its plateau learning
    rate reached the floor; the ensemble is compacted to the members still running (so the cost is that of the
    epochs before each member's floor), and stops when none is left. A member's trajectory does not depend on
    which other members share its ensemble.
    """
    k, n = _k_of(start), x.shape[0]
    dev = x.device
    params = {name: v.clone() for name, v in start.items()}
    vg = vmap(grad_and_value(member_objective), in_dims=(0, 0, None, None, None, None))
    lr = torch.full((k,), recipe.lr, dtype=torch.float64, device=dev)
    # Plateau state per member, as in ReduceLROnPlateau: best loss so far and bad-epoch count.
    best = torch.full((k,), math.inf, dtype=torch.float64, device=dev)
    bad = torch.zeros(k, dtype=torch.long, device=dev)
    b1, b2 = recipe.betas
    m = {name: torch.zeros_like(v) for name, v in params.items()}
    v2 = {name: torch.zeros_like(v) for name, v in params.items()}
    vmax = {name: torch.zeros_like(v) for name, v in params.items()} if recipe.amsgrad else None
    buf: dict[str, Tensor] | None = None
    step = 0
    gen = torch.Generator().manual_seed(recipe.seed)
    swa_first, swa = _swa_first_epoch(recipe), None
    swa_count = torch.zeros(k, dtype=torch.float64, device=dev)
    history = torch.empty((k, recipe.epochs), dtype=torch.float64, device=dev)
    original_aux = aux
    floor_stop = recipe.stop_at_floor and recipe.schedule == "plateau"
    # `alive[j]` is the original index of running member j; finished members are written to `done_*`.
    alive = torch.arange(k, device=dev)
    done_params = {name: v.clone() for name, v in params.items()}
    done_swa = {name: torch.zeros_like(v) for name, v in params.items()}
    done_count = torch.zeros(k, dtype=torch.float64, device=dev)
    done_lr = torch.full((k,), recipe.lr, dtype=torch.float64, device=dev)
    epochs_run = torch.full((k,), recipe.epochs, dtype=torch.long, device=dev)
    floor_epoch = torch.full((k,), -1, dtype=torch.long, device=dev)
    bar = _progress(recipe.epochs, progress, f"ensemble of {k} ({recipe.optimizer})")
    # members per vmapped call, within the memory budget (None: all at once); the last call's on the full data
    chunk = member_chunk(member_objective, start, aux, x, y, recipe.batch_size)
    final_chunk = chunk if recipe.batch_size is None else member_chunk(member_objective, start, aux, x, y)
    for epoch in range(recipe.epochs):
        if recipe.schedule in ("cosine", "step"):
            lr.fill_(_scheduled_lr(recipe, epoch))
        epoch_loss = torch.zeros(len(alive), dtype=torch.float64, device=dev)
        for idx, scale in _batches(n, recipe, gen, dev):
            xb, yb = (x, y) if idx is None else (x[idx], y[idx])
            g, val = _batched_call(vg, params, aux, xb, yb, idx, scale, chunk=chunk)
            _check_finite(val, g, f"epoch {epoch}", recipe)
            step += 1
            with torch.no_grad():
                if recipe.optimizer == "adam":
                    bc1 = 1 - b1 ** step
                    bc2_sqrt = (1 - b2 ** step) ** 0.5
                    neg_step = -(lr / bc1)
                    for name, p in params.items():
                        gi = g[name]
                        m[name].lerp_(gi, 1 - b1)
                        v2[name].mul_(b2).addcmul_(gi, gi, value=1 - b2)
                        if vmax is not None:
                            torch.maximum(vmax[name], v2[name], out=vmax[name])
                            denom = (vmax[name].sqrt() / bc2_sqrt).add_(recipe.eps)
                        else:
                            denom = (v2[name].sqrt() / bc2_sqrt).add_(recipe.eps)
                        p.add_((_bcast(neg_step, p) * m[name]).div_(denom))
                else:
                    if recipe.momentum != 0:
                        if buf is None:
                            buf = {name: gi.clone() for name, gi in g.items()}
                        else:
                            for name in params:
                                buf[name].mul_(recipe.momentum).add_(g[name])
                        d = buf
                    else:
                        d = g
                    for name, p in params.items():
                        p.add_(d[name] * _bcast(-lr, p))
            if idx is None:
                epoch_loss = val.detach().double()
            else:
                epoch_loss += (idx.numel() / n) * val.detach().double()
        history[alive, epoch] = epoch_loss
        if recipe.schedule == "plateau":
            better = epoch_loss < best * (1.0 - PLATEAU_THRESHOLD)
            best = torch.where(better, epoch_loss, best)
            bad = torch.where(better, torch.zeros_like(bad), bad + 1)
            reduce = bad > recipe.patience
            new_lr = lr * (1.0 / recipe.factor)
            lr = torch.where(reduce & (lr - new_lr > PLATEAU_EPS), new_lr, lr)
            bad = torch.where(reduce, torch.zeros_like(bad), bad)
        if swa_first is not None and epoch >= swa_first:
            if swa is None:
                swa = {name: p.clone() for name, p in params.items()}
            else:
                for name, p in params.items():
                    swa[name] += (p - swa[name]) / _bcast(swa_count + 1, p)
            swa_count += 1
        bar.update(1)
        if on_epoch is not None:
            on_epoch(epoch + 1, params)
        if recipe.schedule == "plateau":
            at_floor = _at_floor(lr, recipe)
            floor_epoch[alive] = torch.where(at_floor & (floor_epoch[alive] < 0), epoch + 1, floor_epoch[alive])
        if floor_stop:
            if bool(at_floor.any()) or epoch == recipe.epochs - 1:
                fin = at_floor if epoch < recipe.epochs - 1 else torch.ones_like(at_floor)
                out = alive[fin]
                epochs_run[out] = epoch + 1
                done_lr[out] = lr[fin]
                done_count[out] = swa_count[fin]
                for name, p in params.items():
                    done_params[name][out] = p[fin]
                    if swa is not None:
                        done_swa[name][out] = swa[name][fin]
                keep = ~fin
                if not bool(keep.any()):
                    history[out, epoch + 1:] = history[out, epoch:epoch + 1]
                    break
                # history after a member's stop: its last epoch's objective (it would change by < floor_bound)
                history[out, epoch + 1:] = history[out, epoch:epoch + 1]
                alive = alive[keep]
                params = {name: p[keep] for name, p in params.items()}
                m = {name: t[keep] for name, t in m.items()}
                v2 = {name: t[keep] for name, t in v2.items()}
                if vmax is not None:
                    vmax = {name: t[keep] for name, t in vmax.items()}
                if buf is not None:
                    buf = {name: t[keep] for name, t in buf.items()}
                if swa is not None:
                    swa = {name: t[keep] for name, t in swa.items()}
                aux = tuple(a[keep] for a in aux)
                lr, best, bad, swa_count = lr[keep], best[keep], bad[keep], swa_count[keep]
    bar.close()
    if floor_stop:
        params, lr = done_params, done_lr
        if swa_first is not None:
            # SWA over epochs [swa_first, epochs): a member that stopped early holds its last parameters for the
            # rest, so the average is completed with them (exact up to floor_bound).
            total = float(recipe.epochs - swa_first)
            # members stopped before averaging began hold their parameters all along: their average is exactly them
            swa = {name: torch.where(_bcast(done_count, p) > 0, (_bcast(done_count, p) * done_swa[name]
                                                                 + _bcast(total - done_count, p) * p) / total, p)
                   for name, p in params.items()}
        aux = original_aux
    final = swa if swa is not None else params
    g, val = _batched_call(vmap(grad_and_value(member_objective), in_dims=(0, 0, None, None, None, None)),
                           final, aux, x, y, None, 1.0, chunk=final_chunk)
    _check_finite(val, g, "the end of training", recipe)
    gn = torch.sqrt(sum(t.pow(2).flatten(1).sum(1) for t in g.values()))
    return EnsembleResult(final, val.detach().double().cpu().numpy(), gn.double().cpu().numpy(),
                          history.cpu().numpy(), (gn < recipe.tol).cpu().numpy(), lr.cpu().numpy(),
                          floor_epoch.cpu().numpy(), epochs_run.cpu().numpy(), params if swa is not None else None)


# ---------------------------------------------------------------------------------------------- Newton


def _flattener(start: dict[str, Tensor]):
    names = list(start)
    shapes = [tuple(v.shape[1:]) for v in start.values()]
    sizes = [math.prod(s) for s in shapes]

    def unflatten(flat: Tensor) -> dict[str, Tensor]:
        return {nm: part.reshape(sh) for nm, part, sh in zip(names, flat.split(sizes), shapes)}

    def flatten(stacked: dict[str, Tensor]) -> Tensor:
        return torch.cat([stacked[nm].reshape(stacked[nm].shape[0], -1) for nm in names], dim=1)

    return flatten, unflatten, sum(sizes)


def _dense_hessian(f: Callable[[Tensor], Tensor], d: int) -> Callable[[Tensor], Tensor]:
    """∇²f as a d×d matrix: forward-over-reverse for small d, chunked reverse-over-reverse for large d
    (bounds the memory of the d simultaneous tangents)."""
    if d <= 2048:
        hess = torch.func.hessian(f)

        def quiet_hessian(*args):
            # torch's forward-mode AD loads decompositions through the deprecated torch.jit.script on first
            # use; the FutureWarning it prints is torch-internal and says nothing about this computation.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
                return hess(*args)

        return quiet_hessian
    return torch.func.jacrev(torch.func.grad(f), chunk_size=256)


def _newton_direction(H: Tensor, g: Tensor, it: int, members: Tensor, recipe: Recipe) -> Tensor:
    """p = −H⁻¹g per member: Cholesky; on failure or near-singularity, eigendecomposition with the
    pseudo-inverse on the positive part (softmax without L2 has an exact null space); negative curvature
    raises (Newton needs a convex objective)."""
    L, info = torch.linalg.cholesky_ex(H)
    diag = torch.diagonal(L, dim1=-2, dim2=-1).abs()
    rcond = (diag.min(dim=-1).values / diag.max(dim=-1).values.clamp_min(1e-300)) ** 2
    p = torch.empty_like(g)
    good = (info == 0) & (rcond > 1e-12)
    if good.any():
        p[good] = -torch.cholesky_solve(g[good].unsqueeze(-1), L[good]).squeeze(-1)
    for j in (~good).nonzero().reshape(-1).tolist():
        evals, evecs = torch.linalg.eigh(H[j])
        top = evals.abs().max()
        cut = H.shape[-1] * torch.finfo(H.dtype).eps * top
        if evals.min() < -1e3 * cut:
            raise ValueError(
                f"Newton iteration {it}, ensemble member {int(members[j])}: the Hessian is not positive "
                f"semi-definite (smallest eigenvalue {float(evals.min()):.3e}, largest {float(top):.3e}); "
                "Newton needs a convex objective — add weight_decay, or use optimizer 'adam' / 'lbfgs'")
        keep = evals > cut
        coef = (evecs[:, keep].T @ g[j]) / evals[keep]
        p[j] = -(evecs[:, keep] @ coef)
    return p


def _newton_ensemble(recipe: Recipe, member_objective: MemberObjective, start: dict, aux: tuple, x: Tensor,
                     y: Tensor, progress: bool) -> EnsembleResult:
    """Full-batch Newton with Armijo backtracking, each member independently until ‖∇R‖₂ < tol.

    Members that converge (or stall: no Armijo step within 60 halvings) stop; the others go on. Cost per
    iteration and member: d HVPs for the dense Hessian + O(d³) for the solve.
    """
    k = _k_of(start)
    flatten, unflatten, d = _flattener(start)
    theta = flatten(start).clone()

    def f(flat: Tensor, aux_j: tuple) -> Tensor:
        return member_objective(unflatten(flat), aux_j, x, y, None, 1.0)

    vg = vmap(grad_and_value(f))
    vf = vmap(f)
    hess_one = _dense_hessian(f, d)
    vhess = vmap(hess_one)
    chunk = max(1, HESSIAN_BYTES // (d * d * theta.element_size()))
    eps_mach = torch.finfo(theta.dtype).eps
    active = torch.ones(k, dtype=torch.bool, device=theta.device)
    stalled = torch.zeros_like(active)
    history = torch.full((k, recipe.max_iter + 1), math.nan, dtype=torch.float64)
    bar = _progress(recipe.max_iter, progress, f"newton ×{k}")
    gn = torch.full((k,), math.inf, dtype=torch.float64, device=theta.device)
    val = torch.full((k,), math.nan, dtype=theta.dtype, device=theta.device)
    for it in range(recipe.max_iter + 1):
        ids = active.nonzero().reshape(-1)
        if ids.numel() == 0:
            break
        aux_a = tuple(a[ids] for a in aux)
        g_a, val_a = vg(theta[ids], aux_a)
        if not bool(torch.isfinite(val_a).all() & torch.isfinite(g_a).all()):
            bad_j = int(ids[(~(torch.isfinite(val_a) & torch.isfinite(g_a).all(1))).nonzero()[0, 0]])
            raise _non_finite(f"Newton iteration {it}", "loss or gradient", recipe, member=bad_j)
        gn_a = g_a.norm(dim=1)
        gn[ids], val[ids] = gn_a.double(), val_a
        history[ids.cpu(), it] = val_a.double().cpu()
        go = gn_a >= recipe.tol
        if it == recipe.max_iter or not bool(go.any()):
            active[ids[~go]] = False
            break
        active[ids[~go]] = False
        ids, g_a, val_a = ids[go], g_a[go], val_a[go]
        aux_a = tuple(a[ids] for a in aux)
        p = torch.empty_like(g_a)
        for s in range(0, ids.numel(), chunk):
            sl = slice(s, s + chunk)
            th = theta[ids[sl]]
            if th.shape[0] == 1:  # no vmap: lets the large-d chunked Hessian run without a batch dimension
                H = hess_one(th[0], tuple(a[0] for a in tuple(b[sl] for b in aux_a)))[None]
            else:
                H = vhess(th, tuple(a[sl] for a in aux_a))
            p[sl] = _newton_direction(H, g_a[sl], it, ids[sl], recipe)
        slope = (g_a * p).sum(1)
        t = torch.ones_like(val_a)
        ok = torch.zeros_like(go[go])
        slack = 8 * eps_mach * val_a.abs()  # Armijo is blind below round-off: do not backtrack on noise
        for _ in range(MAX_HALVINGS):
            todo = ~ok
            cand = theta[ids[todo]] + t[todo, None] * p[todo]
            new = vf(cand, tuple(a[todo] for a in aux_a))
            acc = new <= val_a[todo] + ARMIJO_C * t[todo] * slope[todo] + slack[todo]
            sub = todo.nonzero().reshape(-1)
            theta[ids[sub[acc]]] = cand[acc]
            ok[sub[acc]] = True
            if bool(ok.all()):
                break
            t[sub[~acc]] *= 0.5
        if not bool(ok.all()):
            stalled[ids[~ok]] = True
            active[ids[~ok]] = False
        bar.update(1)
    bar.close()
    params = unflatten_stacked(theta, start)
    converged = (gn < recipe.tol).cpu().numpy()
    hist = history.numpy()
    last = int(np.max(np.nonzero(~np.isnan(hist).all(0))[0])) + 1 if k else 0
    return EnsembleResult(params, val.double().cpu().numpy(), gn.cpu().numpy(), hist[:, :last], converged,
                          np.full(k, recipe.lr))


def unflatten_stacked(theta: Tensor, like: dict[str, Tensor]) -> dict[str, Tensor]:
    """Split stacked flat vectors ``[k, d]`` into ``{name: [k, ...]}`` shaped like ``like`` (stacked)."""
    out, s = {}, 0
    for name, v in like.items():
        size = math.prod(v.shape[1:])
        out[name] = theta[:, s:s + size].reshape(v.shape).clone()
        s += size
    return out


# ============================================================================ training to a gradient tolerance


@dataclass
class ToleranceFit:
    """θ̂ trained to ‖∇R‖₂ < tol by :func:`fit_to_tolerance`.

    Attributes:
        theta: the trained parameters as one tensor — the only trained tensor in its own shape when there is one
            (softmax regression's W ``[c, d]``), else the flat vector in ``params`` order.
        params: ``{name: tensor}`` of the trained parameters (:func:`model_with` builds the fitted model).
        loss: R(θ̂); grad_norm: ‖∇R(θ̂)‖₂ (L2 term included); converged: grad_norm < tol.
        history: one row per iterate: phase (0 = L-BFGS, 1 = Newton), iteration, ‖∇R‖₂, R — ``[m, 4]``.
        snapshots: ``{threshold: (theta, grad_norm, phase, iteration)}`` — the first iterate whose gradient norm
            fell below each requested threshold (training stopped early there), ``theta`` shaped as above.
        newton_steps, cg_iterations: work of the Newton phase (each CG iteration is one Hessian-vector product).
        seconds: wall time of each phase. tol, l2: as requested. backend: ``"closed_form"`` or ``"autodiff"``.
    """

    theta: Tensor
    params: dict[str, Tensor]
    loss: float
    grad_norm: float
    converged: bool
    history: np.ndarray
    snapshots: dict[float, tuple[Tensor, float, int, int]]
    newton_steps: int
    cg_iterations: int
    seconds: dict[str, float]
    tol: float
    l2: float
    backend: str


def fit_to_tolerance(model: nn.Module, x: Tensor, y: Tensor, *, l2: float, tol: float = 1e-10,
                     weights: Tensor | None = None, params: str | list[str] = "all", init: Params | None = None,
                     loss: str = "cross_entropy", snapshots: Sequence[float] = (), lbfgs_max_iter: int = 20000,
                     newton_max_iter: int = 50, strict: bool = True, cache: bool = True,
                     backend: str = "auto", progress: bool = True) -> ToleranceFit:
    """Train to ‖∇R‖₂ < ``tol`` (R = Σ w_i ℓ_i + (λ/2)‖θ‖², full batch): L-BFGS, then Newton–CG.

    L-BFGS (``scipy.optimize.minimize``, L-BFGS-B without bounds, history 20) runs from ``init`` (default the
    model's current values) until ‖∇R‖₂ < tol or it stalls (near round-off its line search can no longer see the
    objective decrease, typically at ‖∇R‖ ≈ 1e-8). Newton steps finish the job: each solves H p = ∇R by
    conjugate gradients (:func:`helpers.solvers.solve`) to a relative residual of min(0.5, ‖∇R‖) — quadratic
    convergence without forming H — and is backtracked until R decreases (Armijo), so the iteration converges
    from anywhere on a strictly convex objective (a convex model with λ > 0). On a non-convex model it converges
    to a stationary point near the start, or stops with an error naming where no decrease was found.

    Backends (``backend="auto"``): a bias-free :class:`helpers.models.LogisticRegression` with cross-entropy and
    all of its weights runs the closed forms of :mod:`helpers.closed_form` (objective, gradient and Hessian products
    without autodiff: :func:`helpers.closed_form.objective_parts`); every other model autodiff
    (:func:`helpers.objective.objective`, :func:`helpers.curvature.hessian_operator`). ``"autodiff"`` /
    ``"closed_form"`` insist.

    Args:
        x, y: inputs and labels (float64 for a result to the last digit). weights: ``[n]`` (default 1/n).
        params: the trained subset (``"all"``, ``"last"`` or names); the others stay at the model's values.
        snapshots: gradient-norm thresholds to record (early stopping). lbfgs_max_iter, newton_max_iter: budgets.
        strict: raise if ``tol`` is not met within the budgets; ``False`` returns the last iterate with
            ``converged=False`` (e.g. to show what λ = 0 does on separable data, where no minimiser exists).
        cache: memoise on disk (:mod:`helpers.cache`), keyed by the model, data and every argument.
        progress: a bar over the iterations (:mod:`helpers.progress`), the gradient norm beside it.

    Returns:
        :class:`ToleranceFit`. Raises RuntimeError naming the gradient norm reached if ``tol`` is not met (strict).

    Cost (softmax regression on mnist5k, 4,000 × 784, λ = 0.01, one core): ~110 L-BFGS iterations (~3 s), one
    Newton step of ~40 CG iterations (~1 s).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol}")
    if not (float(l2) >= 0 and math.isfinite(float(l2))):
        raise ValueError(f"l2 must be a finite number >= 0, got {l2}")
    if loss not in LOSS_NAMES:
        raise ValueError(f"unknown loss {loss!r}: use one of {LOSS_NAMES}")
    closed = is_softmax_regression(model, params, loss)
    if backend == "closed_form" and not closed:
        raise ValueError("backend='closed_form' needs a bias-free LogisticRegression, loss='cross_entropy' and all "
                         "of its parameters: use backend='auto'")
    use = "closed_form" if closed and backend != "autodiff" else "autodiff"
    names = param_names(model, params)
    own = dict(model.named_parameters())
    start = {n: (init[n] if init is not None and n in init else own[n]).detach().to(x.dtype).clone() for n in names}
    thresholds = sorted({float(t) for t in snapshots}, reverse=True)

    def compute() -> ToleranceFit:
        theta0, evaluate, operator, to_params = _tolerance_problem(use, model, x, y, weights, float(l2), start, loss)
        bar = progress_bar(lbfgs_max_iter + newton_max_iter, "fit to tolerance", progress)
        try:
            return _fit_to_tolerance(theta0, evaluate, operator, to_params, float(l2), float(tol), thresholds,
                                     lbfgs_max_iter, newton_max_iter, strict, use, bar)
        finally:
            bar.close()

    if not cache:
        return compute()
    from helpers.cache import memoize

    key = {"model": model, "x": x, "y": y, "l2": float(l2), "tol": float(tol), "weights": weights, "start": start,
           "loss": loss, "snapshots": thresholds, "lbfgs_max_iter": lbfgs_max_iter,
           "newton_max_iter": newton_max_iter, "strict": strict, "backend": use}
    return memoize("fit_to_tolerance", key, compute)


def _tolerance_problem(backend: str, model: nn.Module, x: Tensor, y: Tensor, weights: Tensor | None, l2: float,
                       start: dict[str, Tensor], loss: str):
    """(θ₀, evaluate(θ) -> (R, ∇R, ‖∇R‖), operator(θ) -> H(θ), to_params(θ) -> dict) for one backend."""
    if backend == "closed_form":
        from helpers.closed_form import objective_parts

        (name, w0), = start.items()
        evaluate, operator = objective_parts(x.flatten(1), y, n_classes=w0.shape[0], weights=weights, l2=l2)
        return w0, evaluate, operator, lambda theta: {name: theta}
    from helpers.curvature import hessian_operator

    shapes = {n: v.shape for n, v in start.items()}
    sizes = [v.numel() for v in start.values()]
    frozen = {n: p.detach() for n, p in model.named_parameters() if n not in start}

    def to_params(theta: Tensor) -> dict[str, Tensor]:
        return {n: part.view(shapes[n]) for n, part in zip(shapes, theta.split(sizes))}

    def value(theta: Tensor) -> Tensor:
        return objective(model, frozen | to_params(theta), x, y, weights=weights, l2=0.0, loss=loss) + (
            0.5 * l2 * (theta * theta).sum())

    def evaluate(theta: Tensor) -> tuple[float, Tensor, float]:
        g, v = grad_and_value(value)(theta)
        return float(v), g, float(torch.linalg.vector_norm(g))

    def operator(theta: Tensor):
        return hessian_operator(model, to_params(theta), x, y, weights=weights, l2=l2, loss=loss)

    theta0 = torch.cat([v.reshape(-1) for v in start.values()])
    return theta0, evaluate, operator, to_params


def _fit_to_tolerance(theta0: Tensor, evaluate: Callable, operator: Callable, to_params: Callable, l2: float,
                      tol: float, thresholds: list[float], lbfgs_max_iter: int, newton_max_iter: int, strict: bool,
                      backend: str, bar: Any) -> ToleranceFit:
    import scipy.optimize

    from helpers.solvers import solve

    shape = theta0.shape
    history: list[tuple[int, int, float, float]] = []
    snaps: dict[float, tuple[Tensor, float, int, int]] = {}

    def note(theta: Tensor, val: float, gn: float, phase: int, it: int) -> None:
        if not (math.isfinite(val) and math.isfinite(gn)):
            raise FloatingPointError(f"non-finite objective or gradient at iteration {it}: the fit diverged")
        history.append((phase, it, gn, val))
        if it:
            bar.update(1)
            bar.set_postfix_str(f"{('L-BFGS', 'Newton')[phase]} ‖∇R‖ {gn:.1e}", refresh=False)
        for t in thresholds:
            if gn < t and t not in snaps:
                snaps[t] = (theta.detach().clone(), gn, phase, it)

    t0 = time.perf_counter()
    theta = theta0.clone()
    val, g, gn = evaluate(theta)
    note(theta, val, gn, 0, 0)
    if gn >= tol and lbfgs_max_iter > 0:
        last: dict[str, Any] = {}

        def fun(flat: np.ndarray) -> tuple[float, np.ndarray]:
            v, gr, gnorm = evaluate(torch.from_numpy(flat).view(shape))
            last.update(x=flat.copy(), v=v, gn=gnorm)
            return v, gr.reshape(-1).numpy().copy()

        count = [0]

        def callback(intermediate_result: scipy.optimize.OptimizeResult) -> None:
            count[0] += 1
            xk = intermediate_result.x
            if "x" in last and np.array_equal(last["x"], xk):  # the line search's last point is the iterate
                v, gnorm = last["v"], last["gn"]
            else:
                v, _, gnorm = evaluate(torch.from_numpy(xk).view(shape))
            note(torch.from_numpy(xk.copy()).view(shape), v, gnorm, 0, count[0])
            if gnorm < tol:
                raise StopIteration

        res = scipy.optimize.minimize(fun, theta.reshape(-1).numpy().copy(), jac=True, method="L-BFGS-B",
                                      callback=callback,
                                      options={"maxiter": lbfgs_max_iter, "maxcor": 20, "ftol": 0.0, "gtol": 0.0})
        theta = torch.from_numpy(res.x.copy()).view(shape)
        val, g, gn = evaluate(theta)
    t1 = time.perf_counter()

    steps = cg_total = 0
    for it in range(1, newton_max_iter + 1):
        if gn < tol:
            break
        # inexact Newton: a residual of min(0.5, ‖g‖)·‖g‖ keeps the convergence quadratic
        res = solve(operator(theta), g.reshape(-1), method="cg", rtol=max(min(0.5, gn), 1e-14),
                    progress=False)  # the fit's own bar covers it
        cg_total += res.iterations
        step = res.x.view(shape)
        slope = -float((g * step).sum())
        t = 1.0
        for _ in range(60):  # Armijo backtracking; round-off slack so a converged step is not refused on noise
            cand = theta - t * step
            v_new, g_new, gn_new = evaluate(cand)
            if v_new <= val + 1e-4 * t * slope + 8 * torch.finfo(theta.dtype).eps * abs(val):
                break
            t *= 0.5
        else:
            raise RuntimeError(f"Newton step {it} found no decrease (‖∇R‖ = {gn:.2e}): the objective is flat or "
                               "not convex here — check l2 > 0")
        theta, val, g, gn = cand, v_new, g_new, gn_new
        steps += 1
        note(theta, val, gn, 1, it)
    t2 = time.perf_counter()
    if gn >= tol and strict:
        raise RuntimeError(f"training did not reach ‖∇R‖ < {tol:.0e} (reached {gn:.2e}) within {newton_max_iter} "
                           f"Newton steps: with l2={l2} the problem may have no minimiser (e.g. separable data "
                           "under softmax regression) — raise l2 or loosen tol")
    def shaped(th: Tensor) -> Tensor:  # the only trained tensor in its own shape, else the flat vector
        parts = to_params(th)
        return next(iter(parts.values())).clone() if len(parts) == 1 else th.clone()

    return ToleranceFit(theta=shaped(theta), params={k: v.clone() for k, v in to_params(theta).items()}, loss=val,
                        grad_norm=gn, converged=gn < tol,
                        history=np.asarray(history, dtype=np.float64).reshape(-1, 4),
                        snapshots={t: (shaped(th), *rest) for t, (th, *rest) in snaps.items()},
                        newton_steps=steps, cg_iterations=cg_total, seconds={"lbfgs": t1 - t0, "newton": t2 - t1},
                        tol=float(tol), l2=l2, backend=backend)
