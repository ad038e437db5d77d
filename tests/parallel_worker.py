"""Run under torchrun by tests/test_parallel_training.py: trains a tiny detector for one epoch with
DetectorTrainer on the process group torchrun describes; rank 0 writes the weights to ``out``."""
from __future__ import annotations

import dataclasses
import os
import sys

import torch

from nested_svit.data.coco import CocoTrainData
from nested_svit.detection import create_detector
from nested_svit.training import DetectorTrainer, DetTrainConfig
from nested_svit.distributed import init_from_env, shutdown

# BatchNorm per rank: the reference below averages independent shard losses (SyncBN: tests/test_batchnorm.py)
CONFIG = DetTrainConfig(epochs=1, batch_size=2, lr=1e-4, warmup_steps=1, workers=0, sync_bn=False)


def build(ann: str, images: str):
    data = CocoTrainData(ann, images, (192, 128), seed=CONFIG.seed)
    torch.manual_seed(0)
    return create_detector("svit_adapter_tiny_maskrcnn", num_classes=2, img_scale=(192, 128)), data


if __name__ == "__main__":
    ann, images, out = sys.argv[1:4]
    torch.set_num_threads(1)
    device = os.environ.get("PARALLEL_DEVICE", "cpu")  # "cuda": NCCL, each rank on its own GPU
    info = init_from_env(device)
    from nested_svit.distributed import rank_device

    model, data = build(ann, images)
    trainer = DetectorTrainer(model, data, dataclasses.replace(CONFIG, device=rank_device(device, info)))
    grads: list[dict] = []  # the averaged gradients each optimizer step sees
    step = trainer.opt.step

    def recording_step(*a, **k):
        grads.append({n: p.grad.cpu().clone() for n, p in model.named_parameters() if p.grad is not None})
        return step(*a, **k)

    trainer.opt.step = recording_step
    trainer.fit()
    if info.is_main:
        torch.save({"model": {k: v.cpu() for k, v in model.state_dict().items()}, "grads": grads, "skipped": trainer.skipped,
                    "steps": trainer.global_step, "world_size": info.world_size}, out)
    shutdown(info)
