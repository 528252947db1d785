"""The torch engine: model-agnostic meta-learning of any ``torch.nn.Module`` with
``torch.func`` (:mod:`~metarep.engine.learner`: ANIL and MAML, exact or first order, MTL,
test-time adaptation) and the networks of the study (:mod:`~metarep.engine.networks`).
"""
