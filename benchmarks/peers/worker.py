"""Run ONE influence method on ONE benchmark problem in a fresh process, time it, and write its output.

    python benchmarks/peers/worker.py --problem _build/bench/problems/P1.npz --library dattri --method cg \
        --options '{"max_iter": 100}' --out /tmp/result --repeats 3

Runs under the book's ``.venv`` (helpers, captum, dattri) and under ``.venv-pydvl`` (pyDVL 0.10.0 needs numpy < 2),
so it imports nothing from ``helpers`` at module level and reads the problem from a plain ``.npz``
(:mod:`benchmarks.peers.problems`). It writes ``<out>.npy`` — the method's answer converted to the book's
convention, Δ_pred ``[n_test, n_train]`` float64 (STUDY.md §1) — and ``<out>.json`` with the timings.

``--dtype float32`` runs the method on the problem cast to float32 (data, θ̂ and torch's default dtype); its
answer is still compared with the float64 reference. :func:`main` takes its arguments as a list, so that the
tiny check of ``make test`` (``tests/test_bench_check.py``) can run this same code in the test's process.

Protocol (the same for every library, one thread each: ``--threads``, default 1): one warm-up call, then
``--repeats`` timed calls; the reported time is their median — except after a warm-up longer than ``--slow``
seconds, whose one call is the time (warm-up effects are negligible there, and the run budget is not). A call is the whole pipeline from a trained model and its data to the ``[n_test, n_train]`` scores: the
library's set-up (its ``fit``/``cache``, Hessian or factorisation), per-sample gradients, the inverse-Hessian
solve and the final products. Peak memory: the kernel's resident-set high-water mark (``VmHWM`` of
``/proc/self/status``), reset through ``/proc/self/clear_refs`` after loading the problem, minus the resident set
at that moment — the extra memory the calls needed at their peak (MiB), measured in this process only.

Conventions (checked by the caller with a fitted scale factor, which must come out ≈ 1; see book/peers.md):

* helpers: Δ_pred itself.
* captum 0.9.0: ``influence(test)[t, i] = ∇ℓ_tᵀ (H_sum + r I)⁻¹ ∇ℓ_i``, with H_sum the Hessian of the *summed*
  loss over the training set (``reduction="sum"``) and r = ``hessian_reg`` → r = n(λ + δ), the scores are already
  Δ_pred (the 1/n of the mean objective cancels against H_sum = n·H_mean), orientation [test, train].
* dattri 0.3.0: ``attribute(train, test)[i, t] = ∇ℓ_iᵀ (H_mean + r I)⁻¹ ∇ℓ_t`` with the Hessian of the task's
  loss on the full-data batch (mean cross-entropy; the L2 term is *not* in the loss, otherwise it would leak into
  the per-sample gradients) and r = ``regularization`` = λ + δ; converted by transposing and dividing by n.
  LiSSA: ``h ← v + (1 − d)h − H h / s`` → d = (λ + δ)/s.
* pyDVL 0.10.0: ``influences(x_test, y_test, x, y, mode=Up)[t, i] = ∇ℓ_tᵀ (H_mean + r I)⁻¹ ∇ℓ_i`` (no sign:
  the implementation returns the plain bilinear form), r = ``regularization`` = λ + δ; converted by dividing by n.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------------ the problem


class LogReg(nn.Module):
    """P1's model with helpers' parameter name ``linear.weight`` (``helpers.models.LogisticRegression``)."""

    def __init__(self, d_in: int, n_classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(d_in, n_classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class TanhMLP(nn.Module):
    """P2's model with helpers' parameter names ``net.0.*``, ``net.2.*`` (``helpers.models.MLP``, one hidden layer)."""

    def __init__(self, d_in: int, width: int, n_classes: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, width), nn.Tanh(), nn.Linear(width, n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Problem:
    """Arrays of a problem file, the model with θ̂ loaded, λ, δ and n, in the requested dtype."""

    def __init__(self, path: Path, dtype: torch.dtype) -> None:
        with np.load(path) as f:
            self.meta = json.loads(str(f["meta"]))
            self.x = torch.from_numpy(f["x_train"]).to(dtype)
            self.y = torch.from_numpy(f["y_train"]).long()
            self.xt = torch.from_numpy(f["x_test"]).to(dtype)
            self.yt = torch.from_numpy(f["y_test"]).long()
            state = {str(k): torch.from_numpy(f[f"param:{k}"]).to(dtype) for k in f["param_names"]}
        spec = self.meta["spec"]
        self.name = self.meta["name"]
        self.l2 = float(spec["l2"])
        self.damping = float(spec["damping"])
        self.shift = self.l2 + self.damping  # what every peer adds to the data Hessian: H + δI = H_data + (λ + δ)I
        self.n = self.x.shape[0]
        if spec["model"] == "logistic_regression":
            self.model = LogReg(spec["d_in"], spec["n_classes"])
        else:
            self.model = TanhMLP(spec["d_in"], spec["width"], spec["n_classes"])
        self.model = self.model.to(dtype)
        self.model.load_state_dict(state)
        self.model.eval()
        self.dtype = dtype
        self.dim = sum(p.numel() for p in self.model.parameters())


def mean_ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits, y)


# ------------------------------------------------------------------------------------------------ helpers


def _helpers_model(P: Problem) -> nn.Module:
    from helpers import models

    s = P.meta["spec"]
    if s["model"] == "logistic_regression":
        m = models.build("logistic_regression", d_in=s["d_in"], n_classes=s["n_classes"], dtype=P.dtype)
    else:
        m = models.build("mlp", d_in=s["d_in"], n_classes=s["n_classes"], depth=s["depth"], width=s["width"],
                         activation=s["activation"], bias=s["bias"], dtype=P.dtype)
    m.load_state_dict(P.model.state_dict())
    return m


def run_helpers(P: Problem, method: str, opts: dict[str, Any]) -> Callable[[], tuple[np.ndarray, dict]]:
    """helpers' methods; ``method`` is ``<entry point>:<solver>``.

    * ``generic:<solver>`` — :func:`helpers.influence.predict_removal` (autodiff Hessian-vector products, or the
      layer-wise MLP products of :mod:`helpers.layered` when the options say ``backend="layers"``);
    * ``convex:<solver>`` — :func:`helpers.closed_form.removal_estimate` (P1 only: closed-form Hessian / products).
    """
    from helpers import closed_form
    from helpers.influence import predict_removal

    from helpers.influence import per_sample_grads
    from helpers.objective import model_params

    entry, solver = method.split(":")
    model = _helpers_model(P)
    if solver == "floor":
        # the cost no exact method avoids: every training gradient once (values: gradient similarity, the identity
        # in place of (H + δI)⁻¹ — a by-product, not an influence estimate)
        params = model_params(model)

        def floor() -> tuple[np.ndarray, dict]:
            g_train = per_sample_grads(model, params, P.x, P.y)  # [n, d]: the pass being timed
            g_test = per_sample_grads(model, params, P.xt, P.yt)
            return (g_test @ g_train.T / P.n).numpy(), {}

        return floor
    if isinstance(opts.get("low_precision"), str):  # JSON carries the dtype by name
        opts = dict(opts, low_precision=getattr(torch, opts["low_precision"]))
    if entry == "convex":
        theta = model.linear.weight.detach()

        def call() -> tuple[np.ndarray, dict]:
            r = closed_form.removal_estimate(P.x, P.y, P.xt, P.yt, theta, l2=P.l2, damping=P.damping, method=solver,
                                        **opts)
            return r.values.numpy(), {"residual": r.solve.max_relative_residual, "iterations": r.solve.iterations}
    else:
        # autodiff products unless the job asks for helpers.layered's (backend="layers": the MLP of P2)
        backend = opts.get("backend", "autodiff")
        opts = {k: v for k, v in opts.items() if k != "backend"}

        def call() -> tuple[np.ndarray, dict]:
            r = predict_removal(model, (P.x, P.y), (P.xt, P.yt), l2=P.l2, damping=P.damping, method=solver,
                                backend=backend, **opts)  # opts may name hessian="ekfac", preconditioner=...
            return r.values.numpy(), {"residual": r.solve.max_relative_residual, "iterations": r.solve.iterations}

    return call


# ------------------------------------------------------------------------------------------------ captum


def run_captum(P: Problem, method: str, opts: dict[str, Any]) -> Callable[[], tuple[np.ndarray, dict]]:
    # captum 0.9 exports these two only from their modules, not from captum.influence
    from captum.influence._core.arnoldi_influence_function import ArnoldiInfluenceFunction
    from captum.influence._core.influence_function import NaiveInfluenceFunction
    from torch.utils.data import TensorDataset

    train = TensorDataset(P.x, P.y)
    loss = nn.CrossEntropyLoss(reduction="sum")  # captum's Hessian is that of the summed training loss
    reg = P.n * P.shift  # H_sum + n(λ+δ)I = n (H_mean + (λ+δ) I)
    state = {k: v.clone() for k, v in P.model.state_dict().items()}

    def load(model: nn.Module, _ckpt: str) -> float:
        model.load_state_dict(state)
        return 1.0

    def call() -> tuple[np.ndarray, dict]:
        common = dict(model=P.model, train_dataset=train, checkpoint="theta_hat", checkpoints_load_func=load,
                      loss_fn=loss, batch_size=P.n, sample_wise_grads_per_batch=True, hessian_reg=reg)
        if method == "NaiveInfluenceFunction":
            inf = NaiveInfluenceFunction(**common, projection_dim=opts.get("projection_dim"),
                                         hessian_inverse_tol=opts.get("hessian_inverse_tol", 1e-5))
        else:
            inf = ArnoldiInfluenceFunction(**common, projection_dim=opts["projection_dim"],
                                           arnoldi_dim=opts["arnoldi_dim"], arnoldi_tol=opts.get("arnoldi_tol", 1e-10),
                                           hessian_inverse_tol=opts.get("hessian_inverse_tol", 1e-5))
        scores = inf.influence((P.xt, P.yt))  # [n_test, n_train], Δ_pred already
        return scores.detach().double().numpy(), {}

    return call


# ------------------------------------------------------------------------------------------------ dattri


def run_dattri(P: Problem, method: str, opts: dict[str, Any]) -> Callable[[], tuple[np.ndarray, dict]]:
    from dattri.algorithm.influence_function import (
        IFAttributorArnoldi,
        IFAttributorCG,
        IFAttributorExplicit,
        IFAttributorLiSSA,
    )
    from dattri.task import AttributionTask
    from torch.utils.data import DataLoader, TensorDataset

    model = P.model
    dtype = P.dtype

    def loss_func(params: dict, batch: tuple) -> torch.Tensor:
        x, y = batch
        # dattri's LiSSA collate casts every tensor to float32: restore the problem's dtype and integer labels
        out = torch.func.functional_call(model, params, (x.to(dtype),))
        return mean_ce(out, y.long())

    task = AttributionTask(loss_func=loss_func, model=model, checkpoints=model.state_dict())
    full = DataLoader(TensorDataset(P.x, P.y), batch_size=P.n, shuffle=False)
    test = DataLoader(TensorDataset(P.xt, P.yt), batch_size=P.xt.shape[0], shuffle=False)

    def call() -> tuple[np.ndarray, dict]:
        if method == "IFAttributorExplicit":
            att = IFAttributorExplicit(task, regularization=P.shift)
        elif method == "IFAttributorCG":
            att = IFAttributorCG(task, regularization=P.shift, max_iter=opts["max_iter"],
                                 mode=opts.get("mode", "rev-fwd"))
        elif method == "IFAttributorLiSSA":
            # mode "rev-rev": dattri 0.3.0's "rev-fwd" product builds its zero tangents from the shape of every
            # input, which fails for the (x, y) batch its LiSSA passes (AttributeError: 'tuple' ... 'shape')
            att = IFAttributorLiSSA(task, batch_size=P.n, num_repeat=1, recursion_depth=opts["depth"],
                                    damping=P.shift / opts["scale"], scaling=opts["scale"],
                                    mode=opts.get("mode", "rev-rev"))
        elif method == "IFAttributorArnoldi":
            att = IFAttributorArnoldi(task, proj_dim=opts["rank"], max_iter=opts["arnoldi_dim"],
                                      regularization=P.shift, tol=opts.get("tol", 1e-10))
        else:
            raise ValueError(f"unknown dattri method {method!r}")
        att.cache(full)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scores = att.attribute(full, test)  # [n_train, n_test]
        return (scores.detach().double().T / P.n).numpy(), {}

    return call


# ------------------------------------------------------------------------------------------------ pyDVL


def run_pydvl(P: Problem, method: str, opts: dict[str, Any]) -> Callable[[], tuple[np.ndarray, dict]]:
    import logging

    from pydvl.influence import InfluenceMode
    from pydvl.influence.torch import ArnoldiInfluence, CgInfluence, DirectInfluence, LissaInfluence
    from torch.utils.data import DataLoader, TensorDataset

    logging.getLogger("pydvl").setLevel(logging.ERROR)
    loader = DataLoader(TensorDataset(P.x, P.y), batch_size=P.n, shuffle=False)  # one full batch: exact H

    def call() -> tuple[np.ndarray, dict]:
        if method == "DirectInfluence":
            inf = DirectInfluence(P.model, mean_ce, regularization=P.shift)
        elif method == "CgInfluence":
            inf = CgInfluence(P.model, mean_ce, regularization=P.shift, rtol=opts["rtol"], atol=0.0,
                              maxiter=opts.get("maxiter", 10 * P.dim), solve_simultaneously=opts.get("block", True),
                              warn_on_max_iteration=False)
        elif method == "LissaInfluence":
            inf = LissaInfluence(P.model, mean_ce, regularization=P.shift, maxiter=opts["depth"], scale=opts["scale"],
                                 dampen=0.0, rtol=0.0, warn_on_max_iteration=False)
        elif method == "ArnoldiInfluence":
            inf = ArnoldiInfluence(P.model, mean_ce, regularization=P.shift, rank=opts["rank"],
                                   krylov_dimension=opts["arnoldi_dim"], tol=opts.get("tol", 1e-6))
        else:
            raise ValueError(f"unknown pyDVL method {method!r}")
        inf = inf.fit(loader)
        scores = inf.influences(P.xt, P.yt, P.x, P.y, mode=InfluenceMode.Up)  # [n_test, n_train]
        return (scores.detach().double() / P.n).numpy(), {}

    return call


# ------------------------------------------------------------------------------------------------ kronfluence


def run_kronfluence(P: Problem, method: str, opts: dict[str, Any]) -> Callable[[], tuple[np.ndarray, dict]]:
    """kronfluence 1.0.1's EK-FAC (``strategy="ekfac"``) or K-FAC: factors fitted on the training set, then pairwise
    scores ``[n_query, n_train]`` = ∇ℓ_tᵀ (F + r I)⁻¹ ∇ℓ_i with F its Kronecker-factored Fisher of the mean loss
    (covariances and the EK-FAC eigenvalues are averages over the data points: its task returns the summed loss of
    a batch) and r = ``damping_factor`` added to the eigenvalues. The L2 term is not in the factors (the loss sees
    only outputs), so r = λ + δ; the scores are then divided by n. ``fisher``: ``"mc"`` (its default: one label
    sampled from the model per point, seed 0) or ``"empirical"`` (the true labels). Every computation in the
    problem's dtype. The library writes its factors and scores to disk (a temporary directory): part of a call."""
    import logging
    import tempfile

    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task
    from torch.utils.data import TensorDataset

    logging.getLogger("kronfluence").setLevel(logging.ERROR)
    dtype = P.dtype

    class Classification(Task):
        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            logits = model(x)
            if sample:
                with torch.no_grad():
                    y = torch.multinomial(torch.softmax(logits.detach(), dim=1), 1).flatten()
            return nn.functional.cross_entropy(logits, y, reduction="sum")

        def compute_measurement(self, batch, model):
            x, y = batch
            return nn.functional.cross_entropy(model(x), y, reduction="sum")

    model = prepare_model(P.model, Classification())
    train, test = TensorDataset(P.x, P.y), TensorDataset(P.xt, P.yt)
    dtypes = dict(activation_covariance_dtype=dtype, gradient_covariance_dtype=dtype, lambda_dtype=dtype,
                  per_sample_gradient_dtype=dtype)
    factor_args = FactorArguments(strategy=method, use_empirical_fisher=opts.get("fisher") == "empirical", **dtypes)
    score_args = ScoreArguments(damping_factor=P.shift, per_sample_gradient_dtype=dtype, precondition_dtype=dtype,
                                score_dtype=dtype)

    def call() -> tuple[np.ndarray, dict]:
        torch.manual_seed(0)  # the labels its MC Fisher samples
        with tempfile.TemporaryDirectory() as out, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            analyzer = Analyzer("bench", model, Classification(), cpu=True, disable_tqdm=True, output_dir=out)
            analyzer.fit_all_factors("f", train, per_device_batch_size=P.n, factor_args=factor_args,
                                     overwrite_output_dir=True)
            analyzer.compute_pairwise_scores("s", "f", test, train, per_device_query_batch_size=P.xt.shape[0],
                                             per_device_train_batch_size=P.n, score_args=score_args,
                                             overwrite_output_dir=True)
            scores = analyzer.load_pairwise_scores("s")["all_modules"]  # [n_test, n_train]
        return (scores.detach().double() / P.n).numpy(), {}

    return call


RUNNERS = {"helpers": run_helpers, "captum": run_captum, "dattri": run_dattri, "pydvl": run_pydvl,
           "kronfluence": run_kronfluence}


# ------------------------------------------------------------------------------------------------ measurement


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def main(argv: list[str] | None = None) -> None:
    """Parse ``argv`` (default: the command line), run and time the method, write ``<out>.npy`` and ``<out>.json``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problem", required=True, type=Path)
    parser.add_argument("--library", required=True, choices=sorted(RUNNERS))
    parser.add_argument("--method", required=True)
    parser.add_argument("--options", default="{}")
    parser.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--slow", type=float, default=60.0,
                        help="a warm-up longer than this many seconds is not followed by timed calls: it is the time")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (the same for every library; the caller also sets OMP/MKL)")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    if args.library == "helpers" and str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    dtype = torch.float64 if args.dtype == "float64" else torch.float32
    # several peers allocate buffers with torch's default dtype (dattri's Arnoldi matrix and score matrix, captum's
    # identity): make it the problem's, or float64 runs would silently round through float32
    torch.set_default_dtype(dtype)
    torch.manual_seed(0)
    P = Problem(args.problem, dtype)
    opts = json.loads(args.options)
    call = RUNNERS[args.library](P, args.method, opts)

    reset_ok = _reset_peak()
    base = _status_kib("VmRSS")
    times = []
    t0 = time.perf_counter()
    values, info = call()  # warm-up; its answer is the one reported (every call computes the same)
    warm = time.perf_counter() - t0
    for _ in range(0 if warm > args.slow else args.repeats):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    peak = _status_kib("VmHWM")
    values = np.asarray(values, dtype=np.float64)
    expected = (P.xt.shape[0], P.n)
    if values.shape != expected:
        raise RuntimeError(f"{args.library}/{args.method} returned shape {values.shape}, expected {expected}")
    np.save(args.out.with_suffix(".npy"), values)
    result = {
        "seconds": statistics.median(times) if times else warm, "warmup_seconds": warm, "times": times,
        "peak_mib": (peak - base) / 1024 if reset_ok else None, "peak_method": "VmHWM-VmRSS" if reset_ok else None,
        "threads": torch.get_num_threads(), "dtype": args.dtype, "torch": torch.__version__, "numpy": np.__version__,
        "info": {k: (float(v) if isinstance(v, (int, float, np.floating)) else v) for k, v in info.items()},
        "loadavg_end": os.getloadavg(),
    }
    args.out.with_suffix(".json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
