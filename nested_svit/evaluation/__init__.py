"""Evaluation and offline prediction: sharded, resumable inference over image data sets."""
from .classification import classification_metrics
from .runner import InferenceJob, run_inference

__all__ = ["InferenceJob", "run_inference", "classification_metrics"]
