"""Floor termination: the paper's Iris training run to every epoch against the same ensemble stopped at the floor.

    python benchmarks/bench_floor_termination.py [--quick] [--reps 5] [--threads 1]

The seed paper's protocol (STUDY.md §3): width-5 SELU MLPs on the 149 standardised Iris training points, Adam
lr 1e-3, ``ReduceLROnPlateau`` (÷10 after 100 stalled epochs, eps 1e-8), 60,000 full-batch epochs; one hidden
layer, with (λ = 0.005) and without weight decay, ``--reps`` seeds each, as one vectorised ensemble
(:func:`helpers.stacked.fit_stack`). Both runs train the same members; the stopped run drops each member from the
ensemble once its learning rate is at the floor (:attr:`helpers.train.Recipe.stop_at_floor`). Printed, from this
one run: both wall times and their ratio, the epochs each member computed, and the largest parameter change the
skipped epochs made against :func:`helpers.train.floor_bound`.

``--quick`` keeps the mechanism and shortens everything (lr 1e-2, patience 10, 6,000 epochs) for a check in
seconds; its ratio is not the protocol's.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
import torch

from helpers import stacked
from helpers.experiments import nonconvex
from helpers.train import Recipe, floor_bound


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short schedule: a check in seconds, not the protocol")
    parser.add_argument("--reps", type=int, default=5, help="seeds per regime")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = nonconvex.iris_data(83)
    stack = stacked.Stack(4, 3, 1, 5)
    members = pd.DataFrame([{"depth": 1, "width": 5, "l2": lam, "seed": s}
                            for lam in (0.0, 0.005) for s in range(args.reps)])
    recipe = Recipe(optimizer="adam", lr=1e-2 if args.quick else 1e-3, epochs=6000 if args.quick else 60000,
                    schedule="plateau", patience=10 if args.quick else 100, dtype="float64", stop_at_floor=True)
    timed = {}
    fits = {}
    for name, rec in (("stopped at the floor", recipe), ("every epoch", recipe.replace(stop_at_floor=False))):
        start = time.perf_counter()
        fits[name] = stacked.fit_stack(stack, members, *data.train, rec)
        timed[name] = time.perf_counter() - start
    stop, full = fits["stopped at the floor"], fits["every epoch"]
    moved = (full.theta - stop.theta).abs().max(1).values.numpy()
    bound = floor_bound(recipe, stop.epochs_run, stop.lr)
    print(f"{len(members)} members, {recipe.epochs:,} epochs{' (quick)' if args.quick else ''}, {args.threads} thread(s)")
    for name, seconds in timed.items():
        print(f"  {name:22s} {seconds:8.1f} s")
    print(f"  speed-up of floor termination: {timed['every epoch'] / timed['stopped at the floor']:.1f}x")
    for lam in (0.0, 0.005):
        rows = (members["l2"] == lam).to_numpy()
        print(f"  λ = {lam}: epochs computed {np.median(stop.epochs_run[rows]):,.0f} (median) of {recipe.epochs:,};"
              f" largest |Δθ| of the skipped epochs {moved[rows].max():.1e} (bound {bound[rows].min():.1e})")
    assert (moved <= bound).all(), "a skipped epoch moved a parameter further than floor_bound allows"


if __name__ == "__main__":
    main()
