"""Saving and resuming a trainer's full state, in the one file schema (``checkpoint/writer.py``): the
model's weights, name and config (so ``predict`` / ``eval`` read the file with no other flag) and, as
extra, optimizer, scheduler, RNG states, position (epoch, step) and the train config. Files load with
``weights_only=True``."""
from __future__ import annotations

import json
import random
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from ..checkpoint.writer import save_payload
from ..devices import cuda_rng_states, set_cuda_rng_states


def rng_state() -> dict:
    """RNG states as tensors and plain lists, so the checkpoint loads with ``weights_only=True``."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next}}
    cuda = cuda_rng_states()
    if cuda is not None:
        state["cuda"] = cuda
    return state


def set_rng_state(state: dict) -> None:
    """Restore ``rng_state()``'s states (read on the CPU: ``torch.set_rng_state`` takes a CPU tensor)."""
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))
    if "cuda" in state:
        set_cuda_rng_states(state["cuda"])


# train config fields a resumed run may change: where and how fast it runs, and a longer schedule
MAY_CHANGE_ON_RESUME = ("epochs", "workers", "device", "checkpoint_every")


class TrainingCheckpoints:
    """``save`` / ``resume`` of a trainer (``state_dict()``: the payload), shared by both trainers. A
    trainer's ``data_record`` (``{"path", "digest", "images"}``, or None) is saved with it, so a resumed
    run on other data is refused, as one with other settings is."""

    data_record: dict | None = None

    def save(self, path: str | Path | None = None) -> Path:
        path = Path(path or self.checkpoint_path)
        save_payload(path, self.state_dict())
        return path

    def training_state(self) -> dict:
        """The extra entries every trainer's file holds."""
        return {"optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(), "rng": rng_state(),
                "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
                "skipped": self.skipped, "data": self.data_record}

    def resume(self, path: str | Path) -> list[str]:
        """Restore model, optimizer, scheduler, RNG and position from a file ``save`` wrote (this
        version's or an older one's). Everything is read on the CPU and copied to the model's device. A
        file of a run with other settings or data is refused (``MAY_CHANGE_ON_RESUME`` may change).
        -> notes for the user (a longer ``epochs``)."""
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"cannot resume from {path} (not a training checkpoint of this nested_svit version: "
                             f"{str(e).splitlines()[0] if str(e) else type(e).__name__}); pass --restart") from e
        if not isinstance(state, dict) or "optimizer" not in state:
            raise ValueError(f"{path} is not a training checkpoint (no optimizer state); use --init to start from "
                             "its weights, or another --out")
        if state.get("model_name") not in (None, self.model.name):
            raise ValueError(f"{path} is a training checkpoint of model {state['model_name']!r}, not {self.model.name!r}; "
                             "use another --out or pass --restart")
        notes = self._same_run(path, state)
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])  # optimizer state moves to its parameters' device
        self.sched.load_state_dict(state["scheduler"])
        self.epoch, self.step_in_epoch, self.global_step = state["epoch"], state["step_in_epoch"], state["global_step"]
        self.skipped = state.get("skipped", 0)
        set_rng_state(state["rng"])
        return notes

    def _same_run(self, path, state: dict) -> list[str]:
        """Refuse a file of another run: other train settings (but ``MAY_CHANGE_ON_RESUME``) or other
        data (by digest). Files older than these records are not checked."""
        def plain(v):
            return json.loads(json.dumps(v, default=str))

        old, new = plain(state.get("train_config") or {}), plain(asdict(self.cfg))
        changed = [f"{k} {old[k]} -> {new[k]}" for k in new if k in old and k not in MAY_CHANGE_ON_RESUME
                   and old[k] != new[k]]
        data = state.get("data")
        if data and self.data_record and data.get("digest") != self.data_record.get("digest"):
            changed.append(f"data {data.get('path')} ({data.get('images')} images) -> {self.data_record.get('path')} "
                           f"({self.data_record.get('images')} images)")
        if changed:
            raise ValueError(f"{path} is a training checkpoint of another run ({'; '.join(changed)}): resume with its "
                             "settings and data, pass --restart to start again, or choose another --out")
        if "epochs" in old and old["epochs"] != new["epochs"]:
            if new["epochs"] < old["epochs"]:
                raise ValueError(f"{path} was started for {old['epochs']} epochs; --epochs {new['epochs']} would cut its "
                                 "schedule short: resume with --epochs >= the file's, or pass --restart")
            return [f"resuming a run started for {old['epochs']} epochs with --epochs {new['epochs']}: training continues "
                    f"to epoch {new['epochs']}, and the learning-rate schedule now spans {new['epochs']} epochs"]
        return []
