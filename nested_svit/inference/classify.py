"""Classifier inference: the batch step (a prepared batch -> one row per image with the top-k classes,
their probabilities and the tokens each block kept; skipped images with their reason) and its counts."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import pandas as pd
import torch

from ..data.device_decode import DeviceJpegDecoder
from ..data.transforms import EvalTransform
from ..model import SparseViT
from .agreement import agreement, decisions_from, decisions_of


@dataclass
class ClassifierCounts:
    """What a classifier run counts: summed per batch, then over the processes (``Job.run``)."""

    images: int = 0  # predicted by this process in this run
    correct1: int = 0
    labelled: int = 0
    elapsed: float = 0.0
    seen: int = 0  # predicted or skipped
    capacity_reruns: int = 0  # batches whose capacity forward was too small, rerun (``--capacity``)
    retried: list[int] = field(default_factory=list)  # batches that took more attempts (``run_batches``)

    def add(self, other: "ClassifierCounts") -> None:
        self.images += other.images
        self.correct1 += other.correct1
        self.labelled += other.labelled
        self.seen += other.seen
        self.capacity_reruns += other.capacity_reruns


@dataclass
class ClassifierStep:
    """The classifier's ``BatchStep``. ``class_names``: the MODEL's output classes (not the data's
    folders); ``truth_names``: names of the data's labels; ``transform``: normalises the uint8 crops on
    the device (None: the batch's images are the model's input as they are); ``decoder``: ``--decode
    gpu`` (the batch's JPEGs arrive undecoded); ``on_batch(batch, images, usage, logits)``: pictures;
    ``valid_labels``: the classes the softmax and the top-k are taken over (``--valid-labels``; None:
    all), the ids staying the model's."""

    model: SparseViT | None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    topk: int = 5
    class_names: list[str] | None = None
    truth_names: list[str] | None = None
    exif: bool = False
    transform: EvalTransform | None = None
    decoder: DeviceJpegDecoder | None = None
    on_batch: Callable[..., None] | None = None
    valid_labels: tuple[int, ...] | None = None
    cuda_graphs: bool = False  # replay a CUDA graph of the forward per batch shape (``inference.graphs``)
    reference: SparseViT | None = None  # the same weights in fp32 (``--agreement-with``): agreement columns

    def _rotated(self, orientation) -> bool:
        """Whether this image was turned by its EXIF orientation: the run applies EXIF and the file had a
        tag other than 1 (normal)."""
        return bool(self.exif) and orientation is not None and orientation == orientation and int(orientation) != 1

    def counts(self) -> ClassifierCounts:
        return ClassifierCounts()

    def bind(self, model: SparseViT, device: torch.device, reference: SparseViT | None = None) -> "ClassifierStep":
        decoder = self.decoder and DeviceJpegDecoder(self.decoder.transform, device, self.decoder.exif,
                                                     self.decoder.max_pixels)
        return dataclasses.replace(self, model=model, device=torch.device(device), decoder=decoder, reference=reference)

    def detached(self) -> "ClassifierStep":
        return dataclasses.replace(self, model=None, on_batch=None, reference=None)

    def prepare(self, batch: dict) -> dict:
        """A loader batch -> the same with ``images`` the model's input on the device (decoded there
        with the decoder, normalised there with the transform)."""
        if self.decoder is not None:
            batch = self.decoder(batch)
        elif batch["images"] is not None:
            batch["images"] = batch["images"].to(self.device, non_blocking=True)
        if batch["images"] is not None:
            images, dtype = batch["images"], self.model.dtype
            batch["images"] = self.transform.normalize(images, dtype) if self.transform is not None else images.to(dtype)
            if self.reference is not None:  # the reference's own input, not a rounded copy of ours
                ref = self.reference.dtype
                batch["reference_images"] = self.transform.normalize(images, ref) if self.transform is not None \
                    else images.to(ref)
        return batch

    def run(self, batch: dict) -> tuple[pd.DataFrame, ClassifierCounts]:
        """A prepared batch (``images`` the model's input, or None) -> its rows and its counts."""
        logits = kept = None
        counts = ClassifierCounts(seen=len(batch["all_index"]))
        if batch["images"] is not None:
            reruns = self.model.capacity_reruns
            with torch.no_grad():  # not inference_mode: jagged tensors cannot be built from inference tensors
                if self.cuda_graphs:
                    from .graphs import graphed

                    logits, usage = graphed(self.model)(batch["images"])
                else:
                    feats, usage = self.model.forward_features(batch["images"], return_usage=True)
                    logits = self.model.forward_head(feats)
                logits = self.restricted(logits.cpu())
            counts.capacity_reruns = self.model.capacity_reruns - reruns
            if self.reference is not None:  # the reference's top-1 over the same (valid) classes
                ref = decisions_of(self.reference, batch["reference_images"])
                ref_logits = self.restricted(ref.logits)
                ref = dataclasses.replace(ref, logits=ref_logits, top1=ref_logits.argmax(-1))
                agreed = agreement(decisions_from(usage, logits), ref)
            kept = usage.kept_after_selection.cpu()
            if self.on_batch is not None:
                self.on_batch(batch, batch["images"], usage, logits)
            labels = batch["label"]
            has_label = labels >= 0
            counts.correct1 = int((logits.argmax(-1)[has_label] == labels[has_label]).sum())
            counts.labelled = int(has_label.sum())
            counts.images = len(labels)
        frame = self.rows(batch, logits, kept)
        if self.reference is not None and logits is not None:  # predicted rows come first, in batch order
            n = agreed.images
            columns = {"agree_tokens_equal": agreed.image_tokens_equal, "agree_tokens": agreed.image_tokens,
                       "agree_top1": agreed.image_top1_equal}
            for name, values in columns.items():
                frame[name] = pd.Series(values + [None] * (len(frame) - n), dtype="object")
        return frame, counts

    def restricted(self, logits: torch.Tensor) -> torch.Tensor:
        """``[B, K]`` logits with every class outside ``valid_labels`` at -inf (as they are without)."""
        if self.valid_labels is None:
            return logits
        out = torch.full_like(logits, float("-inf"))
        keep = torch.tensor(self.valid_labels)
        out[:, keep] = logits[:, keep]
        return out

    def rows(self, batch: dict, logits: torch.Tensor | None, kept: torch.Tensor | None) -> pd.DataFrame:
        """The output rows of one batch: predicted images, then the skipped ones with their reason.
        ``label_prob``: the probability of the image's label (None without one)."""
        names, truth, depth = self.class_names, self.truth_names, self.model.config.depth
        rows: list[dict] = []
        if logits is not None:
            probs = logits.float().softmax(-1)
            k = min(self.topk, len(self.valid_labels) if self.valid_labels else probs.shape[-1])
            top_p, top_i = probs.topk(k, dim=-1)
            for j, idx in enumerate(batch["index"].tolist()):
                label = int(batch["label"][j])
                row = {"index": idx, "id": batch["id"][j], "label": label, "status": "ok", "error": "",
                       "precision": getattr(self.model, "precision", "fp32"),
                       "orientation": batch["orientation"][j], "exif_applied": self._rotated(batch["orientation"][j]),
                       "decoder": batch["decoder"][j],
                       "label_name": truth[label] if truth and 0 <= label < len(truth) else None,
                       "label_prob": float(probs[j, label]) if 0 <= label < probs.shape[-1] else None}
                for r in range(k):
                    cls = int(top_i[j, r])
                    row[f"top{r + 1}_id"] = cls
                    row[f"top{r + 1}_prob"] = float(top_p[j, r])
                    if names:
                        row[f"top{r + 1}_name"] = names[cls] if cls < len(names) else None
                row.update({f"kept_b{b}": int(kept[j, b]) for b in range(depth)})
                rows.append(row)
        for idx, image_id, label, error in batch["failed"]:
            rows.append({"index": idx, "id": image_id, "label": label, "status": "skipped", "error": error})
        return pd.DataFrame(rows)
