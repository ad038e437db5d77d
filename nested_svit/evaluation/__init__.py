"""Evaluation of inference rows: ImageNet-style test sets (``evaluate_set``), COCO detection and
instance segmentation (``evaluate_coco``), classification metrics, token usage, and the records every
result carries. The runs themselves are ``nested_svit.inference``'s jobs."""
from .classification import classification_metrics
from .detection import coco_metrics, coco_results, evaluate_coco
from .imagenet import SetFiles, evaluate_set, write_results

__all__ = ["evaluate_set", "evaluate_coco", "SetFiles", "write_results", "classification_metrics", "coco_metrics",
           "coco_results"]
