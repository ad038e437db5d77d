"""Building a run: the process (its device, torchrun rank, threads, kernel settings), the model from
its ``ModelSpec``, the data set, the eval transform the model carries, the keep budget, and the
manifest that ties the part files to the run. -> a job for ``run_inference`` / ``run_detection``
(or the Ray engine), and the lines a user should read. Nothing here prints."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoint import save_checkpoint
from ..data import EvalTransform, open_dataset
from ..data.coco import DetectionImages
from ..data.device_decode import DeviceJpegDecoder
from ..data.records import resolve_records
from ..devices import is_cuda, resolve_device, set_kernel_settings
from ..distributed import DistInfo, init_from_env, rank_device
from .calibration import KeepBudget, calibrate, first_decodable
from .classify import InferenceJob
from .detect import DetectionJob
from .spec import BuiltModel, ModelSpec


@dataclass(frozen=True)
class RunOptions:
    """How a run batches and where it runs: ``device`` (``auto``: CUDA when torch sees a GPU), torch CPU
    ``threads`` (None: torch's default), loader ``workers``."""

    batch_size: int
    workers: int = 2
    device: str = "auto"
    threads: int | None = None


@dataclass(frozen=True)
class DataOptions:
    """Where a classifier run's images come from and how they are read: any input of
    ``data.resolve_records`` at ``path``; ``exif``: apply EXIF orientation (predict); ``decode``: ``cpu``
    or ``gpu`` (JPEGs decoded on the device); ``crop_pct`` / ``interpolation``: override the model's eval
    transform; ``exclude``: our own outputs, never read back."""

    path: str
    split: str | None = None
    max_pixels: int | None = None
    exif: bool = False
    decode: str = "cpu"
    jpeg_draft: bool = False
    crop_pct: float | None = None
    interpolation: str | None = None
    exclude: tuple[str, ...] = ()


@dataclass
class Prepared:
    """A job ready to run, the model it was built with, and what a user should read (whole lines)."""

    job: InferenceJob | DetectionJob
    built: BuiltModel
    messages: list[str] = field(default_factory=list)


def process_group(run: RunOptions) -> tuple[torch.device, DistInfo]:
    """(this process's device, ``DistInfo``): joins the torchrun group when there is one; sets the math
    settings (TF32 off) that the outputs record, and the CPU threads."""
    set_kernel_settings(False)
    device = resolve_device(run.device)
    info = init_from_env(device)
    if run.threads:
        torch.set_num_threads(run.threads)
    return torch.device(rank_device(device, info)), info


def classifier_job(spec: ModelSpec, data: DataOptions, run: RunOptions, parts_dir: Path, kind: str, topk: int = 5,
                   class_names: list[str] | None = None, budget: KeepBudget = KeepBudget(),
                   decode_here: bool = True) -> Prepared:
    """A classifier run: the model first (checkpoint read and checked before any image), then the data.
    ``class_names``: the model's output names (None: those it carries, ImageNet's for 1000 classes, else
    ids only); ``decode_here``: ``--decode gpu`` decodes in this process (False: in Ray actors)."""
    device, info = process_group(run)
    built = spec.build(device)
    model, messages = built.model, list(built.messages)
    transform = EvalTransform.for_model(model.pretrained_cfg, model.config.img_size, data.crop_pct, data.interpolation)
    draft = (transform.resize_to, transform.resize_to) if data.jpeg_draft else None
    dataset = open_dataset(data.path, transform.crop, split=data.split, exclude=[*data.exclude, parts_dir],
                           exif=data.exif, max_pixels=data.max_pixels, draft=draft,
                           encoded_jpegs=data.decode == "gpu")
    decoder = None
    if data.decode == "gpu":
        decoder = DeviceJpegDecoder(transform, device, dataset.exif, data.max_pixels)
        if not is_cuda(device) and decode_here:
            messages.append(f"note: --decode gpu on {device}: JPEGs are decoded in this process by {decoder.name} "
                            "(there is no GPU decoder here); --decode cpu decodes in the --workers processes")
    names = output_names(model, class_names)

    def images_of(source: str, n: int) -> list:
        return first_decodable(open_dataset(source, transform, split=data.split, exclude=data.exclude), n)

    calibration, lines = calibrate(model, budget, images_of, device, data.path, built.name)
    messages += lines
    if calibration and budget.save_to:
        save_checkpoint(model, budget.save_to, calibration=calibration)
    if dataset.records.label_source == "sorted_class_dirs" and model.config.num_classes == 1000:
        messages.append(f"WARNING: {data.path}: class folders are not (all) ImageNet wnids, so labels are the sorted "
                        "folder order 0..K-1, not ImageNet's class ids: top-1/top-5 against a 1000-class model are "
                        "meaningless. Name folders by wnid (n01440764, ...) or use a model trained on these classes.")
    report = built.report
    manifest = {"kind": kind, "model": built.name, "checkpoint_sha256": report.sha256 if report else None,
                "data": str(Path(data.path).resolve()), "num_records": len(dataset), "batch_size": run.batch_size,
                "topk": topk, "transform": transform.describe(), "precision": spec.precision,
                "img_size": model.config.img_size, "seed": spec.seed if report is None else None,
                "files_digest": dataset.records.digest(), "split": data.split, "calibration": calibration,
                "decode": decoder.name if decoder else "pil", "jpeg_draft": draft}
    job = InferenceJob(model, dataset, parts_dir, manifest, run.batch_size, run.workers, topk, device, info, names,
                       transform=transform, decoder=decoder)
    return Prepared(job, built, messages)


def output_names(model, given: list[str] | None) -> list[str] | None:
    """Names of a classifier's outputs: ``given`` (checked against its class count), else those it
    carries (a ``train`` file's), else ImageNet's for a 1000-class model, else none (ids only). Never
    the data's folder names."""
    from ..data.classes import imagenet_classes

    k = model.config.num_classes
    if given:
        if len(given) != k:
            raise ValueError(f"--class-names lists {len(given)} names, the model has {k} classes")
        return list(given)
    carried = getattr(model, "class_names", None)
    if carried:
        return list(carried)
    return list(imagenet_classes()[1]) if k == 1000 else None


def detector_job(spec: ModelSpec, dataset_of, run: RunOptions, parts_dir: Path, kind: str, source: str,
                 data_files: list[str], split: str | None = None, budget: KeepBudget = KeepBudget()) -> Prepared:
    """A detector run: the model first, then ``dataset_of(model)`` (its images at the model's test
    scale). ``source``: the input as given (calibration reads it unless ``budget.data``); ``data_files``:
    what the manifest pins (the annotation file and image folder, or the input)."""
    device, info = process_group(run)
    built = spec.build(device)
    model, messages = built.model, list(built.messages)
    dataset = dataset_of(model)

    def images_of(path: str, n: int) -> list:
        if path == source:
            return first_decodable(dataset, n, "input")
        return first_decodable(DetectionImages(resolve_records(path, split), model.config.img_scale), n, "input")

    calibration, lines = calibrate(model.backbone, budget, images_of, device, source, built.name)
    messages += lines
    if calibration and budget.save_to:
        save_checkpoint(model, budget.save_to, calibration=calibration)
    report = built.report
    manifest = {"kind": kind, "model": built.name, "checkpoint_sha256": report.sha256 if report else None,
                "data": [str(Path(f).resolve()) for f in data_files], "num_records": len(dataset),
                "batch_size": run.batch_size, "img_scale": list(model.config.img_scale),
                "seed": spec.seed if report is None else None, "calibration": calibration,
                "files_digest": dataset.records.digest(), "precision": spec.precision}
    job = DetectionJob(model, dataset, parts_dir, manifest, run.batch_size, run.workers, device, info)
    return Prepared(job, built, messages)
