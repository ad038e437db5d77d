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
        n, c = x.shape
        h = c // HEAD_DIM
        qkv = _lin(_ln(x, state, f"blocks.{i}.norm1"), state, f"blocks.{i}.attn.qkv")
        q, k, v = qkv.view(n, 3, h, HEAD_DIM).permute(1, 2, 0, 3)
        logits = q @ k.transpose(-1, -2) * HEAD_DIM ** -0.5 + size.log()[None, None, :]
        out = (torch.softmax(logits, -1) @ v).transpose(0, 1).reshape(n, c)
        x = x + _lin(out, state, f"blocks.{i}.attn.proj")
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
