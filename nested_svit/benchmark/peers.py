"""The runtimes a user would pick instead of ours for a dense ViT on a CPU: OpenVINO and ONNX Runtime.

``openvino/<name>`` and ``onnxruntime/<name>`` in a bench's ``--models`` run the dense model ``<name>``
(one of our registered dense configs: ``deit_small_patch16_224``, ...) exported from its weights as a
user exports it: timm's ``VisionTransformer`` with the same weights (our parameter names are timm's),
at the bench's image size, with a dynamic batch dimension; OpenVINO through ``openvino.convert_model``
(f32, or bf16 by ``INFERENCE_PRECISION_HINT`` where the processor has native bf16), ONNX Runtime from
``torch.onnx.export`` (fp32; its CPU provider has no bf16 path; its CUDA provider where installed). Both
use the bench's thread count.
Needs ``pip install 'nested-svit[peers]'``.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ..model import SparseViT

RUNTIMES = ("openvino", "onnxruntime")
PRECISIONS = {"openvino": ("fp32", "bf16"), "onnxruntime": ("fp32",)}
EXTRA = "pip install 'nested-svit[peers]'"


def precisions_here(runtime: str, device: str = "cpu") -> tuple[str, ...]:
    """The precisions ``runtime`` runs natively here: OpenVINO's bf16 only on a CPU that computes bf16
    (elsewhere it would run it in f32 and call it bf16)."""
    from ..devices import native_bf16

    return tuple(p for p in PRECISIONS[runtime] if p != "bf16" or native_bf16(device))


def split_name(name: str) -> tuple[str, str] | None:
    """``openvino/deit_small_patch16_224`` -> (``openvino``, ``deit_small_patch16_224``); None for others."""
    runtime, sep, model = name.partition("/")
    return (runtime, model) if sep and runtime in RUNTIMES else None


def timm_twin(model: SparseViT) -> nn.Module:
    """timm's ``VisionTransformer`` of ``model``'s dense architecture holding its weights (eval mode, fp32)."""
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise RuntimeError(f"exporting a model for OpenVINO / ONNX Runtime needs timm: {EXTRA}") from e
    cfg = model.config
    if model.prunes:
        raise ValueError(f"{model.name} prunes tokens: OpenVINO and ONNX Runtime run dense models only")
    twin = VisionTransformer(img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim, depth=cfg.depth,
                             num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, num_classes=cfg.num_classes,
                             class_token=cfg.class_token, global_pool="token" if cfg.class_token else "avg")
    state = {k: v.float() for k, v in model.state_dict().items()}
    twin.load_state_dict(state, strict=True)
    for m in twin.modules():
        if isinstance(m, nn.LayerNorm):
            m.eps = model.block_norm_eps if m is not twin.norm else model.norm.eps
    return twin.eval()


def _threads(threads: int | None) -> int:
    return int(threads or torch.get_num_threads())


class OpenVINORunner(nn.Module):
    """``images [B, 3, H, W]`` (any float dtype) -> logits ``[B, K]`` float32 from OpenVINO's CPU plugin."""

    def __init__(self, model: SparseViT, img_size: int, precision: str = "fp32", threads: int | None = None):
        super().__init__()
        try:
            import openvino as ov
        except ImportError as e:
            raise RuntimeError(f"openvino/... runners need OpenVINO: {EXTRA}") from e
        if precision not in PRECISIONS["openvino"]:
            raise ValueError(f"OpenVINO runs {PRECISIONS['openvino']}, not {precision!r}")
        core = ov.Core()
        if precision == "bf16" and "BF16" not in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
            raise ValueError("this processor has no native bf16: OpenVINO would run bf16 in f32")
        twin = timm_twin(model)
        example = torch.zeros(1, 3, img_size, img_size)
        converted = ov.convert_model(twin, example_input=example, input=[ov.PartialShape([-1, 3, img_size, img_size])])
        self.compiled = core.compile_model(converted, "CPU", {"INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16"
                                                              else "f32", "INFERENCE_NUM_THREADS": _threads(threads)})
        self.request = self.compiled.create_infer_request()
        self.precision = precision

    def forward(self, images: Tensor) -> Tensor:
        out = self.request.infer({0: np.ascontiguousarray(images.float().numpy())})
        return torch.from_numpy(np.array(out[0]))


class OnnxRuntimeRunner(nn.Module):
    """``images [B, 3, H, W]`` -> logits ``[B, K]`` float32 from ONNX Runtime's CPU provider (fp32)."""

    def __init__(self, model: SparseViT, img_size: int, precision: str = "fp32", threads: int | None = None,
                 device: str = "cpu"):
        super().__init__()
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise RuntimeError(f"onnxruntime/... runners need ONNX Runtime: {EXTRA}") from e
        provider = "CUDAExecutionProvider" if device.startswith("cuda") else "CPUExecutionProvider"
        if provider not in ort.get_available_providers():
            raise ValueError(f"this ONNX Runtime has no {provider} (install onnxruntime-gpu for CUDA)")
        if precision not in PRECISIONS["onnxruntime"]:
            raise ValueError(f"ONNX Runtime's CPU provider runs {PRECISIONS['onnxruntime']}, not {precision!r}")
        twin = timm_twin(model)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.onnx"
            torch.onnx.export(twin, (torch.zeros(2, 3, img_size, img_size),), str(path), input_names=["images"],
                              output_names=["logits"], dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
                              dynamo=True, verbose=False)
            options = ort.SessionOptions()
            options.intra_op_num_threads, options.inter_op_num_threads = _threads(threads), 1
            # its threads would otherwise spin after each call and slow the next runner of an interleaved round
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            self.session = ort.InferenceSession(str(path), options, providers=[provider])
        self.input_name = self.session.get_inputs()[0].name
        self.precision = precision

    def forward(self, images: Tensor) -> Tensor:
        logits = self.session.run(None, {self.input_name: images.float().cpu().numpy()})[0]
        return torch.from_numpy(logits).to(images.device)


def peer_runner(runtime: str, model: SparseViT, img_size: int, precision: str, threads: int | None,
                device: str = "cpu") -> nn.Module:
    """The runner of ``runtime`` for the dense ``model`` (see the module's docstring): OpenVINO on the CPU,
    ONNX Runtime on the CPU or, where its CUDA provider is installed, on CUDA (inputs copied from the host)."""
    if runtime == "openvino":
        if device != "cpu":
            raise ValueError("the openvino runner measures CPUs (bench --device cpu)")
        return OpenVINORunner(model, img_size, precision, threads)
    return OnnxRuntimeRunner(model, img_size, precision, threads, device)
