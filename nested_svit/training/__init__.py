"""Training: the epoch loop, optimizer and schedules, resumable checkpoints, data parallelism under
torchrun, the classifier and detector trainers, their shared config, where training starts (``load_init``)
and the classifiers' training data."""
from .classifier import StepLog, Trainer, TrainConfig
from .config import TrainingConfig
from .data import LabelledImages, train_augment
from .detector import DetectorTrainer, DetStepLog, DetTrainConfig
from .init import load_init
from .loop import epoch_batches

__all__ = ["Trainer", "TrainConfig", "StepLog", "DetectorTrainer", "DetTrainConfig", "DetStepLog", "epoch_batches",
           "TrainingConfig", "load_init", "LabelledImages", "train_augment"]
