"""Labels of an ImageFolder tree's records from their class folders: the folder of each record, relabelled
by a model's class names or by ImageNet-V2's index folders."""
from __future__ import annotations

from pathlib import Path

from .records import Records


def class_folders(records: Records) -> list[str | None]:
    """Each record's class folder: the first part of its id (``<class>/<image>``), None for a file at the
    top of the tree; for an object store input, of its key below the listed prefix."""
    return [Path(i).parts[0] if len(Path(i).parts) > 1 else None for i in (records.keys or records.ids)]


def relabel_by_names(records: Records, names: list[str], ignore_unknown: bool = False) -> list[str]:
    """An ImageFolder tree labelled by a model's class names: the images of folder ``X`` get the index of
    ``X`` in ``names`` (``label_source`` ``model_class_names``); a folder that is not among them is a
    ValueError, or with ``ignore_unknown`` its images get no label (-1). Files at the top of the tree
    keep no label. -> the folders not among ``names`` (in place on ``records``)."""
    index = {n: i for i, n in enumerate(names)}
    folders = class_folders(records)
    unknown = sorted({f for f in folders if f is not None and f not in index})
    if unknown and not ignore_unknown:
        shown = ", ".join(repr(n) for n in list(names)[:6]) + (" ..." if len(names) > 6 else "")
        raise ValueError(f"class folder(s) {', '.join(unknown[:6])}{' ...' if len(unknown) > 6 else ''} are not among the "
                         f"model's {len(names)} class names ({shown}): name the folders by the model's classes, or "
                         "pass --ignore-unknown-classes to score only the folders that are")
    records.labels = [index.get(f, -1) if f is not None else -1 for f in folders]
    records.class_names = list(names)
    records.label_source = "model_class_names"
    return unknown


def relabel_by_folder_index(records: Records, num_classes: int, names: list[str] | None) -> bool:
    """ImageNet-V2's layout (class folders ``0`` ... ``999``): when every class folder of an ImageFolder
    tree is a class index below ``num_classes`` (``testset_labels.index_folder_labels``), its images get that
    index (``label_source`` ``folder_index``; the names of the labels: the model's ``names``, else the
    index itself), in place; -> whether they did (mixed or out-of-range folder names: False, the labels
    stay as they are)."""
    from .testset_labels import index_folder_labels

    folders = class_folders(records)
    index = index_folder_labels(sorted({f for f in folders if f is not None}), num_classes)
    if records.kind != "imagefolder" or index is None:
        return False
    records.labels = [index[f] if f is not None else -1 for f in folders]
    records.class_names = list(names) if names else [str(i) for i in range(num_classes)]
    records.label_source = "folder_index"
    return True
