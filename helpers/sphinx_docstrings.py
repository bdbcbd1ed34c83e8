"""A Sphinx extension for the API page: the docstrings' plain-text ``|ρ|`` means an absolute value.

reStructuredText reads ``|word|`` as a substitution reference, and ``-W`` turns each undefined one into a build
error. The docstrings of :mod:`helpers` write absolute values that way (``|ρ|``, ``|Δ_true|``) because they are
read in editors and ``help()`` far more often than on the API page; this hook escapes such pairs outside inline
literals and roles (where a backslash would change the meaning, e.g. ``\\|`` in LaTeX) before autodoc parses them.

Listed in ``_config.yml`` under ``sphinx.config.extensions``.
"""

from __future__ import annotations

import re
from typing import Any

# a |...| pair on one line: no bar, backtick or line break inside, not a table cell border ("| a | b |")
_BARS = re.compile(r"(?<![\\|\w])\|(?=\S)([^|`\n]*?\S)\|(?![|\w])")
# inline literals and roles: ``...``, `...`, :role:`...` — left untouched
_CODE = re.compile(r"(:\w+(?::\w+)?:)?(``.*?``|`[^`]*`)")


def escape_bars(line: str) -> str:
    """``line`` with every ``|x|`` outside backticks written ``\\|x\\|`` (a literal bar pair in reST)."""
    stripped = line.strip()
    if "|" not in line or stripped == "|" or stripped.startswith("| "):  # line blocks, table rows: reST's own
        return line
    out, last = [], 0
    for m in _CODE.finditer(line):
        out.append(_BARS.sub(r"\\|\1\\|", line[last:m.start()]))
        out.append(m.group(0))
        last = m.end()
    out.append(_BARS.sub(r"\\|\1\\|", line[last:]))
    return "".join(out)


def _process(app: Any, what: str, name: str, obj: Any, options: Any, lines: list[str]) -> None:
    lines[:] = [escape_bars(line) for line in lines]


def setup(app: Any) -> dict[str, Any]:
    app.connect("autodoc-process-docstring", _process)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
