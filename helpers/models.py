"""The models of the study, each exposing its final layer as ``model.last_layer``.

=================  ===========================================================================================
``logreg``         multinomial logistic regression, no bias by default (Koh & Liang 2017)
``mlp``            ``depth`` hidden layers of ``width`` units (Iris paper: width 5, depth 1–8, SELU)
``lenet5``         classic LeNet-5: 5×5 convolutions, average pooling, tanh, 120-84 classifier
``small_cnn``      two 3×3 convolutions (``width`` channels), a few thousand parameters, for CPU
``vgg``            VGG-style stacks of 3×3 convolutions and max pooling (``vgg11/13/16``, ``vgg_tiny``)
``bayesian_mlp``   mean/variance propagation network (STUDY.md §3, after Dera et al.'s extended VI)
=================  ===========================================================================================

Conventions shared by every model:

* Input is a batch ``[n, ...]``; feature-vector models flatten it, convolutional models accept ``[n, C, H, W]``
  or its flattened ``[n, C·H·W]`` (so ``data.load(..., flatten=True)`` works everywhere). Output: logits
  ``[n, n_classes]``. For per-sample work under ``vmap``, call the model on ``x_i.unsqueeze(0)``.
* ``model.last_layer`` is a *property* returning the final :class:`nn.Linear` (not a second registration of it,
  so parameter names stay unique): ``objective.param_names(model, "last")`` reads it.
* No in-place state: every op is functional, there is no batch norm by default and no dropout, so the modules
  work with :func:`torch.func.functional_call`, :func:`torch.func.vmap` and
  :func:`torch.func.stack_module_state` (batched ensembles of k seeds). ``vgg(batch_norm=True)`` exists for
  completeness, but its running statistics are buffers updated in place during training, which a vmapped
  ensemble or per-sample-gradient pass does not handle cleanly — hence off by default.
* Initialisation is PyTorch's default (Kaiming-uniform for weights, uniform biases) and is deterministic given a
  seed: ``build(name, seed=s)`` and ``init_params(model, s)`` give the same parameters, drawn on the CPU from a
  private RNG state (the global RNG is left untouched), in the model's dtype.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Callable, Mapping, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from helpers.objective import param_names

MODELS: tuple[str, ...] = ("logreg", "mlp", "lenet5", "small_cnn", "vgg", "bayesian_mlp")

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "selu": nn.SELU, "relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "elu": nn.ELU,
    "sigmoid": nn.Sigmoid, "softplus": nn.Softplus, "leaky_relu": nn.LeakyReLU, "identity": nn.Identity,
}

VGG_CONFIGS: dict[str, list[int | str]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg_tiny": [8, "M", 16, "M", 32, "M"],
}


def _activation(name: str) -> nn.Module:
    if name not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}: use one of {tuple(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]()


def _as_image(x: Tensor, channels: int, size: int) -> Tensor:
    """``[n, C, H, W]`` as is; a flattened ``[n, C·H·W]`` batch reshaped to it."""
    if x.dim() == 4:
        return x
    if x.dim() == 2 and x.shape[1] == channels * size * size:
        return x.reshape(x.shape[0], channels, size, size)
    raise ValueError(
        f"expected images [n, {channels}, {size}, {size}] or flattened [n, {channels * size * size}], got "
        f"{tuple(x.shape)}: check in_channels / input_size, or load the data with flatten=False"
    )


def _positive_int(**kwargs: int) -> None:
    for k, v in kwargs.items():
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{k} must be a positive int, got {v!r}")


# --------------------------------------------------------------------------------------------------------------
# Deterministic point-estimate models


class LogisticRegression(nn.Module):
    """Multinomial logistic regression: logits = x W^T (+ b). ``[n, ...] -> [n, n_classes]``."""

    def __init__(self, d_in: int, n_classes: int, bias: bool = False, dtype: torch.dtype | None = None):
        super().__init__()
        _positive_int(d_in=d_in, n_classes=n_classes)
        self.linear = nn.Linear(d_in, n_classes, bias=bias, dtype=dtype)

    @property
    def last_layer(self) -> nn.Linear:
        return self.linear

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x.flatten(1))


def is_softmax_regression(model: nn.Module, params: str | list[str] = "all", loss: str = "cross_entropy") -> bool:
    """Whether the closed forms of :mod:`helpers.closed_form` compute exactly what the engine would by autodiff: a
    bias-free :class:`LogisticRegression` with cross-entropy, all of its weights in play. The engine's
    functions (:func:`helpers.train.fit_to_tolerance`, :func:`helpers.influence.predict_removal`,
    :func:`helpers.retrain.warm_start`) then run that backend."""
    return (isinstance(model, LogisticRegression) and model.linear.bias is None and loss == "cross_entropy"
            and param_names(model, params) == ["linear.weight"])


class MLP(nn.Module):
    """``depth`` hidden layers of ``width`` units, activation after each; ``[n, ...] -> [n, n_classes]``."""

    def __init__(self, d_in: int, n_classes: int, depth: int, width: int, activation: str = "selu",
                 bias: bool = True, dtype: torch.dtype | None = None):
        super().__init__()
        _positive_int(d_in=d_in, n_classes=n_classes, width=width)
        if not isinstance(depth, int) or depth < 0:
            raise ValueError(f"depth (number of hidden layers) must be an int >= 0, got {depth!r}")
        layers: list[nn.Module] = []
        d = d_in
        for _ in range(depth):
            layers += [nn.Linear(d, width, bias=bias, dtype=dtype), _activation(activation)]
            d = width
        layers.append(nn.Linear(d, n_classes, bias=bias, dtype=dtype))
        self.net = nn.Sequential(*layers)

    @property
    def last_layer(self) -> nn.Linear:
        return self.net[-1]

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.flatten(1))


class ConvNet(nn.Module):
    """``features`` (convolutions on ``[n, C, H, W]``), flatten, ``classifier`` (ending in an ``nn.Linear``)."""

    def __init__(self, features: nn.Sequential, classifier: nn.Sequential, in_channels: int, input_size: int):
        super().__init__()
        self.features = features
        self.classifier = classifier
        self.in_channels = in_channels
        self.input_size = input_size

    @property
    def last_layer(self) -> nn.Linear:
        return self.classifier[-1]

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(_as_image(x, self.in_channels, self.input_size)).flatten(1))


def logistic_regression(d_in: int, n_classes: int, bias: bool = False, *,
                        dtype: torch.dtype | None = None) -> LogisticRegression:
    """Multinomial logistic regression, no bias by default as in Koh & Liang (2017).

    Parameters: ``linear.weight`` ``[n_classes, d_in]`` (and ``linear.bias``). Note that without an L2 term
    its softmax Hessian is singular along ``W -> W + 1 v^T`` (STUDY.md §3, problem 5).
    """
    return LogisticRegression(d_in, n_classes, bias, dtype)


def mlp(d_in: int, n_classes: int, depth: int, width: int, activation: str = "selu", bias: bool = True, *,
        dtype: torch.dtype | None = None) -> MLP:
    """Fully connected net: ``depth`` hidden layers (0 = logistic regression with bias) of ``width`` units.

    The Iris study uses width 5, depth 1–8, SELU; the MNIST FC-128 model is ``mlp(784, 10, 1, 128, "relu")``.
    Parameter names: ``net.{2i}.weight`` / ``net.{2i}.bias`` for the i-th linear layer.
    """
    return MLP(d_in, n_classes, depth, width, activation, bias, dtype)


def lenet5(in_channels: int = 1, n_classes: int = 10, activation: str = "tanh", input_size: int = 28, *,
           dtype: torch.dtype | None = None) -> ConvNet:
    """Classic LeNet-5: conv5(6) - act - avgpool2 - conv5(16) - act - avgpool2 - fc120 - act - fc84 - act - fc.

    Inputs smaller than 32 pixels are zero-padded by 2 in the first convolution (28×28 MNIST behaves as the
    original 32×32). ~61k parameters on MNIST (~62k on CIFAR-10).
    """
    _positive_int(in_channels=in_channels, n_classes=n_classes, input_size=input_size)
    pad = 2 if input_size < 32 else 0
    side = ((input_size + 2 * pad - 4) // 2 - 4) // 2
    if side < 1:
        raise ValueError(f"lenet5 needs input_size >= 16 (two 5×5 convolutions and two poolings), got {input_size}")
    features = nn.Sequential(
        nn.Conv2d(in_channels, 6, 5, padding=pad, dtype=dtype), _activation(activation), nn.AvgPool2d(2),
        nn.Conv2d(6, 16, 5, dtype=dtype), _activation(activation), nn.AvgPool2d(2),
    )
    classifier = nn.Sequential(
        nn.Linear(16 * side * side, 120, dtype=dtype), _activation(activation),
        nn.Linear(120, 84, dtype=dtype), _activation(activation),
        nn.Linear(84, n_classes, dtype=dtype),
    )
    return ConvNet(features, classifier, in_channels, input_size)


def small_cnn(in_channels: int = 1, n_classes: int = 10, width: int = 16, input_size: int = 28,
              activation: str = "relu", *, dtype: torch.dtype | None = None) -> ConvNet:
    """Two 3×3 convolutions of ``width`` channels, each followed by the activation and 2×2 average pooling,
    then adaptive average pooling to 2×2 and one linear layer.

    3,130 parameters at the defaults (MNIST); works for any ``input_size >= 4`` (digits' 8×8 included).
    """
    _positive_int(in_channels=in_channels, n_classes=n_classes, width=width, input_size=input_size)
    if input_size < 4:
        raise ValueError(f"small_cnn needs input_size >= 4 (two 2×2 poolings), got {input_size}")
    features = nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1, dtype=dtype), _activation(activation), nn.AvgPool2d(2),
        nn.Conv2d(width, width, 3, padding=1, dtype=dtype), _activation(activation), nn.AvgPool2d(2),
        nn.AdaptiveAvgPool2d(2),
    )
    classifier = nn.Sequential(nn.Linear(width * 4, n_classes, dtype=dtype))
    return ConvNet(features, classifier, in_channels, input_size)


def vgg(config: str = "vgg13", in_channels: int = 3, n_classes: int = 10, input_size: int = 32,
        batch_norm: bool = False, *, dtype: torch.dtype | None = None) -> ConvNet:
    """VGG-style network: 3×3 convolutions (padding 1) with ReLU, 2×2 max pooling at each ``"M"`` of the
    configuration (:data:`VGG_CONFIGS`), then one linear layer (the CIFAR variant of VGG).

    ``vgg13`` on 32×32 CIFAR-10 has ~9.4M parameters (a GPU helps); ``vgg_tiny`` (8-16-32 channels) ~11k.
    ``batch_norm=False`` by default: batch norm keeps running statistics updated in place, which batched
    functional retraining (vmap over an ensemble, per-sample gradients) does not handle cleanly.
    """
    if config not in VGG_CONFIGS:
        raise ValueError(f"unknown VGG configuration {config!r}: use one of {tuple(VGG_CONFIGS)}")
    _positive_int(in_channels=in_channels, n_classes=n_classes, input_size=input_size)
    layers: list[nn.Module] = []
    channels, side = in_channels, input_size
    for item in VGG_CONFIGS[config]:
        if item == "M":
            layers.append(nn.MaxPool2d(2))
            side //= 2
            if side < 1:
                raise ValueError(f"{config} pools the image to nothing at input_size={input_size}: use input_size "
                                 f">= {2 ** VGG_CONFIGS[config].count('M')} or config='vgg_tiny'")
        else:
            layers.append(nn.Conv2d(channels, int(item), 3, padding=1, dtype=dtype))
            if batch_norm:
                layers.append(nn.BatchNorm2d(int(item), dtype=dtype))
            layers.append(nn.ReLU())
            channels = int(item)
    classifier = nn.Sequential(nn.Linear(channels * side * side, n_classes, dtype=dtype))
    return ConvNet(nn.Sequential(*layers), classifier, in_channels, input_size)


# --------------------------------------------------------------------------------------------------------------
# The Bayesian (mean/variance propagation) network


def _inverse_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))  # log(exp(y) - 1), stable for small and large y


class BayesianLinear(nn.Module):
    """A linear layer with Gaussian weights, propagating a mean and a diagonal variance.

    Weights W_jk ~ N(μ_jk, s_jk), independent of each other and of the inputs a_k ~ (m_k, v_k); the bias b is
    deterministic. Exact first and second moments of z = W a + b::

        mean  m_out = μ m + b
        var   v_out = s (v + m²) + μ² v        (products are matrix-vector; squares elementwise)

    which is STUDY.md's ``σ_out = s·σ_in + μ_W²·σ_in + μ_in²·s``. ``s = softplus(rho)``; ``rho`` is shaped by
    ``variance``: ``"neuron"`` ``[d_out, 1]`` (one variance per output neuron, as in Dera et al.'s eVI),
    ``"weight"`` ``[d_out, d_in]`` or ``"layer"`` ``[1, 1]``. Parameters: ``mean.weight`` (μ), ``mean.bias``
    (b), ``rho``.
    """

    _SHAPES = ("neuron", "weight", "layer")

    def __init__(self, d_in: int, d_out: int, variance: str = "neuron", init_var: float = 1e-3,
                 dtype: torch.dtype | None = None):
        super().__init__()
        if variance not in self._SHAPES:
            raise ValueError(f"unknown variance shape {variance!r}: use one of {self._SHAPES}")
        if not init_var > 0:
            raise ValueError(f"init_var (initial weight variance) must be > 0, got {init_var}")
        self.mean = nn.Linear(d_in, d_out, dtype=dtype)
        shape = {"neuron": (d_out, 1), "weight": (d_out, d_in), "layer": (1, 1)}[variance]
        self.init_var = float(init_var)
        self.rho = nn.Parameter(torch.empty(shape, dtype=self.mean.weight.dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Set every weight variance to ``init_var`` (no randomness: the mean layer resets itself)."""
        with torch.no_grad():
            self.rho.fill_(_inverse_softplus(self.init_var))

    def weight_variance(self) -> Tensor:
        """``s = softplus(rho)`` broadcast to the weight's shape ``[d_out, d_in]``."""
        return F.softplus(self.rho).expand_as(self.mean.weight)

    def forward(self, m: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """``(m [n, d_in], v [n, d_in]) -> (m_out [n, d_out], v_out [n, d_out])``."""
        w = self.mean.weight
        m_out = F.linear(m, w, self.mean.bias)
        v_out = F.linear(v + m * m, self.weight_variance()) + F.linear(v, w * w)
        return m_out, v_out


class Moments(NamedTuple):
    """Output moments of :class:`BayesianMLP`, each ``[n, n_classes]``."""

    prob_mean: Tensor  # softmax of the mean logits
    prob_var: Tensor  # first-order (delta-method) variance of the softmax outputs
    logit_mean: Tensor
    logit_var: Tensor


class BayesianMLP(nn.Module):
    """Mean/variance propagation MLP with tanh (the paper's "BNN", STUDY.md §3).

    Forward pass: the input is deterministic (variance 0); each :class:`BayesianLinear` propagates
    ``(m, v)`` exactly; tanh passes ``m -> tanh(m)`` and ``v -> v · (1 − tanh²(m))²`` (first-order Taylor);
    the softmax likewise, with its full Jacobian ``J = diag(p) − p pᵀ``: ``Var(p) ≈ (J ⊙ J) v`` (the diagonal of
    ``J diag(v) Jᵀ``).

    ``forward(x)`` returns the **mean logits** ``[n, n_classes]`` — the mean path does not depend on the
    variances, so cross-entropy code, accuracy and ``functional_call`` work unchanged. ``forward(x,
    moments=True)`` returns :class:`Moments`, which :func:`bayesian_loss` uses. ``last_layer`` is the final
    layer's mean ``nn.Linear`` (μ_W and bias), on which the paper takes influence.
    """

    def __init__(self, d_in: int, n_classes: int, depth: int, width: int, variance: str = "neuron",
                 init_var: float = 1e-3, dtype: torch.dtype | None = None):
        super().__init__()
        _positive_int(d_in=d_in, n_classes=n_classes, width=width)
        if not isinstance(depth, int) or depth < 0:
            raise ValueError(f"depth (number of hidden layers) must be an int >= 0, got {depth!r}")
        dims = [d_in] + [width] * depth + [n_classes]
        self.layers = nn.ModuleList(
            BayesianLinear(a, b, variance, init_var, dtype) for a, b in zip(dims[:-1], dims[1:])
        )

    @property
    def last_layer(self) -> nn.Linear:
        return self.layers[-1].mean

    def forward(self, x: Tensor, moments: bool = False) -> Tensor | Moments:
        m = x.flatten(1)
        v = torch.zeros_like(m)
        for i, layer in enumerate(self.layers):
            m, v = layer(m, v)
            if i < len(self.layers) - 1:
                t = torch.tanh(m)
                v = v * (1 - t * t) ** 2
                m = t
        if not moments:
            return m
        p = torch.softmax(m, dim=-1)
        jac = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)  # [n, c, c], J_ik = p_i (δ_ik − p_k)
        prob_var = ((jac * jac) @ v.unsqueeze(-1)).squeeze(-1)
        return Moments(p, prob_var, m, v)


def bayesian_mlp(d_in: int, n_classes: int, depth: int, width: int, variance: str = "neuron",
                 init_var: float = 1e-3, *, dtype: torch.dtype | None = None) -> BayesianMLP:
    """The Bayesian network of the Iris study: ``depth`` hidden tanh layers of ``width`` Gaussian-weight units.

    Choices where STUDY.md leaves room (documented here, reported in the book): one weight variance per output
    neuron (``variance="neuron"``, Dera et al.), initial variance ``init_var = 1e-3``, deterministic biases,
    deterministic inputs, delta-method softmax variance. Parameters per layer: ``mean.weight``, ``mean.bias``,
    ``rho``.
    """
    return BayesianMLP(d_in, n_classes, depth, width, variance, init_var, dtype)


def bayesian_nll_terms(moments: Moments, y: Tensor, var_floor: float = 1e-4) -> tuple[Tensor, Tensor]:
    """Per-sample Gaussian negative log-likelihood of the one-hot target, split in its two parts.

    With t = onehot(y), p = ``prob_mean``, σ² = ``prob_var`` + ``var_floor`` (diagonal covariance)::

        fit_i    = ½ Σ_c (t_ic − p_ic)² / σ²_ic      (Mahalanobis term)
        logdet_i = ½ Σ_c log σ²_ic                   (log-determinant term)

    The Gaussian NLL is fit + logdet + (c/2)·log 2π (the constant is dropped). ``var_floor`` keeps σ² away from
    zero where the softmax saturates (its delta-method variance then vanishes). Returns two ``[n]`` tensors.
    """
    if y.dim() != 1 or y.shape[0] != moments.prob_mean.shape[0]:
        raise ValueError(f"y must be [n] labels matching the outputs' n={moments.prob_mean.shape[0]}, "
                         f"got {tuple(y.shape)}")
    target = F.one_hot(y, moments.prob_mean.shape[-1]).to(moments.prob_mean.dtype)
    var = moments.prob_var + var_floor
    fit = 0.5 * ((target - moments.prob_mean) ** 2 / var).sum(-1)
    logdet = 0.5 * torch.log(var).sum(-1)
    return fit, logdet


def bayesian_kl(model: BayesianMLP, params: Mapping[str, Tensor] | None = None, prior_var: float = 1.0) -> Tensor:
    """KL(q ‖ prior) summed over every Gaussian weight, q = N(μ, s), prior N(0, ``prior_var``)::

        KL = ½ Σ_jk [ (s_jk + μ_jk²)/τ² − 1 − log(s_jk/τ²) ],   τ² = prior_var

    Biases are deterministic and carry no KL term. ``params`` overrides the module's parameters by name (the
    same subset-dict convention as :mod:`helpers.objective`). A scalar in nats.
    """
    if not prior_var > 0:
        raise ValueError(f"prior_var must be > 0, got {prior_var}")
    named = dict(model.named_parameters())
    if params is not None:
        named.update(params)
    total = 0.0
    for name, layer in model.named_modules():
        if isinstance(layer, BayesianLinear):
            mu = named[f"{name}.mean.weight"]
            s = F.softplus(named[f"{name}.rho"]).expand_as(mu)
            total = total + 0.5 * ((s + mu * mu) / prior_var - 1.0 - torch.log(s / prior_var)).sum()
    return torch.as_tensor(total)


def bayesian_loss(
    model: BayesianMLP,
    x: Tensor,
    y: Tensor,
    *,
    params: Mapping[str, Tensor] | None = None,
    weights: Tensor | None = None,
    fit_weight: float = 1.0,
    logdet_weight: float = 1.0,
    kl_weight: float | None = None,
    prior_var: float = 1.0,
    var_floor: float = 1e-4,
) -> Tensor:
    """The Bayesian network's training loss (STUDY.md §3), a scalar::

        L = Σ_i w_i (a · fit_i + b · logdet_i) + c · KL(q ‖ prior)

    with ``fit``/``logdet`` from :func:`bayesian_nll_terms` and KL from :func:`bayesian_kl`.

    Args:
        params: parameter dict for :func:`torch.func.functional_call` (a subset; the rest come from the module).
        weights: ``[n]`` per-sample weights (``objective.removal_weights`` rows); ``None`` means 1/n each.
        fit_weight, logdet_weight, kl_weight: a, b, c. ``kl_weight=None`` means 1/n, i.e. the ELBO divided by n
            for a full batch. The paper set the three from the orders of magnitude of the first batch's terms:
            :func:`balanced_loss_weights` does that.
        prior_var: variance of the zero-mean Gaussian prior on every weight.
        var_floor: added to the predicted variances (see :func:`bayesian_nll_terms`).

    Cost: one forward pass plus O(n · c²) for the softmax Jacobian.
    """
    out = functional_call(model, dict(params) if params is not None else {}, (x,), {"moments": True})
    fit, logdet = bayesian_nll_terms(out, y, var_floor)
    per_sample = fit_weight * fit + logdet_weight * logdet
    n = per_sample.shape[0]
    data = per_sample.mean() if weights is None else (weights.to(per_sample.dtype) * per_sample).sum()
    c = 1.0 / n if kl_weight is None else kl_weight
    return data + c * bayesian_kl(model, params, prior_var) if c else data


def bayesian_per_sample_nll(model: BayesianMLP, params: Mapping[str, Tensor], x: Tensor, y: Tensor,
                            include_logdet: bool = True, var_floor: float = 1e-4) -> Tensor:
    """The likelihood part of :func:`bayesian_loss` per sample, ``[n]`` (fit + logdet, or fit alone):
    the loss whose gradients and Hessian the paper's BNN influence uses (no KL)."""
    out = functional_call(model, dict(params), (x,), {"moments": True})
    fit, logdet = bayesian_nll_terms(out, y, var_floor)
    return fit + logdet if include_logdet else fit


def balanced_loss_weights(model: BayesianMLP, x: Tensor, y: Tensor, prior_var: float = 1.0,
                          var_floor: float = 1e-4) -> dict[str, float]:
    """Loss weights that bring each term of the first batch to order one: ``10^-round(log10 |term|)``.

    Mirrors the paper's choice ("set from the orders of magnitude of the first batch's terms"); returns
    ``{"fit_weight", "logdet_weight", "kl_weight"}`` for :func:`bayesian_loss`.
    """
    with torch.no_grad():
        fit, logdet = bayesian_nll_terms(model(x, moments=True), y, var_floor)
        terms = {"fit_weight": fit.mean(), "logdet_weight": logdet.mean(),
                 "kl_weight": bayesian_kl(model, None, prior_var)}
    return {k: 10.0 ** -round(math.log10(abs(float(v)))) if float(v) != 0 else 1.0 for k, v in terms.items()}


# --------------------------------------------------------------------------------------------------------------
# Factory, parameter count, deterministic initialisation

_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "logreg": logistic_regression, "logistic_regression": logistic_regression, "mlp": mlp, "lenet5": lenet5,
    "small_cnn": small_cnn, "vgg": vgg, "bayesian_mlp": bayesian_mlp,
}


def build(name: str, *, seed: int | None = None, dtype: torch.dtype | None = None,
          device: torch.device | str | None = None, **kwargs: Any) -> nn.Module:
    """Build a model by name (:data:`MODELS`; ``"logistic_regression"`` also accepted).

    Args:
        seed: initialise from ``torch.manual_seed(seed)`` inside a private RNG state (the global RNG is left as
            it was); ``None`` draws from the global RNG. Parameters are drawn on the CPU, so a seed gives the
            same model on every device.
        dtype: parameter dtype (e.g. ``torch.float64`` for exact tests); ``None``: torch's default.
        device: moved there after initialisation.
        **kwargs: the builder's arguments, e.g. ``build("mlp", d_in=4, n_classes=3, depth=2, width=5)``.
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}: use one of {MODELS}")
    if seed is None:
        model = _BUILDERS[name](dtype=dtype, **kwargs)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            model = _BUILDERS[name](dtype=dtype, **kwargs)
    return model.to(device) if device is not None else model


def n_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of scalar parameters (shared tensors counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def init_params(model: nn.Module, seed: int, params: str | list[str] = "all") -> dict[str, Tensor]:
    """Fresh initial parameters for ``model``'s architecture, as ``build(..., seed=seed)`` would draw them,
    restricted to the subset ``params`` (``"all"``, ``"last"`` or names: :func:`helpers.objective.param_names`) —
    what ``fit_ensemble(seeds=...)`` starts from.

    Returns ``{name: tensor}`` (detached, on the model's devices, in its dtypes); the model is not changed.
    Stack the dicts of k seeds (``torch.stack`` per name, or ``torch.func.stack_module_state`` on k built
    models) for a vmapped ensemble. Every submodule's ``reset_parameters`` is replayed in construction order,
    on a CPU copy, inside a private RNG state.
    """
    clone = copy.deepcopy(model).to("cpu")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        for module in clone.modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()
    devices = {n: p.device for n, p in model.named_parameters()}
    values = {n: p.detach().to(devices[n]) for n, p in clone.named_parameters()}
    return {n: values[n] for n in param_names(model, params)}
