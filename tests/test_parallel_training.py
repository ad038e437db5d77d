"""torchrun data-parallel training (nested_svit/parallel.py) against an independent single-process
reference: the mean of the per-shard losses, backpropagated, then one optimizer step."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from procs import run_torchrun as _torchrun

HERE = Path(__file__).parent


@pytest.mark.slow
def test_two_processes_equal_the_mean_of_shard_losses(tmp_path):
    """One epoch, batch 2 over 2 ranks (one image each) with a corrupt image: a rank whose shard is
    unreadable takes part without data, and the weights equal a reference that averages the losses of
    the readable shards (each with its (seed, step, rank) noise) and steps once per batch."""
    from coco_fixtures import make_coco

    ann, images = make_coco(tmp_path / "coco", corrupt=1)
    out = tmp_path / "ddp.pth"
    run = _torchrun(str(HERE / "parallel_worker.py"), str(ann), str(images), str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    got = torch.load(out, weights_only=True)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank: BatchNorm'd convolutions amplify the float noise of other thread counts
    try:
        _reference_and_compare(got, ann, images)
    finally:
        torch.set_num_threads(threads)


def _reference_and_compare(got: dict, ann: Path, images: Path) -> None:
    from parallel_worker import CONFIG, build

    from nested_svit.data.coco import collate_train
    from nested_svit.training import DetectorTrainer
    from nested_svit.detection import detector_losses
    from nested_svit.seeding import step_seed
    from nested_svit.training.loop import epoch_batches

    model, data = build(str(ann), str(images))
    trainer = DetectorTrainer(model, data, CONFIG)  # its optimizer and schedule; the loop is written here
    model.train().set_execution("masked")
    batches = epoch_batches(len(data), CONFIG.batch_size, CONFIG.seed, 0)
    skipped, grads = 0, []
    for step, batch in enumerate(batches):
        shards = []
        for rank in range(2):
            inputs, targets, bad = collate_train([data[i] for i in batch[rank::2]])
            skipped += bad
            if inputs:
                shards.append((rank, inputs, targets))
        trainer.opt.zero_grad(set_to_none=True)
        for rank, inputs, targets in shards:
            torch.manual_seed(step_seed(CONFIG.seed, step, rank))
            losses, _ = detector_losses(model, inputs, targets, CONFIG.ratio_loss, CONFIG.ratio_weight)
            (losses["loss"] / len(shards)).backward()
        if shards:
            grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
            trainer.opt.step()
            trainer.sched.step()
    assert got["world_size"] == 2 and got["steps"] == len(batches) == 2
    assert got["skipped"] == skipped == 1  # the corrupt image lands in exactly one shard of the epoch
    assert len(got["grads"]) == len(grads) == 2
    for mine, theirs in zip(got["grads"], grads):
        assert mine.keys() == theirs.keys()
        for name, g in theirs.items():  # the same thread count on both sides: equal up to the all-reduce's sums
            assert (mine[name] - g).abs().max() <= 1e-6 * (1 + g.abs().max()), name
    for k, v in model.state_dict().items():
        if v.is_floating_point() and "running" not in k:  # BN running statistics are rank 0's
            assert (got["model"][k] - v).abs().max() <= 1e-6, k
    moved = (got["model"]["backbone.gates.0.mlp.fc2.weight"] - build(str(ann), str(images))[0]
             .state_dict()["backbone.gates.0.mlp.fc2.weight"]).abs().max()
    assert moved > 1e-6


@pytest.mark.slow
def test_torchrun_cli_train_then_predict(tmp_path):
    """``torchrun nested-svit train`` (a classifier, 2 processes): one checkpoint and one log, written by
    rank 0, that ``predict`` reads; a batch size that does not split over the ranks is refused."""
    import numpy as np
    from PIL import Image

    root = tmp_path / "data"
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    out = tmp_path / "cls.pth"
    common = ["-m", "nested_svit.cli", "train", "--model", "svit_tiny", "--data", str(root), "--img-size",
              "32", "--epochs", "1", "--workers", "0", "--threads", "1", "--log-every", "1", "--out", str(out)]
    bad = _torchrun(*common, "--batch-size", "3")
    assert bad.returncode != 0 and "multiple of the 2 processes" in bad.stderr
    run = _torchrun(*common, "--batch-size", "4")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "on 2 processes" in run.stdout and run.stdout.count("trained") == 1
    state = torch.load(out, weights_only=True)
    assert state["global_step"] == 2
    assert len(out.with_suffix(".log.jsonl").read_text().splitlines()) == 2
    from nested_svit.cli import main

    assert main(["predict", "--checkpoint", str(out), "--input", str(root / "a"), "--out", str(tmp_path / "p.csv"),
                 "--workers", "0"]) == 0
