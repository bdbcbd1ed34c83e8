"""Kronecker-factored curvature: K-FAC and EK-FAC of a model's ``nn.Linear`` and ``nn.Conv2d`` layers.

For one layer with input activations a (with a 1 appended when it has a bias) and pre-activation output gradients
g, the per-sample gradient of its weight matrix M = [W | b] (``[out, in (+1)]``; a convolution's kernel flattened
to ``[out, in·kh·kw]``) is g aᵀ (summed over positions for a convolution). K-FAC (Martens & Grosse 2015; Grosse &
Martens 2016 for convolutions) approximates the layer's block of the Gauss–Newton matrix by a Kronecker product,

    K = A ⊗ G,   A = Σ_n w_n Σ_l a_nl a_nlᵀ / L,   G = Σ_n w_n Σ_c Σ_l g_ncl g_nclᵀ     (K·M = G M A),

with L positions (1 for a linear layer) and c running over the columns of a square root of the loss's Hessian in
the outputs (``fisher="type-2"``: the exact expectation over the model's predictive distribution — for
cross-entropy ∇²_f ℓ = diag(p) − ppᵀ = SSᵀ with S[:, c] = √p_c (e_c − p) — or ``"empirical"``: the one
gradient at the true label). Blocks of different layers are taken as independent (block-diagonal).

In the eigenbases A = Q_A Λ_A Q_Aᵀ and G = Q_G Λ_G Q_Gᵀ, K is diagonal with entries λ_G,i λ_A,j. EK-FAC (George
et al. 2018; what Grosse et al. 2023 and ``kronfluence`` use for influence) keeps the eigenbasis and replaces those
entries by the exact second moments of the gradients in it, Σ_n w_n Σ_c (Q_Gᵀ (Σ_l g aᵀ) Q_A)²_ij — the best
diagonal in that basis. Either way the damped inverse is exact and cheap:

    (K + (λ + δ) I)⁻¹ M = Q_G [(Q_Gᵀ M Q_A) / (eig + λ + δ)] Q_Aᵀ,

λ being the L2 term of the objective (its Hessian λI is known exactly and is added, not approximated).

:func:`kronecker_factors` computes the factors from a model and its data (two passes over the rows for EK-FAC,
in chunks that fit :func:`helpers.memory.budget`); :class:`KroneckerCurvature` applies K, its damped inverse, and
serves as a preconditioner of conjugate gradients on the exact Hessian (``helpers.influence.predict_removal(...,
preconditioner="ekfac")``) and as the curvature of K-FAC / EK-FAC influence (``hessian="ekfac"``).
Vectors use the flat coordinates of :class:`helpers.curvature.CurvatureOperator` (the params dict's order).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from helpers import memory
from helpers.objective import LOSS_NAMES, LossName, Params

KroneckerKind = Literal["kfac", "ekfac"]
FisherType = Literal["type-2", "empirical"]
KINDS: tuple[str, ...] = ("kfac", "ekfac")
FISHER_TYPES: tuple[str, ...] = ("type-2", "empirical")

__all__ = ["KroneckerCurvature", "KroneckerBlock", "kronecker_factors"]


@dataclass
class KroneckerBlock:
    """One layer's factors: eigenbases ``qa [p, p]`` (inputs, p = in·kh·kw (+1 for a bias)) and ``qg [o, o]``
    (outputs), the diagonal ``eig [o, p]`` of its curvature in that basis (K-FAC: λ_G,i λ_A,j; EK-FAC: corrected),
    and where its weight and bias sit among the parameters."""

    module: str
    weight: str
    bias: str | None
    weight_shape: torch.Size
    qa: Tensor
    qg: Tensor
    eig: Tensor

    @property
    def out_features(self) -> int:
        return int(self.weight_shape[0])


class KroneckerCurvature:
    """A block-diagonal Kronecker-factored curvature over a params dict, plus the L2 term λI of the objective.

    ``matmat(V)`` applies K + λI, ``inverse(V, damping)`` applies (K + (λ + δ)I)⁻¹ exactly, both on ``[d, k]``
    columns in the flat order of ``names`` (that of :class:`helpers.curvature.CurvatureOperator`) and in the
    columns' dtype (the factors are cast once per dtype: the float32 inner solves of mixed-precision CG use it too).
    ``preconditioner(damping)`` is the callable :func:`helpers.solvers.solve` takes.
    """

    def __init__(self, params: Params, blocks: list[KroneckerBlock], *, kind: str, fisher: str, l2: float) -> None:
        self.names = list(params)
        self.shapes = [v.shape for v in params.values()]
        numels = [v.numel() for v in params.values()]
        self.dim = int(sum(numels))
        starts = torch.tensor([0] + numels).cumsum(0).tolist()
        self._slices = {n: slice(starts[i], starts[i + 1]) for i, n in enumerate(self.names)}
        self.blocks = blocks
        self.kind = kind
        self.fisher = fisher
        self.l2 = float(l2)
        self.dtype = next(iter(params.values())).dtype
        self._cast: dict[torch.dtype, list[tuple[Tensor, Tensor, Tensor]]] = {}

    def __repr__(self) -> str:
        layers = ", ".join(b.module for b in self.blocks)
        return f"KroneckerCurvature(kind={self.kind!r}, fisher={self.fisher!r}, dim={self.dim}, layers=[{layers}])"

    def _factors(self, dtype: torch.dtype) -> list[tuple[Tensor, Tensor, Tensor]]:
        if dtype not in self._cast:
            self._cast[dtype] = [(b.qa.to(dtype), b.qg.to(dtype), b.eig.to(dtype)) for b in self.blocks]
        return self._cast[dtype]

    def _gather(self, V: Tensor, block: KroneckerBlock) -> Tensor:
        """The block's columns of ``V [d, k]`` as matrices ``[k, o, p]`` (weight flattened, bias as last column)."""
        k, o = V.shape[1], block.out_features
        parts = [V[self._slices[block.weight]].T.reshape(k, o, -1)]
        if block.bias is not None:
            parts.append(V[self._slices[block.bias]].T.reshape(k, o, 1))
        return torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]

    def _scatter(self, out: Tensor, M: Tensor, block: KroneckerBlock) -> None:
        k = M.shape[0]
        if block.bias is None:
            out[self._slices[block.weight]] = M.reshape(k, -1).T
        else:
            out[self._slices[block.weight]] = M[:, :, :-1].reshape(k, -1).T
            out[self._slices[block.bias]] = M[:, :, -1].T

    def _apply(self, V: Tensor, diagonal) -> Tensor:
        if V.dim() != 2 or V.shape[0] != self.dim:
            raise ValueError(f"expected [{self.dim}, k] columns, got {tuple(V.shape)}")
        out = torch.empty_like(V)
        for block, (qa, qg, eig) in zip(self.blocks, self._factors(V.dtype)):
            M = self._gather(V, block)
            Z = qg.T @ M @ qa  # into the Kronecker eigenbasis
            self._scatter(out, qg @ (diagonal(eig) * Z) @ qa.T, block)
        return out

    def matmat(self, V: Tensor) -> Tensor:
        """(K + λI) V for ``V [d, k]``."""
        return self._apply(V, lambda eig: eig + self.l2)

    def inverse(self, V: Tensor, damping: float = 0.0) -> Tensor:
        """(K + (λ + δ)I)⁻¹ V for ``V [d, k]``; refuses a shift λ + δ ≤ 0 (K is only positive semi-definite)."""
        shift = self.l2 + float(damping)
        if not shift > 0:
            raise ValueError(f"the inverse needs λ + δ > 0 (K is singular in general), got λ = {self.l2}, "
                             f"δ = {damping}: pass damping > 0")
        return self._apply(V, lambda eig: 1.0 / (eig + shift))

    def preconditioner(self, damping: float = 0.0):
        """``M(R) = (K + (λ + δ)I)⁻¹ R``, symmetric positive definite: the ``preconditioner=`` of CG on H + δI."""
        return lambda R: self.inverse(R, damping)

    def dense(self) -> Tensor:
        """K + λI as a ``[d, d]`` matrix (tests; small models only)."""
        return self.matmat(torch.eye(self.dim, dtype=self.dtype))


# ----------------------------------------------------------------------------------------------------------
# statistics
# ----------------------------------------------------------------------------------------------------------


def _layers(model: nn.Module, params: Params) -> list[tuple[str, nn.Module, str, str | None]]:
    """(module name, module, weight name, bias name) of every Linear/Conv2d whose parameters are all in ``params``;
    refuses parameters no such layer holds, and layers the factorisation cannot treat."""
    found, covered = [], set()
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        prefix = f"{name}." if name else ""
        w = prefix + "weight"
        b = prefix + "bias" if module.bias is not None else None
        if w not in params and (b is None or b not in params):
            continue
        if w not in params or (b is not None and b not in params):
            raise ValueError(f"layer {name!r} is only partly in params ({w}, {b}): K-FAC treats a layer's weight "
                             "and bias together — include both or neither")
        if isinstance(module, nn.Conv2d):
            if module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str) and \
                    module.padding != "valid":
                raise ValueError(f"conv layer {name!r}: K-FAC here supports groups=1, zero padding given as "
                                 "integers (or 'valid'); rebuild the layer so")
        found.append((name, module, w, b))
        covered.update([w] + ([b] if b else []))
    rest = [n for n in params if n not in covered]
    if rest:
        raise ValueError(f"K-FAC/EK-FAC cover nn.Linear and nn.Conv2d layers only; these parameters belong to no "
                         f"such layer: {rest}. Restrict params to those layers (e.g. params='last')")
    if not found:
        raise ValueError("no nn.Linear or nn.Conv2d layer among params: nothing to factorise")
    return found


def _inputs_matrix(module: nn.Module, a: Tensor) -> Tensor:
    """Layer inputs as ``[n, p, L]`` (p = in·kh·kw, plus a row of ones for a bias; L positions)."""
    if isinstance(module, nn.Conv2d):
        pad = 0 if module.padding == "valid" else module.padding
        cols = F.unfold(a, module.kernel_size, dilation=module.dilation, padding=pad, stride=module.stride)
    else:
        cols = a.reshape(-1, a.shape[-1], 1) if a.dim() == 2 else a.reshape(a.shape[0], -1, a.shape[-1]).transpose(1, 2)
    if module.bias is not None:
        cols = torch.cat([cols, torch.ones_like(cols[:, :1])], dim=1)
    return cols


def _output_grads(module: nn.Module, s: Tensor) -> Tensor:
    """Gradients w.r.t. a layer's outputs as ``[n, o, L]``."""
    if isinstance(module, nn.Conv2d):
        return s.reshape(s.shape[0], s.shape[1], -1)
    return s.reshape(-1, s.shape[-1], 1) if s.dim() == 2 else s.reshape(s.shape[0], -1, s.shape[-1]).transpose(1, 2)


def _output_factor(outputs: Tensor, y: Tensor, loss: LossName, fisher: str) -> Tensor:
    """Columns U ``[C', n, C]`` with Σ_c U_c U_cᵀ = the loss's Hessian in the outputs (type-2) or the one outer
    product of its gradient (empirical), per sample."""
    with torch.no_grad():
        if loss == "cross_entropy":
            p = torch.softmax(outputs, dim=1)
            if fisher == "empirical":
                return (p - F.one_hot(y, p.shape[1]).to(p)).unsqueeze(0)
            eye = torch.eye(p.shape[1], dtype=p.dtype, device=p.device)
            return (p.sqrt().T[:, :, None] * (eye[:, None, :] - p[None]))  # [c, n, C]: √p_c (e_c − p)
        out = outputs.reshape(outputs.shape[0], -1)
        if fisher == "empirical":
            return (out - y.reshape(out.shape).to(out)).unsqueeze(0)
        eye = torch.eye(out.shape[1], dtype=out.dtype, device=out.device)
        return eye[:, None, :].expand(out.shape[1], out.shape[0], out.shape[1])  # ½‖ŷ − y‖²: Hessian I


def _pass(model: nn.Module, params: Params, layers, x: Tensor, y: Tensor, loss: LossName, fisher: str):
    """Per layer: inputs ``[n, p, L]`` and output gradients ``[c, n, o, L]`` for one chunk of rows."""
    inputs: dict[str, Tensor] = {}
    outputs: dict[str, Tensor] = {}
    handles = []
    for name, module, _, _ in layers:
        def hook(mod, args, out, name=name):
            inputs[name] = args[0].detach()
            outputs[name] = out
        handles.append(module.register_forward_hook(hook))
    try:
        live = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        with torch.enable_grad():
            f = functional_call(model, live, (x,))
            U = _output_factor(f, y, loss, fisher)
            outs = [outputs[name] for name, *_ in layers]
            grads = [[] for _ in layers]
            for c in range(U.shape[0]):
                gs = torch.autograd.grad(f, outs, grad_outputs=U[c].reshape(f.shape), retain_graph=c < U.shape[0] - 1)
                for j, g in enumerate(gs):
                    grads[j].append(_output_grads(layers[j][1], g))
    finally:
        for h in handles:
            h.remove()
    return [(_inputs_matrix(module, inputs[name]), torch.stack(grads[j])) for j, (name, module, _, _) in
            enumerate(layers)]


def _row_chunk(model: nn.Module, params: Params, layers, x: Tensor, y: Tensor, loss: LossName, fisher: str) -> int:
    """Rows per pass that fit the memory budget, from one row's measured statistics."""
    stats = _pass(model, params, layers, x[:1], y[:1], loss, fisher)
    per_row = sum(a.numel() + g.numel() + g.shape[0] * g.shape[2] * a.shape[1] for a, g in stats)
    return memory.chunk(x.shape[0], 4 * per_row * x.element_size())


def kronecker_factors(
    model: nn.Module,
    params: Params,
    x: Tensor,
    y: Tensor,
    *,
    weights: Tensor | None = None,
    l2: float = 0.0,
    loss: LossName = "cross_entropy",
    kind: KroneckerKind = "ekfac",
    fisher: FisherType = "type-2",
    batch_size: int | None = None,
) -> KroneckerCurvature:
    """K-FAC or EK-FAC factors of R(θ) = Σ w_i ℓ_i + (λ/2)‖θ‖² over ``params`` at their current values.

    Args:
        model, params: the model and the parameters to cover (every one must belong to an ``nn.Linear`` or
            ``nn.Conv2d``; a layer's weight and bias together). x, y: the training data; weights: w_i (default
            1/n). l2: λ, added exactly. loss: ``"cross_entropy"`` or ``"mse"``.
        kind: ``"kfac"`` or ``"ekfac"`` (eigenvalues corrected by a second pass over the data).
        fisher: ``"type-2"`` (exact expectation over the outputs: the Gauss–Newton matrix's Kronecker
            approximation) or ``"empirical"`` (gradients at the true labels).
        batch_size: rows per pass (default: as many as fit :func:`helpers.memory.budget`).

    Cost: one forward and C backward passes over the data (C classes; 1 for the empirical Fisher), eigh of each
    factor; EK-FAC repeats the passes. Memory: the factors, O(Σ_layers p² + o²), plus one chunk's activations.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}: use one of {KINDS}")
    if fisher not in FISHER_TYPES:
        raise ValueError(f"unknown fisher {fisher!r}: use one of {FISHER_TYPES}")
    if loss not in LOSS_NAMES:
        raise ValueError(f"unknown loss {loss!r}: use one of {LOSS_NAMES}")
    layers = _layers(model, params)
    n = x.shape[0]
    w = torch.full((n,), 1.0 / n, dtype=x.dtype, device=x.device) if weights is None else weights.to(x)
    if w.shape != (n,) or not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise ValueError(f"weights must be {n} finite non-negative numbers")
    step = int(batch_size) if batch_size else _row_chunk(model, params, layers, x, y, loss, fisher)
    chunks = [slice(i, min(i + step, n)) for i in range(0, n, step)]
    A = [None] * len(layers)
    G = [None] * len(layers)
    for rows in chunks:
        for j, (a, g) in enumerate(_pass(model, params, layers, x[rows], y[rows], loss, fisher)):
            wr = w[rows]
            a_part = torch.einsum("n,npl,nql->pq", wr, a, a) / a.shape[2]
            g_part = torch.einsum("n,cnil,cnjl->ij", wr, g, g)
            A[j] = a_part if A[j] is None else A[j] + a_part
            G[j] = g_part if G[j] is None else G[j] + g_part
    total = float(w.sum())
    bases = []
    for j in range(len(layers)):
        la, qa = torch.linalg.eigh((A[j] + A[j].T) / (2 * total))  # A is an average: G carries the weight
        lg, qg = torch.linalg.eigh((G[j] + G[j].T) / 2)
        bases.append((qa, qg, torch.outer(lg.clamp_min(0), la.clamp_min(0))))
    if kind == "ekfac":
        eigs = [torch.zeros_like(e) for _, _, e in bases]
        for rows in chunks:
            for j, (a, g) in enumerate(_pass(model, params, layers, x[rows], y[rows], loss, fisher)):
                qa, qg, _ = bases[j]
                aq = torch.einsum("npl,pj->njl", a, qa)
                gq = torch.einsum("cnil,ik->cnkl", g, qg)
                if a.shape[2] == 1:  # one position: the gradient g aᵀ is an outer product, its square one too
                    eigs[j] += torch.einsum("cnk,nj->kj", gq[..., 0].square() * w[rows, None], aq[..., 0].square())
                else:
                    per = torch.einsum("cnkl,njl->cnkj", gq, aq)  # the per-sample gradient in the eigenbasis
                    eigs[j] += torch.einsum("n,cnkj->kj", w[rows], per * per)
        bases = [(qa, qg, e) for (qa, qg, _), e in zip(bases, eigs)]
    blocks = [KroneckerBlock(name, wname, bname, params[wname].shape, qa, qg, e)
              for (name, _, wname, bname), (qa, qg, e) in zip(layers, bases)]
    return KroneckerCurvature(params, blocks, kind=kind, fisher=fisher, l2=l2)
