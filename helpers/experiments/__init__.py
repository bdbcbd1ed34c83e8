"""One module per chapter: orchestration only (engine calls composed into tidy frames, records and figures).

Each module's docstring names its chapter. None defines an optimiser, a Hessian or a solver: those live in the
engine (:mod:`helpers.train`, :mod:`helpers.curvature`, :mod:`helpers.solvers`, :mod:`helpers.influence`,
:mod:`helpers.retrain` and their backends).
"""
