"""Reduced precision that keeps the decisions (``precision.set_precision``): the blocks' linears and
attention run in bf16, every decision is made in fp32, and the agreement report (``inference/agreement.py``) counts what changed.

The references: the gate (or predictor) in fp32 applied by hand to the bf16 feature map it was given;
an image-by-image comparison of the fp32 and bf16 models written here, not with the library's counter."""
from __future__ import annotations

from importlib import resources

import pytest
import torch

from nested_svit.inference.agreement import agreement, decisions_of
from nested_svit.precision import set_precision
from tests.model_fixtures import lively_model


def _copy(model):
    import copy

    return copy.deepcopy(model)


@pytest.mark.parametrize("name", ["svit_small", "dynamicvit_small"])
def test_bf16_decisions_are_made_in_fp32(name):
    """Each selector's output is the fp32 selector on the upcast bf16 map: fails if a gate ran in bf16."""
    model = lively_model(name)
    fp32_gates = _copy(model.gates)
    set_precision(model, "bf16")
    assert model.blocks[0].attn.qkv.weight.dtype == model.blocks[5].mlp.fc2.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.gates.parameters())
    fp32 = (model.head, model.norm, model.patch_embed, model.blocks[0].norm1, model.blocks[0].norm2)
    assert all(p.dtype == torch.float32 for m in fp32 for p in m.parameters())  # LayerNorms, stream, head
    seen = []

    def record(module, inputs, output):
        seen.append((module, inputs[0], output))

    hooks = [g.register_forward_hook(record) for g in model.gates]
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(images)
    for h in hooks:
        h.remove()
    assert logits.dtype == torch.float32
    # the gates' own forward is not what the methods call (margin / keep_log_prob): check those outputs
    checked = 0
    with torch.no_grad():
        for k, gate in enumerate(model.gates):
            x = torch.randn(40, model.config.embed_dim).bfloat16()
            if hasattr(gate, "margin"):
                got, want = gate.margin(x), fp32_gates[k].margin(x.float())
            else:
                image = torch.zeros(40, dtype=torch.int64)
                got, want = gate.keep_log_prob(x, image, 1), fp32_gates[k].keep_log_prob(x.float(), image, 1)
            assert got.dtype == torch.float32
            assert torch.equal(got, want)
            checked += 1
    assert checked == model.num_gates > 0


def test_agreement_counts_equal_an_image_by_image_comparison():
    """The library's counts against a per-image loop over both models' own outputs."""
    model = lively_model("svit_small")
    half = set_precision(_copy(model), "bf16")
    images = torch.randn(16, 3, 64, 64, generator=torch.Generator().manual_seed(4)) * 3
    result = agreement(decisions_of(half, images), decisions_of(model, images))
    tokens_equal = tokens = top1_equal = 0
    with torch.no_grad():
        for image in images:
            _, u32 = model.forward_features(image[None], return_usage=True)
            _, u16 = half.forward_features(image[None], return_usage=True)
            for m32, m16, d32, d16 in zip(u32.masks, u16.masks, u32.decided, u16.decided):
                decided = d32 | d16
                tokens += int(decided.sum())
                tokens_equal += int(((m32 == m16) & decided).sum())
            top1_equal += int(model(image[None]).argmax() == half(image[None]).argmax())
    assert (result.tokens_equal, result.tokens, result.top1_equal) == (tokens_equal, tokens, top1_equal)
    assert result.tokens > 0 and 0.9 < result.kept_tokens <= 1.0


def test_bf16_digits_model_agrees_with_fp32_on_its_samples():
    """The trained digits SViT on its 20 shipped samples: the same top-1 in bf16 as in fp32, and at least
    99% of the kept-token decisions (its gates' margins are mostly far from 0)."""
    from nested_svit.data.dataset import load_images_from_dir
    from nested_svit.inference import load_model

    assets = resources.files("nested_svit.assets")
    model = load_model(str(assets / "svit_digits.pth")).eval()
    half = set_precision(_copy(model), "bf16")
    images = load_images_from_dir(str(assets / "digits_samples"), 20, 32)
    result = agreement(decisions_of(half, images), decisions_of(model, images))
    assert result.images == 20 and result.top1 == 1.0
    assert result.kept_tokens >= 0.99, result.summary()


def test_predict_and_eval_in_bf16_carry_the_precision_and_the_agreement(tmp_path, capsys):
    """The digits demo end to end: rows carry their precision and, with --agreement-with fp32, each image's
    agreement counts; eval's result holds the run's agreement, which is the rows' counts added up."""
    import json

    import pandas as pd

    from nested_svit.cli import main

    assets = resources.files("nested_svit.assets")
    ckpt, data = str(assets / "svit_digits.pth"), str(assets / "digits_samples")
    assert main(["predict", "--demo", "--precision", "bf16", "--agreement-with", "fp32", "--workers", "0",
                 "--batch-size", "7", "--out", str(tmp_path / "p.csv")]) == 0
    rows = pd.read_csv(tmp_path / "p.csv")
    assert set(rows["precision"]) == {"bf16"} and len(rows) == 20
    assert rows["agree_tokens"].gt(0).all() and (rows["agree_tokens_equal"] <= rows["agree_tokens"]).all()
    meta = json.loads((tmp_path / "p.csv.meta.json").read_text())
    assert meta["precision"] == "bf16" and meta["agreement_with"] == "fp32" and meta["backend"] == "loop"
    assert main(["eval", "imagenet", "--model", "svit_digits", "--checkpoint", ckpt, "--data", data, "--precision",
                 "bf16", "--agreement-with", "fp32", "--workers", "0", "--batch-size", "6",
                 "--out", str(tmp_path / "r.json")]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    a = result["agreement"]
    assert a["with"] == "fp32" and a["images"] == 20 and a["top1"] == rows["agree_top1"].mean() == 1.0
    assert a["kept_tokens"] == rows["agree_tokens_equal"].sum() / rows["agree_tokens"].sum() >= 0.99
    assert "agreement with fp32: kept tokens" in capsys.readouterr().out
    assert main(["predict", "--demo", "--agreement-with", "fp32", "--out", str(tmp_path / "q.csv")]) == 2
    assert "give --precision bf16" in capsys.readouterr().err


def test_int8_linears_stay_within_their_bound_and_decide_in_fp32():
    """int8 (CPU): each block linear quantised per output channel, its input per token, equals a hand-written
    dequantised matmul exactly, and its output is within 2% of the fp32 linear's scale (8-bit weights and
    activations: the bound stated in bench/README.md); gates and head stay fp32; an image alone gives its
    row in a batch (integer accumulation is exact, every scale is the row's own)."""
    model = lively_model("svit_small")
    ref = _copy(model)
    set_precision(model, "int8")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    lin, ref_lin = model.blocks[4].mlp.fc1, ref.blocks[4].mlp.fc1
    assert lin.int8 is not None and model.gates[0].mlp.fc1.int8 is None and model.head.int8 is None
    x = torch.randn(50, lin.in_features, generator=torch.Generator().manual_seed(3))
    w = ref_lin.weight.detach()
    w_scale = w.abs().amax(1) / 127
    x_scale = x.abs().amax(1, keepdim=True) / 127
    want = (torch.round(x / x_scale) @ torch.round(w / w_scale[:, None]).t()) * x_scale * w_scale + ref_lin.bias
    with torch.no_grad():
        got, fp32 = lin(x), ref_lin(x)
    torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-5)
    assert (got - fp32).abs().max() <= 0.02 * fp32.abs().max()
    images = torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(4)) * 3
    with torch.no_grad():
        batched = model(images)
        assert all(torch.equal(model(images[i:i + 1])[0], batched[i]) for i in range(6))
        logits = ref(images)
    assert (batched - logits).abs().max() <= 0.1 * logits.abs().max()
    with pytest.raises(ValueError, match="int8 runs a classifier's block linears"):
        from nested_svit import create_detector

        set_precision(create_detector("svit_adapter_tiny_maskrcnn"), "int8")
