"""Validate influence on your own model (the template chapter, ``book/own_model.ipynb``).

Turns what a reader brings — a dataset name or a tensor file, and a model factory ``"module:function"`` — into a
:class:`helpers.experiments.validation.Problem` and runs the checklist of chapter 3 on it::

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
(:func:`helpers.experiments.validation.make_problem`: the max / median / random-loss test points, the exact-Hessian and the
Gauss-Newton estimates), every ground truth of chapter 3 with its drift run (:func:`helpers.experiments.validation.run_protocols`:
cold start over seeds, warm start on all layers recorded along the way, warm start on the last layer, the PBRF),
the agreement table with bootstrap intervals (:func:`helpers.experiments.validation.side_by_side`), the selection grid
(:func:`helpers.experiments.validation.selection_grid`) and a known-answer test of the pipeline on the convex last layer.

**Verdicts come from intervals.** Every checklist item held to a margin compares the 95 % bootstrap interval of what
was measured with that margin (:func:`interval_verdict`): pass, fail, or inconclusive when the interval straddles it —
never a bare threshold on a point estimate. Ranks are not enough: the fitted slope of estimate on truth and the
relative error stand beside Pearson, against the matched target (item 7) and against the known answer (item 8).

**Damping and memory.** δ defaults to ``"auto"``: derived from the spectrum of H at θ̂
(:func:`helpers.solvers.auto_damping`: zero where H is safely positive definite) and reported. Every batched step
chunks to the memory budget of :mod:`helpers.memory` (``BOOK_MEMORY_GB``, default a quarter of the machine's RAM);
where the dense H would not fit, the estimate is solved by CG, and the chapter says so.

**Bad input, named.** :func:`check_inputs` runs before anything is trained: labels outside the model's classes, a
feature shape the model cannot take, NaN features or wrong dtypes each get a one-line error naming the tensor and
the fix.

**What the chapter's cells call.** :func:`publish` records the headline, glues the verdicts and writes the figure
data; :func:`ground_truth_scatter` and :func:`agreement_figure` draw the two figures; :func:`agreement_display` and
:func:`selection_display` are the two tables.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from helpers import data as data_mod
from helpers import metrics, retrain
from helpers.experiments import validation as V
from helpers.experiments.validation import cold_name
from helpers.influence import predict_removal
from helpers.progress import progress_bar
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
# Margins of the checklist's verdicts (judgement calls, stated so a reader can disagree with them). A verdict compares
# the 95 % interval of what was measured with its margin (:func:`interval_verdict`): "pass" when the whole interval
# lies on the right side, "fail" when it lies wholly on the wrong side, "inconclusive" when it straddles the margin.
MATCHED_OK = 0.9          # Pearson of the Gauss-Newton estimate with the PBRF, the target it linearises: at least
SCALE_BAND = 1.5          # fitted slope of estimate on the PBRF: within [1/1.5, 1.5] (the right scale, ± a factor 1.5)
RELATIVE_ERROR_OK = 0.3   # relative error ‖pred − true‖/‖true‖ of the Gauss-Newton estimate against the PBRF: at most
DRIFT_RATIO_OK = 1.0      # |drift| / median |Δ_true|: above it the procedure moves more than a typical point does
CEILING_OK = 0.5          # reliability ceiling of the cold-start seed mean: at least
NOISE_TO_SIGNAL_OK = 1.0  # seed-to-seed sd of Δ over median |Δ| (cold start): at most
LENGTH_SPREAD_OK = 0.2    # range of Pearson over the recorded retraining lengths: at most
SELECTION_SPREAD_OK = 0.3  # range of Pearson over candidate rules × test points: at most
LOO_MARGIN = 0.1          # the cold-start Pearson is "at the ceiling" when its interval reaches within this of it
# The known answer: the last layer's influence against its exact (Newton) leave-one-out. A broken pipeline (indices,
# signs) gives a Pearson of about 0, a wrong scale a slope far from 1; the second-order (leverage) term keeps small,
# high-leverage sets a little below 1 on both, hence margins rather than equality.
KNOWN_ANSWER_OK = 0.95         # Pearson: at least
KNOWN_SLOPE_BAND = 1.5         # slope: within [1/1.5, 1.5] (n = 60 points and 21 head parameters: about 0.83)
KNOWN_RELATIVE_ERROR_OK = 0.3   # relative error: at most
KNOWN_ANSWER_MAX_D = 2000  # the known-answer test needs a dense last-layer Hessian per member: skip above this
#: the verdicts of :attr:`ChecklistResult.checks`
VERDICTS: tuple[str, ...] = ("pass", "fail", "inconclusive", "reported", "not covered")


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
                         f"'helpers.experiments.own_model:example_factory' or 'mypkg.models:make_net'; got {spec!r}")
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
    :func:`helpers.experiments.validation.last_layer_problem`) reads ``model.last_layer``; a model without one is wrapped so
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
    out = _forward(model, probe, "x_train", d)
    with torch.no_grad():
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


def _forward(model: nn.Module, x: Tensor, name: str, d: int) -> Tensor:
    """``model(x)`` without gradient; an error inside the model becomes one line naming the tensor and the fix."""
    try:
        with torch.no_grad():
            return model(x)
    except (RuntimeError, ValueError, IndexError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"the model cannot take {name}: its samples have shape {tuple(x.shape[1:])} ({d} features) "
                         f"and its forward pass raised {type(err).__name__}: {first}. Build the model for these data "
                         f"— the factory is called with in_features={d} and must use it — or pass data with the "
                         "features the model expects") from None


def check_inputs(model: nn.Module, train: Data, test: Data) -> int:
    """Check the data against the model before anything is trained; returns C, the number of logits.

    One-line errors (naming the tensor and the fix) for what would otherwise fail deep inside torch: features that
    are not finite real numbers, or not float64-castable; labels that are not ``[n]`` integers; labels outside the
    model's classes ``0 … C−1``; a feature shape the model cannot take (its forward pass on two rows of each part
    raises) or that differs between the parts.

    Raises:
        TypeError: a part is not a pair of tensors, or a label / feature dtype is wrong.
        ValueError: everything else above.
    """
    parts = {"train": train, "test": test}
    for part, data in parts.items():
        if not isinstance(data, (tuple, list)) or len(data) != 2 or not all(isinstance(t, Tensor) for t in data):
            raise TypeError(f"{part} must be a pair of tensors (x_{part}, y_{part}), got {type(data).__name__}: "
                            "use helpers.experiments.own_model.load_data")
        x, y = data
        if x.is_complex() or not (x.is_floating_point() or _is_integer(x)):
            raise TypeError(f"x_{part} has dtype {x.dtype}; features must be real numbers (cast with x.double())")
        if x.dim() < 2 or x.shape[0] == 0:
            raise ValueError(f"x_{part} has shape {tuple(x.shape)}; features must be [n, ...] with n >= 1 (one row per "
                             "sample; unsqueeze(1) a single feature)")
        if not torch.isfinite(x.double()).all():
            bad = int((~torch.isfinite(x.double())).sum())
            raise ValueError(f"x_{part} has {bad} non-finite value(s) (NaN / inf): impute or drop those samples")
        if not _is_integer(y) or y.dim() != 1:
            raise TypeError(f"y_{part} has dtype {y.dtype} and shape {tuple(y.shape)}; labels must be an [n] integer "
                            "tensor of class indices 0 … C−1 (y.long(); not one-hot: y.argmax(1))")
        if y.shape[0] != x.shape[0]:
            raise ValueError(f"x_{part} has {x.shape[0]} rows but y_{part} has {y.shape[0]}: they must match")
    if train[0].shape[1:] != test[0].shape[1:]:
        raise ValueError(f"a sample of x_train has shape {tuple(train[0].shape[1:])} but one of x_test "
                         f"{tuple(test[0].shape[1:])}: they must match")
    d = int(math.prod(train[0].shape[1:]))
    dtype = next(model.parameters()).dtype
    outs = {part: _forward(model, data[0][:2].to(dtype), f"x_{part}", d) for part, data in parts.items()}
    c = int(outs["train"].shape[-1]) if outs["train"].dim() == 2 else -1
    if c < 1:
        raise ValueError(f"the model maps x_train to shape {tuple(outs['train'].shape)}; it must return logits "
                         "[batch, C]")
    for part, (_, y) in parts.items():
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= c:
            bad = lo if lo < 0 else hi
            raise ValueError(f"y_{part} holds label {bad}, outside the model's {c} classes 0 … {c - 1}: build the "
                             f"model with n_classes = n_classes_of(train, test) = "
                             f"{max(int(train[1].max()), int(test[1].max())) + 1}, or relabel y to 0 … C−1")
    return c


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
    """The template chapter's default factory (``"helpers.experiments.own_model:example_factory"``): :class:`ResidualMLP`.

    With the defaults on ``wine`` (13 features, 3 classes): 393 parameters, small enough for the dense Hessian.
    """
    return ResidualMLP(in_features, n_classes, width=width, blocks=blocks)


def image_cnn_factory(in_features: int, n_classes: int, width: int = 4, channels: int = 1,
                      activation: str = "tanh") -> nn.Module:
    """A small convolutional factory for square images stored flat (``"helpers.experiments.own_model:image_cnn_factory"``).

    Reads each sample's ``in_features = channels × side²`` numbers as a ``[channels, side, side]`` image and returns
    :func:`helpers.models.small_cnn` (two 3×3 convolutions of ``width`` channels with 2×2 average pooling, then one
    linear layer). With the defaults on ``digits`` (8×8): 358 parameters. ``activation`` is smooth by default (tanh):
    a ReLU network's Hessian ignores the kinks.
    """
    from helpers import models

    side = math.isqrt(max(int(in_features) // max(int(channels), 1), 0))
    if side < 4 or channels * side * side != in_features:
        raise ValueError(f"image_cnn_factory reads samples as square images of {channels} channel(s): in_features = "
                         f"{in_features} is not {channels} × side² with side >= 4; pass channels=, or use another "
                         "factory for feature vectors")
    return models.small_cnn(in_channels=channels, n_classes=n_classes, width=width, input_size=side,
                            activation=activation)


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
        agreement: tidy table (:func:`helpers.experiments.validation.side_by_side`): one row per estimate × ground truth ×
            metric with ``value, low, high`` (95 % paired bootstrap), ``n``, ``ceiling``, ``ceiling_single``,
            ``drift``, ``drift_ratio``, ``median_abs_delta``; max-loss test point.
        headline: flat dict of finite numbers: sizes, θ̂'s diagnostics, the damping δ used and the spectrum behind
            it, whether the solve fell back to CG (``solver_fallback``) and the memory budget,
            ``<tag>_<metric>[_low|_high]`` for every tag of :data:`TRUTH_TAGS` and every metric of
            :data:`helpers.metrics.AGREEMENT_METRICS`, ``<tag>_slope[_low|_high]`` (fitted slope of estimate on
            truth), noise ceilings, drift ratios, the spreads over retraining length and selection, all with
            intervals, the known-answer test on ranks and values, and the tally of verdicts (``checks_pass``,
            ``checks_fail``, ``checks_inconclusive``).
        checks: the checklist: ``item, check, measured, value, margin, verdict``, one or more rows per item of
            chapter 3's checklist; ``value`` with its 95 % interval, ``verdict`` that interval against ``margin``
            (:func:`interval_verdict`: ``pass`` / ``fail`` / ``inconclusive``), or ``reported`` / ``not covered``.
        selection: :func:`helpers.experiments.validation.selection_grid` against warm start on all layers.
        paths: Pearson and Spearman of the estimate with warm start on all layers at every recorded epoch.
        scatter: estimate and Δ_true per candidate and ground truth, with the noise band ``band`` (± nats) of that
            ground truth (figure data).
        problem, truths, candidates: the fixed problem, the ground truths (:func:`helpers.experiments.validation.run_protocols`)
            and the candidates (training positions, largest ``|estimate|`` for the max-loss test point first).
        lengths: the shorter warm-start lengths reported as ``warm all @ e`` rows (:func:`helpers.experiments.validation.retraining_lengths`).
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


def run_checklist(model: nn.Module, train: Data, test: Data, recipe: Recipe, *, name: str = "your model",
                  params: str = "all", damping: float | str = "auto", retrain_lr: float = 1e-3,
                  retrain_epochs: int = 500,
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
            ``"last"``. damping: δ of the exact-Hessian estimate (H must be positive definite after it), or
            ``"auto"`` (default): δ from the spectrum of H at θ̂ by :func:`helpers.solvers.auto_damping` — zero
            where H is positive definite with a condition number of at most 10⁶, else the least shift that makes it
            so (twice |λ_min| where H has negative curvature); the δ used and the eigenvalues behind it are in the
            headline (``damping``, ``damping_eig_min``, ``damping_eig_max``) and in item 1 of the checklist.
            Where the dense H would not fit the memory budget (``BOOK_MEMORY_GB``, :mod:`helpers.memory`) the
            estimate is solved by CG instead of Cholesky (``solver_fallback`` = 1, said in :func:`prose`).
        retrain_lr, retrain_epochs, every: warm start on all layers — a fresh Adam from θ̂ at a constant
            ``retrain_lr`` for ``retrain_epochs``, recorded every ``every`` epochs (the sweep of lengths); the PBRF
            (``pbrf_damping``) is optimised by the same recipe (by the last-layer recipe when ``params="last"``).
        head_epochs: warm start on the last layer (full batch, on cached features), recorded every ``every``.
        k: candidates (the k largest ``|estimate|`` for the max-loss test point); cold_k: the first cold_k of them are
            retrained from scratch (the costly protocol). k is also the size of each selection rule's set.
        n_bootstrap: resamples per interval; seed: the random test point, the random candidates, the bootstrap.
        cache: memoise every training and retraining run (:mod:`helpers.cache`).
        progress: a bar over the steps (:mod:`helpers.progress`).

    Returns:
        :class:`ChecklistResult`.

    Raises:
        ValueError / TypeError: inconsistent sizes, a float32 recipe, or data the model cannot take
            (:func:`check_inputs`: labels outside its classes, a feature shape it cannot read, NaN, wrong dtypes).
        helpers.solvers.NotPositiveDefiniteError: H + δI not positive definite at θ̂ (the message names the damping
            that fixes it).

    Cost: one training run; two influence solves over ``params``; ground truths as ensembles of
    ``n_seeds · (cold_k + 1)`` (cold, θ̂'s recipe), ``|pool| + 1`` (warm all, ``retrain_epochs``), ``k + 1`` (warm
    last, PBRF) and ``k + 1`` Newton members on the last layer, where ``|pool| ≤ 5k`` is the union of every selection
    rule's candidates; 8 + 9 agreement rows of six bootstraps each, and about ten more bootstraps for the slopes, the
    known answer and the procedure's own numbers (:func:`resample_ci`). Memory: within :func:`helpers.memory.budget`
    (every batched step chunks to it), plus the dense H of the estimate where it fits.
    """
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
    if not (damping == "auto" or (isinstance(damping, (int, float)) and math.isfinite(damping) and damping >= 0)):
        raise ValueError(f"damping must be 'auto' or a number >= 0, got {damping!r}")
    check_inputs(model, train, test)
    with warnings.catch_warnings():
        # torch's forward-mode AD loads decompositions through the deprecated torch.jit.script on first use; the
        # FutureWarning is torch-internal and says nothing about this computation (as in helpers.train).
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
        bar = progress_bar(6, f"checklist: {name}", progress)

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
        lengths = V.retraining_lengths(truths["warm_all"].epochs)
        top_k = max(2, k // 5)
        agreement = V.side_by_side(problem, truths, candidates, lengths=lengths, n_resamples=n_bootstrap, seed=seed,
                                   k=top_k)
        bar.update()

        bar.set_postfix_str("retraining lengths, selection")
        paths = V.correlation_path(truths["warm_all"], problem.estimate[0], candidates)
        wg = truths["warm_all"].at(int(truths["warm_all"].epochs[-1]))
        selection = V.selection_grid(problem, wg.delta[:, V.columns_of(wg.removed, pool)], pool, k, seed=seed,
                                     n_resamples=n_bootstrap, top_k=top_k)
        bar.update()

        bar.set_postfix_str("known answer")
        known = _known_answer(problem, candidates, cache=cache, n_resamples=n_bootstrap, seed=seed)
        bar.update()

        scatter = _scatter(problem, truths, candidates)
        headline = _headline(problem, truths, agreement, paths, selection, known, k=k, cold_k=cold_k, n_seeds=n_seeds,
                             damping=problem.damping, candidates=candidates, scatter=scatter, n_bootstrap=n_bootstrap,
                             seed=seed)
        headline["damping_auto"] = float(damping == "auto")
        checks = _checks(headline, n_seeds=n_seeds, lengths=lengths, retrain_epochs=retrain_epochs)
        for verdict in ("pass", "fail", "inconclusive"):
            headline[f"checks_{verdict}"] = float((checks.verdict == verdict).sum())
        bar.update()
        bar.close()
        return ChecklistResult(agreement=agreement, headline=headline, checks=checks, selection=selection, paths=paths,
                               scatter=scatter, problem=problem, truths=truths, candidates=np.asarray(candidates),
                               lengths=lengths)


def _known_answer(problem: V.Problem, candidates: np.ndarray, *, cache: bool, n_resamples: int = 1000,
                  seed: int = 0) -> dict[str, float] | None:
    """The pipeline on a case with a known answer: the last layer alone, on its frozen features, is a convex problem
    (multinomial logistic regression with L2 λ). Fitted to its minimum by Newton (‖∇R‖ < 1e-10), its influence
    estimate must match exact leave-one-out (Newton from that minimum, same tolerance) on the same candidates, in
    rank *and value* — a test of indices, signs and scale that does not depend on how well θ̂ itself was trained.
    Returns Pearson, Spearman, relative error and the fitted slope of estimate on exact leave-one-out (with 95 %
    paired bootstrap intervals ``_low`` / ``_high`` for Pearson, slope and relative error), the largest final
    gradient norm and the head's size ``d``; or None when it cannot run (λ = 0, or a last layer too large for dense
    Newton)."""
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
    out = {"spearman": metrics.spearman(p, t), "grad_norm": float(np.max(exact.grad_norm)), "d": float(d_head)}
    for name, metric in (("pearson", "pearson"), ("relative_error", "relative_error"), ("slope", metrics.slope)):
        out[name], out[f"{name}_low"], out[f"{name}_high"] = metrics.bootstrap_ci(metric, p, t,
                                                                                 n_resamples=n_resamples, seed=seed)
    return out


def resample_ci(stat: Callable[[np.ndarray], float], n: int, *, n_resamples: int = 1000, seed: int = 0,
                confidence: float = 0.95) -> tuple[float, float, float]:
    """``(value, low, high)``: ``stat`` on all n points and its percentile bootstrap interval over the points.

    ``stat(idx)`` computes the statistic from the points ``idx`` (an int array, with repeats in a resample) — for
    statistics that are not a function of one pair of arrays (a ratio of medians, a noise ceiling, the range of a
    correlation along retraining length), where :func:`helpers.metrics.bootstrap_ci` does not apply. Resamples on
    which ``stat`` raises ValueError or is not finite (e.g. a constant resample) are dropped; at least half must
    remain. Cost: ``n_resamples`` calls of ``stat``.

    Raises:
        ValueError: fewer than 2 points, or more than half of the resamples undefined.
    """
    if n < 2:
        raise ValueError(f"a bootstrap over points needs at least 2 points, got {n}")
    value = float(stat(np.arange(n)))
    rng = np.random.default_rng(seed)
    draws = []
    for idx in rng.integers(0, n, size=(int(n_resamples), n)):
        try:
            v = float(stat(idx))
        except ValueError:
            continue
        if math.isfinite(v):
            draws.append(v)
    if len(draws) < 0.5 * n_resamples:
        raise ValueError(f"the statistic is undefined on {n_resamples - len(draws)} of {n_resamples} resamples of "
                         f"{n} points: use more points")
    alpha = (1 - confidence) / 2
    return value, float(np.quantile(draws, alpha)), float(np.quantile(draws, 1 - alpha))


def interval_verdict(low: float, high: float, *, at_least: float | None = None, at_most: float | None = None) -> str:
    """The verdict of an interval ``[low, high]`` against a margin: ``"pass"`` when the whole interval lies on the
    right side (≥ ``at_least`` and/or ≤ ``at_most``), ``"fail"`` when it lies wholly on the wrong side of either
    bound, ``"inconclusive"`` when it straddles one. Never a verdict from the point estimate alone."""
    if at_least is None and at_most is None:
        raise ValueError("give the margin: at_least, at_most, or both (a band)")
    if not low <= high:
        raise ValueError(f"the interval must have low <= high, got [{low}, {high}]")
    if (at_least is not None and high < at_least) or (at_most is not None and low > at_most):
        return "fail"
    if (at_least is None or low >= at_least) and (at_most is None or high <= at_most):
        return "pass"
    return "inconclusive"


def _procedure_intervals(problem: V.Problem, truths: dict[str, Any], candidates: np.ndarray, selection: pd.DataFrame,
                         *, n_resamples: int, seed: int) -> dict[str, float]:
    """Bootstrap intervals (over candidates) of the procedure's own numbers, for the checklist's margins: the drift
    ratio of warm start on all layers, the cold-start ceiling and noise-to-signal ratio, the range of Pearson over
    the recorded warm-start lengths; and bounds on the selection range from the nine cells' intervals."""
    out: dict[str, float] = {}
    wa = truths["warm_all"]
    final = wa.at(int(wa.epochs[-1]))
    cols = V.columns_of(final.removed, candidates)
    d_final = np.abs(final.delta[0, cols])
    drift = abs(float(np.ravel(final.drift)[0]))

    def ratio(idx: np.ndarray) -> float:
        m = float(np.median(d_final[idx]))
        if m <= 0:
            raise ValueError("zero median")
        return drift / m

    out["warm_drift_ratio"], out["warm_drift_ratio_low"], out["warm_drift_ratio_high"] = resample_ci(
        ratio, len(cols), n_resamples=n_resamples, seed=seed)

    cold = truths["cold"]
    dps = cold.delta_per_seed[:, 0, :]  # [seeds, cold candidates]
    noise = cold.noise[0]
    out["ceiling"], out["ceiling_low"], out["ceiling_high"] = resample_ci(
        lambda idx: metrics.noise_ceiling(dps[:, idx]).ceiling, dps.shape[1], n_resamples=n_resamples, seed=seed)

    def noise_to_signal(idx: np.ndarray) -> float:
        m = float(np.median(np.abs(dps[:, idx])))
        if m <= 0:
            raise ValueError("zero median")
        return float(np.median(noise[idx])) / m

    out["cold_noise_to_signal"], out["cold_noise_to_signal_low"], out["cold_noise_to_signal_high"] = resample_ci(
        noise_to_signal, dps.shape[1], n_resamples=n_resamples, seed=seed)

    c_all = V.columns_of(wa.removed, candidates)
    est = problem.estimate[0, candidates]
    keep = [i for i, e in enumerate(wa.epochs) if e > 0 and np.ptp(wa.delta[i, 0, c_all]) > 0]
    paths = np.stack([wa.delta[i, 0, c_all] for i in keep])  # [epochs, candidates]

    def path_range(idx: np.ndarray) -> float:
        r = [metrics.pearson(est[idx], p[idx]) for p in paths]
        return float(max(r) - min(r))

    out["path_pearson_range"], out["path_pearson_range_low"], out["path_pearson_range_high"] = resample_ci(
        path_range, len(candidates), n_resamples=max(200, n_resamples // 5), seed=seed)

    sel = selection[selection.metric == "pearson"]
    out["selection_range_low"] = float(max(0.0, sel.low.max() - sel.high.min()))
    out["selection_range_high"] = float(sel.high.max() - sel.low.min())
    return out


def _unchunked_hvp_bytes(problem: V.Problem) -> float:
    """What assembling the dense H in one ``vmap`` over all d columns would hold (the unchunked assembly that ran out
    of memory on a small CNN): d columns × :data:`helpers.memory.HVP_FACTOR` × n × activation bytes per row
    (measured, :func:`helpers.memory.model_row_bytes`). 0 if the activations cannot be measured."""
    from helpers import memory
    from helpers.objective import model_params, param_names

    target, (x, y) = (problem.model, problem.train) if problem.params == "all" else (problem.head, problem.head_train)
    P = model_params(target, param_names(target))
    try:
        rb = memory.model_row_bytes(target, P, x, y)
    except Exception:  # noqa: BLE001 - a report, not a computation the chapter depends on
        return 0.0
    return float(sum(v.numel() for v in P.values()) * memory.HVP_FACTOR * x.shape[0] * rb)


def _slopes(scatter: pd.DataFrame, *, n_resamples: int, seed: int) -> dict[str, float]:
    """Fitted slope of estimate on ground truth, with its 95 % paired bootstrap interval, for every panel of the
    scatter: ``<tag>_slope[_low|_high]`` (tags of :data:`TRUTH_TAGS`: cold, warm, last, pbrf_gn)."""
    out: dict[str, float] = {}
    for (gt, kind), g in scatter.groupby(["ground_truth", "estimate_kind"], sort=False):
        tag = TRUTH_TAGS[(kind, "cold" if gt.startswith("cold") else gt)]
        v, lo, hi = metrics.bootstrap_ci(metrics.slope, g.estimate.to_numpy(), g.delta_true.to_numpy(),
                                         n_resamples=n_resamples, seed=seed)
        out[f"{tag}_slope"], out[f"{tag}_slope_low"], out[f"{tag}_slope_high"] = v, lo, hi
    return out


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
              damping: float, candidates: np.ndarray, scatter: pd.DataFrame, n_bootstrap: int, seed: int
              ) -> dict[str, float]:
    from helpers import memory, solvers

    info = problem.info
    d = int(info["n_params_estimate"])
    h: dict[str, float] = {"n_train": float(problem.n_train), "n_params": info["n_params"],
                           "n_params_estimate": info["n_params_estimate"], "acc_train": info["acc_train"],
                           "acc_test": info["acc_test"], "grad_norm": info["grad_norm"],
                           "train_loss": info["train_loss"], "test_loss_max": info["test_loss_max"],
                           "solver_residual": info["residual"], "damping": float(damping), "l2": problem.l2,
                           "k": float(k), "cold_k": float(cold_k), "n_seeds": float(n_seeds),
                           "solver_fallback": float(info.get("solver_fallback", 0.0)),
                           "memory_budget_gb": memory.budget() / 2**30,
                           "dense_gb": solvers.dense_bytes(d) / 2**30,
                           "unchunked_hvp_gb": _unchunked_hvp_bytes(problem) / 2**30}
    h |= {key: info[key] for key in ("hessian_min_eig", "hessian_max_eig", "damping_eig_min", "damping_eig_max",
                                     "damping_eig_dense") if key in info}
    for (est, gt), tag in TRUTH_TAGS.items():
        gt = cold_name(n_seeds) if gt == "cold" else gt
        rows = agreement[(agreement.estimate == est) & (agreement.ground_truth == gt)]
        for m in metrics.AGREEMENT_METRICS:
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
    h |= _slopes(scatter, n_resamples=n_bootstrap, seed=seed)
    spread = _procedure_intervals(problem, truths, candidates, selection, n_resamples=n_bootstrap, seed=seed)
    # the intervals come with their own point values (same data, same formulas); the table's values stay as they are
    h |= {key: v for key, v in spread.items() if key not in h}
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


def _band(b: float) -> str:
    return f"within [{1 / b:.2f}, {b:.2f}]"


def _checks(h: dict[str, float], *, n_seeds: int, lengths: list[int], retrain_epochs: int) -> pd.DataFrame:
    """The checklist of chapter 3 as a table, one row per check: what was measured here, its value with a 95 %
    interval, the margin it is held to, and the verdict of that interval against that margin
    (:func:`interval_verdict`: pass / fail / inconclusive; ``reported`` where there is no margin to hold it to)."""
    iv = interval_verdict
    sr = SCALE_BAND
    rows = [
        (1, "name the ground truth and match it to the estimate",
         "Pearson of the Gauss-Newton estimate with the PBRF (the target it linearises) [95 % CI]",
         _fmt_ci(h, "pbrf_gn"), f"≥ {MATCHED_OK:.2f}",
         iv(h["pbrf_gn_pearson_low"], h["pbrf_gn_pearson_high"], at_least=MATCHED_OK)),
        (1, "… and say which question leave-one-out asks",
         f"Pearson of the exact-Hessian estimate with cold-start leave-one-out ({n_seeds} seeds) [95 % CI]",
         _fmt_ci(h, "cold"), "—", "reported"),
        (1, "… and state the estimate: damping and solver",
         "δ of H + δI (\"auto\": from the spectrum, helpers.solvers.auto_damping) and how it was solved",
         damping_value(h), "—", "reported"),
        (2, "run the drift check",
         "|drift| / median |Δ_true|, warm start on all layers (nothing removed) [95 % CI over candidates]",
         _ci(h, "warm_drift_ratio", "{:.2g}"), f"≤ {DRIFT_RATIO_OK:g}",
         iv(h["warm_drift_ratio_low"], h["warm_drift_ratio_high"], at_most=DRIFT_RATIO_OK)),
        (3, "measure the seed noise, report the reliability ceiling",
         f"ceiling of the {n_seeds}-seed mean [95 % CI over candidates] (one seed)",
         f"{_ci(h, 'ceiling', '{:.2f}')} ({h['ceiling_single']:.2f})", f"≥ {CEILING_OK:.2f}",
         iv(h["ceiling_low"], h["ceiling_high"], at_least=CEILING_OK)),
        (4, "size the retraining precision to n",
         "seed-to-seed sd of Δ / median single-seed |Δ| (cold start) [95 % CI over candidates]",
         _ci(h, "cold_noise_to_signal", "{:.2g}"), f"≤ {NOISE_TO_SIGNAL_OK:g}",
         iv(h["cold_noise_to_signal_low"], h["cold_noise_to_signal_high"], at_most=NOISE_TO_SIGNAL_OK)),
        (5, "do not pick the stopping epoch",
         f"range of Pearson over the recorded warm-start lengths (up to {retrain_epochs} epochs) [95 % CI]",
         _ci(h, "path_pearson_range", "{:.2f}"), f"≤ {LENGTH_SPREAD_OK:.2f}",
         iv(h["path_pearson_range_low"], h["path_pearson_range_high"], at_most=LENGTH_SPREAD_OK)),
        (6, "state the selection",
         "range of Pearson over 3 candidate rules × 3 test points (warm start, all layers) [bounds from the cells' "
         "95 % CIs]",
         f"{h['selection_pearson_max'] - h['selection_pearson_min']:.2f} [{h['selection_range_low']:.2f}, "
         f"{h['selection_range_high']:.2f}]", f"≤ {SELECTION_SPREAD_OK:.2f}",
         iv(h["selection_range_low"], h["selection_range_high"], at_most=SELECTION_SPREAD_OK)),
        (7, "report a value measure beside every correlation: scale (slope)",
         "fitted slope of the Gauss-Newton estimate on the PBRF (1: the right scale) [95 % CI]",
         _ci(h, "pbrf_gn_slope", "{:.2f}"), _band(sr),
         iv(h["pbrf_gn_slope_low"], h["pbrf_gn_slope_high"], at_least=1 / sr, at_most=sr)),
        (7, "… and a value measure: relative error",
         "relative error ‖pred − true‖/‖true‖ of the Gauss-Newton estimate against the PBRF [95 % CI]",
         _fmt_ci(h, "pbrf_gn", "relative_error"), f"≤ {RELATIVE_ERROR_OK:.2f}",
         iv(h["pbrf_gn_relative_error_low"], h["pbrf_gn_relative_error_high"], at_most=RELATIVE_ERROR_OK)),
    ]
    item8 = "test the pipeline on a case with a known answer"
    if "known_pearson" in h:
        kb = KNOWN_SLOPE_BAND
        rows += [
            (8, item8, "Pearson of the last layer's influence with its exact leave-one-out (convex, Newton) [95 % CI]",
             _ci(h, "known_pearson", "{:+.4f}"), f"≥ {KNOWN_ANSWER_OK:.2f}",
             iv(h["known_pearson_low"], h["known_pearson_high"], at_least=KNOWN_ANSWER_OK)),
            (8, "… on values: scale (slope)", "fitted slope of that influence on exact leave-one-out [95 % CI]",
             _ci(h, "known_slope", "{:.3f}"), _band(kb),
             iv(h["known_slope_low"], h["known_slope_high"], at_least=1 / kb, at_most=kb)),
            (8, "… on values: relative error", "relative error of that influence against exact leave-one-out [95 % CI]",
             _ci(h, "known_relative_error", "{:.3f}"), f"≤ {KNOWN_RELATIVE_ERROR_OK:.2f}",
             iv(h["known_relative_error_low"], h["known_relative_error_high"], at_most=KNOWN_RELATIVE_ERROR_OK)),
        ]
    else:
        rows.append((8, item8, "needs L2 > 0 and a last layer small enough for dense Newton", "—", "—", "not covered"))
    rows.append((9, "test claims with repetitions, tests and effect sizes",
                 "one θ̂ here: re-run with other `seed`s to compare models or settings", "—", "—", "not covered"))
    return pd.DataFrame(rows, columns=["item", "check", "measured", "value", "margin", "verdict"])


def _ci(h: dict[str, float], key: str, fmt: str) -> str:
    return f"{fmt.format(h[key])} [{fmt.format(h[key + '_low'])}, {fmt.format(h[key + '_high'])}]"


def damping_value(h: dict[str, float]) -> str:
    """Item 1's value: the δ used, the spectrum it came from, the solver."""
    solver = "CG (the dense H would not fit the memory budget)" if h["solver_fallback"] else "exact (dense H)"
    if "damping_eig_min" in h:
        return (f"δ = {h['damping']:.2g} (auto; λ_min = {h['damping_eig_min']:.2g}, λ_max = {h['damping_eig_max']:.2g}"
                f"); {solver}")
    return f"δ = {h['damping']:.2g} (set by hand); {solver}"


# ----------------------------------------------------------------------------------------- for the chapter


def headline_format(key: str) -> str:
    """How the chapter prints a headline number: integers for counts, signed 2 decimals for correlations (4 for the
    known-answer test), 2 decimals for accuracies, ceilings, shares and relative errors, 2 significant digits for
    everything else (gradient norms, eigenvalues, drifts, effects in nats)."""
    if key in ("n_train", "n_params", "n_params_estimate", "k", "cold_k", "n_seeds", "known_d", "solver_fallback",
               "damping_auto", "damping_eig_dense") or key.startswith("checks_"):
        return "{:.0f}"
    if key.startswith("known_pearson") or key.startswith("known_spearman"):
        return "{:+.4f}"
    if key.startswith(("known_slope", "known_relative_error")):
        return "{:.3f}"
    if "_range" in key or "slope" in key:
        return "{:.2f}"
    correlation = any(f"{m}" in key for m in ("pearson", "spearman", "kendall"))
    if correlation or key.startswith(("path_", "selection_")):
        return "{:+.2f}"
    if key in ("acc_train", "acc_test") or key.startswith("ceiling") or any(
            m in key for m in ("sign_agreement", "top_k_overlap", "relative_error", "slope", "_range")):
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
    """Sentences of the chapter that depend on the outcome (glued as text). Every key is always present:

    * ``hessian_verdict``: the spectrum of H at θ̂ against the margin of :func:`helpers.solvers.auto_damping`
      (λ_min ≥ 10⁻⁶ · max|λ|: a minimum), and the damping δ that follows from it or was set by hand;
    * ``solver_text``: how (H + δI)⁻¹ was applied — exactly, or by CG where the dense H would not fit the memory
      budget (``BOOK_MEMORY_GB``) — with its residual;
    * ``matched_verdict``: whether the estimate tracks its matched target, from items 1 and 7 (intervals against
      margins, in rank and in scale);
    * ``loo_verdict``: the cold-start Pearson's interval against the seed-noise ceiling (margin :data:`LOO_MARGIN`);
    * ``checks_text``: the checklist's tally; ``known_text``: the known-answer test, on ranks and values.
    """
    from helpers import memory, solvers

    h = result.headline
    c = result.checks
    out: dict[str, str] = {}
    delta = h["damping"]
    lo = h.get("damping_eig_min", h.get("hessian_min_eig"))
    hi = h.get("damping_eig_max", h.get("hessian_max_eig"))
    if lo is not None and hi is not None:
        margin = solvers.AUTO_RCOND * max(abs(lo), abs(hi))
        where = "" if h.get("damping_eig_dense", 1.0) else " (Ritz values of a short Lanczos run: λ_min from above)"
        spec = (f"The Hessian at θ̂ has eigenvalues from {lo:.2g} to {hi:.2g}{where}. "
                + (f"Its smallest eigenvalue is above the margin 10⁻⁶ · max|λ| = {margin:.1g}: θ̂ is a minimum"
                   if lo >= margin else
                   f"Its smallest eigenvalue is {'below zero' if lo < 0 else 'below the margin 10⁻⁶ · max|λ| = '}"
                   f"{'' if lo < 0 else f'{margin:.1g}'}: θ̂ is not quite a minimum (a saddle or a plateau the "
                   "optimiser stopped on)"))
        if h.get("damping_auto"):
            rule = ("so the estimate inverts H itself (δ = 0: no damping, no bias)" if delta == 0 else
                    f"so the damping is δ = {delta:.2g} (helpers.solvers.auto_damping: "
                    + ("twice |λ_min| plus the margin, which makes H + δI positive definite with its smallest "
                       "eigenvalue as far from zero as the negative one was" if lo < 0 else
                       "the least that brings the condition number of H + δI down to 10⁶")
                    + "); the estimate's values are biased towards zero in the directions it lifts")
        else:
            rule = (f"and the damping was set by hand to δ = {delta:.2g}"
                    + (", above λ_min: it shrinks every value of the estimate (set damping = \"auto\" to derive "
                       "it from the spectrum)" if lo > 0 and delta > lo else ""))
        out["hessian_verdict"] = f"{spec}, {rule}"
    else:
        out["hessian_verdict"] = (f"With {h['n_params_estimate']:.0f} parameters in the estimate the Hessian's "
                                  f"spectrum is not computed densely here; the damping is δ = {delta:.2g}")
    used = memory.gb(h["dense_gb"] * 2**30)
    budget = memory.gb(h["memory_budget_gb"] * 2**30)
    out["solver_text"] = (
        f"The dense H over {h['n_params_estimate']:.0f} parameters would take {used}, over the memory budget of "
        f"{budget} ({memory.ENV}), so (H + δI)⁻¹ was applied by conjugate gradients instead of an exact solve, to a "
        f"relative residual of {h['solver_residual']:.1g}"
        if h["solver_fallback"] else
        f"H was assembled densely ({used} of the {budget} memory budget, {memory.ENV}) and solved exactly, to a "
        f"relative residual of {h['solver_residual']:.1g}")
    if h["unchunked_hvp_gb"] * 2**30 > memory.budget():
        out["solver_text"] += (f"; its columns were computed in chunks that fit the budget (one batch of all of them "
                               f"would have held about {memory.gb(h['unchunked_hvp_gb'] * 2**30)})")

    def verdict(check_start: str) -> str:
        return str(c[c.check.str.startswith(check_start)].verdict.iloc[0])

    rank = verdict("name the ground truth")
    scale = verdict("report a value measure")
    slope, pear = _ci(h, "pbrf_gn_slope", "{:.2f}"), _fmt_ci(h, "pbrf_gn")
    if rank == "pass" and scale == "pass":
        out["matched_verdict"] = (f"tracks its matched target in rank (Pearson {pear}, margin ≥ {MATCHED_OK}) and in "
                                  f"scale (slope {slope}, margin {_band(SCALE_BAND)}): the estimate computes what it "
                                  "claims to")
    elif rank == "fail" or scale == "fail":
        what = " and ".join(w for w, v in (("in rank", rank), ("in scale", scale)) if v == "fail")
        out["matched_verdict"] = (f"misses even its matched target {what} (Pearson {pear}, margin ≥ {MATCHED_OK}; "
                                  f"slope {slope}, margin {_band(SCALE_BAND)}): "
                                  "suspect the estimate — damping, solver, a θ̂ "
                                  "far from a minimum, or second-order (leverage) effects at this n — before any "
                                  "retraining protocol")
    else:
        out["matched_verdict"] = (f"cannot be told to track its matched target or not: the intervals (Pearson {pear}, "
                                  f"margin ≥ {MATCHED_OK}; slope {slope}, margin {_band(SCALE_BAND)}) straddle the "
                                  "margins — "
                                  "more candidates (`k`) narrow them")
    ceiling, top = h["ceiling"], h["cold_pearson_high"]
    out["loo_verdict"] = (
        f"its interval reaches within {LOO_MARGIN} of the ceiling that seed noise allows ({ceiling:.2f}): at this "
        "precision it cannot be told apart from the best any estimate could reach against this ground truth"
        if top >= ceiling - LOO_MARGIN else
        f"even the interval's upper end lies {ceiling - top:.2f} below the ceiling that seed noise allows "
        f"({ceiling:.2f}, margin {LOO_MARGIN}): the rest is the difference between what the estimate answers and what "
        "leave-one-out from scratch asks")
    counts = {v: int((c.verdict == v).sum()) for v in ("pass", "fail", "inconclusive")}
    judged = sum(counts.values())
    failed = "; ".join(f"item {r.item}, {r.check}" for r in c[c.verdict == "fail"].itertuples())
    parts = [f"{counts['pass']} pass"]
    if counts["fail"]:
        parts.append(f"{counts['fail']} fail ({failed})")
    if counts["inconclusive"]:
        parts.append(f"{counts['inconclusive']} {'is' if counts['inconclusive'] == 1 else 'are'} inconclusive (the "
                     "interval straddles the margin)")
    out["checks_text"] = (f"of the {judged} checks held to a margin, " + (", ".join(parts[:-1]) + " and " + parts[-1]
                                                                         if len(parts) > 1 else parts[0]))
    if "known_pearson" in h:
        kv = [verdict(x) for x in ("test the pipeline on a case", "… on values: scale", "… on values: relative")]
        nums = (f"Pearson {_ci(h, 'known_pearson', '{:+.4f}')}, slope {_ci(h, 'known_slope', '{:.3f}')}, relative "
                f"error {_ci(h, 'known_relative_error', '{:.3f}')}")
        if all(v == "pass" for v in kv):
            tail = "; all three within their margins, so the pipeline's indices, signs and scale are right"
        elif "fail" in kv:
            tail = ("; outside the margins: look for an error in the pipeline (indices, signs, scale) before trusting "
                    "any other number — or for training points of very high leverage in a small set")
        else:
            tail = "; the intervals straddle the margins: more candidates (`k`) would settle it"
        out["known_text"] = f"influence and exact leave-one-out agree with {nums}{tail}"
    else:
        out["known_text"] = (f"the known-answer test did not run (it needs L2 > 0 and a last layer of at most "
                             f"{KNOWN_ANSWER_MAX_D:,} parameters)")
    return out


# ----------------------------------------------------------------------------------------------------------
# what the chapter's cells call: records, figure data, tables and figures of one checklist result
# ----------------------------------------------------------------------------------------------------------

#: The figure-data files the chapter writes, and the :class:`ChecklistResult` frame behind each.
FIGURE_DATA: tuple[tuple[str, str], ...] = (("checklist", "checks"), ("agreement", "agreement"),
                                           ("scatter", "scatter"), ("correlation_by_length", "paths"),
                                           ("selection", "selection"))


def publish(result: ChecklistResult) -> dict[str, float]:
    """Hand a checklist result to the build: record every headline number (:func:`record_headline`), glue every
    outcome-dependent sentence of :func:`prose` (:func:`helpers.book.say`) and write the figure data of
    :data:`FIGURE_DATA` (:func:`helpers.book.figure_data`). Returns the headline."""
    from helpers import book

    h = record_headline(result)
    for key, text in prose(result).items():
        book.say(key, text)
    for name, attr in FIGURE_DATA:
        book.figure_data(name, getattr(result, attr))
    return h


def ground_truth_scatter(result: ChecklistResult, n_seeds: int) -> Any:
    """One panel per ground truth: the fixed estimate against Δ_true for every candidate, the ground truth's noise
    band shaded, and Pearson's correlation with its 95 % interval (from the headline). Returns the Figure."""
    import matplotlib.pyplot as plt

    from helpers import plots

    h = result.headline
    panels = list(result.scatter.ground_truth.unique())
    fig, axes = plt.subplots(1, len(panels), figsize=(3.0 * len(panels), 3.4))
    for ax, gt in zip(axes, panels):
        d = result.scatter[result.scatter.ground_truth == gt]
        plots.predicted_vs_actual(ax, d.delta_true.to_numpy(), d.estimate.to_numpy(), label="candidate")
        ax.axvspan(-d.band.iloc[0], d.band.iloc[0], color="0.85", zorder=0, label="noise band")
        est = d.estimate_kind.iloc[0]
        tag = TRUTH_TAGS[(est, "cold" if gt == cold_name(n_seeds) else gt)]
        ax.set(xlabel=f"actual Δ, {gt} (nats)", ylabel=f"estimate {est} (nats)" if ax is axes[0] else "")
        ax.text(0.03, 0.97, f"Pearson {h[f'{tag}_pearson']:+.2f}\n[{h[f'{tag}_pearson_low']:+.2f}, "
                f"{h[f'{tag}_pearson_high']:+.2f}]", transform=ax.transAxes, va="top", fontsize="x-small")
    axes[-1].legend(loc="lower right", frameon=False, fontsize="x-small")
    return fig


def agreement_figure(result: ChecklistResult) -> Any:
    """Left: Pearson's and Spearman's correlation of the fixed estimate with each ground truth (95 % intervals;
    the noise ceiling for the cold starts; "warm all − drift" left out, its correlations are those of "warm all").
    Right: both correlations with warm-start retraining on all layers at every recorded epoch, and the PBRF's
    (Gauss-Newton + δ) Pearson for reference. Returns the Figure."""
    import matplotlib.pyplot as plt

    from helpers import plots

    h = result.headline
    a = result.agreement
    rows = a[["estimate", "ground_truth"]].drop_duplicates()
    rows = rows[rows.ground_truth != "warm all − drift"].reset_index(drop=True)  # same correlations as "warm all"
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.8), gridspec_kw={"width_ratios": [1.2, 1]})
    for j, (m, color) in enumerate([("pearson", "C0"), ("spearman", "C1")]):
        for i, r in rows.iterrows():
            s = a[(a.estimate == r.estimate) & (a.ground_truth == r.ground_truth) & (a.metric == m)].iloc[0]
            plots.ci_points(ax, i + (j - 0.5) * 0.3, s.value, s.low, s.high, color=color, label=m if i == 0 else None)
            if m == "pearson" and r.ground_truth.startswith("cold"):
                plots.ceiling_mark(ax, i, s.ceiling, label="ceiling" if i == 0 else None)
    ax.axvline(0, color="0.6", lw=1)
    ax.set(yticks=range(len(rows)), yticklabels=[f"{r.ground_truth} ({r.estimate})" for r in rows.itertuples()],
           xlim=(-1.05, 1.05), xlabel="correlation of the fixed estimate with the ground truth")
    ax.invert_yaxis()
    ax.legend(loc="lower left", frameon=False, fontsize="x-small")
    p = result.paths
    ax2.plot(p.epoch, p.pearson, label="Pearson")
    ax2.plot(p.epoch, p.spearman, label="Spearman")
    ax2.axhline(h["pbrf_gn_pearson"], color="0.5", ls="--", lw=1, label="Pearson, PBRF (GN+δ)")
    ax2.set(xlabel="warm-start retraining epoch (all layers)", ylabel="correlation with the estimate",
            ylim=(min(-0.05, p[["pearson", "spearman"]].min().min() - 0.05), 1.02))
    ax2.legend(loc="lower right", frameon=False, fontsize="x-small")
    return fig


def agreement_display(result: ChecklistResult) -> pd.DataFrame:
    """The agreement table for display: one row per ground truth × estimate, one column per metric (Pearson,
    Spearman, Kendall, sign agreement, top-k overlap, relative error) as ``value [95 % CI]`` (:func:`ci_text`),
    then the noise ceiling and drift ratio (2 decimals) and the number of candidates ``n``."""
    a = result.agreement
    shown = a[a.metric.isin(["pearson", "spearman", "kendall", "sign_agreement", "top_k_overlap", "relative_error"])]
    table = (shown.assign(text=shown.apply(lambda r: ci_text(r.metric, r.value, r.low, r.high), axis=1))
             .pivot_table(index=["ground_truth", "estimate"], columns="metric", values="text", aggfunc="first",
                          sort=False))
    extra = shown.groupby(["ground_truth", "estimate"], sort=False)[["ceiling", "drift_ratio", "n"]].first()
    return table.join(extra.round({"ceiling": 2, "drift_ratio": 2}))


def selection_display(result: ChecklistResult) -> pd.DataFrame:
    """Pearson's correlation with its 95 % interval (:func:`ci_text`) for each test point (rows) and candidate
    selection (columns) of :attr:`ChecklistResult.selection`."""
    sel = result.selection[result.selection.metric == "pearson"]
    return (sel.assign(text=sel.apply(lambda r: ci_text(r.metric, r.value, r.low, r.high), axis=1))
            .pivot_table(index="test_point", columns="candidates", values="text", aggfunc="first", sort=False))
