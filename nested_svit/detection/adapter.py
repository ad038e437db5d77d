"""ViT-Adapter backbone around the token stack (official ``ViTAdapter`` / ``SelectiveViTAdapter``).

Data flow per image (padded size ``h x w``, multiples of 32; ``N = h/16 * w/16`` ViT tokens):
spatial prior module (convs) -> ``c``: SPM tokens at /8, /16, /32 (``21/4 N`` rows) and ``c1`` (/4);
patch embedding -> ``x`` (``N`` rows, no class token). Four interactions: injector
(``x += gamma * MSDA(x -> c)``), their ViT blocks (gated: the engine's ``BlockPass``; pruned tokens keep
their values), extractor(s) (``c += MSDA(c -> x)``, ``c += ConvFFN(c)``). Output: four maps /4../32.

Ragged batches: the ViT tokens of all images form one packed set (no padding between images); the
spatial layers (convs, deformable sampling) run per *size group*, consecutive images of one padded
size stacked as ``[G, ...]``. ``group_by="image"`` runs them per image instead; results are the same.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.profiler import record_function

from ..config import ViTConfig
from ..layers import drop_path
from ..stack import RunFactory, TokenStack, TokenUsage
from ..tokens import Layout, Packed
from .batchnorm import apply_layer
from .msda import MSDeformAttn, Shapes, reference_points

ADAPTER_EPS = 1e-6


@dataclass(frozen=True)
class SizeGroup:
    """Images ``start .. start+count-1`` of a batch, all padded to ``height x width``."""

    start: int
    count: int
    height: int
    width: int

    @property
    def grid(self) -> tuple[int, int]:
        """ViT token grid (/16)."""
        return self.height // 16, self.width // 16

    @property
    def spm_shapes(self) -> Shapes:
        """SPM token levels /8, /16, /32."""
        h, w = self.height, self.width
        return [(h // 8, w // 8), (h // 16, w // 16), (h // 32, w // 32)]


def size_groups(sizes: Sequence[tuple[int, int]], group_by: str = "size") -> list[SizeGroup]:
    """Runs of consecutive equal sizes (``group_by="size"``) or one group per image (``"image"``)."""
    if group_by not in ("size", "image"):
        raise ValueError(f"group_by must be 'size' or 'image', not {group_by!r}")
    groups: list[SizeGroup] = []
    for i, (h, w) in enumerate(sizes):
        if h % 32 or w % 32:
            raise ValueError(f"image {i}: padded size {h}x{w} is not a multiple of 32 (use detector.preprocess)")
        last = groups[-1] if groups else None
        if group_by == "size" and last is not None and (last.height, last.width) == (h, w):
            groups[-1] = SizeGroup(last.start, last.count + 1, h, w)
        else:
            groups.append(SizeGroup(i, 1, h, w))
    return groups


def _conv_bn_relu(cin: int, cout: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class SpatialPriorModule(nn.Module):
    """ResNet-like stem: ``[G, 3, h, w]`` -> c1 ``[G, C, h/4, w/4]``, c2/c3/c4 ``[G, n_l, C]`` (/8, /16, /32)."""

    def __init__(self, inplanes: int, dim: int):
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn_relu(3, inplanes, 2), *_conv_bn_relu(inplanes, inplanes, 1),
                                  *_conv_bn_relu(inplanes, inplanes, 1), nn.MaxPool2d(3, 2, 1))
        self.conv2 = nn.Sequential(*_conv_bn_relu(inplanes, 2 * inplanes, 2))
        self.conv3 = nn.Sequential(*_conv_bn_relu(2 * inplanes, 4 * inplanes, 2))
        self.conv4 = nn.Sequential(*_conv_bn_relu(4 * inplanes, 4 * inplanes, 2))
        self.fc1 = nn.Conv2d(inplanes, dim, 1)
        self.fc2 = nn.Conv2d(2 * inplanes, dim, 1)
        self.fc3 = nn.Conv2d(4 * inplanes, dim, 1)
        self.fc4 = nn.Conv2d(4 * inplanes, dim, 1)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.forward_groups([images])[0]

    def forward_groups(self, batches: Sequence[Tensor], sync_bn: bool = False
                       ) -> list[tuple[Tensor, Tensor, Tensor, Tensor]]:
        """One ``forward`` per size group ``[G_i, 3, h_i, w_i]``; in training each BatchNorm takes its
        statistics over all groups together (``ragged_batch_norm``; over all ranks with ``sync_bn``).
        In eval the groups run one after another (less memory)."""
        if not self.training:
            return [self._run([batch], False)[0] for batch in batches]
        return self._run(batches, sync_bn)

    def _run(self, batches: Sequence[Tensor], sync_bn: bool) -> list[tuple[Tensor, Tensor, Tensor, Tensor]]:
        levels, xs = [], list(batches)
        for stage in (self.stem, self.conv2, self.conv3, self.conv4):
            for layer in stage:
                xs = apply_layer(layer, xs, sync_bn)
            levels.append(xs)
        return [(self.fc1(c1), self.fc2(c2).flatten(2).transpose(1, 2), self.fc3(c3).flatten(2).transpose(1, 2),
                 self.fc4(c4).flatten(2).transpose(1, 2)) for c1, c2, c3, c4 in zip(*levels)]


class DWConv(nn.Module):
    """Depthwise 3x3 conv applied to each SPM level of ``[G, n, C]`` tokens reshaped to its 2-D map."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x: Tensor, shapes: Shapes) -> Tensor:
        g, _, c = x.shape
        parts = x.split([h * w for h, w in shapes], dim=1)
        return torch.cat([self.dwconv(p.transpose(1, 2).reshape(g, c, h, w)).flatten(2).transpose(1, 2)
                          for p, (h, w) in zip(parts, shapes)], 1)


class ConvFFN(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DWConv(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor, shapes: Shapes) -> Tensor:
        return self.fc2(self.act(self.dwconv(self.fc1(x), shapes)))


class Injector(nn.Module):
    """ViT tokens attend (deformably) to the SPM tokens: ``x + gamma * MSDA(LN(x), LN(c))``."""

    def __init__(self, dim: int, heads: int, points: int):
        super().__init__()
        self.query_norm = nn.LayerNorm(dim, eps=ADAPTER_EPS)
        self.feat_norm = nn.LayerNorm(dim, eps=ADAPTER_EPS)
        self.attn = MSDeformAttn(dim, 3, heads, points)
        self.gamma = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor, c: Tensor, group: SizeGroup) -> Tensor:
        """x ``[G, N, C]``, c ``[G, 21N/4, C]`` -> ``[G, N, C]``."""
        ref = reference_points([group.grid], x.device)  # fp32 (msda samples in fp32)
        return x + self.gamma * self.attn(self.query_norm(x), ref, self.feat_norm(c), group.spm_shapes)


class Extractor(nn.Module):
    """SPM tokens attend (deformably) to the ViT tokens, then a ConvFFN: updates ``c``."""

    def __init__(self, dim: int, heads: int, points: int, cffn_ratio: float):
        super().__init__()
        self.query_norm = nn.LayerNorm(dim, eps=ADAPTER_EPS)
        self.feat_norm = nn.LayerNorm(dim, eps=ADAPTER_EPS)
        self.attn = MSDeformAttn(dim, 1, heads, points)
        self.ffn = ConvFFN(dim, int(dim * cffn_ratio))
        self.ffn_norm = nn.LayerNorm(dim, eps=ADAPTER_EPS)
        self.drop_path = 0.0  # stochastic depth of the ConvFFN branch in training

    def forward(self, c: Tensor, x: Tensor, group: SizeGroup) -> Tensor:
        """c ``[G, 21N/4, C]``, x ``[G, N, C]`` -> ``[G, 21N/4, C]``."""
        ref = reference_points(group.spm_shapes, c.device)
        c = c + self.attn(self.query_norm(c), ref, self.feat_norm(x), [group.grid])
        return c + drop_path(self.ffn(self.ffn_norm(c), group.spm_shapes), self.drop_path, self.training)


class Interaction(nn.Module):
    def __init__(self, dim: int, heads: int, points: int, cffn_ratio: float, extra_extractors: int):
        super().__init__()
        self.injector = Injector(dim, heads, points)
        self.extractor = Extractor(dim, heads, points, cffn_ratio)
        self.extra_extractors = nn.Sequential(*[Extractor(dim, heads, points, cffn_ratio)
                                                for _ in range(extra_extractors)]) if extra_extractors else None

    def extract(self, c: Tensor, x: Tensor, group: SizeGroup) -> Tensor:
        c = self.extractor(c, x, group)
        for extra in self.extra_extractors or ():
            c = extra(c, x, group)
        return c


@dataclass(frozen=True)
class AdapterConfig:
    conv_inplane: int = 64
    deform_heads: int = 6
    points: int = 4
    cffn_ratio: float = 0.25
    interaction_indexes: tuple[tuple[int, int], ...] = ((0, 2), (3, 5), (6, 8), (9, 11))


class ViTAdapter(TokenStack):
    """``images``: list of normalised, padded ``[3, h_i, w_i]`` -> (per size group, 4 maps
    ``[G, C, h/4..h/32, ...]``; token usage per image)."""

    def __init__(self, vit: ViTConfig, adapter: AdapterConfig = AdapterConfig()):
        super().__init__(vit)
        if vit.class_token and not self.method.needs_class_token:
            raise ValueError(f"the {self.method.title}-Adapter backbone has no class token (ViTConfig.class_token=False; "
                             "only the attention-based baselines get an artificial one)")
        c = vit.embed_dim
        self.adapter_config = adapter
        self.level_embed = nn.Parameter(torch.zeros(3, c))
        self.spm = SpatialPriorModule(adapter.conv_inplane, c)
        n = len(adapter.interaction_indexes)
        self.interactions = nn.ModuleList(
            Interaction(c, adapter.deform_heads, adapter.points, adapter.cffn_ratio, 2 if k == n - 1 else 0)
            for k in range(n))
        self.up = nn.ConvTranspose2d(c, c, 2, 2)
        self.norm1, self.norm2, self.norm3, self.norm4 = (nn.BatchNorm2d(c) for _ in range(4))
        self.group_by = "image"  # spatial layers per image: as fast as per size group on CPU (bench/README.md) and batch-invariant
        self.sync_bn = False  # training: BatchNorm statistics over all ranks (else over this process's batch)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) and m is not self.patch_embed.proj:
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
                nn.init.normal_(m.weight, 0, math.sqrt(2.0 / fan_out))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        nn.init.normal_(self.level_embed)
        if self.cls_token is not None:  # the baselines' artificial class token (random, as the SViT authors did)
            nn.init.trunc_normal_(self.cls_token, std=0.02)

    def set_drop_path(self, rate: float) -> "ViTAdapter":
        """ViT blocks as ``TokenStack.set_drop_path``; every extractor's ConvFFN branch at ``rate``
        (ViT-Adapter's rule)."""
        super().set_drop_path(rate)
        for m in self.modules():
            if isinstance(m, Extractor):
                m.drop_path = rate
        return self

    def forward_usage(self, images: Sequence[Tensor], run: RunFactory | None = None) -> TokenUsage:
        return self.forward_features(images, run)[1]

    def forward_features(self, images: Sequence[Tensor], run: RunFactory | None = None,
                         ) -> tuple[list[list[Tensor]], TokenUsage]:
        if isinstance(images, Tensor):
            images = list(images)
        if len(images) == 0:
            raise ValueError("empty list of images")
        groups = size_groups([tuple(img.shape[-2:]) for img in images], self.group_by)
        batches = [torch.stack(list(images[g.start:g.start + g.count])) for g in groups]
        with record_function("backbone.spm"):
            levels = self.spm.forward_groups(batches, self.sync_bn)
        spm = [c1 for c1, _, _, _ in levels]
        cs = [torch.cat([c2 + self.level_embed[0], c3 + self.level_embed[1], c4 + self.level_embed[2]], 1)
              for _, c2, c3, c4 in levels]
        with record_function("backbone.patch_embed"):
            xs = [self.embed_batch(batch) for batch in batches]
        extra = xs[0].shape[1] - groups[0].grid[0] * groups[0].grid[1]  # class token and virtual rows (baselines)
        lengths = [g.grid[0] * g.grid[1] + extra for g in groups for _ in range(g.count)]
        x = Packed(torch.cat([t.reshape(-1, t.shape[-1]) for t in xs]), Layout.from_lengths(lengths, xs[0].device))
        grid = self._grid_rows(x, groups) if extra else None
        block_pass = self.begin(x, run)
        for inter, (first, last) in zip(self.interactions, self.adapter_config.interaction_indexes):
            with record_function("backbone.injector"):  # merging methods: on the spread grid, merged back after
                x = block_pass.spread(x)
                injected = [inter.injector(xg, cg, g).reshape(-1, xg.shape[-1])
                            for g, xg, cg in zip(groups, self._group_views(x, groups, grid), cs)]
                x = block_pass.gather_back(self._write_grid(x, torch.cat(injected), grid))
            with record_function("backbone.vit_blocks"):
                x = block_pass.run(x, first, last + 1)
            with record_function("backbone.extractor"):
                read = block_pass.readout(block_pass.spread(x))  # "remove": tokens not active now read as zero
                cs = [inter.extract(cg, xg, g) for g, xg, cg in zip(groups, self._group_views(read, groups, grid), cs)]
        with record_function("backbone.output"):
            read = block_pass.readout(block_pass.spread(x))
            maps = [self._output_maps(g, xg, cg, c1)
                    for g, xg, cg, c1 in zip(groups, self._group_views(read, groups, grid), cs, spm)]
            normed = [apply_layer(norm, [m[level] for m in maps], self.sync_bn)
                      for level, norm in enumerate((self.norm1, self.norm2, self.norm3, self.norm4))]
            feats = [list(per_group) for per_group in zip(*normed)]
        return feats, block_pass.usage()

    def _grid_rows(self, x: Packed, groups: list[SizeGroup]) -> list[Tensor]:
        """Per group ``[G * N]`` rows of the patch-grid tokens, when images also own a class token
        (first) or virtual rows (last), which the adapter's spatial layers never see."""
        front = 1 if self.cls_token is not None else 0
        out = []
        for g in groups:
            n = g.grid[0] * g.grid[1]
            starts = x.layout.offsets[g.start:g.start + g.count]
            out.append((starts[:, None] + front + torch.arange(n, device=starts.device)[None, :]).reshape(-1))
        return out

    @staticmethod
    def _group_views(x: Packed, groups: list[SizeGroup], grid: list[Tensor] | None = None) -> list[Tensor]:
        """Per group ``[G, N, C]`` patch-grid tokens: views when images own nothing else (groups are
        consecutive images), else gathered through ``grid`` (``_grid_rows``)."""
        c = x.values.shape[-1]
        if grid is not None:
            return [x.values[rows].view(g.count, -1, c) for g, rows in zip(groups, grid)]
        out, row = [], 0
        for g in groups:
            n = g.grid[0] * g.grid[1] * g.count
            out.append(x.values[row:row + n].view(g.count, -1, c))
            row += n
        return out

    @staticmethod
    def _write_grid(x: Packed, values: Tensor, grid: list[Tensor] | None) -> Packed:
        """The map with its patch-grid rows replaced by ``values`` (groups in order)."""
        if grid is None:
            return x.with_values(values)
        return x.with_values(x.values.index_copy(0, torch.cat(grid), values))

    def _output_maps(self, g: SizeGroup, x: Tensor, c: Tensor, c1: Tensor) -> list[Tensor]:
        dim = x.shape[-1]
        (h2, w2), (h3, w3), (h4, w4) = g.spm_shapes
        c2, c3, c4 = c.split([h2 * w2, h3 * w3, h4 * w4], 1)
        c2 = c2.transpose(1, 2).reshape(g.count, dim, h2, w2)
        c3 = c3.transpose(1, 2).reshape(g.count, dim, h3, w3)
        c4 = c4.transpose(1, 2).reshape(g.count, dim, h4, w4)
        c1 = self.up(c2) + c1
        x3 = x.transpose(1, 2).reshape(g.count, dim, h3, w3)
        c1 = c1 + F.interpolate(x3, scale_factor=4, mode="bilinear", align_corners=False)
        c2 = c2 + F.interpolate(x3, scale_factor=2, mode="bilinear", align_corners=False)
        c3 = c3 + x3
        c4 = c4 + F.interpolate(x3, scale_factor=0.5, mode="bilinear", align_corners=False)
        return [c1, c2, c3, c4]  # before norm1..norm4
