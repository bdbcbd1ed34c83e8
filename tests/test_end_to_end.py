"""The whole pipeline on a convex problem: train -> influence -> leave-one-out retraining -> metrics.

Issue 3's acceptance check with the package's own pieces (no hand-written solver): L2 logistic regression
trained by Newton to a gradient norm < 1e-10, the estimate for *every* training point against actual
warm-started leave-one-out retraining to the same tolerance, and the drift run.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import data, metrics, models, retrain, train
from helpers.influence import predict_removal
from helpers.objective import model_params, per_sample_losses


@pytest.mark.parametrize("loo", ["drop", "reaverage"])
def test_logistic_regression_influence_matches_retraining_on_all_points(loo: str) -> None:
    split = data.load("iris", seed=3, n_train=120, n_test=30)
    l2, tol = 0.01, 1e-12
    model = models.build("logreg", d_in=split.x_train.shape[1], n_classes=split.n_classes, seed=0,
                         dtype=torch.float64)
    recipe = train.Recipe(optimizer="newton", weight_decay=l2, tol=tol, max_iter=100)
    fitted = train.fit(recipe, model, *split.train, progress=False)
    assert fitted.grad_norm < 1e-10
    model = train.model_with(model, fitted.params)

    losses = per_sample_losses(model, model_params(model), *split.test)
    worst = torch.argsort(losses, descending=True)[:3]
    test = (split.x_test[worst], split.y_test[worst])
    pred = predict_removal(model, split.train, test, l2=l2).values.numpy()
    truth = retrain.warm_start(model, fitted.params, split.train, test, range(split.n_train), recipe, loo=loo,
                               progress=False, cache=False)
    assert np.max(truth.grad_norm) < 1e-10
    assert np.abs(truth.drift).max() < 1e-12  # retraining with nothing removed does not move
    actual = truth.delta if loo == "drop" else truth.delta_minus_drift
    for t in range(3):
        assert metrics.pearson(pred[t], actual[t]) >= 0.99
        assert metrics.spearman(pred[t], actual[t]) >= 0.99
    if loo == "reaverage":
        # Re-averaging over n-1 points strengthens the L2 term a little: every delta shifts by nearly the
        # same offset, so correlations survive but the relative error is worse than with "drop".
        drop = retrain.warm_start(model, fitted.params, split.train, test, range(split.n_train), recipe,
                                  loo="drop", progress=False, cache=False)
        assert metrics.relative_error(pred[0], drop.delta[0]) < metrics.relative_error(pred[0], truth.delta[0])


def test_wrong_sign_convention_would_fail() -> None:
    """The acceptance check can fail: flipping the sign of the estimate destroys the agreement."""
    split = data.load("iris", seed=0, n_train=120, n_test=30)
    model = models.build("logreg", d_in=4, n_classes=3, seed=0, dtype=torch.float64)
    recipe = train.Recipe(optimizer="newton", weight_decay=0.01, tol=1e-12)
    fitted = train.fit(recipe, model, *split.train, progress=False)
    model = train.model_with(model, fitted.params)
    t = int(per_sample_losses(model, model_params(model), *split.test).argmax())
    test = (split.x_test[t : t + 1], split.y_test[t : t + 1])
    pred = predict_removal(model, split.train, test, l2=0.01).values[0].numpy()
    truth = retrain.warm_start(model, fitted.params, split.train, test, range(120), recipe, progress=False,
                               cache=False)
    assert metrics.pearson(pred, truth.delta[0]) > 0.99
    assert metrics.pearson(-pred, truth.delta[0]) < -0.99
