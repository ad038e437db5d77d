"""What a classifier's rows are labelled with: the names of the model's outputs (``output_names``) and
the data's labels matched to them, with the lines a user must read about them (``label_messages``)."""
from __future__ import annotations

from pathlib import Path


def output_names(model, given: list[str] | None) -> tuple[list[str] | None, str | None]:
    """Names of a classifier's outputs and where they come from: ``given`` (``--class-names``, checked
    against its class count), else those it carries (``checkpoint``: a ``train`` file's), else
    ImageNet's for a 1000-class model (``imagenet``), else none (ids only). Never the data's folders."""
    from ..data.classes import imagenet_classes

    k = model.config.num_classes
    if given:
        if len(given) != k:
            raise ValueError(f"--class-names lists {len(given)} names, the model has {k} classes")
        return list(given), "--class-names"
    carried = getattr(model, "class_names", None)
    if carried:
        return list(carried), "checkpoint"
    return (list(imagenet_classes()[1]), "imagenet") if k == 1000 else (None, None)


def label_messages(records, path: str, ignore_unknown: bool, names: list[str] | None, named_by: str | None,
                   num_classes: int, scored: bool = True) -> list[str]:
    """Label an ImageFolder tree by the model's own class names (``--class-names`` or the checkpoint's;
    in place on ``records``), or by the folder numbers when every class folder is a class index (ImageNet-V2's
    ``0`` ... ``999``), and say what a user must know about the labels: the folders left
    unlabelled, sorted-order labels of a model without names, files outside the class folders."""
    from ..data.classes import imagenet_classes
    from ..data.labels import class_folders, relabel_by_folder_index, relabel_by_names

    out = []
    wnids_right = records.label_source == "imagenet_wnid" and list(names or ()) == list(imagenet_classes()[1])
    if records.kind == "imagefolder" and named_by in ("--class-names", "checkpoint") and not wnids_right:
        unknown = relabel_by_names(records, names, ignore_unknown)
        if unknown:
            out.append(f"note: {path}: folders {', '.join(unknown[:8])}{' ...' if len(unknown) > 8 else ''} are not "
                       f"among the model's class names ({named_by}): their images get no label and are not scored")
    elif records.label_source == "sorted_class_dirs" and not relabel_by_folder_index(records, num_classes, names):
        folders = sorted(set(class_folders(records)) - {None})
        what = ("class folders are not (all) ImageNet wnids, so labels are the sorted folder order 0..K-1, not "
                "ImageNet's class ids: top-1/top-5 against a 1000-class model are meaningless. Name folders by wnid "
                "(n01440764, ...) or use a model trained on these classes." if num_classes == 1000 else
                f"the model has no class names to match the folders with, so labels are the sorted folder order "
                f"({', '.join(f'{i}: {f}' for i, f in enumerate(folders[:5]))}{' ...' if len(folders) > 5 else ''}): "
                "right only if the model was trained on exactly these folders. Give --class-names FILE (the model's "
                "classes, one a line, in its output order) to label by name.")
        out.append(f"WARNING: {path}: {what}")
    beyond = sorted({lab for lab in records.labels if lab >= num_classes})
    if beyond:  # scored, they would all count as wrong: refused (eval), or left unlabelled, loudly (predict)
        what = (f"{path}: its labels ({records.label_source}) include class ids "
                f"{', '.join(map(str, beyond[:5]))}{' ...' if len(beyond) > 5 else ''}, which a model of {num_classes} "
                "classes cannot output. Give --class-names FILE (the model's classes, one a line, in its output order: "
                "e.g. the wnids it was fine-tuned on) to label the folders by name")
        if scored:
            raise ValueError(what)
        records.labels = [lab if lab < num_classes else -1 for lab in records.labels]
        out.append(f"WARNING: {what}; their images get no label here")
    loose = sum(1 for i, lab in zip(records.ids, records.labels) if lab < 0 and len(Path(i).parts) == 1)
    if records.kind == "imagefolder" and loose:
        folders = len(set(class_folders(records)) - {None})
        out.append(f"note: {path} holds {loose} images at its top, outside its {folders} class folder(s): they "
                   "are predicted but have no label, so top-1/top-5 count only the images in class folders")
    return out
