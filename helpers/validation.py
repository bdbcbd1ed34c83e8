"""The validation procedure on trial (chapter 3): one model, one estimate, many ways of checking it.

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
* **the shuffled-index pitfall** — :class:`IndexedDataset`, :func:`loader_influence`: influence collected
  through a shuffled ``DataLoader``, with and without the dataset index carried along;
* **repetitions for statistics** — :func:`depth_runs`: the Iris depth sweep's per-run signed correlations, for
  the tests of :mod:`helpers.paper_data`.

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
from torch.utils.data import DataLoader, Dataset, TensorDataset

from helpers import metrics
from helpers.cache import memoize
from helpers.influence import per_sample_grads, predict_removal
from helpers.models import logistic_regression
from helpers.objective import param_names, per_sample_losses, removal_weights
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
            from helpers.curvature import hessian_operator

            P = {k: v.detach() for k, v in target.named_parameters()}
            vals = torch.linalg.eigvalsh(hessian_operator(target, P, *tr, l2=recipe.weight_decay).dense())
            out |= {"hessian_min_eig": float(vals[0]), "hessian_max_eig": float(vals[-1])}
            if raise_damping and float(vals[0]) < 0 and delta <= -float(vals[0]):
                delta = -2.0 * float(vals[0])  # H + δI positive definite with margin: its smallest eigenvalue −λ_min
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
    pieces.append(("H+δ", f"cold ({len(cold.settings['seeds'])} seeds)", est[cold_c], cg.delta[t], nc))
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


# --------------------------------------------------------------------------- the shuffled-index pitfall


class IndexedDataset(Dataset):
    """A dataset of ``(x_i, y_i, i)``: each sample carries its dataset index through any loader and shuffle —
    the fix for the shuffled-index pitfall (STUDY.md §3 problem 1)."""

    def __init__(self, x: Tensor, y: Tensor) -> None:
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x has {x.shape[0]} rows but y has {y.shape[0]}")
        self.x, self.y = x, y

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, int]:
        return self.x[i], self.y[i], i


@dataclass
class LoaderInfluence:
    """Influence values in the order a ``DataLoader`` produced them.

    Attributes:
        values: ``[n]`` Δ_pred in loader order.
        index: ``[n]`` what the pipeline believes is each value's dataset index: the carried index
            (:class:`IndexedDataset`), or — the pitfall — the position in the loader's output.
        carried: whether ``index`` was carried with the samples.
    """

    values: np.ndarray
    index: np.ndarray
    carried: bool

    def by_dataset_index(self) -> np.ndarray:
        """``[n]`` the values placed at the dataset indices the pipeline believes in (wrong if not carried)."""
        out = np.empty_like(self.values)
        out[self.index] = self.values
        return out


def loader_influence(model: nn.Module, train: Data, direction: Tensor, *, params: str | list[str] = "all",
                     batch_size: int = 64, seed: int = 0, carry_index: bool = True,
                     loss: str = "cross_entropy") -> LoaderInfluence:
    """Per-sample influence computed batch by batch from a *shuffled* ``DataLoader`` over the training set.

    value_i = (1/n) ∇ℓ(z_i, θ̂)ᵀ v with v = (H + δI)⁻¹ ∇ℓ(z_test, θ̂) (``direction``, flat in ``params`` order;
    e.g. ``predict_removal(...).solve.x[:, 0]``), so the values equal :func:`helpers.influence.predict_removal`'s
    — only their order differs. With ``carry_index=False`` the loader yields ``(x, y)`` and the position in its
    output is all the pipeline has: using it as the dataset index is the seed paper's bug. With
    ``carry_index=True`` the loader yields ``(x, y, i)`` (:class:`IndexedDataset`) and the index travels along.

    Cost: n per-sample gradients (one vmapped pass per batch).
    """
    x, y = train
    n = x.shape[0]
    names = param_names(model, params)
    P = {k: v.detach() for k, v in model.named_parameters() if k in names}
    P = {k: P[k] for k in names}
    d = sum(v.numel() for v in P.values())
    if direction.shape != (d,):
        raise ValueError(f"direction must be [{d}] (the flat parameters of {params!r}), got {tuple(direction.shape)}")
    ds = IndexedDataset(x, y) if carry_index else TensorDataset(x, y)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))
    values, index = [], []
    for batch in loader:
        xb, yb = batch[0], batch[1]
        g = per_sample_grads(model, P, xb, yb, loss)  # [b, d]
        values.append((g @ direction.to(g)) / n)
        if carry_index:
            index.append(torch.as_tensor(batch[2]))
    vals = torch.cat(values).detach().double().cpu().numpy()
    idx = torch.cat(index).numpy() if carry_index else np.arange(n)
    return LoaderInfluence(values=vals, index=idx.astype(np.int64), carried=carry_index)


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
