"""ATC's clustering: the engine's two ways (``methods/atc.py``: batched on the device, and scipy per image,
the CPU's) against the authors' per-image scikit-learn path, per reduction step and end to end.

Per step: DeiT-S's three reductions at keep rate 0.7 (196 -> 137, 137 -> 96, 96 -> 67 tokens of 64-dim keys),
``B`` images. The authors' path is ``agglomerative_clustering`` of JoakimHaurum/ATC ``models/atc.py``
rewritten per its steps (cosine distances on the device, one ``.cpu().numpy()``, one scikit-learn fit per
image, labels back to the device); ours are one batched call (``agglomerative_clustering``, an accelerator's
way) and scipy's ``linkage`` per image (``host_clustering``, the CPU's). All get the same distances, and their
clusters are checked equal before timing. End to end: ``atc_small`` (random weights) as the engine runs it,
with the batched clustering forced, and with the authors' per-image clustering swapped in. Rounds interleave
the three; medians.

    python bench/atc_clustering.py --batch-sizes 1,8,64 --out bench/results/atc-clustering-cpu-<date>.csv
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time
import warnings
from unittest import mock

import torch

from nested_svit import create_model
from nested_svit.methods import atc as atc_method
from nested_svit.methods.atc import LINKAGES, agglomerative_clustering, cosine_distances, host_clustering

STEPS = ((196, 137), (137, 96), (96, 67))  # DeiT-S at keep rate 0.7: tokens in, clusters out


def sklearn_clustering(distance: torch.Tensor, counts: list[int] | torch.Tensor, clusters: list[int] | torch.Tensor,
                       linkage: str, *_, **__) -> torch.Tensor:
    """The authors' path: distances (and counts given as tensors) to the host, one scikit-learn fit per image,
    labels to the device; ``agglomerative_clustering``'s signature, so it can stand in for it in the model.
    -> ``[B, N]`` labels named by each cluster's lowest member (as ours, so the two compare)."""
    from sklearn.cluster import AgglomerativeClustering

    counts, clusters = (v.tolist() if isinstance(v, torch.Tensor) else v for v in (counts, clusters))

    host = distance.cpu().numpy()
    labels = torch.full(distance.shape[:2], -1, dtype=torch.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scikit-learn's "partial build of the tree" note, once per fit
        for b, (n, k) in enumerate(zip(counts, clusters)):
            found = torch.from_numpy(AgglomerativeClustering(n_clusters=k, metric="precomputed", linkage=linkage)
                                     .fit(host[b, :n, :n]).labels_)
            lowest = torch.full((k,), n, dtype=torch.int64).scatter_reduce(0, found, torch.arange(n), "amin")
            labels[b, :n] = lowest[found]
    return labels.to(distance.device)


def _batched(distance: torch.Tensor, counts: list[int], clusters: list[int], linkage: str, *_) -> torch.Tensor:
    """The batched clustering in ``cluster_tokens``' place (the engine's way on an accelerator, forced here)."""
    return agglomerative_clustering(distance, counts, clusters, linkage)


def _median_time(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def step_rows(batch_sizes: list[int], rounds: int, device: str) -> list[dict]:
    rows = []
    gen = torch.Generator().manual_seed(0)
    for linkage in LINKAGES:
        for tokens, clusters in STEPS:
            for b in batch_sizes:
                distance = cosine_distances(torch.randn(b, tokens, 64, generator=gen)).to(device)
                counts, wanted = [tokens] * b, [clusters] * b
                ways = {"batched": agglomerative_clustering, "host": host_clustering, "sklearn": sklearn_clustering}
                labels = {k: f(distance, counts, wanted, linkage) for k, f in ways.items()}
                same = all(torch.equal(labels["sklearn"], v) for v in labels.values())
                ms = {k: [] for k in ways}
                for _ in range(rounds):  # interleaved
                    for k, f in ways.items():
                        ms[k].append(1e3 * _median_time(lambda: f(distance, counts, wanted, linkage), 1))
                ms = {k: statistics.median(v) for k, v in ms.items()}
                rows.append(dict(what="step", linkage=linkage, tokens=tokens, clusters=clusters, batch=b, device=device,
                                 batched_ms=ms["batched"], host_ms=ms["host"], sklearn_per_image_ms=ms["sklearn"],
                                 speedup_batched=ms["sklearn"] / ms["batched"], speedup_host=ms["sklearn"] / ms["host"],
                                 same_clusters=same))
                print(rows[-1], flush=True)
    return rows


def end_to_end_rows(batch_sizes: list[int], rounds: int, device: str) -> list[dict]:
    rows = []
    for linkage in LINKAGES:
        torch.manual_seed(0)
        name = {"average": "atc_small", "single": "atc_single_small", "complete": "atc_complete_small"}[linkage]
        model = create_model(name).eval().to(device)
        for b in batch_sizes:
            images = torch.randn(b, 3, 224, 224, device=device)

            def run(patch=None):
                with torch.inference_mode(), (mock.patch.object(atc_method, "cluster_tokens", patch) if patch
                                              else contextlib.nullcontext()):
                    return model(images)

            ways = {"engine": lambda: run(), "batched": lambda: run(_batched), "sklearn": lambda: run(sklearn_clustering)}
            logits = {k: f() for k, f in ways.items()}
            same = all(torch.equal(logits["sklearn"], v) for v in logits.values())
            seconds = {k: [] for k in ways}
            for _ in range(rounds):  # interleaved
                for k, f in ways.items():
                    seconds[k].append(_median_time(f, 1))
            m = {k: statistics.median(v) for k, v in seconds.items()}
            rows.append(dict(what="model", linkage=linkage, tokens=197, clusters=67, batch=b, device=device,
                             engine_ms=1e3 * m["engine"], batched_ms=1e3 * m["batched"],
                             sklearn_per_image_ms=1e3 * m["sklearn"], speedup_engine=m["sklearn"] / m["engine"],
                             speedup_batched=m["sklearn"] / m["batched"], same_logits=same,
                             engine_img_s=b / m["engine"], batched_img_s=b / m["batched"],
                             sklearn_img_s=b / m["sklearn"]))
            print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-sizes", default="1,8,64")
    p.add_argument("--model-batch-sizes", default="1,8,32", help="batch sizes of the end-to-end runs")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="CSV file")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    rows = step_rows([int(b) for b in a.batch_sizes.split(",")], a.rounds, a.device)
    rows += end_to_end_rows([int(b) for b in a.model_batch_sizes.split(",")], max(3, a.rounds // 2), a.device)
    if a.out:
        import pandas as pd

        pd.DataFrame(rows).to_csv(a.out, index=False)
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
