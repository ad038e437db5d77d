"""Training, built as inference is (``classifier_training`` / ``detector_training``: a ``ModelSpec``, the data's
``DataOptions`` and ``RunOptions`` -> a trainer): the epoch loop, optimizer and schedules, resumable checkpoints
and the step log, data parallelism under torchrun, the trainers and their shared preamble (``base``), where
training starts (``load_init``) and the classifiers' training data."""
from .classifier import StepLog, Trainer, TrainConfig
from .config import TrainingConfig
from .data import LabelledImages, train_augment
from .detector import DetectorTrainer, DetStepLog, DetTrainConfig
from .init import load_init
from .job import TrainingJob, classifier_training, detector_training

__all__ = ["classifier_training", "detector_training", "TrainingJob", "Trainer", "TrainConfig", "StepLog",
           "DetectorTrainer", "DetTrainConfig", "DetStepLog", "TrainingConfig", "load_init", "LabelledImages",
           "train_augment"]
