"""helpers.models: shapes, last layers, torch.func compatibility, seeded init, the Bayesian network's moments."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jacrev, stack_module_state, vmap

from helpers import models
from helpers.models import BayesianLinear, Moments, build, init_params, n_parameters
from helpers.objective import param_names

F64 = torch.float64

# (name, kwargs, input shape of a batch of 3)
CASES = [
    ("logreg", dict(d_in=12, n_classes=4), (3, 12)),
    ("mlp", dict(d_in=4, n_classes=3, depth=3, width=5), (3, 4)),
    ("mlp", dict(d_in=4, n_classes=3, depth=0, width=5, activation="tanh"), (3, 4)),
    ("lenet5", dict(), (3, 1, 28, 28)),
    ("small_cnn", dict(in_channels=1, width=4, input_size=8), (3, 64)),  # flattened digits-size input
    ("vgg", dict(config="vgg_tiny", input_size=16), (3, 3, 16, 16)),
    ("bayesian_mlp", dict(d_in=4, n_classes=3, depth=2, width=5), (3, 4)),
]
IDS = [f"{c[0]}-{i}" for i, c in enumerate(CASES)]


@pytest.mark.parametrize("name,kwargs,shape", CASES, ids=IDS)
def test_output_shape_and_last_layer(name, kwargs, shape):
    model = build(name, seed=0, dtype=F64, **kwargs)
    out = model(torch.randn(*shape, dtype=F64))
    n_classes = kwargs.get("n_classes", 10)
    assert out.shape == (3, n_classes) and out.dtype == F64
    last = model.last_layer
    assert isinstance(last, nn.Linear) and last.out_features == n_classes
    assert any(m is last for m in model.modules())
    names = param_names(model, "last")
    assert names and all(n in dict(model.named_parameters()) for n in names)
    # parameter names are unique: last_layer is a property, not a second registration
    assert len(model.state_dict()) == len(dict(model.named_parameters())) + len(dict(model.named_buffers()))


@pytest.mark.parametrize("name,kwargs,shape", CASES, ids=IDS)
def test_functional_call_sees_the_given_parameters(name, kwargs, shape):
    model = build(name, seed=0, dtype=F64, **kwargs)
    x = torch.randn(*shape, dtype=F64)
    last = {n: torch.zeros_like(p) for n, p in model.named_parameters() if n in param_names(model, "last")}
    out = functional_call(model, last, (x,))
    assert torch.all(out == 0)  # zero last layer -> zero logits, whatever came before
    assert not torch.all(model(x) == 0)  # and the module itself is unchanged


@pytest.mark.parametrize("name,kwargs,shape", CASES, ids=IDS)
def test_seeded_init_is_reproducible_and_matches_init_params(name, kwargs, shape):
    state = torch.get_rng_state()
    a, b, c = (build(name, seed=s, dtype=F64, **kwargs) for s in (7, 7, 8))
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone
    pa, pb, pc = (dict(m.named_parameters()) for m in (a, b, c))
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert any(not torch.equal(pa[k], pc[k]) for k in pa if "rho" not in k)
    fresh = init_params(c, 7)  # c's architecture, seed 7 -> a's parameters
    assert fresh.keys() == pa.keys() and all(torch.equal(fresh[k], pa[k]) for k in pa)
    assert all(v.dtype == F64 for v in fresh.values())


@pytest.mark.parametrize("name,kwargs,shape", CASES[1:5], ids=IDS[1:5])
def test_stacked_ensemble_and_per_sample_grads_under_vmap(name, kwargs, shape):
    members = [build(name, seed=s, dtype=F64, **kwargs) for s in range(3)]
    base = members[0]
    params, buffers = stack_module_state(members)
    x = torch.randn(*shape, dtype=F64)
    out = vmap(lambda p, b: functional_call(base, (p, b), (x,)))(params, buffers)
    for k, m in enumerate(members):
        torch.testing.assert_close(out[k], m(x), rtol=1e-12, atol=1e-12)

    y = torch.tensor([0, 1, 2])
    theta = {n: p.detach() for n, p in base.named_parameters()}

    def loss(p, xi, yi):
        return F.cross_entropy(functional_call(base, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(theta, x, y)
    name0 = next(iter(theta))
    loop = grad(loss)(theta, x[1], y[1])[name0]  # one sample by hand, to compare
    torch.testing.assert_close(per_sample[name0][1], loop, rtol=1e-12, atol=1e-12)


def test_parameter_counts():
    assert n_parameters(build("logreg", d_in=784, n_classes=10)) == 7840  # no bias
    assert n_parameters(build("mlp", d_in=4, n_classes=3, depth=1, width=5)) == 4 * 5 + 5 + 5 * 3 + 3
    assert n_parameters(build("lenet5")) == 61706  # classic LeNet-5 on padded 28×28 MNIST
    assert n_parameters(build("small_cnn")) == 160 + 2320 + 650
    layers = build("mlp", d_in=4, n_classes=3, depth=8, width=5).net
    assert sum(isinstance(m, nn.Linear) for m in layers) == 9 and isinstance(layers[1], nn.SELU)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown model 'resnet'.*mlp"):
        build("resnet")
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        build("mlp", d_in=4, n_classes=3, depth=1, width=5, activation="swish")
    with pytest.raises(ValueError, match="vgg13 pools the image to nothing"):
        build("vgg", config="vgg13", input_size=28)
    with pytest.raises(ValueError, match="expected images"):
        build("lenet5")(torch.randn(2, 100))


# ---------------------------------------------------------------------------------------------- Bayesian network


def _layer(d_in, d_out, variance="neuron"):
    layer = BayesianLinear(d_in, d_out, variance=variance, dtype=F64)
    with torch.no_grad():
        layer.rho.copy_(torch.randn_like(layer.rho))
    return layer


def test_bayesian_linear_one_unit_by_hand():
    layer = BayesianLinear(1, 1, dtype=F64)
    with torch.no_grad():
        layer.mean.weight.fill_(2.0)
        layer.mean.bias.fill_(0.5)
        layer.rho.fill_(math.log(math.expm1(0.5)))  # s = softplus(rho) = 0.5
    m, v = layer(torch.tensor([[3.0]], dtype=F64), torch.tensor([[0.25]], dtype=F64))
    assert m.item() == pytest.approx(2 * 3 + 0.5, abs=1e-14)
    # s·σ_in + μ_W²·σ_in + μ_in²·s = 0.5·0.25 + 4·0.25 + 9·0.5
    assert v.item() == pytest.approx(0.125 + 1.0 + 4.5, abs=1e-12)


@pytest.mark.parametrize("variance", ["neuron", "weight", "layer"])
def test_bayesian_linear_matches_explicit_sums_and_monte_carlo(variance):
    torch.manual_seed(0)
    layer = _layer(3, 2, variance)
    m_in = torch.randn(1, 3, dtype=F64)
    v_in = torch.rand(1, 3, dtype=F64)
    m, v = layer(m_in, v_in)
    mu, b, s = layer.mean.weight, layer.mean.bias, layer.weight_variance()
    for j in range(2):  # the formula written out term by term
        by_hand = sum(s[j, k] * v_in[0, k] + mu[j, k] ** 2 * v_in[0, k] + m_in[0, k] ** 2 * s[j, k] for k in range(3))
        assert v[0, j].item() == pytest.approx(by_hand.item(), rel=1e-12)
        assert m[0, j].item() == pytest.approx((mu[j] @ m_in[0] + b[j]).item(), rel=1e-12)
    # and it is the exact variance of W a + b for independent Gaussian W and a
    n = 400_000
    gen = torch.Generator().manual_seed(1)
    w = mu + s.sqrt() * torch.randn(n, 2, 3, dtype=F64, generator=gen)
    a = m_in + v_in.sqrt() * torch.randn(n, 3, dtype=F64, generator=gen)
    z = (w @ a.unsqueeze(-1)).squeeze(-1) + b
    torch.testing.assert_close(z.var(0), v[0], rtol=0.02, atol=0)


def test_bayesian_network_moments_by_hand_and_positive_variance():
    torch.manual_seed(0)
    model = build("bayesian_mlp", seed=0, dtype=F64, d_in=3, n_classes=4, depth=1, width=5)
    with torch.no_grad():
        for layer in model.layers:
            layer.rho.copy_(torch.randn_like(layer.rho) - 2)
    x = torch.randn(6, 3, dtype=F64)
    out = model(x, moments=True)
    assert isinstance(out, Moments)
    assert torch.all(out.prob_var > 0) and torch.all(out.logit_var > 0)

    l1, l2 = model.layers
    m1 = x @ l1.mean.weight.T + l1.mean.bias
    v1 = (x * x) @ l1.weight_variance().T  # deterministic input: only the μ_in²·s term
    t = torch.tanh(m1)
    m2_in, v2_in = t, v1 * (1 - t * t) ** 2  # first-order Taylor through tanh
    m2 = m2_in @ l2.mean.weight.T + l2.mean.bias
    v2 = (v2_in + m2_in ** 2) @ l2.weight_variance().T + v2_in @ (l2.mean.weight ** 2).T
    torch.testing.assert_close(out.logit_mean, m2, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(out.logit_var, v2, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(model(x), m2, rtol=1e-12, atol=1e-14)  # forward() is the mean logits
    # softmax variance = diag(J diag(v) Jᵀ) with J the autodiff Jacobian of softmax
    for i in range(6):
        jac = jacrev(lambda z: torch.softmax(z, -1))(m2[i])
        torch.testing.assert_close(out.prob_var[i], torch.diagonal(jac @ torch.diag(v2[i]) @ jac.T),
                                   rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(out.prob_mean[i], torch.softmax(m2[i], -1), rtol=1e-12, atol=1e-15)


def test_bayesian_loss_terms_by_hand():
    torch.manual_seed(0)
    model = build("bayesian_mlp", seed=1, dtype=F64, d_in=4, n_classes=3, depth=1, width=5)
    x, y = torch.randn(5, 4, dtype=F64), torch.tensor([0, 1, 2, 1, 0])
    out = model(x, moments=True)
    floor = 1e-4
    var = out.prob_var + floor
    onehot = F.one_hot(y, 3).to(F64)
    fit = 0.5 * ((onehot - out.prob_mean) ** 2 / var).sum(1)
    logdet = 0.5 * torch.log(var).sum(1)
    kl = 0.0
    for layer in model.layers:
        s, mu = layer.weight_variance(), layer.mean.weight
        kl += 0.5 * ((s + mu ** 2) / 2.0 - 1 - torch.log(s / 2.0)).sum()
    loss = models.bayesian_loss(model, x, y, fit_weight=2.0, logdet_weight=0.5, kl_weight=0.1, prior_var=2.0,
                                var_floor=floor)
    torch.testing.assert_close(loss, (2.0 * fit + 0.5 * logdet).mean() + 0.1 * kl, rtol=1e-12, atol=0)
    torch.testing.assert_close(models.bayesian_per_sample_nll(model, {}, x, y, var_floor=floor), fit + logdet)

    # KL vanishes when the posterior equals the prior
    layer = model.layers[0]
    prior = layer.weight_variance()[0, 0].item()
    zero = {f"layers.{i}.mean.weight": torch.zeros_like(l.mean.weight) for i, l in enumerate(model.layers)}
    zero.update({f"layers.{i}.rho": torch.full_like(l.rho, math.log(math.expm1(prior)))
                 for i, l in enumerate(model.layers)})
    assert models.bayesian_kl(model, zero, prior_var=prior).item() == pytest.approx(0.0, abs=1e-12)

    # removal weights: a zero weight drops the point from the data term exactly
    w = torch.tensor([0.25, 0.25, 0.0, 0.25, 0.25], dtype=F64)
    dropped = models.bayesian_loss(model, x, y, weights=w, kl_weight=0.0)
    keep = torch.tensor([0, 1, 3, 4])
    torch.testing.assert_close(dropped, models.bayesian_loss(model, x[keep], y[keep], kl_weight=0.0))

    # differentiable through functional_call w.r.t. the last layer's mean weights
    names = param_names(model, "last")
    theta = {n: p.detach() for n, p in model.named_parameters() if n in names}
    g = grad(lambda p: models.bayesian_loss(model, x, y, params=p))(theta)
    assert all(torch.isfinite(v).all() and v.abs().sum() > 0 for v in g.values())
    weights = models.balanced_loss_weights(model, x, y)
    assert set(weights) == {"fit_weight", "logdet_weight", "kl_weight"} and all(v > 0 for v in weights.values())
