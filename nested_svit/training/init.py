"""Where training starts (``train --init``): weights from any checkpoint the loaders read, with a
classification head of another size re-initialised (ImageNet's 1000 classes for a 3-class data set)."""
from __future__ import annotations

import os

from torch import nn

from ..checkpoint import CheckpointError, load_checkpoint, read


def load_init(model: nn.Module, path: str | os.PathLike) -> list[str]:
    """Load ``path`` into ``model`` (a classifier or a detector) for training -> the loader's notes. A
    classifier head whose size differs from the model's is left at its initialisation, with a note;
    any other key that does not fit is the loader's ``CheckpointError``."""
    try:
        return load_checkpoint(model, path).notes
    except CheckpointError as e:
        own = model.state_dict()
        state = read(path).state
        head = {k for k in ("head.weight", "head.bias") if k in state and k in own and state[k].shape != own[k].shape}
        if not head:
            raise
        rest = {k: v for k, v in state.items() if k not in head}
        notes = load_checkpoint(model, rest, strict=False).notes
        missing = set(own) - set(rest) - {"head.weight", "head.bias"}
        if missing - {k for k in missing if k.startswith("gates.")}:
            raise e
        return notes + [f"head re-initialised: the checkpoint's head has {state['head.weight'].shape[0]} classes, "
                        f"the model {own['head.weight'].shape[0]}"]
