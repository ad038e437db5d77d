"""SparseViT: patch embed -> blocks (each optionally preceded by a token selector) -> norm -> head.

Dense DeiT is the same model with no selectors. Follows timm's surface: ``forward_features(x)`` (a
tensor), ``forward_head``, ``forward(x)`` (logits), ``num_classes``, ``num_features``,
``get_classifier``, ``reset_classifier``, a complete ``pretrained_cfg`` (what timm's
``resolve_data_config(model=model)`` reads), ``blocks.{i}.attn.qkv``; gates live in ``gates.{k}``. Which
tokens each block ran on (``TokenUsage``) comes with ``return_usage=True``. The embedding, blocks, gates
and executions are the shared ``TokenStack`` (``stack.py``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import asdict

import torch
from torch import Tensor, nn

from .config import ViTConfig
from .layers import Linear
from .stack import BlockPass, Images, RunFactory, TokenStack, TokenUsage  # noqa: F401 (TokenUsage re-exported)
from .tokens import Layout, Packed, true_rows


class SparseViT(TokenStack):
    global_pool = "token"  # timm's name for the class-token readout
    # which eval settings the checkpoint gave, and from where (``checkpoint.Described.given``)
    pretrained_given: dict[str, str] | None = None

    def __init__(self, config: ViTConfig):
        super().__init__(config)
        c = config.embed_dim
        self.norm = nn.LayerNorm(c, eps=config.norm_eps)
        self.head = Linear(c, config.num_classes) if config.num_classes > 0 else nn.Identity()
        self._pretrained_cfg: dict = {}
        self._init_weights()

    # ------------------------------------------------------------------ timm's model surface
    @property
    def pretrained_cfg(self) -> dict:
        """The eval preprocessing the weights expect, as timm's ``pretrained_cfg``: ``input_size`` (the
        model's), ``crop_pct``, ``crop_mode``, ``interpolation``, ``mean``, ``std`` (set by
        ``create_model`` and the checkpoint loaders: the file's where it has them, else
        ``registry.eval_config``), and ``num_classes``, ``first_conv``, ``classifier``."""
        from .data.transforms import DEIT_EVAL

        size = self.config.img_size
        return {**DEIT_EVAL, **self._pretrained_cfg, "input_size": (self.config.in_chans, size, size),
                "fixed_input_size": False, "num_classes": self.num_classes, "first_conv": "patch_embed.proj",
                "classifier": "head"}

    @pretrained_cfg.setter
    def pretrained_cfg(self, cfg: dict | None) -> None:
        self._pretrained_cfg = {k: v for k, v in (cfg or {}).items() if k != "input_size"}

    default_cfg = pretrained_cfg  # timm's older name

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def num_features(self) -> int:
        """Width of the features ``forward_head`` reads (timm's ``num_features``)."""
        return self.config.embed_dim

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new head of ``num_classes`` (0: none, ``forward`` returns the pooled features), as timm's;
        the class names the model carried no longer apply and are dropped."""
        if global_pool not in (None, self.global_pool):
            raise ValueError(f"{self.name} reads its class token; global_pool {global_pool!r} is not supported")
        self.config = dataclasses.replace(self.config, num_classes=num_classes)
        device, dtype = self.norm.weight.device, self.norm.weight.dtype
        self.head = Linear(self.num_features, num_classes).to(device, dtype) if num_classes > 0 else nn.Identity()
        if isinstance(self.head, Linear):
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)
        if getattr(self, "class_names", None) is not None:
            del self.class_names

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def checkpoint_meta(self) -> dict:
        """What a file of this model records besides its weights (``checkpoint.model_payload``)."""
        return {"kind": "classifier", "model_name": self.name, "model_config": asdict(self.config),
                "class_names": getattr(self, "class_names", None), "block_norm_eps": self.block_norm_eps,
                "pretrained_cfg": {k: list(v) if isinstance(v, tuple) else v for k, v in self.pretrained_cfg.items()}}

    def reduced_precision_modules(self) -> list[nn.Module]:
        """The blocks' linears: qkv, projection, MLP (and so the attention between them)."""
        return [m for block in self.blocks for m in block.modules() if isinstance(m, Linear)]

    def decision_modules(self) -> list[nn.Module]:
        """The selectors, and the final norm and head (the top-k is a decision too)."""
        return super().decision_modules() + [self.norm, self.head]

    def _norm(self, values: Tensor) -> Tensor:
        """The final LayerNorm in its own precision (fp32 under ``set_precision``)."""
        return self.norm(values.to(self.norm.weight.dtype))

    @property
    def readout(self) -> str:
        """What the head reads: ``cls`` (the class token) or ``mean`` (of the patch tokens; Evo-ViT)."""
        return self.method.readout(self.options)

    # ------------------------------------------------------------------ forward
    def forward_tokens(self, x: Packed, run: RunFactory | None = None) -> tuple[Packed, TokenUsage]:
        """Run every block on the packed feature map; returns the map (before ``norm``) and usage."""
        x, block_pass = self._run_blocks(x, run)
        return x, block_pass.usage()

    def _run_blocks(self, x: Packed, run: RunFactory | None = None) -> tuple[Packed, BlockPass]:
        block_pass = self.begin(x, run)
        x = block_pass.readout(block_pass.run(x, 0, self.config.depth))
        if self.slots:  # virtual rows (EViT's fused tokens) are not part of the output map
            lengths = [n - self.slots for n in x.layout.lengths]  # host ints: nothing read, nothing traced
            real = true_rows(~block_pass.slot_mask, sum(lengths))
            x = Packed(x.values[real], Layout.from_counts(x.layout.offsets.diff() - self.slots, lengths))
        return x, block_pass

    def forward_features(self, images: Images, return_usage: bool = False
                         ) -> Tensor | Packed | tuple[Tensor | Packed, TokenUsage]:
        """Images -> normed features: ``[B, N, C]`` for a tensor batch (timm's ``forward_features``), a
        ``Packed`` set (per-image ``N_i``) for a list of images; with ``return_usage``: (features, the
        ``TokenUsage`` of which tokens each block ran on). An empty batch gives empty outputs."""
        self._check_trainable()
        if isinstance(images, Tensor) and images.ndim == 4 and images.shape[0] == 0:
            gh, gw = self.patch_embed.grid(images.shape[-2], images.shape[-1])
            n = gh * gw + (self.cls_token is not None)
            usage = TokenUsage(torch.zeros(0, self.config.depth, dtype=torch.int64), torch.zeros(0, dtype=torch.int64),
                               self.config.gate_blocks)
            feats = images.new_zeros(0, n, self.config.embed_dim)
            return (feats, usage) if return_usage else feats
        x, usage = self.forward_tokens(self.embed(images))
        if usage.overflow:  # the capacity forward cut rows of this batch: it runs again with room for every row
            with self.uncapped_forward():
                x, usage = self.forward_tokens(self.embed(images))
            self.capacity_reruns += 1
        if self.capacity is not None and self.method.observe is not None:
            self.method.observe(self, usage)  # the next batches' capacity follows what the gates keep
        if self.readout == "cls":
            x = x.with_values(self._norm(x.values))
        feats = x.to_dense() if isinstance(images, Tensor) else x
        return (feats, usage) if return_usage else feats

    def _check_trainable(self) -> None:
        """A training forward with gradients in the inference execution gives trainable gates no gradient
        (its selections are hard): refused with the paper's way to train them."""
        if not (self.training and torch.is_grad_enabled() and self.num_gates and self.method.train_execution
                and self.execution != self.method.train_execution):
            return
        if not any(p.requires_grad for p in self.gates.parameters()):
            return  # frozen gates: the rest trains as it is
        raise RuntimeError(
            f"{self.name} is in train mode but runs the {self.execution!r} inference execution, whose hard token "
            f"selection gives the {self.method.title} gates no gradient. The paper's way: "
            f"model.set_execution(model.training_execution()) ({self.method.train_execution}: straight-through masks), "
            "logits, usage = model(x, return_usage=True), and loss = task + weight * "
            "model.method.ratio_loss(usage, model.config.keep_targets) (nested_svit.training.Trainer and "
            "'nested-svit train' do this); or freeze the gates (model.gates.requires_grad_(False)). For inference: "
            "model.eval() or torch.no_grad()")

    def forward_head(self, feats: Tensor | Packed, pre_logits: bool = False) -> Tensor:
        """Class token (or the mean token without one) -> logits ``[B, num_classes]``. With
        ``readout="mean"`` (Evo-ViT) ``feats`` are the un-normed tokens: ``head(norm(mean of the
        patch tokens))``."""
        if self.readout == "mean":
            skip = 1 if self.cls_token is not None else 0
            pooled = feats[:, skip:].mean(1) if isinstance(feats, Tensor) else \
                torch.stack([v[skip:].mean(0) for v in feats.unbind()])
            pooled = self._norm(pooled)
        elif self.cls_token is None:
            pooled = feats.mean(1) if isinstance(feats, Tensor) else torch.stack([v.mean(0) for v in feats.unbind()])
        else:
            pooled = feats[:, 0] if isinstance(feats, Tensor) else feats.values[feats.layout.first_rows]
        return pooled if pre_logits else self.head(pooled.to(self.norm.weight.dtype))

    def forward_device(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The forward with no host read, for capture in a CUDA graph: ``images [B, 3, H, W]`` ->
        (logits ``[B, num_classes]``, kept and kept_mlp ``[B, depth]`` int64 (``TokenUsage``),
        overflow ``[]`` bool), all on the device. Needs the capacity forward (``set_execution(capacity=F)``) or a method with fixed
        counts; when ``overflow`` is True the logits are not to be used (``forward`` reruns them)."""
        if self.method.counts_on_device and self.capacity is None:
            raise ValueError(f"{self.method.title} reads its kept counts from the device in the exact forward: "
                             "set_execution('packed', capacity=F) first")
        x, block_pass = self._run_blocks(self.embed(images))
        if self.readout == "cls":
            x = x.with_values(self._norm(x.values))
        kept, kept_mlp, overflow = block_pass.device_usage()
        return self.forward_head(x.to_dense()), kept, kept_mlp, overflow

    def forward(self, images: Images, return_usage: bool = False) -> Tensor | tuple[Tensor, TokenUsage]:
        """Images -> logits ``[B, num_classes]``; with ``return_usage``: (logits, ``TokenUsage``)."""
        feats, usage = self.forward_features(images, return_usage=True)
        logits = self.forward_head(feats)
        return (logits, usage) if return_usage else logits
