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
from ..data.transforms import settings_from
from ..data.coco import DetectionImages
from ..data.device_decode import DeviceJpegDecoder
from ..data.records import resolve_records
from ..devices import is_cuda, resolve_device, set_kernel_settings
from ..distributed import DistInfo, init_from_env, rank_device
from ..precision import sync_decisions
from .calibration import KeepBudget, calibrate, first_decodable
from .classify import InferenceJob
from .detect import DetectionJob
from .scoring import ResolvedScoring, Scoring, resolve_scoring
from .spec import BuiltModel, ModelSpec


# the row schema of classifier parts (2: ``label_prob``); parts of another are not resumed into
ROWS_VERSION = 4  # 3: a precision column (and agree_* columns with --agreement-with); 4: exif_applied per image


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
    or ``gpu`` (JPEGs decoded on the device); ``crop_pct`` / ``interpolation`` / ``mean`` / ``std``: override
    the model's eval transform (its ``pretrained_cfg``, from its checkpoint where the file has one); ``exclude``: our own outputs, never read back."""

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

    @property
    def transform_overrides(self) -> dict:
        """The eval transform settings the flags give (None: the model's own)."""
        return {"crop_pct": self.crop_pct, "interpolation": self.interpolation, "mean": self.mean, "std": self.std}


@dataclass
class Prepared:
    """A job ready to run, the model it was built with, and what a user should read (whole lines);
    ``scoring``: how a classifier job's rows are scored (``--valid-labels``, ``--real-labels``)."""

    job: InferenceJob | DetectionJob
    built: BuiltModel
    messages: list[str] = field(default_factory=list)
    scoring: ResolvedScoring = field(default_factory=ResolvedScoring)


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
    """This process's group and device (``process_group``), and the model of ``spec`` built there."""
    device, info = process_group(run)
    return LoadedModel(spec.build(device), device, info)


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
                   decode_here: bool = True, scoring: Scoring = Scoring(), loaded: LoadedModel | None = None
                   ) -> Prepared:
    """A classifier run: the model first (checkpoint read and checked before any image), then the data.
    ``class_names``: the model's output names (None: those it carries, ImageNet's for 1000 classes, else
    ids only); ``decode_here``: ``--decode gpu`` decodes in this process (False: in Ray actors);
    ``scoring``: ``--valid-labels`` / ``--real-labels``; ``loaded``: a model built for several jobs
    (``load_for_runs``; its loader's lines are not repeated here; None: built here from ``spec``)."""
    messages = []
    if loaded is None:
        loaded = load_for_runs(spec, run)
        messages += loaded.built.messages  # a given model's are its caller's to show, once
    device, info, built = loaded.device, loaded.info, loaded.built
    model = built.model
    transform = EvalTransform.for_model(model.pretrained_cfg, model.config.img_size, **data.transform_overrides)
    transform_record = {**transform.describe(),
                        "from": settings_from(getattr(model, "pretrained_given", None), data.transform_overrides)}
    draft = (transform.resize_to, transform.resize_to) if data.jpeg_draft else None
    dataset = open_dataset(data.path, transform.crop, split=data.split, exclude=[*data.exclude, parts_dir],
                           uri_column=data.uri_column, exif=data.exif, max_pixels=data.max_pixels, draft=draft,
                           encoded_jpegs=data.decode == "gpu")
    decoder = None
    if data.decode == "gpu":
        decoder = DeviceJpegDecoder(transform, device, dataset.exif, data.max_pixels)
        if not is_cuda(device) and decode_here:
            messages.append(f"note: --decode gpu on {device}: JPEGs are decoded in this process by {decoder.name} "
                            "(there is no GPU decoder here); --decode cpu decodes in the --workers processes")
    names, named_by = output_names(model, class_names)
    messages += label_messages(dataset.records, data, names, named_by, model.config.num_classes, scored=kind != "predict")
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
    manifest = {"kind": kind, "model": built.name, "checkpoint_sha256": report.sha256 if report else None,
                "data": str(Path(data.path).resolve()), "num_records": len(dataset), "batch_size": run.batch_size,
                "topk": topk, "transform": transform_record, "precision": spec.precision,
                "img_size": model.config.img_size, "seed": spec.seed if report is None else None,
                "files_digest": dataset.records.digest(), "split": data.split, "calibration": calibration,
                "decode": decoder.name if decoder else "pil", "jpeg_draft": draft,
                **_row_settings(spec, built, run, data.max_pixels),
                "class_names": _digest(names), "labels": _digest(dataset.records.labels), "rows": ROWS_VERSION,
                **({"valid_labels": _digest(resolved.valid)} if resolved.valid else {}),
                **({"agreement_with": spec.agreement_with} if spec.agreement_with else {})}
    job = InferenceJob(model, dataset, parts_dir, manifest, run.batch_size, run.workers, topk, device, info, names,
                       transform=transform, decoder=decoder, valid_labels=resolved.valid,
                       cuda_graphs=spec.cuda_graphs, reference=built.reference)
    return Prepared(job, built, messages, resolved)


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


def label_messages(records, data: DataOptions, names: list[str] | None, named_by: str | None,
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
        unknown = relabel_by_names(records, names, data.ignore_unknown_classes)
        if unknown:
            out.append(f"note: {data.path}: folders {', '.join(unknown[:8])}{' ...' if len(unknown) > 8 else ''} are not "
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
        out.append(f"WARNING: {data.path}: {what}")
    beyond = sorted({lab for lab in records.labels if lab >= num_classes})
    if beyond:  # scored, they would all count as wrong: refused (eval), or left unlabelled, loudly (predict)
        what = (f"{data.path}: its labels ({records.label_source}) include class ids "
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
        out.append(f"note: {data.path} holds {loose} images at its top, outside its {folders} class folder(s): they "
                   "are predicted but have no label, so top-1/top-5 count only the images in class folders")
    return out


def _digest(values) -> str | None:
    """A short fingerprint of a list (class names, labels) for the manifest."""
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
                "files_digest": dataset.records.digest(), "precision": spec.precision,
                **_row_settings(spec, built, run, dataset.max_pixels)}
    job = DetectionJob(model, dataset, parts_dir, manifest, run.batch_size, run.workers, device, info)
    return Prepared(job, built, messages)
