"""DiffRate (Chen et al., ICCV 2023; OpenGVLab/DiffRate ``DiffRate/patch/deit.py``, ``merge.py``), inference
with the per-block rates its authors searched (``compression_rate.json``) on plain DeiT weights.

In every block, after ``x + attn(norm1(x))`` and before the MLP, an image's patch tokens are ranked by
the class token's attention averaged over heads (the block's own attention, proportional attention
included); the first ``P_i - 1`` stay (pruning; ``P_i`` counts the class token) and of those the ranks
from ``M_i - 1`` on are merged (``M_i``: the tokens left after merging; nothing merges when ``M_i`` is
not below the count after pruning). Each merged token goes to the kept token of highest cosine
similarity of the post-attention features (the class token excluded) and the kept token becomes the
plain mean of itself and every token merged into it. Sizes grow by the merged token's size times that
cosine, and every later attention adds ``log size`` to each key's logit. Only the MLP runs on the kept
tokens; on the packed map a merged token's row drops out and its destination's row holds the mean.

``P`` and ``M`` are the options; the registry's ``diffrate_*`` models take them from the authors'
``compression_rate.json`` (``RATES``: its DeiT-T/S/B entries, in ``assets/diffrate_rates.json``). They
count tokens of 224x224 inputs (196 patches); an image with ``N0`` patches keeps ``1 + (P - 1) * N0 //
196`` (exact at 224; mixed resolutions keep the same fraction).
Ties in the class-attention ranking keep the lower row first (the authors' sort is not stable; ties
need equal floats). The rates are searched by the authors' code, so DiffRate does not train here.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources

import torch
from torch import Tensor

from ..config import ViTConfig
from ..execution import AttentionRecord
from ..tokens import true_rows
from .base import Method, segment_rank
from .selection import SubsetRun, merge_wavg

TABLE_PATCHES = 196  # the json's counts are for 224x224 inputs with 16-pixel patches (+ the class token)


def _json_rates() -> dict[str, dict[str, tuple[tuple[int, ...], tuple[int, ...]]]]:
    """The authors' ``compression_rate.json`` DeiT entries (``assets/diffrate_rates.json``, which names its
    source): DeiT size -> target GFLOPs -> (prune kept, merge kept) per block, class token included."""
    table = json.loads(resources.files("nested_svit.assets").joinpath("diffrate_rates.json").read_text())["rates"]
    return {size: {t: (tuple(p), tuple(m)) for t, (p, m) in entries.items()} for size, entries in table.items()}


RATES = _json_rates()


@dataclass(frozen=True)
class DiffRateOptions:
    prune_kept: tuple[int, ...] = ()  # per block: tokens left after pruning (class token included, 196 patches)
    merge_kept: tuple[int, ...] = ()  # per block: tokens left after merging


def json_options(size: str, target_flops: str) -> dict:
    """The options of the authors' json entry for DeiT ``size`` at ``target_flops`` (a key, e.g. "2.9")."""
    prune, merge = RATES[size][target_flops]
    return {"prune_kept": prune, "merge_kept": merge}


def scaled(count: int, patches: int) -> int:
    """A json count (class token included, for 196 patches) for an image of ``patches`` patches."""
    return 1 + (count - 1) * patches // TABLE_PATCHES


class DiffRateRun(SubsetRun):
    def __init__(self, block_pass) -> None:
        super().__init__(block_pass)
        self.prune, self.merge = self.options.prune_kept, self.options.merge_kept
        full = TABLE_PATCHES + 1
        self.blocks = {i for i in self.config.gate_blocks if self.prune[i] < full or self.merge[i] < full}
        self.size = torch.ones(block_pass.layout.total, dtype=torch.float32, device=block_pass.protect.device)
        self.log_size: Tensor | None = None  # sizes are all 1 until the first merge

    def has_mid_selection(self, i: int) -> bool:
        return i in self.blocks

    def key_bias(self, i: int) -> Tensor | None:
        return self.log_size

    def _counts(self, i: int, lengths: list[int]) -> tuple[list[int], list[int], Tensor, Tensor]:
        """Per image: the tokens left after pruning and after merging in block ``i``, on the host and
        (computed there, so nothing is copied) on the device."""
        base = self.base_patches()
        pruned = [min(m, scaled(self.prune[i], n)) for m, n in zip(lengths, base)]
        merged = [min(p, scaled(self.merge[i], n)) for p, n in zip(pruned, base)]
        patches = self.block_pass.patches
        return (pruned, merged, 1 + (self.prune[i] - 1) * patches // TABLE_PATCHES,
                1 + (self.merge[i] - 1) * patches // TABLE_PATCHES)

    def after_attention(self, i: int, y: Tensor, record: AttentionRecord, before: Tensor) -> Tensor | None:
        layout = record.layout
        b, width = layout.batch_size, max(layout.lengths)
        pruned, merged, p_dev, m_dev = self._counts(i, list(layout.lengths))
        lengths = layout.offsets.diff()
        p_dev = torch.minimum(p_dev, lengths)
        m_dev = torch.minimum(m_dev, p_dev)
        # rank: 0 for the class token, 1 + the class-attention rank for the patches
        image = layout.image_index
        first = torch.zeros_like(image, dtype=torch.bool)
        first[layout.first_rows] = True
        cand = true_rows(~first, layout.total - b)
        score = record.class_probs().mean(-1)
        rank = torch.zeros_like(image)
        rank[cand] = 1 + segment_rank(score[cand], image[cand], b)
        keep = torch.zeros_like(self.active)
        keep[record.rows] = rank < m_dev[image]
        sources = sum(p - m for p, m in zip(pruned, merged))
        if sources:
            self._merge(y, record, rank, image, (b, width), m_dev, p_dev, sources,
                        (min(merged), max(pruned), max(merged)))
        candidates = self.rows_mask(record.rows) & ~self.block_pass.protect
        return self.chose(keep, candidates, merged)

    def _merge(self, y: Tensor, record: AttentionRecord, rank: Tensor, image: Tensor, shape: tuple[int, int],
               m_dev: Tensor, p_dev: Tensor, sources: int, span: tuple[int, int, int]) -> None:
        """Ranks ``m .. p-1`` of each image merged into its ranks ``1 .. m-1`` (``get_merge_func``);
        ``span``: (lowest ``m``, highest ``p``, highest ``m``) over the images, on the host."""
        b, width = shape
        lo, hi, widest = span
        ordered = torch.full((b, width), -1, dtype=torch.int64, device=y.device)  # [B, L] rows by rank
        ordered[image, rank] = record.rows
        metric = y[record.rows].float()
        metric = metric / metric.norm(dim=-1, keepdim=True)
        padded = metric.new_zeros(b, width, metric.shape[-1])
        padded[image, rank] = metric
        similarity = padded[:, lo:hi] @ padded[:, :widest].transpose(1, 2)  # [B, hi-lo, M]: sources x kept
        col = torch.arange(widest, device=y.device)
        not_kept = (col[None, :] == 0) | (col[None, :] >= m_dev[:, None])  # [B, M]: the class token, merged ranks
        similarity = similarity.masked_fill(not_kept[:, None, :], float("-inf"))
        node_max, node_idx = similarity.max(-1)  # the first best kept rank, as torch.max in rank order
        pos = torch.arange(lo, hi, device=y.device)[None, :]
        is_src = (pos >= m_dev[:, None]) & (pos < p_dev[:, None])
        flat = true_rows(is_src, sources)
        img = flat // (hi - lo)
        src = ordered[img, lo + flat % (hi - lo)]
        dst = ordered[img, node_idx.reshape(-1)[flat]]
        merge_wavg(y, torch.ones_like(self.size), src, dst)  # plain means (``scatter_reduce`` "mean")
        self.size = self.size.index_add(0, dst, self.size[src] * node_max.reshape(-1)[flat])
        self.log_size = self.size.log()


def matching_flops(config: ViTConfig, options: DiffRateOptions, kept: Tensor, total: Tensor) -> Tensor:
    """The cosine similarity of each merging block's merged tokens to its kept ones: ``2 (p - m) m C``
    (the authors' own count leaves it out)."""
    prune, merge = options.prune_kept, options.merge_kept
    patches = total.double() - 1
    flops = torch.zeros_like(patches)
    for i in config.gate_blocks:
        p = torch.minimum(kept[:, i].double(), 1 + torch.floor((prune[i] - 1) * patches / TABLE_PATCHES))
        m = torch.minimum(p, 1 + torch.floor((merge[i] - 1) * patches / TABLE_PATCHES))
        flops = flops + 2 * (p - m) * m * config.embed_dim
    return flops


def _validate(config: ViTConfig, options: DiffRateOptions) -> None:
    prune, merge = options.prune_kept, options.merge_kept
    if not prune and not merge:
        raise ValueError("DiffRate needs its counts: prune_kept and merge_kept, one per block (the diffrate_* "
                         "models carry its authors' compression_rate.json entries)")
    if len(prune) != config.depth or len(merge) != config.depth:
        raise ValueError(f"DiffRate needs one prune and one merge count per block ({config.depth}), "
                         f"got {len(prune)} and {len(merge)}")
    if min(prune + merge) < 1:
        raise ValueError("DiffRate's counts include the class token: each must be >= 1")


METHOD = Method(
    name="diffrate", title="DiffRate", run=DiffRateRun, options=DiffRateOptions, selector_flops=matching_flops,
    validate=_validate, train_execution=None,
    train_refusal="DiffRate runs the rates its authors searched (compression_rate.json) on plain DeiT weights; "
                  "the rate search is their code's",
)
