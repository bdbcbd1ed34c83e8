"""helpers.experiments.own_model and the template chapter book/own_model.ipynb, run on a model factory defined in this file.

The factories below are reached as ``"tests.test_own_model:<name>"``. ``tests`` has no ``__init__.py``: it is a
namespace package, importable whenever the repository root is on ``sys.path``. In this process the tests put it
there with ``monkeypatch.syspath_prepend`` (``python -m pytest`` from the root has it already; plain ``pytest`` may
not); in the chapter's kernel :func:`helpers.build.execute_chapter` puts the root on ``PYTHONPATH``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from helpers import build, data, metrics
from helpers.experiments import own_model as O
from helpers.experiments import validation as V
from helpers.train import Recipe

REPO = Path(__file__).resolve().parent.parent
HERE = "tests.test_own_model"


# ----------------------------------------------------------------------------- factories (used by the chapter)


def tiny_net(in_features: int, n_classes: int, width: int = 6) -> nn.Module:
    """A plain nn.Sequential without ``last_layer``: the chapter must find its final nn.Linear itself."""
    return nn.Sequential(nn.Linear(in_features, width), nn.Tanh(), nn.Linear(width, n_classes))


def positional_only(d, c):  # wrong contract: no in_features / n_classes keywords
    return tiny_net(d, c)


def returns_tensor(in_features: int, n_classes: int):
    return torch.zeros(in_features, n_classes)


def wrong_width(in_features: int, n_classes: int) -> nn.Module:
    return tiny_net(in_features, n_classes + 1)


def with_softmax(in_features: int, n_classes: int) -> nn.Module:
    return nn.Sequential(tiny_net(in_features, n_classes), nn.Softmax(dim=1))


def with_dropout(in_features: int, n_classes: int) -> nn.Module:
    return nn.Sequential(nn.Linear(in_features, 4), nn.Dropout(0.5), nn.Linear(4, n_classes))


def with_batchnorm(in_features: int, n_classes: int) -> nn.Module:
    return nn.Sequential(nn.Linear(in_features, 4), nn.BatchNorm1d(4), nn.Linear(4, n_classes))


class _NoLinear(nn.Module):
    def __init__(self, d: int, c: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(d, c))

    def forward(self, x):
        return x @ self.w


def without_linear(in_features: int, n_classes: int) -> nn.Module:
    return _NoLinear(in_features, n_classes)


def without_parameters(in_features: int, n_classes: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Identity())


NOT_CALLABLE = 3


# ------------------------------------------------------------------------------------------------- helpers


@pytest.fixture
def importable(monkeypatch: pytest.MonkeyPatch) -> None:
    """The repository root on sys.path, so that ``tests.test_own_model`` imports (see the module docstring)."""
    monkeypatch.syspath_prepend(str(REPO))


def tensors(n_train: int = 60, n_test: int = 24, d: int = 5, c: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    """A learnable synthetic problem: labels from a noisy linear rule, every class in both parts."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, c, generator=g, dtype=torch.float64)
    out = {}
    for part, n in (("train", n_train), ("test", n_test)):
        x = torch.randn(n, d, generator=g, dtype=torch.float64)
        y = (x @ w + 0.5 * torch.randn(n, c, generator=g, dtype=torch.float64)).argmax(1)
        y[:c] = torch.arange(c)  # every class present
        out[f"x_{part}"], out[f"y_{part}"] = x, y
    return out


def save(tmp_path: Path, obj, name: str = "tensors.pt") -> Path:
    path = tmp_path / name
    torch.save(obj, path)
    return path


# ------------------------------------------------------------------------------------------- load_factory


def test_load_factory_finds_a_factory_in_this_file(importable) -> None:
    f = O.load_factory(f"{HERE}:tiny_net")
    assert callable(f) and f.__name__ == "tiny_net" and f.__module__ == HERE


def test_load_factory_reads_a_python_file(tmp_path: Path) -> None:
    (tmp_path / "my_models.py").write_text(
        "from torch import nn\n"
        "def make(in_features, n_classes):\n    return nn.Linear(in_features, n_classes)\n")
    f = O.load_factory(f"{tmp_path / 'my_models.py'}:make")
    assert isinstance(f(in_features=3, n_classes=2), nn.Linear)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        O.load_factory(f"{tmp_path / 'nope.py'}:make")


@pytest.mark.parametrize("spec, error, match", [
    ("tests.test_own_model.tiny_net", ValueError, "'module:function'"),
    ("a:b:c", ValueError, "exactly one colon"),
    (":tiny_net", ValueError, "empty module or function"),
    (f"{HERE}:", ValueError, "empty module or function"),
    ("no_such_package_xyz.models:make_net", ModuleNotFoundError, "PYTHONPATH"),
    (f"{HERE}:no_such_factory", AttributeError, "no attribute 'no_such_factory'.*tiny_net"),
    (f"{HERE}:NOT_CALLABLE", TypeError, "not a callable"),
], ids=["no-colon", "two-colons", "no-module", "no-function", "module-missing", "attribute-missing",
        "not-callable"])
def test_load_factory_errors_name_the_problem_and_the_fix(importable, spec: str, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        O.load_factory(spec)


def test_load_factory_tells_a_missing_dependency_from_a_missing_module(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "needs_dep.py").write_text("import no_such_dependency_xyz\n")
    (tmp_path / "raises_on_import.py").write_text("raise RuntimeError('broken on purpose')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="imports 'no_such_dependency_xyz', which is not installed"):
        O.load_factory("needs_dep:make")
    with pytest.raises(ImportError, match="RuntimeError: broken on purpose"):
        O.load_factory("raises_on_import:make")


# -------------------------------------------------------------------------------------------- build_model


def test_build_model_wraps_a_model_without_last_layer(importable) -> None:
    train = (torch.randn(10, 5, dtype=torch.float64), torch.arange(10) % 3)
    model = O.build_model(O.load_factory(f"{HERE}:tiny_net"), train, 3, seed=1)
    assert isinstance(model, O.LastLayerView) and model.last_layer is model.net[2]
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert model(train[0]).shape == (10, 3)
    # the seed fixes the initialisation; another seed changes it; the global RNG is untouched
    state = torch.get_rng_state()
    again = O.build_model(tiny_net, train, 3, seed=1)
    other = O.build_model(tiny_net, train, 3, seed=2)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(model.net[0].weight, again.net[0].weight)
    assert not torch.equal(model.net[0].weight, other.net[0].weight)
    # factory_kwargs reach the factory
    wide = O.build_model(tiny_net, train, 3, factory_kwargs={"width": 9})
    assert wide.net[0].out_features == 9


def test_example_factory_is_the_residual_mlp() -> None:
    train, test = O.load_data("wine")
    model = O.build_model(O.load_factory("helpers.experiments.own_model:example_factory"), train, O.n_classes_of(train, test))
    assert isinstance(model, O.ResidualMLP) and model.last_layer is model.out
    assert sum(p.numel() for p in model.parameters()) == 393  # small enough for the dense Hessian (d <= 500)


@pytest.mark.parametrize("factory, error, match", [
    (positional_only, TypeError, "accept the keyword arguments in_features and n_classes"),
    (returns_tensor, TypeError, "not a torch.nn.Module"),
    (without_parameters, ValueError, "no trainable parameters"),
    (wrong_width, ValueError, r"must return logits \[8, 3\]"),
    (with_softmax, ValueError, "does not end at the last nn.Linear"),
    (with_dropout, ValueError, "dropout or batch norm: 1 \\(Dropout\\)"),
    (with_batchnorm, ValueError, "dropout or batch norm: 1 \\(BatchNorm1d\\)"),
    (without_linear, ValueError, "no nn.Linear layer"),
])
def test_build_model_errors_name_the_problem_and_the_fix(factory, error: type, match: str) -> None:
    train = (torch.randn(12, 5, dtype=torch.float64), torch.arange(12) % 3)
    with pytest.raises(error, match=match):
        O.build_model(factory, train, 3)


# ---------------------------------------------------------------------------------------------- load_data


def test_load_data_reads_a_tensor_file(tmp_path: Path) -> None:
    t = tensors()
    t["x_train"] = t["x_train"].float()  # any real dtype: cast to float64
    t["extra"] = torch.zeros(1)  # other keys are ignored
    train, test = O.load_data(save(tmp_path, t))
    assert train[0].dtype == torch.float64 and train[1].dtype == torch.int64
    assert torch.equal(train[0], t["x_train"].double()) and torch.equal(test[1], t["y_test"])
    assert O.n_classes_of(train, test) == 3
    # caps: a seeded random subset in stored order
    a, _ = O.load_data(save(tmp_path, t), n_train=20, n_test=5, seed=3)
    b, _ = O.load_data(save(tmp_path, t), n_train=20, n_test=5, seed=3)
    assert a[0].shape == (20, 5) and torch.equal(a[0], b[0])
    rows = [int(torch.nonzero((t["x_train"].double() == r).all(1))[0]) for r in a[0]]
    assert rows == sorted(rows)


def test_load_data_relative_path_and_dataset_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save(tmp_path, tensors())
    monkeypatch.chdir(tmp_path)
    assert O.load_data("tensors.pt")[0][0].shape == (60, 5)
    train, test = O.load_data("wine", n_train=50, n_test=20, seed=1)
    split = data.load("wine", n_train=50, n_test=20, seed=1)
    assert torch.equal(train[0], split.x_train) and torch.equal(test[1], split.y_test)


def _mutate(change):
    t = tensors()
    change(t)
    return t


BAD_FILES = [
    ("missing-key", _mutate(lambda t: t.pop("y_test")), "lacks the key\\(s\\) y_test"),
    ("not-a-dict", [torch.zeros(3)], "not a dict"),
    ("not-a-tensor", _mutate(lambda t: t.update(y_train=t["y_train"].tolist())), "not a torch.Tensor"),
    ("x-one-dimensional", _mutate(lambda t: t.update(x_train=t["x_train"][:, 0])), "must be \\[n, ...\\]"),
    ("x-complex", _mutate(lambda t: t.update(x_test=t["x_test"].to(torch.complex128))), "real numbers"),
    ("x-nan", _mutate(lambda t: t["x_train"].__setitem__((4, 2), float("nan"))), "1 non-finite value"),
    ("y-float", _mutate(lambda t: t.update(y_train=t["y_train"] + 0.5)), "integer tensor"),
    ("y-float-integral", _mutate(lambda t: t.update(y_test=t["y_test"].double())), "save y.long\\(\\)"),
    ("y-one-hot", _mutate(lambda t: t.update(y_train=torch.nn.functional.one_hot(t["y_train"]))), "not one-hot"),
    ("rows-differ", _mutate(lambda t: t.update(y_train=t["y_train"][:-1])), "60 rows but y_train has 59"),
    ("shapes-differ", _mutate(lambda t: t.update(x_test=t["x_test"][:, :4])), "must match"),
    ("negative-label", _mutate(lambda t: t["y_test"].__setitem__(0, -1)), "found -1"),
    ("class-absent", _mutate(lambda t: t.update(y_test=torch.where(t["y_test"] == 0, 3, t["y_test"]))),
     "classes absent from y_train: \\[3\\]"),
]


@pytest.mark.parametrize("obj, match", [b[1:] for b in BAD_FILES], ids=[b[0] for b in BAD_FILES])
def test_load_data_errors_name_the_problem_and_the_fix(tmp_path: Path, obj, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        O.load_data(save(tmp_path, obj))


def test_load_data_refuses_unreadable_files_unknown_names_and_large_caps(tmp_path: Path) -> None:
    (tmp_path / "garbage.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="cannot read .* as a torch.save file"):
        O.load_data(tmp_path / "garbage.pt")
    with pytest.raises(FileNotFoundError, match="neither a dataset name .*wine.* nor an existing file"):
        O.load_data("wiine")
    with pytest.raises(ValueError, match="n_train=61 but the file holds 60"):
        O.load_data(save(tmp_path, tensors()), n_train=61)
    with pytest.raises(ValueError, match="positive int or None"):
        O.load_data("wine", n_test=0)


def test_run_checklist_refuses_settings_it_cannot_measure() -> None:
    train, test = (torch.randn(30, 5, dtype=torch.float64), torch.arange(30) % 3), \
        (torch.randn(6, 5, dtype=torch.float64), torch.arange(6) % 3)
    model = O.build_model(tiny_net, train, 3)
    adam = Recipe(optimizer="adam", lr=1e-2, epochs=5, weight_decay=1e-2)
    for kwargs, match in [({"n_seeds": 1}, "n_seeds must be >= 2"), ({"k": 31}, "k \\(candidates\\)"),
                          ({"k": 10, "cold_k": 11}, "cold_k must lie in")]:
        with pytest.raises(ValueError, match=match):
            O.run_checklist(model, train, test, adam, cache=False, **kwargs)
    with pytest.raises(ValueError, match="float64"):
        O.run_checklist(model, train, test, adam.replace(dtype="float32"), cache=False)


def test_run_checklist_on_the_last_layer_with_mini_batches() -> None:
    """The other branches: estimate on the last layer (PBRF on the head), θ̂ and warm starts by mini-batches."""
    t = tensors()
    train, test = (t["x_train"], t["y_train"]), (t["x_test"], t["y_test"])
    model = O.build_model(tiny_net, train, 3)
    r = O.run_checklist(model, train, test, Recipe(optimizer="adam", lr=1e-2, epochs=60, weight_decay=1e-2,
                                                   batch_size=20),
                        params="last", retrain_epochs=10, every=5, head_epochs=10, k=8, cold_k=5, n_seeds=2,
                        n_bootstrap=50, cache=False, progress=False)
    h = r.headline
    assert h["n_params_estimate"] == 6 * 3 + 3 and h["n_params"] == 5 * 6 + 6 + 6 * 3 + 3
    assert all(math.isfinite(v) for v in h.values())
    assert r.problem.params == "last" and r.truths["warm_all"].recipe["batch_size"] == 20
    assert {O.cold_name(2), "warm all", "warm last", "PBRF"} <= set(r.agreement.ground_truth)
    assert r.pick("PBRF", estimate="GN+δ") == h["pbrf_gn_pearson"]
    assert len(r.checks) == 14 and r.paths.epoch.tolist() == [5, 10]
    assert set(r.checks.verdict) <= set(O.VERDICTS) and list(r.checks.columns)[-2:] == ["margin", "verdict"]
    # the last layer retrained exactly agrees with its own influence (a broken pipeline gives about 0; at n = 60
    # with a barely trained θ̂ the leverage term keeps it a little below the chapter's 0.99)
    assert h["known_pearson"] > O.KNOWN_ANSWER_OK


# ---------------------------------------------------------------------- the chapter, end to end, smoke profile


def test_chapter_runs_on_a_factory_defined_in_this_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """book/own_model.ipynb through the build's runner (smoke profile), on ``tiny_net`` and a tensor file.

    The chapter is run through :func:`helpers.build.execute_chapter` with a hand-made
    :class:`~helpers.build.Chapter`, which works whether or not the chapter is listed in _toc.yml.
    """
    monkeypatch.setenv("BOOK_CACHE_DIR", str(tmp_path / "cache"))  # a fresh cache: everything is computed
    path = save(tmp_path, tensors())
    chapter = build.Chapter(name="own_model", path=Path("book/own_model.ipynb"))
    out = tmp_path / "_build"
    build.execute_chapter(chapter, "smoke", overrides={"factory": f"{HERE}:tiny_net", "data": str(path)},
                          build_dir=out, quiet=True)

    r = json.loads((out / "records" / "own_model.json").read_text())
    assert r["_meta"]["parameters"]["factory"] == f"{HERE}:tiny_net" and r["_meta"]["profile"] == "smoke"
    assert (r["n_train"], r["n_test"], r["in_features"], r["n_classes"]) == (60, 24, 5, 3)
    assert r["n_params"] == 5 * 6 + 6 + 6 * 3 + 3  # tiny_net's, not the example's
    numbers = {k: v for k, v in r.items() if k != "_meta"}
    assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in numbers.values()), numbers
    for tag in O.TRUTH_TAGS.values():
        for m in metrics.AGREEMENT_METRICS:
            v, lo, hi = (r[f"{tag}_{m}{s}"] for s in ("", "_low", "_high"))
            assert lo <= hi, (tag, m, lo, hi)
            if m in ("pearson", "spearman", "kendall"):
                assert -1 <= lo and hi <= 1 and -1 <= v <= 1, (tag, m)
    assert 0 <= r["ceiling_single"] <= r["ceiling"] <= 1
    assert r["pbrf_drift"] == 0  # the PBRF's drift member starts at its own minimiser and stays there
    # the known answer: on the convex last layer influence equals exact leave-one-out, in rank and in value
    assert r["known_pearson"] > 0.99 and r["known_grad_norm"] < 1e-8
    assert r["known_slope_low"] > 1 / O.KNOWN_SLOPE_BAND and r["known_relative_error_high"] < O.KNOWN_RELATIVE_ERROR_OK
    # the Gauss-Newton estimate tracks the PBRF it linearises (chapter 3 asserts the same on its models)
    assert r["pbrf_gn_pearson"] > 0.8
    assert r["checks_pass"] + r["checks_fail"] + r["checks_inconclusive"] == 11
    # damping "auto": δ follows from the spectrum by the stated rule, and the dense solve fitted the budget
    from helpers.solvers import auto_damping

    assert r["damping"] == pytest.approx(auto_damping(r["damping_eig_min"], r["damping_eig_max"]), rel=1e-12)
    assert r["damping_auto"] == 1 and r["solver_fallback"] == 0

    agreement = pd.read_csv(out / "data" / "own_model" / "agreement.csv")
    truths = set(agreement.ground_truth)
    assert {"cold (2 seeds)", "cold (1 seed)", "warm all", "warm all − drift", "warm last", "PBRF"} <= truths
    assert set(agreement.metric) == set(metrics.AGREEMENT_METRICS)
    assert np.isfinite(agreement[["value", "low", "high", "ceiling", "drift_ratio"]].to_numpy()).all()
    assert (agreement.low <= agreement.high).all()
    assert set(agreement[agreement.ground_truth == "PBRF"].estimate) == {"H+δ", "GN+δ"}
    checks = pd.read_csv(out / "data" / "own_model" / "checklist.csv")
    assert sorted(set(checks["item"])) == list(range(1, 10))
    assert set(checks.verdict) <= set(O.VERDICTS)
    judged = checks[checks.verdict.isin(["pass", "fail", "inconclusive"])]
    assert len(judged) == 11 and judged.margin.str.match(r"^(≥|≤|within) ").all()  # every verdict has its margin

    nb = json.loads((out / "executed" / "smoke" / "own_model.ipynb").read_text())
    streams = [o for c in nb["cells"] for o in c.get("outputs", []) if o["output_type"] == "stream"]
    assert any("Tanh()" in "".join(o["text"]) for o in streams)  # the printed model is this file's tiny_net
    assert not [o for o in streams if o["name"] == "stderr"], "the chapter printed warnings"


# ------------------------------------------------------------------------- verdicts from intervals, values


def test_interval_verdict_compares_the_whole_interval_with_the_margin() -> None:
    iv = O.interval_verdict
    assert iv(0.92, 0.99, at_least=0.9) == "pass" and iv(0.5, 0.85, at_least=0.9) == "fail"
    assert iv(0.85, 0.95, at_least=0.9) == "inconclusive"  # a point estimate of 0.93 would have said "pass"
    assert iv(0.1, 0.4, at_most=1.0) == "pass" and iv(1.2, 3.0, at_most=1.0) == "fail"
    assert iv(0.8, 1.2, at_least=1 / 1.5, at_most=1.5) == "pass"
    assert iv(2.2, 2.8, at_least=1 / 1.5, at_most=1.5) == "fail"
    assert iv(0.2, 0.5, at_least=1 / 1.5, at_most=1.5) == "fail"
    assert iv(1.2, 1.8, at_least=1 / 1.5, at_most=1.5) == "inconclusive"
    with pytest.raises(ValueError, match="margin"):
        iv(0.1, 0.2)
    with pytest.raises(ValueError, match="low <= high"):
        iv(0.3, 0.2, at_most=1.0)


def test_resample_ci_of_a_mean_matches_the_normal_interval() -> None:
    """The percentile bootstrap of a mean over 400 normal draws against the closed form mean ± 1.96 s/√n."""
    x = np.random.default_rng(0).normal(1.0, 2.0, size=400)
    v, lo, hi = O.resample_ci(lambda idx: float(x[idx].mean()), len(x), n_resamples=4000, seed=1)
    half = 1.96 * x.std(ddof=1) / math.sqrt(len(x))
    assert v == pytest.approx(x.mean(), abs=1e-15)
    assert lo == pytest.approx(x.mean() - half, abs=0.1 * half) and hi == pytest.approx(x.mean() + half, abs=0.1 * half)
    with pytest.raises(ValueError, match="undefined on"):  # a statistic undefined on most resamples
        O.resample_ci(lambda idx: float("nan") if idx[0] != 0 else 1.0, 10, n_resamples=100)


def _run_small(n_train: int, *, scale: float = 1.0, monkeypatch: pytest.MonkeyPatch | None = None, **kwargs):
    """run_checklist on tiny_net and a synthetic tensor problem (smoke-sized); the estimate multiplied by ``scale``."""
    if scale != 1.0:
        from helpers.influence import predict_removal

        def scaled(*args, **kw):
            res = predict_removal(*args, **kw)
            res.values = res.values * scale
            return res

        monkeypatch.setattr(V, "predict_removal", scaled)   # the estimates of the problem (H+δ and GN+δ)
        monkeypatch.setattr(O, "predict_removal", scaled)   # and the known-answer test's
    t = tensors(n_train=n_train)
    train, test = (t["x_train"], t["y_train"]), (t["x_test"], t["y_test"])
    model = O.build_model(tiny_net, train, 3)
    recipe = Recipe(optimizer="adam", lr=0.01, epochs=300, weight_decay=0.01, schedule="plateau", patience=100)
    return O.run_checklist(model, train, test, recipe, **{**dict(retrain_epochs=100, head_epochs=100, k=12, cold_k=8,
                                                                 n_seeds=2, n_bootstrap=200, cache=False,
                                                                 progress=False), **kwargs})


def _verdict(r: O.ChecklistResult, check: str) -> str:
    return str(r.checks[r.checks.check.str.startswith(check)].verdict.iloc[0])


def test_an_estimate_off_in_scale_fails_the_scale_item(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same model and data, the estimate once as computed and once multiplied by 2.5 (a pipeline off in scale):
    Pearson cannot tell them apart, the fitted slope and the relative error can — against the matched target (item 7)
    and against the known answer (item 8)."""
    good = _run_small(200)
    bad = _run_small(200, scale=2.5, monkeypatch=monkeypatch)
    scale, error = "report a value measure", "… and a value measure: relative error"
    assert _verdict(good, scale) == "pass" and _verdict(bad, scale) == "fail"
    assert _verdict(good, error) == "pass" and _verdict(bad, error) == "fail"
    assert _verdict(good, "… on values: scale") == "pass" and _verdict(bad, "… on values: scale") == "fail"
    assert _verdict(good, "… on values: relative") == "pass" and _verdict(bad, "… on values: relative") == "fail"
    g, b = good.headline, bad.headline
    assert b["pbrf_gn_slope"] == pytest.approx(2.5 * g["pbrf_gn_slope"], rel=1e-9)  # same ground truth, scaled estimate
    assert b["pbrf_gn_pearson"] == pytest.approx(g["pbrf_gn_pearson"], abs=1e-12)  # ranks are blind to it
    assert _verdict(bad, "name the ground truth") == _verdict(good, "name the ground truth") == "pass"
    assert "in scale" in O.prose(bad)["matched_verdict"] and "misses" in O.prose(bad)["matched_verdict"]
    assert "computes what it claims" in O.prose(good)["matched_verdict"]
    assert "outside the margins" in O.prose(bad)["known_text"]


def test_auto_damping_and_the_cg_fallback_are_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a memory budget below the dense H of the estimate (57 parameters: 130 kB), the estimate is solved by CG and
    the chapter's prose says so; δ still follows from the spectrum (Ritz values), and equals the rule's answer."""
    from helpers import solvers

    monkeypatch.setenv("BOOK_MEMORY_GB", str(solvers.dense_bytes(57) / 2 / 2**30))
    r = _run_small(60, n_bootstrap=100)
    h = r.headline
    assert h["solver_fallback"] == 1 and h["damping_eig_dense"] == 0 and h["solver_residual"] < 1e-8
    assert h["damping"] == pytest.approx(solvers.auto_damping(h["damping_eig_min"], h["damping_eig_max"]), rel=1e-12)
    text = O.prose(r)
    assert "conjugate gradients instead of an exact solve" in text["solver_text"] and "BOOK_MEMORY_GB" in text[
        "solver_text"]
    assert "CG (the dense H would not fit" in r.checks.value[r.checks.check.str.contains("damping and solver")].iloc[0]


# ------------------------------------------------------------------------------------- bad input, named


def ignores_in_features(in_features: int, n_classes: int) -> nn.Module:
    return nn.Sequential(nn.Linear(13, 4), nn.Tanh(), nn.Linear(4, n_classes))


def test_bad_input_gets_a_one_line_error_naming_the_tensor_and_the_fix() -> None:
    t = tensors()
    train, test = (t["x_train"], t["y_train"]), (t["x_test"], t["y_test"])
    model = O.build_model(tiny_net, train, 3)
    adam = Recipe(optimizer="adam", lr=1e-2, epochs=5, weight_decay=1e-2)
    assert O.check_inputs(model, train, test) == 3
    cases = [
        ((train[0], torch.where(train[1] == 2, 5, train[1])), test, ValueError,
         r"y_train holds label 5, outside the model's 3 classes 0 … 2: build the model with n_classes = "
         r"n_classes_of\(train, test\) = 6"),
        (train, (test[0], test[1] - 1), ValueError, "y_test holds label -1, outside the model's 3 classes"),
        ((train[0][:, :4], train[1]), (test[0][:, :4], test[1]), ValueError,
         r"the model cannot take x_train: its samples have shape \(4,\) \(4 features\) and its forward pass raised "
         r"RuntimeError: .*in_features=4"),
        (train, (test[0][:, :4], test[1]), ValueError, r"x_train has shape \(5,\) but one of x_test \(4,\)"),
        ((train[0].clone().index_fill_(0, torch.tensor([3]), float("nan")), train[1]), test, ValueError,
         "x_train has 5 non-finite value"),
        (train, (test[0], test[1].double()), TypeError, r"y_test has dtype torch.float64.*y\.long\(\)"),
        ((train[0].to(torch.complex128), train[1]), test, TypeError, "x_train has dtype torch.complex128"),
    ]
    for tr, te, error, match in cases:
        with pytest.raises(error, match=match) as info:
            O.run_checklist(model, tr, te, adam, cache=False, progress=False)
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match=r"the model cannot take x_train: its samples have shape \(5,\) \(5 features\)"
                                         r".*in_features=5") as info:
        O.build_model(ignores_in_features, (torch.randn(12, 5, dtype=torch.float64), torch.arange(12) % 3), 3)
    assert "mat1 and mat2" in str(info.value) and "\n" not in str(info.value)


# --------------------------------------------------------------------- a small CNN, memory measured, smoke


_PEAK_RSS = r"""
import json, resource, sys
from pathlib import Path
from helpers import build
build.execute_chapter(build.Chapter(name="own_model", path=Path("book/own_model.ipynb")), "smoke",
                      overrides=json.loads(sys.argv[1]), build_dir=Path(sys.argv[2]), quiet=True)
# ru_maxrss of RUSAGE_CHILDREN: the largest resident set of any descendant waited for — the chapter's kernel
print(json.dumps({"children_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
                  "self_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


@pytest.mark.slow
def test_chapter_on_a_small_cnn_stays_under_4_gb(tmp_path: Path) -> None:
    """The template chapter on a small convolutional net (image_cnn_factory: 358 parameters) with the 8×8 digits as
    images (600 training points), smoke profile with short runs, under BOOK_MEMORY_GB=1, in a fresh process whose
    peak resident memory is measured (getrusage of its children: the kernel that runs the chapter).

    The run reaches the exact (dense) solve. Assembling that H's 358 columns in one vmap — the code path the OOM
    killer stopped at 24 GB on a larger run — holds about 1.8 GB above the kernel's baseline at this size (measured;
    ``unchunked_hvp_gb`` is the chapter's conservative estimate of it), so besides the issue's 4 GB the test holds the
    run to the budget plus 1 GB for the kernel itself (torch, the data, the notebook): a bound the unchunked assembly
    breaks."""
    over = {"factory": "helpers.experiments.own_model:image_cnn_factory", "data": "digits", "n_train": 600, "epochs": 100,
            "retrain_epochs": 30, "head_epochs": 30, "every": 10, "k": 8, "cold_k": 5, "n_seeds": 2,
            "n_bootstrap": 50}
    env = dict(os.environ, BOOK_MEMORY_GB="1", BOOK_CACHE_DIR=str(tmp_path / "cache"), PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", _PEAK_RSS, json.dumps(over), str(tmp_path / "_build")], env=env,
                         cwd=REPO, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    peak = json.loads(out.stdout.strip().splitlines()[-1])
    peak_gb = max(peak["children_kb"], peak["self_kb"]) / 2**20
    r = json.loads((tmp_path / "_build" / "records" / "own_model.json").read_text())
    print(f"peak resident memory {peak_gb:.2f} GB (kernel {peak['children_kb'] / 2**20:.2f} GB); "
          f"{r['_meta']['seconds']:.0f} s; estimate for a one-vmap dense assembly {r['unchunked_hvp_gb']:.1f} GB")
    assert 0.2 < peak_gb < 4.0  # > 0.2: the kernel (torch imported) was measured, not just this wrapper
    assert peak_gb < r["memory_budget_gb"] + 1.0
    assert r["n_params"] == 358 and r["n_train"] == 600 and r["in_features"] == 64
    assert r["unchunked_hvp_gb"] > r["memory_budget_gb"] == 1.0 and r["solver_fallback"] == 0
    assert r["known_pearson"] > 0.99 and r["pbrf_gn_pearson"] > 0.9
    assert r["checks_pass"] + r["checks_fail"] + r["checks_inconclusive"] == 11


# ------------------------------------------------------------------------------- what the chapter's cells call


def test_publish_figures_and_tables_of_a_result(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """publish records the whole headline and writes every figure-data file; the figure and table functions draw
    one panel per ground truth and show every metric with its interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    monkeypatch.setenv("BOOK_OUTPUT_DIR", str(tmp_path))
    t = tensors()
    train, test = (t["x_train"], t["y_train"]), (t["x_test"], t["y_test"])
    model = O.build_model(tiny_net, train, 3)
    r = O.run_checklist(model, train, test, Recipe(optimizer="adam", lr=1e-2, epochs=40, weight_decay=1e-2),
                        params="last", retrain_epochs=10, every=5, head_epochs=10, k=8, cold_k=5, n_seeds=2,
                        n_bootstrap=50, cache=False, progress=False)
    h = O.publish(r)
    assert h is r.headline
    assert json.loads((tmp_path / "records.json").read_text()).keys() == set(h)
    assert {p.stem for p in (tmp_path / "data").glob("*.csv")} == {name for name, _ in O.FIGURE_DATA}
    fig = O.ground_truth_scatter(r, 2)
    assert len(fig.axes) == r.scatter.ground_truth.nunique()
    assert fig.axes[0].get_xlabel().startswith("actual Δ, ")
    plt.close(fig)
    fig = O.agreement_figure(r)
    assert fig.axes[1].get_xlabel() == "warm-start retraining epoch (all layers)"
    plt.close(fig)
    table = O.agreement_display(r)
    assert {"pearson", "relative_error", "ceiling", "drift_ratio", "n"} <= set(table.columns)
    assert table.loc[(O.cold_name(2), "H+δ"), "pearson"] == O.ci_text(
        "pearson", r.pick(O.cold_name(2)), r.pick(O.cold_name(2), col="low"), r.pick(O.cold_name(2), col="high"))
    sel = O.selection_display(r)
    assert sel.shape[0] == r.selection.test_point.nunique() and sel.stack().str.contains(r"\[").all()
