"""Inference, the same for every engine: what to build (``ModelSpec``), a run built once from plain
options (``classifier_job`` / ``detector_job`` -> a ``Job``: its batch step, its data set, the store of
its part files), run by the one commit loop (``loop.run_batches``) with this process's schedule or the
Ray engine's, and written by the library (``predict`` -> a ``PredictSummary``)."""
from .build import DataOptions, OutputOptions, RunOptions, classifier_job, detector_job, load_for_runs
from .calibration import KeepBudget
from .classify import ClassifierCounts, ClassifierStep
from .detect import DetectorCounts, DetectorStep
from .job import Job, PredictSummary, predict
from .scoring import Scoring
from .spec import ModelSpec, family_of, load_detector, load_model

__all__ = ["load_model", "load_detector", "ModelSpec", "family_of", "DataOptions", "RunOptions", "OutputOptions",
           "KeepBudget", "Scoring", "classifier_job", "detector_job", "load_for_runs", "Job", "predict",
           "PredictSummary", "ClassifierStep", "DetectorStep", "ClassifierCounts", "DetectorCounts"]
