"""The model actor: loads the model once (from the checkpoint path and flags the driver passes, never
a model object) and runs each batch with the local engine's per-batch code."""
from __future__ import annotations

import contextlib
import io
import os
import pickle
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

FAULT_ENV = "NESTED_SVIT_RAY_FAULT"  # tests: "exit:<batch>:<marker file>" kills the actor once at that batch


def _maybe_fail(batch: int) -> None:
    spec = os.environ.get(FAULT_ENV, "")
    if spec.startswith("exit:"):
        _, at, marker = spec.split(":", 2)
        if int(at) == batch and not Path(marker).exists():
            Path(marker).write_text(str(os.getpid()))
            os._exit(1)  # the process dies mid-batch, as a lost worker does


class Predictor:
    """``map_batches`` actor. ``load_model(device)`` -> the model ready for inference (run once);
    ``spec``: the family and the job settings the rows need (``classifier``: topk, class names, the
    data's label names, exif, the eval transform, the decoder; ``detector``: masks)."""

    def __init__(self, load_model: Callable, spec: dict, threads: int):
        import torch

        torch.set_num_threads(max(1, threads))
        import ray

        self.device = torch.device("cuda" if ray.get_gpu_ids() else "cpu")
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            model = load_model(str(self.device))  # its notes were printed once, by the driver
        self.spec = spec
        if spec["family"] == "detector":
            from ..evaluation.detection import DetectionJob

            self.job = DetectionJob(model, None, Path("."), {}, device=self.device, masks=spec["masks"])
        else:
            from ..data.device_decode import DeviceJpegDecoder
            from ..evaluation.runner import InferenceJob

            data = SimpleNamespace(class_names=spec["truth_names"], exif=spec["exif"])
            decoder = (DeviceJpegDecoder(spec["transform"], self.device, spec["exif"], spec["max_pixels"])
                       if spec["decode"] == "gpu" else None)
            self.job = InferenceJob(model, data, Path("."), {}, topk=spec["topk"], device=self.device,
                                    class_names=spec["class_names"], transform=spec["transform"], decoder=decoder)

    def __call__(self, rows: dict) -> dict:
        import torch

        out: dict = {"batch": [], "rows": [], "counts": []}
        for batch_id, payload in zip(rows["batch"], rows["payload"]):
            _maybe_fail(int(batch_id))
            batch = pickle.loads(payload)
            with torch.no_grad():
                if self.spec["family"] == "detector":
                    from ..data.coco import upload_detection_batch
                    from ..evaluation.detection import detect_batch

                    frame, _, counts = detect_batch(self.job, upload_detection_batch(batch, self.device))
                else:
                    from ..evaluation.runner import classify_batch, prepare_batch

                    frame, counts = classify_batch(self.job, prepare_batch(self.job)(batch))
            buf = io.BytesIO()
            frame.to_parquet(buf, index=False)
            out["batch"].append(int(batch_id))
            out["rows"].append(buf.getvalue())
            out["counts"].append(pickle.dumps(counts))  # Progress / DetectionProgress: the driver adds them up
        return out
