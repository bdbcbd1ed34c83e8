"""Influence of every training point vs one training run: mnist5k multinomial logistic regression.

    python benchmarks/bench_influence_vs_training.py [--n-test 10] [--tol 1e-8] [--rtol 1e-10]

Koh & Liang's convex setting on the 5,000 real MNIST images that ship offline (4,000 train / 1,000 test),
784×10 weights, no bias, L2 0.01, float64. Times, in one run:

* one training run: ``helpers.train.fit`` with full-batch L-BFGS to gradient norm ``--tol``;
* the influence of all 4,000 training points on the ``--n-test`` highest-loss test points:
  ``helpers.influence.predict_removal`` with batched CG to relative residual ``--rtol``;

and prints the ratio (influence / training). The point: for every training point at once, the estimate
costs about as much as *one* fit, while leave-one-out retraining costs 4,000 fits. Not part of the tests.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from helpers import data, models, train  # noqa: E402
from helpers.influence import predict_removal  # noqa: E402
from helpers.objective import model_params, per_sample_losses  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-test", type=int, default=10)
    parser.add_argument("--tol", type=float, default=1e-8, help="training gradient-norm tolerance")
    parser.add_argument("--rtol", type=float, default=1e-10, help="CG relative residual")
    parser.add_argument("--l2", type=float, default=0.01)
    args = parser.parse_args()

    split = data.load("mnist5k", seed=0, dtype=torch.float64)
    model = models.build("logreg", d_in=784, n_classes=10, seed=0, dtype=torch.float64)
    recipe = train.Recipe(optimizer="lbfgs", lr=1.0, weight_decay=args.l2, tol=args.tol, max_iter=2000)

    start = time.perf_counter()
    fitted = train.fit(recipe, model, *split.train, progress=False)
    t_train = time.perf_counter() - start

    model = train.model_with(model, fitted.params)
    worst = per_sample_losses(model, model_params(model), *split.test).argsort(descending=True)[: args.n_test]
    test = (split.x_test[worst], split.y_test[worst])
    start = time.perf_counter()
    est = predict_removal(model, split.train, test, l2=args.l2, method="cg", rtol=args.rtol)
    t_infl = time.perf_counter() - start

    print(f"problem:   mnist5k logistic regression, n_train = {split.n_train}, d = 7840, L2 {args.l2}, float64, "
          f"{torch.get_num_threads()} threads")
    print(f"training:  {t_train:7.2f} s  (L-BFGS to ‖∇R‖ = {fitted.grad_norm:.1e}, "
          f"{len(fitted.history)} iterations)")
    print(f"influence: {t_infl:7.2f} s  ({args.n_test} test × {split.n_train} train, CG {est.solve.iterations} "
          f"iterations, max relative residual {float(est.solve.relative_residual.max()):.1e})")
    print(f"ratio:     influence / one training run = {t_infl / t_train:.2f}; leave-one-out retraining of every "
          f"point would be ≈ {split.n_train} training runs")


if __name__ == "__main__":
    main()
