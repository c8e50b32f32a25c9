"""What the image side of XMM predicts at masked patches: pluggable "image tokenizers".

- :class:`PixelTargets` — normalised per-patch pixels (MAE-style regression); needs no weights, the default for
  tiny configs, tests and the demo.
- :class:`DVAETargets` — DALL-E's discrete VAE codes (SIMLA's targets), from a safetensors file made once by
  ``vlalign convert dvae``; the optional ``dall-e`` package supplies the network.
"""

from __future__ import annotations

import abc
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlalign.objectives.base import Configurable

LOGIT_LAPLACE_EPS = 0.1  # DALL-E's map_pixels: x -> (1 - 2·eps)·x + eps


class ImageTargets(Configurable, nn.Module, abc.ABC):
    """Base class. ``num_classes`` > 0: targets are code ids [B, N]; 0: regression targets [B, N, target_dim]."""

    num_classes: int = 0
    target_dim: int = 0

    def setup(self, patch_size: int, grid: tuple[int, int]) -> None:
        """Called once by the objective with the ViT's patch geometry."""
        self.patch_size, self.grid = patch_size, grid

    @property
    def output_dim(self) -> int:
        return self.num_classes or self.target_dim

    @abc.abstractmethod
    def targets(self, batch: dict[str, Any]) -> Tensor:
        """Targets for every patch of the batch: code ids [B, N] or regression targets [B, N, D]."""

    def loss(
        self, prediction: Tensor, target: Tensor, teacher: Tensor | None, alpha: float, valid: Tensor | None = None
    ) -> Tensor:
        """Loss at masked positions: prediction [M, C], target [M] or [M, D], teacher prediction [M, C] or None.

        ``valid`` ([M] bool) keeps only the rows it marks (all positions in, masked ones counted: no device sync).
        """
        from vlalign.objectives.functional import distilled_cross_entropy

        if self.num_classes:
            return distilled_cross_entropy(prediction, target, teacher, alpha, valid)

        def mse(a: Tensor, b: Tensor) -> Tensor:
            if valid is None:
                return F.mse_loss(a.float(), b.float())
            weight = valid.float()
            return (F.mse_loss(a.float(), b.float(), reduction="none").mean(-1) * weight).sum() / weight.sum()

        hard = mse(prediction, target)
        if teacher is None or alpha == 0.0:
            return hard
        return (1.0 - alpha) * hard + alpha * mse(prediction, teacher)


class PixelTargets(ImageTargets):
    """Per-patch pixels of the (normalised) ViT input, each patch standardised to zero mean and unit variance.

    Args:
        normalize_per_patch: standardise each patch's pixels (MAE's better-performing variant).
    """

    def __init__(self, normalize_per_patch: bool = True) -> None:
        super().__init__()
        self.normalize_per_patch = normalize_per_patch

    def setup(self, patch_size: int, grid: tuple[int, int]) -> None:
        super().setup(patch_size, grid)
        self.target_dim = 3 * patch_size * patch_size

    @torch.no_grad()
    def targets(self, batch: dict[str, Any]) -> Tensor:
        images = batch["image"].float()
        p = self.patch_size
        patches = F.unfold(images, kernel_size=p, stride=p).transpose(1, 2)  # [B, N, 3·p·p], raster order
        if self.normalize_per_patch:
            mean = patches.mean(dim=-1, keepdim=True)
            var = patches.var(dim=-1, keepdim=True, unbiased=False)
            patches = (patches - mean) / (var + 1e-6).sqrt()
        return patches


class DVAETargets(ImageTargets):
    """DALL-E dVAE code ids of the tokenizer view (same crop and flip as the ViT view, at half resolution).

    The reference draws the tokenizer view with its own random crop, flip and RandAugment (docs/differences.md
    row 7), so its code at patch p does not describe what the ViT sees at p; vlalign's data pipeline derives both
    views from one augmented crop, so targets line up with the masked patches (docs/method.md §2.4, §4.2).

    Args:
        weights: safetensors file written by ``vlalign convert dvae --pickle encoder.pkl --out dvae.safetensors``.
    """

    def __init__(self, weights: str) -> None:
        super().__init__()
        self.weights = weights
        self.encoder = load_dvae_encoder(weights)
        self.encoder.requires_grad_(False)
        self.num_classes = self.encoder.vocab_size

    @torch.no_grad()
    def targets(self, batch: dict[str, Any]) -> Tensor:
        view = batch.get("tokenizer_view")
        if view is None:
            raise KeyError("dvae targets need batch['tokenizer_view']: set data.tokenizer_view_size (image_size / 2)")
        pixels = (1 - 2 * LOGIT_LAPLACE_EPS) * view.float() + LOGIT_LAPLACE_EPS
        logits = self.encoder(pixels)  # [B, vocab, h, w]
        if tuple(logits.shape[-2:]) != tuple(self.grid):
            raise ValueError(
                f"dVAE grid {tuple(logits.shape[-2:])} != ViT patch grid {tuple(self.grid)}: "
                f"set data.tokenizer_view_size to 8 x the patch grid side"
            )
        return logits.argmax(dim=1).flatten(1)

    def train(self, mode: bool = True) -> DVAETargets:  # the tokenizer is frozen: always in eval mode
        super().train(mode)
        self.encoder.eval()
        return self


def _dall_e_encoder_class() -> type[nn.Module]:
    try:
        from dall_e.encoder import Encoder
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("dvae image targets need the optional dependency: pip install 'vlalign[dvae]'") from err
    return Encoder


DVAE_CONFIG_KEYS = ("n_hid", "n_blk_per_group", "input_channels", "vocab_size")


def load_dvae_encoder(path: str | Path) -> nn.Module:
    """Build DALL-E's encoder from a safetensors file (config in its metadata); never unpickles."""
    from safetensors import SafetensorError, safe_open

    from vlalign.errors import InputFileError
    from vlalign.weights.reading import read_safetensors

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dVAE weights not found: {path} (convert encoder.pkl with `vlalign convert dvae`)")
    state = read_safetensors(path)  # an unreadable file: an error naming it
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except SafetensorError as err:
        raise InputFileError(f"{path}: not a readable safetensors file ({err})") from err
    if "dvae_config" not in metadata:
        raise InputFileError(f"{path} has no dvae_config metadata: write it with `vlalign convert dvae`")
    config = json.loads(metadata["dvae_config"])
    encoder = _dall_e_encoder_class()(**config, requires_grad=False, use_mixed_precision=False)
    encoder.load_state_dict(state)
    return encoder


def convert_dvae_pickle(pickle_path: str | Path, out: str | Path, allow_pickle: bool = False) -> Path:
    """Convert OpenAI's pickled ``encoder.pkl`` once into safetensors, so that training never unpickles.

    Unpickling runs code from the file, so it needs ``allow_pickle=True``: do it only for a file you trust (OpenAI's
    published ``encoder.pkl``). The result holds only tensors plus the network's hyper-parameters.
    """
    if not allow_pickle:
        raise PermissionError(
            f"{pickle_path} is a pickle: loading it can run arbitrary code. Pass --allow_pickle true to convert a "
            "file you trust (OpenAI's encoder.pkl); training then reads only the safetensors output."
        )
    from safetensors.torch import save_file

    _dall_e_encoder_class()  # the pickle refers to dall_e classes
    module = torch.load(pickle_path, map_location="cpu", weights_only=False)
    config = {key: int(getattr(module, key)) for key in DVAE_CONFIG_KEYS}
    state = {k: v.detach().float().contiguous() for k, v in module.state_dict().items()}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out), metadata={"dvae_config": json.dumps(config)})
    return out
