"""helpers: the influence engine behind the book *Influence functions on trial*.

Data flows one way (DESIGN.md):

    data -> models -> train -> curvature / solvers -> influence -> retrain -> metrics -> plots

One convention everywhere (STUDY.md §1): influence values are the *predicted change in test loss when a
training point is removed*, in loss units, shaped ``[n_test, n_train]``; positive means the point helped.

Submodules are imported lazily (``helpers.influence`` etc.) so that ``import helpers`` stays cheap.
"""

__version__ = "0.1.0"
