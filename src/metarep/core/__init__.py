"""The paper in numpy: the problem and its tasks, the linear model, the methods, the exact
infinite-task dynamics, Monte Carlo, theory, measures, evaluation and seeding.

Nothing here reads a config, touches a file, draws a figure or imports torch; bad arguments
raise :class:`~metarep.errors.ArgumentError` naming the function's own argument.
:mod:`metarep.core.reference` holds the spec's equations as plain per-task loops, the one
reference every fast kernel is tested against.
"""
