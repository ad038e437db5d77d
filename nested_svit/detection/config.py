"""Detector configuration (data, not code): the ViT, adapter, classes, test scale and test rules."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..config import ViTConfig
from .adapter import AdapterConfig
from .roi_heads import RCNNTestConfig
from .rpn import RPNTestConfig


@dataclass(frozen=True)
class DetectorConfig:
    vit: ViTConfig
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    num_classes: int = 80
    img_scale: tuple[int, int] = (1333, 800)  # (long, short) edge limits, mmdet's (w, h) notation
    fpn_channels: int = 256
    rpn: RPNTestConfig = field(default_factory=RPNTestConfig)
    rcnn: RCNNTestConfig = field(default_factory=RCNNTestConfig)
    class_names: tuple[str, ...] = ()  # empty: COCO's 80 names when num_classes == 80

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {self.num_classes}")
        if len(self.img_scale) != 2 or min(self.img_scale) < 32:
            raise ValueError(f"img_scale must be two sizes >= 32, got {self.img_scale}")
        if self.class_names and len(self.class_names) != self.num_classes:
            raise ValueError(f"{len(self.class_names)} class names for {self.num_classes} classes")

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "DetectorConfig":
        """A config as ``to_dict`` wrote it (older files: a flat ViT config, see ``config.py``)."""
        vit = ViTConfig.from_dict(d["vit"])
        adapter = dict(d.get("adapter", {}))
        if "interaction_indexes" in adapter:
            adapter["interaction_indexes"] = tuple(tuple(p) for p in adapter["interaction_indexes"])
        return DetectorConfig(vit=vit, adapter=AdapterConfig(**adapter),
                              num_classes=d["num_classes"], img_scale=tuple(d["img_scale"]),
                              fpn_channels=d.get("fpn_channels", 256), rpn=RPNTestConfig(**d.get("rpn", {})),
                              rcnn=RCNNTestConfig(**d.get("rcnn", {})), class_names=tuple(d.get("class_names", ())))
