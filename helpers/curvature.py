"""Curvature of the training objective as a linear operator (STUDY.md §1, DESIGN.md "curvature").

:func:`hessian_operator` turns ``(model, params, data)`` into a :class:`CurvatureOperator`: the d×d Hessian
H = ∇²R(θ̂) of :func:`helpers.objective.objective` (the L2 term included) with respect to the parameters in
the ``params`` dict — all of them or a subset such as the last layer — or its Gauss–Newton approximation
G = Σ_i w_i J_iᵀ H_out,i J_i + λI. The operator never forms H unless asked to (:meth:`CurvatureOperator.dense`);
it applies it to vectors by forward-over-reverse autodiff (``jvp`` of ``grad``), which costs about two
backward passes over the data per vector, and to many vectors at once by ``vmap``.

Vectors live in one flat coordinate system: the tensors of ``params`` in dict order, each flattened
row-major (:meth:`CurvatureOperator.flatten` / :meth:`CurvatureOperator.unflatten`); :mod:`helpers.influence`
flattens per-sample gradients the same way.

Memory is bounded by :func:`helpers.memory.budget` (``BOOK_MEMORY_GB``): :meth:`CurvatureOperator.matmat` (and so
:meth:`CurvatureOperator.dense`) vmaps over as many columns at a time as fit in it, and an operator whose single
product over all n rows would not fit sums its product over blocks of rows (:func:`hessian_operator`).

:func:`extreme_eigenvalues` runs Lanczos (``scipy.sparse.linalg.eigsh``) on :meth:`CurvatureOperator.to_scipy`;
:func:`spectrum_summary` reports the top and bottom eigenvalue (chapter 2's "how much negative curvature").
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Callable, Literal

import numpy as np
import scipy.sparse.linalg as spla
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vjp, vmap

from helpers import memory
from helpers.layered import layered_product
from helpers.objective import LOSS_NAMES, LossName, Params, objective, per_sample_losses

CurvatureKind = Literal["hessian", "gauss_newton"]
#: how :func:`hessian_operator` computes a product (its ``product`` argument)
ProductName = Literal["auto", "autodiff", "layers"]
PRODUCTS: tuple[str, ...] = ("auto", "autodiff", "layers")
Which = Literal["LA", "SA", "LM"]

#: with ``linearize=None``, operator calls (matvec/matmat) made with a plain jvp before the product is traced once
LINEARIZE_AFTER = 20
#: a matmat call with at least this many columns counts as a quarter call toward LINEARIZE_AFTER
BATCHED = 4
#: widest vmapped batch of a model's curvature products (measured, traced products, one thread: a small CNN on 300
#: rows takes 8 ms per column in batches of 8, 16 ms in batches of 128; a 784-64-10 MLP on 4,000 rows 70 ms in batches
#: of 4–16, 87 ms in batches of 64)
MAX_VMAP_COLUMNS = 16
#: :meth:`CurvatureOperator.dense` traces the product first when its d products would hold more than this all at once
TRACE_DENSE_BYTES = 2**27

__all__ = [
    "CurvatureOperator",
    "SpectrumSummary",
    "check_problem",
    "extreme_eigenvalues",
    "hessian_operator",
    "lanczos_ritz",
    "minibatch_hvp",
    "spectrum_summary",
]


# ----------------------------------------------------------------------------------------------------------
# input checks shared by curvature and influence
# ----------------------------------------------------------------------------------------------------------


def check_problem(
    model: nn.Module,
    params: Params,
    x: Tensor,
    y: Tensor,
    *,
    weights: Tensor | None = None,
    loss: LossName = "cross_entropy",
    what: str = "data",
) -> None:
    """Raise a clear error if ``(model, params, x, y, weights)`` cannot define a finite objective.

    Checks: ``params`` is a non-empty dict of finite floating tensors of one dtype and device that are
    parameters of ``model``; every other parameter/buffer of ``model`` has that dtype too (functional_call mixes
    them); ``x`` is finite, of the same dtype and device, with as many rows as ``y``; ``y`` is ``[n]`` integer
    labels (cross-entropy) or floating targets (mse); ``weights`` is ``[n]`` and finite. ``what`` names the data
    in messages ("train", "test"). Cost: one pass over the tensors, no forward pass.
    """
    if loss not in LOSS_NAMES:
        raise ValueError(f"unknown loss {loss!r}: use one of {LOSS_NAMES}")
    if not isinstance(params, dict) and not hasattr(params, "items"):
        raise TypeError(f"params must be a dict {{name: tensor}}, got {type(params).__name__}")
    if len(params) == 0:
        raise ValueError("params is empty: pass at least one parameter, e.g. model_params(model, param_names(model))")
    model_names = dict(model.named_parameters())
    unknown = [k for k in params if k not in model_names]
    if unknown:
        raise KeyError(f"params {unknown} are not parameters of {type(model).__name__}; it has {list(model_names)}")
    dtypes = {k: v.dtype for k, v in params.items()}
    dtype = next(iter(dtypes.values()))
    if not dtype.is_floating_point or any(d != dtype for d in dtypes.values()):
        raise TypeError(f"params must share one floating dtype, got {dtypes}: cast the model with model.double()")
    device = next(iter(params.values())).device
    for k, v in params.items():
        if v.device != device:
            raise ValueError(
                f"params live on different devices ({k} on {v.device}, others on {device}): move the model"
            )
        if not torch.isfinite(v).all():
            raise ValueError(f"parameter {k!r} holds non-finite values: the model diverged; retrain or lower the lr")
    for k, v in list(model.named_parameters()) + list(model.named_buffers()):
        if k not in params and v.is_floating_point() and v.dtype != dtype:
            raise TypeError(
                f"model tensor {k!r} is {v.dtype} but params are {dtype}: cast the whole model, e.g. model.to({dtype})"
            )
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise TypeError(f"{what} x and y must be tensors, got {type(x).__name__} and {type(y).__name__}")
    if x.dtype != dtype:
        raise TypeError(f"{what} x is {x.dtype} but params are {dtype}: cast with x.to({dtype}) (or cast the model)")
    if x.device != device:
        raise ValueError(f"{what} x is on {x.device} but params are on {device}: move one of them")
    if x.dim() == 0 or y.dim() == 0 or x.shape[0] != y.shape[0]:
        raise ValueError(f"{what} x {tuple(x.shape)} and y {tuple(y.shape)} must have the same number of rows")
    if x.shape[0] == 0:
        raise ValueError(f"{what} x has no rows")
    if not torch.isfinite(x).all():
        raise ValueError(f"{what} x holds non-finite values: clean the data (NaN/inf features)")
    if loss == "cross_entropy":
        if y.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8) or y.dim() != 1:
            raise TypeError(
                f"cross-entropy needs {what} y as [n] integer class labels, got {y.dtype} {tuple(y.shape)}: "
                "use y.long() (or loss='mse' for real-valued targets)"
            )
    elif not y.is_floating_point() or not torch.isfinite(y).all():
        raise TypeError(f"mse needs finite floating {what} targets y, got {y.dtype}: use y.to({dtype})")
    if weights is not None:
        if not isinstance(weights, Tensor) or weights.shape != (x.shape[0],):
            shape = tuple(weights.shape) if isinstance(weights, Tensor) else type(weights).__name__
            raise ValueError(f"weights must be a [n] = [{x.shape[0]}] tensor (one per {what} row), got {shape}")
        if not torch.isfinite(weights).all():
            raise ValueError("weights hold non-finite values")


def _check_finite_losses(model: nn.Module, params: Params, x: Tensor, y: Tensor, loss: LossName, what: str,
                         rows: int | None = None) -> None:
    """One forward pass (``rows`` at a time): a non-finite per-sample loss would silently poison every HVP
    downstream."""
    rows = x.shape[0] if rows is None else max(1, int(rows))
    try:
        with torch.no_grad():
            losses = torch.cat([per_sample_losses(model, params, x[s : s + rows], y[s : s + rows], loss)
                                for s in range(0, x.shape[0], rows)])
    except (IndexError, RuntimeError) as err:  # a label past the model's classes, a feature count it cannot take
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(
            f"the model cannot compute the {what} losses ({type(err).__name__}: {first}): check that {what} y holds "
            f"class indices 0 … C−1 for the model's C outputs and that {what} x {tuple(x.shape[1:])} has the features "
            "the model was built for"
        ) from None
    bad = torch.nonzero(~torch.isfinite(losses)).reshape(-1)
    if bad.numel():
        i = int(bad[0])
        raise ValueError(
            f"{bad.numel()} {what} losses are non-finite (first: row {i}, loss {losses[i].item()}): "
            "check that row's features and label and that the model is trained to finite weights"
        )


# ----------------------------------------------------------------------------------------------------------
# the operator
# ----------------------------------------------------------------------------------------------------------


class CurvatureOperator:
    """A symmetric d×d matrix known through its action on vectors, in the flat coordinates of a params dict.

    Attributes:
        dim: d, the number of scalar parameters.
        names, shapes: the params dict's keys and tensor shapes (the flat order).
        kind: ``"hessian"``, ``"gauss_newton"`` or ``"matrix"``.
        applications: how many operator–vector products have been computed so far (a cost counter the
            solvers report: one HVP ≈ two backward passes over the data).
        product_bytes: estimated peak memory of one product (one column), 0 when negligible or unknown: sets how
            many columns :meth:`matmat` vmaps at once (:func:`helpers.memory.chunk`).
        row_blocks: the product is summed over this many blocks of rows (1: all rows at once).
        product: how a product is computed: ``"autodiff"`` or ``"layers"`` (:func:`hessian_operator`),
            ``"matrix"`` (:meth:`from_matrix`), ``"callable"`` (any other function given to the constructor).

    Units: second derivative of the objective (loss units per parameter²).
    """

    def __init__(
        self,
        apply: Callable[[Tensor], Tensor],
        params: Params,
        *,
        kind: str,
        chunk_size: int | None = None,
        matrix: Tensor | None = None,
    ) -> None:
        self._apply = apply
        self.names: list[str] = list(params)
        self.shapes: list[torch.Size] = [v.shape for v in params.values()]
        self._numels: list[int] = [v.numel() for v in params.values()]
        self.dim: int = int(sum(self._numels))
        first = next(iter(params.values()))
        self.dtype: torch.dtype = first.dtype
        self.device: torch.device = first.device
        self.kind = kind
        self.chunk_size = chunk_size
        self.applications = 0
        self.product_bytes = 0.0
        self.row_blocks = 1
        self.product = "matrix" if matrix is not None else "callable"
        self._matrix = matrix
        self._calls = 0
        self._upgrade: Callable[[], Callable[[Tensor], Tensor]] | None = None  # a faster product, built lazily
        # a product that takes the k columns [d, k] natively (the layer-wise MLP backend): matmat calls it
        # instead of vmapping the single-vector product
        self._apply_columns: Callable[[Tensor], Tensor] | None = None
        self._upgrade_after = 0
        # builds the same operator in another dtype (set by the constructors that know how; see astype)
        self._rebuild: Callable[[torch.dtype], "CurvatureOperator"] | None = None

    @classmethod
    def from_matrix(cls, matrix: Tensor) -> "CurvatureOperator":
        """Wrap an explicit symmetric ``[d, d]`` matrix (tests, or a Hessian built elsewhere). Flat names: ``["x"]``."""
        if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"matrix must be square [d, d], got {tuple(matrix.shape)}")
        if not torch.isfinite(matrix).all():
            raise ValueError("matrix holds non-finite values")
        m = matrix.detach()
        op = cls(lambda v: m @ v, {"x": m[0]}, kind="matrix", matrix=m)
        op._rebuild = lambda dtype: cls.from_matrix(m.to(dtype))
        return op

    def __repr__(self) -> str:
        return f"CurvatureOperator(kind={self.kind!r}, dim={self.dim}, dtype={self.dtype}, names={self.names})"

    # -- coordinates -----------------------------------------------------------------------------------------
    def flatten(self, params: Params) -> Tensor:
        """``{name: tensor}`` → ``[d]`` in this operator's order (names and shapes must match)."""
        missing = [n for n in self.names if n not in params]
        if missing:
            raise KeyError(f"params lack {missing}; this operator is over {self.names}")
        return torch.cat([params[n].reshape(-1) for n in self.names])

    def unflatten(self, vec: Tensor) -> dict[str, Tensor]:
        """``[d]`` → ``{name: tensor}`` (views into ``vec``, differentiable)."""
        if vec.shape != (self.dim,):
            raise ValueError(f"expected a flat vector of shape [{self.dim}], got {tuple(vec.shape)}")
        return {n: t.view(s) for n, t, s in zip(self.names, torch.split(vec, self._numels), self.shapes)}

    # -- products --------------------------------------------------------------------------------------------
    def _check_vec(self, v: Tensor, ndim: int) -> None:
        if not isinstance(v, Tensor) or v.dim() != ndim or v.shape[0] != self.dim:
            want = f"[{self.dim}]" if ndim == 1 else f"[{self.dim}, k]"
            got = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
            raise ValueError(f"expected a tensor of shape {want}, got {got}")
        if v.dtype != self.dtype or v.device != self.device:
            raise TypeError(
                f"vector is {v.dtype} on {v.device} but the operator is {self.dtype} on {self.device}: "
                f"cast with .to({self.dtype})"
            )

    def _finite(self, out: Tensor) -> Tensor:
        if not torch.isfinite(out).all():
            raise FloatingPointError(
                f"{self.kind} product is non-finite: the loss or its derivatives overflow at these weights/inputs"
            )
        return out

    def _maybe_upgrade(self, width: int = 1) -> None:
        # outside any vmap: tracing inside a vmapped call would trace the batched program.
        # A batched product (>= BATCHED columns) counts a quarter: vmap already amortises most of what tracing
        # saves (measured for a 784-64-10 MLP on 4,000 points: 10 columns 0.57 s traced vs 0.64 s plain, one
        # column 0.43 s vs 0.82 s), so a short batched solve (block CG) should not pay the seconds of tracing.
        self._calls += 1 if width < BATCHED else 0.25
        if self._upgrade is not None and self._calls > self._upgrade_after:
            upgrade, self._upgrade = self._upgrade, None
            self._apply = upgrade()

    def expect(self, products: int) -> None:
        """A caller about to make about ``products`` more products says so (LiSSA knows its depth, a fixed-size
        Krylov method its dimension): the faster product that :func:`hessian_operator` builds lazily (the trace
        of ``linearize=None``) is built now if that many products repay its one-off cost (≥
        :data:`LINEARIZE_AFTER`), instead of after the first :data:`LINEARIZE_AFTER` calls. A no-op for
        operators without a lazy product. Measured for the 784-64-10 MLP on 4,000 points: tracing 0.7 s, then
        0.36 s instead of 0.45 s per 10-column product and 0.036 s instead of 0.11 s per single vector."""
        if self._upgrade is not None and int(products) >= LINEARIZE_AFTER:
            upgrade, self._upgrade = self._upgrade, None
            self._apply = upgrade()

    def matvec(self, v: Tensor) -> Tensor:
        """H v for ``v`` of shape ``[d]`` → ``[d]``. Cost: one HVP (≈ two backward passes over the data)."""
        self._check_vec(v, 1)
        self.applications += 1
        self._maybe_upgrade()
        with torch.no_grad():  # torch.func still differentiates inside; this only keeps the model's own
            return self._finite(self._apply(v))  # requires_grad tensors from tracing a graph around the result

    def matmat(self, V: Tensor, chunk_size: int | None = None) -> Tensor:
        """H V for ``V`` of shape ``[d, k]`` → ``[d, k]``, vmapped over the k columns.

        Cost: k HVPs in batched calls; memory grows with the columns vmapped at once: ``chunk_size`` (or the
        operator's ``chunk_size``) of them, by default as many as fit in :func:`helpers.memory.budget` at
        ``product_bytes`` each (:meth:`column_chunk`).
        """
        self._check_vec(V, 2)
        self.applications += V.shape[1]
        if V.shape[1] == 0:
            return V.clone()
        if self._matrix is not None:
            return self._matrix @ V
        chunk = chunk_size if chunk_size is not None else self.chunk_size
        if chunk is None:
            chunk = self.column_chunk(V.shape[1])
            chunk = None if chunk >= V.shape[1] else chunk  # all at once: vmap's unchunked path, as before
        if self._apply_columns is not None:
            with torch.no_grad():
                if chunk is None:
                    return self._finite(self._apply_columns(V))
                return self._finite(torch.cat([self._apply_columns(V[:, s : s + chunk])
                                               for s in range(0, V.shape[1], chunk)], dim=1))
        self._maybe_upgrade(V.shape[1])
        with torch.no_grad():
            return self._finite(vmap(self._apply, in_dims=1, out_dims=1, chunk_size=chunk)(V))

    def column_chunk(self, k: int) -> int:
        """How many of ``k`` columns :meth:`matmat` vmaps at once by default: all k when their products together
        fit in :data:`TRACE_DENSE_BYTES` and in the budget (small models: one vmap, as fast as it gets); otherwise as
        many as fit in :func:`helpers.memory.budget` at ``product_bytes`` each (at least one), and at most
        :data:`MAX_VMAP_COLUMNS` (wider batches of a large model's products are no faster)."""
        if not self.product_bytes or self.product_bytes * k <= min(TRACE_DENSE_BYTES, memory.budget()):
            return int(k)
        return min(MAX_VMAP_COLUMNS, memory.chunk(k, self.product_bytes))

    def dense(self, chunk_size: int | None = None) -> Tensor:
        """The full ``[d, d]`` matrix, column j = H e_j (H applied to the identity by :meth:`matmat`).

        Not symmetrised: autodiff gives H to rounding, and solvers that need exact symmetry symmetrise.
        Cost: d HVPs and d² numbers — for small d only (last layers, logistic regression, tests). The columns are
        computed in chunks that fit the memory budget (:meth:`column_chunk`); whether the d² numbers themselves fit
        is the caller's question (:func:`helpers.solvers.dense_fits`).
        """
        if self._matrix is not None:
            return self._matrix.clone()
        # d products ahead: for a large assembly, build the traced product now if the operator has one (measured for
        # a small CNN on 300 rows: 7 ms per column traced, 84 ms per column as a vmapped jvp — vmap batches
        # convolutions poorly); a small one (Iris-sized models) stays on the plain product, cheaper than a trace
        if self.product_bytes * self.dim > TRACE_DENSE_BYTES:
            self.expect(self.dim)
        return self.matmat(torch.eye(self.dim, dtype=self.dtype, device=self.device), chunk_size=chunk_size)

    def astype(self, dtype: torch.dtype) -> "CurvatureOperator":
        """The same matrix as an operator in another floating dtype (model, data and θ̂ cast; a fresh counter).

        Used for mixed-precision solves (``solve(..., method="cg", low_precision=torch.float32)``): products in
        float32 cost about half as much on a CPU. Available for operators from :func:`hessian_operator` and
        :meth:`from_matrix`; a subclass with its own product overrides this method (or passes the low-precision
        operator to the solver itself). Cost: the constructor's (one forward pass for a model).
        """
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating torch dtype, got {dtype!r}")
        if dtype == self.dtype:
            return self
        if self._rebuild is not None:
            return self._rebuild(dtype)
        return self._cast_copy(dtype)

    def _cast_copy(self, dtype: torch.dtype) -> "CurvatureOperator":
        """Fallback of :meth:`astype` for subclasses whose product is a method reading tensors from attributes
        (e.g. :class:`helpers.closed_form.SoftmaxRegressionOperator`): a shallow copy with every floating tensor
        attribute cast and the product re-bound to the copy — then checked on one probe vector, so that a product
        that keeps tensors elsewhere (a closure) is refused instead of silently computing in the old dtype."""
        bound = getattr(self._apply, "__self__", None) is self
        if not bound:
            raise NotImplementedError(
                f"{type(self).__name__} cannot rebuild itself in {dtype}: build the low-precision operator "
                "yourself (same matrix, other dtype) and pass it, e.g. solve(..., low_precision=op32)"
            )
        new = copy.copy(self)
        for name, value in vars(self).items():
            if isinstance(value, Tensor) and value.is_floating_point():
                setattr(new, name, value.to(dtype))
        new._apply = getattr(new, self._apply.__func__.__name__)
        new.dtype, new.applications, new._calls = dtype, 0, 0
        probe = torch.ones(self.dim, dtype=dtype, device=self.device)
        with torch.no_grad():
            out = new._apply(probe)
        if out.dtype != dtype:
            raise NotImplementedError(
                f"{type(self).__name__}'s product does not follow a cast of its attributes (it returned {out.dtype}): "
                "build the low-precision operator yourself and pass it, e.g. solve(..., low_precision=op32)"
            )
        return new

    def to_scipy(self) -> spla.LinearOperator:
        """A ``scipy.sparse.linalg.LinearOperator`` in float64 numpy (for eigsh, cg, ...), symmetric.

        Vectors are copied to this operator's dtype/device and back on every call.
        """

        def mv(v: np.ndarray) -> np.ndarray:
            t = torch.as_tensor(np.asarray(v, dtype=np.float64).reshape(-1), dtype=self.dtype, device=self.device)
            return self.matvec(t).detach().cpu().numpy().astype(np.float64)

        def mm(V: np.ndarray) -> np.ndarray:
            t = torch.as_tensor(np.asarray(V, dtype=np.float64), dtype=self.dtype, device=self.device)
            return self.matmat(t).detach().cpu().numpy().astype(np.float64)

        return spla.LinearOperator((self.dim, self.dim), matvec=mv, rmatvec=mv, matmat=mm, dtype=np.float64)


# ----------------------------------------------------------------------------------------------------------
# building operators from a model
# ----------------------------------------------------------------------------------------------------------


def hessian_operator(
    model: nn.Module,
    params: Params,
    x: Tensor,
    y: Tensor,
    *,
    weights: Tensor | None = None,
    l2: float = 0.0,
    loss: LossName = "cross_entropy",
    kind: CurvatureKind = "hessian",
    chunk_size: int | None = None,
    linearize: bool | None = None,
    row_block: int | None = None,
    product: ProductName = "auto",
) -> CurvatureOperator:
    """The curvature of R(θ) = Σ_i w_i ℓ(z_i, θ) + (λ/2)‖θ‖² at ``params`` with respect to ``params``.

    Args:
        model: the network; parameters not in ``params`` are held fixed at the module's values.
        params: ``{name: tensor}`` — the point θ̂ and the subset differentiated (e.g. the last layer).
        x, y: the training data, ``[n, ...]`` and ``[n]`` (labels) or ``[n, c]`` (mse targets).
        weights: ``[n]`` per-sample weights w_i; ``None`` = 1/n (the mean loss), as in the objective.
        l2: λ; contributes λI (the L2 term covers exactly the tensors in ``params``).
        loss: ``"cross_entropy"`` or ``"mse"`` (½‖ŷ − y‖²).
        kind: ``"hessian"`` — the exact ∇²R, applied as ``jvp(grad(R))`` (forward-over-reverse);
            ``"gauss_newton"`` — G = Σ_i w_i J_iᵀ H_out,i J_i + λI with J_i the Jacobian of sample i's outputs and
            H_out the Hessian of the loss in the outputs (softmax: diag(p) − ppᵀ; mse: I), positive semi-definite
            (definite if λ > 0); applied as a jvp through the network, H_out, then a vjp.
        chunk_size: default ``vmap`` chunk for :meth:`CurvatureOperator.matmat` (memory vs speed); ``None``: as many
            columns as fit in :func:`helpers.memory.budget`, at the product's measured size.
        row_block: rows per block of the product (``None``: all n rows when one product over them fits in half the
            budget, else as many as do). With more than one block the product is the sum of the blocks' products
            (the same matrix: R is a sum over rows) and is never traced (``linearize`` is ignored: a trace keeps
            every block's intermediates alive).
        linearize: ``True``: trace the forward-mode product once with :func:`torch.func.linearize` and replay it
            for every vector — the same numbers, measured 1.5–10× less CPU per product (most for single vectors
            and small models), for a one-off tracing cost of ~0.5 s and one product's intermediates (≈ one
            backward pass's activations) kept alive with the operator. ``False``: a fresh ``jvp`` per product
            (big models, tight memory). ``None`` (default): plain ``jvp`` for the first
            :data:`LINEARIZE_AFTER` calls, then trace — a few products stay cheap, long solves get fast; a
            batched call (≥ :data:`BATCHED` columns, where vmap already amortises most of the gain) counts a
            quarter. If
            tracing fails (data-dependent control flow in the model), the plain ``jvp`` is kept, with a warning.
        product: how a product is computed. ``"auto"``: by the layer-wise formulas of :mod:`helpers.layered` when
            the model is a multilayer perceptron it covers (:class:`helpers.models.MLP` or an ``nn.Sequential`` of
            Linear layers and elementwise activations, all parameters in ``params``) and one block holds all rows
            — the same matrix, measured 1.3× (float32) to 2× (float64) less CPU per 10-column product than the
            traced autodiff one for the 784-64-10 MLP on 4,000 rows, and nothing to trace —; autodiff otherwise.
            ``"autodiff"`` / ``"layers"`` insist (``"layers"`` raises for a model it does not cover).

    Returns:
        A :class:`CurvatureOperator` of dimension d = Σ numel(params). Cost per product: about two passes
        (forward + backward) over all n samples for both kinds; construction costs one forward pass
        (a finiteness check of the losses), a measurement of the activations per row on a few rows
        (:func:`helpers.memory.model_row_bytes`) and, for Gauss–Newton, one more forward pass (the linearisation
        point; per product instead when the rows are blocked). Memory per product ≈
        :data:`helpers.memory.HVP_FACTOR` × rows per block × activation bytes per row.
    """
    if kind not in ("hessian", "gauss_newton"):
        raise ValueError(f"unknown curvature kind {kind!r}: use 'hessian' or 'gauss_newton'")
    if product not in PRODUCTS:
        raise ValueError(f"unknown product {product!r}: use one of {PRODUCTS}")
    check_problem(model, params, x, y, weights=weights, loss=loss, what="train")
    n = x.shape[0]
    per_row = memory.HVP_FACTOR * _row_bytes(model, params, x, y, loss)
    if row_block is None:
        row_block = n if per_row * n <= memory.budget() / 2 else max(1, int(memory.budget() / 2 // per_row))
    row_block = min(n, max(1, int(row_block)))
    _check_finite_losses(model, params, x, y, loss, "train", rows=row_block)
    params = {k: v.detach() for k, v in params.items()}
    op = CurvatureOperator(lambda v: v, params, kind=kind, chunk_size=chunk_size)
    op.product_bytes = per_row * row_block
    op.row_blocks = -(-n // row_block)
    layered = None
    if product != "autodiff" and op.row_blocks == 1:
        layered = layered_product(model, params, x, y, weights=weights, l2=float(l2), loss=loss, kind=kind)
    if product == "layers" and layered is None:
        raise ValueError("product='layers' needs a multilayer perceptron (helpers.models.MLP or an nn.Sequential of "
                         "nn.Linear layers and elementwise activations) with all of its parameters in params, "
                         "loss 'cross_entropy' (integer labels) or 'mse', and all rows in one block: use "
                         "product='auto'")
    op.product = "layers" if layered is not None else "autodiff"
    if layered is not None:
        op._apply_columns = layered
        op._apply = lambda v: layered(v[:, None])[:, 0]
    elif op.row_blocks > 1:
        op._apply = _blocked_product(op, model, params, x, y, weights, float(l2), loss, kind, row_block)
    else:
        plain, traced = _product(op, model, params, x, y, weights, float(l2), loss, kind)
        if linearize is True:
            op._apply = traced()
        else:
            op._apply = plain
            if linearize is None:
                op._upgrade, op._upgrade_after = traced, LINEARIZE_AFTER

    def rebuild(dtype: torch.dtype) -> CurvatureOperator:
        # a cast copy of the module, so that its frozen parameters and buffers match the cast params (check_problem)
        cast = copy.deepcopy(model).to(dtype)
        x_cast = x.to(dtype) if x.is_floating_point() else x
        y_cast = y.to(dtype) if (loss == "mse" and y.is_floating_point()) else y
        w_cast = None if weights is None else weights.to(dtype)
        return hessian_operator(cast, {k: v.to(dtype) for k, v in params.items()}, x_cast, y_cast, weights=w_cast,
                                l2=l2, loss=loss, kind=kind, chunk_size=chunk_size, linearize=linearize,
                                row_block=row_block, product=product)

    op._rebuild = rebuild
    return op


def _product(
    op: CurvatureOperator,
    model: nn.Module,
    params: Params,
    x: Tensor,
    y: Tensor,
    weights: Tensor | None,
    l2: float,
    loss: LossName,
    kind: CurvatureKind,
) -> tuple[Callable[[Tensor], Tensor], Callable[[], Callable[[Tensor], Tensor]]]:
    """The unchecked v ↦ (curvature) v closure behind :func:`hessian_operator` (inputs already validated):
    ``(plain, trace)`` — the jvp-per-call product, and a function that builds its linearised equivalent."""
    theta = op.flatten(params)
    if kind == "hessian":

        def objective_flat(flat: Tensor) -> Tensor:
            return objective(model, op.unflatten(flat), x, y, weights=weights, l2=l2, loss=loss)

        return _forward_mode(grad(objective_flat), theta)

    n = x.shape[0]
    w = torch.full((n,), 1.0 / n, dtype=theta.dtype, device=theta.device) if weights is None else weights.to(theta)

    def outputs_flat(flat: Tensor) -> Tensor:
        return functional_call(model, op.unflatten(flat), (x,))

    with torch.no_grad():  # as in matvec: differentiate in θ only, never build a graph to the module's tensors
        outputs, pullback = vjp(outputs_flat, theta)  # the vjp closure is reused by every product
    w_out = w.view(-1, *([1] * (outputs.dim() - 1)))
    probs = torch.softmax(outputs.detach(), dim=-1) if loss == "cross_entropy" else None

    def gauss_newton_product(jac_vec: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
        def gnvp(v: Tensor) -> Tensor:
            jv = jac_vec(v)
            if probs is not None:  # (diag(p) − ppᵀ) u per sample, without forming the c×c matrix
                jv = probs * jv - probs * (probs * jv).sum(dim=-1, keepdim=True)
            out = pullback(w_out * jv)[0]
            return out + l2 * v if l2 else out

        return gnvp

    plain_jv, trace_jv = _forward_mode(outputs_flat, theta)
    return gauss_newton_product(plain_jv), lambda: gauss_newton_product(trace_jv())


def _row_bytes(model: nn.Module, params: Params, x: Tensor, y: Tensor, loss: LossName) -> float:
    """Activation bytes per row (:func:`helpers.memory.model_row_bytes`); 0 (no chunking) if the measurement fails —
    a model that autograd's saved-tensor hooks cannot see through still gets its products, unchunked."""
    try:
        return memory.model_row_bytes(model, params, x, y, loss)
    except Exception:  # noqa: BLE001 - the measurement is an optimisation only
        return 0.0


def _blocked_product(
    op: CurvatureOperator,
    model: nn.Module,
    params: Params,
    x: Tensor,
    y: Tensor,
    weights: Tensor | None,
    l2: float,
    loss: LossName,
    kind: CurvatureKind,
    rows: int,
) -> Callable[[Tensor], Tensor]:
    """v ↦ (curvature) v as a sum over blocks of ``rows`` rows: R = Σ_blocks Σ_{i∈block} w_i ℓ_i + (λ/2)‖θ‖², so
    its Hessian (and Gauss–Newton matrix) is the sum of the blocks' plus λI. Memory: one block's product at a time.
    Gauss–Newton recomputes each block's forward pass (its linearisation point) inside every product."""
    theta = op.flatten(params)
    n = x.shape[0]
    w = torch.full((n,), 1.0 / n, dtype=theta.dtype, device=theta.device) if weights is None else weights.to(theta)
    starts = range(0, n, rows)

    if kind == "hessian":

        def block_grad(b: int) -> Callable[[Tensor], Tensor]:
            xb, yb, wb = x[b : b + rows], y[b : b + rows], w[b : b + rows]
            return grad(lambda flat: objective(model, op.unflatten(flat), xb, yb, weights=wb, l2=0.0, loss=loss))

        def hvp(v: Tensor) -> Tensor:
            out = l2 * v
            for b in starts:
                out = out + jvp(block_grad(b), (theta,), (v,))[1]
            return out

        return hvp

    def gnvp(v: Tensor) -> Tensor:
        out = l2 * v
        for b in starts:
            xb, wb = x[b : b + rows], w[b : b + rows]

            def outputs_flat(flat: Tensor, xb: Tensor = xb) -> Tensor:
                return functional_call(model, op.unflatten(flat), (xb,))

            outputs, pullback = vjp(outputs_flat, theta)
            jv = jvp(outputs_flat, (theta,), (v,))[1]
            if loss == "cross_entropy":
                probs = torch.softmax(outputs.detach(), dim=-1)
                jv = probs * jv - probs * (probs * jv).sum(dim=-1, keepdim=True)
            out = out + pullback(wb.view(-1, *([1] * (outputs.dim() - 1))) * jv)[0]
        return out

    return gnvp


def _forward_mode(
    fn: Callable[[Tensor], Tensor], theta: Tensor
) -> tuple[Callable[[Tensor], Tensor], Callable[[], Callable[[Tensor], Tensor]]]:
    """v ↦ J_fn(θ) v as ``(plain, trace)``: a fresh ``jvp`` per call, and a builder of its linearised replay."""

    def plain(v: Tensor) -> Tensor:
        return jvp(fn, (theta,), (v,))[1]

    def trace() -> Callable[[Tensor], Tensor]:
        try:
            with torch.no_grad(), warnings.catch_warnings():
                # torch's constant folding of the trace warns about its own internal get_attr nodes: not ours
                warnings.filterwarnings("ignore", message="Attempted to insert a get_attr Node", category=UserWarning)
                warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=FutureWarning)
                return torch.func.linearize(fn, theta)[1]
        except Exception as err:  # tracing is an optimisation only: keep the plain product
            warnings.warn(f"torch.func.linearize failed ({type(err).__name__}: {err}); using jvp per product")
            return plain

    return plain, trace


def minibatch_hvp(
    model: nn.Module,
    params: Params,
    x: Tensor,
    y: Tensor,
    *,
    batch_size: int,
    weights: Tensor | None = None,
    l2: float = 0.0,
    loss: LossName = "cross_entropy",
    kind: CurvatureKind = "hessian",
) -> Callable[[Tensor, torch.Generator], Tensor]:
    """An unbiased stochastic curvature product for LiSSA: ``f(V [d, k], generator) → H̃ V [d, k]``.

    Each call draws ``batch_size`` rows uniformly with replacement and applies the curvature of
    Σ_{i∈batch} (n/b) w_i ℓ_i + (λ/2)‖θ‖², whose expectation is H (default w_i = 1/n gives the batch mean).
    Cost per call: one batched HVP on b samples. The generator must live on the data's device.
    """
    check_problem(model, params, x, y, weights=weights, loss=loss, what="train")
    _check_finite_losses(model, params, x, y, loss, "train")
    n = x.shape[0]
    if not 1 <= batch_size:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    w = torch.full((n,), 1.0 / n, dtype=x.dtype, device=x.device) if weights is None else weights.to(x)
    params = {k: v.detach() for k, v in params.items()}

    op = CurvatureOperator(lambda v: v, params, kind=kind)

    def product(V: Tensor, generator: torch.Generator) -> Tensor:
        idx = torch.randint(n, (batch_size,), generator=generator, device=x.device)
        # unchecked closure: the full data passed check_problem once, and LiSSA calls this thousands of times
        op._apply = _product(op, model, params, x[idx], y[idx], w[idx] * (n / batch_size), float(l2), loss, kind)[0]
        return op.matmat(V)

    return product


# ----------------------------------------------------------------------------------------------------------
# spectra
# ----------------------------------------------------------------------------------------------------------


def extreme_eigenvalues(
    op: CurvatureOperator,
    k: int = 1,
    which: Which = "LA",
    *,
    method: Literal["lanczos", "dense"] = "lanczos",
    tol: float = 0.0,
    maxiter: int | None = None,
    seed: int = 0,
    return_eigenvectors: bool = False,
    krylov_dim: int | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """The k largest (``"LA"``), smallest (``"SA"``) or largest-magnitude (``"LM"``) eigenvalues of ``op``.

    ``method="lanczos"`` runs implicitly restarted Lanczos (``scipy.sparse.linalg.eigsh``) on
    :meth:`CurvatureOperator.to_scipy` — cost: a few tens of HVPs per eigenvalue for well-separated extremes,
    more for clustered ones (the smallest eigenvalues of a Hessian converge slowest); ``tol=0`` means machine
    precision; the start vector is drawn from ``seed`` so results are reproducible. ``method="dense"`` (or
    k ≥ d, which ARPACK cannot do) uses ``torch.linalg.eigh`` of :meth:`CurvatureOperator.dense` (d HVPs).
    ``krylov_dim=m`` (with ``method="lanczos"``) replaces the restarted iteration by exactly m Lanczos steps
    with full reorthogonalisation and returns the k extreme Ritz pairs of that one Krylov space
    (:func:`lanczos_ritz`): a fixed cost of m products and no convergence test — the "Arnoldi" of Schioppa et
    al. (2022) that captum, dattri and pyDVL implement; ``tol`` and ``maxiter`` are then unused.

    Returns:
        eigenvalues ``[k]`` in ascending order (operator dtype), and with ``return_eigenvectors`` the matching
        orthonormal eigenvectors as columns ``[d, k]``.
    """
    if which not in ("LA", "SA", "LM"):
        raise ValueError(f"unknown which={which!r}: use 'LA' (largest), 'SA' (smallest) or 'LM' (largest magnitude)")
    if not 1 <= k <= op.dim:
        raise ValueError(f"k must lie in [1, d={op.dim}], got {k}")
    if method not in ("lanczos", "dense"):
        raise ValueError(f"unknown method {method!r}: use 'lanczos' or 'dense'")
    if krylov_dim is not None and method == "lanczos" and k < op.dim:
        vals, vecs = lanczos_ritz(op, int(krylov_dim), seed=seed)
        if k > vals.numel():
            raise ValueError(f"k={k} Ritz pairs asked of a Krylov space of dimension {vals.numel()}: raise krylov_dim")
        vals, vecs = _select(vals, vecs, k, which)
    elif method == "dense" or k >= op.dim:
        A = op.dense()
        vals, vecs = torch.linalg.eigh(0.5 * (A + A.T))  # symmetrise: eigh reads one triangle only
        vals, vecs = _select(vals, vecs, k, which)
    else:
        v0 = np.random.default_rng(seed).standard_normal(op.dim)
        try:
            vals_np, vecs_np = spla.eigsh(op.to_scipy(), k=k, which=which, tol=tol, maxiter=maxiter, v0=v0)
        except spla.ArpackNoConvergence as err:
            raise RuntimeError(
                f"Lanczos (eigsh) did not converge for k={k}, which={which!r} ({len(err.eigenvalues)} of {k} "
                "eigenvalues converged): raise maxiter, loosen tol, or use method='dense' for small d"
            ) from err
        order = np.argsort(vals_np)
        vals = torch.as_tensor(vals_np[order], dtype=op.dtype, device=op.device)
        vecs = torch.as_tensor(vecs_np[:, order], dtype=op.dtype, device=op.device)
    return (vals, vecs) if return_eigenvectors else vals


def _select(vals: Tensor, vecs: Tensor, k: int, which: Which) -> tuple[Tensor, Tensor]:
    """The k pairs ``which`` asks for from eigenvalues in ascending order (and their columns), ascending."""
    m = vals.numel()
    if which == "LA":
        sel = torch.arange(m - k, m, device=vals.device)
    elif which == "SA":
        sel = torch.arange(k, device=vals.device)
    else:
        sel = torch.sort(torch.argsort(vals.abs(), descending=True)[:k]).values
    return vals[sel], vecs[:, sel]


def lanczos_ritz(op: CurvatureOperator, krylov_dim: int, *, seed: int = 0) -> tuple[Tensor, Tensor]:
    """All Ritz pairs of ``op`` from one Krylov space of dimension ``krylov_dim``: ``(values [m], vectors [d, m])``,
    values ascending, vectors orthonormal.

    m Lanczos steps from a random start (drawn from ``seed``), each new vector reorthogonalised against all
    previous ones (twice: classical Gram–Schmidt, "twice is enough"), so the basis stays orthonormal to rounding —
    on a symmetric matrix this is the Arnoldi process, whose Hessenberg matrix is the tridiagonal T. Stops
    early, with fewer pairs, when the space becomes invariant. Cost: m products one vector at a time (the
    operator's traced product is built up front, :meth:`CurvatureOperator.expect`), O(d·m²) for the
    reorthogonalisation, eigh of an m×m matrix. Memory d·(m + 1) numbers.
    """
    m = min(int(krylov_dim), op.dim)
    if m < 1:
        raise ValueError(f"krylov_dim must be >= 1, got {krylov_dim}")
    op.expect(m)
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    Q = torch.empty(op.dim, m, dtype=op.dtype, device=op.device)
    q = torch.randn(op.dim, generator=gen, dtype=torch.float64).to(device=op.device, dtype=op.dtype)
    Q[:, 0] = q / torch.linalg.vector_norm(q)
    alpha = torch.zeros(m, dtype=op.dtype, device=op.device)
    beta = torch.zeros(m, dtype=op.dtype, device=op.device)
    size = m
    for j in range(m):
        w = op.matvec(Q[:, j])
        alpha[j] = Q[:, j] @ w
        for _ in range(2):  # full reorthogonalisation against the whole basis, twice
            w = w - Q[:, : j + 1] @ (Q[:, : j + 1].T @ w)
        if j == m - 1:
            break
        b = torch.linalg.vector_norm(w)
        if not bool(b > 100 * torch.finfo(op.dtype).eps * alpha[: j + 1].abs().max().clamp_min(1e-300)):
            size = j + 1  # invariant subspace: T is exact on it
            break
        beta[j] = b
        Q[:, j + 1] = w / b
    T = torch.diag(alpha[:size]) + torch.diag(beta[: size - 1], 1) + torch.diag(beta[: size - 1], -1)
    theta, S = torch.linalg.eigh(T)
    return theta, Q[:, :size] @ S


@dataclass(frozen=True)
class SpectrumSummary:
    """Extreme eigenvalues of a curvature operator.

    ``top``/``bottom``: largest and smallest eigenvalue (loss units per parameter²); ``n_negative``: how many
    eigenvalues fall below −``rtol``·|top| (dense method only, else ``None``); ``dim``: d; ``method``.
    """

    top: float
    bottom: float
    dim: int
    method: str
    n_negative: int | None = None


def spectrum_summary(
    op: CurvatureOperator, *, method: Literal["lanczos", "dense"] = "lanczos", rtol: float = 1e-10, seed: int = 0
) -> SpectrumSummary:
    """Top and bottom eigenvalue of ``op`` (Lanczos: two eigsh runs; dense: one eigh, plus the negative count).

    ``bottom < 0`` means the point is not a minimum of the objective in these parameters (negative curvature).
    """
    if method == "dense":
        A = op.dense()
        vals = torch.linalg.eigvalsh(0.5 * (A + A.T))
        top, bottom = float(vals[-1]), float(vals[0])
        n_neg = int((vals < -rtol * max(abs(top), abs(bottom))).sum())
        return SpectrumSummary(top=top, bottom=bottom, dim=op.dim, method=method, n_negative=n_neg)
    top = float(extreme_eigenvalues(op, 1, "LA", method="lanczos", seed=seed)[0])
    bottom = float(extreme_eigenvalues(op, 1, "SA", method="lanczos", seed=seed)[0])
    return SpectrumSummary(top=top, bottom=bottom, dim=op.dim, method=method)
