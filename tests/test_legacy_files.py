"""Files written by the code before the architecture refactor (tests/fixtures/legacy, made by
make_legacy_fixtures.py at commit d54ab1c) load in today's code and give the outputs they gave then:
classifier and detector train files (flat model configs, no file schema), a --save-calibrated file and a
detector file; train files resume."""
from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from nested_svit import load_checkpoint
from nested_svit.checkpoint.loader import classifier_from_file

LEGACY = Path(__file__).parent / "fixtures" / "legacy"


def unpacked(tmp_path: Path, name: str) -> Path:
    out = tmp_path / name
    with gzip.open(LEGACY / f"{name}.gz", "rb") as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst)
    return out


@pytest.fixture(scope="module")
def expected():
    return torch.load(LEGACY / "expected.pt", weights_only=True), torch.load(LEGACY / "inputs.pt", weights_only=True)


@pytest.mark.parametrize("name", ["classifier_train_svit", "classifier_train_evit", "calibrated_svit"])
def test_old_classifier_files(tmp_path, expected, name):
    outputs, inputs = expected
    path = unpacked(tmp_path, f"{name}.pth")
    model = classifier_from_file(path)
    report = load_checkpoint(model, path)
    assert report.format == "nested_svit" and model.class_names == ["a", "b", "c", "d"]  # our file (issue 26.10)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(inputs["images"]), outputs[name], atol=1e-6, rtol=1e-6)
    if name == "classifier_train_evit":  # the flat options became EViT's own
        from nested_svit.methods.evit import EViTOptions

        assert model.options == EViTOptions(fuse_token=True, preserve="input") and model.slots == 2


def test_old_classifier_train_file_resumes(tmp_path):
    from nested_svit.training import TrainConfig, Trainer

    path = unpacked(tmp_path, "classifier_train_svit.pth")
    model = classifier_from_file(path)
    data = TensorDataset(torch.randn(8, 3, 32, 32), torch.randint(0, 4, (8,)))
    trainer = Trainer(model, data, TrainConfig(epochs=2, batch_size=4, lr=1e-3, gate_lr=1e-2))
    trainer.resume(path)
    assert (trainer.epoch, trainer.global_step) == (1, 2)
    trainer.fit()
    assert (trainer.epoch, trainer.global_step) == (2, 4)
    trainer.save(tmp_path / "again.pth")  # today's schema, read back as a classifier file
    assert classifier_from_file(tmp_path / "again.pth").config == model.config


@pytest.mark.parametrize("name", ["detector_train_svit", "detector_saved_evit"])
def test_old_detector_files(tmp_path, expected, name):
    from nested_svit.detection.checkpoint import detector_from_file
    from nested_svit.detection.detector import MaskRCNNDetector

    outputs, inputs = expected
    path = unpacked(tmp_path, f"{name}.pth")
    model_name, cfg = detector_from_file(path)
    model = MaskRCNNDetector(cfg)
    model.name = model_name
    assert load_checkpoint(model, path).format == "nested_svit"
    model.eval().set_execution("packed")
    with torch.no_grad():
        feats, usage = model.backbone.forward_features(inputs["det_inputs"])
    assert torch.equal(usage.kept, outputs[name]["kept"])
    for got, want in zip(feats, outputs[name]["feats"]):
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    if name == "detector_train_svit":
        from nested_svit.training import DetectorTrainer, DetTrainConfig

        class Data:
            epoch = 0

            def __len__(self):
                return 2

        trainer = DetectorTrainer(model, Data(), DetTrainConfig(epochs=1, batch_size=2, warmup_steps=0))
        trainer.resume(path)
        assert (trainer.epoch, trainer.global_step) == (1, 1)
