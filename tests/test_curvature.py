"""helpers.curvature against dense answers, float64, tiny problems."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from helpers.curvature import (
    CurvatureOperator,
    extreme_eigenvalues,
    hessian_operator,
    spectrum_summary,
)
from helpers.objective import model_params, objective, param_names
from tiny_models import TinyMLP

DT = torch.float64


def make_problem(seed: int = 0, n: int = 24, loss: str = "cross_entropy"):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = TinyMLP().to(DT)
    x = torch.randn(n, 4, generator=g, dtype=DT)
    if loss == "cross_entropy":
        y = torch.randint(3, (n,), generator=g)
    else:
        y = torch.randn(n, 3, generator=g, dtype=DT)
    return model, x, y


def flat_objective(model, names, x, y, **kw):
    """R as a function of one flat vector, written independently of CurvatureOperator.unflatten."""
    P = model_params(model, names)
    shapes = [p.shape for p in P.values()]
    sizes = [p.numel() for p in P.values()]

    def f(flat):
        parts = torch.split(flat, sizes)
        return objective(model, {k: t.reshape(s) for k, t, s in zip(P, parts, shapes)}, x, y, **kw)

    return f, torch.cat([p.reshape(-1) for p in P.values()])


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


@pytest.mark.parametrize(
    "which, weighted, linearize",
    [("all", False, None), ("all", True, True), ("last", True, None), ("last", False, True)],
)
def test_hvp_matches_dense_hessian(which, weighted, linearize):
    model, x, y = make_problem()
    names = param_names(model, which)
    P = model_params(model, names)
    weights = torch.rand(x.shape[0], generator=torch.Generator().manual_seed(1), dtype=DT) if weighted else None
    kw = dict(weights=weights, l2=0.03, loss="cross_entropy")
    op = hessian_operator(model, P, x, y, linearize=linearize, **kw)
    f, theta = flat_objective(model, names, x, y, **kw)
    H_fwd_rev = torch.func.hessian(f)(theta)
    H_rev_rev = torch.autograd.functional.hessian(f, theta)  # an independent (reverse-over-reverse) path
    assert op.dim == theta.numel() == H_fwd_rev.shape[0]
    assert torch.allclose(op.flatten(P), theta, rtol=0, atol=0)
    assert rel(H_rev_rev, H_fwd_rev) < 1e-12
    v = torch.randn(op.dim, generator=torch.Generator().manual_seed(2), dtype=DT)
    V = torch.randn(op.dim, 3, generator=torch.Generator().manual_seed(3), dtype=DT)
    assert rel(op.matvec(v), H_rev_rev @ v) < 1e-10
    assert rel(op.matmat(V), H_rev_rev @ V) < 1e-10
    assert rel(op.dense(), H_rev_rev) < 1e-10
    for _ in range(25):  # past LINEARIZE_AFTER: the default operator switches to its traced product
        op.matvec(v)
    assert rel(op.matvec(v), H_rev_rev @ v) < 1e-10 and rel(op.matmat(V), H_rev_rev @ V) < 1e-10
    # the L2 term is really in there: λI is the difference to the λ = 0 operator
    op0 = hessian_operator(model, P, x, y, weights=weights, l2=0.0)
    assert rel(op.matvec(v) - op0.matvec(v), 0.03 * v) < 1e-10


def test_flatten_unflatten_roundtrip_in_dict_order():
    model, x, y = make_problem()
    P = model_params(model, param_names(model, "all"))
    op = hessian_operator(model, P, x, y)
    vec = torch.arange(op.dim, dtype=DT)
    back = op.unflatten(vec)
    assert list(back) == list(P) and [t.shape for t in back.values()] == [p.shape for p in P.values()]
    assert torch.equal(back["hidden.weight"].reshape(-1), vec[:20])
    assert torch.equal(op.flatten(back), vec)
    with pytest.raises(ValueError, match="shape"):
        op.unflatten(vec[:-1])


def dense_gauss_newton(model, names, x, y, loss, l2, weights=None):
    """Σ_i w_i J_iᵀ H_out,i J_i + λI built from the full Jacobian."""
    P = model_params(model, names)
    shapes = [p.shape for p in P.values()]
    sizes = [p.numel() for p in P.values()]
    theta = torch.cat([p.reshape(-1) for p in P.values()])

    def outputs(flat):
        parts = torch.split(flat, sizes)
        return torch.func.functional_call(model, {k: t.reshape(s) for k, t, s in zip(P, parts, shapes)}, (x,))

    J = torch.func.jacrev(outputs)(theta).detach()  # [n, c, d]
    out = outputs(theta).detach()
    n, c = out.shape
    if loss == "cross_entropy":
        p = torch.softmax(out, dim=1)
        H_out = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    else:
        H_out = torch.eye(c, dtype=DT).expand(n, c, c)
    w = torch.full((n,), 1.0 / n, dtype=DT) if weights is None else weights
    G = torch.einsum("i,icd,ice,ief->df", w, J, H_out, J)
    return G + l2 * torch.eye(theta.numel(), dtype=DT)


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
@pytest.mark.parametrize("which", ["all", "last"])
def test_gauss_newton_matches_dense_jt_h_j(loss, which):
    model, x, y = make_problem(seed=4, loss=loss)
    names = param_names(model, which)
    weights = torch.rand(x.shape[0], generator=torch.Generator().manual_seed(5), dtype=DT)
    G_ref = dense_gauss_newton(model, names, x, y, loss, l2=0.02, weights=weights)
    for linearize in (False, True):
        op = hessian_operator(
            model, model_params(model, names), x, y, weights=weights, l2=0.02, loss=loss, kind="gauss_newton",
            linearize=linearize,
        )
        v = torch.randn(op.dim, generator=torch.Generator().manual_seed(6), dtype=DT)
        assert rel(op.matvec(v), G_ref @ v) < 1e-10
        assert rel(op.dense(), G_ref) < 1e-10
    assert float(torch.linalg.eigvalsh(0.5 * (G_ref + G_ref.T))[0]) >= 0.02 - 1e-10  # G + λI ⪰ λI


def test_gauss_newton_equals_hessian_for_linear_least_squares():
    torch.manual_seed(7)
    model = nn.Linear(4, 2).to(DT)
    x = torch.randn(15, 4, dtype=DT)
    y = torch.randn(15, 2, dtype=DT)
    P = model_params(model)
    H = hessian_operator(model, P, x, y, loss="mse", l2=0.1).dense()
    G = hessian_operator(model, P, x, y, loss="mse", l2=0.1, kind="gauss_newton").dense()
    assert rel(G, H) < 1e-12


def test_lanczos_extremes_match_dense_eigvalsh():
    model, x, y = make_problem(seed=8)
    op = hessian_operator(model, model_params(model), x, y, l2=0.01)
    H = op.dense()
    evals = torch.linalg.eigvalsh(0.5 * (H + H.T))
    scale = float(evals.abs().max())
    top = extreme_eigenvalues(op, 1, "LA")
    bottom = extreme_eigenvalues(op, 1, "SA")
    assert abs(float(top[0]) - float(evals[-1])) < 1e-10 * scale
    assert abs(float(bottom[0]) - float(evals[0])) < 1e-10 * scale
    vals3, vecs3 = extreme_eigenvalues(op, 3, "LA", return_eigenvectors=True)
    assert torch.allclose(vals3, evals[-3:], atol=1e-10 * scale, rtol=0)
    assert torch.allclose(H @ vecs3, vecs3 * vals3, atol=1e-8 * scale, rtol=0)
    dense_vals = extreme_eigenvalues(op, 2, "SA", method="dense")
    assert torch.allclose(dense_vals, evals[:2], atol=1e-12 * scale, rtol=0)
    for method in ("lanczos", "dense"):
        s = spectrum_summary(op, method=method)
        assert abs(s.top - float(evals[-1])) < 1e-10 * scale and abs(s.bottom - float(evals[0])) < 1e-10 * scale
    assert spectrum_summary(op, method="dense").n_negative == int((evals < -1e-10 * scale).sum())


def test_to_scipy_is_the_same_operator_in_float64_numpy():
    model, x, y = make_problem(seed=9)
    op = hessian_operator(model, model_params(model, param_names(model, "last")), x, y, l2=0.05)
    lin = op.to_scipy()
    v = np.random.default_rng(0).standard_normal((op.dim, 2))
    assert lin.shape == (op.dim, op.dim) and lin.dtype == np.float64
    ref = op.dense().numpy() @ v
    assert np.allclose(lin.matvec(v[:, 0]), ref[:, 0], rtol=1e-12, atol=1e-14)
    assert np.allclose(lin.matmat(v), ref, rtol=1e-12, atol=1e-14)


def test_from_matrix_and_application_counter():
    A = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=DT)
    op = CurvatureOperator.from_matrix(A)
    assert op.dim == 2 and torch.equal(op.dense(), A)
    op.matmat(torch.eye(2, dtype=DT))
    op.matvec(torch.ones(2, dtype=DT))
    assert op.applications == 3


def test_bad_inputs_raise_clear_errors():
    model, x, y = make_problem()
    P = model_params(model)
    with pytest.raises(TypeError, match="float32"):
        hessian_operator(model, P, x.float(), y)
    with pytest.raises(ValueError, match="same number of rows"):
        hessian_operator(model, P, x[:-1], y)
    with pytest.raises(TypeError, match="integer class labels"):
        hessian_operator(model, P, x, y.to(DT))
    with pytest.raises(ValueError, match="weights"):
        hessian_operator(model, P, x, y, weights=torch.ones(3, dtype=DT))
    with pytest.raises(ValueError, match="kind"):
        hessian_operator(model, P, x, y, kind="fisher")
    bad = dict(P)
    bad["hidden.bias"] = bad["hidden.bias"].clone()
    bad["hidden.bias"][0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        hessian_operator(model, bad, x, y)
    with pytest.raises(ValueError, match="non-finite"):  # finite data, overflowing loss
        hessian_operator(model, P, x, torch.full((x.shape[0], 3), 1e200, dtype=DT), loss="mse")
    op = hessian_operator(model, P, x, y)
    with pytest.raises(TypeError, match="float32"):
        op.matvec(torch.zeros(op.dim, dtype=torch.float32))
    with pytest.raises(ValueError, match="shape"):
        op.matvec(torch.zeros(op.dim + 1, dtype=DT))
    with pytest.raises(ValueError, match="which"):
        extreme_eigenvalues(op, 1, "BE")


def test_astype_rebuilds_the_same_matrix_in_another_dtype():
    model, x, y = make_problem(seed=3)
    P = model_params(model, param_names(model, "last"))
    w = torch.rand(x.shape[0], generator=torch.Generator().manual_seed(4), dtype=DT)
    op = hessian_operator(model, P, x, y, weights=w, l2=0.02)
    op32 = op.astype(torch.float32)
    assert op32.dtype == torch.float32 and op32.dim == op.dim and op32.names == op.names
    assert op.astype(DT) is op
    H = op.dense()
    assert rel(op32.dense().double(), H) < 1e-5  # float32 rounding only: same weights, λ, subset, data
    assert next(model.parameters()).dtype == DT  # the caller's module is untouched (a cast copy is used)
    M = CurvatureOperator.from_matrix(H).astype(torch.float32)
    assert M.kind == "matrix" and torch.equal(M.dense(), H.float())
    with pytest.raises(TypeError, match="floating torch dtype"):
        op.astype(torch.int64)


def test_astype_casts_attribute_based_subclasses_and_refuses_closures():
    class Diag(CurvatureOperator):  # product reads its tensor from an attribute, like convex's closed form
        def __init__(self, d: torch.Tensor) -> None:
            self._d = d
            super().__init__(self._product, {"x": d}, kind="hessian")

        def _product(self, v: torch.Tensor) -> torch.Tensor:
            return self._d * v

    d = torch.linspace(1, 2, 5, dtype=DT)
    op = Diag(d)
    op32 = op.astype(torch.float32)
    v = torch.arange(5, dtype=torch.float32)
    assert op32.matvec(v).dtype == torch.float32 and torch.equal(op32.matvec(v), d.float() * v)
    assert op._d.dtype == DT and op.matvec(v.double()).dtype == DT  # the original is unchanged
    closure = CurvatureOperator(lambda u: d * u.double(), {"x": d}, kind="hessian")
    with pytest.raises(NotImplementedError, match="low_precision=op32"):
        closure.astype(torch.float32)


def test_expect_traces_the_product_up_front_for_long_runs():
    """A caller that announces LINEARIZE_AFTER or more products gets the traced product at once (same numbers);
    fewer, or an operator that was asked for plain products, keeps the plain jvp."""
    from helpers.curvature import LINEARIZE_AFTER, lanczos_ritz

    model, x, y = make_problem()
    P = model_params(model, param_names(model, "all"))
    v = torch.randn(sum(p.numel() for p in P.values()), generator=torch.Generator().manual_seed(2), dtype=DT)
    op = hessian_operator(model, P, x, y, l2=0.03)
    plain = op._apply
    op.expect(LINEARIZE_AFTER - 1)
    assert op._apply is plain
    before = op.matvec(v)
    op.expect(LINEARIZE_AFTER)
    assert op._apply is not plain and op._upgrade is None
    assert rel(op.matvec(v), before) < 1e-12
    fixed = hessian_operator(model, P, x, y, l2=0.03, linearize=False)
    fixed_apply = fixed._apply
    fixed.expect(1000)
    assert fixed._apply is fixed_apply
    # lanczos_ritz: an orthonormal basis, Ritz values inside the spectrum, the extremes already close
    vals, vecs = lanczos_ritz(op, 12)
    H = op.dense()
    ev = torch.linalg.eigvalsh(0.5 * (H + H.T))
    assert torch.allclose(vecs.T @ vecs, torch.eye(vecs.shape[1], dtype=DT), atol=1e-12)
    assert float(vals.min()) >= float(ev[0]) - 1e-10 and float(vals.max()) <= float(ev[-1]) + 1e-10
    assert abs(float(vals.max()) - float(ev[-1])) < 1e-6 * abs(float(ev[-1]))


@pytest.mark.parametrize("kind, loss, weighted", [("hessian", "cross_entropy", True), ("hessian", "mse", False),
                                                  ("gauss_newton", "cross_entropy", False),
                                                  ("gauss_newton", "mse", True)])
def test_products_over_row_blocks_and_column_chunks_match_the_dense_answer(kind, loss, weighted, monkeypatch):
    """Memory bounded: the product summed over blocks of rows (set explicitly, or forced by a tiny BOOK_MEMORY_GB)
    and the columns vmapped in chunks give the dense curvature of the whole objective — the reverse-over-reverse
    Hessian, or Jᵀ H_out J assembled by hand for Gauss–Newton."""
    model, x, y = make_problem(n=23, loss=loss)
    names = param_names(model, "all")
    P = model_params(model, names)
    weights = torch.rand(x.shape[0], generator=torch.Generator().manual_seed(1), dtype=DT) if weighted else None
    kw = dict(weights=weights, l2=0.03, loss=loss)
    f, theta = flat_objective(model, names, x, y, **kw)
    if kind == "hessian":
        dense = torch.autograd.functional.hessian(f, theta)
    else:
        shapes, sizes = [p.shape for p in P.values()], [p.numel() for p in P.values()]

        def out(flat):
            return torch.func.functional_call(model, {k: t.reshape(s) for k, t, s in
                                                      zip(P, torch.split(flat, sizes), shapes)}, (x,))

        J = torch.autograd.functional.jacobian(out, theta)  # [n, c, d]
        w = weights if weighted else torch.full((x.shape[0],), 1.0 / x.shape[0], dtype=DT)
        if loss == "cross_entropy":
            p = torch.softmax(out(theta), dim=-1)
            h_out = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
        else:
            h_out = torch.eye(3, dtype=DT).expand(x.shape[0], 3, 3)
        dense = torch.einsum("n,ncd,nce,nef->df", w, J, h_out, J) + 0.03 * torch.eye(theta.numel(), dtype=DT)
    blocked = hessian_operator(model, P, x, y, kind=kind, row_block=5, **kw)
    assert blocked.row_blocks == 5 and blocked._upgrade is None  # 23 rows in blocks of 5, never traced
    V = torch.randn(blocked.dim, 4, generator=torch.Generator().manual_seed(3), dtype=DT)
    assert rel(blocked.matmat(V), dense @ V) < 1e-10
    assert rel(blocked.dense(chunk_size=3), dense) < 1e-10
    # a budget far below one product over all rows: the operator blocks its rows and vmaps one column at a time
    monkeypatch.setenv("BOOK_MEMORY_GB", "1e-6")
    tiny = hessian_operator(model, P, x, y, kind=kind, **kw)
    assert tiny.row_blocks > 1 and tiny.column_chunk(blocked.dim) == 1
    assert rel(tiny.dense(), dense) < 1e-10
    monkeypatch.delenv("BOOK_MEMORY_GB")
    whole = hessian_operator(model, P, x, y, kind=kind, **kw)
    assert whole.row_blocks == 1 and whole.product_bytes > 0 and whole.column_chunk(whole.dim) >= 1
    assert rel(whole.dense(), dense) < 1e-10


def test_labels_past_the_models_classes_and_wrong_feature_counts_are_named():
    """Not a raw IndexError / matmul error from inside torch: one line naming the data and the fix."""
    model, x, y = make_problem()
    P = model_params(model, param_names(model, "all"))
    with pytest.raises(ValueError, match=r"train losses \(IndexError: .*\): check that train y holds class indices "
                                         r"0 … C−1 for the model's C outputs") as info:
        hessian_operator(model, P, x, torch.where(y == 2, 3, y))
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match=r"train x \(5,\) has the features the model was built for"):
        hessian_operator(model, P, torch.cat([x, x[:, :1]], 1), y)
