"""cleanse: find the training data that hurts a model, remove it, retrain, and prove the effect.

The library is framework-free (arrays and tables in, tables out); Prefect, DVC and MLflow are thin
shells around :mod:`cleanse.pipeline`.
"""

__version__ = "0.1.0"
