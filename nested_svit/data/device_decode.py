"""``--decode gpu``: a batch's JPEGs decoded together on the model's device, then oriented, resized and
center-cropped there, so the loader's workers only read bytes.

The workers send each file's bytes when ``decode.jpeg_for_device`` accepts it (a complete YCbCr or
grayscale JPEG) and decode everything else with Pillow as the CPU path does (CMYK, PNG, ...). Here the
accepted bytes go to one batched ``torchvision.io.decode_jpeg`` call: nvjpeg on CUDA, torchvision's
libjpeg-turbo decoder elsewhere (the same code path, so the CPU tests run it). A batch the decoder
refuses is retried file by file, and a file it still refuses takes Pillow's path, which decodes it or
gives the reason it is skipped. Each row records its decoder. Pixels: libjpeg-turbo's decode equals
Pillow's; torch's antialiased resize is within 2-3 grey levels of Pillow's (0.2 on average) (tests/test_input_pipeline.py);
nvjpeg's IDCT differs from libjpeg-turbo's by a grey level or two.
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor

from ..devices import is_real_cuda
from .decode import BadImage, TooLarge, decode_image
from .transforms import EvalTransform


def orient(image: Tensor, orientation: int) -> Tensor:
    """uint8 ``[C, H, W]`` stored with EXIF ``orientation`` (1..8) -> upright, as ``ImageOps.exif_transpose``."""
    if orientation == 2:
        return image.flip(-1)
    if orientation == 3:
        return image.flip(-2, -1)
    if orientation == 4:
        return image.flip(-2)
    if orientation == 5:
        return image.transpose(-2, -1)
    if orientation == 6:
        return torch.rot90(image, -1, dims=(-2, -1))
    if orientation == 7:
        return image.transpose(-2, -1).flip(-2, -1)
    if orientation == 8:
        return torch.rot90(image, 1, dims=(-2, -1))
    return image


def _decode_jpeg(data, device: torch.device):
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders in favour of torchcodec
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)


class DeviceJpegDecoder:
    """Finishes a batch of ``collate_records``: its ``encoded`` JPEGs decoded on ``device`` and cropped by
    ``transform.crop_tensor``; ``images`` becomes uint8 ``[b, 3, S, S]`` on ``device`` (Pillow-decoded
    images first), with ``index`` / ``label`` / ``id`` / ``decoder`` in the same order."""

    def __init__(self, transform: EvalTransform, device: torch.device | str, exif: bool,
                 max_pixels: int | None = None):
        self.transform, self.device, self.exif, self.max_pixels = transform, torch.device(device), exif, max_pixels
        self.decode_on = self.device if is_real_cuda(self.device) else torch.device("cpu")

    @property
    def name(self) -> str:
        return "nvjpeg" if self.decode_on.type == "cuda" else "libjpeg-turbo (torchvision)"

    def _decoded(self, datas: list[Tensor]) -> list[Tensor | None]:
        try:
            return list(_decode_jpeg(datas, self.decode_on))
        except RuntimeError:  # no partial results: find the file(s) it refuses
            out: list[Tensor | None] = []
            for data in datas:
                try:
                    out.append(_decode_jpeg(data, self.decode_on))
                except RuntimeError:
                    out.append(None)
            return out

    def __call__(self, batch: dict) -> dict:
        encoded = batch.pop("encoded", [])
        images = [] if batch["images"] is None else [batch["images"].to(self.device, non_blocking=True)]
        index, label = batch["index"].tolist(), batch["label"].tolist()
        crops = []
        for item, image in zip(encoded, self._decoded([e["data"] for e in encoded]) if encoded else []):
            if image is not None:
                crop, decoder = self.transform.crop_tensor(orient(image.to(self.device), item["orientation"])), self.name
            else:
                try:
                    pil = decode_image(item["data"].numpy().tobytes(), self.max_pixels, self.exif)
                except TooLarge as e:
                    batch["failed"].append((item["index"], item["id"], item["label"], str(e)))
                    continue
                except BadImage as e:
                    batch["failed"].append((item["index"], item["id"], item["label"], f"cannot decode image: {e}"))
                    continue
                crop, decoder = self.transform.crop(pil).to(self.device, non_blocking=True), "pil"
            crops.append(crop)
            index.append(item["index"])
            label.append(item["label"])
            batch["id"].append(item["id"])
            batch["decoder"].append(decoder)
            batch["orientation"].append(item.get("found"))
        if crops:
            images.append(torch.stack(crops))
        batch["images"] = torch.cat(images) if images else None
        batch["index"] = torch.tensor(index, dtype=torch.int64)
        batch["label"] = torch.tensor(label, dtype=torch.int64)
        return batch
