"""Classifier training data: a labelled image data set (``data.open_dataset``) as ``(PIL image, label)``
items, and the training augmentation (DeiT's RandomResizedCrop + flip, without RandAugment/mixup)."""
from __future__ import annotations

from typing import Callable

from torch import Tensor

from ..data.dataset import ImageRecordDataset
from ..data.decode import BadImage
from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD


class LabelledImages:
    """``(decoded RGB PIL image, label)`` of the labelled records of ``dataset``; an unreadable image is
    ``(None, label)``, skipped and counted by the trainer. ``unlabelled``: files outside class folders,
    left out."""

    def __init__(self, dataset: ImageRecordDataset, source: str = "the data"):
        labels = dataset.records.labels
        if not labels or max(labels) < 0:
            raise ValueError(f"{source}: training needs labelled images (ImageFolder tree or a data set with 'label')")
        self.dataset = dataset
        self.positions = [i for i, lab in enumerate(labels) if lab >= 0]
        self.unlabelled = len(labels) - len(self.positions)

    @property
    def num_classes(self) -> int:
        return max(self.dataset.records.labels) + 1

    def record(self, path: str) -> dict:
        """What a training checkpoint records of its data: the path given, a content digest, the count."""
        from ..data.records import content_digest

        return {"path": str(path), "digest": content_digest(self.dataset.records), "images": len(self)}

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, index: int):
        position = self.positions[index]
        label = self.dataset.records.labels[position]
        try:
            return self.dataset.image(position), label
        except BadImage:
            return None, label


def train_augment(img_size: int) -> Callable[[object], Tensor]:
    """PIL image -> normalised ``[3, img_size, img_size]``: RandomResizedCrop (bicubic), flip."""
    from torchvision import transforms as T

    return T.Compose([T.RandomResizedCrop(img_size, interpolation=T.InterpolationMode.BICUBIC),
                      T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
