"""Independent per-image implementations of the baselines, written from ../shared/specs/baselines.md
with plain tensor ops on a timm-layout state dict: explicit ``[H, N, N]`` attention matrices, the
authors' ``argsort`` / ``topk`` / distance-matrix forms, one image at a time. Nothing from
nested_svit is used, so the engine's packed execution is checked against the algorithms themselves.

Each ``run_*`` takes ``(state, image [3, H, W])`` and returns ``(logits [K], tokens per block, kept)``:
tokens per block counts what each block's MLP processed (incl. class and fused tokens), ``kept`` lists
per selection the sorted original patch indices that stay.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

HEAD_DIM = 64


def _ln(x, state, prefix, eps=1e-6):
    return F.layer_norm(x, x.shape[-1:], state[prefix + ".weight"], state[prefix + ".bias"], eps)


def _lin(x, state, prefix):
    return F.linear(x, state[prefix + ".weight"], state[prefix + ".bias"])


def embed(state, image):
    w = state["patch_embed.proj.weight"]
    p = w.shape[-1]
    x = F.conv2d(image[None], w, state["patch_embed.proj.bias"], stride=p)[0].flatten(1).T  # [P, C]
    grid = (image.shape[1] // p, image.shape[2] // p)
    pos = state["pos_embed"][0]
    side = math.isqrt(pos.shape[0] - 1)
    patch_pos = pos[1:]
    if grid != (side, side):
        patch_pos = F.interpolate(patch_pos.T.reshape(1, -1, side, side), size=grid, mode="bicubic",
                                  align_corners=False)[0].flatten(1).T
    return torch.cat([state["cls_token"][0] + pos[:1], x + patch_pos], 0)


def attention(x, state, i):
    """-> (attention output [N, C] after proj, probabilities [H, N, N], values [N, C])."""
    n, c = x.shape
    h = c // HEAD_DIM
    qkv = _lin(_ln(x, state, f"blocks.{i}.norm1"), state, f"blocks.{i}.attn.qkv")
    q, k, v = qkv.view(n, 3, h, HEAD_DIM).permute(1, 2, 0, 3)
    probs = torch.softmax(q @ k.transpose(-1, -2) * HEAD_DIM ** -0.5, -1)
    out = (probs @ v).transpose(0, 1).reshape(n, c)
    return _lin(out, state, f"blocks.{i}.attn.proj"), probs, qkv[:, 2 * c:]


def sized_attention(x, state, i, size):
    """Block ``i``'s attention with ``+ log size`` on every key's logit (proportional attention; ``size``
    None: none) -> (probabilities ``[H, N, N]``, keys and values ``[H, N, d]``)."""
    n, c = x.shape
    qkv = _lin(_ln(x, state, f"blocks.{i}.norm1"), state, f"blocks.{i}.attn.qkv")
    q, k, v = qkv.view(n, 3, c // HEAD_DIM, HEAD_DIM).permute(1, 2, 0, 3)
    logits = q @ k.transpose(-1, -2) * HEAD_DIM ** -0.5
    if size is not None:
        logits = logits + size.log()[None, None, :]
    return torch.softmax(logits, -1), k, v


def attend(x, state, i, probs, v):
    """``x + proj(probs @ v)``: the attention half's residual."""
    return x + _lin((probs @ v).transpose(0, 1).reshape(x.shape), state, f"blocks.{i}.attn.proj")


def mlp(x, state, i):
    h = _ln(x, state, f"blocks.{i}.norm2")
    return x + _lin(F.gelu(_lin(h, state, f"blocks.{i}.mlp.fc1")), state, f"blocks.{i}.mlp.fc2")


def block(x, state, i):
    return mlp(x + attention(x, state, i)[0], state, i)


def head_cls(x, state):
    return _lin(_ln(x, state, "norm")[0], state, "head")


def run_dynamicvit(state, image, locations=(3, 6, 9), rho=0.7):
    x = embed(state, image)
    base = x.shape[0] - 1
    counts, stage, kept, orig = [], 0, [], torch.arange(base)
    for i in range(12):
        if i in locations:
            stage += 1
            pre = f"gates.{stage - 1}"
            tokens = x[1:]
            h = F.gelu(_lin(_ln(tokens, state, pre + ".in_conv.0", 1e-5), state, pre + ".in_conv.1"))
            half = h.shape[-1] // 2
            h = torch.cat([h[:, :half], h[:, half:].mean(0, keepdim=True).expand(h.shape[0], -1)], -1)
            for j in (0, 2):
                h = F.gelu(_lin(h, state, f"{pre}.out_conv.{j}"))
            logp = torch.log_softmax(_lin(h, state, pre + ".out_conv.4"), -1)
            keep = torch.argsort(logp[:, 0], descending=True)[:int(base * rho ** stage)]
            x = torch.cat([x[:1], tokens[keep]], 0)
            orig = orig[keep]
            kept.append(sorted(orig.tolist()))
        x = block(x, state, i)
        counts.append(x.shape[0])
    return head_cls(x, state), counts, kept


def run_evit(state, image, locations=(3, 6, 9), keep_rate=0.7, fuse=True, tokens=None):
    """``tokens``: a list that receives the final sequence and each token's original patch index
    (-1 for fused tokens)."""
    x = embed(state, image)
    counts, kept, orig = [], [], torch.arange(x.shape[0] - 1)  # -1: a fused token
    for i in range(12):
        out, probs, _ = attention(x, state, i)
        x = x + out
        if i in locations:
            n = x.shape[0]
            a = probs[:, 0, 1:].mean(0)
            left = math.ceil(keep_rate * (n - 1))
            idx = torch.topk(a, left).indices
            rest = torch.ones(n - 1, dtype=torch.bool)
            rest[idx] = False
            parts = [x[:1], x[1:][idx]]
            orig = orig[idx]
            kept.append(sorted(o for o in orig.tolist() if o >= 0))
            if fuse:
                parts.append((a[rest, None] * x[1:][rest]).sum(0, keepdim=True))
                orig = torch.cat([orig, torch.tensor([-1])])
            x = torch.cat(parts, 0)
        x = mlp(x, state, i)
        counts.append(x.shape[0])
    if tokens is not None:
        tokens += [x, orig]
    return head_cls(x, state), counts, kept


def run_evovit(state, image, locations=(4, 8), ratio=0.5, tradeoff=0.5):
    x = embed(state, image)
    base = x.shape[0] - 1
    score = torch.zeros(base)
    sel = torch.arange(base)
    counts, kept = [], []
    for i in range(12):
        if i in locations:
            sel = torch.argsort(score, descending=True)[:int(base * ratio)]
            kept.append(sorted(sel.tolist()))
        part = torch.cat([x[:1], x[1:][sel]], 0)
        out, probs, _ = attention(part, state, i)
        part = mlp(part + out, state, i)
        a = probs[:, 0, 1:].sum(0)
        t = 1.0 if i < min(locations) else tradeoff
        score[sel] = (1 - t) * score[sel] + t * a
        x = x.clone()
        x[:1] = part[:1]
        x[1:][sel] = part[1:]
        counts.append(part.shape[0])
    pooled = _ln(x[1:].mean(0), state, "norm")
    return _lin(pooled, state, "head"), counts, kept


def run_ats(state, image, blocks=range(3, 12)):
    x = embed(state, image)
    samples = x.shape[0] - 1  # n_ref - 1: the initial patch count
    counts, kept, orig = [], [], torch.arange(samples)
    for i in range(12):
        out, probs, v = attention(x, state, i)
        x = x + out
        if i in blocks:
            s = probs[:, 0, 1:].sum(0) * v[1:].norm(dim=-1)
            s = s / s.sum()
            s_sorted, order = torch.sort(s)
            cdf = torch.cumsum(s_sorted, 0)
            cdf = (cdf - cdf.min()) / (cdf.max() - cdf.min())
            y0 = cdf[cdf > 0].min()
            y = y0 + torch.arange(samples) * (1 - y0) / (samples - 1)
            picks = torch.argmin((y[:, None] - cdf[None, :]).abs(), 1)  # the release's distance matrix
            chosen = order[torch.unique(picks)]
            x = torch.cat([x[:1], x[1:][chosen]], 0)
            orig = orig[chosen]
            kept.append(sorted(orig.tolist()))
        x = mlp(x, state, i)
        counts.append(x.shape[0])
    return head_cls(x, state), counts, kept


def run_tome(state, image, r=13):
    """ToMe's ToMeBlock per image: proportional attention (+ log size per key), then bipartite soft
    matching on the head-averaged keys and a size-weighted merge, then the MLP."""
    x = embed(state, image)
    size = torch.ones(x.shape[0])
    counts, kept = [], []
    orig = torch.arange(-1, x.shape[0] - 1)  # -1: the class token; a merged token keeps its B partner's index
    for i in range(12):
        n = x.shape[0]
        probs, k, v = sized_attention(x, state, i, size)
        x = attend(x, state, i, probs, v)
        rr = min(r, (n - 1) // 2)
        metric = k.mean(0)
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[0::2], metric[1::2]
        scores = a @ b.T
        scores[0, :] = -math.inf
        node_max, node_idx = scores.max(-1)
        edge = node_max.argsort(descending=True)
        unm, src = edge[rr:].sort().values, edge[:rr]
        dst = node_idx[src]
        xs, ss = x * size[:, None], size[:, None]
        merged_x = xs[1::2].index_add(0, dst, xs[0::2][src])
        merged_s = ss[1::2].index_add(0, dst, ss[0::2][src])
        x = torch.cat([xs[0::2][unm], merged_x], 0) / torch.cat([ss[0::2][unm], merged_s], 0)
        size = torch.cat([ss[0::2][unm], merged_s], 0)[:, 0]
        orig = torch.cat([orig[0::2][unm], orig[1::2]], 0)
        kept.append(sorted(o for o in orig.tolist() if o >= 0))
        x = mlp(x, state, i)
        counts.append(x.shape[0])
    return head_cls(x, state), counts, kept


def run_atc(state, image, linkage="average", rate=0.7, blocks=(3, 6, 9), proportional=True, clusters=None):
    """ATC's Block_ATC per image: attention (+ log size per key once sizes exist), then scikit-learn's
    ``AgglomerativeClustering`` on ``1 - cos`` of the head-averaged keys of the patch tokens (the class
    token apart) down to ``int(N0 * rate ** (k + 1))`` clusters, each cluster's tokens summed with their
    sizes (``scatter_reduce``) and divided by the summed size, in scikit-learn's label order; then the MLP.
    ``kept`` lists per reduction each cluster's lowest original patch index (the row the engine keeps
    for it), sorted; ``clusters`` (when given a list) gets per reduction the clusters as sorted tuples."""
    import numpy as np
    from sklearn.cluster import AgglomerativeClustering

    x = embed(state, image)
    n0 = x.shape[0] - 1
    size = None
    members = [(t,) for t in range(n0)]  # the original patches each token stands for
    counts, kept = [], []
    for i in range(12):
        n, c = x.shape
        probs, k, v = sized_attention(x, state, i, size)
        x = attend(x, state, i, probs, v)
        if i in blocks:
            wanted = min(int(n0 * rate ** (blocks.index(i) + 1)), n - 1)
            metric = k.mean(0)
            metric = metric / metric.norm(dim=-1, keepdim=True)
            distance = (1 - metric @ metric.T)[1:, 1:].detach().numpy()
            labels = AgglomerativeClustering(n_clusters=wanted, metric="precomputed",
                                             linkage=linkage).fit(distance).labels_
            labels = torch.from_numpy(np.concatenate([[0], labels + 1]))
            ones = torch.ones(n, 1) if size is None else size[:, None]
            sums = torch.zeros(wanted + 1, c).index_add(0, labels, x * ones)
            sizes = torch.zeros(wanted + 1, 1).index_add(0, labels, ones)
            x, size = sums / sizes, sizes[:, 0]
            members = [tuple(sorted(t for j, m in enumerate(members) if labels[j + 1] == g + 1 for t in m))
                       for g in range(wanted)]
            kept.append(sorted(m[0] for m in members))
            if clusters is not None:
                clusters.append(sorted(members))
        if not proportional:  # the authors' attn_size = None after every block
            size = None
        x = mlp(x, state, i)
        counts.append(x.shape[0])
    return head_cls(x, state), counts, kept


def run_diffrate(state, image, prune, merge):
    """DiffRate's ``DiffRateBlock`` (eval) per image: attention with ``+ log size`` per key, the tokens
    sorted by the class token's attention (mean over heads; the class token first), cut to the block's
    prune count, then ``get_merge_func``: the tokens from the merge count on go to their most
    cosine-similar kept token (post-attention features; never the class token), ``scatter_reduce``
    "mean" with the kept token included, sizes ``+= size * cosine``; then the MLP. The json's counts
    (for 196 patches) scaled to the image's ``N0`` as the engine documents: ``1 + (c - 1) * N0 // 196``."""
    x = embed(state, image)
    n0 = x.shape[0] - 1
    size = torch.ones(x.shape[0])
    orig = torch.arange(-1, n0)  # -1: the class token; a token others merge into keeps its own index
    counts, kept = [], []
    for i in range(12):
        c = x.shape[1]
        probs, _, v = sized_attention(x, state, i, size)
        x = attend(x, state, i, probs, v)
        order = torch.sort(probs[:, 0, 1:].mean(0), descending=True, stable=True).indices + 1
        order = torch.cat([torch.zeros(1, dtype=torch.int64), order])
        p_kept, m_kept = 1 + (prune[i] - 1) * n0 // 196, 1 + (merge[i] - 1) * n0 // 196
        x, size, orig = x[order][:p_kept], size[order][:p_kept], orig[order][:p_kept]
        if m_kept < p_kept:
            metric = x / x.norm(dim=-1, keepdim=True)
            similarity = metric[m_kept:] @ metric[:m_kept].T
            similarity[:, 0] = -math.inf
            node_max, node_idx = similarity.max(-1)
            x = x[:m_kept].scatter_reduce(0, node_idx[:, None].expand(-1, c), x[m_kept:], reduce="mean")
            size = size[:m_kept].scatter_reduce(0, node_idx, size[m_kept:] * node_max, reduce="sum")
            orig = orig[:m_kept]
        if prune[i] < 197 or merge[i] < 197:  # the blocks that select (the others only sort)
            kept.append(sorted(o for o in orig.tolist() if o >= 0))
        x = mlp(x, state, i)
        counts.append(x.shape[0])
    return head_cls(x, state), counts, kept



def _mctf_merge(x, plan, keep_dst=False):
    """MCTF's two-way ``merge`` on one image's ``x [T, ...]`` (A = even, B = odd positions): pass 1
    sums the first ``r1`` A tokens of ``edge`` into their B partner, pass 2 (``bidirection``) the first
    ``r2`` B tokens of ``edge2`` into their partner among the A tokens left. -> [A left (ascending), B
    left (``edge2`` order; B order without pass 2)]. ``keep_dst``: each group keeps its destination's
    entry instead of a sum (the representative of a group)."""
    bidirection, r1, r2, node_idx, edge, node_idx2, edge2 = plan
    a, b = x[0::2], x[1::2]
    src, unm = edge[:r1], edge[r1:].sort().values
    if not keep_dst:
        b = b.index_add(0, node_idx[src], a[src])
    if not bidirection:
        return torch.cat([a[unm], b])
    a = a[unm]
    src2, unm2 = edge2[:r2], edge2[r2:]
    if not keep_dst:
        a = a.index_add(0, node_idx2[src2], b[src2])
    return torch.cat([a, b[unm2]])


def run_mctf(state, image, r=16, blocks=tuple(range(1, 12)), tau=(1, 20, 40), bidirection=True):
    """MCTF's ``Block_DEIT`` with one-step-ahead attention (``utils/mctf.py``, pooling 1) per image:
    the block's attention with ``+ log size`` per key; the multi-criteria scores of A (even) and B
    (odd) tokens of the block input; two-way matching; tokens, sizes and the attention fused by sums,
    tokens and queries weighted by attention received x size / max size; the values recomputed from
    the fused tokens; then the MLP. Blocks that do not fuse attend with ``+ log size``."""
    x = embed(state, image)
    size = None
    orig = torch.arange(-1, x.shape[0] - 1)  # -1: the class token; a group keeps its representative's index
    counts, kept = [], []
    for i in range(12):
        t, c = x.shape
        h = c // HEAD_DIM
        attn, _, v = sized_attention(x, state, i, size)  # [H, T, T]
        rr = r if t - r >= 10 else t - 10
        rr = min(int((t - 1) * rr) if rr < 1 else int(rr), (t - 1) // 2)
        if i in blocks and rr > 0:
            r1, r2 = (rr // 2, rr - rr // 2) if bidirection else (rr, 0)
            received = attn.mean((0, 1))
            s = torch.ones(t, dtype=x.dtype) if size is None else size
            metric = x / x.norm(dim=-1, keepdim=True)
            sim = metric[0::2] @ metric[1::2].T
            scores = ((sim + 1) / 2) ** (1 / tau[0]) if tau[0] else torch.ones_like(sim)
            for per_token, tt in ((received, tau[1]), (s, tau[2])):
                if tt:
                    inv = 1 / per_token
                    inv = inv / inv.max()
                    scores = scores * (inv[0::2, None] * inv[None, 1::2]) ** (1 / tt)
            scores[0, :] = -math.inf
            node_max, node_idx = scores.max(-1)
            edge = torch.sort(node_max, descending=True, stable=True).indices
            node_max2, node_idx2 = scores[edge[r1:].sort().values].T.max(-1)
            edge2 = torch.sort(node_max2, descending=True, stable=True).indices
            plan = (bidirection, r1, r2, node_idx, edge, node_idx2, edge2)
            w = received * s / s.max()  # attention received x size (pooling 1)
            norm = _mctf_merge(w, plan)
            x = _mctf_merge(x * w[:, None], plan) / norm[:, None]
            size = _mctf_merge(s, plan)
            keys = _mctf_merge(attn.permute(2, 0, 1), plan).permute(1, 2, 0)  # [H, T, T']: keys summed
            fused = _mctf_merge((keys * w[None, :, None]).permute(1, 0, 2), plan).permute(1, 0, 2)
            attn = fused / norm[None, :, None]  # [H, T', T']: queries weighted
            orig = _mctf_merge(orig, plan, keep_dst=True)
            kept.append(sorted(o for o in orig.tolist() if o >= 0))
            v = _lin(_ln(x, state, f"blocks.{i}.norm1"), state, f"blocks.{i}.attn.qkv")[:, 2 * c:]
            v = v.view(x.shape[0], h, HEAD_DIM).transpose(0, 1)
        x = attend(x, state, i, attn, v)
        x = mlp(x, state, i)
        counts.append(x.shape[0])
    return head_cls(x, state), counts, kept
