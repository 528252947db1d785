"""The torch engine: model-agnostic meta-learning of any ``torch.nn.Module`` with
``torch.func`` (:mod:`~metarep.engine.learner`: ANIL and MAML, exact or first order, MTL,
test-time adaptation) and the networks of the study (:mod:`~metarep.engine.networks`).

This package file imports nothing (no torch), so its names serve the config schema too.
"""

DEVICES = ("cpu", "cuda", "auto")
"""Where the engine computes: ``cuda`` (an error without a GPU), ``auto`` (cuda when present)
or ``cpu``."""
