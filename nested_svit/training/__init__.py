"""Training: the epoch loop, optimizer and schedules, resumable checkpoints, data parallelism under
torchrun, and the classifier and detector trainers."""
from .classifier import StepLog, Trainer, TrainConfig
from .detector import DetectorTrainer, DetStepLog, DetTrainConfig
from .loop import epoch_batches

__all__ = ["Trainer", "TrainConfig", "StepLog", "DetectorTrainer", "DetTrainConfig", "DetStepLog", "epoch_batches"]
