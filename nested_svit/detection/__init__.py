"""COCO detection and instance segmentation: (S)ViT-Adapter Mask R-CNN on ragged mixed-size batches."""
from .adapter import ViTAdapter
from .config import DetectorConfig
from .detector import Detections, MaskRCNNDetector
from .preprocess import ImageMeta, preprocess, read_image
from .registry import create_detector, list_detectors

__all__ = ["create_detector", "list_detectors", "MaskRCNNDetector", "Detections", "DetectorConfig", "ViTAdapter",
           "ImageMeta", "preprocess", "read_image"]
