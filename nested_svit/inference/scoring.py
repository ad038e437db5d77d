"""How a classifier run scores a test set beyond its folder labels, checked against the model and the
data before any image is read: ``valid_labels`` (the logits restricted to those classes before the
softmax and the top-k, as ImageNet-A/-R's authors and timm's ``--valid-labels`` do) and ``real_labels``
(ReaL's valid classes per val file, matched by file name)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..data.labels import class_folders
from ..data.records import Records
from ..data.testset_labels import NAMED_SUBSETS, matching_subset, read_real_labels, real_name, valid_labels


@dataclass(frozen=True)
class Scoring:
    """``valid_labels``: ``imagenet-a``, ``imagenet-r`` or a text file of class indices (None: all the
    model's classes); ``real_labels``: a ReaL ``real.json`` (None: no ReaL metrics)."""

    valid_labels: str | None = None
    real_labels: str | None = None


@dataclass(frozen=True)
class ResolvedScoring:
    """``valid``: sorted class indices the top-k is taken over (None: all); ``real``: {file name: valid
    classes} of ReaL (None: none)."""

    valid: tuple[int, ...] | None = None
    valid_name: str | None = None
    real: dict[str, tuple[int, ...]] | None = None
    real_path: str | None = None

    def describe(self) -> dict:
        """What a result records: the set's ``valid_labels`` (name or file, and the class count) and
        ``real_labels`` file."""
        return {"valid_labels": self.valid_name, "num_valid_labels": len(self.valid) if self.valid else None,
                "real_labels": self.real_path}


def resolve_scoring(scoring: Scoring, num_classes: int, records: Records, source: str
                    ) -> tuple[ResolvedScoring, list[str]]:
    """``scoring`` checked against a model of ``num_classes`` and the input's ``records`` -> (resolved,
    the lines a user should read). One-line ValueErrors: an unknown named set, an index outside the
    model's classes, ReaL for a model that is not ImageNet-1k's, a ``real.json`` that names no file."""
    messages = []
    valid = valid_labels(scoring.valid_labels, num_classes) if scoring.valid_labels else None
    folders = set(class_folders(records)) - {None} if records.kind == "imagefolder" else set()
    subset = matching_subset(folders) if num_classes == 1000 else None
    if subset and valid is None:
        messages.append(f"note: {source}: its class folders are exactly {subset}'s 200 classes; its authors score "
                        f"the top-k over those 200 logits only: add --valid-labels {subset} for that figure (this "
                        "run takes it over all 1000)")
    real = None
    if scoring.real_labels:
        if num_classes != 1000:
            raise ValueError(f"--real-labels {scoring.real_labels}: ReaL labels are ImageNet-1k class indices, the "
                             f"model has {num_classes} classes")
        real = read_real_labels(scoring.real_labels)
        if not any(real_name(i) in real for i in records.ids):
            raise ValueError(f"--real-labels {scoring.real_labels}: no file of {source} is named as the ReaL labels "
                             f"name val images ({Path(records.ids[0]).name} here; ReaL's are ILSVRC2012_val_00000001.JPEG"
                             " ... ILSVRC2012_val_00050000.JPEG)")
    name = scoring.valid_labels if scoring.valid_labels in NAMED_SUBSETS or not scoring.valid_labels \
        else str(Path(scoring.valid_labels).resolve())
    return ResolvedScoring(valid, name, real, str(Path(scoring.real_labels).resolve()) if real else None), messages
