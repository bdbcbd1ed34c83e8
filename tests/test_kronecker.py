"""K-FAC and EK-FAC (helpers.kronecker) against closed-form facts of the Gauss–Newton matrix, float64.

* one data point and one layer: the Gauss–Newton block is exactly A ⊗ G, so K-FAC = EK-FAC = GN to round-off;
* any data, any depth, convolutions too: EK-FAC's diagonal is, by construction, the diagonal of the exact
  Gauss–Newton matrix in the Kronecker eigenbasis — checked entry by entry against the dense GN matrix;
* the damped inverse is exact; as a CG preconditioner it changes the iterations, never the answer.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from helpers import models
from helpers.curvature import hessian_operator
from helpers.influence import per_sample_grads, predict_removal
from helpers.kronecker import kronecker_factors
from helpers.objective import model_params

F64 = torch.float64


def _mlp() -> nn.Module:
    return models.build("mlp", d_in=5, n_classes=3, depth=1, width=4, activation="tanh", bias=True, seed=0,
                        dtype=F64)


def _cnn() -> nn.Module:
    return models.small_cnn(in_channels=1, n_classes=3, width=2, input_size=8, dtype=F64)


def _data(n: int, d_in: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_in, generator=g, dtype=F64), torch.randint(0, 3, (n,), generator=g)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
def test_one_point_one_layer_is_exactly_gauss_newton(bias, kind):
    model = models.build("logistic_regression", d_in=4, n_classes=3, bias=bias, dtype=F64)
    torch.nn.init.normal_(model.linear.weight, generator=torch.Generator().manual_seed(1))
    x, y = _data(1, 4)
    P = model_params(model)
    K = kronecker_factors(model, P, x, y, kind=kind, l2=0.3)
    gn = hessian_operator(model, P, x, y, kind="gauss_newton", l2=0.3).dense()
    assert torch.allclose(K.dense(), gn, rtol=0, atol=1e-14 * float(gn.abs().max()))


def test_empirical_fisher_of_one_point_is_the_gradient_outer_product():
    model = _mlp()
    x, y = _data(1, 5)
    P = model_params(model, ["net.2.weight", "net.2.bias"])
    K = kronecker_factors(model, P, x, y, kind="kfac", fisher="empirical")
    g = per_sample_grads(model, P, x, y)[0]
    assert torch.allclose(K.dense(), torch.outer(g, g), atol=1e-15)


def test_mse_one_point_one_layer_is_gauss_newton():
    model = models.build("logistic_regression", d_in=4, n_classes=3, bias=True, dtype=F64)
    x = torch.randn(1, 4, dtype=F64)
    y = torch.randn(1, 3, dtype=F64)
    P = model_params(model)
    K = kronecker_factors(model, P, x, y, loss="mse")
    gn = hessian_operator(model, P, x, y, kind="gauss_newton", loss="mse").dense()
    assert torch.allclose(K.dense(), gn, atol=1e-14)


@pytest.mark.parametrize("build,d_in", [(_mlp, 5), (_cnn, 64)], ids=["mlp", "cnn"])
def test_ekfac_diagonal_is_the_gauss_newton_diagonal_in_its_eigenbasis(build, d_in):
    model = build()
    x, y = _data(7, d_in)
    P = model_params(model)
    K = kronecker_factors(model, P, x, y, kind="ekfac")
    gn = hessian_operator(model, P, x, y, kind="gauss_newton").dense()
    for block in K.blocks:
        o, p = block.eig.shape
        basis = torch.zeros(K.dim, o * p, dtype=F64)
        for col, (i, j) in enumerate(itertools.product(range(o), range(p))):
            K._scatter(basis[:, col:col + 1], torch.outer(block.qg[:, i], block.qa[:, j])[None], block)
        diag = torch.einsum("di,de,ei->i", basis, gn, basis)
        assert torch.allclose(diag, block.eig.reshape(-1), rtol=1e-10, atol=1e-15 * float(gn.abs().max()))
        # and the basis is orthonormal (the eigenvectors of the factors)
        assert torch.allclose(basis.T @ basis, torch.eye(o * p, dtype=F64), atol=1e-12)


def test_kfac_eigenvalues_are_products_of_factor_eigenvalues_and_inverse_is_exact():
    model = _cnn()
    x, y = _data(5, 64)
    K = kronecker_factors(model, model_params(model), x, y, kind="kfac", l2=0.05)
    V = torch.randn(K.dim, 3, dtype=F64)
    assert torch.allclose(K.inverse(K.matmat(V) + 0.1 * V, 0.1), V, atol=1e-12)
    dense = K.dense()
    assert torch.allclose(dense, dense.T, atol=1e-14)
    assert float(torch.linalg.eigvalsh(dense).min()) >= 0.05 - 1e-12  # K ⪰ 0, plus λI


def test_preconditioned_cg_gives_the_same_influence():
    model = _mlp()
    x, y = _data(40, 5)
    xt, yt = _data(3, 5, seed=1)
    exact = predict_removal(model, (x, y), (xt, yt), l2=0.01, damping=0.5, method="exact").values
    for pre in ("kfac", "ekfac"):
        r = predict_removal(model, (x, y), (xt, yt), l2=0.01, damping=0.5, method="cg", rtol=1e-12,
                            preconditioner=pre)
        assert r.solve.info["preconditioned"]
        assert torch.allclose(r.values, exact, rtol=0, atol=1e-9 * float(exact.abs().max()))


def test_kronecker_influence_equals_gauss_newton_influence_where_the_factorisation_is_exact():
    model = models.build("logistic_regression", d_in=4, n_classes=3, bias=True, dtype=F64)
    x, y = _data(1, 4)
    xt, yt = _data(2, 4, seed=2)
    gn = predict_removal(model, (x, y), (xt, yt), l2=0.1, hessian="gauss_newton", backend="autodiff").values
    for kind in ("kfac", "ekfac"):
        r = predict_removal(model, (x, y), (xt, yt), l2=0.1, hessian=kind)
        assert r.solve.method == kind and r.hessian == kind
        assert torch.allclose(r.values, gn, atol=1e-14)


def test_refusals_name_the_fix():
    model = _mlp()
    x, y = _data(4, 5)
    with pytest.raises(ValueError, match="weight and bias together"):
        kronecker_factors(model, model_params(model, ["net.0.weight"]), x, y)
    norm = nn.Sequential(nn.Linear(5, 4, dtype=F64), nn.LayerNorm(4, dtype=F64), nn.Linear(4, 3, dtype=F64))
    with pytest.raises(ValueError, match="belong to no such layer.*1.weight"):
        kronecker_factors(norm, model_params(norm), x, y)
    with pytest.raises(ValueError, match="use method='exact'"):
        predict_removal(model, (x, y), (x, y), hessian="ekfac", method="cg", damping=0.1)
    with pytest.raises(ValueError, match="λ \\+ δ > 0"):
        kronecker_factors(model, model_params(model), x, y).inverse(torch.zeros(83, 1, dtype=F64))
    with pytest.raises(ValueError, match="unknown kind"):
        kronecker_factors(model, model_params(model), x, y, kind="kfc")
