"""Inference, the same for every engine: what to build (``ModelSpec``), a run built once from plain
options (``classifier_job`` / ``detector_job`` -> a ``Job``: its batch step, its data set, the store of
its part files), run by the one commit loop (``run_batches``) with this process's schedule or the Ray
engine's, and written by the library (``predict`` -> a ``PredictSummary``)."""
from .build import (BATCH_SIZE, DataOptions, LoadedModel, OutputOptions, RunOptions, classifier_job, detector_job,
                    load_for_runs)
from .calibration import KeepBudget
from .classify import ClassifierCounts, ClassifierStep
from .detect import DetectorCounts, DetectorStep
from .job import Job, PredictSummary, Resume, predict
from .labels import output_names
from .loop import BatchResult, BatchStep, local_schedule, run_batches
from .parts import PartStore, merge_parts
from .scoring import Scoring
from .spec import BuiltModel, ModelSpec, family_of, load_detector, load_model
from .writers import DETECTOR_FORMATS, ROW_FORMATS

__all__ = ["ModelSpec", "BuiltModel", "family_of", "load_model", "load_detector",
           "DataOptions", "RunOptions", "OutputOptions", "KeepBudget", "Scoring", "BATCH_SIZE",
           "classifier_job", "detector_job", "load_for_runs", "LoadedModel", "Job", "Resume", "predict", "PredictSummary",
           "ClassifierStep", "DetectorStep", "ClassifierCounts", "DetectorCounts", "BatchStep", "BatchResult",
           "run_batches", "local_schedule", "PartStore", "merge_parts", "output_names", "ROW_FORMATS", "DETECTOR_FORMATS"]
