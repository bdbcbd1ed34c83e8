"""Chapter 3, "The validation procedure on trial" (``book/validation.ipynb``): one model, one estimate, many ways
of checking it — orchestration of the engine's calls (:mod:`helpers.train`, :mod:`helpers.influence`,
:mod:`helpers.retrain`, :mod:`helpers.metrics`).

Everything here holds the trained model θ̂ and the influence estimate fixed and varies only what the estimate is
compared with and how (STUDY.md §3–§4.3):

* **set-up** — :func:`test_points` (max / median / random test loss), :func:`select_candidates` (by training
  loss, by |estimate|, at random), :func:`last_layer_problem` (the last layer as a model of its own on cached
  features: last-layer estimates and retraining at the cost of a logistic regression), :func:`pool_images`;
* **retraining trajectories** — :func:`helpers.retrain.warm_start` with ``record_every`` records every member's
  test loss during warm-start retraining (the paper's Fig. 5, and a sweep of retraining lengths from one run);
* **agreement** — :func:`helpers.metrics.agreement_table`: every metric of :mod:`helpers.metrics` with its
  bootstrap interval, signed and absolute; :func:`noise_summary`: drift, seed noise and the reliability ceiling
  of a ground truth;
* **single-point effects against n** — :func:`single_point_scaling`, :func:`loglog_slope`;
* **the shuffled-index pitfall** — :class:`helpers.influence.IndexedDataset`,
  :func:`helpers.influence.loader_influence`: influence collected through a shuffled ``DataLoader``, with and
  without the dataset index carried along;
* **repetitions for statistics** — :func:`depth_runs`: the Iris depth sweep's per-run signed correlations, for
  the tests of :mod:`helpers.paper_data`;
* **the chapter's sections** — what ``book/validation.ipynb`` calls: data and recipes (:func:`chapter_data`,
  :func:`chapter_recipes`), then per section a function that builds its tidy frame (figure data), one that records
  and glues its numbers (``record_*``) and one that draws its figure (``draw_*``, returning the Figure).

Conventions are the book's (STUDY.md §1): Δ in loss units (nats), ``[n_test, n_removed]``, positive = removing
the point raised the test loss. Expensive results are memoised with :mod:`helpers.cache`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import numpy as np
import pandas as pd
import scipy.stats as st
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import vmap

from helpers import metrics
from helpers.cache import memoize
from helpers.curvature import hessian_operator, spectrum_summary
from helpers.influence import predict_removal
from helpers.models import logistic_regression
from helpers.objective import per_sample_losses, removal_weights
from helpers.retrain import GroundTruth, Trajectory
from helpers.train import Recipe, fit, fit_ensemble, model_with

Data = tuple[Tensor, Tensor]
Rule = Literal["loss", "estimate", "random"]

CANDIDATE_RULES: tuple[str, ...] = ("loss", "estimate", "random")
TEST_RULES: tuple[str, ...] = ("max", "median", "random")


# ----------------------------------------------------------------------------------------------- set-up


def pool_images(x: Tensor, factor: int, channels: int = 1) -> Tensor:
    """Average-pool square images by ``factor`` (28×28 → 14×14 for 2): ``[n, C, H, W]`` or flattened ``[n, C·H·W]``
    in, ``[n, C, H/f, W/f]`` out. Used to keep the chapter's CNN cheap on a CPU; factor 1 returns ``x`` as images.
    """
    if not isinstance(factor, int) or factor < 1:
        raise ValueError(f"factor must be a positive int, got {factor!r}")
    if x.dim() == 2:
        side = math.isqrt(x.shape[1] // channels)
        if channels * side * side != x.shape[1]:
            raise ValueError(f"cannot read {x.shape[1]} features as {channels} square image(s): pass [n, C, H, W]")
        x = x.reshape(x.shape[0], channels, side, side)
    if x.dim() != 4:
        raise ValueError(f"expected images [n, C, H, W] or flattened [n, C·H·W], got {tuple(x.shape)}")
    if x.shape[-1] % factor or x.shape[-2] % factor:
        raise ValueError(f"image side {tuple(x.shape[-2:])} is not divisible by factor {factor}")
    return x if factor == 1 else F.avg_pool2d(x, factor)


def penultimate(model: nn.Module, x: Tensor, batch_size: int = 4096) -> Tensor:
    """The input of ``model.last_layer`` for every row of ``x``: ``[n, d_last]`` (no gradient).

    Read with a forward hook, so it works for any model of :mod:`helpers.models`. Cost: one forward pass.
    """
    last = getattr(model, "last_layer", None)
    if last is None:
        raise AttributeError(f"{type(model).__name__} has no `last_layer`: see helpers.objective.param_names")
    store: list[Tensor] = []
    handle = last.register_forward_hook(lambda mod, inp, out: store.append(inp[0].detach()))
    try:
        with torch.no_grad():
            for s in range(0, x.shape[0], batch_size):
                model(x[s:s + batch_size])
    finally:
        handle.remove()
    return torch.cat(store) if store else x.new_zeros((0, last.in_features))


def head_of(model: nn.Module) -> nn.Module:
    """The model's last layer as a stand-alone multinomial logistic regression (a copy of its weights).

    ``head(penultimate(model, x))`` equals ``model(x)``; its parameters are ``linear.weight`` (and
    ``linear.bias``), i.e. ``param_names(model, "last")`` in the same order.
    """
    last = model.last_layer
    if not isinstance(last, nn.Linear):
        raise TypeError(f"the last layer is a {type(last).__name__}, not nn.Linear: no logistic-regression head")
    head = logistic_regression(last.in_features, last.out_features, bias=last.bias is not None,
                               dtype=last.weight.dtype)
    with torch.no_grad():
        head.linear.weight.copy_(last.weight)
        if last.bias is not None:
            head.linear.bias.copy_(last.bias)
    return head.to(last.weight.device)


def last_layer_problem(model: nn.Module, train: Data, test: Data) -> tuple[nn.Module, Data, Data]:
    """``(head, train_features, test_features)``: the last layer of ``model`` as a model of its own.

    Everything about the last layer — its influence estimate, its warm-start retraining, its PBRF — is the same
    computation on the head and cached features (the layers below are frozen), at the cost of a logistic
    regression instead of a forward pass through the whole network per step.
    """
    return head_of(model), (penultimate(model, train[0]), train[1]), (penultimate(model, test[0]), test[1])


def test_points(losses: Tensor | np.ndarray, seed: int = 0) -> dict[str, int]:
    """Positions of the test points with the maximum and the median loss, and one drawn at random.

    Args:
        losses: ``[n_test]`` per-sample test losses under θ̂.
        seed: draws the random one (``numpy.random.default_rng``), different from max and median when possible.

    Returns:
        ``{"max": i, "median": j, "random": r}`` (the median is the lower median for even n).
    """
    a = np.asarray(losses.detach().cpu() if isinstance(losses, Tensor) else losses, dtype=float).reshape(-1)
    if a.size < 1 or not np.all(np.isfinite(a)):
        raise ValueError("losses must be a non-empty vector of finite test losses")
    order = np.argsort(a, kind="stable")
    picks = {"max": int(order[-1]), "median": int(order[(a.size - 1) // 2])}
    rest = [i for i in range(a.size) if i not in picks.values()] or list(range(a.size))
    picks["random"] = int(np.random.default_rng(seed).choice(rest))
    return picks


def select_candidates(rule: Rule, k: int, *, estimate: Any = None, train_loss: Any = None, n: int | None = None,
                      seed: int = 0) -> np.ndarray:
    """Training indices to retrain without, by one of the selection rules the literature uses.

    * ``"loss"``: the k points with the highest training loss (the seed paper's Iris rule);
    * ``"estimate"``: the k points with the largest |estimate| (Koh & Liang; the paper's MNIST rule);
    * ``"random"``: k points drawn uniformly without replacement (``seed``) — the only unbiased one.

    Returns ``[k]`` int64 indices, the first rules in decreasing order of their score.
    """
    if rule not in CANDIDATE_RULES:
        raise ValueError(f"unknown selection rule {rule!r}: use one of {CANDIDATE_RULES}")
    score = {"loss": train_loss, "estimate": estimate, "random": None}[rule]
    if rule != "random":
        if score is None:
            raise ValueError(f"rule {rule!r} needs {'train_loss' if rule == 'loss' else 'estimate'}=[n] values")
        s = np.asarray(score.detach().cpu() if isinstance(score, Tensor) else score, dtype=float).reshape(-1)
        size = s.size
    else:
        size = n if n is not None else next((np.asarray(v).size for v in (estimate, train_loss) if v is not None),
                                            None)
        if size is None:
            raise ValueError("rule 'random' needs n (or an estimate / train_loss of length n)")
    if not 1 <= k <= size:
        raise ValueError(f"k must lie in [1, {size}], got {k}")
    if rule == "random":
        return np.sort(np.random.default_rng(seed).choice(size, size=k, replace=False)).astype(np.int64)
    key = np.abs(s) if rule == "estimate" else s
    return np.argsort(-key, kind="stable")[:k].astype(np.int64)


# ------------------------------------------------------------------------------------ the fixed problem


@dataclass
class Problem:
    """A trained model, its test points and its influence estimates: what a chapter-3 trial holds fixed.

    Attributes:
        name: label for tables.
        model: the module holding θ̂ (all parameters).
        recipe: how θ̂ was trained (cold-start retraining repeats it).
        train: ``(x, y)`` training data; test: ``(x, y)`` of the chosen test points, one row per name in
            ``test_names`` (:data:`TEST_RULES` order: max, median, random test loss).
        params: the estimate's parameter subset, ``"all"`` or ``"last"``.
        estimate: ``[n_test, n_train]`` Δ_pred with the exact Hessian (L2 term included) + ``damping``·I.
        estimate_gn: the same with the Gauss-Newton matrix + ``gn_damping``·I (the PBRF's counterpart).
        train_loss: ``[n_train]`` ℓ(z_i, θ̂).
        head, head_train, head_test: the last layer as a model on cached features (:func:`last_layer_problem`).
        info: scalars worth reporting (gradient norm of θ̂, accuracies, smallest Hessian eigenvalue, ...).
    """

    name: str
    model: nn.Module
    recipe: Recipe
    train: Data
    test: Data
    test_names: list[str]
    params: str
    damping: float
    gn_damping: float
    estimate: np.ndarray
    estimate_gn: np.ndarray
    train_loss: np.ndarray
    head: nn.Module
    head_train: Data
    head_test: Data
    info: dict[str, float] = field(default_factory=dict)

    @property
    def l2(self) -> float:
        """λ of the training objective."""
        return float(self.recipe.weight_decay)

    @property
    def theta(self) -> dict[str, Tensor]:
        """θ̂, all parameters (detached)."""
        return {k: v.detach() for k, v in self.model.named_parameters()}

    @property
    def n_train(self) -> int:
        return int(self.train[0].shape[0])


def make_problem(name: str, model: nn.Module, recipe: Recipe, train: Data, test: Data, *, params: str = "all",
                 damping: float | str = 0.0, gn_damping: float = 0.0, seed: int = 0, head_tol: float | None = None,
                 raise_damping: bool = False, cache: bool = True) -> Problem:
    """Train θ̂ (``fit(recipe, model, *train, cache=cache)``), pick the test points, compute both estimates.

    ``head_tol``: after training, refit the last layer on the frozen features by Newton (float64) until its
    gradient norm is at most ``head_tol`` — the convergence the last-layer estimate assumes (θ̂ a stationary point
    of the parameters it differentiates). The refit layer is written back into the model (in the model's dtype)
    and the head keeps its float64 values. ``info`` records the head's gradient norm before and after
    (``head_grad_norm_before``, ``head_grad_norm``) whether or not it is refit.

    ``damping="auto"``: δ from the spectrum of H (:func:`helpers.solvers.auto_damping`: 0 where H is safely
    positive definite); ``info`` then holds the eigenvalues it came from (``damping_eig_min``, ``damping_eig_max``,
    ``damping_eig_dense``: 1 when from the dense H, 0 from Lanczos). ``info["solver_fallback"]`` is 1 where the dense
    H would not fit the memory budget and the exact solve ran as CG (:func:`helpers.solvers.solve`).

    ``raise_damping``: where the exact Hessian (computed for estimates of ≤ 500 parameters) has a smallest
    eigenvalue λ_min < 0 with ``damping`` ≤ −λ_min, use δ = 2·|λ_min| instead (H + δI then has smallest eigenvalue
    |λ_min|), so that every θ̂ of a replication gets a positive definite estimate; ``Problem.damping`` and
    ``info["damping"]`` hold the δ used.

    Test points: max / median / random loss under θ̂ among the rows of ``test`` (:func:`test_points`, ``seed``).
    Estimates over ``params`` (``"all"``; ``"last"`` is computed on the head and cached features, identical to
    ``predict_removal(model, params="last")`` and cheaper). The exact-Hessian estimate raises
    :class:`helpers.solvers.IndefiniteHessianError` if H + δI is not positive definite: the message names the
    smallest eigenvalue and the damping that fixes it.

    Cost: one training run (memoised), two influence solves over ``params``.
    """
    if params not in ("all", "last"):
        raise ValueError(f"params must be 'all' or 'last', got {params!r}")
    fitted = fit(recipe, model, *train, progress=False, cache=cache)
    trained = model_with(model, fitted.params)
    head_before = _head_grad_norm(trained, train, recipe.weight_decay)
    refit = None
    if head_tol is not None:
        refit = _refit_head(trained, train, recipe.weight_decay, head_tol, cache)
        with torch.no_grad():
            for (_, p_), v in zip(trained.last_layer.named_parameters(), refit.values()):
                p_.copy_(v.to(p_.dtype))
    xt, yt = test
    with torch.no_grad():
        tl = per_sample_losses(trained, dict(trained.named_parameters()), xt.to(recipe.torch_dtype), yt)
        trl = per_sample_losses(trained, dict(trained.named_parameters()), train[0].to(recipe.torch_dtype), train[1])
        acc_test = float((trained(xt.to(recipe.torch_dtype)).argmax(1) == yt).double().mean())
        acc_train = float((trained(train[0].to(recipe.torch_dtype)).argmax(1) == train[1]).double().mean())
    picks = test_points(tl, seed)
    rows = torch.as_tensor([picks[r] for r in TEST_RULES])
    chosen = (xt[rows].to(recipe.torch_dtype), yt[rows])
    head, htrain, htest = last_layer_problem(trained, (train[0].to(recipe.torch_dtype), train[1]), chosen)
    # The last layer is a small convex problem: estimates and retraining on it run in float64 whatever θ̂'s dtype.
    head, htrain, htest = head.double(), (htrain[0].double(), htrain[1]), (htest[0].double(), htest[1])
    if refit is not None:
        with torch.no_grad():
            for (_, p_), v in zip(head.named_parameters(), refit.values()):
                p_.copy_(v)
    target, tr, te = (trained, (train[0].to(recipe.torch_dtype), train[1]), chosen) if params == "all" else \
        (head, htrain, htest)

    def estimates() -> dict[str, Any]:
        out: dict[str, Any] = {}
        d = sum(v.numel() for v in target.parameters())
        delta = damping if damping == "auto" else float(damping)  # "auto": helpers.solvers.auto_damping
        if d <= 500 and delta != "auto":  # the curvature the estimate inverts: is θ̂ a minimum of it? (small d only;
            # "auto" damping reads the same spectrum from the dense H of its solve, below)
            P = {k: v.detach() for k, v in target.named_parameters()}
            spec = spectrum_summary(hessian_operator(target, P, *tr, l2=recipe.weight_decay), method="dense")
            out |= {"hessian_min_eig": spec.bottom, "hessian_max_eig": spec.top}
            if raise_damping and spec.bottom < 0 and delta <= -spec.bottom:
                delta = -2.0 * spec.bottom  # H + δI positive definite with margin: its smallest eigenvalue −λ_min
        est = predict_removal(target, tr, te, l2=recipe.weight_decay, damping=delta)
        est_gn = predict_removal(target, tr, te, l2=recipe.weight_decay, damping=gn_damping,
                                 hessian="gauss_newton")
        out |= {"H": est.values.detach().double().numpy(), "GN": est_gn.values.detach().double().numpy(),
                "d": int(est.solve.x.shape[0]), "residual": float(est.solve.relative_residual.max()),
                "damping": float(est.damping)}
        # what the solve did: CG where the dense H would not fit the memory budget; the spectrum "auto" damping used
        out["solver_fallback"] = float("fallback" in est.solve.info)
        if "eigenvalue_min" in est.solve.info:
            out |= {"damping_eig_min": float(est.solve.info["eigenvalue_min"]),
                    "damping_eig_max": float(est.solve.info["eigenvalue_max"]),
                    "damping_eig_dense": float(est.solve.info["spectrum_from"] == "dense eigvalsh")}
            if out["damping_eig_dense"] and d <= 500:
                out |= {"hessian_min_eig": out["damping_eig_min"], "hessian_max_eig": out["damping_eig_max"]}
        return out

    key = {"model": target, "train": list(tr), "test": list(te), "l2": recipe.weight_decay, "damping": damping,
           "gn_damping": gn_damping, "raise_damping": raise_damping}
    ests = memoize("problem_estimates", key, estimates) if cache else estimates()
    info = {"grad_norm": float(fitted.grad_norm), "train_loss": float(fitted.loss), "acc_train": acc_train,
            "acc_test": acc_test, "n_params": float(sum(v.numel() for v in fitted.params.values())),
            "n_params_estimate": float(ests["d"]), "residual": ests["residual"],
            "test_loss_max": float(tl[picks["max"]]), "damping": float(ests.get("damping", damping))}
    info |= {f"test_position_{r}": float(picks[r]) for r in TEST_RULES}
    info |= {"head_grad_norm_before": head_before,
             "head_grad_norm": _head_grad_norm_of(head, htrain, recipe.weight_decay)}
    info |= {k: ests[k] for k in ("hessian_min_eig", "hessian_max_eig", "solver_fallback", "damping_eig_min",
                                  "damping_eig_max", "damping_eig_dense") if k in ests}
    return Problem(name=name, model=trained, recipe=recipe, train=(train[0].to(recipe.torch_dtype), train[1]),
                   test=chosen, test_names=list(TEST_RULES), params=params, damping=float(ests.get("damping", damping)),
                   gn_damping=float(gn_damping), estimate=ests["H"], estimate_gn=ests["GN"],
                   train_loss=trl.detach().double().numpy(),
                   head=head, head_train=htrain, head_test=htest, info=info)


def _head_grad_norm_of(head: nn.Module, features: Data, l2: float) -> float:
    """‖∇R‖₂ of a float64 head on its features: mean cross-entropy + (λ/2)‖θ‖², the training objective."""
    params = {k: v.detach().double().requires_grad_(True) for k, v in head.named_parameters()}
    from torch.func import functional_call

    loss = F.cross_entropy(functional_call(head, params, (features[0].double(),)), features[1]) \
        + 0.5 * l2 * sum((v * v).sum() for v in params.values())
    g = torch.autograd.grad(loss, list(params.values()))
    return float(torch.sqrt(sum((t * t).sum() for t in g)))


def _head_grad_norm(model: nn.Module, train: Data, l2: float) -> float:
    x = train[0].to(next(model.parameters()).dtype)
    head, feats, _ = last_layer_problem(model, (x, train[1]), (x[:1], train[1][:1]))
    return _head_grad_norm_of(head.double(), (feats[0].double(), feats[1]), l2)


def _refit_head(model: nn.Module, train: Data, l2: float, tol: float, cache: bool) -> dict[str, Tensor]:
    """The last layer refit by Newton on the frozen features (float64) to ‖∇R‖₂ ≤ ``tol``, from θ̂'s values
    (one member: its dense Hessian is that of a logistic regression; L-BFGS stalls near 1e-8 on its line search)."""
    x = train[0].to(next(model.parameters()).dtype)
    head, feats, _ = last_layer_problem(model, (x, train[1]), (x[:1], train[1][:1]))
    head = head.double()
    res = fit(Recipe(optimizer="newton", weight_decay=l2, tol=tol, max_iter=100), head, feats[0].double(),
              feats[1], progress=False, cache=cache)
    if not res.grad_norm <= tol:
        raise RuntimeError(f"the last layer did not reach ‖∇R‖ ≤ {tol:g} (got {res.grad_norm:.2e} after Newton's "
                           "max_iter): raise head_tol or check the features for NaN")
    return res.params


@dataclass(frozen=True)
class Protocols:
    """The ground truths compared side by side, as recipes.

    Attributes:
        warm: warm start on all layers (fresh optimizer from θ̂; the seed paper's Iris protocol); recorded every
            ``every`` epochs, which is also the sweep of retraining lengths.
        head: warm start on the last layer only (on cached features; the paper's MNIST protocol), recorded too.
        pbrf: the optimiser of the PBRF (Newton for small models, Adam on a head), damping ``pbrf_damping``.
        every, head_every: record the two warm starts every so many epochs.
        seeds: cold-start seeds (θ̂'s own recipe from a fresh initialisation per seed), on the first ``cold_k``
            candidates only (None: all) — the expensive one.
    """

    warm: Recipe
    head: Recipe
    pbrf: Recipe
    pbrf_damping: float
    seeds: tuple[int, ...]
    every: int = 25
    head_every: int = 25
    cold_k: int | None = None


#: chapter 3's three architectures, by key: the names its tables and figures use
MODEL_NAMES: dict[str, str] = {"iris": "Iris MLP", "mnist": "MNIST MLP", "cnn": "small CNN"}


def chapter_problems(s: int, data: dict[str, tuple[Data, Data]], recipes: dict[str, Recipe], *, iris_depth: int,
                     iris_width: int, cnn_width: int, cnn_pool: int, iris_damping: float, pbrf_damping: float,
                     head_tol: float, seed: int) -> dict[str, Problem]:
    """Chapter 3's three models trained from initialisation seed ``s`` (the data split stays ``seed``).

    ``data`` and ``recipes`` map ``"iris"``, ``"mnist"``, ``"cnn"`` to ``(train, test)`` and θ̂'s recipe. Iris: an
    MLP (SELU, float64) with all parameters in the estimate, damping ``iris_damping`` raised where θ̂ is not a
    minimum; MNIST: a 784-128-10 ReLU MLP; CNN: the small CNN on ``cnn_pool``-pooled images — both float32 with the
    last layer in the estimate, refit to ``head_tol``. :func:`make_problem` for each (cached).
    """
    from helpers import models as zoo

    iris = zoo.build("mlp", d_in=4, n_classes=3, depth=iris_depth, width=iris_width, activation="selu", seed=s,
                     dtype=torch.float64)
    mnist = zoo.build("mlp", d_in=784, n_classes=10, depth=1, width=128, activation="relu", seed=s,
                      dtype=torch.float32)
    cnn = zoo.build("small_cnn", width=cnn_width, input_size=28 // cnn_pool, seed=s, dtype=torch.float32)
    return {
        "iris": make_problem(MODEL_NAMES["iris"], iris, recipes["iris"], *data["iris"], params="all",
                             damping=iris_damping, gn_damping=pbrf_damping, seed=seed, raise_damping=True),
        "mnist": make_problem(MODEL_NAMES["mnist"], mnist, recipes["mnist"], *data["mnist"], params="last",
                              gn_damping=pbrf_damping, seed=seed, head_tol=head_tol),
        "cnn": make_problem(MODEL_NAMES["cnn"], cnn, recipes["cnn"], *data["cnn"], params="last",
                            gn_damping=pbrf_damping, seed=seed, head_tol=head_tol)}


def chapter_protocols(key: str, problem: Problem, s: int, *, n_seeds: int, retrain_lr: float, head_epochs: int,
                      iris_retrain_epochs: int, mnist_retrain_epochs: int, iris_every: int, head_every: int,
                      cold_k: int, pbrf_damping: float) -> Protocols:
    """The ground-truth recipes of one of chapter 3's models: retraining objective = training objective (same λ).
    Cold-start seeds continue from θ̂'s own seed ``s`` and never repeat it.

    Iris: warm starts and the PBRF by Adam from θ̂ for ``iris_retrain_epochs`` (as Bae et al.: with small damping
    the PBRF objective is not convex everywhere, which Newton refuses). MNIST and CNN: all-layer warm start with
    θ̂'s own recipe for ``mnist_retrain_epochs`` at a constant rate, last layer and PBRF by full-batch Adam for
    ``head_epochs`` (how far that is from its optimum is in the convergence table).
    """
    cold_seeds = tuple(s + 1 + j for j in range(n_seeds))
    head = Recipe(optimizer="adam", lr=retrain_lr, epochs=head_epochs, weight_decay=problem.l2)
    if key == "iris":
        warm = Recipe(optimizer="adam", lr=retrain_lr, epochs=iris_retrain_epochs, weight_decay=problem.l2)
        return Protocols(warm=warm, head=warm, pbrf=warm, pbrf_damping=pbrf_damping, seeds=cold_seeds,
                         every=iris_every, head_every=iris_every, cold_k=cold_k)
    warm = problem.recipe.replace(lr=retrain_lr, epochs=mnist_retrain_epochs, schedule="none")
    return Protocols(warm=warm, head=head, pbrf=head, pbrf_damping=pbrf_damping, seeds=cold_seeds,
                     every=1, head_every=head_every, cold_k=cold_k)


def run_protocols(problem: Problem, removed: Sequence[int], protocols: Protocols, *,
                  wide: Sequence[int] | None = None, wide_protocols: Sequence[str] = ("warm_last", "pbrf"),
                  cache: bool = True) -> dict[str, Any]:
    """Every ground truth of :class:`Protocols` for the same θ̂, test points and removed points.

    Args:
        removed: the candidates of the side-by-side comparison.
        wide: a larger set of training indices (e.g. :func:`selection_pool`, or all points) for the protocols
            named in ``wide_protocols`` — the cheap ones — so that selection rules can be compared on them.

    Returns:
        ``{"cold": GroundTruth, "warm_all": Trajectory, "warm_last": Trajectory, "pbrf": GroundTruth}`` with Δ for
        every test point of the problem; cold start on ``removed[:cold_k]``. The PBRF runs over the estimate's
        parameters (the head when ``problem.params == "last"``). Each run is memoised.
    """
    from helpers import retrain

    removed = [int(i) for i in removed]
    if wide is not None:
        extra = sorted(set(int(i) for i in wide) - set(removed))
        wide_list = removed + extra
    bad = [p for p in wide_protocols if p not in ("warm_all", "warm_last", "pbrf")]
    if bad:
        raise ValueError(f"wide_protocols may name 'warm_all', 'warm_last', 'pbrf'; got {bad}")

    def which(name: str) -> list[int]:
        return wide_list if wide is not None and name in wide_protocols else removed

    cold_removed = removed[:protocols.cold_k] if protocols.cold_k else removed
    theta = problem.theta
    out: dict[str, Any] = {}
    out["cold"] = retrain.cold_start(problem.model, problem.train, problem.test, cold_removed, problem.recipe,
                                     list(protocols.seeds), theta_hat=theta, progress=False, cache=cache)
    out["warm_all"] = retrain.warm_start(problem.model, theta, problem.train, problem.test, which("warm_all"),
                                         protocols.warm, record_every=protocols.every, cache=cache).trajectory
    out["warm_last"] = retrain.warm_start(problem.head, None, problem.head_train, problem.head_test,
                                          which("warm_last"), protocols.head, record_every=protocols.head_every,
                                          cache=cache).trajectory
    target, tr, te = ((problem.model, problem.train, problem.test) if problem.params == "all"
                      else (problem.head, problem.head_train, problem.head_test))
    out["pbrf"] = retrain.pbrf(target, None, tr, te, which("pbrf"), protocols.pbrf.replace(
        weight_decay=problem.l2), damping=protocols.pbrf_damping, progress=False, cache=cache)
    return out


def retraining_lengths(epochs: Sequence[int], *, drop_full: bool = True) -> list[int]:
    """Two shorter retraining lengths to report besides the full one: about a tenth and a third of the recorded
    epochs (after 0); ``drop_full`` leaves out the full length should one of them be it (a short run)."""
    e = np.asarray(epochs)
    e = e[e > 0]
    out = {int(e[max(0, len(e) // 10 - 1)]), int(e[max(0, len(e) // 3 - 1)])}
    return sorted(out - {int(e[-1])} if drop_full else out)


def lookup(frame: pd.DataFrame, column: str = "value", **match: Any) -> float:
    """The one value of ``column`` in the row of ``frame`` whose columns equal ``match`` (e.g.
    ``lookup(summary, "low", model="Iris MLP", metric="pearson")``). Raises naming the filter when no row or more
    than one matches."""
    sel = np.ones(len(frame), dtype=bool)
    for k, want in match.items():
        if k not in frame.columns:
            raise KeyError(f"no column {k!r} to match on; the frame has {list(frame.columns)}")
        sel &= (frame[k] == want).to_numpy()
    if int(sel.sum()) != 1:
        raise ValueError(f"{int(sel.sum())} rows match {match}: exactly one was expected")
    return float(frame.loc[sel, column].iloc[0])


def trajectory_frame(traj: Trajectory, candidates: Sequence[int]) -> pd.DataFrame:
    """Long frame of a recorded retraining: ``epoch, member ("without <i>" or "drift"), delta`` for the first
    test point, one series per candidate and the drift member."""
    cols = columns_of(traj.removed, candidates)
    out = [pd.DataFrame({"epoch": traj.epochs, "member": f"without {int(traj.removed[c])}",
                         "delta": traj.delta[:, 0, c]}) for c in cols]
    out.append(pd.DataFrame({"epoch": traj.epochs, "member": "drift", "delta": traj.drift[:, 0]}))
    return pd.concat(out, ignore_index=True)


def correlation_path(traj: Trajectory, estimate: np.ndarray, candidates: Sequence[int]) -> pd.DataFrame:
    """Pearson and Spearman of ``estimate`` (``[n_train]`` for the first test point) with the recorded Δ over the
    candidates at every recorded epoch after 0 (epochs where Δ is constant are left out): ``epoch, pearson,
    spearman, drift, median_abs_delta``. Cost: one correlation pair per recorded epoch."""
    cols = columns_of(traj.removed, candidates)
    est = np.asarray(estimate)[np.asarray(candidates)]
    rows = []
    for i, e in enumerate(traj.epochs):  # one row per recorded epoch (tens), not per sample
        d = traj.delta[i, 0, cols]
        if e == 0 or np.ptp(d) == 0:
            continue
        rows.append({"epoch": int(e), "pearson": metrics.pearson(est, d), "spearman": metrics.spearman(est, d),
                     "drift": float(traj.drift[i, 0]), "median_abs_delta": float(np.median(np.abs(d)))})
    return pd.DataFrame(rows)


def columns_of(removed: Sequence[int], candidates: Sequence[int]) -> np.ndarray:
    """Positions of ``candidates`` among a ground truth's ``removed`` indices (its Δ columns).

    Raises:
        ValueError: a candidate the ground truth did not retrain without.
    """
    where = {int(i): j for j, i in enumerate(np.asarray(removed).reshape(-1))}
    missing = [int(i) for i in candidates if int(i) not in where]
    if missing:
        raise ValueError(f"the ground truth has no run without points {missing[:5]}: include them in its removed set")
    return np.asarray([where[int(i)] for i in candidates], dtype=np.int64)


def _side_by_side_pieces(problem: Problem, truths: dict[str, Any], removed: Sequence[int], t: int,
                         lengths: Sequence[int]) -> list[tuple[str, str, np.ndarray, np.ndarray, dict[str, float]]]:
    """``(estimate name, ground-truth name, estimate, Δ_true, noise summary)`` of every row of :func:`side_by_side`."""
    removed = np.asarray(removed, dtype=np.int64)
    est, est_gn = problem.estimate[t], problem.estimate_gn[t]
    cold, warm, last, pb = truths["cold"], truths["warm_all"], truths["warm_last"], truths["pbrf"]

    def sub(gt: GroundTruth, cand: np.ndarray) -> GroundTruth:
        c = columns_of(gt.removed, cand)
        per = None if gt.delta_per_seed is None else gt.delta_per_seed[:, :, c]
        noise = None if gt.noise is None else gt.noise[:, c]
        return GroundTruth(gt.protocol, gt.delta[:, c], gt.drift, gt.removed[c], gt.recipe, gt.test_losses,
                           gt.ref_loss, gt.grad_norm, gt.settings, per, noise)

    pieces: list[tuple[str, str, np.ndarray, np.ndarray, dict[str, float]]] = []
    cold_c = np.asarray([i for i in removed if i in set(cold.removed.tolist())], dtype=np.int64)
    cg = sub(cold, cold_c)
    nc = noise_summary(cg, t)
    pieces.append(("H+δ", cold_name(len(cold.settings['seeds'])), est[cold_c], cg.delta[t], nc))
    one = cg.delta_per_seed[0, t]
    ns = dict(nc, median_abs_delta=float(np.median(np.abs(one))), ceiling=nc["ceiling_single"])
    ns["drift_ratio"] = abs(ns["drift"]) / ns["median_abs_delta"]
    pieces.append(("H+δ", "cold (1 seed)", est[cold_c], one, ns))
    final = int(warm.epochs[-1])
    wg = sub(warm.at(final), removed)
    pieces.append(("H+δ", "warm all", est[removed], wg.delta[t], noise_summary(wg, t)))
    pieces.append(("H+δ", "warm all − drift", est[removed], wg.delta_minus_drift[t], noise_summary(wg, t)))
    for e in lengths:
        if int(e) != final:
            g = sub(warm.at(int(e)), removed)
            pieces.append(("H+δ", f"warm all @ {int(e)}", est[removed], g.delta[t], noise_summary(g, t)))
    lg = sub(last.at(int(last.epochs[-1])), removed)
    pieces.append(("H+δ", "warm last", est[removed], lg.delta[t], noise_summary(lg, t)))
    pg = sub(pb, removed)
    pieces.append(("H+δ", "PBRF", est[removed], pg.delta[t], noise_summary(pg, t)))
    pieces.append(("GN+δ", "PBRF", est_gn[removed], pg.delta[t], noise_summary(pg, t)))
    return pieces


def side_by_side(problem: Problem, truths: dict[str, Any], removed: Sequence[int], *, t: int = 0,
                 lengths: Sequence[int] = (), n_resamples: int = 1000, seed: int = 0, k: int | None = None
                 ) -> pd.DataFrame:
    """The chapter's summary rows for one model: every ground truth against the same estimate, with its noise.

    Ground truths (``ground_truth`` column), on the candidates ``removed`` (cold start: those it covers):
    ``cold (S seeds)`` (seed mean), ``cold (1 seed)`` (seed 0 alone), ``warm all``, ``warm all − drift``,
    ``warm all @ e`` for e in ``lengths``, ``warm last``, ``PBRF`` — all against the exact-Hessian estimate
    (estimate ``H+δ``), and ``PBRF`` also against the Gauss-Newton one (``GN+δ``, its counterpart).
    Columns: those of :func:`helpers.metrics.agreement_table`, :func:`noise_summary`'s ``ceiling, ceiling_single, drift,
    drift_ratio, median_abs_delta`` (on the same candidates), and ``model``.
    """
    pieces = _side_by_side_pieces(problem, truths, removed, t, lengths)
    frames = []
    for en, gn, p, tv, extra in pieces:
        tab = metrics.agreement_table({en: p}, {gn: tv}, k=k, n_resamples=n_resamples, seed=seed)
        for c in ("ceiling", "ceiling_single", "drift", "drift_ratio", "median_abs_delta"):
            tab[c] = extra[c]
        frames.append(tab)
    out = pd.concat(frames, ignore_index=True)
    out.insert(0, "model", problem.name)
    return out


UNIT_METRICS: tuple[str, ...] = ("pearson", "spearman", "relative_error", "scale_ratio")


def unit_rows(problem: Problem, truths: dict[str, Any], removed: Sequence[int], *, t: int = 0,
              lengths: Sequence[int] = ()) -> pd.DataFrame:
    """The rows of :func:`side_by_side` for one replication unit — one trained θ̂ and one test point — as point
    values without intervals: the interval belongs to the replication over units (:func:`replicated_summary`).

    Columns: ``model, test_point, estimate, ground_truth, metric, value, ceiling, drift_ratio, n``, metrics of
    :data:`UNIT_METRICS` (``scale_ratio`` = median |estimate| / median |Δ_true|).
    """
    rows = []
    for en, gn, p, tv, extra in _side_by_side_pieces(problem, truths, removed, t, lengths):
        mt = float(np.median(np.abs(tv)))
        vals = {"pearson": metrics.pearson(p, tv), "spearman": metrics.spearman(p, tv),
                "relative_error": metrics.relative_error(p, tv),
                "scale_ratio": float(np.median(np.abs(p)) / mt) if mt > 0 else float("inf")}
        for m in UNIT_METRICS:
            rows.append({"model": problem.name, "test_point": problem.test_names[t], "estimate": en,
                         "ground_truth": gn, "metric": m, "value": vals[m], "ceiling": extra["ceiling"],
                         "drift_ratio": extra["drift_ratio"], "n": len(tv)})
    return pd.DataFrame(rows)


def replicated_summary(units: pd.DataFrame, *, unit: Sequence[str] = ("theta_seed", "test_point"),
                       n_resamples: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Mean of every metric over the replication units with a two-stage bootstrap interval
    (:func:`helpers.stats.hierarchical_mean_ci`: trained models, then test points within a model).

    Args:
        units: rows of :func:`unit_rows` for several units, with the columns named in ``unit`` (outer, inner).
    Returns:
        One row per ``model, ground_truth, estimate, metric``: ``value`` (mean over units), ``low``, ``high``,
        ``n_outer``, ``n_inner``, ``ceiling`` and ``drift_ratio`` (medians over units), ``share_positive``.
    Raises:
        ValueError: a (model, ground truth, estimate, metric) whose units do not form a full outer × inner grid.
    """
    from helpers.stats import hierarchical_mean_ci

    outer, inner = unit
    rows = []
    for key, g in units.groupby(["model", "ground_truth", "estimate", "metric"], sort=False):
        grid = g.pivot_table(index=outer, columns=inner, values="value", aggfunc="first")
        if grid.isna().any().any():
            raise ValueError(f"{key}: the units do not form a full {outer} × {inner} grid; run every test point "
                             "for every trained model")
        mean, low, high = hierarchical_mean_ci(grid.to_numpy(), n_resamples=n_resamples, seed=seed)
        rows.append(dict(zip(["model", "ground_truth", "estimate", "metric"], key)) | {
            "value": mean, "low": low, "high": high, "n_outer": grid.shape[0], "n_inner": grid.shape[1],
            "ceiling": float(g.ceiling.median()), "drift_ratio": float(g.drift_ratio.median()),
            "share_positive": float((g.value > 0).mean())})
    return pd.DataFrame(rows)


def paired_difference(units: pd.DataFrame, a: tuple[str, str], b: tuple[str, str], *, metric: str = "pearson",
                      unit: Sequence[str] = ("theta_seed", "test_point"), n_resamples: int = 2000, seed: int = 0
                      ) -> pd.DataFrame:
    """Per model, ``metric`` of ``a = (ground_truth, estimate)`` minus that of ``b`` on the same units, with the
    two-stage bootstrap interval of the mean difference: "A beats B" holds where the interval lies above 0.

    Returns one row per model: ``diff``, ``low``, ``high``, ``units``, ``verdict`` (``"a higher"``,
    ``"b higher"`` or ``"no difference resolved"``).
    """
    from helpers.stats import hierarchical_mean_ci

    outer, inner = unit
    out = []
    for model, g in units[units.metric == metric].groupby("model", sort=False):
        pa = g[(g.ground_truth == a[0]) & (g.estimate == a[1])].set_index([outer, inner]).value
        pb = g[(g.ground_truth == b[0]) & (g.estimate == b[1])].set_index([outer, inner]).value
        if pa.empty or pb.empty:
            raise ValueError(f"{model}: no units for {a if pa.empty else b}")
        d = (pa - pb).unstack(inner)
        if d.isna().any().any():
            raise ValueError(f"{model}: {a} and {b} were not measured on the same units")
        mean, low, high = hierarchical_mean_ci(d.to_numpy(), n_resamples=n_resamples, seed=seed)
        verdict = "a higher" if low > 0 else "b higher" if high < 0 else "no difference resolved"
        out.append({"model": model, "diff": mean, "low": low, "high": high, "units": int(d.size),
                    "verdict": verdict})
    return pd.DataFrame(out)


def convergence_table(problem: Problem, truths: dict[str, Any], *, tol: float) -> pd.DataFrame:
    """How far from a stationary point every compared model is: θ̂ (all parameters and the estimate's last
    layer) and each ground truth's retrained models, with the median and largest final ‖∇R‖₂ of their own
    objectives and whether all of them meet ``tol``.

    Rows: ``model, what, length`` (the stopping rule: epochs of a fixed-length protocol, or the tolerance of a
    Newton solve), ``grad_norm_median``, ``grad_norm_max``, ``tol``, ``met``. A correlation against a ground
    truth whose models do not meet the criterion measures the protocol's stopping point as much as the estimate;
    its noise ceiling is not read (:func:`replicated_summary` callers mark it).
    """
    def rec(gt: Any) -> dict[str, Any]:
        r = gt.recipe if isinstance(gt.recipe, dict) else {}
        if r.get("optimizer") in ("newton", "lbfgs"):
            return {"length": f"{'Newton' if r['optimizer'] == 'newton' else 'L-BFGS'} to ‖∇‖ ≤ {r.get('tol'):g}"}
        return {"length": f"{r.get('optimizer', '?')}, {r.get('epochs', '?')} epochs"}

    rows = [{"what": "θ̂, all parameters", "length": f"{problem.recipe.optimizer}, {problem.recipe.epochs} epochs",
             "grad_norm_median": problem.info["grad_norm"], "grad_norm_max": problem.info["grad_norm"]},
            {"what": "θ̂, last layer (the estimate's)", "length": "as θ̂" if problem.info.get(
                "head_grad_norm_before") == problem.info.get("head_grad_norm") else "refit by Newton",
             "grad_norm_median": problem.info["head_grad_norm"], "grad_norm_max": problem.info["head_grad_norm"]}]
    names = {"cold": "cold start (every seed, with and without z_i)", "warm_all": "warm all (every member)",
             "warm_last": "warm last (every member)", "pbrf": "PBRF optima (every member)"}
    for key, what in names.items():
        g = np.asarray(truths[key].grad_norm, dtype=np.float64).ravel()
        rows.append({"what": what, **rec(truths[key]), "grad_norm_median": float(np.nanmedian(g)),
                     "grad_norm_max": float(np.nanmax(g))})
    out = pd.DataFrame(rows)
    out.insert(0, "model", problem.name)
    out["tol"] = tol
    out["met"] = out.grad_norm_max <= tol
    return out


def selection_pool(problem: Problem, k: int, seed: int = 0) -> np.ndarray:
    """Every training index any selection rule picks for any test point of ``problem`` (sorted, unique): the
    points a ground truth must cover for :func:`selection_grid`."""
    picks = [select_candidates("loss", k, train_loss=problem.train_loss),
             select_candidates("random", k, n=problem.n_train, seed=seed)]
    picks += [select_candidates("estimate", k, estimate=problem.estimate[t]) for t in range(len(problem.test_names))]
    return np.unique(np.concatenate(picks))


def selection_grid(problem: Problem, delta: np.ndarray, pool: Sequence[int], k: int, *, seed: int = 0,
                   n_resamples: int = 1000, top_k: int | None = None) -> pd.DataFrame:
    """How the choice of candidates and of test point moves every metric, for one estimate and ground truth.

    Args:
        delta: ``[n_test, len(pool)]`` Δ_true of the pool's points for each test point of ``problem``.
        pool: the training indices of ``delta``'s columns (must cover every selection, :func:`selection_pool`).
        k: candidates per rule; top_k: the k of the top-k overlap (default k // 10, at least 1).

    Returns:
        Rows ``test_point, candidates, metric, value, low, high, n`` (estimate: ``problem.estimate``).
    """
    pool = np.asarray(pool, dtype=np.int64)
    frames = []
    for t, tname in enumerate(problem.test_names):
        for rule in CANDIDATE_RULES:
            cand = select_candidates(rule, k, estimate=problem.estimate[t], train_loss=problem.train_loss,
                                     n=problem.n_train, seed=seed)
            cols = columns_of(pool, cand)
            tab = metrics.agreement_table({"H+δ": problem.estimate[t, cand]}, {rule: delta[t, cols]}, k=top_k,
                                  n_resamples=n_resamples, seed=seed)
            tab = tab.rename(columns={"ground_truth": "candidates"}).drop(columns="estimate")
            tab.insert(0, "test_point", tname)
            frames.append(tab)
    return pd.concat(frames, ignore_index=True)


# -------------------------------------------------------------------------------------- trajectories




# ----------------------------------------------------------------------------------------- agreement


def noise_summary(gt: GroundTruth, t: int = 0) -> dict[str, float]:
    """How large the procedure's own noise is next to the single-point effects it is meant to measure.

    Returns ``{"median_abs_delta", "drift", "drift_ratio", "ceiling", "ceiling_single", "reliability",
    "seed_sd"}`` for test point ``t``:

    * ``median_abs_delta``: median |Δ_true| over the removed points (the signal's typical size);
    * ``drift``: the nothing-removed change — warm start / PBRF: that member's Δ; cold start: the standard
      deviation over seeds of each seed's full-data fit minus θ̂ (the seed noise of the reference model);
    * ``drift_ratio`` = |drift| / median |Δ_true|: above 1, the procedure moves the test loss more than removing
      a typical point does;
    * ``ceiling`` (√ reliability of the seed mean, :func:`helpers.metrics.noise_ceiling`), ``ceiling_single``
      (one seed), ``reliability``, ``seed_sd`` (median over points of the seed-to-seed sd of Δ): cold start only.
      A deterministic protocol (warm start, PBRF: no seed) has no seed noise: ceiling 1 by construction, and
      ``seed_sd`` 0.
    """
    d = gt.delta[t]
    out = {"median_abs_delta": float(np.median(np.abs(d)))}
    if gt.delta_per_seed is not None and gt.delta_per_seed.shape[0] >= 2:
        nc = metrics.noise_ceiling(gt.delta_per_seed[:, t, :])
        drift = float(np.std(gt.drift[:, t], ddof=1))
        out |= {"drift": drift, "ceiling": nc.ceiling, "ceiling_single": nc.ceiling_single,
                "reliability": nc.reliability, "seed_sd": float(np.median(gt.noise[t]))}
    else:
        drift = float(np.ravel(gt.drift)[t]) if gt.drift.ndim == 1 else float(gt.drift[0, t])
        out |= {"drift": drift, "ceiling": 1.0, "ceiling_single": 1.0, "reliability": 1.0, "seed_sd": 0.0}
    out["drift_ratio"] = abs(out["drift"]) / out["median_abs_delta"] if out["median_abs_delta"] > 0 else float("inf")
    return out


# ------------------------------------------------------------------------------------ effects against n


def single_point_scaling(dataset: str, sizes: Sequence[int], *, l2: float = 0.01, k: int = 20, seed: int = 0,
                         n_test: int | None = None, tol: float = 1e-10, cache: bool = True) -> pd.DataFrame:
    """Actual leave-one-out effects of the *same* training points on the *same* test points as n grows.

    The training part of ``dataset`` (:func:`helpers.data.load`, split ``seed``, standardised on all of it) is put
    in a random order (``seed``); the training set of size n is its first n points, so the sets are nested and
    the k removed points — the first k of the order — belong to every one of them. For each n: multinomial
    logistic regression (no bias, L2 ``l2``, float64) fitted by Newton to ‖∇R‖ < ``tol``; each of the k points
    removed and the model retrained by Newton from θ̂ (:func:`helpers.retrain.warm_start`): exact leave-one-out
    up to ``tol``. A convex model, so nothing but n changes between sizes.

    Returns:
        Long DataFrame ``n, removed (dataset index), test (position), delta_true, delta_pred`` (every removed point ×
        every test point), in nats; ``delta_pred`` is the exact-Hessian influence estimate.

    Cost per n: one Newton fit and one Newton ensemble of k + 1 members (d = features × classes).
    """
    from helpers import data as data_mod
    from helpers import retrain

    sizes = sorted(int(s) for s in sizes)
    split = data_mod.load(dataset, seed=seed, n_test=n_test)
    if not sizes or sizes[0] < max(10, k + 1) or sizes[-1] > split.n_train:
        raise ValueError(f"sizes must lie in [{max(10, k + 1)}, {split.n_train}] (k = {k} removed points must fit "
                         f"in the smallest set), got {sizes}")
    order = torch.as_tensor(np.random.default_rng(seed).permutation(split.n_train))
    recipe = Recipe(optimizer="newton", weight_decay=l2, tol=tol, max_iter=100)
    frames = []
    for n in sizes:
        train = (split.x_train[order[:n]], split.y_train[order[:n]])
        model = logistic_regression(split.x_train.shape[1], split.n_classes, dtype=torch.float64)
        with torch.no_grad():
            model.linear.weight.zero_()  # Newton's start; the convex optimum does not depend on it
        fitted = fit(recipe, model, *train, progress=False, cache=cache)
        m = model_with(model, fitted.params)
        removed = list(range(k))  # positions in the subset = the first k points of the order, in every subset
        gt = retrain.warm_start(m, fitted.params, train, split.test, removed, recipe, progress=False, cache=cache)
        est = predict_removal(m, train, split.test, l2=l2).values.detach().numpy()[:, removed]
        tt, rr = np.meshgrid(np.arange(split.n_test), removed, indexing="ij")
        frames.append(pd.DataFrame({"n": n, "removed": split.idx_train[order[rr.ravel()]].numpy(),
                                    "test": tt.ravel(), "delta_true": gt.delta_minus_drift.ravel(),
                                    "delta_pred": est.ravel()}))
    return pd.concat(frames, ignore_index=True)


def pair_slopes(scaling: pd.DataFrame, column: str = "delta_true") -> np.ndarray:
    """Log-log slope of |Δ| against n for every (removed, test) pair of :func:`single_point_scaling` that is
    non-zero at every n: ``[n_pairs]``. −1 is "this point's effect on this test point shrinks like 1/n"."""
    piv = scaling.assign(a=scaling[column].abs()).pivot_table(index=["removed", "test"], columns="n", values="a")
    if piv.shape[1] < 2:
        raise ValueError("need at least two training-set sizes to fit a slope")
    a = piv.to_numpy()
    keep = np.all(a > 0, axis=1)
    lx = np.log(piv.columns.to_numpy(dtype=float))
    ly = np.log(a[keep])
    xc = lx - lx.mean()
    return (ly - ly.mean(axis=1, keepdims=True)) @ xc / (xc @ xc)  # least squares, all pairs at once


def loglog_slope(x: Any, y: Any, confidence: float = 0.95) -> dict[str, float]:
    """Least-squares slope of log y on log x (``scipy.stats.linregress``) with a t-interval: ``{"slope", "low",
    "high", "intercept", "r2"}``. A slope of −1 is "effects shrink like 1/n". Needs ≥ 3 positive pairs."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.shape != y.shape or x.size < 3 or not (np.all(np.isfinite(x) & (x > 0)) and np.all(np.isfinite(y) & (y > 0))):
        raise ValueError("loglog_slope needs >= 3 pairs of positive, finite x and y of the same length")
    lx, ly = np.log(x), np.log(y)
    fit = st.linregress(lx, ly)
    half = st.t.ppf(0.5 + confidence / 2, lx.size - 2) * fit.stderr
    return {"slope": float(fit.slope), "low": float(fit.slope - half), "high": float(fit.slope + half),
            "intercept": float(fit.intercept), "r2": float(fit.rvalue ** 2)}


# ------------------------------------------------------------------------- repetitions across depths


def depth_runs(depths: Sequence[int], reps: int, train: Data, test_point: Data, *, width: int = 5,
               activation: str = "selu", train_recipe: Recipe, retrain_recipe: Recipe, n_candidates: int = 25,
               seed: int = 0, cache: bool = True) -> pd.DataFrame:
    """Per-run signed correlations of the Iris depth sweep, the paper's protocol on the book's code.

    For each depth: ``reps`` MLPs (``width``, ``activation``) trained by ``train_recipe`` from init seeds
    ``seed, …, seed + reps − 1`` as one ensemble; for each run, the last-layer influence (exact Hessian, the L2
    term λ = ``train_recipe.weight_decay`` included — the well-defined version of the paper's estimate) on the
    ``n_candidates`` training points with the highest training loss; ground truth: warm start on *all* layers by
    ``retrain_recipe`` (the paper's), every run's candidates and drift member in one ensemble.

    Returns:
        One row per run: ``depth, rep, spearman, pearson`` (signed, positive = agreement), ``drift`` (the
        nothing-removed member's Δ), ``median_abs_delta``, ``grad_norm`` (of θ̂).

    Cost per depth: one ensemble of ``reps`` members for ``train_recipe`` and one of
    ``reps · (n_candidates + 1)`` members for ``retrain_recipe``.
    """
    from helpers.models import mlp

    x, y = train
    frames = []
    for depth in depths:
        key = {"depth": int(depth), "reps": int(reps), "train": [x, y], "test": list(test_point), "width": width,
               "activation": activation, "train_recipe": train_recipe.to_dict(),
               "retrain_recipe": retrain_recipe.to_dict(), "k": n_candidates, "seed": seed}

        def compute(depth: int = int(depth)) -> pd.DataFrame:
            dt = train_recipe.torch_dtype
            model = mlp(x.shape[1], int(y.max()) + 1, depth, width, activation, dtype=dt)
            ens = fit_ensemble(train_recipe, model, x, y, seeds=[seed + r for r in range(reps)], progress=False)
            n, k1 = x.shape[0], n_candidates + 1
            inits, weights, rows = {nm: [] for nm in ens.params}, [], []
            for r in range(reps):
                m = model_with(model, ens.member(r))
                est = predict_removal(m, train, test_point, params="last", l2=train_recipe.weight_decay)
                tl = per_sample_losses(m, dict(m.named_parameters()), x, y).detach()
                cand = select_candidates("loss", n_candidates, train_loss=tl)
                rows.append({"depth": depth, "rep": r, "est": est.values[0, cand].detach().numpy(),
                             "grad_norm": float(ens.grad_norm[r])})
                for nm, v in ens.params.items():
                    inits[nm].append(v[r][None].expand(k1, *v.shape[1:]))
                weights.append(removal_weights(n, list(cand) + [-1], dtype=dt))
            stacked = {nm: torch.cat(v) for nm, v in inits.items()}
            out = fit_ensemble(retrain_recipe, model, x, y, weights=torch.cat(weights), inits=stacked,
                               progress=False)
            work = model_with(model).requires_grad_(False)
            xt, yt = test_point
            before = vmap(lambda p: per_sample_losses(work, p, xt, yt))(stacked)[:, 0].reshape(reps, k1)
            after = vmap(lambda p: per_sample_losses(work, p, xt, yt))(out.params)[:, 0].reshape(reps, k1)
            delta = (after - before).detach().double().numpy()
            for r, row in enumerate(rows):
                dr = delta[r, :-1]
                row.update(spearman=metrics.spearman(row["est"], dr), pearson=metrics.pearson(row["est"], dr),
                           drift=float(delta[r, -1]), median_abs_delta=float(np.median(np.abs(dr))))
                del row["est"]
            return pd.DataFrame(rows)

        frames.append(memoize("depth_runs", key, compute) if cache else compute())
    return pd.concat(frames, ignore_index=True)


# ------------------------------------------------------------- the chapter's sections: frames, records, figures
#
# What ``book/validation.ipynb`` calls, section by section: each function composes the engine calls above, writes
# the figure data (:func:`helpers.book.figure_data`) and glues the numbers and sentences of the prose
# (:func:`helpers.book.record`, :func:`helpers.book.say`) under the names the chapter's text uses. Figures are
# returned, not glued: the chapter glues them under their names.

#: the side-by-side cold-start row that must meet the convergence criterion before its ceiling is read
COLD_WHAT = "cold start (every seed, with and without z_i)"


def cold_name(n_seeds: int) -> str:
    """The side-by-side name of the multi-seed cold-start ground truth, e.g. ``"cold (5 seeds)"``."""
    return f"cold ({n_seeds} seeds)"


def chapter_data(seed: int, *, mnist_n_train: int, mnist_n_test: int, cnn_n_train: int,
                 cnn_pool: int) -> dict[str, tuple[Data, Data]]:
    """The chapter's three data sets as ``{"iris" | "mnist" | "cnn": (train, test)}``: Iris (float64), a
    ``mnist_n_train`` / ``mnist_n_test`` subsample of mnist5k flattened in float32, and a ``cnn_n_train`` subsample as
    images average-pooled by ``cnn_pool`` (:func:`pool_images`) for the CNN. Splits drawn with ``seed``."""
    from helpers import data as data_mod

    iris = data_mod.load("iris", seed=seed)
    mn = data_mod.load("mnist5k", seed=seed, n_train=mnist_n_train, n_test=mnist_n_test, standardize=False,
                       dtype=torch.float32)
    cn = data_mod.load("mnist5k", seed=seed, n_train=cnn_n_train, n_test=mnist_n_test, standardize=False,
                       flatten=False)
    cnn_train = (pool_images(cn.x_train, cnn_pool).float(), cn.y_train)
    cnn_test = (pool_images(cn.x_test, cnn_pool).float(), cn.y_test)
    return {"iris": (iris.train, iris.test), "mnist": (mn.train, mn.test), "cnn": (cnn_train, cnn_test)}


def chapter_recipes(*, iris_lr: float, iris_epochs: int, iris_l2: float, mnist_epochs: int, cnn_epochs: int,
                    batch_size: int) -> dict[str, Recipe]:
    """θ̂'s training recipe per model key: Iris by full-batch Adam with a plateau schedule and coupled weight decay
    ``iris_l2``; MNIST (AMSGrad, lr 1e-3) and the CNN (lr 1e-2) by mini-batch Adam in float32 with λ = 1e-3."""
    return {"iris": Recipe(optimizer="adam", lr=iris_lr, epochs=iris_epochs, weight_decay=iris_l2,
                           schedule="plateau", patience=100),
            "mnist": Recipe(optimizer="adam", lr=1e-3, epochs=mnist_epochs, weight_decay=1e-3, amsgrad=True,
                            batch_size=batch_size, dtype="float32"),
            "cnn": Recipe(optimizer="adam", lr=1e-2, epochs=cnn_epochs, weight_decay=1e-3, batch_size=batch_size,
                          dtype="float32")}


def record_models(runs: dict[int, dict[str, Problem]], *, head_tol: float, iris_damping: float) -> pd.DataFrame:
    """Record what is held fixed: the figure data ``models`` (every θ̂ of every architecture), the first θ̂'s sizes,
    accuracies, gradient norms and Hessian eigenvalues, and the sentences on Iris's damping. ``runs``: θ̂ seed →
    :func:`chapter_problems`. Returns the models table the chapter shows (rounded)."""
    from helpers import book

    first = runs[next(iter(runs))]
    P_iris, P_mnist, P_cnn = first["iris"], first["mnist"], first["cnn"]
    info = pd.DataFrame([{"model": p.name, "θ̂ seed": s} | p.info for s, probs in runs.items() for p in probs.values()])
    book.figure_data("models", info.assign(note="hessian eigenvalues computed only for small estimates (NaN: not computed)"))
    for key, p in first.items():
        book.record(f"{key}_n_train", p.n_train)
        book.record(f"{key}_acc_test", p.info["acc_test"], fmt="{:.2f}")
        book.record(f"{key}_grad_norm", p.info["grad_norm"], fmt="{:.1e}")
        book.record(f"{key}_head_grad_norm_before", p.info["head_grad_norm_before"], fmt="{:.1e}")
        book.record(f"{key}_head_grad_norm", p.info["head_grad_norm"], fmt="{:.1e}")
    book.record("iris_n_params", int(P_iris.info["n_params"]))
    book.record("mnist_n_params_last", int(P_mnist.info["n_params_estimate"]))
    book.record("iris_min_eig", P_iris.info["hessian_min_eig"], fmt="{:.1e}")
    book.record("cnn_min_eig", P_cnn.info["hessian_min_eig"], fmt="{:.1e}")
    book.say("n_theta", str(len(runs)))
    book.say("head_tol", f"{head_tol:g}")
    book.say("iris_min_eig_verdict", "θ̂ is not quite a minimum, which is why the exact-Hessian estimate carries a "
             f"damping δ = {P_iris.damping:g}" if P_iris.info["hessian_min_eig"] < 0 else
             f"positive, so θ̂ is a minimum; the estimate still carries the damping δ = {P_iris.damping:g}")
    iris_deltas = sorted({float(probs["iris"].damping) for probs in runs.values()})
    book.say("iris_damping_rule", f"δ = {iris_damping:g}, or 2·|λ_min| where θ̂ has a more negative eigenvalue (used: "
             + ", ".join(f"{d:.3g}" for d in iris_deltas) + ")")
    return (info[["model", "θ̂ seed", "n_params", "n_params_estimate", "acc_train", "acc_test", "grad_norm", "damping",
                  "head_grad_norm_before", "head_grad_norm"]].rename(columns={"n_params_estimate": "params in estimate"})
            .round(4))


def selection_pools(problems: dict[str, Problem], k_select: int, seed: int = 0) -> dict[str, np.ndarray]:
    """The wide pools the selection section compares rules on: every Iris training point, and
    :func:`selection_pool` (``k_select``) for the other models."""
    return {key: np.arange(p.n_train) if key == "iris" else selection_pool(p, k_select, seed=seed)
            for key, p in problems.items()}


def side_by_side_truths(runs: dict[int, dict[str, Problem]], k: int, pools: dict[str, np.ndarray],
                        **protocol_settings: Any) -> tuple[dict, dict]:
    """Every ground truth of every unit: for each θ̂ (``runs``) and model, the ``k`` largest |estimates| of the
    max-loss test point as candidates and :func:`run_protocols` with :func:`chapter_protocols`
    (``protocol_settings``). Only the first θ̂ runs the cheap protocol (Iris: warm all, else warm last) on its wide
    pool (``pools``). Glues ``k``, ``top_k``, ``n_seeds``, ``cold_k``.

    Returns ``(rep_candidates, rep_truths)``, both keyed by ``(θ̂ seed, model key)``."""
    from helpers import book

    first_seed = next(iter(runs))
    rep_candidates, rep_truths = {}, {}
    for s, probs in runs.items():
        for key, p in probs.items():
            rep_candidates[s, key] = select_candidates("estimate", k, estimate=p.estimate[0])
            # the selection section compares rules on the first θ̂: only there the cheap protocol runs on a wide pool
            first = s == first_seed
            rep_truths[s, key] = run_protocols(p, rep_candidates[s, key],
                                               chapter_protocols(key, p, s, **protocol_settings),
                                               wide=pools[key] if first else None,
                                               wide_protocols=("warm_all",) if key == "iris" else ("warm_last",))
    book.say("k", str(k))
    book.say("top_k", str(max(2, k // 5)))
    book.say("n_seeds", str(protocol_settings["n_seeds"]))
    book.say("cold_k", str(protocol_settings["cold_k"]))
    return rep_candidates, rep_truths


def side_by_side_frames(runs: dict[int, dict[str, Problem]], rep_truths: dict, rep_candidates: dict, *,
                        n_resamples: int, seed: int, tol: float) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The side-by-side comparison over its units (θ̂ × test point): per-unit correlations (:func:`unit_rows`,
    figure data ``summary_units``), their two-stage bootstrap summary (:func:`replicated_summary`,
    ``summary_table``) and every compared model's convergence (:func:`convergence_table` at ``tol``,
    ``convergence``). Returns ``(units, summary, convergence)``."""
    from helpers import book

    units = book.figure_data("summary_units", pd.concat(
        [unit_rows(runs[s][key], rep_truths[s, key], rep_candidates[s, key], t=t,
                   lengths=retraining_lengths(rep_truths[s, key]["warm_all"].epochs, drop_full=False))
         .assign(theta_seed=s)
         for s in runs for key in runs[s] for t in range(len(TEST_RULES))], ignore_index=True))
    summary = book.figure_data("summary_table", replicated_summary(units, n_resamples=n_resamples, seed=seed))
    convergence = book.figure_data("convergence", pd.concat(
        [convergence_table(runs[s][key], rep_truths[s, key], tol=tol).assign(theta_seed=s)
         for s in runs for key in runs[s]], ignore_index=True))
    return units, summary, convergence


def summary_display_table(summary: pd.DataFrame) -> pd.DataFrame:
    """The side-by-side summary as one row per (model, ground truth, estimate): Pearson, Spearman, relative error
    and scale ratio as ``"value [low, high]"``, then the ceiling, the drift ratio and the numbers of units."""
    from helpers import book

    shown = summary[summary.metric.isin(["pearson", "spearman", "relative_error", "scale_ratio"])]
    table = (shown.assign(text=book.ci_column(shown, "value", "{:+.2f}", low="low", high="high"))
             .pivot_table(index=["model", "ground_truth", "estimate"], columns="metric", values="text",
                          aggfunc="first", sort=False))
    extra = shown.groupby(["model", "ground_truth", "estimate"], sort=False)[["ceiling", "drift_ratio", "n_outer",
                                                                              "n_inner"]].first()
    table = table.join(extra.round({"ceiling": 2, "drift_ratio": 1}))
    rows_in_order = pd.MultiIndex.from_frame(shown[["model", "ground_truth", "estimate"]].drop_duplicates())
    return table.reindex(rows_in_order)[["pearson", "spearman", "relative_error", "scale_ratio", "ceiling",
                                         "drift_ratio", "n_outer", "n_inner"]]


def record_side_by_side(summary: pd.DataFrame, units: pd.DataFrame, convergence: pd.DataFrame, *,
                        keys: Sequence[str], n_seeds: int, n_resamples: int, seed: int) -> pd.DataFrame:
    """Record the side-by-side numbers of the prose for the models ``keys``: each ground truth's Pearson and
    Spearman with the H+δ estimate (and the PBRF's with GN+δ) with their intervals, the reliability ceilings, the
    drift ratios, whether cold start converged (and the ceiling sentence that follows), the number of units, and
    Bae et al.'s claim as a paired difference (figure data ``bae_paired``). Returns that paired-difference frame."""
    from helpers import book

    cold = cold_name(n_seeds)
    met = convergence.groupby(["model", "what"], sort=False).met.all()
    for key in keys:
        of = summary[summary.model == MODEL_NAMES[key]]  # one row per (ground truth, estimate, metric)
        for gt, tag in [(cold, "cold"), ("cold (1 seed)", "cold1"), ("warm all", "warm"),
                        ("warm last", "last"), ("PBRF", "pbrf")]:
            for m in ("pearson", "spearman"):
                for col, suffix in (("value", ""), ("low", "_low"), ("high", "_high")):
                    book.record(f"{key}_{tag}_{m}{suffix}", lookup(of, col, ground_truth=gt, estimate="H+δ", metric=m),
                                fmt="{:+.2f}")
        for col, suffix in (("value", ""), ("low", "_low")):
            book.record(f"{key}_pbrf_gn_pearson{suffix}",
                        lookup(of, col, ground_truth="PBRF", estimate="GN+δ", metric="pearson"), fmt="{:+.2f}")
        for name, gt, col, fmt in [("ceiling", cold, "ceiling", "{:.2f}"), ("ceiling_single", "cold (1 seed)",
                                   "ceiling", "{:.2f}"), ("warm_drift_ratio", "warm all", "drift_ratio", "{:.1f}"),
                                   ("cold_drift_ratio", cold, "drift_ratio", "{:.1f}")]:
            book.record(f"{key}_{name}", lookup(of, col, ground_truth=gt, estimate="H+δ", metric="pearson"), fmt=fmt)
        conv_ok = bool(met[MODEL_NAMES[key], COLD_WHAT])
        book.record(f"{key}_cold_converged", conv_ok)
        worst = convergence[(convergence.model == MODEL_NAMES[key])
                            & (convergence.what.str.startswith("cold"))].grad_norm_max.max()
        ceil = {g: lookup(of, "ceiling", ground_truth=g, estimate="H+δ", metric="pearson")
                for g in (cold, "cold (1 seed)")}
        book.say(f"{key}_ceiling_text", (f"the seed noise alone caps any estimator's Pearson against the seed mean at "
                                         f"{ceil[cold]:.2f} (one seed: {ceil['cold (1 seed)']:.2f})") if conv_ok else
                 (f"its cold-start models stop at a gradient norm of up to {worst:.1e}, above the criterion, so the "
                  "seed noise is partly optimisation noise and no ceiling is read"))
    book.record("n_units", int(summary.n_outer.iloc[0] * summary.n_inner.iloc[0]))
    book.say("n_units_text", str(int(summary.n_outer.iloc[0] * summary.n_inner.iloc[0])))
    # Bae et al.'s claim as a paired comparison on the same units: PBRF against its Gauss-Newton estimate, minus
    # cold-start retraining against the exact-Hessian estimate
    bae = book.figure_data("bae_paired", paired_difference(units, ("PBRF", "GN+δ"), (cold, "H+δ"),
                                                           n_resamples=n_resamples, seed=seed))
    higher = bae[bae.verdict == "a higher"].model.tolist()
    book.say("bae_verdict", "; ".join(f"{r.model}: {r.diff:+.2f} [{r.low:+.2f}, {r.high:+.2f}]"
                                      for r in bae.itertuples()))
    book.say("bae_count", f"{len(higher)} of {len(bae)}")
    book.record("bae_models_pbrf_better", len(higher))
    summary_ok = bool(np.isfinite(summary[["value", "low", "high", "ceiling"]].to_numpy()).all()
                      and (summary.low <= summary.value + 1e-12).all() and (summary.value <= summary.high + 1e-12).all())
    book.record("summary_rows", len(summary))
    book.record("summary_finite_with_ci", summary_ok)
    return bae


def draw_side_by_side(units: pd.DataFrame, summary: pd.DataFrame, convergence: pd.DataFrame, *, n_seeds: int):
    """The side-by-side figure: per model, each ground truth's Pearson and Spearman with the fixed estimate (GN+δ
    for the PBRF, H+δ otherwise) — the units as faint dots, the mean with its interval, and the reliability ceiling
    where the cold-start models meet the convergence criterion. Returns the Figure."""
    import matplotlib.pyplot as plt

    from helpers import plots

    order = ["cold (1 seed)", cold_name(n_seeds), "warm all", "warm all − drift", "warm last", "PBRF"]
    met = convergence.groupby(["model", "what"], sort=False).met.all()
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.8), sharex=True, sharey=True)
    for ax, (key, name) in zip(axes, MODEL_NAMES.items()):
        for j, (m, color) in enumerate([("pearson", "C0"), ("spearman", "C1")]):
            for i, gt in enumerate(order):
                est = "GN+δ" if gt == "PBRF" else "H+δ"
                y = i + (j - 0.5) * 0.34
                pts = units[(units.model == name) & (units.ground_truth == gt) & (units.estimate == est)
                            & (units.metric == m)].value
                ax.scatter(pts, np.full(len(pts), y), s=7, color=color, alpha=0.35, lw=0)
                r = summary[(summary.model == name) & (summary.ground_truth == gt) & (summary.estimate == est)
                            & (summary.metric == m)].iloc[0]
                plots.ci_points(ax, y, r.value, r.low, r.high, color=color, label=m if i == 0 else None)
                # the ceiling is read only where the cold-start models meet the convergence criterion
                if m == "pearson" and gt.startswith("cold") and met[name, COLD_WHAT]:
                    plots.ceiling_mark(ax, i, r.ceiling)
        ax.axvline(0, color="0.6", lw=1)
        ax.set(yticks=range(len(order)), yticklabels=[o.replace("PBRF", "PBRF (GN+δ)") for o in order],
               xlim=(-1.05, 1.05))
        ax.set_title(name, fontsize="medium")
        ax.invert_yaxis()
    fig.supxlabel("correlation of the fixed estimate with the ground truth", fontsize="medium")
    axes[0].legend(loc="lower left", frameon=False, fontsize="small")
    return fig


def noise_floor_frame(problems: dict[str, Problem], truths: dict[str, dict[str, Any]],
                      candidates: dict[str, Sequence[int]]) -> pd.DataFrame:
    """Single-point effects against the drift, per model (figure data ``noise_floor``): |Δ| of the candidates by
    warm start (full length) and cold start (seed mean), the cold-start drift per seed and the warm-all and
    warm-last drifts per recorded length, for the max-loss test point (values clipped at 1e-12 for the log scale)."""
    from helpers import book

    rows = []
    for key, p in problems.items():
        tr = truths[key]
        cand = candidates[key]
        cold = tr["cold"]
        name = MODEL_NAMES[key]
        rows += [{"model": name, "kind": "single-point effect |Δ_true| (warm all)", "value": abs(v)}
                 for v in tr["warm_all"].delta[-1, 0, columns_of(tr["warm_all"].removed, cand)]]
        rows += [{"model": name, "kind": "single-point effect |Δ_true| (cold, seed mean)", "value": abs(v)}
                 for v in cold.delta[0]]
        rows += [{"model": name, "kind": "cold-start drift, per seed", "value": abs(v)} for v in cold.drift[:, 0]]
        rows += [{"model": name, "kind": "warm-all drift, per recorded length", "value": abs(v)}
                 for v in tr["warm_all"].drift[1:, 0]]
        rows += [{"model": name, "kind": "warm-last drift, per recorded length", "value": abs(v)}
                 for v in tr["warm_last"].drift[1:, 0]]
    return book.figure_data("noise_floor", pd.DataFrame(rows).assign(value=lambda d: d.value.clip(lower=1e-12)))


def draw_noise_floor(noise: pd.DataFrame):
    """The noise-floor strip plot of :func:`noise_floor_frame` (log scale, one row per model). Returns the Figure."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    fig, ax = plt.subplots(figsize=(9, 4.2))
    sns.stripplot(noise, x="value", y="model", hue="kind", dodge=True, log_scale=True, size=3, alpha=0.7, ax=ax,
                  jitter=0.25)
    ax.set(xlabel="|change in the max-loss test point's loss| (nats, log scale)", ylabel="")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False, fontsize="small")
    return fig


def record_noise_floor(noise: pd.DataFrame, keys: Sequence[str]) -> None:
    """Record, per model key, the median cold-start drift, the median cold-start single-point effect and the largest
    warm-all drift of :func:`noise_floor_frame`."""
    from helpers import book

    for key in keys:
        g = noise[noise.model == MODEL_NAMES[key]]
        eff = g[g.kind.str.startswith("single-point effect |Δ_true| (cold")].value.median()
        book.record(f"{key}_cold_drift_median", g[g.kind == "cold-start drift, per seed"].value.median(), fmt="{:.2g}")
        book.record(f"{key}_cold_effect_median", eff, fmt="{:.2g}")
        book.record(f"{key}_warm_drift_max", g[g.kind == "warm-all drift, per recorded length"].value.max(),
                    fmt="{:.2g}")


def _scaling_medians(scaling: pd.DataFrame) -> pd.DataFrame:
    """Median |Δ_true| and |Δ_pred| per training-set size n of :func:`single_point_scaling`."""
    return scaling.assign(abs_true=scaling.delta_true.abs(), abs_pred=scaling.delta_pred.abs()).groupby("n")[
        ["abs_true", "abs_pred"]].median().reset_index()


def draw_scaling(scaling: pd.DataFrame):
    """Median |Δ_true| and |Δ_pred| of :func:`single_point_scaling` against n on log-log axes, with a 1/n reference
    line through the first point. Returns the Figure."""
    import matplotlib.pyplot as plt

    med = _scaling_medians(scaling)
    fig, ax = plt.subplots(figsize=(4.8, 3.6))
    ax.loglog(med.n, med.abs_true, "o-", label="median |Δ_true| (leave-one-out)")
    ax.loglog(med.n, med.abs_pred, "x--", label="median |Δ_pred| (influence)")
    ref = med.abs_true.iloc[0] * med.n.iloc[0] / med.n
    ax.loglog(med.n, ref, color="0.6", lw=1, label="∝ 1/n")
    ax.set(xlabel="training points n", ylabel="single-point effect (nats)")
    ax.legend(frameon=False, fontsize="small")
    return fig


def record_scaling(scaling: pd.DataFrame, *, dataset: str, k: int) -> None:
    """Record the scaling section's numbers: the log-log slope of the median |Δ_true| against n with its interval
    (:func:`loglog_slope`), the median per-point slope and the share below −0.5 (:func:`pair_slopes`), and the
    Pearson of Δ_pred with Δ_true; glue the data set's name and ``k``."""
    from helpers import book

    med = _scaling_medians(scaling)
    slope = loglog_slope(med.n, med.abs_true)
    pairs = pair_slopes(scaling)
    book.say("scaling_dataset", dataset)
    book.record("scaling_slope", slope["slope"], fmt="{:.2f}")
    book.record("scaling_slope_low", slope["low"], fmt="{:.2f}")
    book.record("scaling_slope_high", slope["high"], fmt="{:.2f}")
    book.record("scaling_pair_slope_median", float(np.median(pairs)), fmt="{:.2f}")
    book.record("scaling_pair_slope_share_below", float(np.mean(pairs < -0.5)), fmt="{:.0%}")
    book.record("scaling_pearson", metrics.pearson(scaling.delta_pred, scaling.delta_true), fmt="{:.3f}")
    book.say("scaling_k_text", str(k))


def trajectory_frames(problems: dict[str, Problem], truths: dict[str, dict[str, Any]],
                      candidates: dict[str, Sequence[int]],
                      panels: Sequence[tuple[str, str]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """For each ``(model key, warm-start protocol)`` panel: every candidate's Δ along the retraining
    (:func:`trajectory_frame`, figure data ``trajectories``) and the estimate's correlation with Δ at each recorded
    length (:func:`correlation_path`, ``correlation_by_length``). Returns ``(traj, paths)``."""
    from helpers import book

    traj = book.figure_data("trajectories", pd.concat([trajectory_frame(truths[k][w], candidates[k]).assign(
        model=MODEL_NAMES[k], retrain=w) for k, w in panels], ignore_index=True))
    paths = book.figure_data("correlation_by_length", pd.concat([correlation_path(
        truths[k][w], problems[k].estimate[0], candidates[k]).assign(model=MODEL_NAMES[k], retrain=w)
        for k, w in panels], ignore_index=True))
    return traj, paths


def draw_trajectories(traj: pd.DataFrame, paths: pd.DataFrame, panels: Sequence[tuple[str, str]]):
    """Two rows per panel of :func:`trajectory_frames`: the candidates' Δ test loss against the retraining epoch
    with the drift run in black (top), and Pearson and Spearman with the estimate by epoch (bottom). Returns the
    Figure."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(11, 5.6), sharex="col")
    for j, (key, which) in enumerate(panels):
        ax = axes[0, j]
        d = traj[(traj.model == MODEL_NAMES[key]) & (traj.retrain == which)]
        for name, g in d.groupby("member", sort=False):
            if name == "drift":
                ax.plot(g.epoch, g.delta, color="black", lw=2, label="drift (nothing removed)")
            else:
                ax.plot(g.epoch, g.delta, color="C0", lw=0.6, alpha=0.5)
        ax.axhline(0, color="0.6", lw=1)
        ax.set(ylabel="Δ test loss (nats)" if j == 0 else None)
        ax.text(0.02, 0.95, f"{MODEL_NAMES[key]}, {which.replace('_', ' ')}", transform=ax.transAxes, va="top",
                fontsize="small")
        ax = axes[1, j]
        c = paths[(paths.model == MODEL_NAMES[key]) & (paths.retrain == which)]
        ax.plot(c.epoch, c.pearson, label="Pearson")
        ax.plot(c.epoch, c.spearman, label="Spearman")
        ax.set(xlabel="retraining epoch", ylabel="correlation with the estimate" if j == 0 else None,
               ylim=(-1.05, 1.05))
    axes[0, 0].legend(loc="lower right", frameon=False, fontsize="small")
    axes[1, 0].legend(loc="lower right", frameon=False, fontsize="small")
    return fig


def record_paths(paths: pd.DataFrame, panels: Sequence[tuple[str, str]]) -> None:
    """Record the smallest and largest Pearson along each panel's retraining (:func:`trajectory_frames`)."""
    from helpers import book

    for key, which in panels:
        c = paths[(paths.model == MODEL_NAMES[key]) & (paths.retrain == which)]
        book.record(f"{key}_path_pearson_min", c.pearson.min(), fmt="{:+.2f}")
        book.record(f"{key}_path_pearson_max", c.pearson.max(), fmt="{:+.2f}")


#: the selection section's models and the protocol each is compared with on its wide pool
SELECTION_PANELS: tuple[tuple[str, str], ...] = (("iris", "warm_all"), ("mnist", "warm_last"))
#: the metrics the selection figure shows, and their tick labels
SELECTION_METRICS: tuple[str, ...] = ("pearson", "spearman", "kendall", "sign_agreement", "top_k_overlap")


def selection_frame(problems: dict[str, Problem], truths: dict[str, dict[str, Any]], pools: dict[str, np.ndarray],
                    k_select: int, *, seed: int, n_resamples: int) -> pd.DataFrame:
    """Candidate rules × test points on the first θ̂ (figure data ``selection``): for each model of
    :data:`SELECTION_PANELS`, :func:`selection_grid` on the final retraining length's Δ over its wide pool, with
    ``k_select`` candidates and top-k = max(2, k_select // 5)."""
    from helpers import book

    sel_rows = []
    for key, which in SELECTION_PANELS:
        tr = truths[key][which]
        g = tr.at(int(tr.epochs[-1])) if hasattr(tr, "at") else tr
        pool_cols = columns_of(g.removed, pools[key])
        grid = selection_grid(problems[key], g.delta[:, pool_cols], pools[key], k_select, seed=seed,
                              n_resamples=n_resamples, top_k=max(2, k_select // 5))
        sel_rows.append(grid.assign(model=MODEL_NAMES[key]))
    return book.figure_data("selection", pd.concat(sel_rows, ignore_index=True))


def draw_selection(selection: pd.DataFrame):
    """The selection figure: per model (rows) and test point (columns), each candidate rule's agreement metrics
    (:data:`SELECTION_METRICS`) with their intervals. Returns the Figure."""
    import matplotlib.pyplot as plt

    from helpers import plots

    shown_m = list(SELECTION_METRICS)
    fig, axes = plt.subplots(2, 3, figsize=(11, 5.8), sharey=True, layout="constrained")
    for i, (key, _) in enumerate(SELECTION_PANELS):
        for j, tname in enumerate(TEST_RULES):
            ax = axes[i, j]
            d = selection[(selection.model == MODEL_NAMES[key]) & (selection.test_point == tname)
                          & selection.metric.isin(shown_m)]
            for r_i, rule in enumerate(CANDIDATE_RULES):
                s = d[d.candidates == rule].set_index("metric").loc[shown_m]
                x = np.arange(len(shown_m)) + (r_i - 1) * 0.22
                plots.ci_points(ax, x, s.value, s.low, s.high, horizontal=False, color=f"C{r_i}",
                                label=f"by {rule}" if (i, j) == (0, 0) else None)
            ax.axhline(0, color="0.6", lw=1)
            ax.set(xticks=range(len(shown_m)), xticklabels=["Pearson", "Spearman", "Kendall", "sign", "top-k"],
                   ylim=(-1.05, 1.05))
            ax.tick_params(axis="x", labelsize="small")
            ax.text(0.02, 0.04, f"{MODEL_NAMES[key]}, {tname} test loss", transform=ax.transAxes, fontsize="small")
    fig.legend(loc="outside lower center", ncols=3, frameon=False, fontsize="small", title="candidates selected",
               title_fontsize="small")
    axes[0, 0].set_ylabel("agreement")
    axes[1, 0].set_ylabel("agreement")
    return fig


def record_selection(selection: pd.DataFrame, k_select: int) -> None:
    """Record the selection section's Pearson per model, test point and rule, its range per model and its mean per
    rule; glue ``k_select`` and its top-k."""
    from helpers import book

    book.say("k_select", str(k_select))
    book.say("k_select_tenth", str(max(2, k_select // 5)))
    for key, _ in SELECTION_PANELS:
        for tname in TEST_RULES:
            for rule in CANDIDATE_RULES:
                book.record(f"sel_{key}_{tname}_{rule}", lookup(selection, model=MODEL_NAMES[key], test_point=tname,
                                                                candidates=rule, metric="pearson"), fmt="{:+.2f}")
        vals = selection[(selection.model == MODEL_NAMES[key]) & (selection.metric == "pearson")].value
        book.record(f"sel_{key}_range", [float(vals.min()), float(vals.max())])
        book.say(f"sel_{key}_min", f"{vals.min():+.2f}")
        book.say(f"sel_{key}_max", f"{vals.max():+.2f}")
    for rule in CANDIDATE_RULES:
        v = selection[(selection.candidates == rule) & (selection.metric == "pearson")].value.mean()
        book.record(f"sel_mean_{rule}", float(v), fmt="{:+.2f}")


def fig4_values(problems: dict[str, Problem], truths: dict[str, dict[str, Any]],
                candidates: dict[str, Sequence[int]]) -> pd.DataFrame:
    """Estimate against actual Δ, the paper's Fig. 4 (figure data ``fig4_values``): the book's Iris MLP (warm all)
    and MNIST MLP (warm last) candidates of the max-loss test point, and one repetition of the paper's MNIST
    FC-128 (its −I_up,loss as the estimate)."""
    from helpers import book, paper_data

    fc = paper_data.deep_runs()
    fc = fc[(fc.model == "fc128") & (fc.test_point == "max")]
    rep0 = fc[fc.rep == fc.rep.min()]
    scatter = []
    for key, which in [("iris", "warm_all"), ("mnist", "warm_last")]:
        tr = truths[key][which]
        cols = columns_of(tr.removed, candidates[key])
        scatter.append(pd.DataFrame({"panel": f"book: {MODEL_NAMES[key]}",
                                     "estimate": problems[key].estimate[0, candidates[key]],
                                     "true": tr.delta[-1, 0, cols]}))
    scatter.append(pd.DataFrame({"panel": "paper: MNIST FC-128 (one run)", "estimate": -rep0.estimated.to_numpy(),
                                 "true": rep0.true.to_numpy()}))
    return book.figure_data("fig4_values", pd.concat(scatter, ignore_index=True))


def _fig4_panel_stats(g: pd.DataFrame) -> tuple[float, float, float]:
    """Spearman, Pearson and median |estimate| / median |Δ| of one panel of :func:`fig4_values`."""
    rho, r = metrics.spearman(g.estimate, g.true), metrics.pearson(g.estimate, g.true)
    ratio = np.median(np.abs(g.estimate)) / np.median(np.abs(g.true))
    return rho, r, ratio


def draw_fig4(scatter: pd.DataFrame):
    """One scatter per panel of :func:`fig4_values` (estimate against actual Δ, the diagonal where the scales are
    within a factor 10), annotated with Spearman, Pearson and the scale ratio. Returns the Figure."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(11, 3.6))
    for ax, (panel, g) in zip(axes, scatter.groupby("panel", sort=False)):
        rho, r, ratio = _fig4_panel_stats(g)
        ax.scatter(g.true, g.estimate, s=12, alpha=0.8)
        ax.locator_params(axis="x", nbins=4)
        lim = float(np.abs(np.r_[g.true, g.estimate]).max()) * 1.08
        if ratio < 10:
            ax.plot([-lim, lim], [-lim, lim], color="0.6", ls="--", lw=1)
        ax.set(xlabel="actual Δ (nats)", ylabel="estimate" + (" (nats)" if panel.startswith("book") else " (−I_up,loss)"))
        ax.text(0.03, 0.97, f"{panel}\nSpearman {rho:+.2f}, Pearson {r:+.2f}\nmedian |est| / median |Δ| = {ratio:.3g}",
                transform=ax.transAxes, va="top", fontsize="small")
    return fig


def record_fig4(scatter: pd.DataFrame, truths: dict[str, dict[str, Any]], deep: pd.DataFrame) -> None:
    """Record each Fig. 4 panel's Spearman and scale ratio, the MNIST last-layer drift, and the paper's FC-128 mean
    Spearman and median scale ratio (``deep``: :func:`helpers.paper_data.deep_run_summary`)."""
    from helpers import book

    for panel, g in scatter.groupby("panel", sort=False):
        rho, _, ratio = _fig4_panel_stats(g)
        key = {"book: Iris MLP": "fig4_iris", "book: MNIST MLP": "fig4_mnist"}.get(panel, "fig4_paper")
        book.record(f"{key}_spearman", rho, fmt="{:+.2f}")
        book.record(f"{key}_ratio", float(ratio), fmt="{:.3g}")
    book.record("mnist_last_drift", float(truths["mnist"]["warm_last"].drift[-1, 0]), fmt="{:+.2f}")
    fc_sum = deep[(deep.model == "fc128") & (deep.test_point == "max")]
    book.record("paper_fc128_spearman", fc_sum.spearman.mean(), fmt="{:+.2f}")
    book.record("paper_fc128_ratio", fc_sum.scale_ratio.median(), fmt="{:.0f}")


def abs_inflation_study(iris_runs: pd.DataFrame, deep: pd.DataFrame, *,
                        seed: int) -> tuple[pd.DataFrame, dict, dict]:
    """How much averaging |ρ| inflates the paper's correlations: mean |ρ| against mean signed ρ per setting of its
    Iris runs and its deep runs (figure data ``abs_inflation``), the mean |ρ| of unrelated rankings of 25 and 40
    points, and the records of the prose. Returns ``(inflation, null25, null40)``."""
    from helpers import book, paper_data

    infl_iris = paper_data.abs_inflation(iris_runs.dropna(subset=["spearman"]), ["sweep", "regime", "value"])
    infl_deep = paper_data.abs_inflation(deep, ["dataset", "model", "test_point"])
    null25 = paper_data.null_mean_abs_rho(paper_data.IRIS_CANDIDATES, seed=seed)
    null40 = paper_data.null_mean_abs_rho(paper_data.DEEP_CANDIDATES, seed=seed)
    inflation = book.figure_data("abs_inflation", pd.concat([
        infl_iris.assign(source="Iris (Figs. 1, 3)",
                         setting=lambda d: d.sweep + " " + d.regime + " " + d.value.astype(str)),
        infl_deep.assign(source="MNIST / CIFAR-10 (Fig. 2)",
                         setting=lambda d: d.dataset + " " + d.model + " " + d.test_point),
    ], ignore_index=True)[["source", "setting", "mean_signed", "mean_abs", "inflation", "fraction_negative", "n"]])
    book.record("null_abs_rho_25", null25["mean_abs"], fmt="{:.2f}")
    book.record("null_abs_rho_40", null40["mean_abs"], fmt="{:.2f}")
    book.record("iris_runs_fraction_negative_max", infl_iris.fraction_negative.max(), fmt="{:.0%}")
    book.record("iris_runs_fraction_negative_min", infl_iris.fraction_negative.min(), fmt="{:.0%}")
    book.record("iris_runs_inflation_max", infl_iris.inflation.max(), fmt="{:.2f}")
    cnn_like = infl_deep[infl_deep.model.isin(["lenet", "vgg13", "bnn_lenet"])]
    book.record("deep_conv_mean_abs_range", [float(cnn_like.mean_abs.min()), float(cnn_like.mean_abs.max())])
    book.record("deep_conv_mean_signed_range", [float(cnn_like.mean_signed.min()), float(cnn_like.mean_signed.max())])
    book.say("deep_conv_mean_abs_text", f"{cnn_like.mean_abs.min():.2f}–{cnn_like.mean_abs.max():.2f}")
    book.say("deep_conv_mean_signed_text", f"{cnn_like.mean_signed.min():+.2f} to {cnn_like.mean_signed.max():+.2f}")
    nol2 = infl_iris[(infl_iris.sweep == "depth") & (infl_iris.regime == "nol2")]
    book.record("paper_nol2_mean_abs", nol2.mean_abs.mean(), fmt="{:.2f}")
    book.record("paper_nol2_mean_signed", nol2.mean_signed.mean(), fmt="{:+.2f}")
    return inflation, null25, null40


def draw_inflation(inflation: pd.DataFrame, null25: dict, null40: dict):
    """Mean |ρ| against mean signed ρ per setting of :func:`abs_inflation_study`, with the diagonal and the
    no-information levels of 25 and 40 points. Returns the Figure."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.6, 4.4))
    for i, (src, g) in enumerate(inflation.groupby("source", sort=False)):
        ax.scatter(g.mean_signed, g.mean_abs, s=14, alpha=0.8, color=f"C{i}", label=src)
    ax.plot([-0.2, 1], [-0.2, 1], color="0.6", ls="--", lw=1, label="|ρ| = ρ")
    ax.axhline(null25["mean_abs"], color="C0", lw=1, ls=":", label="mean |ρ| of unrelated rankings, n = 25")
    ax.axhline(null40["mean_abs"], color="C1", lw=1, ls=":", label="… n = 40")
    ax.set(xlabel="mean signed ρ over repetitions", ylabel="mean |ρ| over repetitions (what the paper plots)",
           xlim=(-0.2, 1), ylim=(0, 1))
    ax.legend(frameon=False, fontsize="x-small", loc="upper left")
    return fig


@dataclass
class Pitfall:
    """The shuffled-index pitfall on one last-layer problem (:func:`shuffled_index_pitfall`).

    ``broken_est`` / ``fixed_est``: the estimate of every training point, collected through a shuffled loader with
    the loader position / the dataset index taken as the point's index; ``chosen``: the ``k`` points the broken
    pipeline removes; ``runs``: their last-layer warm-start retraining (the paper's protocol); ``exact``: the same
    removals retrained to convergence (Newton)."""

    broken_est: np.ndarray
    fixed_est: np.ndarray
    chosen: np.ndarray
    runs: GroundTruth
    exact: GroundTruth


def shuffled_index_pitfall(problem: Problem, k: int, *, batch_size: int, retrain_lr: float, head_epochs: int,
                           seed: int) -> Pitfall:
    """Influence collected through a shuffled ``DataLoader`` on ``problem``'s last layer for its max-loss test
    point (:func:`helpers.influence.loader_influence`), with and without the dataset index carried; the ``k``
    largest broken estimates are removed and the last layer retrained by Adam (``retrain_lr``, ``head_epochs``) and
    to convergence. Records ``loader_fixed_max_error`` (fixed estimate against the direct one)."""
    from helpers import book, influence, retrain

    P = problem
    inf = predict_removal(P.head, P.head_train, (P.head_test[0][:1], P.head_test[1][:1]), l2=P.l2)
    direction = inf.solve.x[:, 0]
    broken = influence.loader_influence(P.head, P.head_train, direction, batch_size=batch_size, seed=seed,
                                        carry_index=False)
    fixed = influence.loader_influence(P.head, P.head_train, direction, batch_size=batch_size, seed=seed,
                                       carry_index=True)
    broken_est, fixed_est = broken.by_dataset_index(), fixed.by_dataset_index()
    book.record("loader_fixed_max_error", float(np.abs(fixed_est - P.estimate[0]).max()), fmt="{:.1e}")
    chosen = select_candidates("estimate", k, estimate=broken_est)   # what the broken pipeline removes
    runs = retrain.warm_start(P.head, None, P.head_train, P.head_test, chosen,
                              Recipe(optimizer="adam", lr=retrain_lr, epochs=head_epochs, weight_decay=P.l2),
                              progress=False)
    # the same removals with the last layer retrained to convergence (Newton, convex): exact last-layer leave-one-out
    exact = retrain.warm_start(P.head, None, P.head_train, P.head_test, chosen,
                               Recipe(optimizer="newton", weight_decay=P.l2, tol=1e-10, max_iter=50), progress=False)
    return Pitfall(broken_est=broken_est, fixed_est=fixed_est, chosen=chosen, runs=runs, exact=exact)


def record_pitfall(pitfall: Pitfall, *, n_resamples: int, seed: int) -> dict[str, Any]:
    """Record the pitfall's Pearson and Spearman (bootstrap intervals) of the broken and the fixed estimates against
    both retrainings, the warm start's drift and spread, whether the broken Spearman's interval contains zero, and
    the figure data ``pitfall``. Returns ``{"broken_spearman": ρ, "broken_spearman_ci": (low, high), …}``."""
    from helpers import book

    chosen, true, exact = pitfall.chosen, pitfall.runs.delta[0], pitfall.exact
    pit: dict[str, Any] = {}
    for gt_name, tv in [("", true), ("_exact", exact.delta[0])]:
        for name, est in [("broken", pitfall.broken_est[chosen]), ("fixed", pitfall.fixed_est[chosen])]:
            for m in ("pearson", "spearman"):
                e, lo, hi = metrics.bootstrap_ci(m, est, tv, n_resamples=n_resamples, seed=seed)
                pit[f"{name}{gt_name}_{m}"], pit[f"{name}{gt_name}_{m}_ci"] = e, (lo, hi)
                book.record(f"pitfall_{name}{gt_name}_{m}", e, fmt="{:+.2f}")
                book.record(f"pitfall_{name}{gt_name}_{m}_low", lo, fmt="{:+.2f}")
                book.record(f"pitfall_{name}{gt_name}_{m}_high", hi, fmt="{:+.2f}")
    book.record("pitfall_drift", float(pitfall.runs.drift[0]), fmt="{:+.2g}")
    book.record("pitfall_spread", float(np.std(true, ddof=1)), fmt="{:.2g}")
    lo, hi = pit["broken_spearman_ci"]
    book.say("pitfall_broken_zero", "contains" if lo <= 0 <= hi else "excludes")
    book.figure_data("pitfall", pd.DataFrame({"removed": chosen, "true_warm_last": true,
                                              "true_exact": exact.delta[0], "broken_estimate": pitfall.broken_est[chosen],
                                              "fixed_estimate": pitfall.fixed_est[chosen]}))
    return pit


def pitfall_vs_paper(pit: dict[str, Any]) -> pd.DataFrame:
    """The paper's Fig. 2 mean |ρ| per model beside the book's broken and fixed |Spearman| of :func:`record_pitfall`
    (figure data ``pitfall_vs_paper``)."""
    from helpers import book, paper_data

    paper2 = paper_data.read_reference("deep")
    bars = pd.concat([paper2.assign(source="paper (mean |ρ|)", label=paper2.dataset + " " + paper2.model)[
                          ["source", "label", "mean_abs_spearman"]],
                      pd.DataFrame({"source": "book CNN (|ρ| of one run)", "label": ["book: broken", "book: fixed"],
                                    "mean_abs_spearman": [abs(pit["broken_spearman"]), abs(pit["fixed_spearman"])]})],
                     ignore_index=True)
    return book.figure_data("pitfall_vs_paper", bars)


def draw_pitfall(pitfall: Pitfall, bars: pd.DataFrame, null40: dict):
    """The pitfall figure: the broken and the fixed estimates against both retrainings (each minus its drift),
    and the |Spearman| bars of :func:`pitfall_vs_paper` with the no-information level of 40 points. Returns the
    Figure."""
    import matplotlib.pyplot as plt

    chosen, true, exact, runs = pitfall.chosen, pitfall.runs.delta[0], pitfall.exact, pitfall.runs
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.6), gridspec_kw={"width_ratios": [1, 1, 1.3]})
    for ax, (name, est) in zip(axes, [("broken: loader position as index", pitfall.broken_est[chosen]),
                                      ("fixed: dataset index carried", pitfall.fixed_est[chosen])]):
        ax.scatter(true - runs.drift[0], est, s=12, label="warm last − its drift")
        ax.scatter(exact.delta_minus_drift[0], est, s=12, marker="x", label="to convergence − its drift")
        ax.set(xlabel="actual Δ (nats), same removals", ylabel="estimate (nats)")
        ax.text(0.03, 0.97, f"{name}\nSpearman {metrics.spearman(est, true):+.2f} (paper's protocol)\n"
                f"Spearman {metrics.spearman(est, exact.delta[0]):+.2f} (to convergence)", transform=ax.transAxes,
                va="top", fontsize="x-small")
    axes[1].legend(loc="lower right", frameon=False, fontsize="x-small")
    ax = axes[2]
    colors = ["0.6" if s.startswith("paper") else "C3" for s in bars.source]
    ax.barh(bars.label, bars.mean_abs_spearman, color=colors)
    ax.axvline(null40["mean_abs"], color="black", ls=":", lw=1, label="unrelated rankings (n = 40)")
    ax.set(xlabel="|Spearman|", xlim=(0, 1))
    ax.invert_yaxis()
    ax.legend(frameon=False, fontsize="x-small", loc="lower right")
    return fig


def record_paper_lenet(deep: pd.DataFrame) -> None:
    """Record the paper's LeNet max-loss runs' common offset (drift) per data set, their spread between removed
    points, and the offset-to-spread ratio (as a number range and as a sentence)."""
    from helpers import book

    lenet = deep[(deep.model == "lenet") & (deep.test_point == "max")].groupby("dataset")[["drift", "spread"]].mean()
    book.record("paper_lenet_mnist_drift", lenet.loc["mnist", "drift"], fmt="{:+.2f}")
    book.record("paper_lenet_cifar_drift", lenet.loc["cifar10", "drift"], fmt="{:+.2f}")
    book.record("paper_lenet_spread", lenet.spread.mean(), fmt="{:.2f}")
    ratio = (lenet.drift.abs() / lenet.spread).to_numpy()  # offset against spread, per data set
    book.record("paper_lenet_drift_to_spread", [float(ratio.min()), float(ratio.max())])
    book.say("paper_lenet_ratio_text", f"{ratio.min():.0f} to {ratio.max():.0f} times")


def paper_depth_tests(iris_runs: pd.DataFrame) -> pd.DataFrame:
    """ANOVA and Kruskal–Wallis across depths on the paper's Iris runs, per regime and scale
    (:func:`helpers.paper_data.depth_tests`), with Holm's correction over the regimes for each scale (column
    ``p_holm``; figure data ``paper_depth_tests``)."""
    from helpers import book, paper_data, stats

    tests = paper_data.depth_tests(iris_runs)
    # one test per regime: Holm's correction over the regimes, separately for |ρ| and for the signed ρ
    tests["p_holm"] = tests.groupby("scale").p_anova.transform(lambda p: stats.holm(p.to_numpy()))
    return book.figure_data("paper_depth_tests", tests)


def record_paper_depth_tests(tests: pd.DataFrame) -> None:
    """Record the L2 regime's tests on |ρ| and the signed ρ, and per scale the regimes whose corrected p is below
    0.05 (a count and sentences listing them and the others) of :func:`paper_depth_tests`."""
    from helpers import book

    row = tests[(tests.regime == "l2") & (tests.scale == "abs")].iloc[0]
    book.record("paper_l2_abs_p", row.p_anova, fmt="{:.1e}")
    book.record("paper_l2_abs_eta2", row.eta2, fmt="{:.2f}")
    book.record("paper_l2_abs_p_kw", row.p_kruskal, fmt="{:.1e}")
    row = tests[(tests.regime == "l2") & (tests.scale == "signed")].iloc[0]
    book.record("paper_l2_signed_p", row.p_anova, fmt="{:.1e}")
    book.record("paper_l2_signed_eta2", row.eta2, fmt="{:.2f}")
    for sc in ("abs", "signed"):
        part = tests[tests.scale == sc]
        book.record(f"paper_regimes_significant_{sc}", int((part.p_holm < 0.05).sum()))
        book.say(f"paper_depth_cases_{sc}", "; ".join(f"{r.regime} p = {r.p_anova:.2g} (Holm {r.p_holm:.2g})"
                                                      for r in part.itertuples()))
        book.say(f"paper_depth_not_sig_{sc}", ", ".join(part[part.p_holm >= 0.05].regime) or "none")
    book.record("paper_regimes_significant", int((tests[tests.scale == "abs"].p_holm < 0.05).sum()))
    book.record("paper_regimes", int((tests.scale == "abs").sum()))


def book_depth_tests(own: pd.DataFrame) -> pd.DataFrame:
    """The book's own depth sweep (:func:`depth_runs`, figure data ``book_depth_runs``) tested across depths on the
    signed ρ and on |ρ| (:func:`helpers.paper_data.group_test`, figure data ``book_depth_tests``), with its p-values
    and effect sizes recorded. Returns the tests, one row per scale."""
    from helpers import book, paper_data

    book.figure_data("book_depth_runs", own)
    own_tests = pd.DataFrame([{"scale": s} | paper_data.group_test(own.assign(v=own.spearman.abs() if s == "abs"
                                                                              else own.spearman), "v", "depth")
                              for s in ("signed", "abs")])
    book.figure_data("book_depth_tests", own_tests)
    for s in ("signed", "abs"):
        r = own_tests[own_tests.scale == s].iloc[0]
        book.record(f"book_depth_{s}_p", r.p_anova, fmt="{:.2g}")
        book.record(f"book_depth_{s}_eta2", r.eta2, fmt="{:.2f}")
        book.record(f"book_depth_{s}_p_kw", r.p_kruskal, fmt="{:.2g}")
    book.record("book_depth_runs", len(own))
    return own_tests


def draw_depth(iris_runs: pd.DataFrame, own: pd.DataFrame, depth_reps: int):
    """Signed Spearman per repetition against depth: the paper's L2 runs as boxes (left) and the book's own
    ``depth_reps`` runs per depth with their mean and 95 % interval (right). Returns the Figure."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    paper_l2 = iris_runs[(iris_runs.sweep == "depth") & (iris_runs.regime == "l2")]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    sns.boxplot(paper_l2, x="value", y="spearman", color="0.8", ax=axes[0], fliersize=2)
    axes[0].set(xlabel="depth (paper, L2 regime, 50 runs each)", ylabel="signed Spearman")
    sns.stripplot(own, x="depth", y="spearman", ax=axes[1], color="C3", size=4)
    sns.pointplot(own, x="depth", y="spearman", ax=axes[1], color="black", errorbar=("ci", 95), markers="_",
                  linestyles="none")
    axes[1].set(xlabel=f"depth (book, {depth_reps} runs each)")
    for ax in axes:
        ax.axhline(0, color="0.6", lw=1)
    return fig
