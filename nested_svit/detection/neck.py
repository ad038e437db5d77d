"""FPN neck as mmdet 2.28 configures it for Mask R-CNN: 1x1 laterals, nearest top-down, 3x3
outputs (no activations), P6 = stride-2 max-pool of P5. Parameter names as mmdet
(``lateral_convs.{i}.conv``, ``fpn_convs.{i}.conv``)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class ConvModule(nn.Module):
    """Holds the conv as ``.conv`` (mmcv ConvModule's key layout)."""

    def __init__(self, cin: int, cout: int, kernel: int, relu: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2)
        self.relu = relu

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        return F.relu(x, inplace=True) if self.relu else x


class FPN(nn.Module):
    def __init__(self, in_channels: int, out_channels: int = 256, levels: int = 4, num_outs: int = 5):
        super().__init__()
        self.num_outs = num_outs
        self.lateral_convs = nn.ModuleList(ConvModule(in_channels, out_channels, 1) for _ in range(levels))
        self.fpn_convs = nn.ModuleList(ConvModule(out_channels, out_channels, 3) for _ in range(levels))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        """4 maps ``[G, C_in, h/4..h/32]`` -> 5 maps ``[G, 256, h/4..h/64]``."""
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, feats)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[2:], mode="nearest")
        outs = [conv(lat) for conv, lat in zip(self.fpn_convs, laterals)]
        while len(outs) < self.num_outs:
            outs.append(F.max_pool2d(outs[-1], 1, stride=2))
        return outs
