"""Prefect flows (application code at the repo root; the library is :mod:`cleanse`)."""
