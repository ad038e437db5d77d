"""ATC, Agglomerative Token Clustering (Haurum et al., ECCV 2024; JoakimHaurum/ATC ``models/atc.py``),
inference on ATC-trained (or plain DeiT) weights, with every image of a batch clustered at once on an accelerator.

In each reduction block (``gate_blocks``, the release's 3, 6, 9), after ``x + attn(norm1(x))`` and
before the MLP, an image's patch tokens (the class token apart) are clustered bottom-up on the cosine
distance ``1 - cos`` of the block's keys averaged over heads, until ``int(N0 * keep_target)`` clusters
remain (``N0``: the image's own patch count; ATC's ``int(196 * rate ** (k + 1))`` with
``keep_targets = (rate, rate², rate³)``). A cluster becomes one token, the size-weighted mean of its
members; with ``proportional_attn`` (the releases') sizes add up and every later attention adds ``log
size`` to each key's logit, else sizes start at 1 again in every block (the authors' ``attn_size = None``).
On the packed map a cluster's lowest member row holds its mean and the other members' rows drop out.
With ``of_current`` (the authors' detection backbone, which has no class token) a block keeps
``int(keep_target * t)`` clusters of the ``t`` tokens it gets.

The authors cluster each image on the host with scikit-learn (scipy's ``linkage`` on the precomputed
distances). ``cluster_tokens`` does the same on the CPU (``host_clustering``: scipy's compiled loop per image,
the same clusters as scikit-learn by construction, ties included; on the CPU faster than the batched loop
below, whose per-merge operations cost more there than scipy's compiled loop: bench/atc_clustering.py), and on
an accelerator ``agglomerative_clustering`` clusters all images at once on the device, with no host loop: the
distances as scikit-learn reads them (upper triangle, float64), then per step every image merges its
closest pair of clusters (one batched ``argmin`` over each cluster's nearest neighbour) and updates
that pair's distances by the Lance-Williams rule of the linkage (single: min, complete: max, average:
size-weighted mean, the formula scipy uses). The three linkages are reducible, so merging the globally closest pair yields the same
dendrogram as scipy's nearest-neighbour chain and hence the same clusters at any count. Ties: an exact
tie between candidate merges is broken by the lowest (row, column) pair; scipy may break it otherwise,
so on inputs with exactly equal distances (duplicate tokens) the partition can differ, never the count.
Average linkage's float64 updates can round differently from scipy's merge order at the 1e-16 level.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..config import ViTConfig
from ..execution import AttentionRecord
from ..tokens import pad, true_rows
from .base import Method
from .selection import MergeRun, host_keep_count, keep_count

LINKAGES = ("single", "average", "complete")


def cosine_distances(metric: Tensor) -> Tensor:
    """``metric [B, N, d]`` -> ``[B, N, N]`` float32 ``1 - cos`` of every pair, as ATC computes it
    (normalise, one batched product, in float32)."""
    metric = metric.float()
    metric = metric / metric.norm(dim=-1, keepdim=True)
    return 1 - metric @ metric.transpose(-1, -2)


def _on(values: list[int], device: torch.device) -> Tensor:
    """Host ints as an int64 tensor on ``device``, copied without waiting for the device."""
    return torch.tensor(values, dtype=torch.int64).to(device, non_blocking=True)


def agglomerative_clustering(distance: Tensor, counts: list[int] | Tensor, clusters: list[int] | Tensor,
                             linkage: str, steps: int | None = None, search_all: bool | None = None) -> Tensor:
    """Agglomerative clustering of every image at once. ``distance [B, N, N]``: pairwise distances, of
    which the upper triangle is read (as scikit-learn reads a precomputed matrix), image ``b``'s first
    ``counts[b]`` tokens real; ``clusters [B]``: how many clusters each image ends with (host ints, or
    int64 tensors on the device with ``steps``, the most merges any image makes, on the host: then nothing
    is copied to the device, as a captured forward needs). -> ``[B, N]`` int64: each token's cluster,
    named by its lowest member's index (-1 at padding).

    Each image keeps every cluster's nearest neighbour (``nearest``, ``nearest_at``), so a step reads
    ``[B, N]``, not ``[B, N, N]``: the closest pair is the first row holding the smallest ``nearest``
    and that row's first closest column (the first minimum in row-major order: the documented tie rule);
    after a merge only the rows whose nearest was one of the pair are searched again (on the CPU; on an
    accelerator every row is, which needs no host read per step; ``search_all`` chooses). Both give the
    same clusters."""
    if linkage not in LINKAGES:
        raise ValueError(f"linkage {linkage!r}: choose from {LINKAGES}")
    b, n, _ = distance.shape
    device = distance.device
    index = torch.arange(n, device=device)
    d = torch.where(index[:, None] < index[None, :], distance, distance.transpose(1, 2)).double()
    if steps is None:
        steps = max((c - k for c, k in zip(counts, clusters)), default=0)
        counts, clusters = _on(counts, device), _on(clusters, device)
    valid = index[None, :] < counts[:, None]
    pairs = valid[:, :, None] & valid[:, None, :] & (index[:, None] != index[None, :])
    inf = torch.tensor(float("inf"), dtype=d.dtype, device=device)
    d = torch.where(pairs, d, inf)
    nearest_at = d.argmin(-1)  # [B, N] each row's first closest column
    nearest = d.gather(-1, nearest_at[..., None])[..., 0]
    size = valid.double()
    labels = torch.where(valid, index[None, :], -1)
    remaining = (counts - clusters).clamp(min=0)
    batch = torch.arange(b, device=device)
    for step in range(max(steps, 0)):
        live = remaining > step  # [B] images still merging
        i = nearest.argmin(1)  # the first row holding the smallest distance, and its first closest column
        j = nearest_at[batch, i]
        di, dj = d[batch, i], d[batch, j]
        if linkage == "single":
            new = torch.minimum(di, dj)
        elif linkage == "complete":
            new = torch.maximum(di, dj)
        else:
            si, sj = size[batch, i][:, None], size[batch, j][:, None]
            new = (si * di + sj * dj) / (si + sj)
        pair = (index[None, :] == i[:, None]) | (index[None, :] == j[:, None])
        new = torch.where(pair, inf, new)
        done = ~live[:, None]
        new = torch.where(done, di, new)  # images done: rows written back unchanged
        row_j = torch.where(done, dj, inf)
        d[batch, i] = new
        d[batch, :, i] = new
        d[batch, j] = row_j
        d[batch, :, j] = row_j
        if not (device.type != "cpu" if search_all is None else search_all):  # a host read is free on the CPU
            nearest, nearest_at = _renew_nearest(d, nearest, nearest_at, new, i, j, pair, live)
        else:  # no host read per step on an accelerator: every row searched again, one [B, N, N] pass
            nearest_at = d.argmin(-1)
            nearest = d.gather(-1, nearest_at[..., None])[..., 0]
        moved = live[:, None] & (labels == j[:, None])
        labels = torch.where(moved, i[:, None], labels)
        joined = torch.where(live, size[batch, i] + size[batch, j], size[batch, i])
        size[batch, j] = torch.where(live, 0.0, size[batch, j])
        size[batch, i] = joined
    return labels


def host_clustering(distance: Tensor, counts: list[int], clusters: list[int], linkage: str) -> Tensor:
    """The authors' clustering of each image on the host: scipy's ``linkage`` on the upper triangle of its
    ``distance`` (float64), as scikit-learn's ``AgglomerativeClustering(metric="precomputed")`` calls it, cut
    after its first ``counts[b] - clusters[b]`` merges (scikit-learn's cut). Same arguments and result as
    ``agglomerative_clustering`` (host ``counts`` and ``clusters``): ``[B, N]`` int64 labels on
    ``distance``'s device, a cluster named by its lowest member, -1 at padding."""
    from scipy.cluster.hierarchy import linkage as scipy_linkage  # scipy's import costs ~0.2 s: only when used
    from scipy.spatial.distance import squareform

    if linkage not in LINKAGES:
        raise ValueError(f"linkage {linkage!r}: choose from {LINKAGES}")
    labels = np.full(distance.shape[:2], -1, dtype=np.int64)
    for image, (count, wanted) in enumerate(zip(counts, clusters)):
        steps = max(count - max(wanted, 1), 0)
        square = distance[image, :count, :count].detach().to("cpu", torch.float64).numpy()  # one image at a time
        merges = scipy_linkage(squareform(square, checks=False), method=linkage)[:steps] if steps else np.empty((0, 4))
        labels[image, :count] = _lowest_members(merges[:, :2].astype(np.int64), count)
    return torch.from_numpy(labels).to(distance.device)


def _lowest_members(children: np.ndarray, count: int) -> np.ndarray:
    """The partition after scipy's merges ``children [S, 2]`` (node ``count + s`` joins the two nodes of row
    ``s``) of ``count`` tokens -> ``[count]``: each token's cluster, named by its lowest member."""
    steps = len(children)
    lowest = np.arange(count + steps)
    parent = np.arange(count + steps)
    for s, (a, b) in enumerate(children.tolist()):  # children come before their parent
        lowest[count + s] = min(lowest[a], lowest[b])
        parent[a] = parent[b] = count + s
    while True:  # pointer jumping: every node to its root in log(depth) passes
        up = parent[parent]
        if np.array_equal(up, parent):
            return lowest[parent[:count]]
        parent = up


def cluster_tokens(distance: Tensor, counts: list[int], clusters: list[int], linkage: str,
                   on_device: tuple[Tensor, Tensor]) -> Tensor:
    """Each image's clusters (``agglomerative_clustering``'s result): per image with scipy on the CPU,
    batched on an accelerator (``on_device``: the counts and clusters as device tensors, so that nothing
    is copied there; ``counts``/``clusters`` host ints). The choice depends on the device only, so an
    image's clusters never depend on its batch."""
    if distance.device.type == "cpu":
        return host_clustering(distance, counts, clusters, linkage)
    return agglomerative_clustering(distance, *on_device, linkage,
                                    steps=max((c - k for c, k in zip(counts, clusters)), default=0))


def _renew_nearest(d: Tensor, nearest: Tensor, nearest_at: Tensor, new: Tensor, i: Tensor, j: Tensor, pair: Tensor,
                   live: Tensor) -> tuple[Tensor, Tensor]:
    """Nearest neighbours after clusters ``i`` and ``j`` merged into ``i`` (row ``new``), the same as
    ``d.argmin(-1)`` but reading only the rows that pointed at the pair (and the pair's own): any other
    row keeps its nearest, or takes ``i`` when ``new`` is closer (or as close, at a lower column)."""
    stale = live[:, None] & ((nearest_at == i[:, None]) | (nearest_at == j[:, None])) & ~pair
    closer = live[:, None] & ~pair & ~stale & ((new < nearest) | ((new == nearest) & (i[:, None] < nearest_at)))
    nearest = torch.where(closer, new, nearest)
    nearest_at = torch.where(closer, i[:, None], nearest_at)
    at_b, at_k = (stale | (live[:, None] & pair)).nonzero(as_tuple=True)  # j's row is all inf now
    rows = d[at_b, at_k]
    found = rows.argmin(1)
    nearest_at[at_b, at_k] = found
    nearest[at_b, at_k] = rows.gather(1, found[:, None])[:, 0]
    return nearest, nearest_at


@dataclass(frozen=True)
class ATCOptions:
    linkage: str = "average"  # single, average or complete (the authors' default: average)
    proportional_attn: bool = True  # sizes carried into attention (every released model was trained so)
    of_current: bool = False  # int(keep_target * t) clusters of the t tokens a block gets (its detection code)


class ATCRun(MergeRun):
    def __init__(self, block_pass) -> None:
        super().__init__(block_pass)
        self.assignments: list[Tensor] = []  # per reduction: ``[T]`` the row holding each row's cluster

    def after_attention(self, i: int, y: Tensor, record: AttentionRecord, before: Tensor) -> Tensor | None:
        layout = record.layout
        stage = self.stage_of_block[i]
        rate = self.config.keep_targets[stage]
        tokens = [m - self.cls for m in layout.lengths]  # patch tokens (clusters so far) per image, on the host
        base = tokens if self.options.of_current else self.base_patches()
        clusters = [min(k, t) for k, t in zip(host_keep_count(base, rate, "floor"), tokens)]
        on_device = layout.offsets.diff() - self.cls  # the same counts on the device: nothing copied there
        base_on_device = on_device if self.options.of_current else self.block_pass.patches
        wanted = torch.minimum(keep_count(base_on_device, rate, "floor"), on_device)
        rows = pad(record.rows[:, None], layout, -1)[:, self.cls:, 0]  # [B, N] patch rows in map order
        metric = pad(record.mean_keys(), layout)[:, self.cls:]
        labels = cluster_tokens(cosine_distances(metric), tokens, clusters, self.options.linkage, (on_device, wanted))
        members = (labels >= 0) & (labels != torch.arange(labels.shape[1], device=labels.device)[None, :])
        at = true_rows(members, sum(tokens) - sum(clusters))  # host count: no device read
        image = at // labels.shape[1]
        src = rows.reshape(-1)[at]
        dst = rows[image, labels.reshape(-1)[at]]
        if not self.options.proportional_attn:
            self.size = torch.ones_like(self.size)  # the authors drop the sizes after every block
        self.merge(y, src, dst, self.options.proportional_attn)
        self.assignments.append(self.owner)
        keep = self.active.clone()
        keep[src] = False
        candidates = self.rows_mask(record.rows) & ~self.block_pass.protect
        return self.chose(keep, candidates, [self.cls + k for k in clusters])


def clustering_flops(config: ViTConfig, options: ATCOptions, kept: Tensor, total: Tensor) -> Tensor:
    """The cosine distances of each reduction block's tokens: ``2 n^2 d`` (``d`` the head dim); the
    merge loop's comparisons are not multiply-adds and are left out, as the authors count."""
    d = config.embed_dim // config.num_heads
    return (2 * kept.double()[:, list(config.gate_blocks)] ** 2 * d).sum(1)


def _validate(config: ViTConfig, options: ATCOptions) -> None:
    if options.linkage not in LINKAGES:
        raise ValueError(f"ATC's linkage must be one of {LINKAGES}, got {options.linkage!r}")


METHOD = Method(
    name="atc", title="ATC", run=ATCRun, options=ATCOptions, selector_flops=clustering_flops, validate=_validate,
    needs_class_token=False,
)  # trains as its authors fine-tune: the clustering decides without gradient, the merged means carry it
