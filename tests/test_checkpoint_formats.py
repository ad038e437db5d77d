"""The weights users have, loaded as they are: files written here by the real libraries (``safetensors``,
``timm``, ``transformers``, ``huggingface_hub``'s cache layout), each compared with the model it was
written from, through ``load_model``, ``load_checkpoint``, ``predict`` and ``eval``; the file's own
preprocessing and labels; ``save_pretrained`` read back by timm and by us."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import warnings
from importlib import resources
from pathlib import Path

import pandas as pd
import pytest
import torch

from nested_svit import create_model, load_checkpoint, load_model, save_pretrained
from nested_svit.checkpoint import CheckpointError
from nested_svit.cli import main

ASSETS = resources.files("nested_svit.assets")
DIGITS = Path(str(ASSETS / "digits_samples"))
DIGITS_PTH = str(ASSETS / "svit_digits.pth")
RUN = ["--workers", "0", "--threads", "1", "--batch-size", "4"]
REV = "0123456789abcdef0123456789abcdef01234567"
HUB_NAME = "timm/deit_tiny_patch16_224.fb_in1k"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def logits_of(model, size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return x, model.eval()(x)


def same_weights(ours, theirs, size: int, **inputs) -> float:
    """Relative logit difference of two libraries' models in float64, where their fp32 kernels' rounding
    (oneDNN vs MKL, ~1e-6) is gone and only a loading error would show."""
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        a = ours.double().eval()(x)
        b = theirs.double().eval()(**{inputs.get("key", "x"): x}) if inputs else theirs.double().eval()(x)
        b = getattr(b, "logits", b)
    ours.float(), theirs.float()
    return rel(a, b)


def quiet_load(source, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_model(source, **kwargs)


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("digits") / "val"
    for d in ("2", "6"):  # 3 + 4 images
        shutil.copytree(DIGITS / d, root / d)
    return root


@pytest.fixture(scope="module")
def timm_deit(tmp_path_factory):
    """A timm DeiT-T (random weights) written by timm as a Hugging Face cache entry, and as a ``.pth``."""
    timm = pytest.importorskip("timm")
    from timm.models import save_for_hf

    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    model = timm.create_model(HUB_NAME.split("/")[1], pretrained=False).eval()
    repo = root / "hub" / f"models--{HUB_NAME.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REV)
    save_for_hf(model, str(repo / "snapshots" / REV), safe_serialization=True)
    torch.save(model.state_dict(), root / "deit_tiny.pth")
    return model, root


# ---------------------------------------------------------------- readers
def test_safetensors_of_every_header_length_loads_exactly(tmp_path):
    """The reader once decoded a file's first 16 bytes as UTF-8 and called about half of all safetensors
    files 'a text file': headers of 10 lengths over a 320-byte span all load, to the source's logits."""
    from safetensors.torch import save_file

    source = create_model("vit_digits").eval()
    x, expected = logits_of(source, 32)
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    texty = 0
    for pad in range(0, 320, 32):
        path = tmp_path / f"m{pad}.safetensors"
        save_file(state, str(path), metadata={"pad": "x" * pad})
        try:
            path.read_bytes()[:16].decode("utf-8")
            texty += 1
        except UnicodeDecodeError:
            pass
        model = create_model("vit_digits")
        load_checkpoint(model, path)
        with torch.no_grad():
            assert rel(model.eval()(x), expected) <= 1e-6, pad
    assert texty > 0  # the case that was refused is among them


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "timm_model.", "module._orig_mod."])
def test_prefixes_are_stripped_wherever_the_file_came_from(tmp_path, prefix):
    source = create_model("svit_digits").eval()
    x, expected = logits_of(source, 32)
    path = tmp_path / "p.pth"
    torch.save({"model": {prefix + k: v for k, v in source.state_dict().items()}}, path)
    model = quiet_load(path)
    assert model.name == "svit_digits" and model.num_gates == 9  # an SViT file, not "a ViT with no gates"
    with torch.no_grad():
        assert rel(model(x), expected) <= 1e-6


def test_timm_hub_cache_loads_offline_as_timm_loads_it(timm_deit, monkeypatch):
    model, root = timm_deit
    monkeypatch.setenv("HF_HUB_CACHE", str(root / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ours = quiet_load(f"hf-hub:{HUB_NAME}")
    assert same_weights(ours, model, 224) <= 1e-12
    # its pretrained_cfg (crop_pct 0.9, not DeiT's 0.875 of our registry) is the model's
    assert ours.pretrained_cfg["crop_pct"] == model.pretrained_cfg["crop_pct"] == 0.9
    assert ours.pretrained_given["crop_pct"] == f"hf-hub:{HUB_NAME} config.json"


@pytest.mark.slow
def test_timm_itself_reads_the_same_cache_entry_offline(timm_deit):
    """The cache layout the tests write is the one timm and huggingface_hub read (a fresh process:
    huggingface_hub reads its environment at import)."""
    model, root = timm_deit
    code = (f"import timm, torch; m = timm.create_model('hf-hub:{HUB_NAME}', pretrained=True); "
            f"print(sum(float(p.double().sum()) for p in m.state_dict().values()))")
    env = {**os.environ, "HF_HUB_CACHE": str(root / "hub"), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout) == pytest.approx(sum(float(p.double().sum()) for p in model.state_dict().values()))


def test_hub_name_not_in_the_cache_is_one_line_saying_where_it_looked(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(CheckpointError, match=r"not in the Hugging Face cache \(looked in .*empty.*hf download timm/x"):
        load_model("hf-hub:timm/x")
    assert main(["predict", "--checkpoint", "hf-hub:timm/x", "--input", str(DIGITS), "--out", str(tmp_path / "p.csv"),
                 *RUN]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "hf download timm/x" in err[0] and not (tmp_path / "p.csv").exists()


def test_hub_cache_and_pth_give_the_same_predict_rows_with_the_files_transform(timm_deit, tmp_path, monkeypatch,
                                                                               digits_folder):
    _, root = timm_deit
    monkeypatch.setenv("HF_HUB_CACHE", str(root / "hub"))
    hub, pth = tmp_path / "hub.csv", tmp_path / "pth.csv"
    assert main(["predict", "--checkpoint", f"hf-hub:{HUB_NAME}", "--input", str(digits_folder), "--out", str(hub),
                 *RUN]) == 0
    # the bare .pth has no config: our registry's DeiT-T eval (crop 0.875); given the file's crop it is the same run
    assert main(["predict", "--checkpoint", str(root / "deit_tiny.pth"), "--crop-pct", "0.9", "--input",
                 str(digits_folder), "--out", str(pth), *RUN]) == 0
    a, b = pd.read_csv(hub), pd.read_csv(pth)
    assert len(a) == 7 and a.drop(columns="seconds", errors="ignore").equals(b.drop(columns="seconds", errors="ignore"))
    meta = json.loads(Path(str(hub) + ".meta.json").read_text())
    assert meta["transform"]["crop_pct"] == 0.9 and meta["transform"]["resize_to"] == 248
    assert meta["transform"]["from"]["crop_pct"] == f"hf-hub:{HUB_NAME} config.json"
    assert json.loads(Path(str(pth) + ".meta.json").read_text())["transform"]["from"]["crop_pct"] == "flag"


def _transformers_vit(tmp_path: Path, processor: str):
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=2, intermediate_size=256,
                                    image_size=32, patch_size=4, num_labels=3, id2label={0: "ant", 1: "bee", 2: "cat"},
                                    label2id={"ant": 0, "bee": 1, "cat": 2})
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(config).eval()
    model.save_pretrained(tmp_path)
    if processor == "deit":  # DeiT's processor: 40 x 40 (squashed), then a 32 crop, bicubic
        transformers.DeiTImageProcessor(size={"height": 40, "width": 40}, crop_size={"height": 32, "width": 32},
                                        image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(tmp_path)
    return model


def test_transformers_vit_layout_loads_with_its_eps_labels_and_processor(tmp_path):
    source = _transformers_vit(tmp_path, "deit")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = source(pixel_values=x).logits
    ours = quiet_load(tmp_path)
    with torch.no_grad():  # in fp32 within the two libraries' kernel rounding; in float64 exact
        assert rel(ours(x), expected) <= 1e-5
    assert same_weights(ours, source, 32, key="pixel_values") <= 1e-12
    assert ours.blocks[0].norm1.eps == ours.norm.eps == 1e-12  # layer_norm_eps carried
    assert ours.class_names == ["ant", "bee", "cat"]
    cfg = ours.pretrained_cfg
    assert (cfg["crop_mode"], cfg["crop_pct"], cfg["interpolation"], cfg["mean"]) == ("squash", 0.8, "bicubic", (0.5,) * 3)
    # the same weights without their config.json (a bare state dict in the transformers layout) load too
    from safetensors.torch import load_file

    bare = {"vit." + k if not k.startswith(("vit.", "classifier")) else k: v
            for k, v in load_file(tmp_path / "model.safetensors").items()}
    model = create_model("vit_digits", depth=3, num_classes=3, block_norm_eps=1e-12, norm_eps=1e-12)
    load_checkpoint(model, bare)
    assert same_weights(model, source, 32, key="pixel_values") <= 1e-12


def test_transformers_processor_transform_is_the_one_used(tmp_path):
    """The squash-then-crop transform of a DeiT processor, on an image, equals transformers' own
    processor's pixels (within Pillow-vs-its-resize rounding)."""
    transformers = pytest.importorskip("transformers")
    from PIL import Image

    from nested_svit.data import EvalTransform

    _transformers_vit(tmp_path, "deit")
    ours = quiet_load(tmp_path)
    image = Image.open(next((DIGITS / "3").iterdir())).convert("RGB").resize((57, 45))
    theirs = transformers.AutoImageProcessor.from_pretrained(tmp_path, use_fast=False)(image, return_tensors="pt")
    mine = EvalTransform.for_model(ours.pretrained_cfg, 32)(image)
    assert mine.shape == theirs["pixel_values"][0].shape
    assert float((mine - theirs["pixel_values"][0]).abs().mean()) < 0.02


def test_transformers_distilled_deit_is_refused_by_name(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.DeiTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                                     image_size=32, patch_size=4, num_labels=3)
    transformers.DeiTForImageClassificationWithTeacher(config).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="distilled DeiT"):
        load_model(tmp_path)


def test_timm_variants_are_refused_by_name(tmp_path):
    timm = pytest.importorskip("timm")
    for name, kwargs, what in [("deit_tiny_distilled_patch16_224", {}, "distilled DeiT"),
                               ("deit3_small_patch16_224", {}, "no_embed_class"),
                               ("vit_small_patch16_224", {"reg_tokens": 4}, "register tokens"),
                               ("vit_small_patch16_224", {"class_token": False, "global_pool": "avg"}, "without a class token")]:
        path = tmp_path / f"{name}.pth"
        small = dict(embed_dim=64, depth=2, num_heads=2)  # the layout is what is refused, not the size
        torch.save(timm.create_model(name, pretrained=False, img_size=32, **small, **kwargs).state_dict(), path)
        with pytest.raises(CheckpointError, match=what):
            load_model(path)


def test_timm_train_file_with_its_own_head_needs_no_flags(tmp_path, digits_folder, capsys):
    """timm's train.py layout: arch, state_dict, state_dict_ema, args; a 10-class head from the file."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(1)
    source = timm.create_model("vit_small_patch32_224", pretrained=False, num_classes=10, img_size=64, depth=3).eval()
    path = tmp_path / "model_best.pth.tar"
    torch.save({"epoch": 3, "arch": "vit_small_patch32_224", "state_dict": source.state_dict(),
                "state_dict_ema": source.state_dict(), "args": argparse.Namespace(model="vit_small_patch32_224", lr=1e-3),
                "version": 2}, path)
    ours = quiet_load(path)
    assert (ours.name, ours.num_classes, ours.config.img_size, ours.config.num_tokens) == ("vit_small_patch32_224", 10, 64, 5)
    assert same_weights(ours, source, 64) <= 1e-12
    out = tmp_path / "p.csv"
    assert main(["predict", "--checkpoint", str(path), "--input", str(digits_folder), "--out", str(out), *RUN]) == 0
    assert "timm's vit_small_patch32_224 (a timm train.py file): running vit_small_patch32_224 at 64 px, 10 classes" \
        in capsys.readouterr().err


def test_a_checkpoint_trained_at_another_size_runs_at_its_own(tmp_path, digits_folder, capsys):
    source = create_model("vit_digits", img_size=48).eval()
    path = tmp_path / "vit48.pth"
    torch.save(source.state_dict(), path)
    ours = quiet_load(path, name="vit_digits")  # even named: the file's size
    assert ours.config.img_size == 48
    x, expected = logits_of(source, 48)
    with torch.no_grad():
        assert rel(ours(x), expected) <= 1e-6
    out = tmp_path / "p.csv"
    assert main(["predict", "--checkpoint", str(path), "--img-size", "32", "--input", str(digits_folder),
                 "--out", str(out), *RUN]) == 0
    err = capsys.readouterr().err
    assert "pos_embed interpolated" in err and "not 32 px" in err
    assert any("pos_embed interpolated" in n for n in json.loads(Path(str(out) + ".meta.json").read_text())["checkpoint_notes"])


def test_the_files_mean_and_std_are_used_and_a_flag_overrides_them(tmp_path, digits_folder):
    """timm's augreg ViTs: mean = std = 0.5 in their config.json, not ImageNet's."""
    source = create_model("vit_digits").eval()
    folder = tmp_path / "augreg"
    save_pretrained(source, folder)
    config = json.loads((folder / "config.json").read_text())
    config["pretrained_cfg"].update(mean=[0.5] * 3, std=[0.5] * 3, crop_pct=0.9)
    del config["nested_svit"]  # as timm writes it: nothing of ours
    (folder / "config.json").write_text(json.dumps(config))
    out, flagged = tmp_path / "p.csv", tmp_path / "q.csv"
    assert main(["predict", "--checkpoint", str(folder), "--input", str(digits_folder), "--out", str(out), *RUN]) == 0
    transform = json.loads(Path(str(out) + ".meta.json").read_text())["transform"]
    assert transform["mean"] == [0.5] * 3 and transform["crop_pct"] == 0.9
    assert transform["from"]["mean"] == f"{folder} config.json" and transform["from"]["interpolation"] == f"{folder} config.json"
    assert main(["predict", "--checkpoint", str(folder), "--mean", "0.485,0.456,0.406", "--input", str(digits_folder),
                 "--out", str(flagged), *RUN]) == 0
    transform = json.loads(Path(str(flagged) + ".meta.json").read_text())["transform"]
    assert transform["mean"] == [0.485, 0.456, 0.406] and transform["from"]["mean"] == "flag"
    assert transform["std"] == [0.5] * 3


@pytest.mark.parametrize("what", ["truncated", "json", "empty folder", "zip", "bad index"])
def test_a_corrupt_or_foreign_checkpoint_is_one_line_before_any_image(tmp_path, what, capsys):
    from safetensors.torch import save_file

    path = tmp_path / "ckpt"
    if what == "truncated":
        save_file({"w": torch.zeros(100)}, str(tmp_path / "full.safetensors"))
        path = tmp_path / "m.safetensors"
        path.write_bytes((tmp_path / "full.safetensors").read_bytes()[:200])
    elif what == "json":
        path = tmp_path / "config.json"
        path.write_text('{"architecture": "deit_small_patch16_224"}')
    elif what == "empty folder":
        path.mkdir()
        (path / "config.json").write_text("{}")
    elif what == "zip":
        shutil.make_archive(str(tmp_path / "a"), "zip", str(DIGITS / "3"))
        path = tmp_path / "a.zip"
    else:
        path.mkdir()
        (path / "model.safetensors.index.json").write_text("[1, 2]")
    out = tmp_path / "p.csv"
    assert main(["predict", "--checkpoint", str(path), "--input", str(DIGITS), "--out", str(out), *RUN]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(path.name) in err[0] and not out.exists(), err


# ---------------------------------------------------------------- writing
def test_save_pretrained_round_trips_through_timm_and_through_us(tmp_path):
    timm = pytest.importorskip("timm")
    dense, pruned = create_model("vit_digits").eval(), create_model("svit_digits").eval()
    dense.class_names = [f"digit {i}" for i in range(10)]
    save_pretrained(dense, tmp_path / "dense")
    save_pretrained(pruned, tmp_path / "pruned")
    theirs = timm.create_model(f"local-dir:{tmp_path / 'dense'}", pretrained=True).eval()
    assert same_weights(dense, theirs, 32) <= 1e-12
    assert timm.data.resolve_data_config(model=theirs)["crop_pct"] == 1.0
    back = quiet_load(tmp_path / "dense")
    assert back.class_names == dense.class_names and back.name == "vit_digits"
    x, expected = logits_of(pruned, 32)
    back = quiet_load(tmp_path / "pruned")
    with torch.no_grad():
        assert back.name == "svit_digits" and rel(back(x), expected) <= 1e-6
    # the weights file alone, copied out of its folder, still describes its model (its metadata)
    shutil.copy(tmp_path / "pruned" / "model.safetensors", tmp_path / "alone.safetensors")
    alone = quiet_load(tmp_path / "alone.safetensors")
    with torch.no_grad():
        assert alone.name == "svit_digits" and alone.config == pruned.config and rel(alone(x), expected) <= 1e-6


def test_train_export_writes_a_folder_predict_reads(tmp_path, digits_folder):
    export, out = tmp_path / "export", tmp_path / "t.pth"
    assert main(["train", "--model", "svit_digits", "--init", DIGITS_PTH, "--data", str(digits_folder), "--epochs", "1",
                 "--batch-size", "2", "--workers", "0", "--threads", "1", "--out", str(out), "--export", str(export)]) == 0
    assert sorted(p.name for p in export.iterdir()) == ["config.json", "model.safetensors"]
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    assert main(["predict", "--checkpoint", str(out), "--input", str(digits_folder), "--out", str(a), *RUN]) == 0
    assert main(["predict", "--checkpoint", str(export), "--input", str(digits_folder), "--out", str(b), *RUN]) == 0
    keep = [c for c in pd.read_csv(a).columns if c != "seconds"]
    assert pd.read_csv(a)[keep].equals(pd.read_csv(b)[keep])


# ---------------------------------------------------------------- a timm-shaped model
def test_create_model_takes_timms_keywords(tmp_path):
    source = create_model("svit_digits").eval()
    path = tmp_path / "s.pth"
    torch.save(source.state_dict(), path)
    x, expected = logits_of(source, 32)
    for model in (create_model("svit_digits", checkpoint_path=path),
                  create_model("svit_digits", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))):
        with torch.no_grad():
            assert rel(model.eval()(x), expected) <= 1e-6
    with pytest.raises(ValueError, match="downloads nothing.*checkpoint_path"):
        create_model("svit_digits", pretrained=True)
    model = create_model("svit_digits", num_classes=4, drop_path_rate=0.1, pretrained_cfg_overlay={"mean": (0.5,) * 3})
    assert model.num_classes == 4 and model.blocks[-1].drop_path == pytest.approx(0.1)
    assert model.pretrained_cfg["mean"] == (0.5,) * 3 and model.pretrained_cfg["input_size"] == (3, 32, 32)
    assert model.num_features == 64 and model.get_classifier() is model.head
    model.reset_classifier(7)
    assert model.eval()(torch.zeros(2, 3, 32, 32)).shape == (2, 7) and model.pretrained_cfg["num_classes"] == 7
    from nested_svit import list_models

    assert list_models("svit_*") == [n for n in list_models() if n.startswith("svit_")] and "svit_digits" in list_models("*digits")


def test_forward_features_is_a_tensor_and_usage_comes_on_request():
    model = create_model("svit_digits").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = model.forward_features(x)
        feats2, usage = model.forward_features(x, return_usage=True)
        logits, usage2 = model(x, return_usage=True)
        head = model.forward_head(feats)
    assert isinstance(feats, torch.Tensor) and feats.shape == (2, 65, 64) and torch.equal(feats, feats2)
    assert torch.equal(logits, head) and torch.equal(usage.kept, usage2.kept)


def test_a_plain_training_step_refuses_and_says_the_papers_way():
    model = create_model("svit_digits").train()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        model(x)  # a forward without gradients (evaluation in train mode) is not refused
    with pytest.raises(RuntimeError, match=r"no gradient.*set_execution\(model.training_execution\(\)\).*ratio_loss"):
        torch.nn.functional.cross_entropy(model(x), y).backward()
    model.set_execution(model.training_execution())  # the paper's way: the gates get their gradient
    logits, usage = model(x, return_usage=True)
    loss = torch.nn.functional.cross_entropy(logits, y) + model.method.ratio_loss(usage, model.config.keep_targets,
                                                                                  "dynamic")
    loss.backward()
    assert all(p.grad is not None for p in model.gates.parameters())
    frozen = create_model("svit_digits").train()
    frozen.gates.requires_grad_(False)  # gates frozen: the rest trains in the packed execution
    torch.nn.functional.cross_entropy(frozen(x), y).backward()
    assert frozen.head.weight.grad is not None


def test_timms_own_eval_helpers_give_our_eval_figures(tmp_path, digits_folder):
    """An outside client: resolve_data_config, create_transform, timm.utils.accuracy on our model."""
    pytest.importorskip("timm")
    from PIL import Image
    from timm.data import create_transform, resolve_data_config
    from timm.utils import accuracy

    out = tmp_path / "r.json"
    assert main(["eval", "imagenet", "--checkpoint", DIGITS_PTH, "--data", str(digits_folder), "--out", str(out),
                 *RUN]) == 0
    result = json.loads(out.read_text())
    model = quiet_load(DIGITS_PTH)
    config = resolve_data_config(model=model)
    assert config["input_size"] == (3, 32, 32) and config["crop_pct"] == 1.0
    transform = create_transform(**config)
    files = sorted(p for p in digits_folder.rglob("*.png"))
    images = torch.stack([transform(Image.open(f).convert("RGB")) for f in files])
    labels = torch.tensor([int(f.parent.name) for f in files])
    with torch.no_grad():
        top1, top5 = accuracy(model(images), labels, topk=(1, 5))
    assert result["num_images"] == len(files) == 7
    assert result["top1"] == pytest.approx(float(top1)) and result["top5"] == pytest.approx(float(top5))


# ---------------------------------------------------------------- labels
def test_labels_a_model_cannot_output_are_refused_or_dropped_loudly(tmp_path, capsys):
    data = tmp_path / "val"
    for wnid, digit in (("n01440764", "3"), ("n01443537", "5")):  # ImageNet classes 0 and 1: fine for 10 classes
        shutil.copytree(DIGITS / digit, data / wnid)
    shutil.copytree(DIGITS / "9", data / "n02102040")  # class 217: a 10-class model cannot output it
    out = tmp_path / "r.json"
    assert main(["eval", "imagenet", "--checkpoint", DIGITS_PTH, "--data", str(data), "--out", str(out), *RUN]) == 2
    err = capsys.readouterr().err
    assert "217" in err and "cannot output" in err and "--class-names" in err and not out.exists()
    assert main(["predict", "--checkpoint", DIGITS_PTH, "--input", str(data), "--out", str(tmp_path / "p.csv"), *RUN]) == 0
    assert "WARNING" in capsys.readouterr().err
    rows = pd.read_csv(tmp_path / "p.csv")
    assert sorted(rows.label.tolist()) == [-1, -1, 0, 0, 1, 1]


def test_hugging_face_named_flat_val_files_get_their_wnids_label(tmp_path):
    from nested_svit.data.records import resolve_records

    flat = tmp_path / "val"
    flat.mkdir()
    for i, (wnid, digit) in enumerate((("n01440764", "3"), ("n02102040", "7"))):
        src = next((DIGITS / digit).iterdir())
        shutil.copy(src, flat / f"ILSVRC2012_val_{i + 1:08d}_{wnid}.JPEG")
    (flat / "ILSVRC2012_val_00000003_n01440764.JPEG").write_bytes(next((DIGITS / "1").iterdir()).read_bytes())
    records = resolve_records(str(flat))
    by_name = dict(zip([Path(i).name for i in records.ids], records.labels))
    assert by_name == {"ILSVRC2012_val_00000001_n01440764.JPEG": 0, "ILSVRC2012_val_00000002_n02102040.JPEG": 217,
                       "ILSVRC2012_val_00000003_n01440764.JPEG": 0}
    assert records.label_source == "imagenet_wnid_in_name"


# ---------------------------------------------------------------- every format through every entry point
def _write_formats(source, root: Path, monkeypatch) -> dict[str, str]:
    """The same weights in each format a user has, written by the real libraries."""
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    torch.save(state, root / "plain.pth")
    save_file(state, str(root / "plain.safetensors"))
    torch.save({"arch": "vit_digits", "state_dict": {"_orig_mod." + k: v for k, v in state.items()},
                "args": argparse.Namespace(model="vit_digits")}, root / "train.pth.tar")
    save_pretrained(source, root / "folder")
    config = json.loads((root / "folder" / "config.json").read_text())
    del config["nested_svit"]  # a timm-style folder with nothing of ours
    (root / "folder" / "config.json").write_text(json.dumps(config))
    repo = root / "hub" / "models--someone--vit_digits"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REV)
    shutil.copytree(root / "folder", repo / "snapshots" / REV)
    monkeypatch.setenv("HF_HUB_CACHE", str(root / "hub"))
    return {"pth": str(root / "plain.pth"), "safetensors": str(root / "plain.safetensors"),
            "timm train.py": str(root / "train.pth.tar"), "folder": str(root / "folder"),
            "local-dir": f"local-dir:{root / 'folder'}", "hf-hub": "hf-hub:someone/vit_digits"}


@pytest.mark.slow  # ~7 s; each format's own fast test compares its model with the one it was written from
def test_every_format_gives_the_same_rows_and_figures_through_load_model_predict_and_eval(tmp_path, monkeypatch,
                                                                                          digits_folder):
    torch.manual_seed(3)
    source = create_model("vit_digits").eval()
    formats = _write_formats(source, tmp_path, monkeypatch)
    x, expected = logits_of(source, 32)
    rows, results = {}, {}
    for what, checkpoint in formats.items():
        model = quiet_load(checkpoint)
        with torch.no_grad():
            assert model.name == "vit_digits" and rel(model(x), expected) <= 1e-6, what
        into = create_model("vit_digits")
        load_checkpoint(into, checkpoint)
        with torch.no_grad():
            assert rel(into.eval()(x), expected) <= 1e-6, what
        out, res = tmp_path / f"{what}-rows.csv", tmp_path / f"{what}.json"
        assert main(["predict", "--checkpoint", checkpoint, "--input", str(digits_folder), "--out", str(out), *RUN]) == 0
        assert main(["eval", "imagenet", "--checkpoint", checkpoint, "--data", str(digits_folder), "--out", str(res),
                     *RUN]) == 0
        rows[what] = pd.read_csv(out).drop(columns="seconds", errors="ignore")
        results[what] = json.loads(res.read_text())
    for what in formats:
        assert rows[what].equals(rows["pth"]), what
        assert (results[what]["top1"], results[what]["top5"]) == (results["pth"]["top1"], results["pth"]["top5"]), what
        assert results[what]["transform"]["crop_pct"] == 1.0


def test_a_sharded_transformers_folder_loads(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=2, intermediate_size=256,
                                    image_size=32, patch_size=4, num_labels=3)
    torch.manual_seed(0)
    source = transformers.ViTForImageClassification(config).eval()
    source.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists() and not (tmp_path / "model.safetensors").exists()
    assert same_weights(quiet_load(tmp_path), source, 32, key="pixel_values") <= 1e-12


def test_a_processors_resize_is_the_transforms_for_every_size_pair():
    """crop_pct = crop / size in floats floors back to size - 1 for ~4% of pairs (224 / (224 / 256) is fine,
    others are not): the transform resizes to the processor's own size for all of them."""
    from nested_svit.checkpoint.describe import transformers_preprocessing
    from nested_svit.data import EvalTransform

    for side in range(8, 600):
        for crop in range(4, side + 1, 11):
            cfg = transformers_preprocessing({"size": {"height": side, "width": side}, "do_center_crop": True,
                                              "crop_size": {"height": crop, "width": crop}})
            assert EvalTransform(img_size=crop, crop_pct=cfg["crop_pct"], crop_mode="squash").resize_to == side
