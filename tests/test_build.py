"""The runner behind `make book`: failures name the chapter, bad input is one line, nothing half-written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import build
from helpers.build import BuildError

from conftest import REPO, write_notebook


def test_failing_chapter_names_chapter_and_cell(mini_book: Path, tmp_path: Path) -> None:
    out = tmp_path / "_build"
    with pytest.raises(BuildError) as err:
        build.build_book("default", build_dir=out, root=mini_book, quiet=True)
    msg = str(err.value)
    assert "'boom'" in msg and "cell 3" in msg and "deliberate failure" in msg and "\n" not in msg
    # The chapter before it completed; nothing of the failed run is left behind.
    assert (out / "executed" / "default" / "good.ipynb").exists()
    assert not (out / "executed" / "default" / "boom.ipynb").exists()
    assert not (out / "data" / "boom").exists() and not (out / "records" / "boom.json").exists()
    assert not list(out.glob(".work-*")) and not list(out.glob(".stage-*"))
    assert not (out / "html").exists()


def test_failing_chapter_makes_cli_exit_nonzero(mini_book: Path, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "helpers.build", "book", "--root", str(mini_book), "--build-dir", str(tmp_path / "b")],
        capture_output=True, text=True, cwd=REPO,
    )
    assert proc.returncode != 0
    assert "chapter 'boom' failed in cell 3" in proc.stderr


def test_profile_parameters_reach_the_chapter(mini_book: Path, tmp_path: Path) -> None:
    out = tmp_path / "_build"
    build.execute_chapter(build.find_chapter("good", mini_book), "smoke", build_dir=out, root=mini_book, quiet=True)
    record = json.loads((out / "records" / "good.json").read_text())
    assert record["answer"] == 63 and record["_meta"]["parameters"] == {"scale": 3}
    assert (out / "data" / "good" / "line.csv").read_text().splitlines()[-1] == "1,3"
    build.execute_chapter(build.find_chapter("good", mini_book), "smoke", overrides={"scale": 5},
                          build_dir=out, root=mini_book, quiet=True)
    assert json.loads((out / "records" / "good.json").read_text())["answer"] == 105


def test_html_build_from_executed_copies(mini_book: Path, tmp_path: Path) -> None:
    (mini_book / "_toc.yml").write_text("format: jb-book\nroot: book/index\nchapters:\n  - file: book/good\n")
    out = tmp_path / "_build"
    index = build.build_book("default", build_dir=out, root=mini_book, quiet=True)
    assert index == out / "html" / "index.html" and index.exists()
    page = (out / "html" / "book" / "good.html").read_text()
    assert "The answer is" in page and "42" in page
    # Sources stay without outputs: the executed copy lives in _build only.
    assert not json.loads((mini_book / "book" / "good.ipynb").read_text())["cells"][2]["outputs"]


@pytest.mark.parametrize(
    "call, expected",
    [
        (lambda root: build.load_profile("nosuch", root), "unknown profile 'nosuch'"),
        (lambda root: build.find_chapter("nosuch", root), "unknown chapter 'nosuch': the chapters are good, boom"),
        (lambda root: build.resolve_parameters(build.find_chapter("good", root), "default", {"scal": 1}, root),
         "unknown parameter(s) scal for chapter 'good'; valid: scale, label"),
        (lambda root: build.parse_overrides(["scale"]), "not key=value"),
    ],
)
def test_bad_input_is_one_clear_line(mini_book: Path, call, expected: str) -> None:
    with pytest.raises(BuildError) as err:
        call(mini_book)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_missing_parameter_file_and_parameters_cell(mini_book: Path) -> None:
    for p in (mini_book / "book" / "profiles").glob("*.yml"):
        p.unlink()
    with pytest.raises(BuildError, match=r"missing parameter file book/profiles/default.yml"):
        build.load_profile("default", mini_book)
    write_notebook(mini_book / "book" / "good.ipynb", [("code", "x = 1")])
    with pytest.raises(BuildError, match=r"good.ipynb has no cell tagged 'parameters'"):
        build.notebook_parameters(mini_book / "book" / "good.ipynb")


def test_profile_naming_unknown_chapter_is_refused(mini_book: Path) -> None:
    (mini_book / "book" / "profiles" / "default.yml").write_text("goood: {}\n")
    with pytest.raises(BuildError, match="unknown chapter"):
        build.load_profile("default", mini_book)


def test_interrupted_chapter_leaves_nothing(mini_book: Path, tmp_path: Path) -> None:
    """A kernel killed mid-chapter (as by Ctrl-C or a timeout) leaves no partial output."""
    write_notebook(mini_book / "book" / "good.ipynb", [
        ("code", "scale = 1", ["parameters"]),
        ("code", "from helpers import book\nbook.figure_data('partial', {'x': [1]})\nimport os\nos._exit(1)"),
    ])
    out = tmp_path / "_build"
    with pytest.raises(BaseException):
        build.execute_chapter(build.find_chapter("good", mini_book), "default", build_dir=out, root=mini_book,
                              quiet=True)
    assert not list(out.rglob("partial.csv")) and not list(out.glob(".work-*"))
    assert not (out / "executed" / "default" / "good.ipynb").exists()


def test_committed_notebooks_have_no_outputs() -> None:
    notebooks = sorted((REPO / "book").rglob("*.ipynb"))
    assert notebooks, "the book has no notebooks"
    for nb_path in notebooks:
        nb = json.loads(nb_path.read_text())
        for cell in nb["cells"]:
            if cell["cell_type"] == "code":
                assert not cell.get("outputs") and cell.get("execution_count") is None, (
                    f"{nb_path.relative_to(REPO)} is committed with outputs: clear them "
                    "(executed copies belong in _build/)")


def test_every_toc_notebook_has_parameters_and_a_profile_entry() -> None:
    for profile in ("smoke", "default", "paper"):
        overrides = build.load_profile(profile)
        for chapter in build.notebook_chapters():
            build.resolve_parameters(chapter, profile)  # raises on an unknown name
            if profile == "smoke":
                assert chapter.name in overrides, f"smoke profile has no entry for chapter {chapter.name}"
    assert os.access(REPO / ".ci" / "run", os.X_OK)
    assert "make test" in (REPO / ".ci" / "run").read_text()


# The parameters of each chapter that define its protocol — optimiser settings, stopping rules and tolerances,
# the objective (λ, damping), the retraining protocol — as opposed to its sizes. A profile cuts sizes, never these
# (DESIGN.md). Epoch budgets under a schedule that decays on its own (chapter 3's plateau) are sizes.
PROTOCOL_PARAMETERS: dict[str, set[str]] = {
    "intro": {"l2", "tol"},
    "convex": {"l2", "tol", "loo", "iris_l2"},
    "nonconvex": {"epochs", "retrain_epochs", "n_candidates", "test_index", "dtype"},
    "validation": {"head_tol", "converge_tol", "retrain_lr", "pbrf_damping", "iris_l2", "iris_damping",
                   "iris_depth", "iris_width", "iris_lr", "batch_size", "cnn_batch"},
    "estimators": {"lr", "l2", "grad_tol", "max_iter", "damping", "cg_rtol", "pbrf_damping", "lds_check_tol"},
    "own_model": {"lr", "l2", "patience", "batch_size", "damping", "pbrf_damping", "retrain_lr"},
}


def test_profiles_cut_sizes_never_the_protocol() -> None:
    chapters = {c.name for c in build.notebook_chapters()}
    assert set(PROTOCOL_PARAMETERS) == chapters, "name the protocol parameters of every chapter"
    for profile in build.available_profiles():
        for chapter, overrides in build.load_profile(profile).items():
            changed = sorted(set(overrides or {}) & PROTOCOL_PARAMETERS.get(chapter, set()))
            assert not changed, f"profile {profile!r} changes the protocol of {chapter}: {changed}"


def test_debris_of_a_killed_run_is_swept(mini_book: Path, tmp_path: Path) -> None:
    out = tmp_path / "_build"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    debris = out / f".work-{dead.stdout.strip()}-good-abc"
    (debris / "data").mkdir(parents=True)
    build.execute_chapter(build.find_chapter("good", mini_book), "default", build_dir=out, root=mini_book, quiet=True)
    assert not debris.exists()


def test_chapter_command_with_override_changes_the_html(mini_book: Path, tmp_path: Path) -> None:
    (mini_book / "_toc.yml").write_text("format: jb-book\nroot: book/index\nchapters:\n  - file: book/good\n")
    out = tmp_path / "_build"

    def run(*extra: str) -> str:
        proc = subprocess.run([sys.executable, "-m", "helpers.build", "chapter", "good", "--root", str(mini_book),
                               "--build-dir", str(out), *extra], capture_output=True, text=True, cwd=REPO)
        assert proc.returncode == 0, proc.stderr
        return (out / "html" / "book" / "good.html").read_text()

    first = run()
    assert "The answer is" in first and "42" in first
    assert "147" in run("--set", "scale=7")
    bad = subprocess.run([sys.executable, "-m", "helpers.build", "chapter", "good", "--root", str(mini_book),
                          "--build-dir", str(out), "--set", "sale=7"], capture_output=True, text=True, cwd=REPO)
    assert bad.returncode != 0 and "unknown parameter(s) sale" in bad.stderr and "valid: scale, label" in bad.stderr


def test_build_times_are_recorded(mini_book: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every executed chapter leaves its seconds and cache hits/misses in timings/<profile>.json, and a whole
    build its wall time, filed by kind: cold (all lookups missed), then rebuild (all hit)."""
    monkeypatch.delenv("BOOK_CACHE_DIR", raising=False)
    monkeypatch.delenv("BOOK_CACHE", raising=False)
    (mini_book / "_toc.yml").write_text("format: jb-book\nroot: book/index\nchapters:\n  - file: book/good\n")
    write_notebook(mini_book / "book" / "good.ipynb", [
        ("md", "# Cached"),
        ("code", "scale = 2", ["parameters"]),
        ("code", "from helpers import cache\nvalue = cache.memoize('timing_test', {'scale': scale}, lambda: 2 * scale)"),
    ])
    out = tmp_path / "_build"
    build.build_book("default", build_dir=out, root=mini_book, quiet=True)
    timings = json.loads(build.timings_path(out, "default").read_text())
    chapter = timings["chapters"]["good"]
    assert chapter["seconds"] > 0 and (chapter["cache_hits"], chapter["cache_misses"]) == (0, 1)
    cold = timings["builds"]["cold"]
    assert cold["seconds"] >= chapter["seconds"] and 0 < cold["html_seconds"] <= cold["seconds"]
    assert cold["chapters"]["good"] == chapter and timings["last_build"] == "cold"
    build.build_book("default", build_dir=out, root=mini_book, quiet=True)
    timings = json.loads(build.timings_path(out, "default").read_text())
    assert timings["last_build"] == "rebuild" and timings["builds"]["rebuild"]["cache_hits"] == 1
    assert timings["builds"]["cold"] == cold  # the cold build stays on record
    build.execute_chapter(build.find_chapter("good", mini_book), "default", overrides={"scale": 3}, build_dir=out,
                          root=mini_book, quiet=True)
    timings = json.loads(build.timings_path(out, "default").read_text())
    assert timings["chapters"]["good"]["cache_misses"] == 1 and timings["chapters"]["good"]["overrides"] == {"scale": 3}


def test_every_chapter_hides_its_setup_cell_the_same_way() -> None:
    """The cell that imports the helpers and sets the style is tagged hide-input in every chapter, and holds set-up
    only (imports, style, threads, constants): the reader sees prose and calls, not boilerplate."""
    for nb_path in sorted((REPO / "book").glob("*.ipynb")):
        cells = [c for c in json.loads(nb_path.read_text())["cells"] if c["cell_type"] == "code"]
        setup = [c for c in cells if "plots.set_style()" in "".join(c["source"])]
        assert len(setup) == 1, f"{nb_path.name}: one set-up cell calls plots.set_style(), found {len(setup)}"
        cell = setup[0]
        assert "hide-input" in cell["metadata"].get("tags", []), f"{nb_path.name}: tag its set-up cell hide-input"
        src = "".join(cell["source"])
        assert "book.record(" not in src and "data.load(" not in src, (
            f"{nb_path.name}: the set-up cell computes; move data loading and records to the next cell")


def test_chapters_define_no_functions() -> None:
    """Logic lives in helpers with tests; a chapter only calls it (no def or class in any code cell)."""
    import re

    for nb_path in sorted((REPO / "book").glob("*.ipynb")):
        for cell in json.loads(nb_path.read_text())["cells"]:
            src = "".join(cell["source"])
            if cell["cell_type"] == "code":
                found = re.findall(r"^\s*(?:def|class)\s+(\w+)", src, re.M)
                assert not found, f"{nb_path.name} defines {found}: move it into helpers (with a test)"
