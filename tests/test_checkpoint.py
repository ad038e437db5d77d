"""Checkpoint formats: timm/DeiT state dicts and the official SViT layout, checked against
independent forwards (timm itself; a hand-written per-image forward of the official layout)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import rel_err
from torch import nn

from nested_svit import create_model, load_checkpoint
from nested_svit.checkpoint import CheckpointError

timm = pytest.importorskip("timm")


@pytest.fixture(scope="module")
def timm_deit_small():
    torch.manual_seed(0)
    model = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
    with torch.no_grad():  # non-trivial values everywhere (timm zero-inits biases and cls/pos)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


@pytest.fixture(scope="module")
def images():
    return torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(1))


def test_timm_deit_small_logits(timm_deit_small, images, tmp_path):
    path = tmp_path / "deit_small.pth"
    torch.save({"model": timm_deit_small.state_dict(), "epoch": 3}, path)  # DeiT release layout
    ours = create_model("deit_small_patch16_224").eval()
    report = load_checkpoint(ours, path)
    assert report.format == "timm" and report.sha256 and len(report.sha256) == 64
    with torch.no_grad():
        expected = timm_deit_small(images)
        assert rel_err(ours(images), expected) <= 1e-5
        feats = ours.forward_features(images)  # a tensor, as timm's
        assert rel_err(feats, timm_deit_small.forward_features(images)) <= 1e-5


def test_timm_weights_in_svit_with_open_gates(timm_deit_small, images):
    svit = create_model("svit_small").eval()
    report = load_checkpoint(svit, {k: v for k, v in timm_deit_small.state_dict().items()})
    assert any("gates keep their initialisation" in n for n in report.notes)
    svit.gates_open = True
    with torch.no_grad():
        expected = timm_deit_small(images)
        for backend in ("loop", "padded", "nested"):
            svit.set_execution("packed", backend)
            logits = svit(images)
            assert rel_err(logits, expected) <= 1e-5, backend
        _, usage = svit.forward_features(images, return_usage=True)
    assert usage.kept.eq(197).all()


# ------------------------------------------------------------------ official SViT layout
C, HEADS, DEPTH, GATES = 384, 6, 12, 9


def official_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Known tensors in the official release's key layout (svit_s: gates before blocks 4..12)."""
    g = torch.Generator().manual_seed(seed)

    def t(*shape, std=0.02):
        return torch.randn(*shape, generator=g) * std

    sd = {"cls_token": t(1, 1, C), "pos_embed": t(1, 197, C), "patch_embed.proj.weight": t(C, 3, 16, 16),
          "patch_embed.proj.bias": t(C), "norm.weight": 1 + t(C), "norm.bias": t(C),
          "head.weight": t(1000, C), "head.bias": t(1000)}
    for i in range(DEPTH):
        p = f"blocks.{i}.TransformerEncoderLayer."
        sd |= {p + "self_attn.in_proj_weight": t(3 * C, C), p + "self_attn.in_proj_bias": t(3 * C),
               p + "self_attn.out_proj.weight": t(C, C), p + "self_attn.out_proj.bias": t(C),
               p + "linear1.weight": t(4 * C, C), p + "linear1.bias": t(4 * C),
               p + "linear2.weight": t(C, 4 * C), p + "linear2.bias": t(C),
               p + "norm1.weight": 1 + t(C), p + "norm1.bias": t(C),
               p + "norm2.weight": 1 + t(C), p + "norm2.bias": t(C)}
    for k in range(GATES):
        p = f"selective_modules.{k}."
        # gate weights large enough that decisions sit far from the threshold
        sd |= {p + "norm.weight": 1 + t(C), p + "norm.bias": t(C),
               p + "mlp.fc1.weight": t(C // 4, C, std=1 / math.sqrt(C)), p + "mlp.fc1.bias": t(C // 4),
               p + "mlp.fc2.weight": t(2, C // 4, std=1.0), p + "mlp.fc2.bias": t(2, std=0.5)}
    return sd


def official_forward(sd: dict[str, torch.Tensor], image: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Hand-written forward of one image in the official layout: nn.TransformerEncoderLayer blocks
    (norm_first, GELU, eps 1e-5), SelectiveModule gates (argmin of log-softmax; gates 0-7 never
    prune the class token, the last gate may), kept tokens only through each gated block."""
    x = F.conv2d(image[None], sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=16)
    x = torch.cat([sd["cls_token"], x.flatten(2).transpose(1, 2)], 1) + sd["pos_embed"]  # [1, 197, C]
    layer = nn.TransformerEncoderLayer(C, HEADS, 4 * C, dropout=0.0, activation="gelu", batch_first=True,
                                       norm_first=True).eval()
    kept = []
    for i in range(DEPTH):
        p = f"blocks.{i}.TransformerEncoderLayer."
        layer.load_state_dict({k[len(p):]: v for k, v in sd.items() if k.startswith(p)})
        keep = torch.ones(x.shape[1], dtype=torch.bool)
        if i >= 3:
            g = f"selective_modules.{i - 3}."
            h = F.layer_norm(x[0], (C,), sd[g + "norm.weight"], sd[g + "norm.bias"], eps=1e-5)
            h = F.gelu(F.linear(h, sd[g + "mlp.fc1.weight"], sd[g + "mlp.fc1.bias"]))
            scale = F.log_softmax(F.linear(h, sd[g + "mlp.fc2.weight"], sd[g + "mlp.fc2.bias"]), -1)
            keep = torch.argmin(scale, -1).bool()
            if i - 3 < GATES - 1:
                keep[0] = True
        kept.append(int(keep.sum()))
        if keep.any():
            x = x.clone()
            x[0, keep] = layer(x[:, keep])[0]
    x = F.layer_norm(x, (C,), sd["norm.weight"], sd["norm.bias"], eps=1e-6)
    return F.linear(x[0, 0], sd["head.weight"], sd["head.bias"]), kept


def test_official_svit_layout(images):
    sd = official_state_dict()
    model = create_model("svit_small").eval()
    report = load_checkpoint(model, {"model": sd})
    assert report.format == "svit"
    assert all(b.norm1.eps == 1e-5 for b in model.blocks)
    with torch.no_grad():
        expected = [official_forward(sd, img) for img in images]
        model.set_execution("packed")
        feats, usage = model.forward_features(images, return_usage=True)
        logits = model.forward_head(feats)
    assert usage.kept.tolist() == [k for _, k in expected]
    assert len({tuple(k) for _, k in expected}) > 1, "images should keep different counts"
    assert 0 < usage.kept[:, 3:].float().mean() / 197 < 0.9
    assert rel_err(logits, torch.stack([e for e, _ in expected])) <= 1e-5


# ------------------------------------------------------------------ errors and notes
def test_wrong_keys_listed_in_one_error():
    sd = create_model("deit_tiny_patch16_224").state_dict()
    sd.pop("blocks.3.attn.qkv.weight")
    sd["blocks.0.attn.extra"] = torch.zeros(1)
    sd["head.weight"] = torch.zeros(10, 192)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(create_model("deit_tiny_patch16_224"), sd)
    msg = str(e.value)
    assert "missing (1): blocks.3.attn.qkv.weight" in msg
    assert "unexpected (1): blocks.0.attn.extra" in msg
    assert "head.weight: checkpoint (10, 192) vs model (1000, 192)" in msg


def test_svit_checkpoint_into_dense_model_is_an_error():
    with pytest.raises(CheckpointError, match="unexpected"):
        load_checkpoint(create_model("deit_small_patch16_224"), official_state_dict())


def test_unreadable_checkpoint(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        load_checkpoint(create_model("deit_tiny_patch16_224"), bad)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(create_model("deit_tiny_patch16_224"), tmp_path / "missing.pth")


def test_pos_embed_interpolated_with_note():
    src = create_model("deit_tiny_patch16_224", img_size=224)
    dst = create_model("deit_tiny_patch16_224", img_size=384)
    report = load_checkpoint(dst, src.state_dict())
    assert any("interpolated" in n for n in report.notes)
    pos = dst.pos_embed.detach()
    assert pos.shape == (1, 1 + 24 * 24, 192)
    assert torch.equal(pos[:, 0], src.pos_embed.detach()[:, 0])  # class position copied
    grid = src.pos_embed.detach()[0, 1:].reshape(14, 14, 192).permute(2, 0, 1)[None]
    expected = F.interpolate(grid, size=(24, 24), mode="bicubic", align_corners=False)
    assert torch.allclose(pos[0, 1:], expected[0].permute(1, 2, 0).reshape(-1, 192), atol=1e-6)
