"""Every chapter in the smoke profile, through the same runner `make book` uses, and a smoke build of the book.

Each chapter records the numbers its prose quotes (helpers.book.record); the checks below assert them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable

import pytest

from helpers import build, cache

CHAPTERS = [c.name for c in build.notebook_chapters()]


def check_intro(r: dict[str, Any]) -> None:
    # Convex, exact Hessian, trained and retrained to 1e-12: the estimate must match retraining closely.
    assert r["grad_norm"] < 1e-10 and r["retrain_grad_norm"] < 1e-10
    assert r["pearson"] >= 0.99 and r["spearman"] >= 0.99, r
    assert r["pearson_low"] <= r["pearson"] <= r["pearson_high"]
    assert r["relative_error"] < 0.25
    assert r["solver_residual"] < 1e-10
    assert r["drift"] <= 1e-3 * r["median_abs_delta"]  # nothing removed: nothing moves
    assert r["_meta"]["profile"] == "smoke"


def check_convex(r: dict[str, Any]) -> None:
    # Chapter 1: every assumption enforced — θ̂ and every leave-one-out model at ‖∇R‖ < 1e-10, exact solve.
    assert r["grad_norm"] < 1e-10 and r["loo_max_grad_norm"] < 1e-10
    assert r["solver_residual"] < 1e-10
    # Values agree on the extremes and on a uniform sample, for every test point.
    assert r["min_pearson_extremes"] >= 0.99 and r["min_pearson_uniform"] >= 0.99, r
    # Ranks of near-equal effects can swap through the second-order (leverage) term, so Spearman gets a looser
    # bound; the one-step Newton estimate, which removes that term, must close most of the residual.
    assert r["min_spearman_extremes"] >= 0.95 and r["min_spearman_uniform"] >= 0.95, r
    assert r["one_step_relative_error"] < 0.5 * r["median_relative_error_extremes"]
    assert r["drift_ratio"] <= 0.01  # the drift run is at least 100× smaller than the extremes' median effect
    assert r["other_min_pearson"] >= 0.99  # the other leave-one-out objective
    assert r["iris_pearson"] >= 0.99 and r["iris_spearman"] >= 0.99
    # Each broken assumption degrades the estimate along its knob.
    exact = max(r["exact_relative_error_union"])
    assert r["stop_loosest_error"] > r["stop_converged_error"]
    assert r["l2_small_error"] > r["l2_large_error"] and r["l2_small_pearson"] < r["l2_large_pearson"]
    assert r["nol2_smallest_error"] > exact and r["damping_largest_error"] > exact
    for solver in ("cg", "lissa", "lissa_kl", "arnoldi"):
        assert r[f"{solver}_worst_error"] > r[f"{solver}_best_error"], solver
    assert r["_meta"]["profile"] == "smoke"


def check_nonconvex(r: dict[str, Any]) -> None:
    # Chapter 2: the paper's sweeps re-run. Every quoted bar carries a 95 % interval that contains it; the paper's
    # published runs give its depth effect (STUDY.md §3 item 4) whatever the profile.
    import math

    with_ci = ["l2_shallow_abs", "l2_deep_abs", "l2_shallow_signed", "l2_deep_signed", "paper_l2_shallow_abs",
               "paper_l2_deep_abs", "drift_exceeds_all", "drift_exceeds_last", "rho_all", "rho_last",
               "objective_minus_paper", "inv32_minus_paper", "paper_gap", "book_gap", "eig_vs_quality",
               "paper_eig_vs_quality", "top_eig_shallow", "top_eig_deep", "deep_first_abs", "deep_exact_signed",
               "shuffled_abs", "paper_fc128_abs"]
    for name in with_ci:
        lo, v, hi = r[name + "_low"], r[name], r[name + "_high"]
        assert all(isinstance(x, (int, float)) and math.isfinite(x) for x in (lo, v, hi)), name
        assert lo <= v + 1e-12 and v <= hi + 1e-12, (name, lo, v, hi)
    for name in ("l2_shallow_abs", "l2_deep_abs", "paper_l2_shallow_abs", "deep_first_abs", "shuffled_abs"):
        assert 0 <= r[name] <= 1, name
    assert 1e-9 < r["paper_anova_p"] < 3e-9  # a one-way ANOVA on the published L2 depth runs
    assert abs(r["paper_l2_shallow_abs"] - 0.70) < 0.01 and abs(r["paper_fc128_abs"] - 0.808) < 0.001
    assert 0 <= r["loo_argmax"] < 150 and r["n_models"] > 0 and r["n_compared"] > 0
    assert r["null_dims_width5"] == 5  # the paper's last-layer Hessian has a width-dimensional null space
    assert 0 <= r["n_separate_abs"] <= r["n_compared"]
    assert r["lanczos_max_rel_diff"] < 1e-6
    # every profile runs the paper's lengths, each run stopped at its lr floor (issue 12)
    assert (r["epochs"], r["retrain_epochs"]) == (60000, 7500)
    assert 0 < r["floor_train_l2"] <= r["floor_train_max"] <= 60000 and 0 < r["floor_retrain_max"] <= 7500
    assert r["bound_param_max"] > 0 and r["bound_nats_max"] > 0
    # the paper's depth claim per case, Holm-corrected, on its published runs (fixed data, so fixed counts)
    assert (r["paper_signed_cases"], r["paper_signed_sig"]) == (11, 9)
    assert 0 <= r["within_depth_excl0"] <= r["within_depth_n"] == 8
    assert r["_meta"]["profile"] == "smoke"


def check_validation(r: dict[str, Any]) -> None:
    # Chapter 3: one estimate per model, many ground truths. The summary table is complete, finite, with intervals.
    assert r["summary_finite_with_ci"] is True and r["summary_rows"] >= 3 * 8 * 4
    # issue 13: the unit of replication is trained model × test point; the last layers meet their criterion
    assert r["n_units"] >= 2 * 3
    assert r["mnist_head_grad_norm"] <= 1e-8 and r["cnn_head_grad_norm"] <= 1e-8
    assert r["mnist_head_grad_norm_before"] > 1e3 * r["mnist_head_grad_norm"]
    assert 0 <= r["bae_models_pbrf_better"] <= 3
    for key in ("iris", "mnist", "cnn"):
        for tag in ("cold", "cold1", "warm", "last", "pbrf"):
            for m in ("pearson", "spearman"):
                v, lo, hi = (r[f"{key}_{tag}_{m}{s}"] for s in ("", "_low", "_high"))
                assert -1 <= lo <= hi <= 1 and -1 <= v <= 1, (key, tag, m)
        assert 0 <= r[f"{key}_ceiling_single"] <= r[f"{key}_ceiling"] <= 1
        # the PBRF is what the damped Gauss-Newton estimate linearises: close agreement on every model
        assert r[f"{key}_pbrf_gn_pearson"] > 0.8, key
    # shuffled index, same retraining runs (last layer to convergence): the carried index reproduces the estimate
    # and agrees with leave-one-out; the loader position pairs estimates with other points' runs
    assert r["loader_fixed_max_error"] < 1e-10
    assert abs(r["pitfall_broken_exact_spearman"]) < 0.6 and abs(r["pitfall_broken_exact_pearson"]) < 0.6
    assert r["pitfall_fixed_exact_pearson"] > 0.9
    assert r["pitfall_fixed_exact_spearman"] > r["pitfall_broken_exact_spearman"] + 0.4
    # the paper's own runs, whatever the profile: depth effect (STUDY.md §3 item 4), drift (item 2), |ρ| floor
    assert 1e-9 < r["paper_l2_abs_p"] < 3e-9
    # per regime with Holm's correction (fixed published data): nol2 and l2_toplayer are the two exceptions
    assert (r["paper_regimes"], r["paper_regimes_significant_abs"], r["paper_regimes_significant_signed"]) == (6, 4, 4)
    assert r["paper_lenet_mnist_drift"] == pytest.approx(0.27, abs=0.01)
    assert r["paper_lenet_cifar_drift"] == pytest.approx(0.61, abs=0.01) and r["paper_lenet_spread"] < 0.035
    assert 0.15 < r["null_abs_rho_25"] < 0.18 and 0.11 < r["null_abs_rho_40"] < 0.15
    assert r["paper_fc128_spearman"] > 0.7 and r["paper_fc128_ratio"] > 50
    # single-point effects shrink with n, on exact leave-one-out
    assert r["scaling_slope"] < -0.5 and r["scaling_pearson"] > 0.9
    assert r["_meta"]["profile"] == "smoke"


def check_own_model(r: dict[str, Any]) -> None:
    # The template chapter on its example model: every ground truth scored with intervals, the noise ceiling, and
    # the known-answer check (last layer alone, exact leave-one-out) that the pipeline pairs points correctly.
    from helpers.experiments.own_model import TRUTH_TAGS

    for tag in TRUTH_TAGS.values():
        for m in ("pearson", "spearman"):
            v, lo, hi = (r[f"{tag}_{m}{s}"] for s in ("", "_low", "_high"))
            assert -1 <= lo <= hi <= 1 and -1 <= v <= 1, (tag, m, lo, v, hi)
            assert lo - 1e-12 <= v <= hi + 1e-12, (tag, m, lo, v, hi)
    assert 0 <= r["ceiling_single"] <= r["ceiling"] <= 1
    assert r["known_pearson"] > 0.99 and r["pbrf_gn_pearson"] > 0.8
    # the known answer passes on values too (slope and relative error within their margins, from intervals)
    from helpers.experiments.own_model import KNOWN_RELATIVE_ERROR_OK, KNOWN_SLOPE_BAND

    assert 1 / KNOWN_SLOPE_BAND < r["known_slope_low"] <= r["known_slope_high"] < KNOWN_SLOPE_BAND
    assert r["known_relative_error_high"] < KNOWN_RELATIVE_ERROR_OK
    # every check held to a margin got a verdict from its interval; δ came from the spectrum (helpers.solvers rule)
    assert r["checks_pass"] + r["checks_fail"] + r["checks_inconclusive"] == 11 and r["checks_pass"] >= 5
    from helpers.solvers import auto_damping

    assert r["damping_auto"] == 1
    assert abs(r["damping"] - auto_damping(r["damping_eig_min"], r["damping_eig_max"])) < 1e-12
    assert r["_meta"]["profile"] == "smoke"


CHECKS: dict[str, Callable[[dict[str, Any]], None]] = {"intro": check_intro, "convex": check_convex}
def check_estimators(r: dict[str, Any]) -> None:
    # Chapter 4: every (model, estimator, target) measured, each mean with an interval that holds it.
    from helpers.experiments.estimators import ESTIMATORS, MODEL_NAMES, TARGETS, _slug

    for model in MODEL_NAMES.values():
        for estimator in ESTIMATORS:
            for target in TARGETS:
                key = f"{_slug(model)}_{_slug(estimator)}_{_slug(target)}"
                assert -1 <= r[key + "_low"] <= r[key] <= r[key + "_high"] <= 1, (key, r[key + "_low"], r[key])
            assert r[f"seconds_{_slug(model)}_{_slug(estimator)}"] > 0
    assert r["n_pairs"] == len(MODEL_NAMES) * (len(ESTIMATORS) - 1) * len(TARGETS)
    assert 0 <= r["n_pairs_beating_similarity"] <= r["n_pairs"]
    assert r["n_family"] == len(ESTIMATORS) - 1 and r["family_alpha"] == 0.05
    # The stated criterion: θ̂ and every retrained model (L-BFGS, full batch) at ‖∇R‖ ≤ grad_tol.
    for what in ("theta", "loo_cold", "loo_warm", "pbrf", "lds_alpha_small", "lds_alpha_large"):
        assert r[f"grad_norm_{what}"] <= r["grad_tol"], what
    # The convex control: the model is one layer, so all-parameter and last-layer influence are the same numbers;
    # its minimum is unique, so cold and warm start, both converged, are the same target; and exact influence
    # tracks the target it linearises, the PBRF.
    control = _slug(MODEL_NAMES["logreg"])
    for target in TARGETS:
        assert r[f"{control}_exact_cg_{_slug(target)}"] == pytest.approx(
            r[f"{control}_exact_last_layer_{_slug(target)}"], abs=1e-6)
    assert abs(r[f"{control}_exact_cg_loo_cold"] - r[f"{control}_exact_cg_loo_warm"]) <= 0.02, r
    assert r[f"{control}_exact_cg_pbrf"] >= 0.85, r
    # The LDS check: the table's subsets are the first of the check's, so its mean over them is the table's LDS of
    # exact influence; its models meet both tolerances; its intervals hold their means.
    for size in ("small", "large"):
        assert r[f"lds_check_table_{size}"] == pytest.approx(r[f"lds_exact_{size}"], abs=1e-12), size
        assert -1 <= r[f"lds_check_{size}_low"] <= r[f"lds_check_{size}"] <= r[f"lds_check_{size}_high"] <= 1
    assert r["lds_check_grad_norm"] <= r["grad_tol"]
    assert r["lds_check_grad_norm_tight"] <= r["lds_check_tol"] < r["grad_tol"]
    assert 0 <= r["lds_check_max_change"] <= 2
    assert r["_meta"]["profile"] == "smoke"


CHECKS["own_model"] = check_own_model
CHECKS["estimators"] = check_estimators
CHECKS["nonconvex"] = check_nonconvex
CHECKS["validation"] = check_validation


def test_every_chapter_has_a_check() -> None:
    # Every chapter in _toc.yml needs a check; draft chapters may have theirs ready before they join the book.
    assert set(CHAPTERS) <= set(CHECKS), "add a records check for every chapter in _toc.yml"


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_chapter_records(smoke_book: Path, chapter: str) -> None:
    records = json.loads((smoke_book / "records" / f"{chapter}.json").read_text())
    CHECKS[chapter](records)


def test_smoke_book_renders_intro_with_figure_and_numbers(smoke_book: Path) -> None:
    index = (smoke_book / "html" / "index.html").read_text()
    records = json.loads((smoke_book / "records" / "intro.json").read_text())
    assert re.search(r'<img [^>]*src="_images/[0-9a-f]+\.png"', index), "the intro figure is missing"
    assert (smoke_book / "data" / "intro" / "intro_scatter.csv").exists()
    text = re.sub(r"<[^>]+>", "", index)
    assert f"Over all {records['n_train']} training points" in text
    assert f"{records['pearson']:.4f}" in text and f"{records['spearman']:.4f}" in text
    assert "Traceback" not in index and "{glue" not in index
    # Math renders offline: MathJax comes from the book itself, not a CDN.
    assert "_static/../mathjax/tex-mml-chtml.js" in index and "cdn.jsdelivr" not in index
    assert (smoke_book / "html" / "mathjax" / "tex-mml-chtml.js").exists()


def test_smoke_book_has_api_reference_and_bibliography(smoke_book: Path) -> None:
    api = (smoke_book / "html" / "book" / "api.html").read_text()
    for name in ("influence.predict_removal", "retrain.warm_start", "curvature.hessian_operator", "cache.memoize",
                 "train.Recipe", "experiments.convex.verify", "experiments.nonconvex.run_deep",
                 "experiments.validation.run_protocols", "experiments.own_model.run_checklist", "dispatch.run_many",
                 "closed_form.removal_estimate", "stacked.fit_stack", "solvers.lissa_path", "influence.loader_influence",
                 "kronecker.kronecker_factors", "estimators.trak", "estimators.tracin", "metrics.lds",
                 "retrain.on_subsets", "experiments.estimators.run_chapter"):
        assert f'id="helpers.{name}"' in api, f"API page lacks helpers.{name}"
    assert "Undefined substitution" not in api and "|ρ|" in api  # docstrings' absolute values survive
    bib = (smoke_book / "html" / "book" / "references.html").read_text()
    assert "understanding black-box predictions via influence functions" in bib.lower()


def test_rebuild_reuses_every_cached_result(smoke_book: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A second run with nothing changed only hits; a changed parameter misses. The runs write to a build folder
    of their own, sharing only the smoke book's cache: the smoke book's records stay those of its own build while
    the other pytest worker compares them with the pins (a re-run of intro at seed 1 into the smoke book once made
    that comparison depend on which test ran first)."""
    log_dir = smoke_book / "cache"
    monkeypatch.setenv("BOOK_CACHE_DIR", str(log_dir))
    first_events = cache.read_log(log_dir)
    assert any(e["event"] == "miss" for e in first_events), "the smoke book cached nothing"
    for chapter in build.notebook_chapters():
        build.execute_chapter(chapter, "smoke", build_dir=tmp_path, quiet=True)
    second = cache.read_log(log_dir)[len(first_events):]
    assert second and all(e["event"] == "hit" for e in second), [e for e in second if e["event"] != "hit"]
    assert len(second) == len(first_events)

    build.execute_chapter(build.find_chapter("intro"), "smoke", overrides={"seed": 1}, build_dir=tmp_path,
                          quiet=True)
    third = cache.read_log(log_dir)[len(first_events) + len(second):]
    assert any(e["event"] == "miss" for e in third)
