"""Estimators: one module each, one line each in :mod:`cleanse.estimators.registry`."""
