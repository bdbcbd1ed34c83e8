"""The layer-wise MLP products of helpers.layered against the dense autodiff Hessian and Gauss–Newton matrix."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers import models
from helpers.curvature import hessian_operator
from helpers.influence import predict_removal
from helpers.layered import layered_product, mlp_layers
from helpers.objective import model_params


def _problem(depth: int, activation: str, loss: str, *, bias: bool = True, n: int = 30, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    m = models.build("mlp", d_in=5, n_classes=3, depth=depth, width=4, activation=activation, bias=bias,
                     dtype=torch.float64)
    x = torch.randn(n, 5, generator=g, dtype=torch.float64)
    y = (torch.randint(0, 3, (n,), generator=g) if loss == "cross_entropy"
         else torch.randn(n, 3, generator=g, dtype=torch.float64))
    return m, x, y


@pytest.mark.parametrize("kind", ["hessian", "gauss_newton"])
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
@pytest.mark.parametrize("activation", ["tanh", "relu", "gelu", "selu", "softplus", "identity"])
@pytest.mark.parametrize("depth", [0, 1, 2])
def test_every_entry_matches_the_dense_autodiff_matrix(depth, activation, loss, kind) -> None:
    m, x, y = _problem(depth, activation, loss, bias=depth != 1)  # one depth without biases
    P = model_params(m)
    w = torch.rand(x.shape[0], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    dense = hessian_operator(m, P, x, y, weights=w, l2=0.3, loss=loss, kind=kind, product="autodiff").dense()
    layered = layered_product(m, P, x, y, weights=w, l2=0.3, loss=loss, kind=kind)
    assert layered is not None
    got = layered(torch.eye(dense.shape[0], dtype=torch.float64))
    assert torch.allclose(got, dense, rtol=0, atol=1e-13 * float(dense.abs().max()))
    if kind == "hessian" and activation != "identity" and depth > 0:  # the second-order terms are really there
        gn = hessian_operator(m, P, x, y, weights=w, l2=0.3, loss=loss, kind="gauss_newton").dense()
        assert float((dense - gn).abs().max()) > 1e-6


def test_products_at_other_params_than_the_modules_and_a_plain_sequential() -> None:
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x = torch.randn(20, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (20,))
    P = {k: v.detach() + 0.1 for k, v in seq.named_parameters()}  # not the module's own values
    op = hessian_operator(seq, P, x, y, l2=0.01)
    assert op.product == "layers"
    ref = hessian_operator(seq, P, x, y, l2=0.01, product="autodiff")
    V = torch.randn(op.dim, 7, dtype=torch.float64)
    assert torch.allclose(op.matmat(V), ref.matmat(V), rtol=0, atol=1e-14)
    assert torch.allclose(op.matmat(V, chunk_size=3), op.matmat(V), rtol=0, atol=1e-14)  # columns in chunks of 3
    assert torch.allclose(op.matvec(V[:, 0]), ref.matvec(V[:, 0]), rtol=0, atol=1e-14)
    low = op.astype(torch.float32)
    assert low.product == "layers" and low.dtype == torch.float32
    assert torch.allclose(low.matmat(V.float()).double(), ref.matmat(V), rtol=0, atol=1e-5)


def test_what_it_does_not_cover_falls_back_to_autodiff_or_raises_when_insisted_on() -> None:
    m, x, y = _problem(1, "tanh", "cross_entropy")
    last = {k: v.detach() for k, v in m.named_parameters() if k.startswith("net.2")}
    others = {
        "a subset of the parameters": (m, last),
        "a convolutional network": (models.build("small_cnn", in_channels=1, input_size=8, n_classes=3, width=2,
                                                 dtype=torch.float64), None),
        "a non-elementwise module": (nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.Linear(4, 3)).double(), None),
        "a chain ending in an activation": (nn.Sequential(nn.Linear(5, 3), nn.Tanh()).double(), None),
    }
    assert mlp_layers(m) is not None
    for what, (model, params) in others.items():
        if what == "a convolutional network":
            xi = torch.randn(10, 1, 8, 8, dtype=torch.float64)
            yi = torch.randint(0, 3, (10,))
        else:
            xi, yi = x, y
        P = params if params is not None else model_params(model)
        assert hessian_operator(model, P, xi, yi).product == "autodiff", what
        with pytest.raises(ValueError, match="product='layers' needs a multilayer perceptron"):
            hessian_operator(model, P, xi, yi, product="layers")
    with pytest.raises(ValueError, match="unknown product"):
        hessian_operator(m, model_params(m), x, y, product="fast")


def test_predict_removal_agrees_across_backends_and_the_mlp_takes_the_layered_one_by_default() -> None:
    m, x, y = _problem(2, "tanh", "cross_entropy", n=60)
    xt, yt = x[:4], y[:4]
    # an untrained network: H is indefinite, damping makes H + δI definite for both solvers
    exact = predict_removal(m, (x, y), (xt, yt), l2=0.05, damping=0.2, method="exact", backend="autodiff").values
    for backend in ("auto", "layers"):
        got = predict_removal(m, (x, y), (xt, yt), l2=0.05, damping=0.2, method="exact", backend=backend).values
        assert torch.allclose(got, exact, rtol=0, atol=1e-12 * float(exact.abs().max()))
    cg = predict_removal(m, (x, y), (xt, yt), l2=0.05, damping=0.2, method="cg", rtol=1e-12, block=True,
                         low_precision=torch.float32, backend="layers")
    assert float((cg.values - exact).norm() / exact.norm()) < 1e-10
    with pytest.raises(ValueError, match="backend must be one of"):
        predict_removal(m, (x, y), (xt, yt), backend="fast")


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_directional_derivatives_match_the_per_sample_gradients_in_row_blocks(loss) -> None:
    from helpers.influence import per_sample_grads
    from helpers.layered import layered_directional

    m, x, y = _problem(2, "gelu", loss, n=25)
    P = model_params(m)
    V = torch.randn(sum(p.numel() for p in P.values()), 4, dtype=torch.float64)
    want = (per_sample_grads(m, P, x, y, loss) @ V).T  # [k, n]
    for max_bytes in (1e9, 2000.0):  # all rows at once, and blocks of a few rows
        got = layered_directional(m, P, x, y, V, loss, max_bytes=max_bytes)
        assert torch.allclose(got, want, rtol=0, atol=1e-13 * float(want.abs().max()))
    last = {k: v for k, v in P.items() if k.startswith("net.4")}
    assert layered_directional(m, last, x, y, V, loss,
                                   max_bytes=1e9) is None  # a subset of the parameters: not covered
    cnn = models.build("small_cnn", in_channels=1, input_size=8, n_classes=3, width=2, dtype=torch.float64)
    assert layered_directional(cnn, model_params(cnn), torch.randn(3, 1, 8, 8, dtype=torch.float64),
                                   torch.tensor([0, 1, 2]), V[:1], "cross_entropy", max_bytes=1e9) is None


@pytest.mark.parametrize("kind", ["hessian", "gauss_newton"])
def test_blank_input_columns_are_left_out_exactly(kind) -> None:
    """Input columns that are zero in every row (an image's blank border) are skipped in the first layer's
    products: the products and the directional derivatives still equal the dense autodiff ones, and the blank
    columns' entries of a product are exactly λV."""
    from helpers import layered
    from helpers.influence import per_sample_grads

    m, x, y = _problem(1, "tanh", "cross_entropy", n=40)
    x[:, [0, 3]] = 0.0  # 2 of 5 columns blank in every row
    assert layered._used_columns(x).tolist() == [1, 2, 4] and layered._used_columns(torch.ones(3, 40)) is None
    P = model_params(m)
    dense = hessian_operator(m, P, x, y, l2=0.3, kind=kind, product="autodiff").dense()
    got = layered_product(m, P, x, y, weights=None, l2=0.3, loss="cross_entropy", kind=kind)(
        torch.eye(dense.shape[0], dtype=torch.float64))
    assert torch.allclose(got, dense, rtol=0, atol=1e-13 * float(dense.abs().max()))
    V = torch.randn(dense.shape[0], 3, dtype=torch.float64)
    HV = layered_product(m, P, x, y, weights=None, l2=0.3, loss="cross_entropy", kind=kind)(V)
    W1 = slice(0, 4 * 5)  # the first layer's weight [out=4, in=5] leads the flat order
    assert torch.equal(HV[W1].view(4, 5, 3)[:, [0, 3]], 0.3 * V[W1].view(4, 5, 3)[:, [0, 3]])
    want = (per_sample_grads(m, P, x, y, "cross_entropy") @ V).T
    got_d = layered.layered_directional(m, P, x, y, V, "cross_entropy", max_bytes=1e9)
    assert torch.allclose(got_d, want, rtol=0, atol=1e-13 * float(want.abs().max()))
