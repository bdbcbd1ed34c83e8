"""Influence estimators that avoid the Hessian, in the book's one convention (STUDY.md §1; chapter 4).

Every function here returns Δ_pred-like values ``[n_test, n_train]``: the predicted change of test loss t when
training point i is removed (loss units; positive: the point helped), so that each can be compared with exact
influence (:func:`helpers.influence.predict_removal`) and with retraining by the same metrics.

* :func:`gradient_similarity` — w_i ∇ℓ_tᵀ ∇ℓ_i: the identity in place of (H + δI)⁻¹, the floor any method must
  beat. Equals exact influence when H + δI = I.
* :func:`tracin` — TracIn (Pruthi et al. 2020) over saved checkpoints θ_c with learning rates η_c:
  Σ_c η_c w_i ∇ℓ_t(θ_c)ᵀ ∇ℓ_i(θ_c) — the first-order effect of point i's gradient steps on the test loss in
  full-batch gradient descent on the weighted objective (w_i = 1/n), hence the factor w_i; positive for a
  proponent, as Δ_pred. Equals exact influence at one checkpoint θ̂ with η = 1 when H + δI = I.
* :func:`trak` — TRAK (Park et al. 2023): random projections φ = Pᵀ∇f of the gradients of the model's output
  function f (cross-entropy: the margin log p_y − log(1 − p_y); squared error with one output: the output), and
  Q = ∂ℓ/∂f, so that ∇ℓ = Q ∇f exactly. TRAK's score φ_tᵀ (ΦᵀΦ)⁻¹ φ_i Q_i predicts the change of the *output*
  f_t; in the book's convention (the change of the test *loss*) it is multiplied by Q_t:

      Δ_TRAK[t, i] = Q_t Q_i φ_tᵀ (ΦᵀΦ + n(λ + δ)I)⁻¹ φ_i,   averaged over independently trained models,

  which is exact influence with H replaced by the Gauss–Newton matrix of f without its loss weights,
  projected: for linear least squares (f linear, ∂²ℓ/∂f² = 1) and an invertible square projection it *is*
  exact influence (tests/test_estimators.py). The projection is Gaussian, drawn block by block from ``seed``
  (never held whole: d × k numbers could be gigabytes); traker's own projector needs CUDA, which the book's
  machines lack, so this is the book's implementation of the same formula (traker 0.3.2 ``BasicProjector``
  draws the same kind of matrix on a CPU).

Memory: per-sample gradients in chunks of rows that fit :func:`helpers.memory.budget`; TRAK keeps ``[n, k]``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from helpers import memory
from helpers.curvature import check_problem
from helpers.influence import directional_derivatives, per_sample_grads
from helpers.objective import LossName, Params, model_params, param_names

__all__ = ["gradient_similarity", "tracin", "trak", "output_gradients"]

#: rows of the projection drawn at once (a block of ≤ PROJECTION_BLOCK × k numbers)
PROJECTION_BLOCK = 4096


def _weights(weights: Tensor | None, x: Tensor) -> Tensor:
    n = x.shape[0]
    w = torch.full((n,), 1.0 / n, dtype=x.dtype, device=x.device) if weights is None else weights.to(x)
    if w.shape != (n,):
        raise ValueError(f"weights must have shape [{n}], got {tuple(w.shape)}")
    return w


def tracin(model: nn.Module, train: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor],
           checkpoints: Sequence[Params], lrs: Sequence[float], *, params: str | list[str] = "all",
           weights: Tensor | None = None, loss: LossName = "cross_entropy") -> Tensor:
    """TracIn over ``checkpoints`` (parameter dicts, e.g. saved during training) with learning rates ``lrs``:
    ``[n_test, n_train]`` = Σ_c η_c w_i ∇ℓ(z_t, θ_c)ᵀ ∇ℓ(z_i, θ_c) (module docstring).

    Cost per checkpoint: n_test per-sample gradients and n_test forward-mode passes over the training set
    (:func:`helpers.influence.directional_derivatives`); never the ``[n_train, d]`` gradients."""
    if len(checkpoints) != len(lrs) or not len(checkpoints):
        raise ValueError(f"tracin needs one learning rate per checkpoint and at least one checkpoint; got "
                         f"{len(checkpoints)} checkpoints and {len(lrs)} learning rates")
    names = param_names(model, params)
    (x, y), (xt, yt) = train, test
    w = _weights(weights, x)
    total = None
    for theta, lr in zip(checkpoints, lrs):
        missing = [k for k in names if k not in theta]
        if missing:
            raise KeyError(f"checkpoint lacks parameters {missing}: save every parameter of the model")
        P = {k: theta[k].detach().to(x) for k in names}
        g_test = per_sample_grads(model, P, xt, yt, loss)  # [n_test, d]
        part = float(lr) * directional_derivatives(model, P, x, y, g_test.T.contiguous(), loss) * w[None, :]
        total = part if total is None else total + part
    return total


def gradient_similarity(model: nn.Module, train: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor], *,
                        params: str | list[str] = "all", weights: Tensor | None = None,
                        loss: LossName = "cross_entropy") -> Tensor:
    """w_i ∇ℓ_tᵀ ∇ℓ_i at the model's current weights ``[n_test, n_train]``: influence with the identity in place
    of (H + δI)⁻¹ — TracIn at one checkpoint with η = 1."""
    return tracin(model, train, test, [model_params(model, param_names(model, params))], [1.0], params=params,
                  weights=weights, loss=loss)


def _output(model: nn.Module, p: Params, xi: Tensor, yi: Tensor, loss: LossName) -> tuple[Tensor, Tensor]:
    """f and ∂ℓ/∂f of one sample: the margin and −(1 − p_y) for cross-entropy, the output and the residual for
    squared error with one output."""
    out = functional_call(model, p, (xi.unsqueeze(0),))[0]
    if loss == "cross_entropy":
        logits = out.reshape(-1)
        mine = torch.arange(logits.shape[0], device=logits.device) == yi  # vmap-safe: no indexing by yi
        others = torch.where(mine, torch.full_like(logits, float("-inf")), logits)
        f = (logits * mine).sum() - torch.logsumexp(others, dim=0)  # log p_y − log(1 − p_y)
        return f, -torch.sigmoid(-f)  # ∂(−log σ(f))/∂f = −(1 − p_y)
    f = out.reshape(-1)
    if f.numel() != 1:
        raise ValueError(f"TRAK with loss='mse' needs one output per sample (got {f.numel()}): its output function "
                         "is the prediction itself")
    f = f[0]
    return f, f - yi.reshape(-1)[0].to(f)


def output_gradients(model: nn.Module, params: Params, x: Tensor, y: Tensor, loss: LossName = "cross_entropy",
                     chunk_size: int | None = None) -> tuple[Tensor, Tensor]:
    """∇_θ f(z_i) ``[n, d]`` (flat params order) and Q_i = ∂ℓ_i/∂f_i ``[n]`` of TRAK's output function, with
    ∇ℓ_i = Q_i ∇f_i exactly (module docstring); ``vmap(grad)`` over rows in chunks that fit the memory budget."""
    check_problem(model, params, x, y, loss=loss, what="data")
    P = {k: v.detach() for k, v in params.items()}

    def f_one(p: Params, xi: Tensor, yi: Tensor) -> tuple[Tensor, Tensor]:
        f, q = _output(model, p, xi, yi, loss)
        return f, q.detach()

    d = sum(v.numel() for v in P.values())
    if chunk_size is None:
        chunk_size = memory.chunk(x.shape[0], 4 * d * x.element_size() + memory.model_row_bytes(model, P, x[:1], y[:1], loss))
    grads, qs = [], []
    with torch.no_grad():
        for s in range(0, x.shape[0], chunk_size):
            g, q = vmap(grad(f_one, has_aux=True), in_dims=(None, 0, 0))(P, x[s:s + chunk_size], y[s:s + chunk_size])
            grads.append(torch.cat([g[k].reshape(g[k].shape[0], -1) for k in P], dim=1))
            qs.append(q)
    return torch.cat(grads), torch.cat(qs)


def _project(G: Tensor, proj_dim: int, seed: int) -> Tensor:
    """G ``[n, d]`` @ P ``[d, k]`` with P Gaussian / √k, drawn PROJECTION_BLOCK rows at a time from ``seed``."""
    out = torch.zeros(G.shape[0], proj_dim, dtype=G.dtype, device=G.device)
    for b, s in enumerate(range(0, G.shape[1], PROJECTION_BLOCK)):
        rows = min(PROJECTION_BLOCK, G.shape[1] - s)
        gen = torch.Generator(device="cpu").manual_seed(int(seed) * 1_000_003 + b)
        block = torch.randn(rows, proj_dim, generator=gen, dtype=torch.float64).to(G) / proj_dim ** 0.5
        out += G[:, s:s + rows] @ block
    return out


def trak(model: nn.Module, train: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor], *, proj_dim: int,
         seed: int = 0, checkpoints: Sequence[Params] | None = None, params: str | list[str] = "all",
         l2: float = 0.0, damping: float = 0.0, loss: LossName = "cross_entropy") -> Tensor:
    """TRAK in the book's convention ``[n_test, n_train]`` (module docstring), averaged over ``checkpoints``
    (independently trained models of the same architecture; default the model's current weights), with a fresh
    projection per checkpoint (seeds ``seed``, ``seed + 1``, ...).

    Args:
        proj_dim: k, the projection dimension. l2, damping: λ + δ enter as n(λ + δ)I beside ΦᵀΦ (TRAK itself uses
            0; with k > n or a rank-deficient Φ a positive value is needed, and the error says so).

    Cost per checkpoint: one pass of per-sample output gradients over train and test, projected in chunks; a
    k × k solve. Memory: ``[n, k]`` features plus one chunk of ``[rows, d]`` gradients."""
    if int(proj_dim) < 1:
        raise ValueError(f"proj_dim must be a positive integer, got {proj_dim}")
    names = param_names(model, params)
    thetas = [model_params(model, names)] if checkpoints is None else list(checkpoints)
    (x, y), (xt, yt) = train, test
    n, shift = x.shape[0], float(l2) + float(damping)
    total = None
    for c, theta in enumerate(thetas):
        P = {k: theta[k].detach().to(x) for k in names}
        phi, q = [], []
        for data in ((x, y), (xt, yt)):
            G, Q = output_gradients(model, P, data[0], data[1], loss)
            phi.append(_project(G, int(proj_dim), seed + c))
            q.append(Q)
            del G
        gram = phi[0].T @ phi[0] + n * shift * torch.eye(int(proj_dim), dtype=x.dtype, device=x.device)
        try:
            factor = torch.linalg.cholesky(gram)
        except torch.linalg.LinAlgError as e:
            raise ValueError(f"ΦᵀΦ + n(λ + δ)I is singular (k = {proj_dim}, n = {n}, λ + δ = {shift}): use "
                             "proj_dim < n or damping > 0") from e
        solved = torch.cholesky_solve(phi[1].T.contiguous(), factor)  # [k, n_test]
        part = q[1][:, None] * (phi[0] @ solved).T * q[0][None, :]
        total = part if total is None else total + part
    return total / len(thetas)
