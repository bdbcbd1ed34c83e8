"""`pip install .` outside the checkout gives a working helpers: the paper's data ship as package data, and the
cache goes to a user folder, never into the environment (nor into a checkout it cannot see)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Runs in the fresh environment, from a folder outside the checkout.
PROBE = textwrap.dedent("""
    import json, sys, torch
    import helpers
    from helpers import cache, closed_form, influence, paper_data, train

    torch.manual_seed(0)
    x = torch.randn(30, 3, dtype=torch.float64)
    y = (x[:, 0] > 0).long()
    model = closed_form.model_at(train.fit_to_tolerance(closed_form.model_at(torch.zeros(2, 3, dtype=torch.float64)), x, y,
                                                   l2=1e-2).theta)
    delta = influence.predict_removal(model, (x, y), (x[:2], y[:2]), l2=1e-2).values
    runs = paper_data.iris_runs()
    print(json.dumps({"helpers": helpers.__file__, "cache_dir": str(cache.cache_dir()), "delta_shape": list(delta.shape),
                      "finite": bool(torch.isfinite(delta).all()), "iris_runs": len(runs),
                      "iris_settings": int(runs.groupby(["sweep", "regime", "value"]).ngroups)}))
""")


@pytest.mark.slow
def test_wheel_installs_and_works_outside_the_checkout(tmp_path: Path) -> None:
    # Build from a copy of what the wheel is made of: an in-tree build would leave build/ in the checkout.
    src = tmp_path / "src"
    shutil.copytree(REPO / "helpers", src / "helpers", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(wheels), str(src)], check=True, capture_output=True, text=True)
    wheel, = wheels.glob("influence_on_trial-*.whl")

    # A fresh environment with the pinned dependencies of this one (torch is gigabytes; reinstalling it proves
    # nothing about our package) but not its editable helpers: a plain path line in a .pth file adds the
    # dependencies' folder without running the .pth hooks inside it (the editable finder is one of those).
    env = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
    py = env / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)], check=True,
                   capture_output=True, text=True)

    away = tmp_path / "elsewhere"
    away.mkdir()
    clean = {k: v for k, v in os.environ.items() if not k.startswith("BOOK_") and k != "PYTHONPATH"}
    clean["XDG_CACHE_HOME"] = str(tmp_path / "user_cache")
    out = subprocess.run([str(py), "-c", PROBE], cwd=away, env=clean, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])

    assert Path(got["helpers"]).is_relative_to(site), f"imported {got['helpers']}, not the installed wheel"
    assert Path(got["cache_dir"]) == tmp_path / "user_cache" / "influence-on-trial" / "cache"
    assert got["delta_shape"] == [2, 30] and got["finite"]
    assert got["iris_runs"] == 3900 and got["iris_settings"] == 78  # 50 repetitions of each setting
