"""The API page's docstring hook: |x| is an absolute value, escaped so reST does not read a substitution."""

from __future__ import annotations

import pytest

from helpers.sphinx_docstrings import _process, escape_bars


@pytest.mark.parametrize(("line", "expected"), [
    ("mean |ρ| over runs", r"mean \|ρ\| over runs"),
    ("|Δ_true| / median |Δ|", r"\|Δ_true\| / median \|Δ\|"),
    ("as ``|x|`` and :math:`|a| + |b|` and `|c|`", "as ``|x|`` and :math:`|a| + |b|` and `|c|`"),
    ("| a | b |", "| a | b |"),  # a table row
    ("x || y, a|b|c, | spaced |", "x || y, a|b|c, | spaced |"),  # no absolute value in sight
    ("no bars", "no bars"),
])
def test_escape_bars(line: str, expected: str) -> None:
    assert escape_bars(line) == expected


def test_hook_rewrites_the_docstring_in_place() -> None:
    lines = ["the |estimate|", "``|kept|``"]
    _process(None, "function", "f", None, None, lines)
    assert lines == [r"the \|estimate\|", "``|kept|``"]
