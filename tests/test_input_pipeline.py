"""The input pipeline: uint8 batches normalised on the device (== the float transform, bit for bit),
batches prepared one ahead, the detector's one-copy batch upload, ``--decode gpu`` through its CPU code
path (torchvision's libjpeg-turbo decoder + torch's resize, the code nvjpeg feeds on a GPU) against the
Pillow path, with a per-file fallback, and ``--jpeg-draft``.

Tolerance of the device-side resize against Pillow's: at most 3 grey levels per pixel (2 when
downscaling; 3 seen only when upscaling tiny images 7x), at most 0.3 on average (torch's antialiased
bicubic and Pillow's fixed-point one round differently; both decoders are libjpeg-turbo and decode
identically)."""
from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image, ImageOps
from torchvision.transforms import functional as TF

import simcuda
from datasets_fixtures import smooth_image, write_awkward_folder
from nested_svit import create_model
from nested_svit.cli.main import main
from nested_svit.data import EvalTransform, open_dataset
from nested_svit.data.coco import collate_detection, upload_detection_batch
from nested_svit.data.dataset import collate_records
from nested_svit.data.decode import decode_image, jpeg_for_device
from nested_svit.data.device_decode import DeviceJpegDecoder, orient
from nested_svit.data.prefetch import prefetched

MAX_LEVELS, MEAN_LEVELS = 3, 0.3
TINY = ["--model", "svit_tiny", "--random-weights", "--threads", "2"]


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", **kw)
    return buf.getvalue()


def test_uint8_crop_then_device_normalise_is_the_float_transform():
    t = EvalTransform()
    img = smooth_image(np.random.default_rng(0), (333, 250))
    reference = TF.normalize(TF.pil_to_tensor(TF.center_crop(TF.resize(img, 256, TF.InterpolationMode.BICUBIC),
                                                             [224, 224])).float().div_(255), t.mean, t.std)
    crop = t.crop(img)
    assert crop.dtype == torch.uint8 and crop.shape == (3, 224, 224)
    assert torch.equal(t.normalize(crop[None])[0], reference)
    dev = simcuda.device()
    on_device = t.normalize(simcuda.to_device(crop[None]), torch.bfloat16)
    assert on_device.device.type == dev.type and on_device.dtype == torch.bfloat16
    assert torch.equal(simcuda.to_cpu(on_device)[0], reference.to(torch.bfloat16))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientations_match_pillow(orientation):
    img = smooth_image(np.random.default_rng(orientation), (48, 30))
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _jpeg(img, exif=exif)
    assert jpeg_for_device(data) == (orientation, "")
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    stored = TF.pil_to_tensor(Image.open(io.BytesIO(data)).convert("RGB"))
    assert torch.equal(orient(stored, orientation), TF.pil_to_tensor(upright.convert("RGB")))


@pytest.mark.parametrize("size", [(500, 375), (37, 23), (300, 300), (224, 500), (1200, 900)])
def test_device_resize_and_crop_within_tolerance_of_pillow(size):
    t = EvalTransform()
    img = smooth_image(np.random.default_rng(sum(size)), size)
    diff = (t.crop(img).int() - t.crop_tensor(TF.pil_to_tensor(img)).int()).abs()
    assert diff.max() <= MAX_LEVELS and diff.float().mean() <= MEAN_LEVELS, (diff.max(), diff.float().mean())


def _batch(dataset, indices):
    return collate_records([dataset[i] for i in indices])


def test_device_decoder_gives_the_pillow_pipeline_images_and_falls_back_per_file(tmp_path, monkeypatch):
    """Every awkward file ends as the CPU path has it: JPEGs decoded by the batched decoder within the
    resize tolerance, CMYK / PNG / 16-bit by Pillow (bit for bit), undecodable ones skipped with the
    same reason; a file the batched decoder refuses is retried alone and then decoded by Pillow."""
    kinds = write_awkward_folder(tmp_path / "in")
    t = EvalTransform(img_size=64)
    cpu = open_dataset(tmp_path / "in", t.crop, exif=True)
    enc = open_dataset(tmp_path / "in", t.crop, exif=True, encoded_jpegs=True)
    assert cpu.records.ids == enc.records.ids
    everything = list(range(len(cpu)))
    expected = _batch(cpu, everything)
    decoder = DeviceJpegDecoder(t, "cpu", exif=True)
    got = decoder(_batch(enc, everything))
    assert sorted(got["id"]) == sorted(expected["id"]) and got["failed"] and \
        sorted(got["failed"]) == sorted(expected["failed"])
    by_id = {i: (img, dec) for i, img, dec in zip(got["id"], got["images"], got["decoder"])}
    for i, image in zip(expected["id"], expected["images"]):
        mine, dec = by_id[i]
        kind = kinds[i]
        assert dec == ("libjpeg-turbo (torchvision)" if kind.endswith("jpeg") and kind != "cmyk jpeg" else "pil"), i
        diff = (mine.int() - image.int()).abs()
        assert diff.max() <= MAX_LEVELS and diff.float().mean() <= MEAN_LEVELS, i
        if dec == "pil":
            assert torch.equal(mine, image), i
    assert got["index"].tolist() == [enc.records.ids.index(i) for i in got["id"]]

    import nested_svit.data.device_decode as device_decode

    real = device_decode._decode_jpeg

    def refuses_gray(data, device):  # a decoder that cannot take one file (as nvjpeg with some JPEGs)
        datas = data if isinstance(data, list) else [data]
        if any(bytes(d[:64].numpy()) == (tmp_path / "in" / "gray.jpg").read_bytes()[:64] for d in datas):
            raise RuntimeError("unsupported")
        return real(data, device)

    monkeypatch.setattr(device_decode, "_decode_jpeg", refuses_gray)
    again = decoder(_batch(enc, everything))
    decoders = dict(zip(again["id"], again["decoder"]))
    assert decoders["gray.jpg"] == "pil" and decoders["photo.jpg"] == "libjpeg-turbo (torchvision)"
    assert torch.equal(again["images"][again["id"].index("gray.jpg")], expected["images"][expected["id"].index("gray.jpg")])


def test_prefetched_prepares_the_next_batch_before_handing_out_the_current():
    events = []

    def prepare(b):
        events.append(("prepare", b))
        return b

    for b in prefetched(iter([0, 1, 2]), "cpu", prepare):
        events.append(("use", b))
    assert events == [("prepare", 0), ("prepare", 1), ("use", 0), ("prepare", 2), ("use", 1), ("use", 2)]
    assert list(prefetched(iter([]), "cpu", prepare)) == []


def test_detector_batch_is_one_upload():
    inputs = [torch.randn(3, 64, 96), torch.randn(3, 32, 32)]
    items = [{"input": x, "meta": None, "index": i, "id": str(i), "image_id": i, "error": None}
             for i, x in enumerate(inputs)]
    items.append({"input": None, "meta": None, "index": 2, "id": "2", "image_id": 2, "error": "bad"})
    batch = collate_detection(items)
    dev = simcuda.device()
    with simcuda.recording() as rec:
        up = upload_detection_batch(batch, dev)
    assert rec.total_syncs == 0 and rec.mixing == []
    assert [tuple(x.shape) for x in up["inputs"]] == [(3, 64, 96), (3, 32, 32)]
    assert len({simcuda._unwrap(x).untyped_storage().data_ptr() for x in up["inputs"]}) == 1  # views of one copy
    for mine, x in zip(up["inputs"], inputs):
        assert torch.equal(simcuda.to_cpu(mine), x)
    assert up["failed"] == [(2, "2", 2, "bad")]


def _predict(tmp_path, name: str, *extra: str) -> pd.DataFrame:
    out = tmp_path / f"{name}.parquet"
    assert main(["predict", *TINY, "--input", str(tmp_path / "in"), "--batch-size", "4", "--workers", "0",
                 "--img-size", "64", "--out", str(out), *extra]) == 0
    return pd.read_parquet(out)


def test_predict_decode_gpu_through_the_cpu_path_equals_pillow_rows(tmp_path):
    """``--decode gpu`` on a CPU: the same rows, statuses and reasons as ``--decode cpu``, the decoder
    named per row, probabilities within what the resize tolerance moves them."""
    kinds = write_awkward_folder(tmp_path / "in")
    cpu = _predict(tmp_path, "cpu")
    gpu = _predict(tmp_path, "gpu", "--decode", "gpu")
    assert len(cpu) == len(kinds) - 1  # notes.txt: ignored
    pd.testing.assert_frame_equal(cpu[["index", "id", "status", "error"]], gpu[["index", "id", "status", "error"]])
    assert set(cpu["decoder"].dropna()) == {"pil"}
    ok = gpu["status"] == "ok"
    jpeg = gpu["id"].map(lambda i: kinds[i].endswith("jpeg") and kinds[i] != "cmyk jpeg")
    assert (gpu.loc[ok & jpeg, "decoder"] == "libjpeg-turbo (torchvision)").all()
    assert (gpu.loc[ok & ~jpeg, "decoder"] == "pil").all()
    np.testing.assert_allclose(gpu.loc[ok, "top1_prob"], cpu.loc[ok, "top1_prob"], atol=2e-3)


def test_eval_records_decoder_and_draft(tmp_path):
    root = tmp_path / "val" / "n01440764"
    root.mkdir(parents=True)
    rng = np.random.default_rng(3)
    big = smooth_image(rng, (1600, 1200))
    big.save(root / "big.JPEG", quality=90)
    smooth_image(rng, (120, 90)).save(root / "small.JPEG")
    full = decode_image(str(root / "big.JPEG"))
    drafted = decode_image(str(root / "big.JPEG"), draft=(256, 256))
    assert full.size == (1600, 1200) and drafted.size == (400, 300)  # 1/4 scale still covers 256
    assert decode_image(str(root / "small.JPEG"), draft=(256, 256)).size == (120, 90)
    results = {}
    for name, extra in (("plain", []), ("draft", ["--jpeg-draft"]), ("gpu", ["--decode", "gpu"])):
        out = tmp_path / f"{name}.json"
        assert main(["eval", "imagenet", *TINY, "--num-classes", "1000", "--data", str(tmp_path / "val"),
                     "--img-size", "64", "--workers", "0", "--out", str(out), *extra]) == 0
        results[name] = json.loads(out.read_text())
    assert results["plain"]["decode"] == "pil" and results["plain"]["jpeg_draft"] is None
    assert results["draft"]["jpeg_draft"] == [73, 73]  # floor(64 / 0.875)
    assert results["gpu"]["decode"] == "libjpeg-turbo (torchvision)"


def test_a_job_on_the_device_with_device_decoding_gives_the_rows_of_the_cpu(tmp_path):
    """The uint8 batches and the decoder on the simulated CUDA device: no device mixing, the rows of the CPU."""
    from nested_svit.inference import ClassifierStep, Job, ModelSpec
    from nested_svit.inference.parts import PartStore, merge_parts
    from nested_svit.inference.spec import BuiltModel

    write_awkward_folder(tmp_path / "in")
    torch.manual_seed(0)
    model = create_model("svit_small", embed_dim=64, num_heads=1, num_classes=10, img_size=64).eval()
    t = EvalTransform(img_size=64)
    frames = {}
    for name, device in (("cpu", torch.device("cpu")), ("sim", simcuda.device())):
        ds = open_dataset(tmp_path / "in", t.crop, exif=True, encoded_jpegs=True)
        step = ClassifierStep(model.to(device), device, 3, exif=True, transform=t,
                              decoder=DeviceJpegDecoder(t, device, exif=True))
        store = PartStore(tmp_path / f"{name}.parts", {"k": name}, 4, len(ds))
        job = Job(step, ds, store, BuiltModel(model, None), ModelSpec("classifier"), workers=0)
        with simcuda.recording() as rec:
            job.run()
        assert rec.mixing == [] and rec.violations == []
        frames[name] = merge_parts(store.parts_dir, len(ds))
    pd.testing.assert_frame_equal(frames["cpu"], frames["sim"], atol=1e-5, rtol=1e-5)
