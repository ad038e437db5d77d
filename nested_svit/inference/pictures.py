"""The pictures a run draws beside its rows (``predict --save-vis DIR``), one PNG per predicted image,
named by ``picture_names``: a classifier's crop as the model saw it (un-normalised with the model's own
transform) with the tokens each selection kept; a detector's image with its boxes, masks and kept
tokens. The folder is marked so that it is never read back as input."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch


def picture_names(ids: list[str]) -> dict[str, str]:
    """One PNG file name per input id, never two the same: the id's path with ``/`` as ``__`` and its
    suffix replaced by ``.png``; ids that would share a name (``a.jpg`` / ``a.png``, ``sub/x.jpg`` /
    ``sub__x.jpg``) keep their suffix and, if still shared, get their position in the input."""
    def base(i: str, keep_suffix: bool) -> str:
        p = Path(str(i))
        stem = p.as_posix() if keep_suffix else p.with_suffix("").as_posix()
        return stem.replace("/", "__") + ".png"

    names = {i: base(i, False) for i in ids}
    counts: dict[str, int] = {}
    for n in names.values():
        counts[n] = counts.get(n, 0) + 1
    names = {i: (base(i, True) if counts[n] > 1 else n) for i, n in names.items()}
    seen: dict[str, int] = {}
    for n in names.values():
        seen[n] = seen.get(n, 0) + 1
    return {i: (n if seen[n] == 1 else n[:-4] + f".{k}.png") for k, (i, n) in enumerate(names.items())}


def classifier_pictures(folder: Path, model, names: dict[str, str], class_names: list[str] | None,
                        transform) -> Callable[..., None]:
    """The classifier step's ``on_batch``: one PNG per predicted image, the crop the model saw (``transform``
    undone: its mean and std; None: the images are the model's input as they are), its top-1 class and
    probability, and the tokens each gate (each selection stage of a baseline) kept, named by block."""
    from ..data.records import PICTURES_MARKER, mark_output_folder
    from ..io import atomic_write
    from ..viz import token_usage_picture

    mark_output_folder(folder, PICTURES_MARKER)  # never read back as input
    mean = torch.tensor(transform.mean if transform is not None else (0.0,) * 3).view(3, 1, 1)
    std = torch.tensor(transform.std if transform is not None else (1.0,) * 3).view(3, 1, 1)

    def write(batch: dict, images, usage, logits) -> None:
        b, _, h, w = images.shape
        gh, gw = h // model.config.patch_size, w // model.config.patch_size
        prefix = 1 if model.cls_token is not None else 0
        # per stage the patch rows kept (virtual rows, e.g. EViT's fused tokens, come after the patches)
        masks = [m.bool().view(b, -1)[:, prefix:prefix + gh * gw].reshape(b, gh, gw).cpu() for m in usage.masks]
        blocks = usage.gate_blocks if len(usage.gate_blocks) == len(masks) else range(len(masks))
        probs, top = logits.float().softmax(-1).max(-1)
        for j, name in enumerate(batch["id"]):
            rgb = ((images[j].float().cpu() * std + mean).clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
            keep = torch.stack([m[j] for m in masks]) if masks else torch.zeros(0, gh, gw, dtype=torch.bool)
            cls = int(top[j])
            label = class_names[cls] if class_names and cls < len(class_names) else f"class {cls}"
            picture = token_usage_picture(rgb, keep, scale=max(1, 256 // max(h, w)), blocks=blocks,
                                          caption=f"predicted: {label} ({float(probs[j]):.1%})")
            atomic_write(folder / names[name], lambda tmp: picture.save(tmp, format="PNG"))

    return write


def detector_pictures(folder: Path, dataset, names: dict[str, str], score_thr: float) -> Callable[..., None]:
    """The detector step's ``on_batch``: one PNG per detected image, its boxes and masks scored at least
    ``score_thr``, and the tokens each block kept."""
    from ..data.records import PICTURES_MARKER, mark_output_folder
    from ..detection.vis import save_picture

    mark_output_folder(folder, PICTURES_MARKER)  # never read back as input

    def write(batch: dict, detections) -> None:
        for index, name, d in zip(batch["index"], batch["id"], detections):
            save_picture(dataset.decoded(index), d, folder / names[name], score_thr)

    return write


def picture_column(names: dict[str, str]) -> Callable:
    """``columns`` for ``PartStore.finish``: each predicted row's picture file name (skipped: None)."""
    def add(rows):
        rows["picture"] = [names[i] if ok == "ok" else None for i, ok in zip(rows["id"], rows["status"])]
        return rows

    return add
