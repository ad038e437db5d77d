"""Image data sets on local disk: ImageFolder trees, Hugging Face parquet / Arrow folders."""
from .folder import ImageRecordDataset, open_dataset
from .transforms import EvalTransform

__all__ = ["ImageRecordDataset", "open_dataset", "EvalTransform"]
