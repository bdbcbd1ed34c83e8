"""helpers.provenance: the machine as provenance, and a fingerprint of how its kernels round."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from helpers import provenance


def _fingerprint_in_a_process(**env: str) -> str:
    code = "from helpers import provenance; print(provenance.numerics_fingerprint())"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, **env})
    return run.stdout.strip()


def test_the_fingerprint_is_stable_and_ignores_the_thread_count() -> None:
    here = provenance.numerics_fingerprint()
    assert len(here) == 12 and int(here, 16) >= 0
    assert _fingerprint_in_a_process(OMP_NUM_THREADS="1") == here
    assert provenance.machine()["numerics"] == here and provenance.mismatch_note(provenance.machine()) == ""


def test_other_kernels_give_another_fingerprint() -> None:
    """Forcing torch's scalar kernels (what a CPU without vector units would run) changes the bits of the probe,
    so the fingerprint tells that arithmetic apart: the test that it can see a difference."""
    assert torch.backends.cpu.get_cpu_capability() != "DEFAULT"
    assert _fingerprint_in_a_process(ATEN_CPU_CAPABILITY="default") != provenance.numerics_fingerprint()


def test_a_mismatch_note_names_both_machines() -> None:
    note = provenance.mismatch_note({"cpu": "Some CPU", "cpu_capability": "AVX2", "numerics": "000000000000"})
    here = provenance.machine()
    assert "Some CPU, AVX2, numerics 000000000000" in note and here["numerics"] in note
    assert "recorded no numerics fingerprint" in provenance.mismatch_note(None)
    assert "recorded no numerics fingerprint" in provenance.mismatch_note({"node": "old", "cpus": 2})
