"""Execute the book's chapters with papermill under a profile, then build the HTML with Jupyter Book.

This is the one runner behind ``make book``, ``make chapter`` and the chapter tests::

    python -m helpers.build book    [--profile default] [--build-dir _build]
    python -m helpers.build chapter NAME [--profile default] [--set key=value ...]
    python -m helpers.build list    [--profile default]

Layout of the build folder (``_build/`` unless ``--build-dir`` / ``$BOOK_BUILD_DIR``)::

    executed/<profile>/<chapter>.ipynb   executed notebooks
    data/<chapter>/*.csv                 the data behind every figure
    records/<chapter>.json               the numbers each chapter records (asserted by its test)
    timings/<profile>.json               seconds and cache hits/misses of every executed chapter, and the
                                         latest whole-book build of each kind (read by ``make bench``)
    cache/                               expensive results (helpers.cache), shared across builds
    html/index.html                      the rendered book

Nothing half-written is left behind: each chapter executes into a private work folder that is moved into
place only when the chapter succeeded, and the HTML is built into a staging folder that replaces ``html/``
in one rename.

Profiles are parameter files ``book/profiles/<profile>.yml`` mapping a chapter name to parameter overrides;
a chapter's ``parameters`` cell holds its defaults. Unknown profiles, chapters or parameter names, a missing
parameter file and a notebook without a ``parameters`` cell are each refused with a one-line error.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
BOOK_DIR_NAME = "book"
PROFILE_DIR = Path(BOOK_DIR_NAME) / "profiles"


class BuildError(RuntimeError):
    """A build step failed; the message is one line that names what failed and what to do."""


@dataclass(frozen=True)
class Chapter:
    """One entry of ``_toc.yml``: ``name`` is the file stem (``intro``), ``path`` relative to the root."""

    name: str
    path: Path

    @property
    def is_notebook(self) -> bool:
        return self.path.suffix == ".ipynb"


# --------------------------------------------------------------------------------------------- reading


def _toc_files(node: Any) -> list[str]:
    """Every ``file:`` / ``root:`` entry of a _toc.yml tree, in reading order."""
    found: list[str] = []
    if isinstance(node, dict):
        for key in ("root", "file"):
            if key in node:
                found.append(node[key])
        for key in ("parts", "chapters", "sections"):
            for child in node.get(key, []) or []:
                found.extend(_toc_files(child))
    elif isinstance(node, list):
        for child in node:
            found.extend(_toc_files(child))
    return found


def read_toc(root: Path = REPO_ROOT) -> list[Chapter]:
    """The book's pages in ``_toc.yml`` order, each resolved to an existing ``.ipynb`` or ``.md`` file."""
    toc_path = root / "_toc.yml"
    if not toc_path.exists():
        raise BuildError(f"no _toc.yml in {root}: run from the repository root")
    chapters = []
    for entry in _toc_files(yaml.safe_load(toc_path.read_text())):
        stem = Path(entry)
        for suffix in (".ipynb", ".md"):
            candidate = stem.with_suffix(suffix) if stem.suffix not in (".ipynb", ".md") else stem
            if (root / candidate).exists():
                chapters.append(Chapter(name=candidate.stem, path=candidate))
                break
        else:
            raise BuildError(f"_toc.yml lists {entry!r} but neither {entry}.ipynb nor {entry}.md exists")
    return chapters


def notebook_chapters(root: Path = REPO_ROOT) -> list[Chapter]:
    """The executable chapters (notebooks) in reading order."""
    return [c for c in read_toc(root) if c.is_notebook]


def find_chapter(name: str, root: Path = REPO_ROOT) -> Chapter:
    """The notebook chapter called ``name`` (file stem); a one-line error lists the valid names."""
    chapters = notebook_chapters(root)
    for chapter in chapters:
        if chapter.name == name or str(chapter.path) == name or str(chapter.path.with_suffix("")) == name:
            return chapter
    raise BuildError(f"unknown chapter {name!r}: the chapters are {', '.join(c.name for c in chapters)}")


def available_profiles(root: Path = REPO_ROOT) -> list[str]:
    return sorted(p.stem for p in (root / PROFILE_DIR).glob("*.yml"))


def load_profile(profile: str, root: Path = REPO_ROOT) -> dict[str, dict[str, Any]]:
    """Parameter overrides per chapter for ``profile``, read from ``book/profiles/<profile>.yml``."""
    path = root / PROFILE_DIR / f"{profile}.yml"
    if not path.exists():
        known = available_profiles(root)
        if known:
            raise BuildError(f"unknown profile {profile!r}: no parameter file {path.relative_to(root)}; "
                             f"the profiles are {', '.join(known)}")
        raise BuildError(f"missing parameter file {path.relative_to(root)} for profile {profile!r}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict) or not all(isinstance(v, dict) or v is None for v in data.values()):
        raise BuildError(f"{path.relative_to(root)} must map chapter names to {{parameter: value}} mappings")
    # Entries may name any notebook of the book folder: a draft chapter keeps its parameters before it joins
    # _toc.yml. A name with no notebook at all is a typo.
    names = {c.name for c in notebook_chapters(root)} | {p.stem for p in (root / BOOK_DIR_NAME).glob("*.ipynb")}
    unknown = sorted(set(data) - names)
    if unknown:
        raise BuildError(f"{path.relative_to(root)} names unknown chapter(s) {', '.join(unknown)}; "
                         f"the chapters are {', '.join(sorted(names))}")
    return {k: dict(v or {}) for k, v in data.items()}


def notebook_parameters(path: Path) -> dict[str, Any]:
    """Names and default values of the notebook's ``parameters`` cell (the cell tagged ``parameters``)."""
    nb = json.loads(path.read_text())
    cells = [c for c in nb.get("cells", []) if "parameters" in c.get("metadata", {}).get("tags", [])]
    if not cells:
        raise BuildError(f"{path} has no cell tagged 'parameters': tag the cell holding its settings "
                         "(papermill injects overrides after it)")
    source = "".join(cells[0]["source"])
    params: dict[str, Any] = {}
    for node in ast.parse(source).body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Name):
                    try:
                        params[target.id] = ast.literal_eval(node.value)
                    except ValueError:
                        params[target.id] = ast.unparse(node.value)
    return params


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["n=10", "lr=1e-3", "name=mlp"]`` → ``{"n": 10, "lr": 0.001, "name": "mlp"}`` (YAML scalars)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise BuildError(f"override {pair!r} is not key=value (e.g. n_test=5)")
        key, value = pair.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def resolve_parameters(chapter: Chapter, profile: str, overrides: dict[str, Any] | None = None,
                       root: Path = REPO_ROOT) -> dict[str, Any]:
    """The parameters papermill injects: the profile's overrides, then the command line's; names checked."""
    defaults = notebook_parameters(root / chapter.path)
    params = dict(load_profile(profile, root).get(chapter.name, {}))
    params.update(overrides or {})
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise BuildError(f"unknown parameter(s) {', '.join(unknown)} for chapter {chapter.name!r}; "
                         f"valid: {', '.join(defaults)}")
    return params


# --------------------------------------------------------------------------------------------- running


def build_dir_default() -> Path:
    return Path(os.environ.get("BOOK_BUILD_DIR") or REPO_ROOT / "_build").resolve()


def _replace_dir(src: Path, dst: Path) -> None:
    """Move ``src`` onto ``dst``, replacing it; the old copy is renamed away first, then deleted."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if dst.exists():
        old = dst.with_name(f".old-{dst.name}-{os.getpid()}")
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def execute_chapter(chapter: Chapter, profile: str = "default", *, overrides: dict[str, Any] | None = None,
                    build_dir: Path | None = None, root: Path = REPO_ROOT, quiet: bool = False) -> Path:
    """Execute one notebook chapter with papermill; returns the executed notebook's path.

    The chapter runs with its folder as working directory and these environment variables, which
    :mod:`helpers.book` and :mod:`helpers.cache` read: ``BOOK_CHAPTER``, ``BOOK_PROFILE``,
    ``BOOK_OUTPUT_DIR`` (a private work folder for figure data and records) and ``BOOK_CACHE_DIR``.
    On success the executed notebook, ``data/<chapter>/`` and ``records/<chapter>.json`` are moved into
    ``build_dir``; on failure nothing of the run is kept and a :class:`BuildError` names chapter and cell.
    Its seconds and cache hits/misses (from the cache's log) are recorded in ``timings/<profile>.json``.
    """
    import papermill
    from papermill.exceptions import PapermillExecutionError

    build_dir = (build_dir or build_dir_default()).resolve()
    params = resolve_parameters(chapter, profile, overrides, root)
    _sweep_stale(build_dir)
    work = Path(tempfile.mkdtemp(prefix=f".work-{os.getpid()}-{chapter.name}-", dir=_ensure(build_dir)))
    out_nb = work / f"{chapter.name}.ipynb"
    env_updates = {
        "BOOK_CHAPTER": chapter.name,
        "BOOK_PROGRESS": "off",  # no progress bar reaches a rendered page (helpers.progress)
        "BOOK_PROFILE": profile,
        "BOOK_OUTPUT_DIR": str(work),
        "BOOK_CACHE_DIR": os.environ.get("BOOK_CACHE_DIR") or str(build_dir / "cache"),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
        "MPLBACKEND": "module://matplotlib_inline.backend_inline",
    }
    saved = {k: os.environ.get(k) for k in env_updates}
    os.environ.update(env_updates)  # the kernel inherits the environment of this process
    start = time.perf_counter()
    started_at = time.time()
    try:
        if not quiet:
            print(f"[{profile}] {chapter.name}: executing with {params or 'its defaults'}", flush=True)
        papermill.execute_notebook(
            str(root / chapter.path), str(out_nb), parameters=params, kernel_name="python3",
            cwd=str((root / chapter.path).parent), progress_bar=False, log_output=False,
        )
    except PapermillExecutionError as err:
        shutil.rmtree(work, ignore_errors=True)
        raise BuildError(f"chapter {chapter.name!r} failed in cell {err.cell_index} "
                         f"(execution count {err.exec_count}): {err.ename}: {err.evalue}".splitlines()[0]) from None
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    seconds = time.perf_counter() - start
    # Commit: notebook, figure data, records — each moved into place whole.
    final_nb = build_dir / "executed" / profile / f"{chapter.name}.ipynb"
    final_nb.parent.mkdir(parents=True, exist_ok=True)
    os.replace(out_nb, final_nb)
    if (work / "data").exists():
        _replace_dir(work / "data", build_dir / "data" / chapter.name)
    records = work / "records.json"
    record = json.loads(records.read_text()) if records.exists() else {}
    record["_meta"] = {"profile": profile, "parameters": params, "seconds": round(seconds, 2)}
    _atomic_write_text(build_dir / "records" / f"{chapter.name}.json", json.dumps(record, indent=1))
    hits, misses = _cache_events(Path(env_updates["BOOK_CACHE_DIR"]), chapter.name, started_at)
    _record_chapter_timing(build_dir, profile, chapter.name, seconds, hits, misses, overrides or {})
    shutil.rmtree(work, ignore_errors=True)
    if not quiet:
        print(f"[{profile}] {chapter.name}: done in {seconds:.1f} s", flush=True)
    return final_nb


def _sweep_stale(build_dir: Path) -> None:
    """Remove work and staging folders left by a run that was killed outright (SIGKILL, power loss).

    Folder names carry the owning process id; a folder whose process no longer exists is debris.
    """
    if not build_dir.exists():
        return
    for folder in [*build_dir.glob(".work-*"), *build_dir.glob(".stage-*"), *build_dir.glob(".old-*")]:
        parts = folder.name.split("-")
        pid = next((int(p) for p in parts[1:] if p.isdigit()), None)
        if pid is None or pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except PermissionError:  # alive, owned by someone else
            pass


def _ensure(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------- timings


def timings_path(build_dir: Path, profile: str) -> Path:
    """``<build_dir>/timings/<profile>.json``: what :func:`execute_chapter` and :func:`build_book` measured."""
    return build_dir / "timings" / f"{profile}.json"


def _cache_events(cache_dir: Path, chapter: str, since: float) -> tuple[int, int]:
    """Cache hits and misses logged by ``chapter`` since ``since`` (epoch seconds), from the cache's log.jsonl."""
    log = cache_dir / "log.jsonl"
    counts = {"hit": 0, "miss": 0}
    if log.exists():
        for line in log.read_text().splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("chapter") == chapter and event.get("time", 0) >= since and event.get("event") in counts:
                counts[event["event"]] += 1
    return counts["hit"], counts["miss"]


def _update_timings(build_dir: Path, profile: str, change: Any) -> dict[str, Any]:
    path = timings_path(build_dir, profile)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {}
    data.setdefault("profile", profile)
    data.setdefault("chapters", {})
    data.setdefault("builds", {})
    change(data)
    _atomic_write_text(path, json.dumps(data, indent=1))
    return data


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _record_chapter_timing(build_dir: Path, profile: str, name: str, seconds: float, hits: int, misses: int,
                           overrides: dict[str, Any]) -> None:
    entry = {"seconds": round(seconds, 2), "cache_hits": hits, "cache_misses": misses, "finished": _now(),
             "overrides": overrides}
    _update_timings(build_dir, profile, lambda data: data["chapters"].__setitem__(name, entry))


def _record_build(build_dir: Path, profile: str, names: list[str], seconds: float, html_seconds: float) -> None:
    """Store a whole-book build as the latest of its kind: ``cold`` (every cache lookup of its chapters missed),
    ``rebuild`` (every lookup hit: nothing had changed), ``partial`` (some of each) or ``uncached`` (none)."""

    def change(data: dict[str, Any]) -> None:
        chapters = {n: data["chapters"][n] for n in names if n in data["chapters"]}
        hits = sum(c["cache_hits"] for c in chapters.values())
        misses = sum(c["cache_misses"] for c in chapters.values())
        kind = ("cold" if misses and not hits else "rebuild" if hits and not misses else
                "partial" if hits else "uncached")
        data["builds"][kind] = {"seconds": round(seconds, 2), "html_seconds": round(html_seconds, 2),
                                "finished": _now(), "cache_hits": hits, "cache_misses": misses,
                                "chapters": chapters}
        data["last_build"] = kind

    _update_timings(build_dir, profile, change)


#: The parts of MathJax 3's es5 tree that ``tex-mml-chtml.js`` loads (fonts, TeX extensions, menu, a11y).
MATHJAX_PARTS = ("tex-mml-chtml.js", "input", "output", "ui", "a11y", "sre", "adaptors")


def _stage_mathjax(target: Path) -> None:
    """Copy a local MathJax 3 (PyPI ``django-static-mathjax``, pinned) so the HTML renders math offline.

    It goes to ``_extra/`` (Sphinx's ``html_extra_path``, copied verbatim to ``html/mathjax/``), not to ``_static``:
    Jupyter Book adds a script tag for every ``.js`` file under ``_static``, which would load MathJax twice.
    ``_config.yml`` points ``mathjax_path`` at it.
    """
    import importlib.util

    spec = importlib.util.find_spec("mathjax")
    es5 = Path(spec.origin).parent / "static" / "mathjax" / "es5" if spec and spec.origin else None
    if es5 is None or not (es5 / "tex-mml-chtml.js").exists():
        raise BuildError("no local MathJax (package django-static-mathjax) in this environment: run `make book` "
                         "or `.venv/bin/pip install -e .` to install the pinned set")
    target.mkdir(parents=True, exist_ok=True)
    for part in MATHJAX_PARTS:
        src = es5 / part
        if src.is_dir():
            shutil.copytree(src, target / part)
        else:
            shutil.copy2(src, target / part)


def build_html(profile: str = "default", *, build_dir: Path | None = None, root: Path = REPO_ROOT,
               quiet: bool = False) -> Path:
    """Build the HTML from a staged copy of the book with the executed notebooks swapped in.

    Jupyter Book runs with warnings as errors (``-W``) and never executes anything (``execute_notebooks:
    off`` in ``_config.yml``). Returns ``<build_dir>/html/index.html``.
    """
    build_dir = (build_dir or build_dir_default()).resolve()
    _sweep_stale(build_dir)
    stage = Path(tempfile.mkdtemp(prefix=f".stage-{os.getpid()}-", dir=_ensure(build_dir)))
    try:
        shutil.copy2(root / "_config.yml", stage / "_config.yml")
        shutil.copytree(root / BOOK_DIR_NAME, stage / BOOK_DIR_NAME,
                        ignore=shutil.ignore_patterns("*.ipynb", "__pycache__", ".ipynb_checkpoints"))
        _stage_mathjax(stage / "_extra" / "mathjax")
        # The root page is staged as index.<ext> at the top, so _build/html/index.html *is* the introduction
        # (Jupyter Book otherwise writes a redirect there).
        toc = yaml.safe_load((root / "_toc.yml").read_text())
        pages = read_toc(root)
        staged_path = {c: c.path for c in pages}
        staged_path[pages[0]] = Path("index" + pages[0].path.suffix)
        toc["root"] = "index"
        (stage / "_toc.yml").write_text(yaml.safe_dump(toc, sort_keys=False))
        for chapter in pages:
            if chapter.is_notebook:
                executed = build_dir / "executed" / profile / f"{chapter.name}.ipynb"
                if not executed.exists():
                    raise BuildError(f"chapter {chapter.name!r} has not been executed for profile {profile!r}: "
                                     f"run `make book PROFILE={profile}` (or helpers.build chapter {chapter.name})")
                shutil.copy2(executed, stage / staged_path[chapter])
            elif staged_path[chapter] != chapter.path:
                shutil.move(stage / chapter.path, stage / staged_path[chapter])
        jb = Path(sys.executable).with_name("jupyter-book")
        cmd = [str(jb) if jb.exists() else "jupyter-book", "build", str(stage), "--path-output", str(stage),
               "-W", "--keep-going", "--builder", "html"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            problems = [ln for ln in (proc.stdout + proc.stderr).splitlines()
                        if "WARNING" in ln or "ERROR" in ln or "Error" in ln]
            detail = problems[0] if problems else (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            log = build_dir / "jupyter-book.log"
            log.write_text(proc.stdout + proc.stderr)
            raise BuildError(f"jupyter-book build failed ({len(problems)} warning/error line(s); full log {log}): "
                             f"{detail}")
        _replace_dir(stage / "_build" / "html", build_dir / "html")
        (build_dir / "jupyter-book.log").unlink(missing_ok=True)  # a failed build's log is stale now
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    index = build_dir / "html" / "index.html"
    if not quiet:
        print(f"book: {index}", flush=True)
    return index


def build_book(profile: str = "default", *, build_dir: Path | None = None, root: Path = REPO_ROOT,
               quiet: bool = False) -> Path:
    """Execute every chapter of ``_toc.yml`` under ``profile`` (stopping at the first failure), then build HTML.

    A completed build is recorded in ``timings/<profile>.json`` (wall time, HTML time, each chapter's seconds
    and cache hits/misses) as the latest build of its kind; see :func:`timings_path`."""
    load_profile(profile, root)  # fail fast on an unknown profile, before any work
    start = time.perf_counter()
    chapters = notebook_chapters(root)
    for chapter in chapters:
        execute_chapter(chapter, profile, build_dir=build_dir, root=root, quiet=quiet)
    html_start = time.perf_counter()
    index = build_html(profile, build_dir=build_dir, root=root, quiet=quiet)
    end = time.perf_counter()
    _record_build((build_dir or build_dir_default()).resolve(), profile, [c.name for c in chapters], end - start,
                  end - html_start)
    return index


# --------------------------------------------------------------------------------------------- CLI


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m helpers.build", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("book", "chapter", "list", "html"):
        p = sub.add_parser(name)
        p.add_argument("--profile", default=os.environ.get("PROFILE") or "default")
        p.add_argument("--build-dir", type=Path, default=None)
        p.add_argument("--root", type=Path, default=REPO_ROOT, help="book root holding _toc.yml (tests)")
        if name == "chapter":
            p.add_argument("name", help="chapter name, e.g. intro")
            p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                           help="override one parameter (repeatable)")
            p.add_argument("--no-html", action="store_true", help="only execute, do not rebuild the HTML")
    args = parser.parse_args(argv)
    try:
        root = args.root.resolve()
        if args.command == "book":
            build_book(args.profile, build_dir=args.build_dir, root=root)
        elif args.command == "html":
            build_html(args.profile, build_dir=args.build_dir, root=root)
        elif args.command == "chapter":
            chapter = find_chapter(args.name, root)
            execute_chapter(chapter, args.profile, overrides=parse_overrides(args.overrides),
                            build_dir=args.build_dir, root=root)
            if not args.no_html:
                # The HTML needs every chapter executed once under this profile: run the missing ones.
                out = (args.build_dir or build_dir_default()).resolve()
                for other in notebook_chapters(root):
                    if not (out / "executed" / args.profile / f"{other.name}.ipynb").exists():
                        execute_chapter(other, args.profile, build_dir=args.build_dir, root=root)
                build_html(args.profile, build_dir=args.build_dir, root=root)
        elif args.command == "list":
            profile = load_profile(args.profile, root)
            for chapter in notebook_chapters(root):
                print(f"{chapter.name:28s} {chapter.path}  defaults={notebook_parameters(root / chapter.path)}"
                      f"  {args.profile}={profile.get(chapter.name, {})}")
    except BuildError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: nothing half-written was kept", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(_main())
