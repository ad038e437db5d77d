"""Evaluation of inference rows: classification metrics, COCO detection metrics, token usage, and the
records every result carries. The runs themselves are ``nested_svit.inference``'s (re-exported here)."""
from ..inference import InferenceJob, run_inference
from .classification import classification_metrics

__all__ = ["InferenceJob", "run_inference", "classification_metrics"]
