"""Building a run, once: the process (its device, torchrun rank, threads, kernel settings), the model
from its ``ModelSpec``, the data set (``DataOptions``, the same for both families), the eval transform
the model carries, the keep budget, the step with its callbacks (pictures), the store of its parts with
the run record that ties them to the run, and what its outputs record. -> a ``Job``
(``classifier_job`` / ``detector_job``) with the lines a user should read. Nothing here prints."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import save_checkpoint
from ..data import EvalTransform, open_dataset
from ..data.transforms import settings_from
from ..data.coco import CocoDetectionData, DetectionImages
from ..data.device_decode import DeviceJpegDecoder
from ..data.records import resolve_records
from ..devices import is_cuda
from ..distributed import DistInfo, process_setup
from ..precision import sync_decisions
from .calibration import KeepBudget, calibrate, first_decodable
from .classify import ClassifierStep
from .dataset_out import is_dataset_out, open_store
from .detect import DetectorStep
from .job import Job
from .labels import label_messages, output_names
from .pictures import classifier_pictures, detector_pictures, picture_names
from .provenance import provenance
from .scoring import Scoring, resolve_scoring
from .spec import BuiltModel, ModelSpec


# the row schema of classifier parts (2: ``label_prob``); parts of another are not resumed into
ROWS_VERSION = 4  # 3: a precision column (and agree_* columns with --agreement-with); 4: exif_applied per image
BATCH_SIZE = {"classifier": 128, "detector": 2}  # images per batch unless --batch-size says


@dataclass(frozen=True)
class RunOptions:
    """How a run batches and where it runs: ``device`` (``auto``: CUDA when torch sees a GPU), torch CPU
    ``threads`` (None: torch's default), loader ``workers``; ``engine``: ``local`` (this process, or
    torchrun's) or ``ray`` (model actors: JPEGs decoded there, recorded in the outputs)."""

    batch_size: int
    workers: int = 2
    device: str = "auto"
    threads: int | None = None
    engine: str = "local"


@dataclass(frozen=True)
class DataOptions:
    """Where a run's images come from and how they are read: any input of ``data.resolve_records`` at
    ``path`` (detectors with ``annotations``: a COCO annotation file whose images are in ``path``, the first
    ``max_images`` by id); ``exif``: apply EXIF orientation (classifiers' predict; detectors always, as
    mmdet); ``decode``: ``cpu`` or ``gpu`` (JPEGs decoded on the device); ``crop_pct`` /
    ``interpolation`` / ``mean`` / ``std``: override a classifier's eval transform (its
    ``pretrained_cfg``, from its checkpoint where the file has one); ``exclude``: our own outputs, never
    read back."""

    path: str
    split: str | None = None
    max_pixels: int | None = None
    exif: bool = False
    decode: str = "cpu"
    jpeg_draft: bool = False
    crop_pct: float | None = None
    interpolation: str | None = None
    exclude: tuple[str, ...] = ()
    ignore_unknown_classes: bool = False  # class folders that are not among the model's names: unlabelled
    uri_column: str | None = None  # a manifest's image column (``data/manifest.py``; default ``uri``)
    mean: tuple[float, float, float] | None = None  # override the model's normalisation (--mean / --std)
    std: tuple[float, float, float] | None = None
    annotations: str | None = None  # detectors: a COCO annotation file (``path``: its image folder)
    max_images: int | None = None  # with ``annotations``: the first N images by id

    @property
    def transform_overrides(self) -> dict:
        """The eval transform settings the flags give (None: the model's own)."""
        return {"crop_pct": self.crop_pct, "interpolation": self.interpolation, "mean": self.mean, "std": self.std}


@dataclass(frozen=True)
class OutputOptions:
    """Where a run's rows go: ``out`` (a file by its suffix; a folder ending in ``/`` or an object store
    prefix: a Parquet data set; None: the rows feed a result, ``eval``), its part files in ``parts`` (None:
    ``<out>.parts``), and ``pictures``: a folder for one PNG per input (``--save-vis``; boxes and masks
    scored at least ``score_thr``)."""

    out: str | None = None
    parts: str | None = None
    pictures: str | None = None
    score_thr: float = 0.3

    def __post_init__(self) -> None:
        if self.out is None and self.parts is None:
            raise ValueError("OutputOptions: give out (where the rows go) or parts (their folder, when a result is "
                             "made of them)")
        if self.pictures and self.out is not None and is_dataset_out(self.out):
            raise ValueError("--save-vis needs a file --out (its rows name the pictures); a data set --out DIR/ has no "
                             "picture column")

    @property
    def parts_dir(self) -> str:
        if self.parts is not None:
            return self.parts
        return self.out if is_dataset_out(self.out) else self.out + ".parts"

    @property
    def ours(self) -> list[str]:
        """Every path this run writes (never read back as its input)."""
        return [p for p in (self.out, self.parts_dir, self.pictures) if p]

    def check(self, family: str) -> None:
        """Refuse, in one line, a file ``out`` of a suffix the ``family``'s rows are not written as (a
        detector's list columns have no CSV); a data set is Parquet for both."""
        from .writers import DETECTOR_FORMATS, ROW_FORMATS

        formats = DETECTOR_FORMATS if family == "detector" else ROW_FORMATS
        if self.out is not None and not is_dataset_out(self.out) and Path(self.out).suffix.lower() not in formats:
            what = "a detector" if family == "detector" else "predict"
            raise ValueError(f"--out {self.out}: {what} writes {', '.join(formats)}")

    def store(self, run_record: dict, batch_size: int, num_records: int, dist: DistInfo):
        return open_store(self.out, self.parts_dir, run_record, batch_size, num_records, dist)


@dataclass
class LoadedModel:
    """A model built on this process's device for one run or several (``eval imagenet`` of several test
    sets: loaded once, its keep budget calibrated once, on the first set's run)."""

    built: BuiltModel
    device: torch.device
    info: DistInfo
    calibration: dict | None = None
    calibrated: bool = False


def load_for_runs(spec: ModelSpec, run: RunOptions) -> LoadedModel:
    """This process's device and group (``distributed.process_setup``), and the model of ``spec`` built there."""
    device, info = process_setup(run.device, run.threads)
    return LoadedModel(spec.build(device), device, info)


def classifier_job(spec: ModelSpec, data: DataOptions, run: RunOptions, output: OutputOptions, kind: str,
                   budget: KeepBudget = KeepBudget(), *, topk: int = 5, class_names: list[str] | None = None,
                   scoring: Scoring = Scoring(), loaded: LoadedModel | None = None) -> Job:
    """A classifier run: the model first (checkpoint read and checked before any image), then the data.
    ``kind``: ``predict`` or ``eval-imagenet`` (recorded: parts of the other are not resumed);
    ``class_names``: the model's output names (None: those it carries, ImageNet's for 1000 classes, else
    ids only); ``scoring``: ``--valid-labels`` / ``--real-labels``; ``loaded``: a model built for several
    jobs (``load_for_runs``; its loader's lines are not repeated here; None: built here from ``spec``)."""
    messages, decode_here = [], run.engine == "local"  # on Ray, --decode gpu decodes in the model actors
    if loaded is None:
        loaded = load_for_runs(spec, run)
        messages += loaded.built.messages  # a given model's are its caller's to show, once
    device, info, built = loaded.device, loaded.info, loaded.built
    model = built.model
    transform = EvalTransform.for_model(model.pretrained_cfg, model.config.img_size, **data.transform_overrides)
    transform_record = {**transform.describe(),
                        "from": settings_from(getattr(model, "pretrained_given", None), data.transform_overrides)}
    draft = (transform.resize_to, transform.resize_to) if data.jpeg_draft else None
    dataset = open_dataset(data.path, transform.crop, split=data.split, exclude=[*data.exclude, *output.ours],
                           uri_column=data.uri_column, exif=data.exif, max_pixels=data.max_pixels, draft=draft,
                           encoded_jpegs=data.decode == "gpu")
    decoder = None
    if data.decode == "gpu":
        decoder = DeviceJpegDecoder(transform, device, dataset.exif, data.max_pixels)
        if not is_cuda(device) and decode_here:
            messages.append(f"note: --decode gpu on {device}: JPEGs are decoded in this process by {decoder.name} "
                            "(there is no GPU decoder here); --decode cpu decodes in the --workers processes")
    names, named_by = output_names(model, class_names)
    messages += label_messages(dataset.records, data.path, data.ignore_unknown_classes, names, named_by,
                               model.config.num_classes, scored=kind != "predict")
    resolved, lines = resolve_scoring(scoring, model.config.num_classes, dataset.records, data.path)
    messages += lines
    classes = len(resolved.valid) if resolved.valid else model.config.num_classes
    if topk > classes:  # the rows hold every class, ranked: said, not silently fewer columns than asked
        messages.append(f"note: --topk {topk} is more than the {classes} classes "
                        f"{'--valid-labels leaves' if resolved.valid else 'the model has'}: rows hold the top {classes}")

    def images_of(source: str, n: int) -> list:
        return first_decodable(open_dataset(source, transform, split=data.split, exclude=data.exclude), n)

    if not loaded.calibrated:
        loaded.calibration, lines = calibrate(model, budget, images_of, device, data.path, built.name)
        loaded.calibrated = True
        messages += lines
        if loaded.calibration and budget.save_to:
            save_checkpoint(model, budget.save_to, calibration=loaded.calibration)
    if built.reference is not None:  # the reference decides with the same (calibrated) gates
        sync_decisions(built.reference, model)
    calibration, report = loaded.calibration, built.report
    record = {"kind": kind, "model": built.name, "checkpoint_sha256": report.sha256 if report else None,
                "data": str(Path(data.path).resolve()), "num_records": len(dataset), "batch_size": run.batch_size,
                "topk": topk, "transform": transform_record, "precision": spec.precision,
                "img_size": model.config.img_size, "seed": spec.seed if report is None else None,
                "files_digest": dataset.records.digest(), "split": data.split, "calibration": calibration,
                "decode": decoder.name if decoder else "pil", "jpeg_draft": draft,
                **_row_settings(spec, built, run, data.max_pixels),
                "class_names": _digest(names), "labels": _digest(dataset.records.labels), "rows": ROWS_VERSION,
                **({"valid_labels": _digest(resolved.valid)} if resolved.valid else {}),
                **({"agreement_with": spec.agreement_with} if spec.agreement_with else {})}
    pictures = picture_names(dataset.records.ids) if output.pictures else None
    on_batch = classifier_pictures(Path(output.pictures), model, pictures, names, transform) if pictures else None
    step = ClassifierStep(model, device, topk, names, dataset.class_names, dataset.exif, transform, decoder, on_batch,
                          resolved.valid, spec.cuda_graphs, built.reference)
    meta = provenance(built, spec, transform=transform_record, data=record["data"], calibration=calibration,
                      class_names=names, topk=topk, decode=record["decode"], engine=run.engine,
                      **({"valid_labels": resolved.valid_name} if resolved.valid else {}))
    store = output.store(record, run.batch_size, len(dataset), info)
    return Job(step, dataset, store, built, spec, run.workers, info, meta, messages, resolved, pictures,
               Path(output.pictures) if output.pictures else None)


def _digest(values) -> str | None:
    """A short fingerprint of a list (class names, labels) for the run record."""
    import hashlib
    import json

    return None if values is None else hashlib.sha256(json.dumps(list(values)).encode()).hexdigest()[:16]


def _row_settings(spec: ModelSpec, built: BuiltModel, run: RunOptions, max_pixels: int | None) -> dict:
    """What else can change a row (a resumed run that differs in these is refused): the attention backend
    (as resolved for the run), the CPU threads, compiled blocks and the capacity forward (its padded
    attention) change floats (and a float can flip a gate near its threshold), the pixel limit which
    images are read."""
    return {"backend": built.backend, "threads": run.threads or torch.get_num_threads(), "max_pixels": max_pixels,
            **({"compile": True} if spec.compile else {}), **({"capacity": spec.capacity} if spec.capacity else {})}


def detector_job(spec: ModelSpec, data: DataOptions, run: RunOptions, output: OutputOptions, kind: str,
                 budget: KeepBudget = KeepBudget()) -> Job:
    """A detector run: the model first, then the data at the model's test scale (``data.annotations``: a
    COCO annotation file's images; else any input at ``data.path``). ``kind``: ``predict-detection`` or
    ``eval-coco``."""
    device, info = process_setup(run.device, run.threads)
    built = spec.build(device)
    model, messages = built.model, list(built.messages)
    scale = model.config.img_scale
    if data.annotations:
        dataset = CocoDetectionData(data.annotations, data.path, scale, data.max_images, data.max_pixels)
        data_files = [data.annotations, data.path]
    else:
        records = resolve_records(data.path, data.split, [*data.exclude, *output.ours], data.uri_column)
        dataset, data_files = DetectionImages(records, scale, max_pixels=data.max_pixels), [data.path]

    def images_of(path: str, n: int) -> list:
        if path == data.path:
            return first_decodable(dataset, n, "input")
        return first_decodable(DetectionImages(resolve_records(path, data.split), scale), n, "input")

    calibration, lines = calibrate(model.backbone, budget, images_of, device, data.path, built.name)
    messages += lines
    if calibration and budget.save_to:
        save_checkpoint(model, budget.save_to, calibration=calibration)
    report = built.report
    record = {"kind": kind, "model": built.name, "checkpoint_sha256": report.sha256 if report else None,
              "data": [str(Path(f).resolve()) for f in data_files], "num_records": len(dataset),
              "batch_size": run.batch_size, "img_scale": list(scale),
              "seed": spec.seed if report is None else None, "calibration": calibration,
              "files_digest": dataset.records.digest(), "precision": spec.precision,
              **_row_settings(spec, built, run, dataset.max_pixels)}
    pictures = picture_names(dataset.records.ids) if output.pictures else None
    on_batch = detector_pictures(Path(output.pictures), dataset, pictures, output.score_thr) if pictures else None
    meta = provenance(built, spec, data=record["data"], img_scale=list(scale), class_names=list(model.class_names),
                      calibration=calibration, engine=run.engine)
    store = output.store(record, run.batch_size, len(dataset), info)
    return Job(DetectorStep(model, device, True, on_batch), dataset, store, built, spec, run.workers, info, meta,
               messages, pictures=pictures, pictures_dir=Path(output.pictures) if output.pictures else None)
