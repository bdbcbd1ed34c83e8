"""helpers.cache: hits on identical calls, misses when a parameter or the helpers source changes."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import cache


@pytest.fixture(autouse=True)
def fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("BOOK_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("BOOK_CACHE", raising=False)
    cache.stats.clear()
    return tmp_path / "cache"


def test_hit_and_parameter_miss(fresh_cache: Path) -> None:
    calls = []

    def compute(a):
        calls.append(a)
        return {"theta": torch.arange(3.0) * a}

    first = cache.memoize("toy", {"a": 2, "w": torch.ones(2)}, lambda: compute(2))
    second = cache.memoize("toy", {"w": torch.ones(2), "a": 2}, lambda: compute(2))  # key order irrelevant
    assert calls == [2] and torch.equal(first["theta"], second["theta"])
    cache.memoize("toy", {"a": 3, "w": torch.ones(2)}, lambda: compute(3))
    cache.memoize("toy", {"a": 2, "w": torch.ones(2) * 1.0000001}, lambda: compute(2))  # tensor content
    assert calls == [2, 3, 2]
    assert [e["event"] for e in cache.read_log()] == ["miss", "hit", "miss", "miss"]
    assert cache.stats == {"miss": 3, "hit": 1}


def test_source_change_misses(tmp_path: Path) -> None:
    copy = tmp_path / "helpers_copy"
    shutil.copytree(cache.PACKAGE_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    before = cache.source_hash(copy)
    assert cache.source_hash(copy) == before
    assert cache.make_key("x", {"a": 1}, before) == cache.make_key("x", {"a": 1}, before)
    (copy / "solvers_extra.py").write_text("# a new file\n")
    after_new_file = cache.source_hash(copy)
    with open(copy / "cache.py", "a") as fh:
        fh.write("\n# an edit\n")
    after_edit = cache.source_hash(copy)
    assert len({before, after_new_file, after_edit}) == 3
    assert cache.make_key("x", {"a": 1}, before) != cache.make_key("x", {"a": 1}, after_edit)


def test_source_hash_is_what_memoize_uses(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    cache.memoize("y", {}, lambda: calls.append(1))
    monkeypatch.setattr(cache, "source_hash", lambda package_dir=cache.PACKAGE_DIR: "edited")
    cache.memoize("y", {}, lambda: calls.append(1))
    assert len(calls) == 2


def test_corrupt_entry_is_recomputed_and_writes_are_atomic(fresh_cache: Path) -> None:
    cache.memoize("z", {"k": 1}, lambda: np.arange(3))
    (entry,) = (fresh_cache / "z").glob("*.pt")
    entry.write_bytes(b"garbage")
    assert np.array_equal(cache.memoize("z", {"k": 1}, lambda: np.arange(3)), np.arange(3))
    assert not list((fresh_cache / "z").glob(".tmp-*"))


def test_failed_compute_stores_nothing(fresh_cache: Path) -> None:
    with pytest.raises(RuntimeError):
        cache.memoize("fail", {}, lambda: (_ for _ in ()).throw(RuntimeError("no")))
    assert not (fresh_cache / "fail").exists() or not list((fresh_cache / "fail").iterdir())


def test_unkeyable_parameter_is_refused() -> None:
    with pytest.raises(TypeError, match="cannot build a cache key from a object"):
        cache.make_key("x", {"a": object()})


def test_decorator_binds_defaults() -> None:
    calls = []

    @cache.cached("square")
    def square(x: int, power: int = 2) -> int:
        calls.append(x)
        return x**power

    assert square(3) == 9 and square(x=3, power=2) == 9 and calls == [3]
    assert square(3, power=3) == 27 and calls == [3, 3]


def test_key_holds_torch_version_device_and_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    base = cache.make_key("x", {"a": 1}, "code")
    assert cache.environment()["torch"] == torch.__version__
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        assert cache.make_key("x", {"a": 1}, "code") != base
    finally:
        torch.set_default_dtype(before)
    assert cache.make_key("x", {"a": 1}, "code") == base
    monkeypatch.setattr(torch, "__version__", "0.0.0")
    assert cache.make_key("x", {"a": 1}, "code") != base
    # a tensor parameter's dtype is part of its rendering, and so is its device
    assert cache._canonical(torch.zeros(2))["device"] == "cpu"
    assert cache.make_key("x", {"t": torch.zeros(2)}, "c") != cache.make_key("x", {"t": torch.zeros(2).double()}, "c")


def test_cache_folder_rule(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BOOK_CACHE_DIR", str(tmp_path / "mine"))
    assert cache.cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("BOOK_CACHE_DIR")
    assert cache.checkout_root() == cache.REPO_ROOT  # the tests run from the checkout
    assert cache.cache_dir() == cache.REPO_ROOT / "_build" / "cache"
    monkeypatch.setattr(cache, "REPO_ROOT", tmp_path / "site-packages")  # an installed copy: no _toc.yml beside it
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.checkout_root() is None
    assert cache.cache_dir() == tmp_path / "xdg" / "influence-on-trial" / "cache"
