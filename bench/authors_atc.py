"""Our ATC against its authors' code on the same weights: logits and tokens per block, for the three
linkages at the released setting (keep rate 0.7 in blocks 3/6/9, proportional attention).

    git clone https://github.com/JoakimHaurum/ATC /path/ATC
    python bench/authors_atc.py --authors /path/ATC --out bench/results/atc-vs-authors-<date>.csv

The authors' ``ATC_setup/models/atc.py`` (``AgglomerativeClusteringVisionTransformer``: scikit-learn's
``AgglomerativeClustering`` per image on the host) is imported from the checkout and built with the args
its ``train_deit.py`` passes. Random DeiT weights as timm initialises them, with a class token and
position embedding that matter (std 0.5; timm's are near zero), fp32, 224x224 images: theirs one at a
time, ours all in one packed batch, clustered both ways (``clustering``: ``engine``, the CPU's scipy per
image; ``batched``, an accelerator's batched clustering forced here). Nothing from the authors' code is copied here.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import sys
from functools import partial
from pathlib import Path
from unittest import mock

import torch

from authors_common import deit_state, run_rows

SIZES = {"tiny": (192, 3), "small": (384, 6)}
LINKAGES = {"atc": "average", "atc_single": "single", "atc_complete": "complete"}


def authors_model(authors: Path, size: str, linkage: str, state: dict):
    path = authors / "ATC_setup" / "models" / "atc.py"
    spec = importlib.util.spec_from_file_location("authors_atc", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # the authors' code, from their checkout
    dim, heads = SIZES[size]
    args = argparse.Namespace(reduction_ratio=[0.7], reduction_loc=[3, 6, 9], linkage=linkage, proportional_attn=True)
    with contextlib.redirect_stdout(io.StringIO()):  # its constructor prints the cluster counts
        model = module.AgglomerativeClusteringVisionTransformer(embed_dim=dim, depth=12, num_heads=heads, args=args)
    model.load_state_dict(state)
    return model.eval()


def _batched(distance, counts, clusters, linkage, *_):
    from nested_svit.methods.atc import agglomerative_clustering

    return agglomerative_clustering(distance, counts, clusters, linkage)


def compare(authors: Path, prefix: str, size: str, images: torch.Tensor, clustering: str) -> dict:
    from nested_svit import create_model
    from nested_svit.checkpoint import load_checkpoint
    from nested_svit.methods import atc

    state = deit_state(size)
    theirs = authors_model(authors, size, LINKAGES[prefix], state)
    ours = create_model(f"{prefix}_{size}").eval()
    load_checkpoint(ours, state)
    seen: list[int] = []
    hooks = [b.mlp.register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape[1])) for b in theirs.blocks]
    errors, counts_equal = [], True
    forced = mock.patch.object(atc, "cluster_tokens", _batched) if clustering == "batched" else contextlib.nullcontext()
    with torch.no_grad(), forced:
        feats, usage = ours.forward_features(images, return_usage=True)
        batch = ours.forward_head(feats)
        for k in range(images.shape[0]):
            seen.clear()
            expected = theirs(images[k:k + 1])[0]
            counts_equal &= usage.kept_mlp[k].tolist() == seen
            errors.append(((batch[k] - expected).abs().max() / expected.abs().max()).item())
    for hook in hooks:
        hook.remove()
    return {"model": f"{prefix}_{size}", "linkage": LINKAGES[prefix], "clustering": clustering, "images": len(errors),
            "images_within_1e-4": sum(e <= 1e-4 for e in errors), "max_rel_logit_error": f"{max(errors):.2e}",
            "tokens_per_block_equal": counts_equal, "tokens_per_block": " ".join(map(str, usage.kept_mlp[0].tolist()))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--authors", type=Path, required=True, help="a checkout of JoakimHaurum/ATC")
    parser.add_argument("--out", type=Path, required=True, help="CSV to write")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--sizes", default="tiny,small")
    args = parser.parse_args(argv)
    if not (args.authors / "ATC_setup" / "models" / "atc.py").is_file():
        parser.error(f"{args.authors} is not an ATC checkout (no ATC_setup/models/atc.py)")
    images = torch.randn(args.images, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    return run_rows((partial(compare, args.authors, prefix, size, images, clustering)
                     for size in args.sizes.split(",") for prefix in LINKAGES for clustering in ("engine", "batched")),
                    args.out)


if __name__ == "__main__":
    sys.exit(main())
