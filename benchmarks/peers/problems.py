"""The two benchmark problems of issue 7, built with ``helpers`` and frozen to ``.npz`` files for every worker.

P1  ``mnist5k`` multinomial logistic regression, 784×10 weights, no bias, L2 λ = 0.01, no damping.
    θ̂: :func:`helpers.train.fit_to_tolerance` (L-BFGS, then Newton with the closed-form Hessian) to ‖∇R‖₂ < 1e-10.
    Reference: :func:`helpers.closed_form.removal_estimate` with ``method="exact"`` — the closed-form float64 Hessian
    (L2 term included), Cholesky-factored (relative residual ~1e-15).
P2  the same split, a 784-64-10 tanh MLP with biases (50,890 parameters), all-parameter influence with damping
    δ = 0.01 on top of an L2 term λ = 1e-3 (weak weight decay, so that θ̂ is a well-defined minimum).
    θ̂: :func:`helpers.train.fit` (cached), full-batch Adam (lr 1e-3, 2,000 epochs) from ``build(seed=0)``, then
    full-batch L-BFGS (strong Wolfe) from there to ‖∇R‖₂ < 1e-7 (or 3,000 iterations).
    Reference: :func:`helpers.influence.predict_removal`, exact Hessian-vector products, CG to a relative residual
    of 1e-10 on every test column, float64.

Both problems use the *same* 10 test points: the 10 highest-loss test points of P1's θ̂ (split ``seed=0``: 4,000
train / 1,000 test, standardised on the training part). Values are Δ_pred[t, i] of STUDY.md §1: the predicted
change of test loss t when training point i is removed, ``[10, 4000]``.

The files (``_build/bench/problems/P1.npz``, ``P2.npz``) hold plain arrays — data, parameters by name, reference —
so that the peers' workers (one of them in pyDVL's own numpy-1 environment) need neither ``helpers`` nor pickles.
A file is rebuilt when its spec (the dict below) changes or with ``--rebuild``.

Sizes: ``"full"`` is the benchmark above. ``"tiny"`` (:data:`TINY_SPECS`) builds the same two problems, by the same
code, on 200 training and 50 test images of sklearn's 8×8 ``digits`` (640 and 610 parameters, seconds to build):
``tests/test_bench_check.py`` runs every method of the harness on them inside ``make test``, so that a change of
the ``helpers`` API the harness calls, or of a library's conversion, fails there and not an hour into ``make
bench``. The tiny sizes use a stronger L2 term and damping (the Neumann series of LiSSA then converges at a
modest depth) and an exact (Cholesky) reference for P2, since their point is to check the conversions to
round-off, not to be hard.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from helpers import closed_form, data, models, train
from helpers.influence import predict_removal
from helpers.objective import model_params, per_sample_losses

ROOT = Path(__file__).resolve().parents[2]
PROBLEM_DIR = ROOT / "_build" / "bench" / "problems"
N_TEST_POINTS = 10

SIZES = ("full", "tiny")

SPECS: dict[str, dict[str, Any]] = {
    "P1": {
        "dataset": "mnist5k", "split_seed": 0, "model": "logistic_regression", "d_in": 784, "n_classes": 10,
        "bias": False, "l2": 0.01, "damping": 0.0, "fit": "helpers.train.fit_to_tolerance(tol=1e-10)",
        "reference": "helpers.closed_form.removal_estimate(method='exact'): closed-form Hessian, Cholesky, float64",
    },
    "P2": {
        "dataset": "mnist5k", "split_seed": 0, "model": "mlp", "d_in": 784, "n_classes": 10, "depth": 1,
        "width": 64, "activation": "tanh", "bias": True, "init_seed": 0, "l2": 1e-3, "damping": 0.01,
        "fit": "adam(lr=1e-3, epochs=2000, full batch) then lbfgs(tol=1e-7, max_iter=3000)",
        "reference": "helpers.influence.predict_removal(method='cg', rtol=1e-10): exact HVPs, float64",
    },
}

#: the tiny versions for the check inside ``make test`` (module docstring); "n_train"/"n_test" set the split
TINY_SPECS: dict[str, dict[str, Any]] = {
    "P1": {
        "size": "tiny", "dataset": "digits", "split_seed": 0, "n_train": 200, "n_test": 50,
        "model": "logistic_regression", "d_in": 64, "n_classes": 10, "bias": False, "l2": 0.1, "damping": 0.0,
        "fit": "helpers.train.fit_to_tolerance(tol=1e-10)",
        "reference": "helpers.closed_form.removal_estimate(method='exact'): closed-form Hessian, Cholesky, float64",
    },
    "P2": {
        "size": "tiny", "dataset": "digits", "split_seed": 0, "n_train": 200, "n_test": 50, "model": "mlp",
        "d_in": 64, "n_classes": 10, "depth": 1, "width": 8, "activation": "tanh", "bias": True, "init_seed": 0,
        "l2": 0.05, "damping": 0.2,
        "fit": "adam(lr=1e-2, epochs=50, full batch) then lbfgs(tol=1e-8, max_iter=3000)",
        "reference": "helpers.influence.predict_removal(method='exact'): dense Hessian, Cholesky, float64",
    },
}

# How P2's θ̂ is trained and its reference computed, per size (the spec's "fit" and "reference" say it in words).
_P2_FIT = {
    "full": ({"lr": 1e-3, "epochs": 2000}, {"tol": 1e-7, "max_iter": 3000}),
    "tiny": ({"lr": 1e-2, "epochs": 50}, {"tol": 1e-8, "max_iter": 3000}),
}
_P2_REFERENCE = {"full": {"method": "cg", "rtol": 1e-10}, "tiny": {"method": "exact"}}


def specs(size: str = "full") -> dict[str, dict[str, Any]]:
    """The problem specs of one size: :data:`SPECS` (``"full"``) or :data:`TINY_SPECS` (``"tiny"``)."""
    if size not in SIZES:
        raise ValueError(f"unknown problem size {size!r}: use one of {SIZES}")
    return SPECS if size == "full" else TINY_SPECS


def size_of(spec: dict[str, Any]) -> str:
    """The size a stored spec was built at (``"full"`` for files written before sizes existed)."""
    return str(spec.get("size", "full"))


def problem_path(name: str, size: str = "full", directory: Path | None = None) -> Path:
    """Where problem ``name`` ("P1" or "P2") of ``size`` is stored: ``<directory>/P1.npz`` (full) or
    ``P1-tiny.npz``; ``directory`` defaults to ``_build/bench/problems``."""
    specs(size)  # validates the size
    return (PROBLEM_DIR if directory is None else Path(directory)) / (f"{name}.npz" if size == "full"
                                                                      else f"{name}-{size}.npz")


def _test_points(split: data.Split, theta_p1: torch.Tensor) -> torch.Tensor:
    """Indices of the ``N_TEST_POINTS`` highest-loss test points under P1's θ̂ (descending loss)."""
    losses = closed_form.losses(split.x_test, split.y_test, theta_p1)
    return torch.argsort(losses, descending=True)[:N_TEST_POINTS]


def _p1(split: data.Split, spec: dict[str, Any]
        ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, dict[str, Any]]:
    full = size_of(spec) == "full"  # only the full problem's fit is worth the disk cache
    t0 = time.perf_counter()
    zeros = torch.zeros(split.n_classes, split.x_train.shape[1], dtype=split.x_train.dtype)
    fit = train.fit_to_tolerance(closed_form.model_at(zeros), split.x_train, split.y_train, l2=spec["l2"], tol=1e-10,
                                 cache=full)
    t_fit = time.perf_counter() - t0
    test_idx = _test_points(split, fit.theta)
    xt, yt = split.x_test[test_idx], split.y_test[test_idx]
    t0 = time.perf_counter()
    ref = closed_form.removal_estimate(split.x_train, split.y_train, xt, yt, fit.theta, l2=spec["l2"], method="exact")
    t_ref = time.perf_counter() - t0
    info = {"grad_norm": fit.grad_norm, "fit_seconds": t_fit, "reference_seconds": t_ref,
            "reference_residual": ref.solve.max_relative_residual}
    return {closed_form.PARAM_NAME: fit.theta}, test_idx, ref.values, info


def p2_model(spec: dict[str, Any] | None = None) -> torch.nn.Module:
    """The untrained P2 network, ``helpers.models.build("mlp", ...)`` at the spec's seed, float64 (default spec:
    the full P2)."""
    s = SPECS["P2"] if spec is None else spec
    return models.build("mlp", d_in=s["d_in"], n_classes=s["n_classes"], depth=s["depth"], width=s["width"],
                        activation=s["activation"], bias=s["bias"], seed=s["init_seed"], dtype=torch.float64)


def _p2(split: data.Split, test_idx: torch.Tensor, spec: dict[str, Any]
        ) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict[str, Any]]:
    size = size_of(spec)
    adam_opts, lbfgs_opts = _P2_FIT[size]
    model = p2_model(spec)
    x, y = split.x_train, split.y_train
    t0 = time.perf_counter()
    adam = train.Recipe(optimizer="adam", weight_decay=spec["l2"], **adam_opts)
    warm = train.fit(adam, model, x, y, progress=False, cache=size == "full")
    lbfgs = train.Recipe(optimizer="lbfgs", lr=1.0, weight_decay=spec["l2"], **lbfgs_opts)
    fit = train.fit(lbfgs, model, x, y, init=warm.params, progress=False, cache=size == "full")
    t_fit = time.perf_counter() - t0
    trained = train.model_with(model, fit.params)
    xt, yt = split.x_test[test_idx], split.y_test[test_idx]
    t0 = time.perf_counter()
    ref = predict_removal(trained, (x, y), (xt, yt), l2=spec["l2"], damping=spec["damping"],
                          **_P2_REFERENCE[size])
    t_ref = time.perf_counter() - t0
    with torch.no_grad():
        acc = float((trained(split.x_test).argmax(1) == split.y_test).double().mean())
        test_loss = float(per_sample_losses(trained, model_params(trained), split.x_test, split.y_test).mean())
    info = {"grad_norm": fit.grad_norm, "adam_grad_norm": warm.grad_norm, "lbfgs_iterations": len(fit.history) - 1,
            "fit_seconds": t_fit, "reference_seconds": t_ref, "reference_residual": ref.solve.max_relative_residual,
            "reference_cg_iterations": ref.solve.iterations, "test_accuracy": acc, "test_loss": test_loss}
    return model_params(trained), ref.values, info


def _save(path: Path, name: str, spec: dict[str, Any], split: data.Split, params: dict[str, torch.Tensor],
          test_idx: torch.Tensor, reference: torch.Tensor, info: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {
        "x_train": split.x_train.numpy(), "y_train": split.y_train.numpy(),
        "x_test": split.x_test[test_idx].numpy(), "y_test": split.y_test[test_idx].numpy(),
        "test_index": test_idx.numpy(), "reference": reference.detach().numpy(),
        "param_names": np.array(list(params)),
    }
    for k, v in params.items():
        arrays[f"param:{k}"] = v.detach().numpy()
    meta = {"name": name, "spec": spec, "info": info, "n_params": int(sum(v.numel() for v in params.values()))}
    arrays["meta"] = np.array(json.dumps(meta))
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)
    return path


def _current(path: Path, spec: dict[str, Any]) -> bool:
    if not path.exists():
        return False
    with np.load(path) as f:
        return json.loads(str(f["meta"]))["spec"] == spec


def build(names: tuple[str, ...] = ("P1", "P2"), rebuild: bool = False, log=print, *, size: str = "full",
          directory: Path | None = None) -> dict[str, Path]:
    """Build (or reuse) the named problems; returns their paths (:func:`problem_path`). Cost when missing, full
    size: P1 ~1 min, P2 tens of minutes (mostly training; the fits are cached by :mod:`helpers.cache`); tiny size
    (:data:`TINY_SPECS`, for the check in ``make test``): seconds, nothing cached."""
    table = specs(size)
    unknown = [k for k in names if k not in table]
    if unknown:
        raise ValueError(f"unknown problems {unknown}: use {list(table)}")
    path = {k: problem_path(k, size, directory) for k in table}
    todo = [k for k in names if rebuild or not _current(path[k], table[k])]
    if todo:
        s1 = table["P1"]
        split = data.load(s1["dataset"], seed=s1["split_seed"], n_train=s1.get("n_train"), n_test=s1.get("n_test"),
                          dtype=torch.float64)
        want = (s1.get("n_train", 4000), s1.get("n_test", 1000))
        if (split.n_train, split.n_test) != want:
            raise RuntimeError(f"expected the {want[0]:,}/{want[1]:,} {s1['dataset']} split, got "
                               f"{split.n_train}/{split.n_test}: did helpers.data.load change its default split?")
        # both problems use P1's 10 test points, so P1 comes first whenever anything is built
        if rebuild or not _current(path["P1"], s1):
            log(f"building P1 ({size}: logistic regression, exact reference) ...")
            p1_params, test_idx, p1_ref, p1_info = _p1(split, s1)
            _save(path["P1"], "P1", s1, split, p1_params, test_idx, p1_ref, p1_info)
            log(f"  P1: ‖∇R‖ = {p1_info['grad_norm']:.1e}, reference residual {p1_info['reference_residual']:.1e}")
        with np.load(path["P1"]) as f:
            test_idx = torch.from_numpy(f["test_index"])
        if "P2" in todo:
            log(f"building P2 ({size}: tanh MLP, Adam + L-BFGS; reference: {table['P2']['reference']}) ...")
            p2_params, p2_ref, p2_info = _p2(split, test_idx, table["P2"])
            _save(path["P2"], "P2", table["P2"], split, p2_params, test_idx, p2_ref, p2_info)
            log(f"  P2: ‖∇R‖ = {p2_info['grad_norm']:.1e}, test accuracy {p2_info['test_accuracy']:.3f}, reference "
                f"residual {p2_info['reference_residual']:.1e} after {p2_info['reference_cg_iterations']} solver "
                f"iterations ({p2_info['reference_seconds']:.0f} s)")
    for name in names:
        _add_lissa_scale(path[name], log)
    return {k: path[k] for k in names}


def _trained_model(arrays: dict[str, np.ndarray], spec: dict[str, Any]) -> torch.nn.Module:
    """The problem's helpers model (float64) with θ̂ loaded from the file's arrays."""
    if spec["model"] == "logistic_regression":
        model = models.build("logistic_regression", d_in=spec["d_in"], n_classes=spec["n_classes"],
                             dtype=torch.float64)
    else:
        model = p2_model(spec)
    model.load_state_dict({str(k): torch.from_numpy(arrays[f"param:{k}"]) for k in arrays["param_names"]})
    return model


def truncated_reference(path: Path, rank: int) -> np.ndarray:
    """Δ_pred ``[n_test, n_train]`` with (H + δI)⁻¹ replaced by Σ_{j ≤ rank} v_j v_jᵀ / (λ_j + δ) over the
    ``rank`` largest eigenpairs of H, from the dense Hessian (float64, ``torch.linalg.eigh``).

    Every Arnoldi method of the benchmark (helpers', captum's, dattri's, pyDVL's) returns this once its Krylov
    space has converged those eigenpairs, so it is the reference that checks their conversions on the tiny
    problems, where a low-rank method cannot approach the full inverse. Forms the d×d Hessian: refused above
    d = 5,000 parameters (the full problems)."""
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    meta = json.loads(str(arrays["meta"]))
    if meta["n_params"] > 5000:
        raise ValueError(f"{path.name} has {meta['n_params']:,} parameters: the dense truncated reference is for "
                         "the tiny problems (build them with size='tiny')")
    from helpers.curvature import hessian_operator
    from helpers.influence import per_sample_grads

    spec = meta["spec"]
    model = _trained_model(arrays, spec)
    params = model_params(model)
    x, y = torch.from_numpy(arrays["x_train"]), torch.from_numpy(arrays["y_train"])
    xt, yt = torch.from_numpy(arrays["x_test"]), torch.from_numpy(arrays["y_test"])
    hessian = hessian_operator(model, params, x, y, l2=spec["l2"]).dense()
    vals, vecs = torch.linalg.eigh((hessian + hessian.T) / 2)
    top, basis = vals[-rank:], vecs[:, -rank:]
    g_test = per_sample_grads(model, params, xt, yt)  # [n_test, d]
    g_train = per_sample_grads(model, params, x, y)  # [n_train, d]
    solved = basis @ ((basis.T @ g_test.T) / (top + spec["damping"])[:, None])  # [d, n_test]
    return ((g_train @ solved).T / x.shape[0]).numpy()


def kronecker_reference(path: Path, kind: str = "ekfac", fisher: str = "type-2") -> np.ndarray:
    """Δ_pred ``[n_test, n_train]`` with (H + δI)⁻¹ replaced by (K + (λ + δ)I)⁻¹, K the K-FAC or EK-FAC of
    :func:`helpers.kronecker.kronecker_factors` (``fisher`` "type-2" or "empirical"), from per-sample gradients.

    What an EK-FAC method converges to: the tiny check of ``make test`` compares kronfluence's EK-FAC with the
    empirical Fisher (deterministic) against it, which checks that library's conversion to round-off."""
    from helpers.influence import per_sample_grads
    from helpers.kronecker import kronecker_factors

    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    spec = json.loads(str(arrays["meta"]))["spec"]
    model = _trained_model(arrays, spec)
    params = model_params(model)
    x, y = torch.from_numpy(arrays["x_train"]), torch.from_numpy(arrays["y_train"])
    xt, yt = torch.from_numpy(arrays["x_test"]), torch.from_numpy(arrays["y_test"])
    factors = kronecker_factors(model, params, x, y, l2=spec["l2"], kind=kind, fisher=fisher)
    solved = factors.inverse(per_sample_grads(model, params, xt, yt).T.contiguous(), spec["damping"])  # [d, n_test]
    return ((per_sample_grads(model, params, x, y) @ solved).T / x.shape[0]).numpy()


def _add_lissa_scale(path: Path, log) -> None:
    """Store the LiSSA scale every library uses: s = 1.1·λ_max(H + δI) rounded up to two digits (Lanczos on
    helpers' operator), so that the Neumann series converges at the same rate in every library."""
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    meta = json.loads(str(arrays["meta"]))
    if "lissa_scale" in meta["info"]:
        return
    from helpers.curvature import extreme_eigenvalues, hessian_operator

    spec, name = meta["spec"], meta["name"]
    x, y = torch.from_numpy(arrays["x_train"]), torch.from_numpy(arrays["y_train"])
    model = _trained_model(arrays, spec)
    op = hessian_operator(model, model_params(model), x, y, l2=spec["l2"], linearize=True)
    top = float(extreme_eigenvalues(op, 1, "LA", tol=1e-4)[0]) + spec["damping"]
    scale = float(f"{1.1 * top:.1e}")
    scale = scale if scale >= 1.1 * top else float(f"{1.1 * top * 1.05:.1e}")
    meta["info"]["lambda_max"] = top
    meta["info"]["lissa_scale"] = scale
    arrays["meta"] = np.array(json.dumps(meta))
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)
    log(f"  {name}: λ_max(H + δI) = {top:.4g}, LiSSA scale {scale:g}")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="build the benchmark problems P1 and P2")
    parser.add_argument("--rebuild", action="store_true")
    parser.add_argument("--size", default="full", choices=SIZES)
    parser.add_argument("--directory", type=Path, default=None, help="where to write (default _build/bench/problems)")
    parser.add_argument("names", nargs="*", default=["P1", "P2"])
    args = parser.parse_args()
    for k, p in build(tuple(args.names), args.rebuild, size=args.size, directory=args.directory).items():
        print(k, p)
