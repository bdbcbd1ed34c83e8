"""Chapter 4, ``book/estimators.ipynb``: estimators that scale, on trial — by the checklist of chapter 3.

One trial per (model, θ̂ seed): a model trained to a stated criterion, ``n_test_points`` test points (the max and
median test loss and random ones, :func:`pick_test_points`), every estimator computed once on that fixed θ̂, every
target computed once, and the agreement of each (estimator, target) pair measured per test point — so that trained
models × test points are the units of replication (:func:`helpers.stats.hierarchical_mean_ci`: models first, then
test points within a model).

Models (:data:`MODEL_NAMES`): the convex control (softmax regression), the book's MNIST MLP and its small CNN, on
``mnist5k`` images average-pooled by ``pool`` (7×7 at the chapter's default of 4, 14×14 in the paper profile: at
7×7 and 200 training points the retraining ensembles of the LDS and of cold-start leave-one-out fit the chapter's
15 minutes). All in float64. θ̂: full-batch Adam with a cosine
schedule, whose checkpoints and learning rates TracIn uses, then full-batch L-BFGS to ‖∇R‖ ≤ ``grad_tol``; every
retrained model (cold and warm start, PBRF, subset models) runs the same L-BFGS to the same tolerance, and the
largest final gradient norm of each kind is recorded — the stated convergence criterion of the checklist.

Estimators (:data:`ESTIMATORS`; each ``[n_test, n_train]`` in the book's convention, :mod:`helpers.influence` and
:mod:`helpers.estimators`): exact influence by CG on all parameters and on the last layer, K-FAC and EK-FAC
(:mod:`helpers.kronecker`), LiSSA and Arnoldi at stated settings, TRAK at two projection dimensions, TracIn over
the checkpoints, and gradient similarity (the identity in place of the Hessian). Each run is timed and its peak
memory measured (:func:`run_estimators`).

Targets (:func:`run_targets`): leave-one-out by cold start (fresh initialisations, the same recipe, several
seeds: mean and noise ceiling) and by warm start (from θ̂), the PBRF (Bae et al. 2022), all on the same ``k``
random candidates, and the linear datamodeling score against models retrained from scratch on random subsets at
two sizes α (:func:`lds_target`, :func:`helpers.metrics.lds`).

Metrics: Pearson (signed) of estimate and target over the candidates per test point for the LOO and PBRF targets;
the LDS (Spearman over subsets) per test point for the LDS targets. :func:`summary` gives the mean over units with
its two-stage bootstrap interval; :func:`draw_summary` the chapter's one figure (estimator × target, and cost).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from helpers import book, estimators as est, metrics, models, retrain
from helpers.cache import memoize
from helpers.experiments.validation import pool_images, test_points
from helpers.influence import predict_removal
from helpers.objective import model_params, per_sample_losses
from helpers.stats import hierarchical_mean_ci, holm, sign_flip_test
from helpers.train import Recipe, fit, fit_ensemble, model_with

Data = tuple[Tensor, Tensor]

MODEL_NAMES: dict[str, str] = {"logreg": "softmax regression (convex)", "mlp": "MNIST MLP", "cnn": "small CNN"}
ESTIMATORS: tuple[str, ...] = ("exact (CG)", "exact, last layer", "EK-FAC", "K-FAC", "LiSSA", "Arnoldi",
                               "TRAK small", "TRAK large", "TracIn", "grad. similarity")
TARGETS: tuple[str, ...] = ("LOO cold", "LOO warm", "PBRF", "LDS α small", "LDS α large")
ALPHA = 0.05  # family-wise level of "beats gradient similarity" (Holm within each model and target)
SUBSET_SEED_OFFSET = 17  # the LDS subsets of a chapter run are drawn with seed + this (the table's and the check's)


@dataclass
class Fitted:
    """One trained θ̂ with what the chapter holds fixed: the chosen test points and the saved checkpoints."""

    key: str
    seed: int
    model: nn.Module
    recipe: Recipe
    train: Data
    test: Data
    checkpoints: list[dict[str, Tensor]]
    checkpoint_lrs: list[float]
    grad_norm: float
    acc_test: float
    test_names: list[str] = field(default_factory=lambda: ["max", "median", "random"])  # of the rows of ``test``
    test_rows: list[int] = field(default_factory=list)  # their positions in the test pool (:func:`for_test_points`)

    @property
    def n_params(self) -> int:
        return int(sum(p.numel() for p in self.model.parameters()))


def estimator_data(seed: int, *, n_train: int, n_test: int, pool: int) -> dict[str, tuple[Data, Data]]:
    """mnist5k images pooled by ``pool``, float64: flattened for the two dense models, as images for the CNN."""
    from helpers import data as data_mod

    split = data_mod.load("mnist5k", seed=seed, n_train=n_train, n_test=n_test, standardize=False, flatten=False,
                          dtype=torch.float64)
    xtr, xte = pool_images(split.x_train, pool), pool_images(split.x_test, pool)
    mean, std = xtr.mean(), xtr.std()
    xtr, xte = (xtr - mean) / std, (xte - mean) / std  # standardised on the training part
    flat = ((xtr.flatten(1), split.y_train), (xte.flatten(1), split.y_test))
    return {"logreg": flat, "mlp": flat, "cnn": ((xtr, split.y_train), (xte, split.y_test))}


def build_trial_model(key: str, side: int, seed: int, *, width: int, cnn_width: int) -> nn.Module:
    """The untrained model of ``key`` for ``side``×``side`` images (float64)."""
    if key == "logreg":
        # seeded too: the convex minimum does not depend on the start, but TracIn's checkpoints do
        return models.build("logistic_regression", d_in=side * side, n_classes=10, bias=True, seed=seed,
                            dtype=torch.float64)
    if key == "mlp":
        return models.build("mlp", d_in=side * side, n_classes=10, depth=1, width=width, activation="tanh",
                            seed=seed, dtype=torch.float64)
    if key == "cnn":
        return models.build("small_cnn", width=cnn_width, input_size=side, activation="tanh", seed=seed,
                            dtype=torch.float64)
    raise ValueError(f"unknown model {key!r}: use one of {list(MODEL_NAMES)}")


def _grad_norm(model: nn.Module, train: Data, l2: float) -> float:
    from helpers.objective import objective

    P = {k: v.detach().requires_grad_(True) for k, v in model_params(model).items()}
    g = torch.autograd.grad(objective(model, P, *train, l2=l2), list(P.values()))
    return float(torch.sqrt(sum((gi * gi).sum() for gi in g)))


def fit_model(key: str, model: nn.Module, recipe: Recipe, polish: Recipe, train: Data, test: Data, *, seed: int,
              n_checkpoints: int, n_test_points: int = 3, cache: bool = True) -> Fitted:
    """θ̂: ``recipe`` (full-batch Adam, one member of :func:`helpers.train.fit_ensemble`, which saves
    ``n_checkpoints`` evenly spaced checkpoints and their learning rates — TracIn's), then ``polish`` (L-BFGS) from
    there to its tolerance; ``n_test_points`` test points (:func:`pick_test_points`), ‖∇R(θ̂)‖ and the test
    accuracy. ``Fitted.recipe`` is ``polish``:
    the recipe every retrained model is held to."""
    marks = set(np.linspace(0, recipe.epochs - 1, n_checkpoints, dtype=int).tolist())

    def compute() -> dict[str, Any]:
        saved: dict[int, dict[str, Tensor]] = {}

        def keep(epoch: int, stacked: dict[str, Tensor]) -> None:
            if epoch in marks:
                saved[epoch] = {k: v[0].detach().clone() for k, v in stacked.items()}

        n = train[0].shape[0]
        ens = fit_ensemble(recipe, model, *train, weights=torch.full((1, n), 1.0 / n, dtype=train[0].dtype),
                           progress=False, on_epoch=keep)
        lr = [recipe.lr * 0.5 * (1 + np.cos(np.pi * e / recipe.epochs)) for e in sorted(saved)]
        polished = fit(polish, model, *train, init={k: v[0].detach() for k, v in ens.params.items()},
                       progress=False)
        return {"params": {k: v.detach() for k, v in polished.params.items()},
                "checkpoints": [saved[e] for e in sorted(saved)], "lrs": lr}

    key_ = {"model": model, "train": list(train), "recipe": recipe.to_dict(), "polish": polish.to_dict(),
            "marks": sorted(marks)}
    out = memoize("estimators_fit", key_, compute) if cache else compute()
    trained = model_with(model, out["params"])
    with torch.no_grad():
        losses = per_sample_losses(trained, model_params(trained), *test)
        acc = float((trained(test[0]).argmax(1) == test[1]).double().mean())
    picks = pick_test_points(losses, seed, n_test_points)
    rows = torch.as_tensor(list(picks.values()))
    return Fitted(key=key, seed=seed, model=trained, recipe=polish, train=train, test=(test[0][rows], test[1][rows]),
                  checkpoints=out["checkpoints"], checkpoint_lrs=out["lrs"],
                  grad_norm=_grad_norm(trained, train, recipe.weight_decay), acc_test=acc, test_names=list(picks),
                  test_rows=list(picks.values()))


def pick_test_points(losses: Tensor, seed: int, n_points: int) -> dict[str, int]:
    """``{name: position}`` of ``n_points`` test points: the max, median and a random test loss (chapter 3's
    :func:`helpers.experiments.validation.test_points`), then ``n_points − 3`` more drawn at random without
    replacement from the rest (``seed`` + 1), named ``random 2``, ``random 3``, ... ."""
    picks = test_points(losses, seed)
    rest = [i for i in range(len(losses)) if i not in picks.values()]
    if not 3 <= n_points <= len(rest) + 3:
        raise ValueError(f"n_test_points must lie in [3, {len(rest) + 3}] for a test pool of {len(losses)}, got "
                         f"{n_points}: raise n_test or lower n_test_points")
    extra = np.random.default_rng(seed + 1).choice(rest, n_points - 3, replace=False)
    return picks | {f"random {j + 2}": int(i) for j, i in enumerate(extra)}


# ----------------------------------------------------------------------------------------------------------
# estimators, timed
# ----------------------------------------------------------------------------------------------------------


def _peak_reset() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set (Linux)
        return True
    except OSError:
        return False


def _status_mib(field_name: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def timed(fn: Callable[[], Tensor]) -> tuple[np.ndarray, float, float]:
    """(values, seconds, extra peak resident memory in MiB — NaN where the kernel cannot reset the mark)."""
    reset = _peak_reset()
    base = _status_mib("VmRSS")
    t0 = time.perf_counter()
    values = fn()
    seconds = time.perf_counter() - t0
    peak = _status_mib("VmHWM") - base if reset else float("nan")
    return values.detach().double().numpy(), seconds, max(peak, 0.0)


def estimator_calls(f: Fitted, *, damping: float, lissa_depth: int, arnoldi_rank: int, trak_dims: Sequence[int],
                    cg_rtol: float) -> dict[str, Callable[[], Tensor]]:
    """The chapter's estimators on one θ̂, as zero-argument calls (:data:`ESTIMATORS` order)."""
    m, tr, te, loss = f.model, f.train, f.test, f.recipe.loss
    common = dict(l2=f.recipe.weight_decay, damping=damping, loss=loss)
    small, large = trak_dims
    return {
        "exact (CG)": lambda: predict_removal(m, tr, te, method="cg", rtol=cg_rtol, block=True,
                                              backend="autodiff", **common).values,
        "exact, last layer": lambda: predict_removal(m, tr, te, params="last", **common).values,
        "EK-FAC": lambda: predict_removal(m, tr, te, hessian="ekfac", **common).values,
        "K-FAC": lambda: predict_removal(m, tr, te, hessian="kfac", **common).values,
        "LiSSA": lambda: predict_removal(m, tr, te, method="lissa", depth=lissa_depth, backend="autodiff",
                                         **common).values,
        "Arnoldi": lambda: predict_removal(m, tr, te, method="arnoldi", rank=arnoldi_rank,
                                           krylov_dim=2 * arnoldi_rank, backend="autodiff", **common).values,
        "TRAK small": lambda: est.trak(m, tr, te, proj_dim=small, seed=f.seed, **common),
        "TRAK large": lambda: est.trak(m, tr, te, proj_dim=large, seed=f.seed, **common),
        "TracIn": lambda: est.tracin(m, tr, te, f.checkpoints, f.checkpoint_lrs, loss=loss),
        "grad. similarity": lambda: est.gradient_similarity(m, tr, te, loss=loss),
    }


def run_estimators(f: Fitted, *, cache: bool = True, **settings: Any) -> dict[str, dict[str, Any]]:
    """Every estimator on ``f``: ``{name: {"values", "seconds", "peak_mib"}}``, memoised (times included: they
    are those of the first, cold computation)."""
    def compute() -> dict[str, dict[str, Any]]:
        out = {}
        for name, call in estimator_calls(f, **settings).items():
            values, seconds, peak = timed(call)
            out[name] = {"values": values, "seconds": seconds, "peak_mib": peak}
        return out

    key = {"model": f.model, "train": list(f.train), "test": list(f.test), "lrs": f.checkpoint_lrs,
           "checkpoints": f.checkpoints, "settings": settings, "seed": f.seed}
    return memoize("estimators_run", key, compute) if cache else compute()


# ----------------------------------------------------------------------------------------------------------
# targets
# ----------------------------------------------------------------------------------------------------------


def run_targets(f: Fitted, candidates: Sequence[int], *, cold_seeds: Sequence[int], pbrf_damping: float,
                cache: bool = True) -> dict[str, Any]:
    """Leave-one-out by cold start (``f.recipe``, L-BFGS to its tolerance, from fresh initialisations
    ``cold_seeds``) and by warm start (the same recipe from θ̂), and the PBRF (the same recipe from θ̂, damping
    ``pbrf_damping``), on the same ``candidates``: every retrained model held to the criterion θ̂ meets."""
    warm = pbrf = f.recipe
    removed = [int(i) for i in candidates]
    theta = model_params(f.model)
    return {
        "LOO cold": retrain.cold_start(f.model, f.train, f.test, removed, f.recipe, list(cold_seeds), theta_hat=theta,
                                       progress=False, cache=cache),
        "LOO warm": retrain.warm_start(f.model, theta, f.train, f.test, removed, warm, progress=False, cache=cache),
        "PBRF": retrain.pbrf(f.model, theta, f.train, f.test, removed, pbrf, damping=pbrf_damping, progress=False,
                             cache=cache),
    }


def lds_target(f: Fitted, masks: np.ndarray, seeds: Sequence[int], *, pool: Data, cache: bool = True
               ) -> retrain.SubsetRetraining:
    """Models of ``f``'s architecture and recipe retrained from scratch on each subset of ``masks``, with their
    losses on the whole test ``pool``: the same models serve every θ̂ of the architecture, each θ̂ reading the
    losses of its own test points (:func:`for_test_points`)."""
    return retrain.on_subsets(f.model, f.train, pool, masks, f.recipe, seeds, progress=False, cache=cache)


def for_test_points(sub: retrain.SubsetRetraining, f: Fitted) -> retrain.SubsetRetraining:
    """The subset models' losses on ``f``'s test points (``f.test_rows`` of the pool they were evaluated on)."""
    if not f.test_rows or sub.test_losses.shape[2] <= max(f.test_rows):
        raise ValueError("the subset models were not evaluated on this θ̂'s test pool: pass the pool to lds_target")
    return replace(sub, test_losses=sub.test_losses[:, :, list(f.test_rows)])


# ----------------------------------------------------------------------------------------------------------
# agreement per unit, summary, figure
# ----------------------------------------------------------------------------------------------------------


def agreement_rows(f: Fitted, runs: dict[str, dict[str, Any]], truths: dict[str, Any], candidates: Sequence[int],
              lds_runs: dict[str, retrain.SubsetRetraining]) -> pd.DataFrame:
    """One row per (estimator, target, test point): Pearson over the candidates (LOO, PBRF; Δ minus the drift
    run) or the LDS (Spearman over subsets), with the cold start's noise ceiling √r_k for the LOO-cold rows."""
    cand = np.asarray(candidates)
    rows = []
    for target, gt in truths.items():
        delta = gt.delta_minus_drift  # [n_test, k]
        ceilings = ([float(metrics.noise_ceiling(gt.delta_per_seed[:, t]).ceiling)
                     for t in range(delta.shape[0])] if target == "LOO cold" and gt.delta_per_seed.shape[0] > 1
                    else [np.nan] * delta.shape[0])
        for name, run in runs.items():
            for t, tname in enumerate(f.test_names):
                rows.append({"target": target, "estimator": name, "test_point": tname,
                             "value": metrics.pearson(run["values"][t, cand], delta[t]), "ceiling": ceilings[t]})
    for target, sub in lds_runs.items():
        for name, run in runs.items():
            scores = metrics.lds(run["values"], sub.masks, sub.mean_losses)
            rows += [{"target": target, "estimator": name, "test_point": tname, "value": float(scores[t]),
                      "ceiling": np.nan} for t, tname in enumerate(f.test_names)]
    out = pd.DataFrame(rows)
    out.insert(0, "theta_seed", f.seed)
    out.insert(0, "model", MODEL_NAMES[f.key])
    return out


def cost_rows(f: Fitted, runs: dict[str, dict[str, Any]]) -> pd.DataFrame:
    return pd.DataFrame([{"model": MODEL_NAMES[f.key], "theta_seed": f.seed, "estimator": k,
                          "seconds": v["seconds"], "peak_mib": v["peak_mib"]} for k, v in runs.items()])


def summary(units: pd.DataFrame, *, n_resamples: int, seed: int = 0) -> pd.DataFrame:
    """Mean agreement per (model, estimator, target) over θ̂ seeds × test points with the two-stage bootstrap
    interval, the median ceiling, and the paired comparison with gradient similarity (:func:`against_similarity`):
    ``beats_similarity`` where its Holm-adjusted p-value is below :data:`ALPHA`."""
    rows = []
    for (model, target, name), g in units.groupby(["model", "target", "estimator"], sort=False):
        grid = g.pivot_table(index="theta_seed", columns="test_point", values="value", aggfunc="first")
        if grid.isna().any().any():
            raise ValueError(f"{model}/{target}/{name}: every test point of every θ̂ must be measured")
        mean, low, high = hierarchical_mean_ci(grid.to_numpy(), n_resamples=n_resamples, seed=seed)
        rows.append({"model": model, "target": target, "estimator": name, "value": mean, "low": low, "high": high,
                     "ceiling": float(g["ceiling"].median()), "n_units": int(grid.size)})
    out = pd.DataFrame(rows).join(against_similarity(units), on=["model", "target", "estimator"])
    out["beats_similarity"] = out["p_holm"] < ALPHA  # NaN (gradient similarity itself) compares False
    return out


def against_similarity(units: pd.DataFrame) -> pd.DataFrame:
    """Each estimator against gradient similarity, paired on the units (the same θ̂ and test point): the mean
    difference of their agreements and the exact one-sided sign-flip p-value of "higher"
    (:func:`helpers.stats.sign_flip_test`; conditional on the trained models, the units as exchangeable pairs),
    Holm-adjusted within each (model, target) — the family that asks "does any approximation beat gradient
    similarity here?". Indexed by (model, target, estimator)."""
    rows = []
    for (model, target), g in units.groupby(["model", "target"], sort=False):
        by_unit = g.pivot_table(index=["theta_seed", "test_point"], columns="estimator", values="value",
                                aggfunc="first")
        base = by_unit.pop("grad. similarity")
        family = []
        for name in by_unit.columns:
            mean, p = sign_flip_test((by_unit[name] - base).to_numpy())
            family.append({"model": model, "target": target, "estimator": name, "diff_vs_similarity": mean,
                           "p_vs_similarity": p})
        for row, adjusted in zip(family, holm([r["p_vs_similarity"] for r in family])):
            row["p_holm"] = float(adjusted)
        rows += family
    return pd.DataFrame(rows).set_index(["model", "target", "estimator"])


def cost_summary(costs: pd.DataFrame) -> pd.DataFrame:
    """Median seconds and peak MiB per (model, estimator) over θ̂ seeds."""
    return costs.groupby(["model", "estimator"], sort=False)[["seconds", "peak_mib"]].median().reset_index()


def display_table(summ: pd.DataFrame, costs: pd.DataFrame) -> pd.DataFrame:
    """The chapter's one table: rows model × estimator, one column per target ("mean [low, high]"), cost."""
    summ = summ.assign(text=[f"{v:.2f} [{lo:.2f}, {hi:.2f}]" for v, lo, hi in zip(summ.value, summ.low, summ.high)])
    wide = summ.pivot_table(index=["model", "estimator"], columns="target", values="text", aggfunc="first",
                            sort=False)
    wide = wide[[t for t in TARGETS if t in wide.columns]]
    cost = cost_summary(costs).set_index(["model", "estimator"])
    wide["time [s]"] = cost["seconds"].map("{:.2f}".format)
    wide["peak [MiB]"] = cost["peak_mib"].map(lambda v: f"{v:.0f}" if np.isfinite(v) else "not measured")
    return wide


def draw_summary(summ: pd.DataFrame, costs: pd.DataFrame, lds_labels: dict[str, str],
                 units: pd.DataFrame | None = None):
    """Rows: models; columns: the targets (mean agreement with its interval per estimator, and with ``units``
    each unit's value — θ̂ seed × test point, the runs behind the mean — as a small grey dot; the cold start's
    noise ceiling dashed), then the cost: median seconds (log scale) and median peak extra memory in MiB over θ̂.
    A memory the kernel could not measure (NaN) is drawn as no bar and said in the panel."""
    import matplotlib.pyplot as plt

    from helpers import plots

    model_list = list(dict.fromkeys(summ["model"]))
    targets = [t for t in TARGETS if t in set(summ["target"])]
    n_cols = len(targets) + 2
    fig, axes = plt.subplots(len(model_list), n_cols, figsize=(2.3 * n_cols, 0.5 + 2.6 * len(model_list)),
                             sharey=True, squeeze=False)
    ypos = np.arange(len(ESTIMATORS))[::-1]
    cost = cost_summary(costs)
    last = len(model_list) - 1
    for i, model in enumerate(model_list):
        for j, target in enumerate(targets):
            ax = axes[i, j]
            g = summ[(summ.model == model) & (summ.target == target)].set_index("estimator").loc[list(ESTIMATORS)]
            if units is not None:
                u = units[(units.model == model) & (units.target == target)]
                row = u["estimator"].map({e: y for e, y in zip(ESTIMATORS, ypos)}).to_numpy(dtype=float)
                jitter = np.random.default_rng(0).uniform(-0.22, 0.22, size=len(u))
                ax.scatter(u["value"], row + jitter, s=5, color="0.55", alpha=0.7, lw=0, zorder=1,
                           label="θ̂ × test point" if (i, j) == (0, 0) else None)
            plots.ci_points(ax, ypos, g["value"], g["low"], g["high"], color="C0")
            ax.axvline(0, color="0.6", lw=0.8)
            if target == "LOO cold" and np.isfinite(g["ceiling"]).any():
                ax.axvline(float(np.nanmedian(g["ceiling"])), color="C3", ls="--", lw=1, label="noise ceiling")
                ax.legend(loc="lower left", fontsize=7)
            ax.set_xlim(-1.05, 1.05)
            if i == 0:
                ax.set_title(lds_labels.get(target, target), fontsize=9)
            if i == last:
                ax.set_xlabel("LDS (Spearman)" if target.startswith("LDS") else "Pearson r")
        c = cost[cost.model == model].set_index("estimator").loc[list(ESTIMATORS)]
        ax_time, ax_mem = axes[i, -2], axes[i, -1]
        ax_time.barh(ypos, c["seconds"].to_numpy(), color="0.5")
        ax_time.set_xscale("log")
        mib = c["peak_mib"].to_numpy(dtype=float)
        ax_mem.barh(ypos, np.where(np.isfinite(mib), mib, 0.0), color="0.75")
        if not np.isfinite(mib).all():
            ax_mem.text(0.98, 0.02, "no bar: not measured", transform=ax_mem.transAxes, ha="right", va="bottom",
                        fontsize=7)
        if i == 0:
            ax_time.set_title("time", fontsize=9)
            ax_mem.set_title("memory", fontsize=9)
        if i == last:
            ax_time.set_xlabel("seconds (median over θ̂)")
            ax_mem.set_xlabel("peak extra MiB (median)")
        axes[i, 0].set_yticks(ypos, list(ESTIMATORS), fontsize=8)
        axes[i, 0].set_ylabel(model, fontsize=9)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------------------------
# the chapter's sections
# ----------------------------------------------------------------------------------------------------------


def run_chapter(*, models_run: Sequence[str], theta_seeds: Sequence[int], seed: int, n_train: int, n_test: int,
                pool: int, width: int, cnn_width: int, lr: float, epochs: int, l2: float, n_checkpoints: int,
                grad_tol: float, max_iter: int, damping: float, lissa_depth: int, arnoldi_rank: int,
                trak_dims: Sequence[int], cg_rtol: float, k: int, cold_seeds: int, pbrf_damping: float,
                alphas: Sequence[float], n_subsets: int, subset_seeds: int, n_test_points: int = 3,
                lds_check_subsets: int = 0, lds_check_tol: float = 0.0, threads: int = 1) -> dict[str, Any]:
    """Every trial of the chapter: fits, estimators, targets, LDS retraining, and the LDS check on the convex
    control (:func:`lds_check`; skipped when ``lds_check_subsets`` is 0 or the control is not run); returns the
    frames it shows."""
    if len(alphas) != 2 or alphas[0] == alphas[1]:
        raise ValueError(f"alphas must be two different subset sizes, e.g. [0.5, 0.9] (the LDS at a small and a "
                         f"large α), got {list(alphas)}")
    if len(trak_dims) != 2:
        raise ValueError(f"trak_dims must be two projection dimensions, e.g. [64, 512], got {list(trak_dims)}")
    if not models_run or not theta_seeds:
        raise ValueError(f"models_run and theta_seeds must not be empty: use models from {list(MODEL_NAMES)} and "
                         "at least one seed")
    if threads:
        torch.set_num_threads(threads)
    data = estimator_data(seed, n_train=n_train, n_test=n_test, pool=pool)
    side = 28 // pool
    recipe = Recipe(optimizer="adam", lr=lr, epochs=epochs, weight_decay=l2, schedule="cosine")
    polish = Recipe(optimizer="lbfgs", lr=1.0, tol=grad_tol, max_iter=max_iter, weight_decay=l2)
    masks = {a: metrics.random_subsets(n_train, a, n_subsets, seed=seed + SUBSET_SEED_OFFSET) for a in alphas}
    lds_names = {a: ("LDS α small", "LDS α large")[i] for i, a in enumerate(sorted(alphas))}
    units, costs, fits, conv, control = [], [], [], [], []
    settings = dict(damping=damping, lissa_depth=lissa_depth, arnoldi_rank=arnoldi_rank, trak_dims=list(trak_dims),
                    cg_rtol=cg_rtol)
    for key in models_run:
        lds_pool = None
        for s in theta_seeds:
            model = build_trial_model(key, side, s, width=width, cnn_width=cnn_width)
            f = fit_model(key, model, recipe, polish, *data[key], seed=s, n_checkpoints=n_checkpoints,
                          n_test_points=n_test_points)
            if lds_pool is None:  # subset models from scratch: the same for every θ̂ of the architecture
                lds_pool = {lds_names[a]: lds_target(f, masks[a], range(100, 100 + subset_seeds), pool=data[key][1])
                            for a in alphas}
            lds_runs = {name: for_test_points(sub, f) for name, sub in lds_pool.items()}
            runs = run_estimators(f, **settings)
            cand = np.random.default_rng(seed * 1000 + s).choice(n_train, k, replace=False)
            truths = run_targets(f, cand, cold_seeds=[1000 + s * 10 + j for j in range(cold_seeds)],
                                 pbrf_damping=pbrf_damping)
            units.append(agreement_rows(f, runs, truths, cand, lds_runs))
            costs.append(cost_rows(f, runs))
            fits.append(f)
            conv.append(convergence_rows(f, truths, lds_runs))
            if key == "logreg":
                control.append((f, runs["exact (CG)"]["values"]))
    check = (lds_check(control, data["logreg"][1], alphas=alphas, n_subsets=n_subsets,
                       check_subsets=lds_check_subsets, tight_tol=lds_check_tol, seed=seed, subset_seeds=subset_seeds)
             if control and lds_check_subsets else None)
    return {"units": pd.concat(units, ignore_index=True), "costs": pd.concat(costs, ignore_index=True),
            "fits": fits, "convergence": pd.concat(conv, ignore_index=True), "lds_names": lds_names,
            "masks": masks, "lds_check": check}


def lds_check(control: Sequence[tuple[Fitted, np.ndarray]], pool: Data, *, alphas: Sequence[float], n_subsets: int,
              check_subsets: int, tight_tol: float, seed: int, subset_seeds: int, cache: bool = True
              ) -> pd.DataFrame:
    """Why the LDS of exact influence on the convex control is below 1, separated into its candidate causes.

    For each θ̂ of the control (``control``: its fit and its exact influence; the subset models' losses are taken
    on the test ``pool`` and read at each θ̂'s test points) and each test point, the LDS of exact
    influence over the first ``n_subsets`` subsets (the table's: the first rows of the same random draw), over all
    ``check_subsets`` (the sampling noise of few subsets), and over the same subsets with their models trained to
    ``tight_tol`` instead of the chapter's criterion (the subset models' optimisation error); beside them the test
    point's loss and gradient norm at θ̂ (a point with near-zero gradient has near-zero first-order effects, so its
    loss changes are second order, which no sum of single-point effects ranks). One row per (θ̂, test point, α)."""
    from helpers.influence import per_sample_grads

    if check_subsets < n_subsets:
        raise ValueError(f"lds_check_subsets ({check_subsets}) must be at least n_subsets ({n_subsets}): its first "
                         "n_subsets subsets are the table's")
    if not 0 < tight_tol < control[0][0].recipe.tol:
        raise ValueError(f"lds_check_tol must lie in (0, grad_tol = {control[0][0].recipe.tol:g}), got {tight_tol}")
    f0 = control[0][0]
    tight = replace(f0, recipe=replace(f0.recipe, tol=tight_tol))
    seeds = range(100, 100 + subset_seeds)  # those of the table's subset models
    rows = []
    for a in sorted(alphas):
        masks = metrics.random_subsets(len(f0.train[1]), a, check_subsets, seed=seed + SUBSET_SEED_OFFSET)
        on_pool = {"criterion": lds_target(f0, masks, seeds, pool=pool, cache=cache),
                   "tight": lds_target(tight, masks, seeds, pool=pool, cache=cache)}
        for f, values in control:
            subs = {name: for_test_points(sub, f) for name, sub in on_pool.items()}
            P = model_params(f.model)
            loss = per_sample_losses(f.model, P, *f.test, loss=f.recipe.loss).detach().numpy()
            grad = per_sample_grads(f.model, P, *f.test, loss=f.recipe.loss).norm(dim=1).numpy()
            first = metrics.lds(values, subs["criterion"].masks[:n_subsets], subs["criterion"].mean_losses[:n_subsets])
            every = metrics.lds(values, subs["criterion"].masks, subs["criterion"].mean_losses)
            tight_lds = metrics.lds(values, subs["tight"].masks, subs["tight"].mean_losses)
            rows += [{"alpha": float(a), "theta_seed": f.seed, "test_point": name, "test_loss": float(loss[t]),
                      "grad_norm_test": float(grad[t]), "lds_table": float(first[t]), "lds_all": float(every[t]),
                      "lds_tight": float(tight_lds[t]),
                      "worst_grad_norm": float(np.max(subs["criterion"].grad_norm)),
                      "worst_grad_norm_tight": float(np.max(subs["tight"].grad_norm))}
                     for t, name in enumerate(f.test_names)]
    return pd.DataFrame(rows)


def record_lds_check(check: pd.DataFrame | None, *, n_subsets: int, check_subsets: int, tight_tol: float,
                     grad_tol: float, n_resamples: int) -> pd.DataFrame | None:
    """Record the LDS check's numbers, glue its sentence, and return its per-test-point table (None: not run)."""
    book.record("lds_check_subsets", int(check_subsets))
    book.record("lds_check_tol", float(tight_tol), fmt="{:g}")
    if check is None:
        book.say("lds_check_text", "The check was not run in this profile (it needs the convex control and "
                 "lds_check_subsets > 0).")
        return None
    parts, cis, tables = [], {}, {}
    for a, g in check.groupby("alpha", sort=True):
        grid = g.pivot_table(index="theta_seed", columns="test_point", values="lds_all", aggfunc="first")
        cis[a] = ci = book.record_ci(f"lds_check_{_alpha_slug(a, check)}", hierarchical_mean_ci(
            grid.to_numpy(), n_resamples=n_resamples))
        # the table's subsets are the first of the check's: this mean is the table's LDS of exact influence
        tables[a] = book.record(f"lds_check_table_{_alpha_slug(a, check)}", float(g["lds_table"].mean()),
                                fmt="{:.2f}")
        parts.append(f"{ci[0]:.2f} [{ci[1]:.2f}, {ci[2]:.2f}] at α = {a:g}")
    change = float((check["lds_tight"] - check["lds_all"]).abs().max())
    book.record("lds_check_max_change", change, fmt="{:.3f}")
    worst, worst_tight = float(check["worst_grad_norm"].max()), float(check["worst_grad_norm_tight"].max())
    book.record("lds_check_grad_norm", worst, fmt="{:.1e}")
    book.record("lds_check_grad_norm_tight", worst_tight, fmt="{:.1e}")
    text = (f"Over {check_subsets} subsets per α instead of the table's {n_subsets}, the LDS of exact influence on "
            f"the convex control is {' and '.join(parts)}")
    inside = all(cis[a][1] <= tables[a] <= cis[a][2] for a in cis)
    text += ((f"; the table's {n_subsets} subsets give " + " and ".join(f"{tables[a]:.2f}" for a in cis)
              + (", inside these intervals: few subsets make the number noisier, not lower. " if inside else
                 ", outside an interval: with few subsets the table's number is off by more than its noise. ")))
    if worst_tight > tight_tol:
        text += (f"The subset models meant to reach ‖∇R‖ ≤ {tight_tol:g} stopped at {worst_tight:.1e}, so the "
                 f"check of their optimisation error is incomplete; with them the LDS moves by at most {change:.3f}. ")
    elif change < 0.01:
        text += (f"Subset models trained to ‖∇R‖ ≤ {tight_tol:g} instead of {grad_tol:g} change no test point's LDS "
                 f"by more than {change:.3f}: their optimisation error is not what keeps it below 1. ")
    else:
        text += (f"Subset models trained to ‖∇R‖ ≤ {tight_tol:g} instead of {grad_tol:g} change a test point's LDS "
                 f"by up to {change:.2f}: the subset models' optimisation error is part of the shortfall. ")
    small, large = min(cis), max(cis)
    if cis[large][1] > cis[small][2]:
        text += (f"The LDS is higher at α = {large:g}, each subset model trained without {1 - large:.0%} of the "
                 f"points, than at α = {small:g}, without {1 - small:.0%}, with intervals apart: the shortfall grows "
                 "with the size of the removal, as the second-order effects of removing many points at once do — "
                 "what no sum of single-point effects captures. ")
    else:
        text += (f"The intervals at α = {small:g} and α = {large:g} overlap, so this check does not show the "
                 "shortfall growing with the size of the removal. ")
    low = check.loc[check["lds_all"].idxmin()]
    smallest = check.loc[check["grad_norm_test"].idxmin()]
    if (low.theta_seed, low.test_point) == (smallest.theta_seed, smallest.test_point):
        text += (f"The lowest LDS, {low.lds_all:.2f} (α = {low.alpha:g}), belongs to the test point with the smallest "
                 f"gradient, ‖∇ℓ‖ = {low.grad_norm_test:.1e} at a loss of {low.test_loss:.1e}: its first-order effects "
                 f"are nearly zero, so what removing {1 - low.alpha:.0%} of the training points does to its loss is "
                 "second order, and no sum of single-point effects ranks that.")
    else:
        text += (f"The lowest LDS, {low.lds_all:.2f} (α = {low.alpha:g}), belongs to a test point with ‖∇ℓ‖ = "
                 f"{low.grad_norm_test:.1e}; the smallest gradient of the check, {smallest.grad_norm_test:.1e}, has "
                 f"an LDS of {smallest.lds_all:.2f}.")
    book.say("lds_check_text", text)
    table = check.assign(alpha=check["alpha"].map("{:g}".format)).rename(columns={
        "theta_seed": "θ̂ seed", "test_point": "test point", "test_loss": "test loss", "grad_norm_test": "‖∇ℓ‖",
        "lds_table": f"LDS, {n_subsets} subsets", "lds_all": f"LDS, {check_subsets} subsets",
        "lds_tight": f"LDS, {check_subsets} subsets, ‖∇R‖ ≤ {tight_tol:g}"})
    book.figure_data("lds_check", check)
    return table.drop(columns=["worst_grad_norm", "worst_grad_norm_tight"]).set_index(["alpha", "θ̂ seed",
                                                                                         "test point"])


def _alpha_slug(alpha: float, check: pd.DataFrame) -> str:
    """``small`` / ``large``: the α's place among the check's two subset sizes (the records' names)."""
    return "small" if alpha == check["alpha"].min() else "large"


def convergence_rows(f: Fitted, truths: dict[str, Any], lds_runs: dict[str, retrain.SubsetRetraining]
                     ) -> pd.DataFrame:
    """The largest final gradient norm of θ̂ and of every retrained model, per target."""
    rows = [{"what": "θ̂", "max_grad_norm": f.grad_norm}]
    rows += [{"what": name, "max_grad_norm": float(np.max(gt.grad_norm))} for name, gt in truths.items()]
    rows += [{"what": name, "max_grad_norm": float(np.max(sub.grad_norm))} for name, sub in lds_runs.items()]
    out = pd.DataFrame(rows)
    out.insert(0, "theta_seed", f.seed)
    out.insert(0, "model", MODEL_NAMES[f.key])
    return out


def record_chapter(result: dict[str, Any], *, grad_tol: float, n_resamples: int) -> pd.DataFrame:
    """Record the headline numbers and return the summary; glue the verdict sentences."""
    summ = summary(result["units"], n_resamples=n_resamples)
    conv = result["convergence"]
    worst = conv.groupby("what", sort=False)["max_grad_norm"].max()
    for what, v in worst.items():
        book.record(f"grad_norm_{_slug(what)}", float(v), fmt="{:.1e}")
    book.record("grad_tol", float(grad_tol), fmt="{:g}")
    book.say("convergence_verdict", "every θ̂ and every retrained model met the criterion ‖∇R‖ ≤ "
             f"{grad_tol:g}" if float(worst.max()) <= grad_tol else
             f"not every model met the criterion ‖∇R‖ ≤ {grad_tol:g}: the worst is {worst.idxmax()} at "
             f"{float(worst.max()):.1e} — read its rows with that in mind")
    for r in summ.itertuples():
        book.record_ci(f"{_slug(r.model)}_{_slug(r.estimator)}_{_slug(r.target)}", (r.value, r.low, r.high))
    costs = cost_summary(result["costs"])
    for r in costs.itertuples():
        book.record(f"seconds_{_slug(r.model)}_{_slug(r.estimator)}", float(r.seconds), fmt="{:.2f}")
    beats = summ[summ.beats_similarity & (summ.estimator != "grad. similarity")]
    book.record("n_pairs_beating_similarity", int(len(beats)))
    book.record("n_pairs", int((summ.estimator != "grad. similarity").sum()))
    n_family = int(summ[summ.estimator != "grad. similarity"].groupby(["model", "target"]).size().max())
    book.record("n_family", n_family)
    book.record("family_alpha", ALPHA, fmt="{:g}")
    book.record("n_test_points", int(result["units"]["test_point"].nunique()))
    n_units = book.record("n_units", int(summ["n_units"].max()))
    smallest = 2.0 ** -n_units
    book.say("power_text", f"With n units the smallest p-value is 2⁻ⁿ: {smallest:.1g} for the {n_units} units here, "
             + (f"which Holm's correction over {n_family} comparisons can pass." if smallest * n_family < ALPHA else
                f"which Holm's correction over {n_family} comparisons cannot pass: at this size no estimator can be "
                "declared better than gradient similarity, whatever the data — add θ̂ seeds or test points."))
    book.figure_data("summary", summ.assign(note=np.where(np.isfinite(summ["ceiling"]), "",
                                                          "no noise ceiling: a deterministic target, or one seed")))
    book.figure_data("costs", result["costs"])
    return summ


def ranking_by_target(summ: pd.DataFrame) -> pd.DataFrame:
    """Per model and target, the estimators ranked by mean agreement (1 = best) — does the ranking change with the
    target? The last column is Kendall's τ between each target's ranking and the LOO-cold one."""
    out = summ.assign(rank=summ.groupby(["model", "target"])["value"].rank(ascending=False, method="min"))
    wide = out.pivot_table(index=["model", "estimator"], columns="target", values="rank", sort=False)
    wide = wide[[t for t in TARGETS if t in wide.columns]]
    return wide.astype(int)


def record_rankings(ranks: pd.DataFrame) -> dict[tuple[str, str], float]:
    """Kendall's τ-b between each target's estimator ranking and the LOO-cold ranking, per model (recorded as
    ``tau_<model>_<target>``); returns them."""
    out = {}
    for model, g in ranks.groupby(level=0, sort=False):
        for target in g.columns:
            if target == "LOO cold":
                continue
            tau = float(metrics.kendall(g["LOO cold"].to_numpy(float), g[target].to_numpy(float)))
            book.record(f"tau_{_slug(model)}_{_slug(target)}", tau, fmt="{:.2f}")
            out[(model, target)] = tau
    return out


def _slug(text: str) -> str:
    text = text.lower().replace("α", "alpha").replace("θ̂", "theta")
    slug = "".join(c if c.isascii() and c.isalnum() else "_" for c in text)
    while "__" in slug:
        slug = slug.replace("__", "_")
    return slug.strip("_")


#: dattri's MNIST-10 benchmark (book/data/published_lds.md says where the numbers come from)
PUBLISHED_LDS = Path(__file__).resolve().parents[2] / "book" / "data" / "published_lds.csv"
#: the book's model → dattri's, and the book's estimator → dattri's method (TRAK on one model: dattri's TRAK-1)
PUBLISHED_MODELS = {"softmax regression (convex)": "logistic regression", "MNIST MLP": "MLP"}
PUBLISHED_METHODS = {"exact (CG)": "CG", "LiSSA": "LiSSA", "Arnoldi": "Arnoldi", "TRAK small": "TRAK-1",
                     "TRAK large": "TRAK-1", "TracIn": "TracIn", "grad. similarity": "Grad-Dot"}


def published_comparison(summ: pd.DataFrame, alphas: Sequence[float], path: Path = PUBLISHED_LDS
                         ) -> tuple[pd.DataFrame, str]:
    """The book's LOO (cold) and LDS at the α nearest 0.5 beside dattri's published MNIST-10 numbers, for the
    estimators both have, on the two models both have: ``(table, sentence)``. The sentence compares, per model
    and target, which method each ranks first among the estimators in common."""
    pub = pd.read_csv(path)
    missing = {"model", "method", "target", "value"} - set(pub.columns)
    if missing:
        raise ValueError(f"{path} lacks the columns {sorted(missing)}")
    alpha = min(alphas, key=lambda a: abs(a - 0.5))
    lds = "LDS α small" if alpha == min(alphas) else "LDS α large"
    targets = {"LOO cold": "LOO", lds: "LDS"}
    rows, firsts = [], []
    for model, theirs in PUBLISHED_MODELS.items():
        mine = summ[summ.model == model]
        if mine.empty:
            continue
        best: dict[str, dict[str, float]] = {t: {} for t in targets}
        for name, method in PUBLISHED_METHODS.items():
            row: dict[str, str] = {"model (book / dattri)": f"{model} / {theirs}",
                                   "estimator (book / dattri)": f"{name} / {method}"}
            for target, their_target in targets.items():
                label = _target_label(target, alpha)
                g = mine[(mine.estimator == name) & (mine.target == target)]
                p = pub[(pub.model == theirs) & (pub.method == method) & (pub.target == their_target)]
                row[f"{label}: book [95% CI]"] = (f"{g.value.iloc[0]:.2f} [{g.low.iloc[0]:.2f}, {g.high.iloc[0]:.2f}]"
                                                  if not g.empty else "–")
                row[f"{their_target}: dattri"] = f"{float(p.value.iloc[0]):.2f}" if not p.empty else "–"
                if not g.empty and not p.empty:
                    best[target][name] = float(g.value.iloc[0])
            rows.append(row)
        for target, their_target in targets.items():
            common = best[target]
            theirs_sub = pub[(pub.model == theirs) & (pub.target == their_target)
                             & pub.method.isin([PUBLISHED_METHODS[e] for e in common])]
            if common and not theirs_sub.empty:
                mine_first = max(common, key=common.get)
                their_first = theirs_sub.loc[theirs_sub.value.idxmax()]
                firsts.append(f"{model}, {_target_label(target, alpha)}: the book ranks {mine_first} first "
                              f"({common[mine_first]:.2f}), dattri {their_first.method} ({their_first.value:.2f})")
    if not rows:
        return pd.DataFrame(rows), "none of the two models dattri benchmarks ran in this profile"
    return pd.DataFrame(rows).set_index(["model (book / dattri)", "estimator (book / dattri)"]), "; ".join(firsts)


def _target_label(target: str, alpha: float) -> str:
    return f"LDS α = {alpha:g}" if target.startswith("LDS") else "LOO (cold)"


def lds_labels(alphas: Sequence[float]) -> dict[str, str]:
    """Column titles of the two LDS targets, with their α."""
    small, large = sorted(alphas)
    return {"LDS α small": f"LDS α = {small:g}", "LDS α large": f"LDS α = {large:g}"}


def _memory_sentence(peak_mib: pd.Series) -> str:
    """The range of the estimators' peak extra memory on one model, or why it is missing."""
    known = peak_mib[np.isfinite(peak_mib.to_numpy(dtype=float))]
    if known.empty:
        return "Peak memory was not measured (the kernel does not let the high-water mark be reset)."
    low, high = known.idxmin(), known.idxmax()
    return (f"Peak extra memory ranges from {known[low]:.0f} MiB ({low}) to {known[high]:.0f} MiB ({high}).")


def models_table(result: dict[str, Any]) -> pd.DataFrame:
    """One row per trained θ̂: parameters, test accuracy, ‖∇R(θ̂)‖ (records the largest per model too)."""
    rows = [{"model": MODEL_NAMES[f.key], "θ̂ seed": f.seed, "parameters": f.n_params,
             "test accuracy": round(f.acc_test, 3), "‖∇R(θ̂)‖": f"{f.grad_norm:.1e}"} for f in result["fits"]]
    return pd.DataFrame(rows).set_index(["model", "θ̂ seed"])


def say_findings(summ: pd.DataFrame, result: dict[str, Any], ranks: pd.DataFrame, *, alphas: Sequence[float],
                 k: int, cold_seeds: int, n_train: int, n_subsets: int) -> None:
    """Record the settings the prose quotes and glue the sentences of the chapter's findings."""
    book.record("k", int(k))
    book.record("cold_seeds", int(cold_seeds))
    book.record("n_train", int(n_train))
    book.record("n_subsets", int(n_subsets))
    small, large = sorted(alphas)
    book.record("alpha_small", float(small), fmt="{:g}")
    book.record("alpha_large", float(large), fmt="{:g}")
    taus = record_rankings(ranks)
    labels = lds_labels(alphas)
    by_model: dict[str, list[str]] = {}
    for (model, target), tau in taus.items():
        by_model.setdefault(model, []).append(f"{labels.get(target, target)} {tau:.2f}")
    taus = [f"{model}: " + ", ".join(parts) for model, parts in by_model.items()]
    book.say("ranking_text", "; ".join(taus))
    beats = summ[summ.beats_similarity & (summ.estimator != "grad. similarity")]
    if beats.empty:
        book.say("beats_text", "none, under any target")
    else:
        named = beats.assign(text=[f"{r.estimator} (+{r.diff_vs_similarity:.2f}, Holm p = {r.p_holm:.2g})"
                                   for r in beats.itertuples()])
        by = named.groupby(["model", "target"], sort=False)["text"].apply(lambda s: ", ".join(s))
        book.say("beats_text", "; ".join(f"{m} against {lds_labels(alphas).get(t, t)}: {e}"
                                         for (m, t), e in by.items()))
    control = summ[(summ.model == MODEL_NAMES["logreg"]) & (summ.estimator == "exact (CG)")].set_index("target")
    for name, target in (("lds_exact_small", "LDS α small"), ("lds_exact_large", "LDS α large")):
        if target in control.index:
            r = control.loc[target]
            book.record_ci(name, (r.value, r.low, r.high))
        else:
            for suffix in ("", "_low", "_high"):
                book.record(name + suffix, book.NOT_RUN)
    costs = cost_summary(result["costs"])
    parts = []
    for model, g in costs.groupby("model", sort=False):
        g = g.set_index("estimator")
        cheap = g["seconds"].idxmin()
        parts.append(f"On the {model}, computing all influences takes {g.loc['exact (CG)', 'seconds']:.2g} s by CG "
                     f"on all parameters, {g.loc['EK-FAC', 'seconds']:.2g} s by EK-FAC, "
                     f"{g.loc['TRAK large', 'seconds']:.2g} s by TRAK at the larger projection and "
                     f"{g.loc['grad. similarity', 'seconds']:.2g} s by gradient similarity; the cheapest is {cheap}. "
                     + _memory_sentence(g["peak_mib"]))
    book.say("cost_text", " ".join(parts) + " Every time is that of one cold computation on one core, measured in "
             "the build that filled the cache; peak memory is the resident-set high-water mark above the start.")
