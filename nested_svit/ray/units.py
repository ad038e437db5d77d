"""Work units (one per global batch of the local job) and the CPU stage that reads and decodes one.

A unit carries its images' global indices and, for file inputs, their paths, labels and ids; for
Hugging Face data sets (memory-mapped Arrow, pickled by file reference) the data set travels with the
template instead. ``decode_unit`` builds the batch with the local data set and collate code."""
from __future__ import annotations

import copy
import pickle
from pathlib import Path

import pandas as pd

from ..data.records import Records
from ..io import atomic_write
from .ledger import begin


def template_of(dataset):
    """``dataset`` without its file lists (they travel per unit), or whole for data sets of Arrow rows."""
    if not isinstance(dataset.records.sources, list):
        return dataset
    template = copy.copy(dataset)
    template.records = None
    return template


def work_units(dataset, batches: list[list[int]], batch_size: int) -> list[dict]:
    """One unit per pending global batch: ``batch`` (its id) and ``index`` (its images), plus the paths,
    labels, ids and COCO ids of file inputs."""
    records = dataset.records
    by_path = isinstance(records.sources, list)
    units = []
    for indices in batches:
        unit = {"batch": indices[0] // batch_size, "index": indices}
        if by_path:
            unit.update(uri=[records.sources[i] for i in indices], label=[records.labels[i] for i in indices],
                        id=[records.ids[i] for i in indices],
                        image_id=[records.image_ids[i] for i in indices] if records.image_ids else None)
        units.append(unit)
    return units


def write_image_table(path: Path, dataset, batch_size: int) -> None:
    """The run's images, one row each: ``row_id`` (the local order), ``uri``, ``batch``."""
    records = dataset.records
    n = len(records)
    uris = records.sources if isinstance(records.sources, list) else [f"{records.kind}#{records.ids[i]}"
                                                                       for i in range(n)]
    frame = pd.DataFrame({"row_id": range(n), "uri": [str(u) for u in uris], "batch": [i // batch_size for i in range(n)]})
    atomic_write(path, lambda tmp: frame.to_parquet(tmp, index=False))


def decode_unit(unit: dict, template, ledger=None) -> dict:
    """A unit -> ``{"batch", "payload"}``: the pickled batch exactly as the local loader's workers make it
    (the data set's own ``collate``); its start counted in the run's ``ledger``."""
    begin(ledger, "decode", int(unit["batch"]))
    dataset = template
    positions = unit["index"]
    if template.records is None:
        dataset = copy.copy(template)
        dataset.records = Records(sources=list(unit["uri"]), labels=list(unit["label"]), ids=list(unit["id"]),
                                  class_names=None, kind="files",
                                  image_ids=list(unit["image_id"]) if unit.get("image_id") is not None else None)
        positions = range(len(unit["index"]))
    items = []
    for position, index in zip(positions, unit["index"]):
        item = dataset[int(position)]
        item["index"] = int(index)
        items.append(item)
    return {"batch": int(unit["batch"]), "payload": pickle.dumps(dataset.collate(items), protocol=5)}
