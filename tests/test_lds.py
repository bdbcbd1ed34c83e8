"""The linear datamodeling score (helpers.metrics.lds, helpers.retrain.on_subsets), validated on logistic regression.

Multinomial logistic regression with an L2 term, trained by Newton to ‖∇R‖ < 1e-10: the convex case where a
linear datamodel of the test loss is accurate, because removing a subset moves θ̂ by nearly the sum of the
single-point Newton steps. The LDS of exact influence is then close to 1 — not exactly 1, because the response
to removing many points at once has second-order terms (the Hessian itself changes with the subset), which shrink
as the subsets grow: it must be higher at α = 0.9 than at α = 0.5. Random scores must give an LDS whose interval
holds 0. The subset models are checked against single fits on the subset.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import metrics, models, retrain, train
from helpers.influence import predict_removal
from helpers.objective import per_sample_losses

F64 = torch.float64


@pytest.fixture(scope="module")
def logreg():
    g = torch.Generator().manual_seed(0)
    n, d, c = 200, 5, 3
    w = torch.randn(d, c, generator=g, dtype=F64)
    x = torch.randn(n, d, generator=g, dtype=F64)
    y = torch.distributions.Categorical(logits=x @ w).sample()
    xt = torch.randn(20, d, generator=g, dtype=F64)
    yt = torch.distributions.Categorical(logits=xt @ w).sample()
    recipe = train.Recipe(optimizer="newton", tol=1e-10, max_iter=50, weight_decay=1e-2)
    model = models.build("logistic_regression", d_in=d, n_classes=c, dtype=F64)
    model = train.model_with(model, train.fit(recipe, model, x, y, progress=False).params)
    exact = predict_removal(model, (x, y), (xt, yt), l2=1e-2).values
    runs = {a: retrain.on_subsets(model, (x, y), (xt, yt), metrics.random_subsets(n, a, 60, seed=1), recipe,
                                  seeds=[0], progress=False, cache=False) for a in (0.5, 0.9)}
    return {"model": model, "x": x, "y": y, "xt": xt, "yt": yt, "recipe": recipe, "exact": exact, "runs": runs}


def test_subset_models_are_fits_on_the_subset(logreg):
    run = logreg["runs"][0.5]
    assert run.grad_norm.max() < 1e-9
    j = 7
    mask = torch.from_numpy(run.masks[j])
    weights = mask.to(F64) / mask.sum()
    single = train.fit(logreg["recipe"], models.build("logistic_regression", d_in=5, n_classes=3, dtype=F64),
                       logreg["x"], logreg["y"], weights=weights, progress=False)
    model = train.model_with(logreg["model"], single.params)
    losses = per_sample_losses(model, dict(model.named_parameters()), logreg["xt"], logreg["yt"]).detach()
    assert np.allclose(run.test_losses[0, j], losses.numpy(), rtol=0, atol=1e-9)


def test_lds_of_exact_influence_on_logistic_regression(logreg):
    scores = {a: metrics.lds(logreg["exact"], r.masks, r.mean_losses) for a, r in logreg["runs"].items()}
    assert scores[0.5].shape == (20,)
    assert scores[0.5].mean() > 0.9 and scores[0.9].mean() > 0.97, {a: s.mean() for a, s in scores.items()}
    assert scores[0.9].mean() > scores[0.5].mean()  # smaller removals: closer to linear
    rng = torch.Generator().manual_seed(5)
    noise = metrics.lds(torch.randn(logreg["exact"].shape, generator=rng, dtype=F64), logreg["runs"][0.5].masks,
                        logreg["runs"][0.5].mean_losses)
    half = 1.96 * noise.std(ddof=1) / np.sqrt(len(noise))
    assert abs(noise.mean()) < half + 0.05, noise.mean()


def test_the_sign_convention_of_the_lds(logreg):
    """Flipping the sign of the scores flips the LDS: a convention slip cannot hide."""
    r = logreg["runs"][0.9]
    assert np.allclose(metrics.lds(-logreg["exact"], r.masks, r.mean_losses),
                       -metrics.lds(logreg["exact"], r.masks, r.mean_losses))


def test_refusals():
    with pytest.raises(ValueError, match="alpha must lie in"):
        metrics.random_subsets(10, 1.0, 5)
    with pytest.raises(ValueError, match="shapes must be"):
        metrics.lds(np.zeros((2, 5)), np.zeros((4, 5), dtype=bool), np.zeros((4, 3)))
    with pytest.raises(ValueError, match="at least 3 subsets"):
        metrics.lds(np.zeros((2, 5)), np.zeros((2, 5), dtype=bool), np.zeros((2, 2)))
