"""Images and data sets on local disk: one resolver (``records``), one decoder (``decode``), the
classifiers' and detectors' input transforms, COCO-format detection data, training augmentation."""
from .dataset import ImageRecordDataset, open_dataset
from .records import Records, resolve_records
from .transforms import EvalTransform

__all__ = ["ImageRecordDataset", "open_dataset", "Records", "resolve_records", "EvalTransform"]
