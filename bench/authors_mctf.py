"""Our MCTF against its authors' code on the same weights: logits and tokens per block, for the
configurations of their eval scripts (``run/eval_deit_{s,t}_mctf{,_fast}.sh``).

    git clone https://github.com/mlvlab/MCTF /path/MCTF
    python bench/authors_mctf.py --authors /path/MCTF --out bench/results/mctf-vs-authors-<date>.csv

The authors' ``models/deit.py`` is imported from the checkout (timm >= 0.9 moved one module it imports,
``timm.models.helpers``, which the script aliases). Random DeiT weights as timm initialises them, with a
class token and position embedding that matter (std 0.5; timm's are near zero), fp32 (the authors
evaluate under fp16 autocast), 224x224 images: theirs one image at a time, ours the whole batch at once.
MCTF's next split follows the order of float32 scores, so near-ties can send two correct implementations
different ways; each row says how many images agree to 1e-4, and the largest error among them. Nothing
from the authors' code is copied here.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from functools import partial
from pathlib import Path

import torch

from authors_common import deit_state, run_rows

# the eval scripts' settings: (our model, the authors' factory, mctf_type, activate_layer)
CONFIGS = {
    "mctf_small": ("deit_small", [16, 0, 0, 1, 1, 1, 20, 40, 1, 1, 0], list(range(1, 12))),
    "mctf_fast_small": ("deit_small", [0.35, 0, 0, 1, 1, 1, 20, 40, 1, 1, 0], [3, 6, 9]),
    "mctf_tiny": ("deit_tiny", [16, 0, 0, 1, 1, 1, 20, 40, 1, 1, 0], list(range(1, 12))),
    "mctf_fast_tiny": ("deit_tiny", [0.35, 0, 0, 1, 1, 1, 20, 40, 1, 1, 0], [3, 6, 9]),
}
OLD_TIMM_PATHS = {"timm.models.helpers": "timm.models._manipulate"}


def authors_model(authors: Path, factory: str, mctf_type: list, layers: list[int]):
    for old, new in OLD_TIMM_PATHS.items():
        sys.modules.setdefault(old, importlib.import_module(new))
    sys.path.insert(0, str(authors))
    deit = importlib.import_module("models.deit")  # the authors' code, from their checkout
    model = getattr(deit, factory)(use_mctf=True, mctf_type=mctf_type, task_type=[1, 0, 0, 0],
                                   activate_layer=layers).eval()
    state = deit_state(factory.split("_")[1])
    report = model.load_state_dict(state, strict=False)
    if report.missing_keys:
        raise SystemExit(f"the authors' model has keys a timm DeiT lacks: {report.missing_keys}")
    return model


def compare(authors: Path, name: str, images: torch.Tensor) -> dict:
    from nested_svit import create_model
    from nested_svit.checkpoint import load_checkpoint

    factory, mctf_type, layers = CONFIGS[name]
    theirs = authors_model(authors, factory, mctf_type, layers)
    ours = create_model(name).eval()
    load_checkpoint(ours, theirs.state_dict())
    seen: list[int] = []
    hooks = [b.mlp.register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape[1])) for b in theirs.blocks]
    errors, counts_equal = [], True
    with torch.no_grad():
        batch = ours.forward_head(ours.forward_features(images))
        for k in range(images.shape[0]):
            seen.clear()
            expected = theirs(images[k:k + 1], r_eval=mctf_type[0])[0]
            feats, usage = ours.forward_features(images[k:k + 1], return_usage=True)
            counts_equal &= usage.kept_mlp[0].tolist() == seen
            error = ((batch[k] - expected).abs().max() / expected.abs().max()).item()
            errors.append(error)
    for hook in hooks:
        hook.remove()
    agree = [e for e in errors if e <= 1e-4]
    return {"model": name, "images": len(errors), "images_within_1e-4": len(agree),
            "max_rel_logit_error_of_those": f"{max(agree):.2e}" if agree else "",
            "max_rel_logit_error": f"{max(errors):.2e}", "tokens_per_block_equal": counts_equal,
            "tokens_per_block": " ".join(map(str, usage.kept_mlp[0].tolist()))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--authors", type=Path, required=True, help="a checkout of mlvlab/MCTF")
    parser.add_argument("--out", type=Path, required=True, help="CSV to write")
    parser.add_argument("--images", type=int, default=8)
    args = parser.parse_args(argv)
    if not (args.authors / "models" / "deit.py").is_file() or not (args.authors / "utils" / "mctf.py").is_file():
        parser.error(f"{args.authors} is not an MCTF checkout (no models/deit.py, utils/mctf.py)")
    images = torch.randn(args.images, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    return run_rows((partial(compare, args.authors, name, images) for name in CONFIGS), args.out)


if __name__ == "__main__":
    sys.exit(main())
