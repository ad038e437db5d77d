"""COCO detection and instance segmentation: (S)ViT-Adapter Mask R-CNN on ragged mixed-size batches."""
from ..data.det_transforms import ImageMeta, preprocess, read_image
from . import checkpoint as _checkpoint  # noqa: F401 (registers the detector's load_checkpoint)
from .adapter import ViTAdapter
from .config import DetectorConfig
from .detector import Detections, MaskRCNNDetector
from .registry import create_detector, list_detectors

detector_losses = MaskRCNNDetector.losses  # ``detector_losses(detector, inputs, targets)``

__all__ = ["create_detector", "list_detectors", "MaskRCNNDetector", "Detections", "DetectorConfig", "ViTAdapter",
           "ImageMeta", "preprocess", "read_image", "detector_losses"]
