"""The package's shape: one engine, experiments modules on top, chapters that only call them.

Read from the source (ast and text), so these run in a second and fail on the commit that breaks the shape.
"""

from __future__ import annotations

import ast
import json
import re
from collections import defaultdict
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HELPERS = REPO / "helpers"
#: the engine and its backends: the only modules allowed an optimiser, a Hessian or a solver
ENGINE = {"data", "models", "objective", "train", "curvature", "solvers", "influence", "retrain", "metrics", "stats",
          "plots", "memory", "progress", "cache", "paper_data", "closed_form", "stacked",
          "kronecker", "estimators", "layered"}
#: what an optimisation loop, a Hessian or a linear solve looks like in torch / scipy code
FORBIDDEN = {
    "an optimiser": r"torch\.optim\b|\.step\(\)|scipy\.optimize|\.zero_grad\(",
    "a Hessian": r"torch\.func\.hessian|\bjacrev\b|\bjacfwd\b|\bhvp\b|\bjvp\b|\bvjp\b|autograd\.functional",
    "a solver": r"torch\.linalg\.(?:solve|cholesky|eigh|eigvalsh|inv|pinv|lstsq)\b|scipy\.linalg|sparse\.linalg|"
                r"\bcho_solve\b|\bconjugate_gradient",
}


def _modules() -> dict[str, Path]:
    return {".".join(p.relative_to(HELPERS).with_suffix("").parts): p for p in sorted(HELPERS.rglob("*.py"))
            if p.name != "__init__.py"}


def _code(path: Path) -> str:
    """The module's source without docstrings and comments (prose may name what it must not define)."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and \
                isinstance(getattr(body[0], "value", None), ast.Constant) and isinstance(body[0].value.value, str):
            body[0] = ast.Pass()
    return ast.unparse(tree)


def _notebook_code(path: Path) -> str:
    cells = json.loads(path.read_text())["cells"]
    return "\n".join(re.sub(r"#.*", "", "".join(c["source"])) for c in cells if c["cell_type"] == "code")


def test_no_two_public_functions_or_classes_share_a_name() -> None:
    where = defaultdict(list)
    for name, path in _modules().items():
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
                where[node.name].append(name)
    clashes = {k: v for k, v in where.items() if len(v) > 1}
    assert not clashes, f"public names defined in more than one module of helpers: {clashes}"


def test_the_structure_check_sees_an_optimiser() -> None:
    code = "opt = torch.optim.Adam(params)\nfor _ in range(9):\n    opt.step()\n"
    assert re.search(FORBIDDEN["an optimiser"], code)
    assert re.search(FORBIDDEN["a solver"], "x = torch.linalg.solve(H, b)")
    assert re.search(FORBIDDEN["a Hessian"], "H = torch.func.hessian(f)(theta)")


@pytest.mark.parametrize("module", sorted(set(_modules()) - ENGINE))
def test_no_module_outside_the_engine_defines_an_optimiser_a_hessian_or_a_solver(module: str) -> None:
    code = _code(_modules()[module])
    found = {what: re.findall(pattern, code) for what, pattern in FORBIDDEN.items()}
    found = {k: v for k, v in found.items() if v}
    assert not found, (f"helpers.{module} defines {found}: move it into the engine (train, curvature, solvers, "
                       "influence, retrain) or a backend, and call it from there")


@pytest.mark.parametrize("notebook", sorted(p.name for p in (REPO / "book").glob("*.ipynb")))
def test_no_chapter_defines_an_optimiser_a_hessian_or_a_solver(notebook: str) -> None:
    code = _notebook_code(REPO / "book" / notebook)
    found = {what: re.findall(pattern, code) for what, pattern in FORBIDDEN.items() if re.search(pattern, code)}
    assert not found, f"{notebook} computes {found} itself: call the engine"


def _imports(path: Path) -> set[str]:
    """``helpers`` modules a module imports (``helpers.x`` for ``from helpers import x`` and ``from helpers.x``)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("helpers"):
            if node.module in ("helpers", "helpers.experiments"):
                out |= {f"{node.module}.{a.name}" for a in node.names}
            else:
                out.add(node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("helpers")}
    return out


@pytest.mark.parametrize("notebook", sorted(p.name for p in (REPO / "book").glob("*.ipynb")))
def test_every_chapter_stands_on_influence_and_retrain(notebook: str) -> None:
    """Directly, or through its experiments module, which imports them."""
    tree = ast.parse(_notebook_code(REPO / "book" / notebook).replace("%", "#"))
    direct = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("helpers"):
            direct |= ({f"{node.module}.{a.name}" for a in node.names} if node.module in ("helpers", "helpers.experiments")
                       else {node.module})
    reached = set(direct)
    for name in direct:
        path = HELPERS.joinpath(*name.split(".")[1:]).with_suffix(".py")
        if path.exists():
            reached |= _imports(path)
    for engine in ("helpers.influence", "helpers.retrain"):
        assert engine in reached, f"{notebook} reaches {sorted(reached)}, not {engine}"


def test_each_experiments_module_names_its_chapter() -> None:
    for path in sorted((HELPERS / "experiments").glob("*.py")):
        if path.name == "__init__.py":
            continue
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        assert f"book/{path.stem}.ipynb" in doc, f"helpers/experiments/{path.name}: its docstring names no chapter"
        assert (REPO / "book" / f"{path.stem}.ipynb").exists()


@pytest.mark.parametrize("notebook", sorted(p.name for p in (REPO / "book").glob("*.ipynb")))
def test_chapters_are_prose_with_a_few_calls(notebook: str) -> None:
    """Code cells of at most 25 lines, a median of at most 12. The parameters cell is exempt from the 25: it lists
    the chapter's knobs one per line, with what each does — the cell papermill overrides (``make chapter ARGS=…``)."""
    cells = [c for c in json.loads((REPO / "book" / notebook).read_text())["cells"] if c["cell_type"] == "code"]
    sizes = [len("".join(c["source"]).splitlines()) for c in cells]
    long = [(i, n) for i, (c, n) in enumerate(zip(cells, sizes))
            if n > 25 and "parameters" not in c["metadata"].get("tags", [])]
    assert not long, f"{notebook}: code cells (index among code cells, lines) over 25 lines: {long}"
    median = sorted(sizes)[len(sizes) // 2] if len(sizes) % 2 else sum(sorted(sizes)[len(sizes) // 2 - 1:][:2]) / 2
    assert median <= 12, f"{notebook}: the median code cell has {median} lines (at most 12)"
