"""The options of the inference commands (``predict``, ``eval imagenet``, ``eval coco``), as argument
groups per model family (``options.py``): classifier and detector parsers get only what applies."""
from __future__ import annotations

import argparse

from . import options

CLS, DET = "classifier", "detector"
WORKERS = 2  # default --workers


def add_model_options(p: argparse.ArgumentParser, families: tuple[str, ...]) -> None:
    g = p.add_argument_group("model")
    model_help = {(CLS, DET): "model name (nested-svit list); default: the model the checkpoint carries, else "
                              "svit_small (classifiers)",
                  (CLS,): "model name (nested-svit list); default: the model a train checkpoint carries, else svit_small",
                  (DET,): "detector name (nested-svit list); default: the detector the checkpoint carries, else "
                          "svit_adapter_small_maskrcnn"}[families]
    g.add_argument("--model", default=None, help=model_help)
    g.add_argument("--checkpoint", default=None,
                   help={(CLS, DET): "timm/DeiT, official SViT/ViT-Adapter, a baseline's release or a nested-svit .pth; "
                                     "classifiers also .safetensors, a folder (config.json + weights: timm, "
                                     "transformers), local-dir:DIR or hf-hub:ORG/NAME from the local cache",
                         (CLS,): "timm/DeiT, official SViT, a baseline's release or 'nested-svit train' .pth; "
                                 ".safetensors; a folder (config.json + weights: timm, transformers), local-dir:DIR "
                                 "or hf-hub:ORG/NAME[@REV] from the local Hugging Face cache (README 'Checkpoints')",
                         (DET,): "official SViT/ViT-Adapter mmdet .pth, or a nested-svit detector file"}[families])
    g.add_argument("--random-weights", action="store_true", help="allow running without a checkpoint")
    g.add_argument("--seed", type=int, default=0, help="initialisation seed for --random-weights")
    options.add(p, g, "--num-classes", type=int, defaults={CLS: None}, families=families,
                help="model outputs (default: the checkpoint's / model's)")
    options.add(p, g, "--class-names", defaults={CLS: None}, families=families,
                help="text file, one class name per line, in the model's output order; class folders of the input "
                     "are labelled by these names (and by those a train checkpoint carries)")
    options.add(p, g, "--ignore-unknown-classes", action="store_true", defaults={CLS: False}, families=families,
                help="class folders that are not among the model's class names: their images get no label (not "
                     "scored) instead of an error")


def add_run_options(p: argparse.ArgumentParser, families: tuple[str, ...]) -> None:
    from ..inference.build import BATCH_SIZE

    g = p.add_argument_group("running")
    options.add(p, g, "--batch-size", type=int, defaults={CLS: BATCH_SIZE[CLS], DET: BATCH_SIZE[DET]},
                families=families,
                help="images per batch (detectors: images of any sizes run together)")
    g.add_argument("--workers", type=int, default=WORKERS, help="DataLoader processes decoding images")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    options.add(p, g, "--precision", choices=["fp32", "bf16", "fp16", "int8"], defaults={CLS: "fp32", DET: "fp32"},
                families=families, help="compute precision of the blocks' linears and attention; every decision "
                "(gates, predictors, the top-k) and the stream the gates read stay fp32 (classifiers; detectors: "
                "the whole network, box arithmetic and NMS fp32). int8: classifiers on a CPU, weights per channel "
                "and activations per token (bench/README.md says what it costs and gains)")
    options.add(p, g, "--agreement-with", choices=["fp32"], defaults={CLS: None}, families=families,
                help="with --precision bf16/fp16: run each batch through the same weights in fp32 too and report "
                     "decision agreement (the kept-token decisions and top-1 ids that are the same; per row and in "
                     "eval's results); about doubles the time")
    g.add_argument("--backend", default="auto",
                   help="variable-length attention backend (auto: loop on CPU, one backend for the whole run; "
                        "loop, padded, nested, varlen)")
    g.add_argument("--compile", action="store_true",
                   help="run each block's dense math (norms, qkv, projection, MLP) as torch.compile'd regions, the "
                        "token count dynamic, attention eager; compiled when the model is loaded (timed; cached for "
                        "the next run). Same rows within fp32 rounding. Measured 0.96-0.98x eager on a 2-core CPU; not yet timed on "
                        "a GPU")
    options.add(p, g, "--capacity", type=float, defaults={CLS: None}, families=families, metavar="F",
                help="SViT gates: each gated block runs a fixed ceil(F x expected) rows with no host read, the "
                     "counts read once per batch; F >= 1, sized by what the gates keep on the run's data (their targets at first); a batch that needs more is rerun and counted. For GPUs "
                     "at small batches (and --cuda-graphs); on a CPU it is slower (its attention is padded)")
    options.add(p, g, "--cuda-graphs", action="store_true", defaults={CLS: False}, families=families,
                help="CUDA only: replay a CUDA graph of the forward per batch shape (SViT: with --capacity, "
                     "default 1.25); not yet timed on a GPU (bench/gpu_check.py measures it)")


def add_input_options(p: argparse.ArgumentParser, families: tuple[str, ...], split: str | None = None,
                      split_help: str = "split of a save_to_disk DatasetDict (default: validation, else the first)",
                      manifests: bool = True) -> None:
    """The input flags; ``manifests``: the input may be a manifest of URIs (not eval coco: its images are
    the ones its annotation file names)."""
    g = p.add_argument_group("input")
    options.add(p, g, "--img-size", type=int, defaults={CLS: None}, families=families,
                help="input size (default: the model's, 224 for DeiT/SViT)")
    options.add(p, g, "--crop-pct", type=float, defaults={CLS: None}, families=families,
                help="resize to img_size / crop_pct, then center-crop (default: the model's: its checkpoint's "
                     "config where the file has one, else DeiT's 0.875)")
    options.add(p, g, "--interpolation", choices=["bicubic", "bilinear", "nearest"], defaults={CLS: None},
                families=families, help="resize interpolation of the eval transform (default: the model's, as "
                                        "--crop-pct; DeiT bicubic)")
    for flag, what in (("--mean", "mean"), ("--std", "standard deviation")):
        options.add(p, g, flag, type=parse_triple, defaults={CLS: None}, families=families, metavar="R,G,B",
                    help=f"per-channel {what} the eval transform normalises with, in [0, 1] units (default: the "
                         "model's, as --crop-pct; ImageNet's for DeiT; 0.5,0.5,0.5 for timm's augreg ViTs)")
    options.add(p, g, "--img-scale", defaults={DET: None}, families=families,
                help="W,H test scale (default: the model's, 1333,800)")
    options.add(p, g, "--decode", choices=["cpu", "gpu"], defaults={CLS: "cpu"}, families=families,
                help="where images are decoded: cpu (Pillow in the --workers processes) or gpu (the JPEGs of a batch "
                     "together on the model's device with nvjpeg, then resized and cropped there; other files and "
                     "JPEGs nvjpeg refuses take the cpu path; each row records its decoder)")
    options.add(p, g, "--jpeg-draft", action="store_true", defaults={CLS: False}, families=families,
                help="decode large JPEGs at a reduced DCT scale (1/2..1/8) that still covers the resize: much faster "
                     "for multi-megapixel photos, pixels differ slightly from a full decode (recorded in the outputs)")
    g.add_argument("--split", default=split, help=split_help)
    if manifests:
        g.add_argument("--uri-column", default=None, metavar="COLUMN",
                       help="the input is a .csv / .parquet manifest (local or s3://...) whose COLUMN holds each "
                            "image's URI or path, with optional 'label' (class index) and 'id' columns (default: "
                            "'uri' for a .csv, or a .parquet without an 'image' column)")
    g.add_argument("--max-image-pixels", type=int, default=None,
                   help="larger images are skipped with the reason (default 1e9; Pillow's own 89 Mpx warning is off)")


def parse_triple(text: str) -> tuple[float, float, float]:
    """``0.5,0.5,0.5`` (or one value for all three channels) -> a 3-tuple of floats."""
    try:
        values = tuple(float(v) for v in text.replace(" ", ",").split(",") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected three numbers R,G,B, got {text!r}") from None
    values = values * 3 if len(values) == 1 else values
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected three numbers R,G,B, got {text!r}")
    return values


def add_keep_budget_options(p: argparse.ArgumentParser, families: tuple[str, ...]) -> None:
    g = p.add_argument_group("keep budget (SViT gates, no retraining)")
    g.add_argument("--keep-targets", default=None,
                   help="gate keep budget: 9 fractions, or one factor scaling the model's (needs --calibrate)")
    g.add_argument("--calibrate", type=int, default=0, help="calibrate gate thresholds on this many input images")
    g.add_argument("--calibrate-data", default=None, help="calibrate on these images instead of the input")
    g.add_argument("--save-calibrated", default=None, help="write the calibrated model (loads with --checkpoint)")


def add_valid_labels_option(p: argparse.ArgumentParser, group, families: tuple[str, ...]) -> None:
    """``--valid-labels``: the classes the softmax and top-k are taken over (timm's ``--valid-labels``)."""
    options.add(p, group, "--valid-labels", defaults={CLS: None}, families=families, metavar="SET|FILE",
                help="take the softmax and the top-k over these classes only, as ImageNet-A/-R's authors score: "
                     "imagenet-a, imagenet-r (their 200 classes) or a text file of class indices, one a line; "
                     "ids stay the model's (on ImageNet val: the 200-class 'clean' figure timm publishes)")


def add_inference_options(p: argparse.ArgumentParser, families: tuple[str, ...], **input_kwargs) -> None:
    """Everything ``predict`` / ``eval`` share, for a parser of ``families``."""
    add_model_options(p, families)
    add_run_options(p, families)
    add_input_options(p, families, **input_kwargs)
    add_keep_budget_options(p, families)
