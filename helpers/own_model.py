"""Validate influence on your own model (the template chapter, ``book/own_model.ipynb``).

Turns what a reader brings — a dataset name or a tensor file, and a model factory ``"module:function"`` — into a
:class:`helpers.validation.Problem` and runs the checklist of chapter 3 on it::

    train, test = load_data("wine", seed=0)                       # or load_data("/path/tensors.pt")
    factory = load_factory("mypkg.models:make_net")
    model = build_model(factory, train, n_classes_of(train, test), seed=0)
    result = run_checklist(model, train, test, Recipe(optimizer="adam", lr=0.01, epochs=2000, weight_decay=0.01))
    result.agreement        # tidy: estimate × ground truth × metric, value with its 95 % bootstrap interval
    result.headline         # the numbers worth quoting, a flat dict of finite floats
    result.checks           # the checklist, one row per item, with a verdict

**The factory contract.** ``factory(in_features=d, n_classes=C, **factory_kwargs)`` returns an ``nn.Module``
mapping a batch ``x`` of shape ``[b, *feature_shape]`` (as stored: ``[b, d]`` for feature vectors; ``d`` is the
number of features per sample, the product of ``feature_shape``) to logits ``[b, C]``. The model is trained with the
softmax cross-entropy, in float64, and must be a pure function of its parameters: no dropout, no batch norm (they
make one sample's loss depend on the batch or on chance), nothing that ``torch.func.functional_call`` / ``vmap``
cannot trace. Its final operation must be an ``nn.Linear`` — exposed as ``model.last_layer``, or found as the last
``nn.Linear`` among its modules (checked: the forward pass must end there). Cold-start retraining redraws the
initialisation by replaying every submodule's ``reset_parameters`` under a seed
(:func:`helpers.models.init_params`): a factory with its own initialisation scheme should put it there.

**The tensor file.** ``torch.save({"x_train": X, "y_train": Y, "x_test": Xt, "y_test": Yt}, path)``: X ``[n, ...]``
real-valued and finite, Y ``[n]`` integer labels in ``0 … C−1`` with every class present in the training part.
The data are used as stored (no standardisation; named datasets are standardised by :func:`helpers.data.load`).

What the checklist computes (every step memoised with :mod:`helpers.cache`): θ̂ by the recipe
(:func:`helpers.validation.make_problem`: the max / median / random-loss test points, the exact-Hessian and the
Gauss-Newton estimates), every ground truth of chapter 3 with its drift run (:func:`helpers.validation.run_protocols`:
cold start over seeds, warm start on all layers recorded along the way, warm start on the last layer, the PBRF),
the agreement table with bootstrap intervals (:func:`helpers.validation.side_by_side`), the selection grid
(:func:`helpers.validation.selection_grid`) and a known-answer test of the pipeline on the convex last layer.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from helpers import data as data_mod
from helpers import metrics, retrain
from helpers import validation as V
from helpers.influence import predict_removal
from helpers.solvers import NotPositiveDefiniteError
from helpers.train import Recipe, fit, model_with

Data = tuple[Tensor, Tensor]

#: The keys a tensor file must hold.
TENSOR_KEYS: tuple[str, ...] = ("x_train", "y_train", "x_test", "y_test")
#: Short names of the (estimate, ground truth) rows in :attr:`ChecklistResult.headline`
#: (``<tag>_<metric>[_low|_high]``); ``"cold"`` stands for the seed mean, ``"cold (S seeds)"`` in the agreement table.
TRUTH_TAGS: dict[tuple[str, str], str] = {
    ("H+δ", "cold"): "cold", ("H+δ", "cold (1 seed)"): "cold1", ("H+δ", "warm all"): "warm",
    ("H+δ", "warm all − drift"): "warm_minus_drift", ("H+δ", "warm last"): "last", ("H+δ", "PBRF"): "pbrf",
    ("GN+δ", "PBRF"): "pbrf_gn",
}
# Thresholds of the checklist's verdicts (judgement calls, stated so a reader can disagree with them).
MATCHED_OK = 0.9          # Pearson of the Gauss-Newton estimate with the PBRF, the target it linearises
DRIFT_RATIO_OK = 1.0      # |drift| / median |Δ_true|: above it the procedure moves more than a typical point does
CEILING_OK = 0.5          # reliability ceiling of the cold-start seed mean
NOISE_TO_SIGNAL_OK = 1.0  # seed-to-seed sd of Δ over median |Δ| (cold start)
LENGTH_SPREAD_OK = 0.2    # range of Pearson over the recorded retraining lengths
SELECTION_SPREAD_OK = 0.3  # range of Pearson over candidate rules × test points
# Pearson of the last layer's influence with its exact (Newton) leave-one-out: a broken pipeline (indices, signs)
# gives about 0; the second-order (leverage) term keeps small, high-leverage sets a little below 1.
KNOWN_ANSWER_OK = 0.95
KNOWN_ANSWER_MAX_D = 2000  # the known-answer test needs a dense last-layer Hessian per member: skip above this


# --------------------------------------------------------------------------------------------- the model


def load_factory(spec: str) -> Callable[..., nn.Module]:
    """The model factory named by ``spec``: ``"package.module:function"`` (or ``"path/to/file.py:function"``).

    The attribute may be dotted (``"pkg.mod:Builder.create"``). The factory is *not* called here; see
    :func:`build_model` for the contract it must meet.

    Raises:
        ValueError: no colon, or an empty module or attribute part.
        ModuleNotFoundError: the module cannot be found (put the folder that holds it on ``PYTHONPATH``, or place
            it inside the repository), or it imports something that is not installed.
        ImportError: importing the module raised (the original error is chained).
        FileNotFoundError: a ``.py`` path that does not exist.
        AttributeError: the module has no such attribute (the message lists its public callables).
        TypeError: the attribute is not callable.
    """
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise ValueError(f"factory must be 'module:function' with exactly one colon, e.g. "
                         f"'helpers.own_model:example_factory' or 'mypkg.models:make_net'; got {spec!r}")
    mod_name, attr = (s.strip() for s in spec.split(":"))
    if not mod_name or not attr:
        raise ValueError(f"factory {spec!r} has an empty module or function part: write 'module:function'")
    module = _import(mod_name)
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = sorted(n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n)))
            raise AttributeError(f"module {mod_name!r} has no attribute {attr!r}; its public callables are "
                                 f"{', '.join(public) or '(none)'}: fix the part after the colon")
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"{spec!r} is a {type(obj).__name__}, not a callable: name a function (or class) that "
                        "builds the model from in_features and n_classes")
    return obj


def _import(mod_name: str) -> Any:
    """Import a module by dotted name, or from a ``.py`` file path."""
    if mod_name.endswith(".py"):
        path = Path(mod_name).expanduser()
        if not path.is_absolute() and not path.exists():
            path = data_mod.REPO_ROOT / path
        if not path.exists():
            raise FileNotFoundError(f"factory file {mod_name!r} does not exist (looked in the working directory and "
                                    f"in {data_mod.REPO_ROOT}): give an absolute path")
        spec = importlib.util.spec_from_file_location(f"own_model_factory_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        _run_import(lambda: spec.loader.exec_module(module), str(path))
        return module
    try:
        return importlib.import_module(mod_name)
    except ModuleNotFoundError as err:
        parts = mod_name.split(".")
        if err.name in {".".join(parts[:i + 1]) for i in range(len(parts))}:
            raise ModuleNotFoundError(
                f"cannot import module {mod_name!r} (no module named {err.name!r}): put the folder that holds it "
                f"on PYTHONPATH (e.g. PYTHONPATH=/path/to/src make chapter CH=own_model ...) or place it inside the "
                f"repository ({data_mod.REPO_ROOT}), or install its package into .venv", name=err.name) from None
        raise ModuleNotFoundError(f"module {mod_name!r} was found but it imports {err.name!r}, which is not "
                                  f"installed: install it into .venv", name=err.name) from err
    except Exception as err:  # noqa: BLE001 - any error raised by the reader's module at import time
        raise ImportError(f"importing {mod_name!r} raised {type(err).__name__}: {err}") from err


def _run_import(load: Callable[[], None], where: str) -> None:
    try:
        load()
    except Exception as err:  # noqa: BLE001
        raise ImportError(f"importing {where!r} raised {type(err).__name__}: {err}") from err


class LastLayerView(nn.Module):
    """A reader's model with ``last_layer`` pointing at its final ``nn.Linear``.

    Every helper that works on "the last layer" (estimates on ``params="last"``, the last-layer head of
    :func:`helpers.validation.last_layer_problem`) reads ``model.last_layer``; a model without one is wrapped so
    that it has it. The forward pass is the wrapped model's; parameters are prefixed ``net.``.
    """

    def __init__(self, net: nn.Module, last_name: str) -> None:
        super().__init__()
        self.net = net
        self._last_name = last_name

    @property
    def last_layer(self) -> nn.Module:
        return self.net.get_submodule(self._last_name)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def build_model(factory: Callable[..., nn.Module], train: Data, n_classes: int, *, seed: int = 0,
                factory_kwargs: dict[str, Any] | None = None) -> nn.Module:
    """Call ``factory(in_features=d, n_classes=C, **factory_kwargs)`` under ``seed`` and check what it returns.

    d is the number of features of one sample of ``train`` (``prod(x.shape[1:])``). The call runs inside a private
    RNG state seeded by ``seed`` (the global RNG is left as it was), so the initialisation is reproducible. The
    model is cast to float64 and checked on a batch of up to 8 training rows: it must be an ``nn.Module`` with
    trainable parameters, without dropout or batch norm, deterministic, returning ``[b, n_classes]`` finite logits,
    and ending in an ``nn.Linear`` (see the module docstring). A model without a ``last_layer`` attribute is wrapped
    in :class:`LastLayerView`.

    Raises:
        TypeError: the factory does not accept ``in_features`` / ``n_classes``, or does not return an ``nn.Module``.
        ValueError: no parameters, dropout / batch norm, random or wrongly shaped output, no final ``nn.Linear``.
    """
    x = train[0]
    d = int(math.prod(x.shape[1:]))
    kwargs = dict(factory_kwargs or {})
    name = getattr(factory, "__qualname__", repr(factory))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        try:
            model = factory(in_features=d, n_classes=int(n_classes), **kwargs)
        except TypeError as err:
            raise TypeError(f"calling the factory {name}(in_features={d}, n_classes={n_classes}"
                            f"{''.join(f', {k}={v!r}' for k, v in kwargs.items())}) failed: {err}. The factory must "
                            "accept the keyword arguments in_features and n_classes (and any factory_kwargs)") from err
    if not isinstance(model, nn.Module):
        raise TypeError(f"the factory {name} returned a {type(model).__name__}, not a torch.nn.Module: return the "
                        "model itself")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"the model from {name} has no trainable parameters: nothing to train or to take influence on")
    bad = [f"{n or '(root)'} ({type(m).__name__})" for n, m in model.named_modules()
           if isinstance(m, nn.modules.batchnorm._BatchNorm) or (isinstance(m, nn.modules.dropout._DropoutNd)
                                                                   and m.p > 0)]
    if bad:
        raise ValueError(f"the model has dropout or batch norm: {', '.join(bad)}. Both make one sample's loss depend "
                         "on chance or on the rest of the batch, so leave-one-out and influence are ill-defined: "
                         "remove them (LayerNorm / GroupNorm are fine) or set the dropout probability to 0")
    model = model.to(torch.float64)
    probe = x[:8].to(torch.float64)
    with torch.no_grad():
        out = model(probe)
        again = model(probe)
    if not isinstance(out, Tensor) or tuple(out.shape) != (probe.shape[0], int(n_classes)):
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"the model maps a batch of {probe.shape[0]} samples of shape {tuple(x.shape[1:])} to "
                         f"{got}; it must return logits [{probe.shape[0]}, {n_classes}] (one score per class, no "
                         "softmax): check in_features / n_classes in the factory")
    if not torch.isfinite(out).all():
        raise ValueError("the model returns non-finite logits on training rows: check its initialisation")
    if not torch.equal(out, again):
        raise ValueError("two forward passes on the same batch differ: the model is random (dropout, noise "
                         "layers?) — make its forward pass deterministic")
    last = getattr(model, "last_layer", None)
    if last is None:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError("the model has no nn.Linear layer: its final operation must be an nn.Linear (expose it "
                             "as `model.last_layer`)")
        model, last = LastLayerView(model, linears[-1]), model.get_submodule(linears[-1])
    if not isinstance(last, nn.Linear):
        raise ValueError(f"model.last_layer is a {type(last).__name__}, not an nn.Linear: the last-layer ground "
                         "truths need a final linear layer")
    with torch.no_grad(), torch.random.fork_rng(devices=[]):  # head_of draws a fresh head before copying weights
        head = V.head_of(model)
        through = head(V.penultimate(model, probe))
    if not torch.allclose(through, out, rtol=1e-10, atol=1e-10):
        raise ValueError(f"the forward pass does not end at the last nn.Linear ({last}): its output differs from the "
                         f"model's by {float((through - out).abs().max()):.2e}. Return the last layer's output as the "
                         "logits (no softmax or other layer after it), or expose the true final nn.Linear as "
                         "`model.last_layer`")
    return model


class ResidualMLP(nn.Module):
    """The template's example model: a small residual MLP with GELU — a model no other chapter uses.

    ``x → h = GELU(W₀x + b₀) → h ← h + GELU(W_b h + b_b)`` (``blocks`` times) ``→ W_out h + b_out``
    (the logits).
    Parameters: ``inp``, ``blocks.<i>``, ``out`` (the last layer).
    """

    def __init__(self, in_features: int, n_classes: int, width: int = 10, blocks: int = 2) -> None:
        super().__init__()
        if min(in_features, n_classes, width) < 1 or blocks < 0:
            raise ValueError(f"in_features, n_classes, width must be >= 1 and blocks >= 0; got {in_features}, "
                             f"{n_classes}, {width}, {blocks}")
        self.inp = nn.Linear(in_features, width)
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(blocks))
        self.out = nn.Linear(width, n_classes)

    @property
    def last_layer(self) -> nn.Linear:
        return self.out

    def forward(self, x: Tensor) -> Tensor:
        h = F.gelu(self.inp(x.flatten(1)))
        for block in self.blocks:
            h = h + F.gelu(block(h))
        return self.out(h)


def example_factory(in_features: int, n_classes: int, width: int = 10, blocks: int = 2) -> ResidualMLP:
    """The template chapter's default factory (``"helpers.own_model:example_factory"``): :class:`ResidualMLP`.

    With the defaults on ``wine`` (13 features, 3 classes): 393 parameters, small enough for the dense Hessian.
    """
    return ResidualMLP(in_features, n_classes, width=width, blocks=blocks)


# ---------------------------------------------------------------------------------------------- the data


def load_data(source: str | Path, *, n_train: int | None = None, n_test: int | None = None, seed: int = 0,
              test_fraction: float = 0.2) -> tuple[Data, Data]:
    """``(train, test)``, each ``(x float64 [n, ...], y int64 [n])``, from a dataset name or a tensor file.

    Args:
        source: a name of :data:`helpers.data.DATASETS` (split and standardised by :func:`helpers.data.load`), or
            the path of a file written by ``torch.save({"x_train", "y_train", "x_test", "y_test"})`` (module
            docstring); a relative path is looked up in the working directory, then in the repository root.
        n_train, n_test: caps on the sizes (``None``: all). A tensor file is subsampled uniformly at random
            (``seed``), keeping the stored order.
        seed: the split and subsample.
        test_fraction: for named datasets without an official split.

    Raises:
        FileNotFoundError: neither a dataset name nor an existing file.
        ValueError: an unreadable file, missing keys, wrong dtypes or shapes, non-finite features, labels not in
            ``0 … C−1`` or a class absent from the training part, caps larger than the data.
    """
    for arg, value in (("n_train", n_train), ("n_test", n_test)):
        if value is not None and (not isinstance(value, (int, np.integer)) or value < 1):
            raise ValueError(f"{arg} must be a positive int or None (all), got {value!r}")
    if isinstance(source, str) and source in data_mod.DATASETS:
        split = data_mod.load(source, seed=seed, n_train=n_train, n_test=n_test, test_fraction=test_fraction,
                              dtype=torch.float64)
        return split.train, split.test
    path = _find_file(source)
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file
        raise ValueError(f"cannot read {str(path)!r} as a torch.save file ({type(err).__name__}: {err}): save a dict "
                         "of tensors with torch.save({'x_train': X, 'y_train': Y, 'x_test': Xt, 'y_test': Yt}, "
                         "path)") from err
    if not isinstance(stored, dict):
        raise ValueError(f"{path} holds a {type(stored).__name__}, not a dict: save "
                         "{'x_train': X, 'y_train': Y, 'x_test': Xt, 'y_test': Yt} with torch.save")
    missing = [k for k in TENSOR_KEYS if k not in stored]
    if missing:
        raise ValueError(f"{path} lacks the key(s) {', '.join(missing)} (it has {', '.join(map(str, stored)) or 'none'}"
                         f"): the file must hold {', '.join(TENSOR_KEYS)}")
    t = {k: stored[k] for k in TENSOR_KEYS}
    for k, v in t.items():
        if not isinstance(v, Tensor):
            raise ValueError(f"{path}: {k} is a {type(v).__name__}, not a torch.Tensor (convert with torch.as_tensor)")
    for k in ("x_train", "x_test"):
        if t[k].is_complex() or not (t[k].is_floating_point() or _is_integer(t[k]) or t[k].dtype == torch.bool):
            raise ValueError(f"{path}: {k} has dtype {t[k].dtype}; features must be real numbers")
        if t[k].dim() < 2:
            raise ValueError(f"{path}: {k} has shape {tuple(t[k].shape)}; features must be [n, ...] (one row per "
                             "sample; unsqueeze(1) a single feature)")
        if not torch.isfinite(t[k].double()).all():
            bad = int((~torch.isfinite(t[k].double())).sum())
            raise ValueError(f"{path}: {k} has {bad} non-finite value(s) (NaN / inf): impute or drop those samples")
    for k in ("y_train", "y_test"):
        if not _is_integer(t[k]):
            hint = " (they look integral: save y.long())" if t[k].is_floating_point() and bool(
                (t[k] == t[k].round()).all()) else ""
            raise ValueError(f"{path}: {k} has dtype {t[k].dtype}; labels must be an integer tensor of class "
                             f"indices 0 … C−1{hint}")
        if t[k].dim() != 1:
            raise ValueError(f"{path}: {k} has shape {tuple(t[k].shape)}; labels must be [n] class indices (not "
                             "one-hot: use y.argmax(1))")
    for part in ("train", "test"):
        nx, ny = t[f"x_{part}"].shape[0], t[f"y_{part}"].shape[0]
        if nx != ny:
            raise ValueError(f"{path}: x_{part} has {nx} rows but y_{part} has {ny}: they must match")
    if t["x_train"].shape[1:] != t["x_test"].shape[1:]:
        raise ValueError(f"{path}: a training sample has shape {tuple(t['x_train'].shape[1:])} but a test sample "
                         f"{tuple(t['x_test'].shape[1:])}: they must match")
    if t["y_train"].shape[0] < 2 or t["y_test"].shape[0] < 1:
        raise ValueError(f"{path}: needs at least 2 training and 1 test samples, got {t['y_train'].shape[0]} and "
                         f"{t['y_test'].shape[0]}")
    labels = torch.cat([t["y_train"], t["y_test"]]).long()
    if int(labels.min()) < 0:
        raise ValueError(f"{path}: labels must be class indices 0 … C−1; found {int(labels.min())}")
    n_classes = int(labels.max()) + 1
    absent = sorted(set(range(n_classes)) - set(t["y_train"].long().unique().tolist()))
    if n_classes < 2 or absent:
        raise ValueError(f"{path}: labels must be 0 … C−1 with C >= 2 and every class in the training part; "
                         f"C = {n_classes}, classes absent from y_train: {absent or 'none'} (relabel to 0 … C−1)")
    gen = torch.Generator().manual_seed(int(seed))
    out = []
    for part, cap in (("train", n_train), ("test", n_test)):
        x, y = t[f"x_{part}"].to(torch.float64), t[f"y_{part}"].long()
        if cap is not None:
            if cap > y.shape[0]:
                raise ValueError(f"{path}: n_{part}={cap} but the file holds {y.shape[0]} {part} samples: lower it")
            keep = torch.randperm(y.shape[0], generator=gen)[:cap].sort().values
            x, y = x[keep], y[keep]
        out.append((x.contiguous(), y.contiguous()))
    return out[0], out[1]


def _is_integer(t: Tensor) -> bool:
    return not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool


def _find_file(source: str | Path) -> Path:
    path = Path(source).expanduser()
    candidates = [path] if path.is_absolute() else [path, data_mod.REPO_ROOT / path]
    for p in candidates:
        if p.is_file():
            return p.resolve()
    raise FileNotFoundError(f"data {str(source)!r} is neither a dataset name ({', '.join(data_mod.DATASETS)}) nor an "
                            f"existing file (looked at {', '.join(str(p) for p in candidates)}): give a dataset name "
                            "or the path of a torch.save({'x_train', 'y_train', 'x_test', 'y_test'}) file")


def n_classes_of(train: Data, test: Data) -> int:
    """C = largest label + 1 over both parts (labels are ``0 … C−1``)."""
    return int(max(int(train[1].max()), int(test[1].max()))) + 1


# ---------------------------------------------------------------------------------------------- the checklist


@dataclass
class ChecklistResult:
    """What :func:`run_checklist` found.

    Attributes:
        agreement: tidy table (:func:`helpers.validation.side_by_side`): one row per estimate × ground truth ×
            metric with ``value, low, high`` (95 % paired bootstrap), ``n``, ``ceiling``, ``ceiling_single``,
            ``drift``, ``drift_ratio``, ``median_abs_delta``; max-loss test point.
        headline: flat dict of finite numbers: sizes, θ̂'s diagnostics, ``<tag>_<metric>[_low|_high]`` for every
            tag of :data:`TRUTH_TAGS` and every metric of :data:`helpers.validation.AGREEMENT_METRICS`, noise
            ceilings, drift ratios, the spreads over retraining length and selection, the known-answer test.
        checks: the checklist: ``item, check, measured, value, verdict`` (``ok`` / ``warning`` / ``reported`` /
            ``not covered``), one row per item of chapter 3's checklist.
        selection: :func:`helpers.validation.selection_grid` against warm start on all layers.
        paths: Pearson and Spearman of the estimate with warm start on all layers at every recorded epoch.
        scatter: estimate and Δ_true per candidate and ground truth, with the noise band ``band`` (± nats) of that
            ground truth (figure data).
        problem, truths, candidates: the fixed problem, the ground truths (:func:`helpers.validation.run_protocols`)
            and the candidates (training positions, largest ``|estimate|`` for the max-loss test point first).
        lengths: the shorter warm-start lengths reported as ``warm all @ e`` rows (:func:`retraining_lengths`).
    """

    agreement: pd.DataFrame
    headline: dict[str, float]
    checks: pd.DataFrame
    selection: pd.DataFrame
    paths: pd.DataFrame
    scatter: pd.DataFrame
    problem: V.Problem
    truths: dict[str, Any]
    candidates: np.ndarray
    lengths: list[int] = field(default_factory=list)

    def pick(self, ground_truth: str, metric: str = "pearson", estimate: str = "H+δ", col: str = "value") -> float:
        """One cell of :attr:`agreement` (``ground_truth`` as in the table, e.g. ``"PBRF"``, ``"cold (5 seeds)"``)."""
        a = self.agreement
        row = a[(a.ground_truth == ground_truth) & (a.metric == metric) & (a.estimate == estimate)]
        if len(row) != 1:
            raise KeyError(f"no single row for {estimate} vs {ground_truth!r}, {metric}: the ground truths are "
                           f"{sorted(a.ground_truth.unique())}")
        return float(row[col].iloc[0])


def cold_name(n_seeds: int) -> str:
    """The cold-start seed mean's name in the agreement table (:func:`helpers.validation.side_by_side`)."""
    return f"cold ({n_seeds} seeds)"


def retraining_lengths(epochs: Sequence[int]) -> list[int]:
    """Two shorter retraining lengths to report besides the full one: about a tenth and a third of the run."""
    e = np.asarray(epochs)
    e = e[e > 0]
    return sorted({int(e[max(0, len(e) // 10 - 1)]), int(e[max(0, len(e) // 3 - 1)])} - {int(e[-1])})


def run_checklist(model: nn.Module, train: Data, test: Data, recipe: Recipe, *, name: str = "your model",
                  params: str = "all", damping: float = 0.01, retrain_lr: float = 1e-3, retrain_epochs: int = 500,
                  every: int = 25, head_epochs: int = 300, pbrf_damping: float = 0.01, k: int = 20, cold_k: int = 12,
                  n_seeds: int = 5, n_bootstrap: int = 1000, seed: int = 0, cache: bool = True,
                  progress: bool = True) -> ChecklistResult:
    """Chapter 3's checklist on one model: train θ̂, fix the estimate, measure it against every ground truth.

    Args:
        model: from :func:`build_model` (float64, with a final ``nn.Linear``).
        train, test: from :func:`load_data`; the test points are the max / median / random test loss under θ̂.
        recipe: how θ̂ is trained (must be float64); cold start repeats it from ``n_seeds`` fresh initialisations
            (seeds ``seed + 1 … seed + n_seeds``).
        params: the estimate's parameters, ``"all"`` (exact Hessian over every parameter: small models) or
            ``"last"``. damping: δ of the exact-Hessian estimate (H must be positive definite after it).
        retrain_lr, retrain_epochs, every: warm start on all layers — a fresh Adam from θ̂ at a constant
            ``retrain_lr`` for ``retrain_epochs``, recorded every ``every`` epochs (the sweep of lengths); the PBRF
            (``pbrf_damping``) is optimised by the same recipe (by the last-layer recipe when ``params="last"``).
        head_epochs: warm start on the last layer (full batch, on cached features), recorded every ``every``.
        k: candidates (the k largest ``|estimate|`` for the max-loss test point); cold_k: the first cold_k of them are
            retrained from scratch (the costly protocol). k is also the size of each selection rule's set.
        n_bootstrap: resamples per interval; seed: the random test point, the random candidates, the bootstrap.
        cache: memoise every training and retraining run (:mod:`helpers.cache`).
        progress: a tqdm bar over the steps (on a terminal only).

    Returns:
        :class:`ChecklistResult`.

    Raises:
        ValueError: inconsistent sizes or a float32 recipe.
        helpers.solvers.NotPositiveDefiniteError: H + δI not positive definite at θ̂ (the message names the damping
            that fixes it).

    Cost: one training run; two influence solves over ``params``; ground truths as ensembles of
    ``n_seeds · (cold_k + 1)`` (cold, θ̂'s recipe), ``|pool| + 1`` (warm all, ``retrain_epochs``), ``k + 1`` (warm
    last, PBRF) and ``k + 1`` Newton members on the last layer, where ``|pool| ≤ 5k`` is the union of every selection
    rule's candidates; 8 + 9 agreement rows of six bootstraps each.
    """
    with warnings.catch_warnings():
        # In a kernel without ipywidgets tqdm.auto warns that it falls back to text bars; that fallback is fine.
        warnings.filterwarnings("ignore", message=".*IProgress not found.*")
        from tqdm.auto import tqdm

    if recipe.dtype != "float64":
        raise ValueError(f"the checklist trains in float64 (small effects drown in float32 round-off); got a "
                         f"{recipe.dtype} recipe: use Recipe(..., dtype='float64')")
    n = int(train[0].shape[0])
    if not 5 <= k <= n:
        raise ValueError(f"k (candidates) must lie in [5, n_train = {n}], got {k}")
    if not 3 <= cold_k <= k:
        raise ValueError(f"cold_k must lie in [3, k = {k}] (correlations over fewer points mean nothing), got {cold_k}")
    if n_seeds < 2:
        raise ValueError(f"n_seeds must be >= 2: the seed noise and the reliability ceiling need two seeds, got "
                         f"{n_seeds}")
    if test[0].shape[0] < 3:
        raise ValueError(f"the test part needs >= 3 samples (max, median and random loss), got {test[0].shape[0]}")
    with warnings.catch_warnings():
        # torch's forward-mode AD loads decompositions through the deprecated torch.jit.script on first use; the
        # FutureWarning is torch-internal and says nothing about this computation (as in helpers.train).
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
        bar = tqdm(total=6, desc=f"checklist: {name}", disable=not progress or not sys.stderr.isatty(), leave=False)

        bar.set_postfix_str("θ̂ and estimates")
        try:
            problem = V.make_problem(name, model, recipe, train, test, params=params, damping=damping,
                                     gn_damping=pbrf_damping, seed=seed, cache=cache)
        except NotPositiveDefiniteError as err:
            raise type(err)(f"{err} — in the chapter: raise `damping` above {abs(err.smallest_eigenvalue):.2g} in "
                            "the parameters cell, train closer to a minimum (more `epochs`), or add L2 (`l2`)",
                            err.smallest_eigenvalue, err.largest_eigenvalue, err.damping) from None
        bar.update()

        bar.set_postfix_str("ground truths")
        candidates = V.select_candidates("estimate", k, estimate=problem.estimate[0])
        pool = V.selection_pool(problem, k, seed=seed)
        warm = Recipe(optimizer="adam", lr=retrain_lr, epochs=retrain_epochs, weight_decay=problem.l2,
                      batch_size=recipe.batch_size, seed=recipe.seed)
        head = Recipe(optimizer="adam", lr=retrain_lr, epochs=head_epochs, weight_decay=problem.l2)
        protocols = V.Protocols(warm=warm, head=head, pbrf=warm.replace(batch_size=None) if params == "all" else head,
                                pbrf_damping=pbrf_damping, seeds=tuple(seed + 1 + i for i in range(n_seeds)),
                                every=every, head_every=every, cold_k=cold_k)
        truths = V.run_protocols(problem, candidates, protocols, wide=pool, wide_protocols=("warm_all",), cache=cache)
        bar.update()

        bar.set_postfix_str("agreement")
        lengths = retraining_lengths(truths["warm_all"].epochs)
        top_k = max(2, k // 5)
        agreement = V.side_by_side(problem, truths, candidates, lengths=lengths, n_resamples=n_bootstrap, seed=seed,
                                   k=top_k)
        bar.update()

        bar.set_postfix_str("retraining lengths, selection")
        paths = _correlation_paths(problem, truths["warm_all"], candidates)
        wg = truths["warm_all"].at(int(truths["warm_all"].epochs[-1]))
        selection = V.selection_grid(problem, wg.delta[:, V.columns_of(wg.removed, pool)], pool, k, seed=seed,
                                     n_resamples=n_bootstrap, top_k=top_k)
        bar.update()

        bar.set_postfix_str("known answer")
        known = _known_answer(problem, candidates, cache=cache)
        bar.update()

        scatter = _scatter(problem, truths, candidates)
        headline = _headline(problem, truths, agreement, paths, selection, known, k=k, cold_k=cold_k, n_seeds=n_seeds,
                             damping=damping)
        checks = _checks(headline, n_seeds=n_seeds, lengths=lengths, retrain_epochs=retrain_epochs)
        headline["checks_ok"] = float((checks.verdict == "ok").sum())
        headline["checks_warning"] = float((checks.verdict == "warning").sum())
        bar.update()
        bar.close()
        return ChecklistResult(agreement=agreement, headline=headline, checks=checks, selection=selection, paths=paths,
                               scatter=scatter, problem=problem, truths=truths, candidates=np.asarray(candidates),
                               lengths=lengths)


def _correlation_paths(problem: V.Problem, traj: V.Trajectory, candidates: np.ndarray) -> pd.DataFrame:
    """Pearson / Spearman of the max-loss estimate with warm start on all layers at each recorded epoch."""
    cols = V.columns_of(traj.removed, candidates)
    est = problem.estimate[0, candidates]
    rows = []
    for i, e in enumerate(traj.epochs):  # one row per recorded epoch (tens), not per sample
        d = traj.delta[i, 0, cols]
        if e == 0 or np.ptp(d) == 0:
            continue
        rows.append({"epoch": int(e), "pearson": metrics.pearson(est, d), "spearman": metrics.spearman(est, d),
                     "drift": float(traj.drift[i, 0]), "median_abs_delta": float(np.median(np.abs(d)))})
    return pd.DataFrame(rows)


def _known_answer(problem: V.Problem, candidates: np.ndarray, *, cache: bool) -> dict[str, float] | None:
    """The pipeline on a case with a known answer: the last layer alone, on its frozen features, is a convex problem
    (multinomial logistic regression with L2 λ). Fitted to its minimum by Newton (‖∇R‖ < 1e-10), its influence
    estimate must match exact leave-one-out (Newton from that minimum, same tolerance) on the same candidates — a
    test of indices, signs and scale that does not depend on how well θ̂ itself was trained. Returns Pearson /
    Spearman / relative error and the largest final gradient norm, or None when it cannot run (λ = 0, or a last
    layer too large for dense Newton)."""
    d_head = sum(p.numel() for p in problem.head.parameters())
    if problem.l2 <= 0 or d_head > KNOWN_ANSWER_MAX_D:
        return None
    newton = Recipe(optimizer="newton", weight_decay=problem.l2, tol=1e-10, max_iter=50)
    head = model_with(problem.head, fit(newton, problem.head, *problem.head_train, progress=False, cache=cache).params)
    est = predict_removal(head, problem.head_train, problem.head_test, l2=problem.l2)
    exact = retrain.warm_start(head, None, problem.head_train, problem.head_test, candidates, newton, progress=False,
                               cache=cache)
    p = est.values.detach().double().numpy()[0, candidates]
    t = exact.delta[0]
    return {"pearson": metrics.pearson(p, t), "spearman": metrics.spearman(p, t),
            "relative_error": metrics.relative_error(p, t), "grad_norm": float(np.max(exact.grad_norm)),
            "d": float(d_head)}


def _scatter(problem: V.Problem, truths: dict[str, Any], candidates: np.ndarray) -> pd.DataFrame:
    """Figure data: estimate against each ground truth on its candidates (max-loss test point), with the noise band
    of that ground truth: ± |drift| for the deterministic protocols, ± the seed-to-seed sd of Δ / √seeds (the noise
    of the seed mean, median over candidates) for cold start."""
    cold = truths["cold"]
    cc = V.columns_of(cold.removed, [i for i in candidates if i in set(cold.removed.tolist())])
    n_s = cold.delta_per_seed.shape[0]
    frames = [pd.DataFrame({"ground_truth": cold_name(n_s), "estimate_kind": "H+δ",
                            "removed": cold.removed[cc], "estimate": problem.estimate[0, cold.removed[cc]],
                            "delta_true": cold.delta[0, cc],
                            "band": float(np.median(cold.noise[0, cc])) / math.sqrt(n_s)})]
    final = truths["warm_all"].at(int(truths["warm_all"].epochs[-1]))
    last = truths["warm_last"].at(int(truths["warm_last"].epochs[-1]))
    for label, gt, est_kind in (("warm all", final, "H+δ"), ("warm last", last, "H+δ"),
                                ("PBRF", truths["pbrf"], "GN+δ")):
        c = V.columns_of(gt.removed, candidates)
        est = problem.estimate_gn if est_kind == "GN+δ" else problem.estimate
        frames.append(pd.DataFrame({"ground_truth": label, "estimate_kind": est_kind, "removed": gt.removed[c],
                                    "estimate": est[0, gt.removed[c]], "delta_true": gt.delta[0, c],
                                    "band": abs(float(np.ravel(gt.drift)[0]))}))
    return pd.concat(frames, ignore_index=True)


def _headline(problem: V.Problem, truths: dict[str, Any], agreement: pd.DataFrame, paths: pd.DataFrame,
              selection: pd.DataFrame, known: dict[str, float] | None, *, k: int, cold_k: int, n_seeds: int,
              damping: float) -> dict[str, float]:
    info = problem.info
    h: dict[str, float] = {"n_train": float(problem.n_train), "n_params": info["n_params"],
                           "n_params_estimate": info["n_params_estimate"], "acc_train": info["acc_train"],
                           "acc_test": info["acc_test"], "grad_norm": info["grad_norm"],
                           "train_loss": info["train_loss"], "test_loss_max": info["test_loss_max"],
                           "solver_residual": info["residual"], "damping": float(damping), "l2": problem.l2,
                           "k": float(k), "cold_k": float(cold_k), "n_seeds": float(n_seeds)}
    h |= {key: info[key] for key in ("hessian_min_eig", "hessian_max_eig") if key in info}
    for (est, gt), tag in TRUTH_TAGS.items():
        gt = cold_name(n_seeds) if gt == "cold" else gt
        rows = agreement[(agreement.estimate == est) & (agreement.ground_truth == gt)]
        for m in V.AGREEMENT_METRICS:
            r = rows[rows.metric == m].iloc[0]
            h[f"{tag}_{m}"], h[f"{tag}_{m}_low"], h[f"{tag}_{m}_high"] = float(r.value), float(r.low), float(r.high)
        h[f"{tag}_drift_ratio"] = float(rows.drift_ratio.iloc[0])
        h[f"{tag}_median_abs_delta"] = float(rows.median_abs_delta.iloc[0])
    cold_row = agreement[(agreement.ground_truth == cold_name(n_seeds)) & (agreement.estimate == "H+δ")].iloc[0]
    h["ceiling"], h["ceiling_single"] = float(cold_row.ceiling), float(cold_row.ceiling_single)
    h["cold_drift"] = float(cold_row.drift)
    cold = truths["cold"]
    h["cold_noise_to_signal"] = float(np.median(cold.noise[0]) / np.median(np.abs(cold.delta_per_seed[:, 0])))
    for gt, tag in (("warm all", "warm"), ("warm last", "last"), ("PBRF", "pbrf")):
        h[f"{tag}_drift"] = float(agreement[agreement.ground_truth == gt].drift.iloc[0])
    for m in ("pearson", "spearman"):
        h[f"path_{m}_min"], h[f"path_{m}_max"] = float(paths[m].min()), float(paths[m].max())
    sel = selection[selection.metric == "pearson"].value
    h["selection_pearson_min"], h["selection_pearson_max"] = float(sel.min()), float(sel.max())
    if known is not None:
        h |= {f"known_{key}": float(v) for key, v in known.items()}
    bad = [key for key, v in h.items() if not math.isfinite(v)]
    if bad:
        raise FloatingPointError(f"the checklist produced non-finite numbers for {bad}: check the training (grad_norm "
                                 f"{info['grad_norm']:.2g}) and the ground truths")
    return h


def ci_text(metric: str, value: float, low: float, high: float) -> str:
    """``"+0.93 [+0.61, +0.98]"``: a metric with its interval, signed for correlations (Pearson, Spearman, Kendall),
    unsigned for shares and errors (sign agreement, top-k overlap, relative error)."""
    f = "{:+.2f}" if metric in ("pearson", "spearman", "kendall") else "{:.2f}"
    return f"{f.format(value)} [{f.format(low)}, {f.format(high)}]"


def _fmt_ci(h: dict[str, float], tag: str, m: str = "pearson") -> str:
    return ci_text(m, h[f"{tag}_{m}"], h[f"{tag}_{m}_low"], h[f"{tag}_{m}_high"])


def _checks(h: dict[str, float], *, n_seeds: int, lengths: list[int], retrain_epochs: int) -> pd.DataFrame:
    """The checklist of chapter 3 as a table, each item with what was measured here and a verdict."""

    def ok(cond: bool) -> str:
        return "ok" if cond else "warning"

    rows = [
        (1, "name the ground truth and match it to the estimate",
         "Pearson of the Gauss-Newton estimate with the PBRF (the target it linearises) [95 % CI]",
         _fmt_ci(h, "pbrf_gn"), ok(h["pbrf_gn_pearson"] >= MATCHED_OK)),
        (1, "… and say which question leave-one-out asks",
         f"Pearson of the exact-Hessian estimate with cold-start leave-one-out ({n_seeds} seeds) [95 % CI]",
         _fmt_ci(h, "cold"), "reported"),
        (2, "run the drift check", "|drift| / median |Δ_true|, warm start on all layers (nothing removed)",
         f"{h['warm_drift_ratio']:.2g}", ok(h["warm_drift_ratio"] <= DRIFT_RATIO_OK)),
        (3, "measure the seed noise, report the reliability ceiling",
         f"ceiling of the {n_seeds}-seed mean (one seed)", f"{h['ceiling']:.2f} ({h['ceiling_single']:.2f})",
         ok(h["ceiling"] >= CEILING_OK)),
        (4, "size the retraining precision to n", "seed-to-seed sd of Δ / median single-seed |Δ| (cold start)",
         f"{h['cold_noise_to_signal']:.2g}", ok(h["cold_noise_to_signal"] <= NOISE_TO_SIGNAL_OK)),
        (5, "do not pick the stopping epoch",
         f"range of Pearson over the recorded warm-start lengths (up to {retrain_epochs} epochs)",
         f"{h['path_pearson_min']:+.2f} to {h['path_pearson_max']:+.2f}",
         ok(h["path_pearson_max"] - h["path_pearson_min"] <= LENGTH_SPREAD_OK)),
        (6, "state the selection", "range of Pearson over 3 candidate rules × 3 test points (warm start, all layers)",
         f"{h['selection_pearson_min']:+.2f} to {h['selection_pearson_max']:+.2f}",
         ok(h["selection_pearson_max"] - h["selection_pearson_min"] <= SELECTION_SPREAD_OK)),
        (7, "report signed correlations with intervals, and a value measure",
         "relative error ‖pred − true‖/‖true‖ of the Gauss-Newton estimate against the PBRF [95 % CI]",
         _fmt_ci(h, "pbrf_gn", "relative_error"), "reported"),
    ]
    if "known_pearson" in h:
        rows.append((8, "test the pipeline on a case with a known answer",
                     "Pearson of the last layer's influence with its exact leave-one-out (convex, Newton)",
                     f"{h['known_pearson']:+.4f}", ok(h["known_pearson"] >= KNOWN_ANSWER_OK)))
    else:
        rows.append((8, "test the pipeline on a case with a known answer",
                     "needs L2 > 0 and a last layer small enough for dense Newton", "—", "not covered"))
    rows.append((9, "test claims with repetitions, tests and effect sizes",
                 "one θ̂ here: re-run with other `seed`s to compare models or settings", "—", "not covered"))
    return pd.DataFrame(rows, columns=["item", "check", "measured", "value", "verdict"])


# ----------------------------------------------------------------------------------------- for the chapter


def headline_format(key: str) -> str:
    """How the chapter prints a headline number: integers for counts, signed 2 decimals for correlations (4 for the
    known-answer test), 2 decimals for accuracies, ceilings, shares and relative errors, 2 significant digits for
    everything else (gradient norms, eigenvalues, drifts, effects in nats)."""
    if key in ("n_train", "n_params", "n_params_estimate", "k", "cold_k", "n_seeds", "checks_ok", "checks_warning",
               "known_d"):
        return "{:.0f}"
    if key.startswith("known_pearson") or key.startswith("known_spearman"):
        return "{:+.4f}"
    correlation = any(f"{m}" in key for m in ("pearson", "spearman", "kendall"))
    if correlation or key.startswith(("path_", "selection_")):
        return "{:+.2f}"
    if key in ("acc_train", "acc_test") or key.startswith("ceiling") or any(
            m in key for m in ("sign_agreement", "top_k_overlap", "relative_error")):
        return "{:.2f}"
    return "{:.2g}"


def record_headline(result: ChecklistResult) -> dict[str, float]:
    """Record every headline number (:func:`helpers.book.record`: glued for the prose, written to the records
    file the chapter's test asserts), formatted by :func:`headline_format`. Returns the headline."""
    from helpers import book

    for key, value in result.headline.items():
        book.record(key, value, fmt=headline_format(key))
    return result.headline


def prose(result: ChecklistResult) -> dict[str, str]:
    """Sentences of the chapter that depend on the outcome (glued as text): what the Hessian says about θ̂
    (``hessian_verdict``), whether the estimate tracks its matched target (``matched_verdict``), how much of the
    cold-start shortfall is seed noise (``loo_verdict``), the checklist's tally (``checks_text``) and the
    known-answer test (``known_text``). Every key is always present, whatever the outcome."""
    h = result.headline
    out: dict[str, str] = {}
    if "hessian_min_eig" in h:
        lo = h["hessian_min_eig"]
        out["hessian_verdict"] = (
            f"The smallest eigenvalue of the Hessian at θ̂ is {lo:.2g}: θ̂ is a minimum of the training objective"
            if lo > 0 else
            f"The smallest eigenvalue of the Hessian at θ̂ is {lo:.2g}: θ̂ is not quite a minimum (a saddle or a "
            f"plateau the optimiser stopped on), which the damping δ = {h['damping']:g} papers over")
    else:
        out["hessian_verdict"] = (f"With {h['n_params_estimate']:.0f} parameters in the estimate the Hessian's "
                                  "spectrum is not computed densely here")
    tracked = h["pbrf_gn_pearson"] >= MATCHED_OK
    out["matched_verdict"] = ("tracks its matched target closely: the estimate computes what it claims to"
                              if tracked else
                              "does not track even its matched target: suspect the estimate (damping, solver, a θ̂ "
                              "far from a minimum) before any retraining protocol")
    gap = h["ceiling"] - h["cold_pearson"]
    out["loo_verdict"] = (f"within {gap:.2f} of the ceiling that seed noise allows ({h['ceiling']:.2f})"
                          if gap <= 0.1 else
                          f"{gap:.2f} below the ceiling that seed noise allows ({h['ceiling']:.2f}): the rest is the "
                          "difference between what the estimate answers and what leave-one-out from scratch asks")
    warn = result.checks[result.checks.verdict == "warning"]
    n_ok, n_warn = int((result.checks.verdict == "ok").sum()), len(warn)
    items = "; ".join(f"item {r.item}, {r.check}" for r in warn.itertuples())
    out["checks_text"] = (f"all {n_ok} pass" if n_warn == 0 else
                          f"{n_ok} pass and {n_warn} {'carries' if n_warn == 1 else 'carry'} a warning ({items})")
    if "known_pearson" in h:
        kp = h["known_pearson"]
        out["known_text"] = (f"influence and exact leave-one-out agree with Pearson {kp:+.4f}" + (
            ", so the pipeline's indices, signs and scale are right" if kp >= KNOWN_ANSWER_OK else
            f", below {KNOWN_ANSWER_OK}: look for an error in the pipeline (indices, signs, scale) before trusting "
            "any other number — or for training points of very high leverage in a small set"))
    else:
        out["known_text"] = (f"the known-answer test did not run (it needs L2 > 0 and a last layer of at most "
                             f"{KNOWN_ANSWER_MAX_D:,} parameters)")
    return out
