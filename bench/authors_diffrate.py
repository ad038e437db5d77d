"""Our DiffRate against its authors' code on the same weights: logits, tokens per block and the authors'
FLOP count, for every DeiT entry of their ``compression_rate.json``.

    git clone https://github.com/OpenGVLab/DiffRate /path/DiffRate
    python bench/authors_diffrate.py --authors /path/DiffRate --out bench/results/diffrate-vs-authors-<date>.csv

The authors' ``DiffRate/patch/deit.py`` patches a timm ``VisionTransformer`` in place. timm >= 0.9 names a
block's drop path ``drop_path1``/``drop_path2``; the authors' block reads ``drop_path``, so each block gets
an identity of that name (inference: both are identities). Random DeiT weights as timm initialises them
(seeded), with a class token and position embedding that matter (std 0.5; timm's are near zero); fp32, batch of 4 at 224x224.
``authors_gmacs``: their ``calculate_flop_inference`` (multiply-adds; no matching, 197 tokens into the
patch embedding); ``our_gmacs``: ``benchmark.flops`` / 2 (196 patches embedded, the matching counted).
Nothing from the authors' code is copied here; it is imported from the given checkout.
"""
from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import torch
from torch import nn

from authors_common import deit_state, run_rows


OLD_TIMM_PATHS = {"timm.models.layers.helpers": "timm.layers.helpers"}


def authors_model(authors: Path, size: str, prune: tuple[int, ...], merge: tuple[int, ...]):
    import importlib

    import timm

    for old, new in OLD_TIMM_PATHS.items():  # the module paths of the timm the authors used (0.4.5)
        sys.modules.setdefault(old, importlib.import_module(new))
    sys.path.insert(0, str(authors))
    from DiffRate.patch.deit import apply_patch  # the authors' code, from their checkout

    model = timm.create_model(f"deit_{size}_patch16_224", pretrained=False).eval()
    model.load_state_dict(deit_state(size))
    for block in model.blocks:
        block.drop_path = nn.Identity()
    apply_patch(model)
    model.set_kept_num(list(prune), list(merge))
    return model


def compare(authors: Path, size: str, target: str, images: torch.Tensor) -> dict:
    from nested_svit import create_model
    from nested_svit.benchmark.flops import flops_per_image
    from nested_svit.checkpoint import load_checkpoint
    from nested_svit.methods.diffrate import RATES

    prune, merge = RATES[size][target]
    theirs = authors_model(authors, size, prune, merge)
    ours = create_model(f"diffrate_{size}_{target}").eval()
    load_checkpoint(ours, {k: v for k, v in theirs.state_dict().items() if "ddp" not in k})
    seen: list[int] = []  # the tokens each of the authors' MLPs processed
    hooks = [b.mlp.register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape[1])) for b in theirs.blocks]
    with torch.no_grad():
        expected, authors_flops = theirs(images)
        feats, usage = ours.forward_features(images, return_usage=True)
        logits = ours.forward_head(feats)
    for hook in hooks:
        hook.remove()
    error = ((logits - expected).abs().max() / expected.abs().max()).item()
    mine = usage.kept_mlp[0].tolist()
    return {"model": f"diffrate_{size}_{target}", "max_rel_logit_error": f"{error:.2e}",
            "top1_equal": bool((logits.argmax(1) == expected.argmax(1)).all()),
            "tokens_per_block_equal": mine == seen and (usage.kept_mlp == usage.kept_mlp[0]).all().item(),
            "tokens_per_block": " ".join(map(str, mine)),
            "authors_gmacs": f"{float(authors_flops) / 1e9:.3f}",
            "our_gmacs": f"{flops_per_image(ours.config, usage.kept, usage.total, usage.kept_mlp)[0] / 2e9:.3f}"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--authors", type=Path, required=True, help="a checkout of OpenGVLab/DiffRate")
    parser.add_argument("--out", type=Path, required=True, help="CSV to write")
    parser.add_argument("--sizes", default="tiny,small,base")
    args = parser.parse_args(argv)
    if not (args.authors / "DiffRate" / "patch" / "deit.py").is_file():
        parser.error(f"{args.authors} is not a DiffRate checkout (no DiffRate/patch/deit.py)")
    from nested_svit.methods.diffrate import RATES

    images = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    return run_rows((partial(compare, args.authors, size, target, images) for size in args.sizes.split(",")
                     for target in RATES[size]), args.out)


if __name__ == "__main__":
    sys.exit(main())
