"""Data: sources, stratified splits and corruption with ground truth."""

from cleanse.data.dataset import DatasetMeta, Split, StagedData

__all__ = ["DatasetMeta", "Split", "StagedData"]
