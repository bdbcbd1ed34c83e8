"""The two benchmark problems of issue 7, built with ``helpers`` and frozen to ``.npz`` files for every worker.

P1  ``mnist5k`` multinomial logistic regression, 784×10 weights, no bias, L2 λ = 0.01, no damping.
    θ̂: :func:`helpers.convex.fit` (L-BFGS, then Newton with the closed-form Hessian) to ‖∇R‖₂ < 1e-10.
    Reference: :func:`helpers.convex.predict_removal` with ``method="exact"`` — the closed-form float64 Hessian
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
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from helpers import convex, data, models, train
from helpers.influence import predict_removal
from helpers.objective import model_params, per_sample_losses

ROOT = Path(__file__).resolve().parents[2]
PROBLEM_DIR = ROOT / "_build" / "bench" / "problems"
N_TEST_POINTS = 10

SPECS: dict[str, dict[str, Any]] = {
    "P1": {
        "dataset": "mnist5k", "split_seed": 0, "model": "logistic_regression", "d_in": 784, "n_classes": 10,
        "bias": False, "l2": 0.01, "damping": 0.0, "fit": "helpers.convex.fit(tol=1e-10)",
        "reference": "helpers.convex.predict_removal(method='exact'): closed-form Hessian, Cholesky, float64",
    },
    "P2": {
        "dataset": "mnist5k", "split_seed": 0, "model": "mlp", "d_in": 784, "n_classes": 10, "depth": 1,
        "width": 64, "activation": "tanh", "bias": True, "init_seed": 0, "l2": 1e-3, "damping": 0.01,
        "fit": "adam(lr=1e-3, epochs=2000, full batch) then lbfgs(tol=1e-7, max_iter=3000)",
        "reference": "helpers.influence.predict_removal(method='cg', rtol=1e-10): exact HVPs, float64",
    },
}


def problem_path(name: str) -> Path:
    """Where problem ``name`` ("P1" or "P2") is stored."""
    return PROBLEM_DIR / f"{name}.npz"


def _test_points(split: data.Split, theta_p1: torch.Tensor) -> torch.Tensor:
    """Indices of the ``N_TEST_POINTS`` highest-loss test points under P1's θ̂ (descending loss)."""
    losses = convex.test_losses(split.x_test, split.y_test, theta_p1)
    return torch.argsort(losses, descending=True)[:N_TEST_POINTS]


def _p1(split: data.Split) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, dict[str, Any]]:
    spec = SPECS["P1"]
    t0 = time.perf_counter()
    fit = convex.fit(split.x_train, split.y_train, l2=spec["l2"], tol=1e-10, cache=True)
    t_fit = time.perf_counter() - t0
    test_idx = _test_points(split, fit.theta)
    xt, yt = split.x_test[test_idx], split.y_test[test_idx]
    t0 = time.perf_counter()
    ref = convex.predict_removal(split.x_train, split.y_train, xt, yt, fit.theta, l2=spec["l2"], method="exact")
    t_ref = time.perf_counter() - t0
    info = {"grad_norm": fit.grad_norm, "fit_seconds": t_fit, "reference_seconds": t_ref,
            "reference_residual": ref.solve.max_relative_residual}
    return {convex.PARAM_NAME: fit.theta}, test_idx, ref.values, info


def p2_model() -> torch.nn.Module:
    """The untrained P2 network, ``helpers.models.build("mlp", ...)`` at the spec's seed, float64."""
    s = SPECS["P2"]
    return models.build("mlp", d_in=s["d_in"], n_classes=s["n_classes"], depth=s["depth"], width=s["width"],
                        activation=s["activation"], bias=s["bias"], seed=s["init_seed"], dtype=torch.float64)


def _p2(split: data.Split, test_idx: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict[str, Any]]:
    spec = SPECS["P2"]
    model = p2_model()
    x, y = split.x_train, split.y_train
    t0 = time.perf_counter()
    adam = train.Recipe(optimizer="adam", lr=1e-3, epochs=2000, weight_decay=spec["l2"])
    warm = train.fit(adam, model, x, y, progress=False, cache=True)
    lbfgs = train.Recipe(optimizer="lbfgs", lr=1.0, tol=1e-7, max_iter=3000, weight_decay=spec["l2"])
    fit = train.fit(lbfgs, model, x, y, init=warm.params, progress=False, cache=True)
    t_fit = time.perf_counter() - t0
    trained = train.model_with(model, fit.params)
    xt, yt = split.x_test[test_idx], split.y_test[test_idx]
    t0 = time.perf_counter()
    ref = predict_removal(trained, (x, y), (xt, yt), l2=spec["l2"], method="cg", damping=spec["damping"],
                          rtol=1e-10)
    t_ref = time.perf_counter() - t0
    with torch.no_grad():
        acc = float((trained(split.x_test).argmax(1) == split.y_test).double().mean())
        test_loss = float(per_sample_losses(trained, model_params(trained), split.x_test, split.y_test).mean())
    info = {"grad_norm": fit.grad_norm, "adam_grad_norm": warm.grad_norm, "lbfgs_iterations": len(fit.history) - 1,
            "fit_seconds": t_fit, "reference_seconds": t_ref, "reference_residual": ref.solve.max_relative_residual,
            "reference_cg_iterations": ref.solve.iterations, "test_accuracy": acc, "test_loss": test_loss}
    return model_params(trained), ref.values, info


def _save(name: str, split: data.Split, params: dict[str, torch.Tensor], test_idx: torch.Tensor,
          reference: torch.Tensor, info: dict[str, Any]) -> Path:
    path = problem_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {
        "x_train": split.x_train.numpy(), "y_train": split.y_train.numpy(),
        "x_test": split.x_test[test_idx].numpy(), "y_test": split.y_test[test_idx].numpy(),
        "test_index": test_idx.numpy(), "reference": reference.detach().numpy(),
        "param_names": np.array(list(params)),
    }
    for k, v in params.items():
        arrays[f"param:{k}"] = v.detach().numpy()
    meta = {"name": name, "spec": SPECS[name], "info": info, "n_params": int(sum(v.numel() for v in params.values()))}
    arrays["meta"] = np.array(json.dumps(meta))
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)
    return path


def _current(name: str) -> bool:
    path = problem_path(name)
    if not path.exists():
        return False
    with np.load(path) as f:
        return json.loads(str(f["meta"]))["spec"] == SPECS[name]


def build(names: tuple[str, ...] = ("P1", "P2"), rebuild: bool = False, log=print) -> dict[str, Path]:
    """Build (or reuse) the named problems; returns their paths. Cost when missing: P1 ~1 min, P2 tens of minutes
    (mostly training; the fits are cached by :mod:`helpers.cache`)."""
    unknown = [k for k in names if k not in SPECS]
    if unknown:
        raise ValueError(f"unknown problems {unknown}: use {list(SPECS)}")
    todo = [k for k in names if rebuild or not _current(k)]
    if todo:
        split = data.load(SPECS["P1"]["dataset"], seed=SPECS["P1"]["split_seed"], dtype=torch.float64)
        if split.n_train != 4000 or split.n_test != 1000:
            raise RuntimeError(f"expected the 4,000/1,000 mnist5k split, got {split.n_train}/{split.n_test}")
        # both problems use P1's 10 test points, so P1 comes first whenever anything is built
        if rebuild or not _current("P1"):
            log("building P1 (logistic regression, exact reference) ...")
            p1_params, test_idx, p1_ref, p1_info = _p1(split)
            _save("P1", split, p1_params, test_idx, p1_ref, p1_info)
            log(f"  P1: ‖∇R‖ = {p1_info['grad_norm']:.1e}, reference residual {p1_info['reference_residual']:.1e}")
        with np.load(problem_path("P1")) as f:
            test_idx = torch.from_numpy(f["test_index"])
        if "P2" in todo:
            log("building P2 (tanh MLP: Adam + L-BFGS, CG reference to 1e-10) ...")
            p2_params, p2_ref, p2_info = _p2(split, test_idx)
            _save("P2", split, p2_params, test_idx, p2_ref, p2_info)
            log(f"  P2: ‖∇R‖ = {p2_info['grad_norm']:.1e}, test accuracy {p2_info['test_accuracy']:.3f}, reference "
                f"residual {p2_info['reference_residual']:.1e} after {p2_info['reference_cg_iterations']} CG "
                f"iterations ({p2_info['reference_seconds']:.0f} s)")
    for name in names:
        _add_lissa_scale(name, log)
    return {k: problem_path(k) for k in names}


def _add_lissa_scale(name: str, log) -> None:
    """Store the LiSSA scale every library uses: s = 1.1·λ_max(H + δI) rounded up to two digits (Lanczos on
    helpers' operator), so that the Neumann series converges at the same rate in every library."""
    path = problem_path(name)
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    meta = json.loads(str(arrays["meta"]))
    if "lissa_scale" in meta["info"]:
        return
    from helpers.curvature import extreme_eigenvalues, hessian_operator

    spec = meta["spec"]
    x, y = torch.from_numpy(arrays["x_train"]), torch.from_numpy(arrays["y_train"])
    if name == "P1":
        model = models.build("logistic_regression", d_in=spec["d_in"], n_classes=spec["n_classes"],
                             dtype=torch.float64)
    else:
        model = p2_model()
    model.load_state_dict({str(k): torch.from_numpy(arrays[f"param:{k}"]) for k in arrays["param_names"]})
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
    parser.add_argument("names", nargs="*", default=["P1", "P2"])
    args = parser.parse_args()
    for k, p in build(tuple(args.names), args.rebuild).items():
        print(k, p)
