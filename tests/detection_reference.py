"""An independent batch-1 forward of the official SViT-Adapter backbone, written from the official
code's structure (uzh-rpg/svit ``selective_vit_adapter.py``, ``adapter_modules.py``,
``ms_deform_attn_core_pytorch``) on an *official-layout* state dict: functional convs/BN/linears,
``nn.TransformerEncoderLayer`` blocks, argsort gather / scatter_ of kept tokens. Shares no code with
``nested_svit.detection``. Also converts our detector state dicts to the official layout."""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_TO_OFFICIAL = {"attn.qkv.weight": "self_attn.in_proj_weight", "attn.qkv.bias": "self_attn.in_proj_bias",
                "attn.proj.weight": "self_attn.out_proj.weight", "attn.proj.bias": "self_attn.out_proj.bias",
                "mlp.fc1.weight": "linear1.weight", "mlp.fc1.bias": "linear1.bias",
                "mlp.fc2.weight": "linear2.weight", "mlp.fc2.bias": "linear2.bias",
                "norm1.weight": "norm1.weight", "norm1.bias": "norm1.bias",
                "norm2.weight": "norm2.weight", "norm2.bias": "norm2.bias"}


def to_official(state: dict[str, Tensor], gated: bool) -> dict[str, Tensor]:
    """Our detector keys -> the official mmdet file's keys (SViT: TransformerEncoderLayer blocks)."""
    out = {}
    for k, v in state.items():
        m = re.fullmatch(r"backbone\.blocks\.(\d+)\.(.+)", k)
        if gated and m:
            k = f"backbone.blocks.{m.group(1)}.TransformerEncoderLayer.{_TO_OFFICIAL[m.group(2)]}"
        k = k.replace("backbone.gates.", "backbone.selective_modules.")
        out[k] = v.clone()
    return out


def _ref_points(shapes):
    refs = []
    for h, w in shapes:
        ry, rx = torch.meshgrid(torch.linspace(0.5, h - 0.5, h), torch.linspace(0.5, w - 0.5, w), indexing="ij")
        refs.append(torch.stack((rx.reshape(-1)[None] / w, ry.reshape(-1)[None] / h), -1))
    return torch.cat(refs, 1)[:, :, None]  # (1, Lq, 1, 2)


def _core(value, shapes, loc, weights):
    n, _, m, d = value.shape
    _, lq, m, lv, p, _ = loc.shape
    values = value.split([h * w for h, w in shapes], dim=1)
    grids = 2 * loc - 1
    sampled = []
    for lid, (h, w) in enumerate(shapes):
        v = values[lid].flatten(2).transpose(1, 2).reshape(n * m, d, h, w)
        g = grids[:, :, :, lid].transpose(1, 2).flatten(0, 1)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    weights = weights.transpose(1, 2).reshape(n * m, 1, lq, lv * p)
    return (torch.stack(sampled, -2).flatten(-2) * weights).sum(-1).view(n, m * d, lq).transpose(1, 2)


def _lin(sd, prefix, x):
    return F.linear(x, sd[prefix + ".weight"], sd[prefix + ".bias"])


def _ln(sd, prefix, x, eps=1e-6):
    return F.layer_norm(x, x.shape[-1:], sd[prefix + ".weight"], sd[prefix + ".bias"], eps)


def _msda(sd, prefix, query, ref, feat, shapes, heads=6, points=4):
    n, lq, c = query.shape
    lv = len(shapes)
    value = _lin(sd, prefix + ".value_proj", feat).view(n, feat.shape[1], heads, c // heads)
    off = _lin(sd, prefix + ".sampling_offsets", query).view(n, lq, heads, lv, points, 2)
    aw = _lin(sd, prefix + ".attention_weights", query).view(n, lq, heads, lv * points).softmax(-1)
    aw = aw.view(n, lq, heads, lv, points)
    st = torch.tensor(shapes)
    normalizer = torch.stack([st[..., 1], st[..., 0]], -1)
    loc = ref[:, :, None, :, None, :] + off / normalizer[None, None, None, :, None, :]
    return _lin(sd, prefix + ".output_proj", _core(value, shapes, loc, aw))


def _bn(sd, prefix, x):
    return F.batch_norm(x, sd[prefix + ".running_mean"], sd[prefix + ".running_var"], sd[prefix + ".weight"],
                        sd[prefix + ".bias"], False, 0.0, 1e-5)


def _spm(sd, img):
    p = "backbone.spm."
    x = img
    for conv, bn, stride in ((0, 1, 2), (3, 4, 1), (6, 7, 1)):
        x = F.relu(_bn(sd, f"{p}stem.{bn}", F.conv2d(x, sd[f"{p}stem.{conv}.weight"], stride=stride, padding=1)))
    c1 = F.max_pool2d(x, 3, 2, 1)
    maps = [c1]
    for name in ("conv2", "conv3", "conv4"):
        maps.append(F.relu(_bn(sd, f"{p}{name}.1", F.conv2d(maps[-1], sd[f"{p}{name}.0.weight"], stride=2, padding=1))))
    outs = [F.conv2d(m, sd[f"{p}fc{i + 1}.weight"], sd[f"{p}fc{i + 1}.bias"]) for i, m in enumerate(maps)]
    b, dim = outs[0].shape[:2]
    return outs[0], *[o.view(b, dim, -1).transpose(1, 2) for o in outs[1:]]


def _encoder_layer(sd, prefix, dim, heads) -> nn.TransformerEncoderLayer:
    layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, activation=F.gelu, batch_first=True,
                                       norm_first=True, layer_norm_eps=1e-5)
    layer.load_state_dict({k[len(prefix) + 1:]: v for k, v in sd.items() if k.startswith(prefix + ".")})
    return layer.eval()


def _extract(sd, prefix, c, x, H, W):
    shapes2 = [(H, W)]
    ref2 = _ref_points([(H * 2, W * 2), (H, W), (H // 2, W // 2)])
    c = c + _msda(sd, prefix + ".attn", _ln(sd, prefix + ".query_norm", c), ref2, _ln(sd, prefix + ".feat_norm", x), shapes2)
    y = _lin(sd, prefix + ".ffn.fc1", _ln(sd, prefix + ".ffn_norm", c))
    b, n, ch = y.shape
    k = n // 21
    dw = lambda t, h, w: F.conv2d(t.transpose(1, 2).reshape(b, ch, h, w), sd[prefix + ".ffn.dwconv.dwconv.weight"],  # noqa: E731
                                   sd[prefix + ".ffn.dwconv.dwconv.bias"], padding=1, groups=ch).flatten(2).transpose(1, 2)
    y = torch.cat([dw(y[:, :16 * k], 2 * H, 2 * W), dw(y[:, 16 * k:20 * k], H, W), dw(y[:, 20 * k:], H // 2, W // 2)], 1)
    return c + _lin(sd, prefix + ".ffn.fc2", F.gelu(y))


def _inputs(sd, img):
    """The adapter's inputs for one image: (H, W, the injector's shapes and reference points, c1, the
    SPM tokens ``c`` with level embeddings, the patch tokens ``x`` with the interpolated positions)."""
    H, W = img.shape[-2] // 16, img.shape[-1] // 16
    c1, c2, c3, c4 = _spm(sd, img)
    lvl = sd["backbone.level_embed"]
    c = torch.cat([c2 + lvl[0], c3 + lvl[1], c4 + lvl[2]], 1)
    x = F.conv2d(img, sd["backbone.patch_embed.proj.weight"], sd["backbone.patch_embed.proj.bias"], stride=16)
    x = x.flatten(2).transpose(1, 2)
    side = int(round((sd["backbone.pos_embed"].shape[1] - 1) ** 0.5))  # the table's class-token slot is unused
    pos = sd["backbone.pos_embed"][:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    x = x + F.interpolate(pos, size=(H, W), mode="bicubic", align_corners=False).reshape(1, -1, H * W).permute(0, 2, 1)
    return H, W, [(H * 2, W * 2), (H, W), (H // 2, W // 2)], _ref_points([(H, W)]), c1, c, x


@torch.no_grad()
def official_backbone(sd: dict[str, Tensor], img: Tensor, dim: int, heads: int) -> tuple[list[Tensor], list[int]]:
    """Official-layout SViT-Adapter state dict, one padded image ``[1, 3, h, w]`` -> ([f1..f4], kept per block)."""
    H, W, shapes1, ref1, c1, c, x = _inputs(sd, img)
    kept = []
    for k, (first, last) in enumerate([[0, 2], [3, 5], [6, 8], [9, 11]]):
        p = f"backbone.interactions.{k}"
        x = x + sd[p + ".injector.gamma"] * _msda(sd, p + ".injector.attn", _ln(sd, p + ".injector.query_norm", x),
                                                  ref1, _ln(sd, p + ".injector.feat_norm", c), shapes1)
        for i in range(first, last + 1):
            block = _encoder_layer(sd, f"backbone.blocks.{i}.TransformerEncoderLayer", dim, heads)
            if i < 3:
                x = block(x)
                kept.append(x.shape[1])
                continue
            g = f"backbone.selective_modules.{i - 3}"
            h = F.gelu(_lin(sd, g + ".mlp.fc1", _ln(sd, g + ".norm", x, 1e-5)))
            selector = torch.argmin(F.log_softmax(_lin(sd, g + ".mlp.fc2", h), -1), -1).bool()  # [1, N]
            n_keep = int(selector.sum())
            kept.append(n_keep)
            if n_keep == 0:
                continue
            idx = torch.argsort(selector.int(), dim=1, descending=True)[:, :n_keep].unsqueeze(-1).expand(-1, -1, dim)
            x.scatter_(1, idx, block(torch.gather(x, 1, idx)))
        c = _extract(sd, p + ".extractor", c, x, H, W)
        if k == 3:
            for e in range(2):
                c = _extract(sd, f"{p}.extra_extractors.{e}", c, x, H, W)
    return _outputs(sd, c, x, c1, H, W, dim), kept


def _outputs(sd, c, x, c1, H, W, dim):
    """The backbone's four BN-normalised maps from the adapter's ``c``, the grid tokens ``x`` and ``c1``."""
    c2, c3, c4 = c.split([4 * H * W, H * W, (H // 2) * (W // 2)], 1)
    c2 = c2.transpose(1, 2).reshape(1, dim, 2 * H, 2 * W)
    c3 = c3.transpose(1, 2).reshape(1, dim, H, W)
    c4 = c4.transpose(1, 2).reshape(1, dim, H // 2, W // 2)
    c1 = F.conv_transpose2d(c2, sd["backbone.up.weight"], sd["backbone.up.bias"], stride=2) + c1
    x3 = x.transpose(1, 2).reshape(1, dim, H, W)
    c1 = c1 + F.interpolate(x3, scale_factor=4, mode="bilinear", align_corners=False)
    c2 = c2 + F.interpolate(x3, scale_factor=2, mode="bilinear", align_corners=False)
    c3 = c3 + x3
    c4 = c4 + F.interpolate(x3, scale_factor=0.5, mode="bilinear", align_corners=False)
    return [_bn(sd, f"backbone.norm{i + 1}", m) for i, m in enumerate((c1, c2, c3, c4))]


def _tomeatc_block(sd, i, x, size, dim, heads):
    """ATC's ``Block_ToMeATC`` attention half (DeiT block, ``+ log size`` per key once sizes exist) ->
    (x, the head-averaged keys)."""
    n = x.shape[1]
    qkv = _lin(sd, f"backbone.blocks.{i}.attn.qkv", _ln(sd, f"backbone.blocks.{i}.norm1", x))
    q, k, v = qkv.view(1, n, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
    logits = q @ k.transpose(-1, -2) * (dim // heads) ** -0.5
    if size is not None:
        logits = logits + size.log()[:, None, None, :, 0]
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(1, n, dim)
    return x + _lin(sd, f"backbone.blocks.{i}.attn.proj", out), k.mean(1)


def _reduction(metric, linkage):
    """ATC's ``agglomerative_clustering`` (scikit-learn per image) or ToMe's ``bipartite_soft_matching``
    (no class token) to ``int(0.7 T)`` tokens -> (merge(x) summing, unmerge(x))."""
    t = metric.shape[1]
    keep = int(0.7 * t)
    metric = metric / metric.norm(dim=-1, keepdim=True)
    if linkage != "tome":
        from sklearn.cluster import AgglomerativeClustering

        distance = (1 - metric @ metric.transpose(-1, -2))[0].numpy()
        labels = AgglomerativeClustering(n_clusters=keep, metric="precomputed", linkage=linkage).fit(distance).labels_
        labels = torch.from_numpy(labels).long()
        return (lambda x: torch.zeros(1, keep, x.shape[-1], dtype=x.dtype).index_add(1, labels, x),
                lambda x: x[:, labels])
    r = min(t - keep, t // 2)
    a, b = metric[0, 0::2], metric[0, 1::2]
    node_max, node_idx = (a @ b.T).max(-1)
    edge = node_max.argsort(descending=True)
    unm, src = edge[r:], edge[:r]  # no class token: the unmerged stay in edge order
    dst = node_idx[src]

    def merge(x):
        xa, xb = x[:, 0::2], x[:, 1::2]
        return torch.cat([xa[:, unm], xb.index_add(1, dst, xa[:, src])], 1)

    def unmerge(x):
        out = torch.zeros(1, t, x.shape[-1], dtype=x.dtype)
        xu, xd = x[:, :len(unm)], x[:, len(unm):]
        out[:, 1::2] = xd
        out[:, 2 * unm] = xu
        out[:, 2 * src] = xd[:, dst]
        return out

    return merge, unmerge


@torch.no_grad()
def tomeatc_backbone(sd: dict[str, Tensor], img: Tensor, dim: int, heads: int, linkage: str
                     ) -> tuple[list[Tensor], list[int]]:
    """ATC's ``ToMeATCViTAdapter`` (its ``MMDet_setup``) on one padded image ``[1, 3, h, w]``: reduction in
    blocks 3/6/9 to ``int(0.7 T)`` tokens (``linkage``: single/average/complete, or "tome"), proportional
    attention; each injector on the unmerged grid, then merged back with sizes from 1
    (``merge_features``); the extractors and the output on the unmerged grid. -> ([f1..f4], tokens per block)."""
    H, W, shapes1, ref1, c1, c, x = _inputs(sd, img)
    size, merges, unmerges, kept = None, [], [], []

    def unmerged(t):
        for u in reversed(unmerges):
            t = u(t)
        return t

    for k, (first, last) in enumerate([[0, 2], [3, 5], [6, 8], [9, 11]]):
        p = f"backbone.interactions.{k}"
        x = unmerged(x)
        x = x + sd[p + ".injector.gamma"] * _msda(sd, p + ".injector.attn", _ln(sd, p + ".injector.query_norm", x),
                                                  ref1, _ln(sd, p + ".injector.feat_norm", c), shapes1)
        s = torch.ones_like(x[..., :1])  # merge_features: sizes from 1
        for m in merges:
            x, s = m(x * s), m(s)
            x = x / s
        for i in range(first, last + 1):
            x, metric = _tomeatc_block(sd, i, x, size, dim, heads)
            if i in (3, 6, 9):
                merge, unmerge = _reduction(metric, linkage)
                s = torch.ones_like(x[..., :1]) if size is None else size
                x, size = merge(x * s), merge(s)
                x = x / size
                merges.append(merge)
                unmerges.append(unmerge)
            x = x + _lin(sd, f"backbone.blocks.{i}.mlp.fc2",
                         F.gelu(_lin(sd, f"backbone.blocks.{i}.mlp.fc1", _ln(sd, f"backbone.blocks.{i}.norm2", x))))
            kept.append(x.shape[1])
        xe = unmerged(x)
        c = _extract(sd, p + ".extractor", c, xe, H, W)
        if k == 3:
            for e in range(2):
                c = _extract(sd, f"{p}.extra_extractors.{e}", c, xe, H, W)
    return _outputs(sd, c, unmerged(x), c1, H, W, dim), kept
