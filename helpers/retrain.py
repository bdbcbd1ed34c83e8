"""Ground truths: Δ_true by named retraining protocols, each with its drift baseline (STUDY.md §1–§3).

Every protocol returns a :class:`GroundTruth` whose ``delta[t, j]`` is

    Δ_true = ℓ(z_test_t, θ̂₋ᵢ) − ℓ(z_test_t, θ̂_ref),      i = removed[j],  in loss units, [n_test, n_removed]

— the same orientation and sign as the influence estimate (positive: removing z_i raised the test loss) —
and whose ``drift`` is the same protocol run with *nothing* removed, minus the same reference: what the
protocol changes by itself. A Δ_true no larger than the drift measures the procedure, not the point.

Each protocol runs as ONE batched ensemble (:func:`helpers.train.fit_ensemble`) over all removals plus the
drift member (removed index −1 of :func:`helpers.objective.removal_weights`), so the drift costs one member.

* :func:`warm_start` — continue from θ̂ without z_i, fresh optimizer state (Koh & Liang; the seed paper).
* :func:`cold_start` — retrain from scratch per seed, with and without z_i; mean, per-seed values, seed noise.
* :func:`pbrf` — the proximal Bregman response function of Bae et al. (2022), what influence estimates track.

Runs are memoised through :func:`_memoized`, the single point where :mod:`helpers.cache` hooks in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from helpers.cache import memoize
from helpers.models import init_params, is_softmax_regression
from helpers.objective import (BACKENDS, LooObjective, Params, loss_from_outputs, param_names, per_sample_losses,
                               removal_weights)
from helpers.train import MemberObjective, Recipe, fit_ensemble, model_with, train_ensemble

Data = tuple[Tensor, Tensor]


@dataclass
class GroundTruth:
    """The result of one retraining protocol.

    Attributes:
        protocol: ``"warm_start"``, ``"cold_start"`` or ``"pbrf"``.
        delta: ``[n_test, n_removed]`` Δ_true in loss units (cold start: the mean over seeds).
        drift: ``[n_test]`` the nothing-removed member's test loss minus the reference loss (cold start:
            ``[n_seeds, n_test]``, each seed's full-data fit minus θ̂_ref).
        removed: ``[n_removed]`` training indices, the columns of ``delta``.
        recipe: ``Recipe.to_dict()`` of the retraining.
        test_losses: per-member test losses ``[n_removed + 1, n_test]``, drift member last (cold start:
            ``[n_seeds, n_removed + 1, n_test]``).
        ref_loss: ``[n_test]`` ℓ(z_test, θ̂_ref).
        grad_norm: final ‖∇‖₂ of each member's training objective (layout of ``test_losses`` without n_test):
            how far from a stationary point the retrained models are.
        settings: the protocol's other knobs (params subset, loo objective, damping, seeds).
        delta_per_seed: cold start only, ``[n_seeds, n_test, n_removed]``.
        noise: cold start only, ``[n_test, n_removed]`` the seed-to-seed standard deviation (ddof 1; NaN for
            one seed) of ``delta_per_seed`` — the noise floor of this ground truth.
        params: stacked member parameters ``{name: [members, ...]}`` when asked for (``keep_params=True``).
        trajectory: warm start with ``record_every`` / ``record_epochs``: the members' test losses recorded along
            the way (:class:`Trajectory`).
        floor_epoch, epochs_run, lr: per member, where the recipe stops at the learning-rate floor
            (:attr:`helpers.train.Recipe.stop_at_floor`): the epoch its plateau lr reached the floor (-1: never),
            the epochs computed, and the final lr (layout of ``grad_norm``).

    Many models at once (the stacked backend, :func:`helpers.stacked.retrain_stack`): each row of ``delta`` is one
    model with its own test point and its own removals, so ``removed`` is ``[k, n_removed]``, ``drift`` and
    ``ref_loss`` ``[k]``, ``grad_norm`` ``[k, n_removed + 1]`` and ``test_losses`` ``[n_removed + 1, k]``.
    """

    protocol: str
    delta: np.ndarray
    drift: np.ndarray
    removed: np.ndarray
    recipe: dict[str, Any]
    test_losses: np.ndarray
    ref_loss: np.ndarray
    grad_norm: np.ndarray
    settings: dict[str, Any] = field(default_factory=dict)
    delta_per_seed: np.ndarray | None = None
    noise: np.ndarray | None = None
    params: dict[str, Tensor] | None = None
    trajectory: "Trajectory | None" = None
    floor_epoch: np.ndarray | None = None
    epochs_run: np.ndarray | None = None
    lr: np.ndarray | None = None

    @property
    def delta_minus_drift(self) -> np.ndarray:
        """``[n_test, n_removed]`` Δ_true with the protocol's own change removed (warm start, PBRF).

        Cold start's Δ is already paired with the same seed's full-data fit, so it is returned as is.
        """
        if self.drift.ndim == 1:
            return self.delta - self.drift[:, None]
        return self.delta


@dataclass
class Trajectory:
    """Test losses of a warm-start retraining ensemble recorded along the way.

    Attributes:
        epochs: ``[c]`` the epochs recorded (0 = θ̂ itself, before any step).
        test_losses: ``[c, n_removed + 1, n_test]`` per member, the nothing-removed (drift) member last.
        ref_loss: ``[n_test]`` ℓ(z_test, θ̂).
        removed: ``[n_removed]`` training indices.
        recipe: ``Recipe.to_dict()`` of the retraining; settings: params subset and leave-one-out objective.
        grad_norm: ``[n_removed + 1]`` final ‖∇R‖₂ of each member's objective (full data).
    """

    epochs: np.ndarray
    test_losses: np.ndarray
    ref_loss: np.ndarray
    removed: np.ndarray
    recipe: dict[str, Any]
    settings: dict[str, Any]
    grad_norm: np.ndarray

    @property
    def delta(self) -> np.ndarray:
        """``[c, n_test, n_removed]`` Δ_true at each recorded epoch (member minus θ̂)."""
        return np.transpose(self.test_losses[:, :-1] - self.ref_loss, (0, 2, 1))

    @property
    def drift(self) -> np.ndarray:
        """``[c, n_test]`` the nothing-removed member's change of test loss at each recorded epoch."""
        return self.test_losses[:, -1] - self.ref_loss

    def at(self, epoch: int) -> GroundTruth:
        """The warm-start :class:`~helpers.retrain.GroundTruth` after ``epoch`` epochs (must be recorded)."""
        hits = np.flatnonzero(self.epochs == epoch)
        if hits.size == 0:
            raise ValueError(f"epoch {epoch} was not recorded; recorded: {self.epochs.tolist()}")
        c = int(hits[0])
        return GroundTruth(protocol="warm_start", delta=self.delta[c], drift=self.drift[c], removed=self.removed,
                           recipe=dict(self.recipe, epochs=int(epoch)), test_losses=self.test_losses[c],
                           ref_loss=self.ref_loss, grad_norm=np.full(len(self.removed) + 1, np.nan),
                           settings=dict(self.settings, recorded_epoch=int(epoch)))


# ------------------------------------------------------------------------------------------- caching


def _memoized(name: str, key: dict[str, Any], compute: Callable[[], GroundTruth], use_cache: bool
              ) -> GroundTruth:
    """The single point where protocol runs hook into :mod:`helpers.cache`.

    ``key`` holds the recipe, the protocol's knobs, and model, θ̂ and data (hashed by content; the cache
    also keys on the ``helpers`` source).
    """
    return memoize(name, key, compute) if use_cache else compute()


# ------------------------------------------------------------------------------------------- helpers


def _check_removed(removed: Sequence[int] | Tensor | np.ndarray, n: int) -> list[int]:
    r = [int(i) for i in np.asarray(removed).reshape(-1)]
    bad = [i for i in r if not 0 <= i < n]
    if bad:
        raise ValueError(f"removed indices {bad} are outside the training set [0, {n}); -1 (the drift member) "
                         "is added by the protocol itself")
    return r


def _as_data(data: Data, name: str) -> Data:
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        raise TypeError(f"{name} must be a pair (x, y) of tensors")
    x, y = data
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{name}: x has {x.shape[0]} rows, y has {y.shape[0]}")
    return x, y


def _cast(data: Data, recipe: Recipe) -> Data:
    x, y = data
    x = x.to(recipe.torch_dtype) if x.is_floating_point() else x
    y = y.long() if recipe.loss == "cross_entropy" else y.to(x.device, recipe.torch_dtype)
    return x, y


def _theta(model: nn.Module, theta_hat: Params | None) -> dict[str, Tensor]:
    named = dict(model.named_parameters())
    base = {k: v.detach() for k, v in named.items()}
    if theta_hat is not None:
        missing = [k for k in theta_hat if k not in named]
        if missing:
            raise KeyError(f"theta_hat names parameters the model lacks: {missing}")
        base.update({k: v.detach() for k, v in theta_hat.items()})
    return base


def _test_losses(work: nn.Module, stacked: dict[str, Tensor], test: Data, loss: str) -> Tensor:
    """``[k, n_test]`` per-member test losses, one vmapped forward."""
    xt, yt = test
    return vmap(lambda p: per_sample_losses(work, p, xt, yt, loss))(stacked)


def _with_reference(stacked: dict[str, Tensor], ref: dict[str, Tensor]) -> dict[str, Tensor]:
    """Append θ̂_ref as one more member, so the reference loss comes from the very same vmapped kernel as the
    members' (a member that never moved then has drift exactly 0, not round-off)."""
    return {k: torch.cat([v, ref[k].to(v)[None]]) for k, v in stacked.items()}


def _np(t: Tensor) -> np.ndarray:
    return t.detach().double().cpu().numpy()


# ------------------------------------------------------------------------------------------- protocols


def _record_marks(recipe: Recipe, every: int | None, epochs: Sequence[int] | None) -> set[int] | None:
    """The epochs a warm start records (0 and the last always), or None when nothing is to be recorded."""
    if every is None and epochs is None:
        return None
    if recipe.optimizer not in ("adam", "sgd"):
        raise ValueError(f"recording a trajectory needs Adam or SGD, got optimizer {recipe.optimizer!r}")
    if recipe.schedule != "none" or recipe.swa_start is not None or recipe.stop_at_floor:
        raise ValueError("recording a trajectory needs a constant learning rate (schedule='none'), no SWA and no "
                         "stop_at_floor: the recorded path must be the one the recipe runs to its end")
    if every is not None and int(every) < 1:
        raise ValueError(f"record_every must be >= 1, got {every}")
    marks = {int(e) for e in (epochs if epochs is not None else range(0, recipe.epochs + 1, int(every)))}
    if any(e < 0 or e > recipe.epochs for e in marks):
        raise ValueError(f"recorded epochs must lie in [0, {recipe.epochs}], got {sorted(marks)}")
    return marks | {0, recipe.epochs}


def warm_start(model: nn.Module, theta_hat: Params | None, train: Data, test: Data, removed: Sequence[int],
               recipe: Recipe, *, params: str | list[str] = "all", loo: LooObjective = "drop",
               keep_params: bool = False, progress: bool = True, cache: bool = True, backend: str = "auto",
               factor: Any = None, record_every: int | None = None,
               record_epochs: Sequence[int] | None = None) -> GroundTruth:
    """Warm-start leave-one-out: continue from θ̂ without z_i, fresh optimizer state, for each i in ``removed``.

    Args:
        model: the architecture; parameters not in ``theta_hat`` are read from it.
        theta_hat: θ̂, the trained weights (all, or a subset; None = the module's values).
        train, test: ``(x, y)`` pairs; ``removed``: training indices.
        recipe: the retraining — its length is the recipe's epochs (Adam / SGD) or tolerance (Newton / L-BFGS).
        params: parameters retrained (``"all"`` or ``"last"``, the others frozen at θ̂).
        loo: ``"drop"`` (others keep 1/n) or ``"reaverage"`` (others 1/(n−1)), see STUDY.md §1.
        keep_params: also return the members' parameters.
        backend: ``"auto"``: a Newton recipe (``optimizer="newton"``, float64) on a bias-free
            :class:`~helpers.models.LogisticRegression` with cross-entropy and all of its weights runs the
            closed-form chord method of :func:`helpers.closed_form.leave_one_out` (every member to ‖∇R_j‖ <
            ``recipe.tol`` within ``recipe.max_iter`` steps, the protocol ``"convex_chord"``, with its
            ``settings``: iterations, Newton fallbacks, the one-step Newton estimate); every other case the batched
            ensemble of :func:`helpers.train.fit_ensemble`. ``"autodiff"`` / ``"closed_form"`` insist.
        factor: closed-form backend only: a :class:`helpers.closed_form.HessianFactor` at (or near) θ̂ to reuse.
        record_every / record_epochs: also record every member's test losses every so many epochs, or after the
            listed epochs (0 and the last always), as ``GroundTruth.trajectory`` (:class:`Trajectory`) — a whole
            sweep of retraining lengths from one run (the paper's Fig. 5). Adam or SGD with a constant learning
            rate and no SWA: the trajectory is the run's own, not a re-run.

    Returns:
        :class:`GroundTruth` with θ̂_ref = θ̂; ``drift`` = the nothing-removed member (how far the same
        procedure moves θ̂ by itself: ≈ 0 only if θ̂ is a minimum of the retraining objective).

    Cost: one ensemble of ``len(removed) + 1`` members for the recipe's length.
    """
    x, y = _as_data(train, "train")
    test = _as_data(test, "test")
    r = _check_removed(removed, x.shape[0])
    theta = _theta(model, theta_hat)
    marks = _record_marks(recipe, record_every, record_epochs)  # refuses a recipe it cannot record, first
    closed = (recipe.optimizer == "newton" and recipe.dtype == "float64"
              and is_softmax_regression(model, params, recipe.loss))
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "closed_form" and not closed:
        raise ValueError("backend='closed_form' needs a Newton float64 recipe and a bias-free LogisticRegression "
                         "with cross-entropy, all of its parameters retrained: use backend='auto'")
    if closed and backend != "autodiff":
        from helpers.closed_form import leave_one_out  # the backend imports this module: load it on demand

        return leave_one_out(x.flatten(1), y, (test[0].flatten(1), test[1]), theta["linear.weight"], r,
                             l2=recipe.weight_decay, tol=recipe.tol, loo=loo, factor=factor,
                             max_iter=recipe.max_iter, keep_params=keep_params, cache=cache)
    if factor is not None:
        raise TypeError("factor= serves only the closed-form backend (a Newton float64 recipe on a bias-free "
                        "LogisticRegression): drop it for this model or recipe")
    key = {"model": model, "theta_hat": theta, "train": [x, y], "test": list(test),
           "removed": r, "recipe": recipe.to_dict(), "params": params, "loo": loo, "keep_params": keep_params}
    if marks is not None:
        key["record"] = sorted(marks)

    def compute() -> GroundTruth:
        xc, yc = _cast((x, y), recipe)
        w = removal_weights(xc.shape[0], r + [-1], loo, dtype=recipe.torch_dtype)
        work = model_with(model, theta, dtype=recipe.torch_dtype, device=xc.device).requires_grad_(False)
        test_c = _cast(test, recipe)
        names = param_names(work, params)
        recorded: list[tuple[int, Tensor]] = []

        def record(epoch: int, stacked: dict[str, Tensor]) -> None:
            if epoch in marks:
                with torch.no_grad():
                    recorded.append((epoch, vmap(lambda p: per_sample_losses(work, p, *test_c, recipe.loss))(
                        {nm: stacked[nm].detach() for nm in names}).double().cpu()))

        if marks is not None:
            k = len(r) + 1
            record(0, {nm: theta[nm].to(dtype=recipe.torch_dtype, device=xc.device)[None].repeat(
                k, *[1] * theta[nm].dim()) for nm in names})
        ens = fit_ensemble(recipe, model, xc, yc, weights=w, inits=theta, params=params, progress=progress,
                           on_epoch=record if marks is not None else None)
        losses = _test_losses(work, _with_reference(ens.params, {k: theta[k] for k in names}), test_c, recipe.loss)
        ref = losses[-1]
        members = losses[:-1]
        trajectory = None
        if marks is not None:
            path = torch.stack([t for _, t in recorded]).numpy()  # [c, k, n_test]
            # the reference comes from the same kernel (epoch 0, drift member): a member that never moves has Δ = 0
            trajectory = Trajectory(epochs=np.asarray([e for e, _ in recorded]), test_losses=path,
                                    ref_loss=path[0, -1].copy(), removed=np.asarray(r, dtype=np.int64),
                                    recipe=recipe.to_dict(), settings={"params": params, "loo": loo},
                                    grad_norm=ens.grad_norm)
        return GroundTruth(
            protocol="warm_start", delta=_np(members[:-1] - ref).T, drift=_np(members[-1] - ref),
            removed=np.asarray(r, dtype=np.int64), recipe=recipe.to_dict(), test_losses=_np(members),
            ref_loss=_np(ref), grad_norm=ens.grad_norm, settings={"params": params, "loo": loo},
            params=ens.params if keep_params else None, trajectory=trajectory)

    return _memoized("warm_start", key, compute, cache)


def cold_start(model: nn.Module, train: Data, test: Data, removed: Sequence[int], recipe: Recipe,
               seeds: Sequence[int], *, theta_hat: Params | None = None, params: str | list[str] = "all",
               loo: LooObjective = "drop", keep_params: bool = False, progress: bool = True, cache: bool = True
               ) -> GroundTruth:
    """Cold-start leave-one-out: retrain from a fresh random init per seed, with and without each z_i.

    For seed s: Δ_s[t, j] = ℓ(z_t, θ_s without z_removed[j]) − ℓ(z_t, θ_s on all data), both started from
    :func:`helpers.models.init_params` ``(model, s)`` (mini-batch order from ``recipe.seed``, shared).

    Returns:
        :class:`GroundTruth` with ``delta`` = mean over seeds ``[n_test, n_removed]``, ``delta_per_seed``
        ``[n_seeds, n_test, n_removed]``, ``noise`` = seed-to-seed std ``[n_test, n_removed]``, and ``drift``
        ``[n_seeds, n_test]`` = each seed's full-data fit minus θ̂_ref (``theta_hat``, default the module's
        values): the seed noise floor of the reference itself. ``params`` other than ``"all"`` re-initialise
        and retrain only that subset (the rest frozen at θ̂_ref).

    Cost: one ensemble of ``len(seeds) · (len(removed) + 1)`` members.
    """
    x, y = _as_data(train, "train")
    test = _as_data(test, "test")
    r = _check_removed(removed, x.shape[0])
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("cold_start needs at least one seed (two or more to measure seed noise)")
    theta = _theta(model, theta_hat)
    key = {"model": model, "theta_hat": theta, "train": [x, y], "test": list(test),
           "removed": r, "seeds": seeds, "recipe": recipe.to_dict(), "params": params, "loo": loo,
           "keep_params": keep_params}

    def compute() -> GroundTruth:
        xc, yc = _cast((x, y), recipe)
        n, m = xc.shape[0], len(r) + 1
        ref_model = model_with(model, theta)
        names = param_names(ref_model, params)
        per_seed = [init_params(ref_model, s, names) for s in seeds]
        inits = {k: torch.stack([p[k] for p in per_seed]).repeat_interleave(m, dim=0) for k in names}
        w = removal_weights(n, r + [-1], loo, dtype=recipe.torch_dtype).repeat(len(seeds), 1)
        frozen = {k: v for k, v in theta.items() if k not in names}
        work_in = model_with(model, frozen) if frozen else model
        ens = fit_ensemble(recipe, work_in, xc, yc, weights=w, inits=inits, params=names, progress=progress)
        work = model_with(model, theta, dtype=recipe.torch_dtype, device=xc.device).requires_grad_(False)
        losses = _test_losses(work, _with_reference(ens.params, {k: theta[k] for k in names}),
                              _cast(test, recipe), recipe.loss)
        ref = losses[-1]
        members = losses[:-1].reshape(len(seeds), m, -1)  # [S, m, n_test]
        full = members[:, -1]
        per = (members[:, :-1] - full[:, None]).transpose(1, 2)  # [S, n_test, R]
        noise = (per.std(dim=0, correction=1) if len(seeds) > 1 else torch.full_like(per[0], float("nan")))
        return GroundTruth(
            protocol="cold_start", delta=_np(per.mean(dim=0)), drift=_np(full - ref),
            removed=np.asarray(r, dtype=np.int64), recipe=recipe.to_dict(), test_losses=_np(members),
            ref_loss=_np(ref), grad_norm=ens.grad_norm.reshape(len(seeds), m),
            settings={"params": params, "loo": loo, "seeds": seeds}, delta_per_seed=_np(per), noise=_np(noise),
            params=ens.params if keep_params else None)

    return _memoized("cold_start", key, compute, cache)


def pbrf_objective(model: nn.Module, names: list[str], recipe: Recipe, damping: float, n: int) -> MemberObjective:
    """The member objective of the PBRF (for :func:`helpers.train.train_ensemble`).

    aux = (v, θˢ_1, …, θˢ_m): v ``[n]`` the signed weight of each point's loss (−1/n at the removed point, 0
    elsewhere; all 0 for the drift member) and θˢ's tensors in ``names`` order. Per member:

        (1/n) Σ_j D(h(θ, x_j), h(θˢ, x_j)) + Σ_j v_j ℓ(z_j, θ) + ((λ + δ)/2) ‖θ − θˢ‖²

    D: KL(softmax h(θˢ) ‖ softmax h(θ)) written as the Bregman divergence of logsumexp (cross-entropy), or
    ½‖h(θ) − h(θˢ)‖² (mse). λ = ``recipe.weight_decay`` is the L2 term's own Bregman divergence.
    """
    coef = recipe.weight_decay + damping

    def lse(t: Tensor) -> Tensor:
        return torch.logsumexp(t, dim=-1)

    def member_objective(params, aux, xb, yb, idx, scale):
        v, ths = aux[0], dict(zip(names, aux[1:]))
        h = functional_call(model, params, (xb,))
        h_s = functional_call(model, ths, (xb,))
        if recipe.loss == "cross_entropy":
            # p_s = ∇lse(h_s) through the *same* backward kernel that differentiates lse(h): at θ = θˢ the
            # divergence's gradient ∇lse(h) − p_s is then exactly 0, and the drift member cannot move (Adam
            # would otherwise amplify round-off gradients up to lr·g/eps per step).
            lse_s, pullback = torch.func.vjp(lse, h_s)
            (p_s,) = pullback(torch.ones_like(lse_s))
            div = lse(h) - lse_s - (p_s * (h - h_s)).sum(-1)
        else:
            diff = h - h_s
            div = 0.5 * (diff * diff).reshape(diff.shape[0], -1).sum(1)
        vb = v if idx is None else v[idx]
        data = div.sum() / n + (vb * loss_from_outputs(h, yb, recipe.loss)).sum()
        if scale != 1.0:
            data = data * scale
        prox = sum(((params[k] - ths[k]) ** 2).sum() for k in names)
        return data + 0.5 * coef * prox

    return member_objective


def pbrf(model: nn.Module, theta_hat: Params | None, train: Data, test: Data, removed: Sequence[int],
         recipe: Recipe, damping: float, *, params: str | list[str] = "all", keep_params: bool = False,
         progress: bool = True, cache: bool = True) -> GroundTruth:
    """The proximal Bregman response function (Bae et al. 2022) for each removed point, as one ensemble.

        θ_PBRF,i = argmin_θ (1/n) Σ_j D(h(θ,x_j), h(θˢ,x_j)) − (1/n) ℓ(z_i, θ) + ((λ + δ)/2) ‖θ − θˢ‖²

    with θˢ = θ̂ (``theta_hat``), D the Bregman divergence of the output loss (softmax cross-entropy: the KL
    between the two softmax outputs; mse: ½‖·‖²), δ = ``damping`` and λ = ``recipe.weight_decay`` (the L2 term
    of the training objective is a quadratic, its Bregman divergence is (λ/2)‖θ − θˢ‖²; with λ = 0 this is
    Bae et al.'s formula). Its influence counterpart is (1/n) ∇ℓ_testᵀ (G + λI + δI)⁻¹ ∇ℓ_i with G the
    Gauss-Newton matrix. Optimised from θˢ by the recipe (Adam to its epochs, or Newton to its tolerance).
    The drift member (nothing removed) has θˢ as its exact minimiser and stays there bit for bit.

    Returns:
        :class:`GroundTruth` with θ̂_ref = θˢ, ``delta`` = ℓ(z_test, θ_PBRF,i) − ℓ(z_test, θˢ).
    """
    x, y = _as_data(train, "train")
    test = _as_data(test, "test")
    r = _check_removed(removed, x.shape[0])
    if not damping >= 0:
        raise ValueError(f"damping δ must be >= 0, got {damping}")
    if damping + recipe.weight_decay == 0 and recipe.optimizer == "newton":
        raise ValueError("PBRF with damping 0 and weight_decay 0 has no proximity term: its Newton system can "
                         "be singular — set damping > 0")
    theta = _theta(model, theta_hat)
    key = {"model": model, "theta_hat": theta, "train": [x, y], "test": list(test),
           "removed": r, "recipe": recipe.to_dict(), "params": params, "damping": float(damping),
           "keep_params": keep_params}

    def compute() -> GroundTruth:
        xc, yc = _cast((x, y), recipe)
        n, m = xc.shape[0], len(r) + 1
        dt, dev = recipe.torch_dtype, xc.device
        work = model_with(model, theta, dtype=dt, device=dev).requires_grad_(False)
        names = param_names(work, params)
        ths = {k: theta[k].to(device=dev, dtype=dt) for k in names}
        start = {k: v[None].expand(m, *v.shape).clone() for k, v in ths.items()}
        v = torch.zeros(m, n, dtype=dt, device=dev)
        v[torch.arange(len(r)), torch.as_tensor(r, dtype=torch.long)] = -1.0 / n
        aux = (v, *(start[k].clone() for k in names))
        ens = train_ensemble(recipe, pbrf_objective(work, names, recipe, damping, n), start, aux, xc, yc,
                             progress=progress)
        losses = _test_losses(work, _with_reference(ens.params, ths), _cast(test, recipe), recipe.loss)
        ref = losses[-1]
        members = losses[:-1]
        return GroundTruth(
            protocol="pbrf", delta=_np(members[:-1] - ref).T, drift=_np(members[-1] - ref),
            removed=np.asarray(r, dtype=np.int64), recipe=recipe.to_dict(), test_losses=_np(members),
            ref_loss=_np(ref), grad_norm=ens.grad_norm, settings={"params": params, "damping": float(damping)},
            params=ens.params if keep_params else None)

    return _memoized("pbrf", key, compute, cache)


# ------------------------------------------------------------------------------------------- the LDS target


@dataclass
class SubsetRetraining:
    """Models trained from scratch on random training subsets: the target of the linear datamodeling score.

    Attributes:
        masks: ``[m, n_train]`` bool, row j = subset S_j. alpha: |S_j| / n.
        test_losses: ``[n_seeds, m, n_test]`` ℓ(z_t, θ_{S_j, s}); ``mean_losses`` is their mean over seeds
            ``[m, n_test]`` (seed-averaged outputs, as TRAK's LDS averages models per subset).
        grad_norm: ``[n_seeds, m]`` final ‖∇R‖ of each model's objective (its convergence).
        recipe, seeds: how they were trained.
    """

    masks: np.ndarray
    alpha: float
    test_losses: np.ndarray
    grad_norm: np.ndarray
    recipe: dict[str, Any]
    seeds: list[int]

    @property
    def mean_losses(self) -> np.ndarray:
        return self.test_losses.mean(axis=0)


def on_subsets(model: nn.Module, train: Data, test: Data, masks: np.ndarray | Tensor, recipe: Recipe,
               seeds: Sequence[int], *, alpha: float | None = None, progress: bool = True, cache: bool = True
               ) -> SubsetRetraining:
    """Train one model per subset and seed from a fresh initialisation (:func:`helpers.models.init_params`),
    with the same recipe as the original — the retraining of the LDS (Park et al. 2023). A subset's objective is
    the mean loss over its points (weights 1/|S_j| on S_j, 0 elsewhere) plus the recipe's L2 term.

    Cost: one ensemble of ``len(seeds) · m`` members (:func:`helpers.train.fit_ensemble`)."""
    x, y = _as_data(train, "train")
    test = _as_data(test, "test")
    M = torch.as_tensor(np.asarray(masks), dtype=torch.bool)
    if M.dim() != 2 or M.shape[1] != x.shape[0]:
        raise ValueError(f"masks must be [m, n_train] = [m, {x.shape[0]}] booleans, got {tuple(M.shape)}")
    if bool((M.sum(dim=1) == 0).any()):
        raise ValueError("a subset is empty: every mask row needs at least one training point")
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("on_subsets needs at least one seed")
    theta = _theta(model, None)
    key = {"model": model, "theta_hat": theta, "train": [x, y], "test": list(test), "masks": M,
           "seeds": seeds, "recipe": recipe.to_dict()}

    def compute() -> SubsetRetraining:
        xc, yc = _cast((x, y), recipe)
        m = M.shape[0]
        w = M.to(recipe.torch_dtype) / M.sum(dim=1, keepdim=True).to(recipe.torch_dtype)
        names = param_names(model, "all")
        per_seed = [init_params(model, s, names) for s in seeds]
        inits = {k: torch.stack([p[k] for p in per_seed]).repeat_interleave(m, dim=0) for k in names}
        ens = fit_ensemble(recipe, model, xc, yc, weights=w.repeat(len(seeds), 1), inits=inits, params=names,
                           progress=progress)
        work = model_with(model, theta, dtype=recipe.torch_dtype, device=xc.device).requires_grad_(False)
        losses = _test_losses(work, ens.params, _cast(test, recipe), recipe.loss)  # [S·m, n_test]
        a = float(M.sum(dim=1).double().mean() / x.shape[0]) if alpha is None else float(alpha)
        return SubsetRetraining(masks=M.numpy(), alpha=a, test_losses=_np(losses).reshape(len(seeds), m, -1),
                                grad_norm=np.asarray(ens.grad_norm).reshape(len(seeds), m),
                                recipe=recipe.to_dict(), seeds=seeds)

    return memoize("on_subsets", key, compute) if cache else compute()
