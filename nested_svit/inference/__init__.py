"""Inference, the same for every engine: what to build (``ModelSpec``), a job's batch step (classifiers:
``ClassifierStep``, detectors: ``DetectorStep``), the one commit loop (``run_batches``) over the part
files of a run (``PartStore``), and the jobs of a local or torchrun run (``InferenceJob`` /
``run_inference``, ``DetectionJob`` / ``run_detection``), built from plain options (``jobs``)."""
from .calibration import KeepBudget
from .classify import ClassifierStep, InferenceJob, Progress, run_inference
from .detect import DetectionJob, DetectionProgress, DetectorStep, run_detection
from .jobs import (DataOptions, LoadedModel, Prepared, RunOptions, classifier_job, detector_job, load_for_runs,
                   output_names)
from .loop import BatchResult, BatchStep, run_batches, run_local
from .parts import PartStore, check_manifest, merge_parts, part_path, remove_parts
from .provenance import provenance
from .scoring import ResolvedScoring, Scoring
from .spec import BuiltModel, ModelSpec, family_of, load_detector, load_model

__all__ = ["ModelSpec", "BuiltModel", "family_of", "load_model", "load_detector", "ClassifierStep", "DetectorStep", "BatchStep", "BatchResult",
           "run_batches", "run_local", "PartStore", "check_manifest", "part_path", "merge_parts", "remove_parts",
           "InferenceJob", "run_inference", "Progress", "DetectionJob", "run_detection", "DetectionProgress",
           "KeepBudget", "DataOptions", "RunOptions", "Prepared", "classifier_job", "detector_job", "output_names",
           "provenance", "LoadedModel", "load_for_runs", "Scoring", "ResolvedScoring"]
