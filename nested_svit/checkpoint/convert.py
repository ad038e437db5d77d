"""Checkpoint layouts -> this library's (timm) parameter names, one converter per source (as timm's
``_convert_*``). Detected from the keys:

* ``timm``: timm ``VisionTransformer`` names (``blocks.{i}.attn.qkv.weight``, ...), as DeiT, EViT, ToMe and
  ATS release them (ATS's constant ``attn.out_zero_mask`` is left out). Block LayerNorm eps 1e-6.
* ``svit``: the official SViT release: ``blocks.{i}.TransformerEncoderLayer.{self_attn.in_proj_*,
  self_attn.out_proj.*, linear1.*, linear2.*, norm1.*, norm2.*}``, gates in
  ``selective_modules.{k}.{norm,mlp.fc1,mlp.fc2}``. Its blocks are ``nn.TransformerEncoderLayer``
  with LayerNorm eps 1e-5, carried into the model so converted numbers match the source.
* ``dynamicvit``: DynamicViT's release (timm keys + ``score_predictor.{s}.*`` -> ``gates.{s}.*``).
* ``evovit``: Evo-ViT's release: ``qks.{i}.qk`` + ``vs.{i}.v`` -> ``blocks.{i}.attn.qkv`` (rows q, k | v),
  ``norms.{i}`` -> ``norm1``, ``projs.{i}`` -> ``attn.proj``; its distillation head ``head_cls`` /
  ``norm_cls`` is not used at inference and is left out.
* ``transformers``: ``ViTForImageClassification`` / ``DeiTForImageClassification`` (``vit.`` / ``deit.``
  prefixed, or a bare ``ViTModel``): ``encoder.layer.{i}.attention.attention.{query,key,value}`` joined
  into ``attn.qkv`` (rows q, k, v), ``layernorm_before/after`` -> ``norm1/2``, ``intermediate.dense`` /
  ``output.dense`` -> ``mlp.fc1/fc2``, ``classifier`` -> ``head``. Its LayerNorm eps is the config's
  ``layer_norm_eps`` (1e-12), carried by the loader. A distillation token becomes timm's ``dist_token``
  (refused by name, as timm's distilled DeiT is).
* ``mmdet-svit`` / ``mmdet-dense``: official SViT / ViT-Adapter mmcv runner files (``backbone.*``,
  ``neck.*``, ``rpn_head.*``, ``roi_head.*``): the backbone's keys as the classification layouts above;
  the heads keep mmdet's names, which ours follow.
"""
from __future__ import annotations

import re

import torch
from torch import Tensor

_SVIT_BLOCK_KEYS = {
    "self_attn.in_proj_weight": "attn.qkv.weight",
    "self_attn.in_proj_bias": "attn.qkv.bias",
    "self_attn.out_proj.weight": "attn.proj.weight",
    "self_attn.out_proj.bias": "attn.proj.bias",
    "linear1.weight": "mlp.fc1.weight",
    "linear1.bias": "mlp.fc1.bias",
    "linear2.weight": "mlp.fc2.weight",
    "linear2.bias": "mlp.fc2.bias",
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
}
_MMDET_FORMATS = {"svit": "mmdet-svit"}  # a detector file's format by its backbone's layout (others: dense)
BLOCK_EPS = {"timm": 1e-6, "svit": 1e-5, "dynamicvit": 1e-6, "evovit": 1e-6, "mmdet-svit": 1e-5, "mmdet-dense": 1e-6,
             "transformers": 1e-12}
# keys of release files that nothing uses at inference (ATS's constant mask, Evo-ViT's distillation head)
NOT_USED = (re.compile(r"blocks\.\d+\.attn\.out_zero_mask"), re.compile(r"(head_cls|norm_cls)\..+"))


def detect_format(state: dict[str, Tensor]) -> str:
    """A classification layout (``timm``, ``svit``, ``dynamicvit``, ``evovit``) or a detector file's
    (``mmdet-svit``, ``mmdet-dense``)."""
    if any(k.startswith("backbone.") for k in state):
        inner = {k[len("backbone."):]: None for k in state if k.startswith("backbone.")}
        return _MMDET_FORMATS.get(detect_format(inner), "mmdet-dense")
    if any(".TransformerEncoderLayer." in k or k.startswith("selective_modules.") for k in state):
        return "svit"
    if any(k.startswith("score_predictor.") for k in state):
        return "dynamicvit"
    if any(k.startswith("qks.") for k in state):
        return "evovit"
    if any(".attention.attention.query." in k for k in state):
        return "transformers"
    return "timm"


def _convert_svit(state: dict[str, Tensor]) -> dict[str, Tensor]:
    out = {}
    for key, value in state.items():
        m = re.fullmatch(r"blocks\.(\d+)\.TransformerEncoderLayer\.(.+)", key)
        if m and m.group(2) in _SVIT_BLOCK_KEYS:
            out[f"blocks.{m.group(1)}.{_SVIT_BLOCK_KEYS[m.group(2)]}"] = value
            continue
        m = re.fullmatch(r"selective_modules\.(\d+)\.(.+)", key)
        out[f"gates.{m.group(1)}.{m.group(2)}" if m else key] = value
    return out


def _convert_dynamicvit(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {re.sub(r"^score_predictor\.", "gates.", k): v for k, v in state.items()}


def _convert_evovit(state: dict[str, Tensor]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        m = re.fullmatch(r"(qks|vs|norms|projs)\.(\d+)\.(?:qk\.|v\.)?(weight|bias)", key)
        if not m:
            out[key] = value
            continue
        kind, i, what = m.groups()
        if kind == "norms":
            out[f"blocks.{i}.norm1.{what}"] = value
        elif kind == "projs":
            out[f"blocks.{i}.attn.proj.{what}"] = value
        elif kind == "qks":
            out[f"blocks.{i}.attn.qkv.{what}"] = torch.cat([value, state[f"vs.{i}.v.{what}"]], 0)
    return out


_TRANSFORMERS_KEYS = {
    "embeddings.cls_token": "cls_token", "embeddings.distillation_token": "dist_token",
    "embeddings.position_embeddings": "pos_embed", "embeddings.patch_embeddings.projection": "patch_embed.proj",
    "layernorm": "norm", "classifier": "head", "cls_classifier": "head", "distillation_classifier": "head_dist",
}
_TRANSFORMERS_BLOCK_KEYS = {"attention.output.dense": "attn.proj", "layernorm_before": "norm1",
                            "layernorm_after": "norm2", "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2"}


def _convert_transformers(state: dict[str, Tensor]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        key = re.sub(r"^(vit|deit)\.", "", key)
        m = re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias)", key)
        if m:
            i, inner, what = m.groups()
            if inner == "attention.attention.query":  # key and value join it (a missing one: mis-shaped)
                out[f"blocks.{i}.attn.qkv.{what}"] = torch.cat(_qkv_order(state, i, what), 0)
            elif inner in _TRANSFORMERS_BLOCK_KEYS:
                out[f"blocks.{i}.{_TRANSFORMERS_BLOCK_KEYS[inner]}.{what}"] = value
            elif not inner.startswith("attention.attention."):
                out[key] = value
            continue
        base, _, what = key.rpartition(".")
        if base in _TRANSFORMERS_KEYS:
            out[f"{_TRANSFORMERS_KEYS[base]}.{what}"] = value
        elif key in _TRANSFORMERS_KEYS:
            out[_TRANSFORMERS_KEYS[key]] = value
        else:
            out[key] = value  # unknown keys stay as they are: the key report lists them
    return out


def _qkv_order(state: dict[str, Tensor], i: str, what: str) -> list[Tensor]:
    """Layer ``i``'s query, key and value ``what`` (weight / bias), in that order (timm's qkv rows)."""
    found = {}
    for k, v in state.items():
        m = re.fullmatch(rf"(?:(?:vit|deit)\.)?encoder\.layer\.{i}\.attention\.attention\.(query|key|value)\.{what}", k)
        if m:
            found[m.group(1)] = v
    return [found[k] for k in ("query", "key", "value") if k in found]


def _convert_mmdet(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """``backbone.*`` official names -> ours (the classification converter of the backbone's layout)."""
    inner = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    out = {f"backbone.{k}": v for k, v in convert(inner, detect_format(inner)).items()}
    out.update({k: v for k, v in state.items() if not k.startswith("backbone.")})
    return out


_CONVERTERS = {"timm": dict, "svit": _convert_svit, "dynamicvit": _convert_dynamicvit, "evovit": _convert_evovit,
               "transformers": _convert_transformers, "mmdet-svit": _convert_mmdet, "mmdet-dense": _convert_mmdet}


def convert(state: dict[str, Tensor], fmt: str) -> dict[str, Tensor]:
    """Rename keys of ``fmt`` to this library's (timm) names."""
    return _CONVERTERS[fmt](state)
