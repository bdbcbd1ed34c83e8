"""Exact curvature products of a multilayer perceptron by its layer-wise formulas: a backend of
:func:`helpers.curvature.hessian_operator`.

For a chain of ``nn.Linear`` layers and elementwise activations — :class:`helpers.models.MLP`, or an
``nn.Sequential`` of the two — the Hessian-vector product of R(θ) = Σ_i w_i ℓ_i + (λ/2)‖θ‖² has a closed form
(Pearlmutter 1994, "R-propagation"): a forward pass of tangents, the loss's output Hessian, and a backward pass
of adjoint tangents. With layers z_l = h_{l−1} W_lᵀ + b_l, h_l = σ(z_l), output f = z_L, loss gradient g_f and
output Hessian H_f (softmax cross-entropy: diag(p) − ppᵀ; mse: I), per-row weights w_i, and the primal
backward pass g_{z_L} = w ⊙ g_f, g_{h_{l−1}} = g_{z_l} W_l, g_{z_{l−1}} = g_{h_{l−1}} ⊙ σ'(z_{l−1}), the product
with a direction (V_l, c_l) is::

    forward   ż_l = ḣ_{l−1} W_lᵀ + h_{l−1} V_lᵀ + c_l,        ḣ_l = σ'(z_l) ⊙ ż_l          (ḣ_0 = 0)
    output    ġ_{z_L} = w ⊙ H_f ż_L
    backward  (HV)_{W_l} = ġ_{z_l}ᵀ h_{l−1} + g_{z_l}ᵀ ḣ_{l−1} + λV_l,   (HV)_{b_l} = Σ_i ġ_{z_l} + λc_l
              ġ_{h_{l−1}} = ġ_{z_l} W_l + g_{z_l} V_l
              ġ_{z_{l−1}} = ġ_{h_{l−1}} ⊙ σ'(z_{l−1}) + g_{h_{l−1}} ⊙ σ''(z_{l−1}) ⊙ ż_{l−1}

and the Gauss–Newton product G = Σ_i w_i J_iᵀ H_f J_i + λI is the same without the terms that carry a primal
gradient g (they are the second-order terms of the network). The primal passes are computed once, when the
product is built; each product of k vectors then costs the tangent passes only, with the k vectors folded into
the columns of one matrix product per layer and direction: for the 784-64-10 MLP of benchmark P2, two
[4,000 × 784] × [784 × 64k] products dominate, the arithmetic an autodiff product cannot avoid, without its
bookkeeping or a recomputed primal pass (``benchmarks/bench_layered_products.py`` measures both).

Columns of the input that are zero in every row (an image's blank border — 125 of MNIST's 784 pixels in P2 —,
a one-hot level no row takes) add nothing to the first layer's products, so they are left out of both of its
matrix products (:func:`_used_columns`): their entries of the product are exact zeros (plus λV), as the full
product would give.

σ' and σ'' come from autodiff of the activation module at the cached pre-activations (so any elementwise
activation works: ReLU's σ'' is 0, as autodiff's is). The tests compare every product with the dense autodiff
Hessian and Gauss–Newton matrix to float64 round-off (``tests/test_layered.py``).

:func:`layered_product` returns ``None`` for anything else — another architecture, a subset of the parameters, a
loss or data shape it does not cover —, and :func:`helpers.curvature.hessian_operator` then uses autodiff.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from helpers.objective import LossName, Params

__all__ = ["ELEMENTWISE", "layered_directional", "layered_product", "mlp_layers"]

#: activation modules known to act elementwise (σ applied to every entry on its own)
ELEMENTWISE: tuple[type[nn.Module], ...] = (
    nn.Tanh, nn.ReLU, nn.Sigmoid, nn.SELU, nn.ELU, nn.CELU, nn.GELU, nn.SiLU, nn.Softplus, nn.LeakyReLU,
    nn.Identity, nn.Mish, nn.Softsign, nn.Tanhshrink,
)

Layer = tuple[str, str | None, nn.Module | None]  # (weight name, bias name or None, activation after it or None)


def mlp_layers(model: nn.Module) -> list[Layer] | None:
    """The layers of ``model`` as ``(weight name, bias name, activation)`` if it is a chain of ``nn.Linear``
    layers with one elementwise activation (or none) between consecutive ones, ending in a Linear —
    :class:`helpers.models.MLP` (``net.*``; its forward flattens the input) or a plain ``nn.Sequential``;
    ``None`` otherwise."""
    from helpers.models import MLP  # models imports nothing from here; imported late to keep the engine light

    if type(model) is MLP:
        seq, prefix = model.net, "net."
    elif type(model) is nn.Sequential:
        seq, prefix = model, ""
    else:
        return None
    modules = list(seq.named_children())
    layers: list[Layer] = []
    i = 0
    while i < len(modules):
        name, mod = modules[i]
        if type(mod) is not nn.Linear:
            return None
        act = None
        if i + 1 < len(modules) and not isinstance(modules[i + 1][1], nn.Linear):
            act = modules[i + 1][1]
            if type(act) not in ELEMENTWISE or i + 2 >= len(modules):
                return None  # not elementwise, or the chain ends in an activation (not a Linear)
            i += 1
        layers.append((f"{prefix}{name}.weight", f"{prefix}{name}.bias" if mod.bias is not None else None, act))
        i += 1
    return layers if layers and layers[-1][2] is None else None


def _covered_layers(model: nn.Module, params: Params) -> list[Layer] | None:
    """:func:`mlp_layers` when ``params`` are exactly all of the model's parameters (nothing frozen, no subset),
    else ``None``."""
    layers = mlp_layers(model)
    if layers is None:
        return None
    names = {n for w, b, _ in layers for n in (w, b) if n is not None}
    if set(params) != names or {n for n, _ in model.named_parameters()} != names:
        return None
    return layers


def _activation_derivatives(act: nn.Module, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """σ(z), σ'(z), σ''(z) for an elementwise activation, by autodiff (once per product built)."""
    with torch.enable_grad():
        zz = z.detach().requires_grad_(True)
        h = act(zz)
        d1, = torch.autograd.grad(h.sum(), zz, create_graph=True)
        d2 = torch.autograd.grad(d1.sum(), zz, allow_unused=True)[0] if d1.requires_grad else None
    return h.detach(), d1.detach(), torch.zeros_like(z) if d2 is None else d2.detach()


#: leave blank input columns out of the first layer's products once they are at least this share of them (below
#: it, gathering the used columns of every direction costs about what it saves)
BLANK_SHARE = 1 / 32


def _used_columns(h0: Tensor) -> Tensor | None:
    """Indices of the columns of the input ``h0`` ``[n, in]`` that are nonzero in some row, or ``None`` when fewer
    than :data:`BLANK_SHARE` of them are blank (then every column is used as it is)."""
    used = (h0 != 0).any(dim=0)
    if (~used).sum().item() < BLANK_SHARE * h0.shape[1]:
        return None
    return used.nonzero().squeeze(1)


def _on_used(V: Tensor, cols: Tensor | None) -> Tensor:
    """A first-layer tensor ``[..., in]`` (a direction, or the input) restricted to the used columns."""
    return V if cols is None else V[..., cols]


@dataclass
class _Primal:
    """The primal passes at θ: every layer's input h_{l−1}, σ'(z_l) and σ''(z_l) of every hidden layer, the
    softmax p (cross-entropy; None for mse), and the weighted backward pass g_{z_l}, g_{h_l}."""

    layers: list[Layer]
    theta: dict[str, Tensor]
    hs: list[Tensor]
    d1s: list[Tensor]
    d2s: list[Tensor]
    p: Tensor | None
    g_zs: list[Tensor]
    g_hs: list[Tensor]


def _primal(model: nn.Module, params: Params, x: Tensor, y: Tensor, weights: Tensor | None, loss: LossName,
            *, unit_weights: bool = False) -> _Primal | None:
    """The primal passes of the MLP at ``params`` with per-row weights (``None``: 1/n; ``unit_weights``: 1, the
    per-sample losses' own gradients), or ``None`` when the model, parameters, loss or data are not covered."""
    layers = _covered_layers(model, params)
    if layers is None or loss not in ("cross_entropy", "mse"):
        return None
    h0 = x.flatten(1) if type(model) is not nn.Sequential else x
    if h0.dim() != 2 or not h0.is_floating_point():
        return None
    theta = {k: v.detach() for k, v in params.items()}
    dtype = theta[layers[0][0]].dtype
    h0 = h0.to(dtype)
    n = h0.shape[0]
    if loss == "cross_entropy" and (y.dim() != 1 or y.is_floating_point()):
        return None
    if unit_weights:
        w = torch.ones(n, dtype=dtype, device=h0.device)
    else:
        w = torch.full((n,), 1.0 / n, dtype=dtype, device=h0.device) if weights is None else weights.to(h0)

    with torch.no_grad():
        hs, d1s, d2s = [h0], [], []
        h = h0
        for i, (wn, bn, act) in enumerate(layers):
            z = h @ theta[wn].T
            if bn is not None:
                z = z + theta[bn]
            if i < len(layers) - 1:
                if act is None:
                    h, d1, d2 = z, torch.ones_like(z), torch.zeros_like(z)
                else:
                    h, d1, d2 = _activation_derivatives(act, z)
                hs.append(h)
                d1s.append(d1)
                d2s.append(d2)
        f = z
        if loss == "cross_entropy":
            p = torch.softmax(f, dim=-1)
            g_f = p.clone()
            g_f[torch.arange(n, device=f.device), y] -= 1.0
        else:
            if y.shape != f.shape:
                return None
            p = None
            g_f = f - y.to(dtype)
        g_zs: list[Tensor] = [g_f] * len(layers)
        g_hs: list[Tensor] = [g_f] * len(layers)  # entries below the last hidden layer are overwritten
        g = w[:, None] * g_f
        for i in range(len(layers) - 1, -1, -1):
            g_zs[i] = g
            if i > 0:
                g_hs[i - 1] = g @ theta[layers[i][0]]
                g = g_hs[i - 1] * d1s[i - 1]
    return _Primal(layers, theta, hs, d1s, d2s, p, g_zs, g_hs)


def layered_product(
    model: nn.Module,
    params: Params,
    x: Tensor,
    y: Tensor,
    *,
    weights: Tensor | None,
    l2: float,
    loss: LossName,
    kind: str,
) -> Callable[[Tensor], Tensor] | None:
    """V ``[d, k]`` ↦ (curvature) V ``[d, k]`` for the MLP ``model`` at ``params`` (module docstring), or ``None``
    when the model, the parameters (all of the model's, nothing frozen), the loss or the data are not covered.

    ``params`` may hold other values than the module's (the point θ̂ the operator is built at); the flat order of
    V is ``params``' dict order, as in :class:`helpers.curvature.CurvatureOperator`. The primal quantities are
    kept with the closure: about (2 + 3·hidden layers) activations of n rows."""
    if kind not in ("hessian", "gauss_newton"):
        return None
    pr = _primal(model, params, x, y, weights, loss)
    if pr is None:
        return None
    layers, theta, hs, d1s, d2s, p, g_zs, g_hs = (pr.layers, pr.theta, pr.hs, pr.d1s, pr.d2s, pr.p, pr.g_zs,
                                                   pr.g_hs)
    n = hs[0].shape[0]
    w = pr.g_zs[-1].new_full((n,), 1.0 / n) if weights is None else weights.to(hs[0])
    exact = kind == "hessian"
    cols = _used_columns(hs[0])
    h0_used = _on_used(hs[0], cols).contiguous()  # once: every product reads it
    shapes = {k: v.shape for k, v in theta.items()}
    order = list(params)
    sizes = [theta[k].numel() for k in order]

    def product(V: Tensor) -> Tensor:
        k = V.shape[1]
        blocks = dict(zip(order, torch.split(V, sizes)))  # each [numel, k]
        # V_l as [k, out, in] and c_l as [k, out]
        Vw = {wn: blocks[wn].T.reshape(k, *shapes[wn]) for wn, _, _ in layers}
        Vb = {bn: blocks[bn].T for _, bn, _ in layers if bn is not None}
        # forward tangents, laid out [n, k, width] so that a shared left factor folds k into its columns
        zdots: list[Tensor] = []
        hdots: list[Tensor] = []  # ḣ of every hidden layer (the exact Hessian's backward pass reads them)
        hdot: Tensor | None = None
        for i, (wn, bn, _) in enumerate(layers):
            W = theta[wn]
            out, inp = W.shape
            h_in, V_in = (h0_used, _on_used(Vw[wn], cols)) if i == 0 else (hs[i], Vw[wn])
            zd = (h_in @ V_in.permute(2, 0, 1).reshape(h_in.shape[1], k * out)).view(n, k, out)
            if hdot is not None:
                zd = zd + (hdot.reshape(n * k, inp) @ W.T).view(n, k, out)
            if bn is not None:
                zd = zd + Vb[bn][None]
            zdots.append(zd)
            if i < len(layers) - 1:
                hdot = d1s[i][:, None, :] * zd
                hdots.append(hdot)
        zL = zdots[-1]
        if p is not None:  # w ⊙ (diag(p) − ppᵀ) ż per row
            pz = p[:, None, :] * zL
            gdot = w[:, None, None] * (pz - p[:, None, :] * pz.sum(dim=-1, keepdim=True))
        else:
            gdot = w[:, None, None] * zL
        out_blocks: dict[str, Tensor] = {}
        for i in range(len(layers) - 1, -1, -1):
            wn, bn, _ = layers[i]
            W = theta[wn]
            out, inp = W.shape
            # (HV)_W = ġ_zᵀ h (+ g_zᵀ ḣ): one [k·out, n] × [n, in] product, and one [out, n] × [n, k·in]
            if i == 0 and cols is not None:  # the blank columns' entries stay exact zeros
                HW = gdot.new_zeros(k, out, inp)
                HW[..., cols] = (gdot.reshape(n, k * out).T @ h0_used).view(k, out, -1)
            else:
                HW = (gdot.reshape(n, k * out).T @ hs[i]).view(k, out, inp)
            if exact and i > 0:
                HW = HW + (g_zs[i].T @ hdots[i - 1].reshape(n, k * inp)).view(out, k, inp).transpose(0, 1)
            if l2:
                HW = HW + l2 * Vw[wn]
            out_blocks[wn] = HW.reshape(k, -1).T
            if bn is not None:
                Hb = gdot.sum(dim=0)
                out_blocks[bn] = (Hb + l2 * Vb[bn] if l2 else Hb).T
            if i > 0:
                gh = (gdot.reshape(n * k, out) @ W).view(n, k, inp)
                if exact:
                    gh = gh + (g_zs[i] @ Vw[wn].permute(1, 0, 2).reshape(out, k * inp)).view(n, k, inp)
                    gdot = gh * d1s[i - 1][:, None, :] + (g_hs[i - 1] * d2s[i - 1])[:, None, :] * zdots[i - 1]
                else:
                    gdot = gh * d1s[i - 1][:, None, :]
        return torch.cat([out_blocks[name] for name in order], dim=0)

    return product


def layered_directional(model: nn.Module, params: Params, x: Tensor, y: Tensor, V: Tensor, loss: LossName,
                            *, max_bytes: float) -> Tensor | None:
    """∇ℓ(z_i, θ)ᵀ v_j for every row i and column v_j of ``V`` ``[d, k]``: ``[k, n]`` (as
    :func:`helpers.influence.directional_derivatives`), or ``None`` when the MLP is not covered.

    Sample i's gradient of W_l is g_{z_l,i} h_{l−1,i}ᵀ (its bias's: g_{z_l,i}), so its product with (V_l, c_l) is
    Σ_l g_{z_l,i}ᵀ (V_l h_{l−1,i} + c_l): one [rows × in] × [in × k·out] product per layer on top of one primal
    pass, instead of k forward-mode passes. Rows go in blocks whose [rows, k, width] intermediates stay under
    ``max_bytes``."""
    layers = _covered_layers(model, params)
    if layers is None:
        return None
    n, k = x.shape[0], V.shape[1]
    order = list(params)
    sizes = [params[name].numel() for name in order]
    blocks = dict(zip(order, torch.split(V, sizes)))
    itemsize = V.element_size()
    widths = sum(int(params[wn].shape[0]) + int(params[wn].shape[1]) for wn, _, _ in layers)
    per_row = 4 * itemsize * (k + 1) * widths
    rows = max(1, min(n, int(max_bytes // max(per_row, 1))))
    out = []
    for s in range(0, n, rows):
        pr = _primal(model, params, x[s : s + rows], y[s : s + rows], None, loss, unit_weights=True)
        if pr is None:
            return None
        m = pr.hs[0].shape[0]
        cols = _used_columns(pr.hs[0])
        D = torch.zeros(m, k, dtype=V.dtype, device=V.device)
        for i, (wn, bn, _) in enumerate(layers):
            o, inp = params[wn].shape
            Vl = blocks[wn].T.reshape(k, o, inp)
            h_in, V_in = (_on_used(pr.hs[0], cols), _on_used(Vl, cols)) if i == 0 else (pr.hs[i], Vl)
            T = (h_in @ V_in.permute(2, 0, 1).reshape(h_in.shape[1], k * o)).view(m, k, o)
            D += (T * pr.g_zs[i][:, None, :]).sum(dim=-1)
            if bn is not None:
                D += pr.g_zs[i] @ blocks[bn]
        out.append(D.T)
    return torch.cat(out, dim=1)
