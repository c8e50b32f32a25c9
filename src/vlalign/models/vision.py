"""ViT image encoder on timm with SIMLA's patch mask token, local checkpoint loading and position resizing.

Importing this module registers two tiny ViTs with timm so that test and demo configs name them like real models.
Patch masking and weight loading: docs/method.md §1.1.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from timm.layers import resample_abs_pos_embed
from timm.models import build_model_with_cfg, register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from vlalign.weights.reading import LoadReport, read_state_dict

__all__ = ["VisionConfig", "VisionEncoder", "interpolate_pos_embed", "load_vision_weights"]

_log = logging.getLogger(__name__)

# Prefixes under which a ViT's weights sit inside wrapped checkpoints (ALBEF/SIMLA model, DDP).
_WRAPPER_PREFIXES = ("module.", "visual_encoder.")
_CLASSIFIER_PREFIXES = ("head.", "head_dist.")


@dataclass
class VisionConfig:
    """Which timm ViT to build and how; ``weights`` is a local DeiT/timm-layout checkpoint."""

    name: str = "vit_base_patch16_224"
    img_size: int = 256
    weights: str | None = None
    drop_path_rate: float = 0.0
    mask_token: bool = True
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.img_size <= 0:
            raise ValueError(f"VisionConfig.img_size must be positive, got {self.img_size}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"VisionConfig.drop_path_rate must be in [0, 1), got {self.drop_path_rate}")


class VisionEncoder(nn.Module):
    """timm ViT returning all tokens ``[B, 1+N, width]``, with masked patches replaced by a learned token."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.vit = timm.create_model(
            config.name,
            pretrained=False,
            num_classes=0,
            img_size=config.img_size,
            drop_path_rate=config.drop_path_rate,
        )
        if not isinstance(self.vit, VisionTransformer):
            raise TypeError(f"{config.name} builds a {type(self.vit).__name__}, not a timm VisionTransformer")
        patch = tuple(self.vit.patch_embed.patch_size)
        if patch[0] != patch[1]:
            raise ValueError(f"{config.name}: non-square patches {patch} are not supported")
        self.width: int = self.vit.embed_dim
        self.patch_size: int = patch[0]
        self.grid_size: tuple[int, int] = tuple(self.vit.patch_embed.grid_size)
        self.num_patches: int = self.grid_size[0] * self.grid_size[1]
        # Zeros, never re-initialised: an unmasked model starts exactly as the pre-trained ViT.
        self.mask_token = nn.Parameter(torch.zeros(self.width)) if config.mask_token else None
        if config.gradient_checkpointing:
            self.vit.set_grad_checkpointing(True)
        self.load_report: LoadReport | None = None
        if config.weights is not None:
            self.load_report = load_vision_weights(self, config.weights)
            _log.info("vision weights from %s: %s", config.weights, self.load_report)

    def forward(self, images: Tensor, patch_mask: Tensor | None = None) -> Tensor:
        """Encode images; ``patch_mask`` [B, N] bool (raster order) swaps those patch embeddings for the mask token
        before the CLS token and position embeddings are added."""
        vit = self.vit
        x = vit.patch_embed(images)
        if patch_mask is not None:
            x = self._apply_mask(x, patch_mask)
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(x)))
        if vit.grad_checkpointing and self.training and torch.is_grad_enabled():
            for block in vit.blocks:
                x = checkpoint(block, x, use_reentrant=False)
        else:
            x = vit.blocks(x)
        return vit.norm(x)

    def _apply_mask(self, patches: Tensor, patch_mask: Tensor) -> Tensor:
        if self.mask_token is None:
            raise ValueError("patch_mask given but this VisionEncoder was built with mask_token=False")
        spatial = patches.shape[:-1]  # [B, N] or [B, H, W] with dynamic image size
        expected = (spatial[0], spatial[1:].numel())
        if patch_mask.dtype != torch.bool or tuple(patch_mask.shape) != expected:
            raise ValueError(
                f"patch_mask must be a bool tensor of shape {expected}, got {patch_mask.dtype} {tuple(patch_mask.shape)}"
            )
        masked = patch_mask.reshape(spatial).unsqueeze(-1)
        return torch.where(masked, self.mask_token.to(patches.dtype), patches)


def interpolate_pos_embed(
    pos_embed: Tensor,
    grid: tuple[int, int],
    num_prefix_tokens: int = 1,
    old_grid: tuple[int, int] | None = None,
) -> Tensor:
    """Resize a ``[1, prefix + H*W, C]`` position table to ``grid``: prefix rows kept, the grid resampled bicubically
    (align_corners False, no antialias: what ALBEF/SIMLA use for 224->256 and 256->384). ``old_grid`` defaults to
    a square grid."""
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"pos_embed must have shape [1, tokens, dim], got {tuple(pos_embed.shape)}")
    if old_grid is None:
        side = round((pos_embed.shape[1] - num_prefix_tokens) ** 0.5)
        old_grid = (side, side)
    if old_grid[0] * old_grid[1] + num_prefix_tokens != pos_embed.shape[1]:
        raise ValueError(
            f"pos_embed has {pos_embed.shape[1]} rows, which is not {num_prefix_tokens} prefix rows + grid {old_grid}"
        )
    return resample_abs_pos_embed(
        pos_embed,
        new_size=list(grid),
        old_size=list(old_grid),
        num_prefix_tokens=num_prefix_tokens,
        interpolation="bicubic",
        antialias=False,
        align_corners=False,
    )


def _unwrap(state: dict[str, Any]) -> dict[str, Tensor]:
    """Peel training-checkpoint wrappers ({"model": ...}, {"state_dict": ...}) and module prefixes."""
    while True:
        inner = next((state[k] for k in ("model", "state_dict") if isinstance(state.get(k), dict)), None)
        if inner is None:
            break
        state = inner
    for prefix in _WRAPPER_PREFIXES:
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return state


def load_vision_weights(encoder: VisionEncoder, path: str | Path) -> LoadReport:
    """Load a local ViT checkpoint (DeiT / timm / ALBEF-SIMLA layouts) non-strictly, resampling the position table.

    ``loaded``/``missing`` name the encoder's parameters; ``unexpected`` names checkpoint entries that were dropped
    (classifier heads, tensors the model has no slot for).
    """
    state = _unwrap(read_state_dict(path))
    unexpected: list[str] = []
    loaded: list[str] = []
    # Pull the mask token out first: timm's filter would take a "mask_token" key for a DINOv2 checkpoint.
    mask_token = state.pop("mask_token", None)
    if mask_token is not None:
        if encoder.mask_token is None:
            unexpected.append("mask_token")
        else:
            with torch.no_grad():
                encoder.mask_token.copy_(mask_token.reshape(encoder.mask_token.shape))
            loaded.append("mask_token")

    filtered = checkpoint_filter_fn(state, encoder.vit, interpolation="bicubic", antialias=False, align_corners=False)
    own = encoder.vit.state_dict()
    selected: dict[str, Tensor] = {}
    for key, value in filtered.items():
        if key.startswith(_CLASSIFIER_PREFIXES) or key not in own:
            unexpected.append(key)
        else:
            selected[key] = value
    result = encoder.vit.load_state_dict(selected, strict=False)
    loaded += [f"vit.{k}" for k in sorted(selected)]
    missing = [f"vit.{k}" for k in result.missing_keys]
    if encoder.mask_token is not None and mask_token is None:
        missing.append("mask_token")
    return LoadReport(loaded=loaded, missing=missing, unexpected=unexpected)


def _tiny_vit(variant: str, pretrained: bool, model_args: dict[str, Any], **kwargs: Any) -> VisionTransformer:
    if pretrained:
        raise ValueError(f"{variant} has no pretrained weights; give a local file as VisionConfig.weights")
    pretrained_cfg = kwargs.pop("pretrained_cfg", None) or {
        "input_size": (3, 64, 64),
        "num_classes": 0,
        "interpolation": "bicubic",
        "first_conv": "patch_embed.proj",
        "classifier": "head",
    }
    return build_model_with_cfg(
        VisionTransformer,
        variant,
        pretrained=False,
        pretrained_cfg=pretrained_cfg,
        pretrained_filter_fn=checkpoint_filter_fn,
        **{"img_size": 64, "patch_size": 8, "qkv_bias": True, **model_args, **kwargs},
    )


@register_model
def vit_vlalign_tiny_patch8(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """Test-sized ViT: width 64, depth 2, 2 heads, MLP ratio 2, 8x8 patches, 64 px."""
    args = {"embed_dim": 64, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0}
    return _tiny_vit("vit_vlalign_tiny_patch8", pretrained, args, **kwargs)


@register_model
def vit_vlalign_small_patch8(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """Demo-sized ViT: width 128, depth 4, 4 heads, MLP ratio 4, 8x8 patches, 64 px."""
    args = {"embed_dim": 128, "depth": 4, "num_heads": 4, "mlp_ratio": 4.0}
    return _tiny_vit("vit_vlalign_small_patch8", pretrained, args, **kwargs)
