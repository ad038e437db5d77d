"""Gate fine-tuning: keep fractions move to targets, straight-through gradients, no-reactivation
monotone masks, exact resume."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from nested_svit import SparseViT, ViTConfig
from nested_svit.methods.svit import keep_ratio_loss
from nested_svit.training import TrainConfig, Trainer

TARGETS = (0.8, 0.5, 0.2)


def tiny_model(seed: int = 0, **overrides) -> SparseViT:
    torch.manual_seed(seed)
    cfg = ViTConfig(embed_dim=32, num_heads=2, depth=4, patch_size=8, img_size=32, num_classes=4,
                    gate_blocks=(1, 2, 3), keep_targets=TARGETS, **overrides)
    return SparseViT(cfg)


def tiny_data(n: int = 64, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 4, (n,), generator=g))


def keep_fractions(model: SparseViT, images: torch.Tensor) -> torch.Tensor:
    model.eval().set_execution("packed")
    with torch.no_grad():
        _, usage = model.forward_features(images, return_usage=True)
    return usage.gate_keep_fraction()


@pytest.mark.parametrize("kind", ["dynamic", pytest.param("fixed", marks=pytest.mark.slow)])
def test_training_drives_keep_fractions_to_targets(kind):
    model = tiny_model()
    data = tiny_data()
    with torch.no_grad():  # start every gate far from its target: keep almost everything
        for gate in model.gates:
            gate.shift_margin(6.0)
    before = keep_fractions(model, data.tensors[0])
    cfg = TrainConfig(epochs=100, batch_size=32, lr=1e-4, gate_lr=3e-2, ratio_weight=20.0, ratio_loss=kind)
    Trainer(model, data, cfg).fit(max_steps=60)
    after = keep_fractions(model, data.tensors[0])
    targets = torch.tensor(TARGETS)
    assert ((before - targets).abs() > 0.15).all()
    assert ((after - targets).abs() < 0.1).all(), (kind, after.tolist())


def test_fixed_loss_is_per_image_and_dynamic_is_batch_average():
    """Hand-computed values of Eq. 2 / Eq. 3 on a known mask."""
    from nested_svit.model import TokenUsage

    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.float32).flatten()
    decided = torch.ones(8, dtype=torch.bool)
    usage = TokenUsage(torch.zeros(2, 1), torch.tensor([4, 4]), (0,), [mask], [decided])
    assert float(keep_ratio_loss(usage, [0.5], "dynamic")) == pytest.approx((5 / 8 - 0.5) ** 2)
    assert float(keep_ratio_loss(usage, [0.5], "fixed")) == pytest.approx(((1 - 0.5) ** 2 + (0.25 - 0.5) ** 2) / 2)


def test_straight_through_gradients_reach_gates_and_backbone():
    model = tiny_model().train().set_execution("masked")
    images, labels = tiny_data(16).tensors
    feats, usage = model.forward_features(images, return_usage=True)
    task = torch.nn.functional.cross_entropy(model.forward_head(feats), labels)
    task.backward()  # task loss alone: gates get gradient through masked attention and the output mix
    for k in range(3):
        assert model.gates[k].mlp.fc1.weight.grad.abs().sum() > 0, k
    assert model.blocks[3].attn.qkv.weight.grad.abs().sum() > 0
    model.zero_grad()
    _, usage = model.forward_features(images, return_usage=True)
    keep_ratio_loss(usage, TARGETS).backward()  # ratio loss alone reaches every gate
    for k in range(3):
        assert model.gates[k].mlp.fc2.weight.grad.abs().sum() > 0, k


def test_no_reactivation_masks_are_monotone():
    model = tiny_model(reactivation=False).train().set_execution("masked")
    images, _ = tiny_data(16).tensors
    _, usage = model.forward_features(images, return_usage=True)
    masks = [m.detach() for m in usage.masks]
    assert any(bool((m > 0).any() and (m == 0).any()) for m in masks)
    for prev, cur in zip(masks, masks[1:]):
        assert bool((cur <= prev).all())
    # with reactivation the same model may re-pick tokens: the constraint is what makes it monotone
    model_r = tiny_model().train().set_execution("masked")
    torch.manual_seed(1)
    _, usage_r = model_r.forward_features(images, return_usage=True)
    assert any(bool((c > p).any()) for p, c in zip(usage_r.masks, usage_r.masks[1:]))


def test_resume_equals_uninterrupted(tmp_path):
    def flip(img: torch.Tensor) -> torch.Tensor:
        return img.flip(-1) if torch.rand(()) < 0.5 else img

    cfg = TrainConfig(epochs=3, batch_size=16, lr=1e-3, gate_lr=1e-2, seed=3, warmup_steps=2)
    data = tiny_data(48)
    straight = Trainer(tiny_model(), data, cfg, augment=flip)
    straight.fit(max_steps=7)  # 3 steps per epoch: stops mid-epoch 2

    first = Trainer(tiny_model(), data, cfg, augment=flip, checkpoint_path=tmp_path / "ck.pth")
    first.fit(max_steps=4)
    first.save()
    torch.manual_seed(12345)  # disturb the global RNG: resume must restore it
    resumed = Trainer(tiny_model(seed=99), data, cfg, augment=flip)
    resumed.resume(tmp_path / "ck.pth")
    assert (resumed.epoch, resumed.step_in_epoch, resumed.global_step) == (1, 1, 4)
    resumed.fit(max_steps=3)
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert straight.opt.param_groups[0]["lr"] == resumed.opt.param_groups[0]["lr"]


def test_train_cli_runs_and_resumes(tmp_path):
    from datasets_fixtures import write_image_folder

    from nested_svit.cli import main

    write_image_folder(tmp_path / "train", per_class=4)  # 12 labelled images, ImageNet labels 0-2
    out = tmp_path / "ft.pth"
    args = ["train", "--model", "svit_tiny", "--img-size", "64", "--data", str(tmp_path / "train"),
            "--epochs", "1", "--batch-size", "4", "--workers", "0", "--device", "cpu", "--threads", "2",
            "--log-every", "1", "--out", str(out)]
    assert main(args) == 0
    state = torch.load(out, weights_only=False)
    assert (state["epoch"], state["global_step"]) == (1, 3)
    logs = [line for line in out.with_suffix(".log.jsonl").read_text().splitlines() if line]
    assert len(logs) == 3 and all(len(__import__("json").loads(s)["keep"]) == 9 for s in logs)
    args[args.index("--epochs") + 1] = "2"
    assert main(args) == 0  # same --out: resumes at epoch 1 and trains one more epoch
    state = torch.load(out, weights_only=False)
    assert (state["epoch"], state["global_step"]) == (2, 6)
