"""What every trainer's configuration holds (``TrainingConfig``): the schedule, the keep-ratio loss, the
run. ``TrainConfig`` (classifiers) and ``DetTrainConfig`` (detectors) add their own fields and defaults."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrainingConfig:
    epochs: int = 30
    batch_size: int = 64  # the global batch (under torchrun: over all processes)
    lr: float = 1e-5
    gate_lr: float | None = 1e-3  # the selectors' learning rate (None: lr)
    weight_decay: float = 0.05
    warmup_steps: int = 0
    ratio_weight: float = 4.0  # lambda of the method's keep-ratio loss
    ratio_loss: str = "dynamic"  # "dynamic" (Eq. 2, batch average) or "fixed" (Eq. 3, per image)
    amp: bool = False  # CUDA autocast (bf16)
    seed: int = 0
    workers: int = 0
    checkpoint_every: int = 0  # steps; 0: at the end of each epoch only
    drop_path: float = 0.0  # stochastic depth rate (linear over the blocks); training only
    device: str = "cpu"

    @property
    def selector_lr(self) -> float:
        """The selectors' learning rate: ``gate_lr``, or ``lr`` when it is None."""
        return self.lr if self.gate_lr is None else self.gate_lr
