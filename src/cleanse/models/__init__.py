"""Architectures and the one trainer every stage uses."""

from cleanse.models.architectures import ModelSpec, build_model
from cleanse.models.trainer import TrainedModel, predict_proba, train_model

__all__ = ["ModelSpec", "TrainedModel", "build_model", "predict_proba", "train_model"]
