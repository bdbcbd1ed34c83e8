"""Chapter 2, "Non-convex relaxation" (``book/nonconvex.ipynb``): the seed paper's non-convex experiments
(STUDY.md §3), as orchestration of the engine — the stacked-ensemble backend :mod:`helpers.stacked` for the Iris
sweeps, :mod:`helpers.train`, :mod:`helpers.influence` and :mod:`helpers.retrain` for the larger models.

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

The chapter's sections
----------------------
What ``book/nonconvex.ipynb`` calls, one function (or two) per section, from :func:`loo_search_section` to
:func:`fig2_section`: each composes the functions above, records the numbers its prose quotes
(:mod:`helpers.book`) and returns the frames, tables and figures the chapter shows.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import scipy.stats as st
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import vmap

from helpers import book
from helpers import data as data_mod
from helpers import models
from helpers.cache import memoize
from helpers.curvature import CurvatureOperator, extreme_eigenvalues
from helpers.influence import predict_removal
from helpers.objective import param_names
from helpers.retrain import GroundTruth
from helpers.solvers import solve
from helpers.stacked import (Stack, StackFit, batched_last_layer_influence, bnn_last_layer_influence, fit_stack,
                             lanczos_check, member_ground_truth, paper_inverse_influence, retrain_last_layer,
                             retrain_stack, retraining_curve, softmax_layer_terms, stack_features,
                             stack_hessian_spectra, stack_losses, stack_member_losses, stack_objective_at)
from helpers.train import Recipe, fit_ensemble, floor_bound, model_with

__all__ = [
    "REGIMES", "Regime", "IrisData", "IrisSweepConfig", "IrisSweepResult", "DeepConfig", "DeepResult", "iris_data",
    "iris_loo_losses", "run_iris_chunk", "run_iris_sweeps", "floor_table",
    "full_length_check", "full_length_tasks", "compare_full_length", "member_retraining_curve", "summarize_runs",
    "compare_bars", "regime_gap", "tag_runs", "difference_reasons", "setting_mean_ci", "FLATTER", "run_deep",
    # the chapter's sections
    "PAPER", "BOOK", "BOOK2", "BOOK3", "MATCHED", "loo_search_section", "iris_sweeps_section", "floor_section",
    "floor_check_section", "retraining_curve_section", "fig1_section", "fig1_records", "stored_profile_section",
    "differences_section", "estimators_section", "drift_section", "pearson_section", "anova_section",
    "fig3_section", "run_deep_models", "fig2_section",
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
    losses = vmap(lambda t, xm, d, u: stack_member_losses(stack, t, xm, y, d, u, 1e-4))(
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
        loss[plain], gn[plain] = stack_objective_at(stack, theta[plain], tuple(a[plain] for a in aux), x, y)
    return StackFit(stack, members.reset_index(drop=True), theta, aux, loss, gn, fit.lr[row], fit.history[row],
                    fit.recipe, fit.floor_epoch[row], fit.epochs_run[row], None)


def _retrain_shared(fit: StackFit, swa: np.ndarray, x: Tensor, y: Tensor, test: tuple[Tensor, Tensor],
                    candidates: np.ndarray, config: IrisSweepConfig, progress: bool) -> GroundTruth:
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
    parts: dict[int, tuple[GroundTruth, int]] = {}

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
    return member_ground_truth(removed=candidates, protocol="all_layers",
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
        yt = yt_all[t:t + 1]
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


# ============================================================================================ the chapter's sections
# What book/nonconvex.ipynb calls, one function (or two) per section: each composes the engine calls above with
# helpers.stats / helpers.metrics, records the numbers the prose quotes (helpers.book.record / say / figure_data,
# glued by name) and returns the tidy frames, tables and figures the chapter shows. No arithmetic of its own beyond
# tabulating: the estimates, retrainings and curvature all come from the functions above.

#: the chapter's colours: the paper's bars, the book's, the book's second and third series
PAPER, BOOK, BOOK2, BOOK3 = "0.65", "C0", "C9", "C2"
_KEYS = ["sweep", "regime", "value"]


def _family_of(regime: str) -> str:
    """``"bnn"``, ``"l2"`` (every regime with weight decay) or ``"nol2"``: the regimes grouped by their objective."""
    return "bnn" if regime == "bnn" else ("l2" if regime.startswith("l2") else "nol2")


def loo_search_section(loo_seeds: Sequence[int], *, loo_epochs: int, dtype: str, test_index: int) -> tuple[int, Any]:
    """The test point: leave-one-out losses of every Iris point (:func:`iris_loo_losses`), averaged over
    ``loo_seeds``; records where the maximum lies and where the paper's index 83 ranks, and picks the sweeps' test
    point (``test_index``, or the highest mean loss when it is negative).

    Returns ``(test_point, figure)``: the figure is the bar chart of the mean leave-one-out losses (glue it as
    ``loo_fig``)."""
    import matplotlib.pyplot as plt

    loo = iris_loo_losses(loo_seeds, epochs=loo_epochs, dtype=dtype)
    per_seed = loo.loc[loo.groupby("seed")["loss"].idxmax(), "index"].to_numpy()
    mean_loss = loo.groupby("index")["loss"].mean()
    loo_argmax = int(mean_loss.idxmax())
    rank83 = int((mean_loss > mean_loss[83]).sum()) + 1
    test_point = loo_argmax if test_index < 0 else int(test_index)
    book.record("loo_argmax", loo_argmax)
    book.record("loo_rank83", rank83)
    book.record("loo_seed_agreement", float(np.mean(per_seed == loo_argmax)), fmt="{:.0%}")
    book.record("test_point", test_point)
    book.record("loo_max_loss", float(mean_loss.max()), fmt="{:.2f}")
    species = ["setosa", "versicolor", "virginica"][int(iris_data(test_point).y_test)]
    book.say("species_text", f"index {test_point} is an iris {species}")
    top4 = ", ".join(str(i) for i in mean_loss.sort_values(ascending=False).index[:4])
    book.say("loo_text", f"Averaged over {len(loo_seeds)} initialisation(s) the highest leave-one-out losses are those of "
        f"indices {top4}; the maximum of each initialisation is at "
        f"{', '.join(str(int(i)) for i in per_seed)}, and the paper's 83 ranks {rank83} on average. The index with the "
        f"highest mean loss is the maximum of {np.mean(per_seed == loo_argmax):.0%} of the initialisations.")
    book.say("test_point_text", f"The sweeps below use index {test_point}" + (
        " — the paper's, so that every bar compares like with like; which point is \"the\" hardest depends on the "
        "initialisation" if test_point == 83 and loo_argmax != 83 else ""))
    frame = book.figure_data("loo_losses", mean_loss.rename("loss").reset_index())
    fig, ax = plt.subplots(figsize=(7, 2.6))
    ax.bar(frame["index"], frame["loss"], color=PAPER, width=1.0)
    ax.bar([loo_argmax], [mean_loss[loo_argmax]], color=BOOK, width=1.5, label=f"maximum (index {loo_argmax})")
    ax.set(xlabel="iris index (scikit-learn order)", ylabel="leave-one-out loss (nats)")
    ax.legend(frameon=False)
    return test_point, fig


def iris_sweeps_section(*, depths: Sequence[int], widths: Sequence[int], depth_regimes: Sequence[str],
                        width_regimes: Sequence[str], last_layer_regimes: Sequence[str], stored_regimes: Sequence[str],
                        reps: int, epochs: int, retrain_epochs: int, n_candidates: int, test_point: int, dtype: str,
                        seed: int, n_jobs: int, full_check: dict[str, Any] | None
                        ) -> tuple[IrisSweepConfig, IrisSweepResult]:
    """Run the Iris sweeps of the parameters cell (:func:`run_iris_sweeps`, stopped at the learning-rate floor),
    the regimes of ``stored_regimes`` read from the committed paper-profile chunks instead
    (:func:`helpers.sweep_store.borrow`: the same members, same protocol); record their size (networks,
    retrainings, protocol lengths, the regimes with runs) and say which regimes were borrowed.

    Returns ``(config, result)``: the computed sweeps' :class:`IrisSweepConfig` and the computed and borrowed runs
    together."""
    from helpers import sweep_store  # it imports this module

    config = IrisSweepConfig(depths=tuple(depths), widths=tuple(widths),
                             depth_regimes=tuple(r for r in depth_regimes if r not in stored_regimes),
                             width_regimes=tuple(r for r in width_regimes if r not in stored_regimes),
                             last_layer_regimes=tuple(last_layer_regimes),
                             reps=reps, epochs=epochs, retrain_epochs=retrain_epochs, n_candidates=n_candidates,
                             test_index=test_point, dtype=dtype, seed=seed, stop_at_floor=True)
    result = run_iris_sweeps(config, n_jobs=n_jobs, full_check=full_check or None)
    # regimes this profile cannot afford come from the committed paper-profile chunks: the same members, same protocol
    borrowed = sweep_store.borrow(config, stored_regimes)
    result = IrisSweepResult.concat([result, borrowed]) if len(borrowed.runs) else result
    models_tab = result.models
    book.record("n_models", len(models_tab))
    book.record("n_retrainings", int(len(models_tab) * (n_candidates + 1)
                                     + models_tab["regime"].isin(last_layer_regimes).sum() * (n_candidates + 1)))
    book.record("reps", reps)
    book.record("epochs", epochs, fmt="{:,}")
    book.record("retrain_epochs", retrain_epochs, fmt="{:,}")
    book.say("regimes_text", ", ".join(dict.fromkeys(models_tab["regime"])))  # the regimes with runs, computed or stored
    asked = [r for r in dict.fromkeys(list(depth_regimes) + list(width_regimes)) if r in stored_regimes]
    expected = reps * (len(depths) * sum(r in asked for r in depth_regimes)
                       + len(widths) * sum(r in asked for r in width_regimes))
    book.record("borrowed_models", int(len(borrowed.models)))
    book.say("stored_regimes_text", (
        f"The {', '.join(asked)} regime is not computed by this profile: it never reaches its learning-rate floor (next "
        "section), so it costs all 60,000 and 7,500 epochs — hours on this machine. Its runs come from the committed "
        f"paper-profile chunks instead, for the same seeds and settings: {len(borrowed.models)} of its {expected} "
        "networks are stored so far." if asked else "Every regime is computed by this profile."))
    return config, result


def floor_section(result: IrisSweepResult, *, epochs: int) -> Any:
    """The schedule, measured: when each network's learning rate reached its floor, in training and in both
    retraining protocols (figure data ``floor_epochs``), with the medians, maxima and never-reached counts the
    prose quotes, the gradient norms at θ̂ and the Bayesian network's sentence.

    Returns the strip-plot figure (glue it as ``floor_fig``)."""
    import matplotlib.pyplot as plt
    from helpers import plots

    runs, models_tab = result.runs, result.models
    book.figure_data("floor_epochs", floor_table(result).assign(
        note="empty last_layer_*: not retrained on the last layer; empty *_floor_*: no run reached the floor"))
    fig, axes = plt.subplots(1, 3, figsize=(10, 3), sharey=True)
    tab = models_tab.assign(floor=models_tab["floor_epoch"].where(models_tab["floor_epoch"] > 0))
    retr = runs[runs.estimator.isin(["paper", "bnn"])]
    for ax, (title, frame, column) in zip(axes, (
            ("training", tab, "floor"), ("all-layer retraining", retr[retr.protocol == "all_layers"], "retrain_floor_max"),
            ("last-layer retraining", retr[retr.protocol == "last_layer"], "retrain_floor_max"))):
        plots.strip_by_group(ax, frame, column, ["sweep", "regime"])
        ax.set(yscale="log", xlabel=title)
    axes[0].set_ylabel("epoch at which the lr reached its floor")
    family = tab["regime"].map(_family_of)
    for fam in ("l2", "nol2", "bnn"):
        book.record_median(f"floor_train_{fam}", tab.loc[family == fam, "floor"], fmt="{:,.0f}")
        book.record_median(f"grad_norm_{fam}", tab.loc[family == fam, "grad_norm"], fmt="{:.1e}")
    book.record("floor_train_max", float(tab["floor"].max()), fmt="{:,.0f}")
    bnn = models_tab[models_tab.regime == "bnn"]
    if len(bnn):
        book.say("bnn_floor_text", f"The Bayesian network reached it in {(bnn['floor_epoch'] > 0).mean():.0%} of its "
            f"{len(bnn)} runs: its objective (a Gaussian likelihood with a log-determinant term) is negative at θ̂ in "
            f"{(bnn['train_loss'] < 0).mean():.0%} of them, and for a negative loss `ReduceLROnPlateau`'s relative "
            "threshold counts even a stalled epoch as an improvement (best × (1 − 10⁻⁴) lies above best), so its "
            "learning rate stays at 10⁻³ for all 60,000 epochs — in the paper's code as here.")
    else:
        book.say("bnn_floor_text", "The Bayesian network is not in this profile's runs yet (see above).")
    book.record("floor_train_never", int(models_tab["floor_epoch"].lt(0).sum()))
    book.record_median("floor_retrain_median", retr.loc[retr.protocol == "all_layers", "retrain_floor_median"],
                       fmt="{:,.0f}")
    book.record("floor_retrain_max", float(retr["retrain_floor_max"].max()), fmt="{:,.0f}")
    book.record("floor_retrain_never", int(retr["retrain_no_floor"].sum()))
    swa_start = int(0.75 * epochs)
    book.record("swa_start_epoch", swa_start, fmt="{:,}")
    book.record("floor_before_swa", float((tab["floor"] < swa_start).mean()), fmt="{:.0%}")
    return fig


def floor_check_section(result: IrisSweepResult, full_check: dict[str, Any] | None) -> pd.DataFrame:
    """Floor termination: the bound on what the skipped epochs could change (per parameter and in nats of test
    loss) and, when the profile ran ``full_check``, how the floor-stopped runs compare with the same members run
    for every epoch (figure data ``full_length_check``; otherwise every check record says it was not run).

    Returns the table of the check to show (empty without a check)."""
    runs, models_tab = result.runs, result.models
    book.record("bound_param_max", float(models_tab["floor_bound_param"].max()), fmt="{:.1e}")
    book.record("bound_nats_max", float(models_tab["floor_bound_nats"].max()), fmt="{:.2f}")
    book.record("bound_nats_median", float(models_tab["floor_bound_nats"].median()), fmt="{:.2f}")
    book.record("check_spread_median", float(runs.loc[runs.estimator == "paper", "delta_sd"].median()), fmt="{:.1e}")
    check_names = ["check_members", "check_test_loss_diff", "check_delta_diff", "check_spearman_diff"]
    if full_check:
        check = book.figure_data("full_length_check", result.full_check)
        main_check = check[check.estimator == "paper"]
        book.record("check_members", int(main_check[["regime", "value", "rep"]].drop_duplicates().shape[0]))
        book.record("check_test_loss_diff", float(main_check["test_loss_diff"].abs().max()), fmt="{:.1e}")
        book.record("check_delta_diff", float(main_check["delta_max_abs_diff"].max()), fmt="{:.1e}")
        book.record("check_spearman_diff", float(main_check["spearman_diff"].abs().max()), fmt="{:.2f}")
        within = bool((main_check["test_loss_diff"].abs() <= main_check["floor_bound_nats"]).all())
        book.say("check_within_text", "within" if within else "outside")
        book.say("check_regimes_text", ", ".join(full_check["regimes"]) + f" at {full_check['sweep']} "
            + ", ".join(str(v) for v in full_check["values"]))
        shown = check[["regime", "value", "rep", "protocol", "estimator", "floor_epoch", "test_loss_diff",
                       "floor_bound_nats", "delta_max_abs_diff", "spearman_stop", "spearman_full"]].round(6)
    else:  # a profile may leave the check out; the prose then says so
        for name in check_names + ["check_within_text", "check_regimes_text"]:
            book.record(name, book.NOT_RUN)
        shown = pd.DataFrame()
    return shown


def retraining_curve_section(config: IrisSweepConfig, models_tab: pd.DataFrame, *, depths: Sequence[int],
                             curve_lengths: Sequence[int], retrain_epochs: int) -> Any:
    """How long to retrain (the paper's Fig. 5): one L2 member at the shallowest depth retrained for every length of
    ``curve_lengths`` (:func:`member_retraining_curve`; figure data ``retraining_curve``), the correlation, drift
    and spread of the truths per length (``retraining_curve_summary``) and the records at the protocol's length and
    the longest.

    Returns the two-panel figure (glue it as ``curve_fig``)."""
    import matplotlib.pyplot as plt
    from helpers import metrics

    models_tab.index[(models_tab.sweep == "depth") & (models_tab.regime == "l2")  # the member must be in the sweep
                     & (models_tab.value == min(depths)) & (models_tab.rep == 0)][0]
    curve = member_retraining_curve(config, min(depths), "l2", 0, curve_lengths)
    book.figure_data("retraining_curve", curve)
    per_len = []
    for e, g in curve.groupby("epochs"):
        per_len.append({"epochs": e, "spearman": metrics.spearman(g["est_paper"], g["delta"]),
                        "pearson": metrics.pearson(g["est_paper"], g["delta"]), "drift": g["drift"].iloc[0],
                        "spread": g["delta"].std(ddof=0), "mean": g["delta"].mean()})
    per_len = book.figure_data("retraining_curve_summary", pd.DataFrame(per_len))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(8.5, 3))
    for c, g in curve.groupby("candidate"):
        a1.plot(g["epochs"], g["delta"], color=BOOK, alpha=0.35, lw=0.8)
    a1.plot(per_len["epochs"], per_len["drift"], color="k", lw=2, label="drift (nothing removed)")
    a1.set(xscale="log", xlabel="retraining epochs", ylabel="change in test loss (nats)")
    a1.legend(frameon=False, fontsize="small")
    a2.plot(per_len["epochs"], per_len["spearman"], "o-", color=BOOK, label="Spearman")
    a2.plot(per_len["epochs"], per_len["pearson"], "s--", color=BOOK3, label="Pearson")
    a2.axvline(retrain_epochs, color="0.6", lw=0.8, ls=":")
    a2.set(xscale="log", xlabel="retraining epochs", ylabel="correlation with the estimate", ylim=(-1, 1))
    a2.legend(frameon=False, fontsize="small")
    at = per_len.set_index("epochs")
    chosen = at.index[np.argmin(np.abs(at.index - retrain_epochs))]
    book.record("curve_rho_chosen", float(at.loc[chosen, "spearman"]), fmt="{:.2f}")
    book.record("curve_rho_longest", float(at["spearman"].iloc[-1]), fmt="{:.2f}")
    book.record("curve_longest", int(at.index[-1]))
    book.record("curve_drift_chosen", float(at.loc[chosen, "drift"]), fmt="{:.3f}")
    book.record("curve_drift_longest", float(at["drift"].iloc[-1]), fmt="{:.3f}")
    book.record("curve_spread_longest", float(at["spread"].iloc[-1]), fmt="{:.3f}")
    return fig


def _fig1_bars(bars: pd.DataFrame) -> pd.DataFrame:
    """The paper's Fig. 1 regimes in the book's terms: all-layer retraining with the paper's (or the Bayesian)
    estimator, and its last-layer variant as ``<regime>_toplayer``."""
    main = bars[(bars.protocol == "all_layers") & bars.estimator.isin(["paper", "bnn"])]
    top = bars[(bars.protocol == "last_layer") & (bars.estimator == "paper")].assign(
        regime=lambda f: f["regime"] + "_toplayer")
    return pd.concat([main, top], ignore_index=True)


def fig1_section(runs: pd.DataFrame, stored: IrisSweepResult, *, depths: Sequence[int], widths: Sequence[int],
                 n_bootstrap: int, seed: int) -> dict[str, Any]:
    """The paper's Fig. 1 re-run: the bars of the book's runs, of the paper's published runs
    (:func:`helpers.paper_data.iris_runs`) and of the committed paper-profile runs ``stored``, compared setting
    by setting (figure data ``fig1_comparison`` and ``fig1_bars``).

    Returns a dict: ``paper_runs``, ``book_bars`` (every protocol and estimator), ``comparison`` (from
    :func:`compare_bars`, with the drift and the share of negative ρ), ``stored_fig1`` (the stored bars, columns
    suffixed ``_stored``) and the figures ``fig1_abs_fig`` and ``fig1_signed_fig`` (glue them by those names)."""
    from helpers import paper_data, plots

    keys = _KEYS
    book_bars = summarize_runs(runs, keys + ["protocol", "estimator"], n_resamples=n_bootstrap, seed=seed)
    paper_runs = paper_data.iris_runs()
    paper_bars = summarize_runs(paper_runs, keys, extra=(), n_resamples=n_bootstrap, seed=seed)
    book_fig1 = _fig1_bars(book_bars)
    cols = ("abs_spearman", "spearman", "abs_pearson", "pearson")
    comparison = compare_bars(book_fig1, paper_bars, keys, columns=cols)
    comparison = comparison.merge(book_fig1[keys + ["drift", "drift_ratio", "spearman_neg_share"]], on=keys)
    comparison = comparison.merge(paper_bars[keys + ["spearman_neg_share"]].rename(
        columns={"spearman_neg_share": "paper_spearman_neg_share"}), on=keys)
    book.figure_data("fig1_comparison", comparison.assign(note="empty drift_ratio: no spread among the truths"))
    # the paper profile of this book, run once and committed (helpers.sweep_store): the chunks stored so far
    if len(stored.runs):
        s_bars = summarize_runs(stored.runs, keys + ["protocol", "estimator"], n_resamples=n_bootstrap, seed=seed)
        stored_fig1 = _fig1_bars(s_bars)
    else:
        stored_fig1 = pd.DataFrame(columns=keys + [c + t for c in ("abs_spearman", "spearman", "abs_pearson", "pearson")
                                                   for t in ("", "_low", "_high")])
    stored_fig1 = stored_fig1.rename(columns={c: c + "_stored" for c in stored_fig1.columns if c not in keys})
    allbars = pd.merge(tag_runs(paper_bars, "_paper"), tag_runs(book_fig1, "_book"), on=keys, how="outer",
                       suffixes=("_paper", "_book"))
    allbars = allbars.merge(stored_fig1, on=keys, how="left")
    book.figure_data("fig1_bars", allbars[keys + [c + t + s for c in cols for s in ("_paper", "_book", "_stored")
                                                  for t in ("", "_low", "_high")]].assign(
        note="empty: a setting that side did not run"))
    panels = [r for r in ["nol2", "l2", "nol2_swa", "l2_swa", "bnn", "l2_toplayer", "nol2_toplayer"]
              if r in set(allbars["regime"])]
    sides = [("paper", "_paper", PAPER), ("book, this profile", "_book", BOOK), ("book, paper profile", "_stored", BOOK2)]
    out: dict[str, Any] = {"paper_runs": paper_runs, "book_bars": book_bars, "comparison": comparison,
                           "stored_fig1": stored_fig1}
    for column, label, name in (("abs_spearman", "mean |ρ|", "fig1_abs_fig"), ("spearman", "mean ρ", "fig1_signed_fig")):
        out[name] = plots.sweep_bars_grid(allbars, panels, column, label, sides, n_depths=len(depths),
                                          n_widths=len(widths), ylim=(0 if "abs" in column else -0.5, 1))
    return out


def fig1_records(comparison: pd.DataFrame, runs: pd.DataFrame, paper_runs: pd.DataFrame, *,
                 depths: Sequence[int]) -> None:
    """Record the numbers the prose quotes about Fig. 1: the L2 depth sweep's bars at the shallowest and deepest
    setting (book and paper, |ρ| and ρ), how many settings have disjoint intervals, the shares of negative ρ, how
    much the paper's |ρ| inflates its ρ, and the Bayesian network's gap (:func:`regime_gap`)."""
    keys = _KEYS
    l2d = comparison[(comparison.sweep == "depth") & (comparison.regime == "l2")].set_index("value")
    lo, hi = min(depths), max(depths)
    for tag, v in (("shallow", lo), ("deep", hi)):
        r = l2d.loc[v]
        book.record_ci(f"l2_{tag}_abs", (r.book_abs_spearman, r.book_abs_spearman_low, r.book_abs_spearman_high))
        book.record_ci(f"l2_{tag}_signed", (r.book_spearman, r.book_spearman_low, r.book_spearman_high))
        book.record_ci(f"paper_l2_{tag}_abs", (r.paper_abs_spearman, r.paper_abs_spearman_low, r.paper_abs_spearman_high))
        book.record_ci(f"paper_l2_{tag}_signed", (r.paper_spearman, r.paper_spearman_low, r.paper_spearman_high))
    book.record("depth_lo", lo)
    book.record("depth_hi", hi)
    book.record("n_compared", len(comparison))
    book.record("n_separate_abs", int(comparison["separate_abs_spearman"].sum()))
    book.record("n_separate_signed", int(comparison["separate_spearman"].sum()))
    book.record("book_neg_share", float((runs.loc[runs.estimator.isin(["paper", "bnn"]), "spearman"] < 0).mean()),
                fmt="{:.0%}")
    book.record("paper_neg_share", float((paper_runs["spearman"] < 0).mean()), fmt="{:.0%}")
    inflation = (comparison["paper_abs_spearman"] - comparison["paper_spearman"])
    book.record("paper_abs_inflation_max", float(inflation.max()), fmt="{:.2f}")
    book.record("paper_abs_inflation_setting", " ".join(str(v) for v in comparison.loc[inflation.idxmax(), keys]))
    bnn_gap = regime_gap(comparison, "bnn")
    book.record("bnn_n_compared", bnn_gap["n"])
    book.record("bnn_n_separate", bnn_gap["n_separate"])
    book.say("bnn_gap_text", bnn_gap["text"])


def stored_profile_section(stored: IrisSweepResult, provenance: pd.DataFrame, stored_fig1: pd.DataFrame, *,
                           n_chunks: int) -> pd.DataFrame:
    """The committed paper-profile runs: how many of the ``n_chunks`` chunks, networks and hours are stored, the
    L2 depth sweep's stored bars in a sentence, and the chunks' provenance (figure data
    ``paper_profile_provenance``).

    Returns the provenance table to show (chunk, date, commit, wall time, machine)."""
    book.record("stored_chunks", len(provenance))
    book.record("all_chunks", n_chunks)
    book.record("stored_models", int(len(stored.models)))
    book.record("stored_hours", float(provenance["wall_s"].sum() / 3600) if len(provenance) else 0.0, fmt="{:.1f}")
    if len(stored.runs):
        l2s = stored_fig1[(stored_fig1.sweep == "depth") & (stored_fig1.regime == "l2")].set_index("value")
        book.say("stored_text", "For the L2 depth sweep the stored runs give a mean |ρ| of " + ", ".join(
            f"{l2s.at[v, 'abs_spearman_stored']:.2f} at depth {v} (n = {int(l2s.at[v, 'n_stored'])})"
            for v in l2s.index) + "." if len(l2s) else "The stored chunks do not yet include the L2 depth sweep.")
    else:
        book.say("stored_text", "No chunk is stored yet: the figures show no paper-profile bars.")
    book.figure_data("paper_profile_provenance", provenance)
    return provenance[["chunk", "date", "git_sha", "wall_s", "machine", "cpus"]] if len(provenance) else provenance


def differences_section(comparison: pd.DataFrame, book_bars: pd.DataFrame, paper_runs: pd.DataFrame,
                        models_tab: pd.DataFrame, *, depths: Sequence[int], test_point: int, n_bootstrap: int,
                        seed: int) -> pd.DataFrame:
    """Why bars differ: for every setting whose |ρ| interval is disjoint from the paper's, the first computed
    variant that reaches it (:func:`difference_reasons`; figure data ``differences``), the counts per reason, and
    the comparison of the two trainings' top Hessian eigenvalues (saturation without weight decay; whether the L2
    networks end in the same place).

    Returns the table to show, indexed by sweep, regime and value."""
    keys = _KEYS
    sep = comparison[comparison["separate_abs_spearman"]]
    sep = difference_reasons(sep, book_bars[book_bars.estimator.isin(["paper", "paper_inv32", "bnn"])],
                             paper_runs, models_tab, test_point=test_point, n_bootstrap=n_bootstrap, seed=seed)
    paper_top = paper_runs.groupby(keys)["top_eig"].mean()
    book_top = models_tab.groupby(keys)["top_no_l2"].mean()
    show = ["sweep", "regime", "value", "paper_abs_spearman", "book_abs_spearman", "book_inv32", "book_other_protocol",
            "drift_ratio", "reason"]
    table = (sep[show] if len(sep) else pd.DataFrame(columns=show)).assign(
        note="empty: that variant was not run for this regime")
    table = book.figure_data("differences", table)
    counts = table["reason"].value_counts()
    book.say("reasons_text", "; ".join(f"{n} × {k}" for k, n in counts.items()) if len(counts) else
        "none: every bar's interval overlaps the paper's")
    book.record("n_reason_inverse", int(counts.get("float32 inverse", 0)))
    book.record("n_reason_unexplained", int(counts.get("not explained", 0)))
    bnn_counts = table.loc[table.regime == "bnn", "reason"].value_counts()
    book.say("bnn_reasons_text", "none applies: no bar of this regime is disjoint from the paper's" if bnn_counts.empty
        else "the disjoint bars of this regime get " + "; ".join(f"{n} × {k}" for k, n in bnn_counts.items()))
    nol2_key = ("depth", "nol2", min(depths))
    if nol2_key in book_top.index:
        book.record("paper_top_nol2", float(paper_top[nol2_key]), fmt="{:.1e}")
        book.record("book_top_nol2", float(book_top[nol2_key]), fmt="{:.2f}")
        book.say("saturation_text", f"Without weight decay the paper's networks at depth {min(depths)} have a mean top "
            f"Hessian eigenvalue of {paper_top[nol2_key]:.1e}, the book's {book_top[nol2_key]:.2f}: driven towards zero "
            "loss, the softmax outputs saturate and the curvature vanishes; where the two differ this much, the "
            "networks are in different states, which no variant of the estimate can undo.")
    else:
        book.say("saturation_text", "")
    l2_key = ("depth", "l2", min(depths))
    ratio = float(book_top[l2_key] / paper_top[l2_key])
    book.record("top_ratio_l2", ratio, fmt="{:.2f}")
    b_ = setting_mean_ci(models_tab, "top_no_l2", l2_key, n_bootstrap=n_bootstrap, seed=seed)
    p_ = setting_mean_ci(paper_runs, "top_eig", l2_key, n_bootstrap=n_bootstrap, seed=seed)
    same = b_[1] <= p_[2] and p_[1] <= b_[2]
    book.say("same_place_text", ("the two trainings end in the same place by this measure" if same else
                                 "the two trainings end in different places by this measure")
        + f" (95 % intervals of the mean top eigenvalue {'overlap' if same else 'are disjoint'}: book {b_[0]:.2f} "
          f"[{b_[1]:.2f}, {b_[2]:.2f}], paper {p_[0]:.2f} [{p_[1]:.2f}, {p_[2]:.2f}])")
    return table.drop(columns="note").set_index(["sweep", "regime", "value"]).round(2)


#: equivalence margin of the matched estimate: "not fragile" = the whole interval of the mean signed ρ at or above it
MATCHED = 0.9


def estimators_section(runs: pd.DataFrame, models_tab: pd.DataFrame, *, depths: Sequence[int],
                       widths: Sequence[int], width_regimes: Sequence[str], n_bootstrap: int, seed: int) -> None:
    """The estimators against each other on the same runs (paired, signed Spearman; figure data
    ``estimators_paired``): the objective's Hessian and the float32 inverse against the paper's estimate, the null
    dimensions of the paper's Hessian, the widest L2 setting, and the matched comparison (last-layer estimate
    against last-layer retraining) with its verdict against :data:`MATCHED`. Records only."""
    from helpers import stats

    keys = _KEYS
    det = runs[runs.estimator.isin(["paper", "objective", "paper_inv32"])]
    wide = det.pivot_table(index=keys + ["rep", "protocol"], columns="estimator", values="spearman")
    allw = wide.xs("all_layers", level="protocol")
    book.record_ci("objective_minus_paper", stats.mean_ci((allw["objective"] - allw["paper"]).dropna(),
                                                          n_resamples=n_bootstrap, seed=seed), fmt="{:+.2f}")
    book.record_ci("inv32_minus_paper", stats.mean_ci((allw["paper_inv32"] - allw["paper"]).dropna(),
                                                      n_resamples=n_bootstrap, seed=seed), fmt="{:+.2f}")
    book.record("inv32_undefined", int(allw["paper_inv32"].isna().sum()))
    n_zero = models_tab[(models_tab.sweep == "depth")].dropna(subset=["paper_n_zero"])
    book.record("null_dims_width5", int(n_zero["paper_n_zero"].median()))
    book.record("width5_weights", 5 * 3)  # the last weight matrix at width 5: 5 units × 3 classes
    book.record("null_dims_share", float((n_zero["paper_n_zero"] == 5).mean()), fmt="{:.0%}")
    # the widest (or deepest) L2 setting: where the paper's Hessian loses most of its rank
    sw = "width" if "l2" in width_regimes and len(widths) > 1 else "depth"
    vmax = max(widths) if sw == "width" else max(depths)
    for est in ("paper", "objective"):
        part = runs[(runs.sweep == sw) & (runs.regime == "l2") & (runs.value == vmax) & (runs.protocol == "all_layers")
                    & (runs.estimator == est)]
        book.record_ci(f"widest_{est}", stats.mean_ci(part["spearman"].dropna(), n_resamples=n_bootstrap, seed=seed))
    book.say("widest_text", f"{'width' if sw == 'width' else 'depth'} {vmax}")
    best = runs[(runs.protocol == "last_layer") & (runs.estimator == "objective") & (runs.regime == "l2")]
    book.record_ci("matched_rho", stats.mean_ci(best["spearman"].dropna(), n_resamples=n_bootstrap, seed=seed),
                   fmt="{:.3f}")
    book.record_ci("matched_pearson", stats.mean_ci(best["pearson"].dropna(), n_resamples=n_bootstrap, seed=seed),
                   fmt="{:.3f}")
    per_setting = best.groupby(["sweep", "value"])["spearman"].mean()
    book.record("matched_min", float(per_setting.min()), fmt="{:.3f}")
    m_lo, m_hi = stats.mean_ci(best["spearman"].dropna(), n_resamples=n_bootstrap, seed=seed)[1:]
    book.say("matched_text", (f"the influence function of the last layer is not fragile here (the interval of the mean "
                              f"ρ, [{m_lo:.3f}, {m_hi:.3f}], lies above {MATCHED}); what it is compared with decides "
                              "how good it looks") if m_lo >= MATCHED else
        (f"even then the agreement is far from perfect (the interval of the mean ρ, [{m_lo:.3f}, {m_hi:.3f}], lies "
         f"below {MATCHED}), so the estimate itself is part of the problem") if m_hi < MATCHED else
        (f"the interval of the mean ρ, [{m_lo:.3f}, {m_hi:.3f}], straddles the margin {MATCHED}: these runs cannot "
         "tell whether the matched estimate is near-perfect"))
    book.figure_data("estimators_paired", wide.reset_index().assign(note="empty: estimator not defined for that regime"))


def drift_section(runs: pd.DataFrame, *, n_bootstrap: int, seed: int) -> Any:
    """Drift: how far retraining with nothing removed moves the test loss, against the spread of the truths, per
    setting and protocol (figure data ``drift``); the share of runs where it exceeds the spread, overall and per
    regime family, and the paired last-layer / all-layer ratio of the two protocols.

    Returns the figure of the median ratios per setting (glue it as ``drift_fig``)."""
    import matplotlib.pyplot as plt
    from helpers import stats

    dr = runs[runs.estimator.isin(["paper", "bnn"])].copy()
    dr["exceeds"] = (dr["drift"].abs() > dr["delta_sd"]).astype(float)
    drift_bars = summarize_runs(dr.assign(spearman=dr["spearman"], pearson=dr["pearson"]),
                                ["sweep", "regime", "value", "protocol"],
                                extra=("drift", "drift_ratio", "exceeds"), n_resamples=n_bootstrap, seed=seed)
    book.figure_data("drift", drift_bars)
    for proto, tag in (("all_layers", "all"), ("last_layer", "last")):
        part = dr[dr.protocol == proto]
        if len(part):
            book.record_ci(f"drift_exceeds_{tag}", stats.mean_ci(part["exceeds"], n_resamples=n_bootstrap, seed=seed),
                           fmt="{:.0%}")
            book.record(f"drift_ratio_{tag}_median", float(part["drift_ratio"].median()), fmt="{:.2f}")
            book.record_ci(f"rho_{tag}", stats.mean_ci(part["spearman"].dropna(), n_resamples=n_bootstrap, seed=seed))
    # by family: the weight decay's annealed minimum against the no-L2 networks still heading for zero loss
    dr["family"] = dr["regime"].map(_family_of)
    family_text = []
    for fam, words in (("l2", "with weight decay, whose annealed networks sit near a minimum of their objective"),
                       ("nol2", "without it, where the loss still heads for zero"), ("bnn", "for the Bayesian network")):
        part = dr[(dr.protocol == "all_layers") & (dr.family == fam)]
        if len(part):
            book.record_ci(f"drift_exceeds_all_{fam}", stats.mean_ci(part["exceeds"], n_resamples=n_bootstrap,
                                                                     seed=seed), fmt="{:.0%}")
            book.record(f"drift_ratio_all_{fam}_median", float(part["drift_ratio"].median()), fmt="{:.2f}")
            family_text.append(f"{words}, in {part['exceeds'].mean():.0%} of the runs (median ratio "
                               f"{part['drift_ratio'].median():.2f})")
        else:
            book.record(f"drift_exceeds_all_{fam}", book.NOT_RUN)
    book.say("drift_family_text", "The regimes part ways here: the all-layer drift exceeds the spread "
             + "; ".join(family_text) + ". (Regimes absent from this profile's runs are left out.)")
    # paired on the same member: log10 of (last-layer drift ratio / all-layer drift ratio), interval over runs
    lr_ = dr[dr.estimator == "paper"].assign(log_ratio=lambda d: np.log10(d["drift_ratio"].clip(lower=1e-300)))
    lr_ = lr_[np.isfinite(lr_.log_ratio)]
    both = lr_.groupby(["sweep", "regime", "value", "rep"]).protocol.transform("nunique") == 2
    if both.any():
        pdiff = stats.paired_differences(lr_[both].assign(unit=lambda d: list(zip(d.sweep, d.regime, d.value, d.rep))),
                                         value="log_ratio", between="protocol", a="last_layer", b="all_layers",
                                         unit="unit", n_resamples=n_bootstrap, seed=seed).iloc[0]
        words = {"a higher": "drifts more relative to the signal", "b higher": "drifts less relative to the signal",
                 "no difference resolved": "drifts about as much relative to the signal (no difference resolved)"}
        book.say("drift_compare_text", f"{words[pdiff.verdict]}: paired over {pdiff.n} runs, the last-layer ratio is "
            f"{10 ** pdiff['diff']:.2g} times the all-layer one (geometric mean, 95 % interval "
            f"{10 ** pdiff.low:.2g}–{10 ** pdiff.high:.2g})")
    else:
        book.say("drift_compare_text", "cannot be compared here: no run has both retraining protocols")
    med = dr.groupby(["sweep", "regime", "value", "protocol"])["drift_ratio"].median().unstack("protocol")
    fig, ax = plt.subplots(figsize=(9, 3))
    pos = np.arange(len(med))
    for k_, (proto, color) in enumerate((("all_layers", BOOK), ("last_layer", BOOK3))):
        if proto in med.columns:
            ax.scatter(pos + (k_ - 0.5) * 0.3, med[proto].to_numpy(), color=color, label=proto.replace("_", " "), s=16)
    ax.axhline(1, color="0.5", lw=0.8, ls="--")
    ax.set(yscale="log", ylabel="|drift| / spread of truths\n(median over repetitions)", xticks=pos)
    ax.set_xticklabels([f"{s_[0]} {r} {v}" for s_, r, v in med.index], rotation=90, fontsize="xx-small")
    ax.legend(frameon=False, fontsize="small")
    return fig


def pearson_section(runs: pd.DataFrame, paper_runs: pd.DataFrame, *, n_bootstrap: int, seed: int) -> Any:
    """Pearson against Spearman: the mean signed correlations of both kinds per source (paper, book) and regime
    (figure data ``pearson_vs_spearman``), the mean gap per source and the paper's Bayesian network at depth ≥ 3.

    Returns the bar figure (glue it as ``pearson_fig``)."""
    import matplotlib.pyplot as plt
    from helpers import plots, stats

    pv = pd.concat([
        paper_runs.assign(source="paper")[["source", "sweep", "regime", "value", "spearman", "pearson"]],
        runs[runs.protocol.eq("all_layers") & runs.estimator.isin(["paper", "bnn"])].assign(source="book")[
            ["source", "sweep", "regime", "value", "spearman", "pearson"]]], ignore_index=True)
    pv["gap"] = pv["spearman"] - pv["pearson"]
    pv_bars = summarize_runs(pv.dropna(), ["source", "regime"], columns=("spearman", "pearson"), extra=("gap",),
                             n_resamples=n_bootstrap, seed=seed)
    book.figure_data("pearson_vs_spearman", pv_bars)
    for src in ("paper", "book"):
        book.record_ci(f"{src}_gap", stats.mean_ci(pv.loc[pv.source == src, "gap"].dropna(), n_resamples=n_bootstrap,
                                                   seed=seed), fmt="{:+.2f}")
    bnn_deep = pv[(pv.source == "paper") & (pv.regime == "bnn") & (pv.sweep == "depth") & (pv.value >= 3)]
    book.record_ci("paper_bnn_deep_pearson", stats.mean_ci(bnn_deep["pearson"].dropna(), n_resamples=n_bootstrap,
                                                           seed=seed))
    book.record_ci("paper_bnn_deep_spearman", stats.mean_ci(bnn_deep["spearman"].dropna(), n_resamples=n_bootstrap,
                                                            seed=seed))
    fig, ax = plt.subplots(figsize=(8, 3))
    show = pv_bars.assign(label=pv_bars["source"] + "\n" + pv_bars["regime"])
    plots.paired_bars(ax, show, "label", [("Spearman", "spearman", BOOK), ("Pearson", "pearson", BOOK3)])
    ax.set(ylabel="mean signed correlation", ylim=(-0.3, 1))
    ax.tick_params(axis="x", labelsize="x-small")
    ax.legend(frameon=False, fontsize="small")
    return fig


def _fmt_case(r: Any) -> str:
    return f"{r.sweep} {r.regime} (p = {r.anova_p:.2g}, Holm {r.anova_p_holm:.2g})"


def anova_section(runs: pd.DataFrame, paper_runs: pd.DataFrame) -> pd.DataFrame:
    """Does the correlation depend on depth or width? One-way ANOVA and Kruskal–Wallis per sweep and regime, for
    the paper's runs and the book's, |ρ| and ρ (:func:`helpers.stats.one_way_table`), Holm-corrected within each
    source and column (figure data ``anova``); records the L2 depth sweep's tests and which of the paper's cases
    are significant.

    Returns the table of every test to show."""
    from helpers import stats

    tests = []
    for src, frame, est in (("paper", paper_runs, None), ("book", runs, ["paper", "bnn"])):
        f = frame if est is None else frame[(frame.protocol == "all_layers") & frame.estimator.isin(est)]
        for column in ("abs_spearman", "spearman"):
            t = stats.one_way_table(f, column, "value", ["sweep", "regime"])
            t.insert(0, "source", src)
            tests.append(t)
    tests = pd.concat(tests, ignore_index=True)
    # eleven-odd cases per source and column are tested at once: Holm's correction within each family
    for name in ("anova_p", "kruskal_p"):
        tests[name + "_holm"] = tests.groupby(["source", "value"])[name].transform(lambda p: stats.holm(p.to_numpy()))
    tests = book.figure_data("anova", tests)
    signed = tests[(tests.source == "paper") & (tests.value == "spearman")].sort_values("anova_p_holm")
    sig = signed[signed.anova_p_holm < 0.05]
    not_sig = signed[signed.anova_p_holm >= 0.05]
    book.record("paper_signed_cases", len(signed))
    book.record("paper_signed_sig", len(sig))
    book.say("paper_cases_text", "significant after Holm's correction: " + (
        "; ".join(_fmt_case(r) for r in sig.itertuples()) or "none") + ". Not significant: " + (
        "; ".join(_fmt_case(r) for r in not_sig.itertuples()) or "none") + ".")
    book.say("toplayer_text", "Among the latter is `l2_toplayer`, the only experiment that retrains the last layer as "
        "the paper's text describes." if "l2_toplayer" in set(not_sig.regime) else
        "`l2_toplayer`, the experiment its text describes, is not among them.")
    for src in ("paper", "book"):
        row = tests[(tests.source == src) & (tests.regime == "l2") & (tests.sweep == "depth")
                    & (tests.value == "abs_spearman")].iloc[0]
        book.record(f"{src}_anova_p", float(row.anova_p), fmt="{:.1e}")
        book.record(f"{src}_eta", float(row.eta_sq), fmt="{:.2f}")
        book.record(f"{src}_kw_p", float(row.kruskal_p), fmt="{:.1e}")
        book.record(f"{src}_eps", float(row.epsilon_sq), fmt="{:.2f}")
    book.record("paper_n_sig", int(((tests.source == "paper") & (tests.anova_p < 0.05)).sum()))
    book.record("paper_n_tests", int((tests.source == "paper").sum()))
    return tests[["source", "sweep", "regime", "value", "k", "n", "anova_p", "anova_p_holm", "eta_sq", "kruskal_p",
                  "kruskal_p_holm", "epsilon_sq"]].round(4)


def _eigen_table(models_tab: pd.DataFrame, paper_runs: pd.DataFrame, *, n_bootstrap: int, seed: int) -> pd.DataFrame:
    """Per setting: the book's mean top Hessian eigenvalue without the L2 term (bootstrap interval), the median
    share of negative eigenvalues and bottom eigenvalue, and the paper's mean top eigenvalue with its interval."""
    from helpers import stats

    keys = _KEYS
    eig_rows = []
    for (sw, reg, v), g in models_tab.groupby(keys):
        m_, lo_, hi_ = stats.mean_ci(g["top_no_l2"], n_resamples=n_bootstrap, seed=seed)
        eig_rows.append({"sweep": sw, "regime": reg, "value": v, "top_no_l2": m_, "top_no_l2_low": lo_,
                         "top_no_l2_high": hi_, "neg_share": g["neg_share"].median(), "bottom": g["bottom"].median()})
    eig = pd.DataFrame(eig_rows)
    pe = paper_runs.dropna(subset=["top_eig"]).groupby(keys)["top_eig"].apply(
        lambda s: pd.Series(stats.mean_ci(s, n_resamples=n_bootstrap, seed=seed), index=["m", "lo", "hi"])).unstack()
    pe = pe.rename(columns={"m": "paper_top", "lo": "paper_top_low", "hi": "paper_top_high"}).reset_index()
    return eig.merge(pe, on=keys, how="left")


def fig3_section(result: IrisSweepResult, paper_runs: pd.DataFrame, *, depths: Sequence[int], n_bootstrap: int,
                 seed: int) -> Any:
    """The paper's Fig. 3: curvature. The Lanczos check of the top eigenvalue (figure data ``lanczos_check``), the
    eigenvalues per setting (``fig3_eigenvalues``, :func:`_eigen_table`), the correlation of the top eigenvalue
    with the quality of the estimate (pooled and within each depth, ``eig_vs_quality_within_depth``), the trend
    with depth and the shares of negative eigenvalues.

    Returns the three-panel figure (glue it as ``fig3_fig``)."""
    import matplotlib.pyplot as plt
    from helpers import metrics, plots

    keys = _KEYS
    runs, mt = result.runs, result.models.copy()
    lo, hi = min(depths), max(depths)
    book.figure_data("lanczos_check", result.lanczos)
    book.record("lanczos_max_rel_diff", float((result.lanczos["lanczos_top"] / result.lanczos["dense_top"] - 1).abs()
                                              .max()) if len(result.lanczos) else 0.0, fmt="{:.1e}")
    eig = _eigen_table(mt, paper_runs, n_bootstrap=n_bootstrap, seed=seed)
    book.figure_data("fig3_eigenvalues", eig.assign(note="paper_top empty: the paper has no eigenvalues there"))
    quality = runs[(runs.protocol == "all_layers") & runs.estimator.isin(["paper", "bnn"])].merge(mt, on=keys + ["rep"])
    qual = quality[quality.regime == "l2"].dropna(subset=["spearman"])
    book.record_ci("eig_vs_quality", metrics.bootstrap_ci("spearman", qual["top_no_l2"], qual["abs_spearman"],
                                                          n_resamples=n_bootstrap, seed=seed), fmt="{:+.2f}")
    pq = paper_runs[(paper_runs.regime == "l2")].dropna(subset=["top_eig", "spearman"])
    book.record_ci("paper_eig_vs_quality", metrics.bootstrap_ci("spearman", pq["top_eig"], pq["abs_spearman"],
                                                                n_resamples=n_bootstrap, seed=seed), fmt="{:+.2f}")
    # within depth: the pooled correlation mixes the depth trend of both quantities (confounded); per depth it does not
    within = []
    for v, g in pq[pq.sweep == "depth"].groupby("value"):
        if len(g) >= 5:
            r_, lo_, hi_ = metrics.bootstrap_ci("spearman", g["top_eig"], g["abs_spearman"], n_resamples=n_bootstrap,
                                                seed=seed)
            within.append({"depth": int(v), "n": len(g), "spearman": r_, "low": lo_, "high": hi_})
    within = book.figure_data("eig_vs_quality_within_depth", pd.DataFrame(within))
    book.record("within_depth_n", len(within))
    book.record("within_depth_excl0", int(((within["low"] > 0) | (within["high"] < 0)).sum()) if len(within) else 0)
    k_, n_ = int(((within["low"] > 0) | (within["high"] < 0)).sum()) if len(within) else 0, len(within)
    book.say("within_depth_text", "no depth shows a relation, so the pooled correlation reflects the depth trend rather "
        "than a link between curvature and quality" if k_ == 0 else ("the relation holds within every depth" if k_ == n_
        else f"a relation shows within {k_} of the {n_} depths only"))
    book.record("within_depth_min", float(within["spearman"].min()) if len(within) else 0.0, fmt="{:+.2f}")
    book.record("within_depth_max", float(within["spearman"].max()) if len(within) else 0.0, fmt="{:+.2f}")
    l2e = eig[(eig.sweep == "depth") & (eig.regime == "l2")].set_index("value")
    book.record_ci("top_eig_shallow", l2e.loc[lo, ["top_no_l2", "top_no_l2_low", "top_no_l2_high"]], fmt="{:.2f}")
    book.record_ci("top_eig_deep", l2e.loc[hi, ["top_no_l2", "top_no_l2_low", "top_no_l2_high"]], fmt="{:.2f}")
    book.record_ci("paper_top_eig_shallow", l2e.loc[lo, ["paper_top", "paper_top_low", "paper_top_high"]], fmt="{:.2f}")
    book.record_ci("paper_top_eig_deep", l2e.loc[hi, ["paper_top", "paper_top_low", "paper_top_high"]], fmt="{:.2f}")
    book.record("neg_share_median", float(mt["neg_share"].median()), fmt="{:.0%}")
    # from the intervals of the two means: disjoint and higher at depth `hi` = grows
    up = float(l2e.loc[hi, "top_no_l2_low"]) > float(l2e.loc[lo, "top_no_l2_high"])
    down = float(l2e.loc[hi, "top_no_l2_high"]) < float(l2e.loc[lo, "top_no_l2_low"])
    book.say("eig_trend_text", "grows with depth, as in the paper (the intervals at the shallowest and deepest setting "
        "are disjoint)" if up else "shrinks with depth, unlike the paper's (disjoint intervals)" if down else
        "shows no resolved trend between the shallowest and deepest setting (their intervals overlap)")
    # negative beyond round-off: below −1e-8 × the top eigenvalue (helpers.stacked.hessian_spectrum's threshold)
    book.record("neg_share_any", float((mt["neg_share"] > 0).mean()), fmt="{:.0%}")
    book.record("neg_share_l2_any", float((mt.loc[mt.regime.str.startswith("l2"), "neg_share_l2"] > 0).mean())
                if mt.regime.str.startswith("l2").any() else 0.0, fmt="{:.0%}")

    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(11, 3))
    part = eig[(eig.sweep == "depth") & (eig.regime == "l2")]
    plots.paired_bars(a1, part.rename(columns={"paper_top": "P", "paper_top_low": "P_low", "paper_top_high": "P_high",
                                               "top_no_l2": "B", "top_no_l2_low": "B_low", "top_no_l2_high": "B_high"}),
                      "value", [("paper", "P", PAPER), ("book", "B", BOOK)])
    a1.set(xlabel="hidden layers (l2)", ylabel="top Hessian eigenvalue\n(without the L2 term)")
    a1.legend(frameon=False, fontsize="small")
    for reg, color in (("l2", BOOK), ("nol2", BOOK3), ("bnn", "C3")):
        q = quality[quality.regime == reg]
        if len(q):
            a2.scatter(q["top_no_l2"], q["spearman"], s=8, alpha=0.6, color=color, label=reg)
    a2.set(xscale="log", xlabel="top eigenvalue", ylabel="signed Spearman (run)")
    a2.legend(frameon=False, fontsize="small")
    for reg, color in (("l2", BOOK), ("nol2", BOOK3), ("bnn", "C3")):
        e_ = eig[(eig.sweep == "depth") & (eig.regime == reg)]
        if len(e_):
            a3.plot(e_["value"], e_["neg_share"], "o-", color=color, label=reg)
    a3.set(xlabel="hidden layers", ylabel="share of negative\neigenvalues (median)")
    a3.legend(frameon=False, fontsize="small")
    return fig


def run_deep_models(deep_models: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Run :func:`run_deep` for every spec of ``deep_models`` (keyword arguments of :class:`DeepConfig`); a spec
    whose torchvision folder is missing is skipped and named.

    Returns a dict: ``runs``, ``points`` and ``models`` (the specs' frames concatenated, each with a ``label``
    ``"<dataset>/<model>"``) and ``skipped`` (one line per skipped spec)."""
    deep_runs, deep_points, deep_models_tab, skipped = [], [], [], []
    for spec in deep_models:
        cfg = DeepConfig(**spec)
        label = f"{cfg.dataset}/{cfg.model}"
        try:
            res = run_deep(cfg)
        except FileNotFoundError as err:
            skipped.append(f"{label} (no data folder: {str(err).splitlines()[0][:80]})")
            continue
        deep_runs.append(res.runs.assign(label=label))
        deep_points.append(res.points.assign(label=label))
        deep_models_tab.append(res.models.assign(label=label))
    return {"runs": pd.concat(deep_runs, ignore_index=True), "points": pd.concat(deep_points, ignore_index=True),
            "models": pd.concat(deep_models_tab, ignore_index=True), "skipped": skipped}


#: which of the paper's models each book model stands for, and on which data (like for like: MNIST or its 5k
#: subsample, CIFAR-10; mnist1d is another dataset, so its bars have no paper analogue)
_PAPER_ANALOG = {"fc128": "fc128", "lenet5": "lenet", "vgg13": "vgg13"}
_SAME_DATA = {"mnist": "mnist", "mnist5k": "mnist", "cifar10": "cifar10"}


def _shuffled_pairing(deep_points: pd.DataFrame, seed: int) -> pd.DataFrame:
    """The paper's shuffled-loader pairing, simulated on the book's last-layer runs: per (label, rep), the expected
    |ρ| of the exact estimates against the truths permuted at random (mean over 200 permutations)."""
    from helpers import metrics

    rng = np.random.default_rng(seed)
    shuffled = []
    for (lab, rep), g in deep_points[deep_points.protocol == "last_layer"].groupby(["label", "rep"]):
        # the expected |ρ| of one run under a random pairing: averaged over 200 permutations of its truths
        rho = [metrics.spearman(g["est_exact"], rng.permutation(g["delta"].to_numpy())) for _ in range(200)]
        shuffled.append({"label": lab, "rep": rep, "abs_spearman": float(np.abs(rho).mean())})
    return pd.DataFrame(shuffled)


def _fig2_differences(fig2: pd.DataFrame, lis_bars: pd.DataFrame, pd_deep: pd.Series, pd_deep_ci: dict[str, Any],
                      shuffled: pd.DataFrame, *, n_bootstrap: int, seed: int) -> list[str]:
    """One line per book model with a paper analogue: within the paper's interval, or — intervals disjoint — the
    first computed variant that explains the gap (the LiSSA solver, the shuffled pairing, the drift of the
    truths) or that none does."""
    from helpers import stats

    fig2_lines = []
    for r in fig2.dropna(subset=["paper_abs_spearman"]).itertuples():
        separate = r.abs_spearman_low > r.paper_abs_spearman_high or r.abs_spearman_high < r.paper_abs_spearman_low
        if not separate:
            fig2_lines.append(f"{r.label}: within the paper's interval for {r.paper_label}")
            continue
        li = lis_bars.loc[r.label] if r.label in lis_bars.index else None
        pr = float(pd_deep.get(r.paper_label, np.nan))
        pr_hi = float(pd_deep_ci.get(r.paper_label, (np.nan,) * 3)[2])
        sh_ = shuffled.loc[shuffled.label == r.label, "abs_spearman"]
        sh_ci = stats.mean_ci(sh_, n_resamples=n_bootstrap, seed=seed) if len(sh_) else (np.nan,) * 3
        if (li is not None and li.abs_spearman_low <= r.paper_abs_spearman_high
                and li.abs_spearman_high >= r.paper_abs_spearman_low):
            why = "the solver: the book's LiSSA bar reaches the paper's, which used LiSSA"
        elif sh_ci[1] <= r.paper_abs_spearman_high and sh_ci[2] >= r.paper_abs_spearman_low:
            why = (f"the paper's shuffled pairing: the book's estimates against permuted truths give {sh_ci[0]:.2f}, "
                   "inside the paper's interval")
        elif np.isfinite(pr_hi) and r.drift_ratio_low > pr_hi:
            why = (f"the drift of the truths: the book's fine-tuning moves the test loss by {r.drift_ratio:.1f} "
                   f"[{r.drift_ratio_low:.1f}, {r.drift_ratio_high:.1f}] times the spread of the truths, the paper's by "
                   f"{pr:.1f} (up to {pr_hi:.1f}): disjoint intervals")
        else:
            why = "not separated by a computed variant (the book's data and training lengths differ from the paper's)"
        fig2_lines.append(f"{r.label}: {r.abs_spearman:.2f} against the paper's {r.paper_abs_spearman:.2f} for "
                          f"{r.paper_label}, intervals disjoint — {why}")
    return fig2_lines


def fig2_section(deep: dict[str, Any], deep_models: Sequence[dict[str, Any]], *, n_bootstrap: int, seed: int) -> Any:
    """The paper's Fig. 2 re-run on the larger models (``deep``: from :func:`run_deep_models`): where each θ̂
    stopped (figure data ``deep_convergence``), the bars of every protocol and estimator (``fig2_book``), the
    paper's bars from its published runs (``fig2_paper``), the two side by side with the reason for every gap
    (``fig2_comparison``), the shuffled-pairing simulation, LiSSA's convergence and the all-parameter variant.

    Returns the bar figure (glue it as ``fig2_fig``)."""
    import matplotlib.pyplot as plt
    from helpers import paper_data, plots, stats

    deep_runs, deep_points, deep_models_tab, skipped = deep["runs"], deep["points"], deep["models"], deep["skipped"]
    # where each θ̂ stopped: the protocol's fixed training length, no gradient criterion; shown, not assumed
    conv_deep = book.figure_data("deep_convergence", deep_models_tab.groupby("label", sort=False).agg(
        reps=("rep", "size"), train_loss=("train_loss", "median"), grad_norm_median=("grad_norm", "median"),
        grad_norm_max=("grad_norm", "max")).reset_index())
    book.say("deep_convergence_text", "; ".join(f"{r.label}: median ‖∇R‖ {r.grad_norm_median:.1e} (largest "
                                                f"{r.grad_norm_max:.1e})" for r in conv_deep.itertuples()))
    book.say("skipped_text", ("Skipped for lack of data: " + "; ".join(skipped) + ".") if skipped else
        "Every model of the parameters cell ran.")

    # the paper's bars from its published runs; which paper model each book model stands for
    paper_deep = paper_data.deep_run_summary(paper_data.deep_runs())
    paper_deep = paper_deep[paper_deep.test_point == "max"].reset_index(drop=True)
    paper_deep["label"] = paper_deep["dataset"] + "/" + paper_deep["model"]
    deep_runs["paper_label"] = [_SAME_DATA[d] + "/" + _PAPER_ANALOG[m] if d in _SAME_DATA and m in _PAPER_ANALOG
                                else "" for d, m in zip(deep_runs["dataset"], deep_runs["model"])]
    pd_bars = summarize_runs(paper_deep, ["label"], extra=("drift", "spread"), n_resamples=n_bootstrap, seed=seed)
    bd = deep_runs[(deep_runs.protocol == "last_layer") & (deep_runs.estimator == "exact")]
    bd_bars = summarize_runs(bd, ["label", "paper_label"], extra=("drift", "drift_ratio"),
                             n_resamples=n_bootstrap, seed=seed)
    other = summarize_runs(deep_runs, ["label", "protocol", "estimator"], extra=("drift", "drift_ratio"),
                           n_resamples=n_bootstrap, seed=seed)
    book.figure_data("fig2_book", other.assign(note="empty: every run of that estimator undefined (diverged)"))
    book.figure_data("fig2_paper", pd_bars)
    fig2 = bd_bars.merge(pd_bars.rename(columns=lambda c: "paper_label" if c == "label" else "paper_" + c),
                         on="paper_label", how="left")
    shuffled = _shuffled_pairing(deep_points, seed)
    n_top = DeepConfig(**deep_models[0]).n_top
    book.record("shuffled_expected", float(np.sqrt(2 / np.pi / (n_top - 1))), fmt="{:.2f}")  # E|ρ| ≈ √(2/(π(n−1)))
    lis_bars = other[(other.protocol == "last_layer") & (other.estimator == "lissa")].set_index("label")
    ratio = paper_deep.assign(ratio=paper_deep["drift"].abs() / paper_deep["spread"]).groupby("label")["ratio"]
    pd_deep = ratio.mean()
    pd_deep_ci = {lab: stats.mean_ci(g.dropna(), n_resamples=n_bootstrap, seed=seed) for lab, g in ratio
                  if len(g.dropna())}
    fig2_lines = _fig2_differences(fig2, lis_bars, pd_deep, pd_deep_ci, shuffled, n_bootstrap=n_bootstrap, seed=seed)
    book.say("fig2_diff_text", "; ".join(fig2_lines) + "." if fig2_lines else
             "No model of this profile has a paper analogue.")
    fig2["lissa_abs_spearman"] = [lis_bars.loc[l_, "abs_spearman"] if l_ in lis_bars.index else np.nan
                                  for l_ in fig2["label"]]
    fig2["paper_drift_ratio"] = [pd_deep.get(l_, np.nan) for l_ in fig2["paper_label"]]
    book.figure_data("fig2_comparison", fig2.assign(note="empty paper columns: no paper analogue"))
    _deep_records(deep_runs, deep_models_tab, bd, bd_bars, paper_deep, shuffled, deep_models,
                  n_bootstrap=n_bootstrap, seed=seed)

    cols_ = [("paper |ρ|", "paper_abs_spearman", PAPER), ("book |ρ|", "abs_spearman", BOOK),
             ("book ρ", "spearman", BOOK2)]
    fig, ax = plt.subplots(figsize=(8, 3))
    plots.paired_bars(ax, fig2, "label", cols_)
    ax.set(ylabel="mean correlation (Spearman)", ylim=(-0.5, 1))
    ax.tick_params(axis="x", labelsize="small")
    ax.legend(frameon=False, fontsize="small", ncol=3)
    return fig


def _deep_records(deep_runs: pd.DataFrame, deep_models_tab: pd.DataFrame, bd: pd.DataFrame, bd_bars: pd.DataFrame,
                  paper_deep: pd.DataFrame, shuffled: pd.DataFrame, deep_models: Sequence[dict[str, Any]], *,
                  n_bootstrap: int, seed: int) -> None:
    """Record the numbers the prose quotes about Fig. 2: the shuffled pairing against the paper's convolutional
    bars, the paper's LeNet drift and FC-128 bar, the first book model's bars, LiSSA's divergences and the
    all-parameter variant."""
    from helpers import stats

    book.record_ci("shuffled_abs", stats.mean_ci(shuffled["abs_spearman"], n_resamples=n_bootstrap, seed=seed))
    conv = paper_deep[paper_deep.model.isin(["lenet", "vgg13", "bnn_lenet"])]
    book.record_ci("paper_conv_abs", stats.mean_ci(conv["abs_spearman"], n_resamples=n_bootstrap, seed=seed))
    sh = stats.mean_ci(shuffled["abs_spearman"], n_resamples=n_bootstrap, seed=seed)
    pc = stats.mean_ci(conv["abs_spearman"], n_resamples=n_bootstrap, seed=seed)
    book.say("shuffled_text", "the paper's level, from nothing but the pairing" if sh[1] <= pc[2] and sh[2] >= pc[1]
        else ("above the paper's level" if sh[1] > pc[2] else "below the paper's level"))
    pl = paper_deep[paper_deep.label == "mnist/lenet"]
    book.record("paper_lenet_drift", float(pl["drift"].mean()), fmt="{:.2f}")
    book.record("paper_lenet_spread", float(pl["spread"].mean()), fmt="{:.3f}")
    pf = paper_deep[paper_deep.label == "mnist/fc128"]
    book.record_ci("paper_fc128_abs", stats.mean_ci(pf["abs_spearman"], n_resamples=n_bootstrap, seed=seed))
    order = [f"{DeepConfig(**sp).dataset}/{DeepConfig(**sp).model}" for sp in deep_models]
    first = bd_bars.set_index("label").loc[[o for o in order if o in set(bd_bars["label"])][0]]
    book.record_ci("deep_first_abs", (first.abs_spearman, first.abs_spearman_low, first.abs_spearman_high))
    book.record_ci("deep_first_signed", (first.spearman, first.spearman_low, first.spearman_high))
    book.record("deep_first_label", str(first.name))
    book.record_ci("deep_exact_signed", stats.mean_ci(bd["spearman"].dropna(), n_resamples=n_bootstrap, seed=seed))
    lis = deep_runs[(deep_runs.estimator == "lissa")]
    book.record("lissa_diverged", int(deep_models_tab["lissa_status"].str.startswith("diverged").sum()))
    book.record("lissa_nonconvergent", int((~deep_models_tab["lissa_converges"]).sum()))
    book.record("lissa_runs", int(len(deep_models_tab)))
    book.record("lambda_max_median", float(deep_models_tab["last_layer_lambda_max"].median()), fmt="{:.2f}")
    lv = lis.dropna(subset=["spearman"])
    book.record_ci("lissa_signed", stats.mean_ci(lv["spearman"], n_resamples=n_bootstrap, seed=seed) if len(lv)
                   else (0, 0, 0))
    book.record_ci("deep_drift_ratio", stats.mean_ci(bd["drift_ratio"].dropna(), n_resamples=n_bootstrap, seed=seed))
    allp = deep_runs[deep_runs.estimator == "all_params_cg"]
    if len(allp):
        book.record_ci("allp_signed", stats.mean_ci(allp["spearman"].dropna(), n_resamples=n_bootstrap, seed=seed))
        book.record_ci("allp_drift_ratio", stats.mean_ci(allp["drift_ratio"].dropna(), n_resamples=n_bootstrap,
                                                         seed=seed))
        book.say("allp_text", f"For {', '.join(sorted(set(allp['label'])))} the all-parameter estimate (conjugate "
            f"gradients, damping {DeepConfig().all_params_damping}) against all-layer warm-start retraining gives a "
            f"mean signed Spearman correlation of {allp['spearman'].mean():.2f}, with |drift| at "
            f"{allp['drift_ratio'].median():.1f} times the spread of the truths (median).")
    else:
        book.say("allp_text", "No model of this profile runs the all-parameter variant.")
