"""Weakly-supervised grounding: Grad-CAM on the stream's cross-attention, proposal ranking, IoU and heat-map pictures.

A referring expression is grounded without box supervision (docs/tasks.md, "Grounding"):

1. the (image, expression) pair goes through the ViT and the stream in multimodal mode; the ITM head's "match"
   logit is the score explained (:func:`cross_attention_gradcam`);
2. ``A`` are the cross-attention probabilities of one stream layer, ``[B, heads, L_text, prefix + N_patches]``,
   and ``G = dA`` of the match logit; the map is ``mean over heads of A ⊙ relu(G)``, averaged over the expression's
   tokens (``[CLS]`` included, padding excluded), the image prefix token(s) dropped and the patches reshaped to the
   ViT's grid (:func:`gradcam_map`);
3. the grid map is upsampled bicubically to the original image, every proposal box ``(x, y, w, h)`` is scored by
   the sum of the map inside it divided by ``(w·h)^0.5`` (:func:`box_scores`), and the best box is the prediction;
4. a prediction is correct when its IoU with the true box is at least 0.5 (:func:`box_iou`).

The functions are pure tensor math except :func:`cross_attention_gradcam`, which runs the model, and the picture
helpers (:func:`heat_overlay`, :func:`save_heatmap`, :func:`grounding_picture`), which draw with PIL.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import Tensor, nn

from vlalign.evaluation.pictures import BACKGROUND, GREEN, PAD, RED, TEXT, _font, _text_block

if TYPE_CHECKING:
    from vlalign.api import ImageInput, VisionLanguageModel
    from vlalign.models.backbone import Backbone
    from vlalign.models.stream import SingleStreamTransformer

__all__ = [
    "AREA_EXPONENT",
    "IOU_THRESHOLD",
    "GroundingExample",
    "box_iou",
    "box_scores",
    "cross_attention_gradcam",
    "default_gradcam_layer",
    "gradcam_map",
    "grounding_picture",
    "heat_overlay",
    "model_heatmap",
    "predict_boxes",
    "resolve_gradcam_layer",
    "save_heatmap",
    "split_accuracies",
    "upsample_map",
]

#: A box scores ``sum of heat inside / area ** AREA_EXPONENT`` (the reference: 0.5, the square root of the area).
AREA_EXPONENT = 0.5
#: A predicted box is correct at this IoU with the true box or more.
IOU_THRESHOLD = 0.5


# -- boxes -------------------------------------------------------------------------------------------------------------
def box_iou(boxes: Tensor, others: Tensor) -> Tensor:
    """Intersection over union of ``(x, y, w, h)`` boxes, broadcast over the leading dimensions (``[..., 4]``).

    Boxes are continuous rectangles ``[x, x + w) × [y, y + h)``. The refer toolkit's ``computeIoU`` subtracts 1 from
    the right and bottom edges and adds it back to the intersection, which is the same number except that overlaps
    of one pixel or less count as none; no such pair reaches IoU 0.5 unless a box is a few pixels wide.
    """
    boxes, others = boxes.double(), others.double()
    left = torch.maximum(boxes[..., 0], others[..., 0])
    top = torch.maximum(boxes[..., 1], others[..., 1])
    right = torch.minimum(boxes[..., 0] + boxes[..., 2], others[..., 0] + others[..., 2])
    bottom = torch.minimum(boxes[..., 1] + boxes[..., 3], others[..., 1] + others[..., 3])
    inter = (right - left).clamp(min=0) * (bottom - top).clamp(min=0)
    union = boxes[..., 2] * boxes[..., 3] + others[..., 2] * others[..., 3] - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(inter)).float()


def box_scores(heat: Tensor, boxes: Tensor, exponent: float = AREA_EXPONENT) -> Tensor:
    """How much of the heat map ``heat`` ``[H, W]`` lies in each ``(x, y, w, h)`` box ``[P, 4]``: ``[P]`` float32.

    A box covers rows ``int(y) .. int(y + h) - 1`` and columns ``int(x) .. int(x + w) - 1`` (the reference's integer
    slice), clipped to the image; its score is the sum of the map there divided by ``(w·h) ** exponent`` (``w``,
    ``h`` as given, not clipped). A box with ``w <= 0`` or ``h <= 0`` scores ``-inf``. All boxes at once, from the
    map's integral image (float64, so large maps sum exactly enough).
    """
    if heat.dim() != 2 or boxes.dim() != 2 or boxes.shape[-1] != 4:
        raise ValueError(
            f"box_scores needs heat [H, W] and boxes [P, 4], got {tuple(heat.shape)}, {tuple(boxes.shape)}"
        )
    height, width = heat.shape
    integral = F.pad(heat.double().cumsum(0).cumsum(1), (1, 0, 1, 0))  # [H+1, W+1], integral[i, j] = sum heat[:i, :j]
    boxes = boxes.to(heat.device).double()
    x0 = boxes[:, 0].trunc().clamp(0, width).long()
    y0 = boxes[:, 1].trunc().clamp(0, height).long()
    x1 = (boxes[:, 0] + boxes[:, 2]).trunc().clamp(0, width).long()
    y1 = (boxes[:, 1] + boxes[:, 3]).trunc().clamp(0, height).long()
    x1, y1 = torch.maximum(x1, x0), torch.maximum(y1, y0)
    inside = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    area = boxes[:, 2] * boxes[:, 3]
    valid = (boxes[:, 2] > 0) & (boxes[:, 3] > 0)
    scores = inside / area.clamp(min=1e-12) ** exponent
    return torch.where(valid, scores, torch.full_like(scores, -math.inf)).float()


def upsample_map(grid_map: Tensor, size: tuple[int, int]) -> Tensor:
    """A ``[gh, gw]`` (or ``[B, gh, gw]``) map resized bicubically to ``size = (H, W)`` (float32), as the reference
    upsamples before ranking boxes (``align_corners=False``)."""
    batched = grid_map.dim() == 3
    maps = grid_map if batched else grid_map.unsqueeze(0)
    out = F.interpolate(maps.float().unsqueeze(1), size=size, mode="bicubic", align_corners=False).squeeze(1)
    return out if batched else out[0]


def predict_boxes(
    maps: Tensor,
    sizes: Tensor,
    proposals: Tensor,
    valid: Tensor,
    exponent: float = AREA_EXPONENT,
) -> Tensor:
    """The best proposal of each expression: index ``[B]`` (long) into ``proposals``.

    Args:
        maps: ``[B, gh, gw]`` grid heat maps.
        sizes: ``[B, 2]`` original image ``(H, W)`` of each expression; each map is upsampled to its image.
        proposals: ``[B, P, 4]`` ``(x, y, w, h)`` boxes in original pixels, padded.
        valid: ``[B, P]`` bool, False for padding (never picked).
        exponent: the area normalisation (:func:`box_scores`).

    Ties go to the first box. Images differ in size, so each is upsampled on its own (evaluation only).
    """
    picks = []
    for heat, (height, width), boxes, keep in zip(maps, sizes.tolist(), proposals, valid, strict=True):
        scores = box_scores(upsample_map(heat, (int(height), int(width))), boxes, exponent)
        scores = torch.where(keep.to(scores.device), scores, torch.full_like(scores, -math.inf))
        picks.append(scores.argmax())
    return torch.stack(picks).to(proposals.device) if picks else proposals.new_zeros(0, dtype=torch.long)


# -- Grad-CAM ----------------------------------------------------------------------------------------------------------
def gradcam_map(probs: Tensor, grads: Tensor, text_mask: Tensor, grid: tuple[int, int]) -> Tensor:
    """Grad-CAM over image patches: ``[B, gh, gw]`` float32.

    Args:
        probs: ``A``, cross-attention probabilities ``[B, heads, L, prefix + gh·gw]`` (image prefix tokens first).
        grads: ``G``, the gradient of the explained score w.r.t. ``probs``, same shape.
        text_mask: ``[B, L]``, 1 for the expression's tokens, 0 for padding.
        grid: the ViT's patch grid ``(gh, gw)``.

    The map is ``A ⊙ relu(G)`` averaged over heads, then over the expression's tokens (the query rows; ``[CLS]``
    included). The reference divides the token sum by the padded batch length instead of the expression's own
    length: a positive factor per expression, which changes no ranking of its boxes.
    """
    if probs.shape != grads.shape or probs.dim() != 4:
        raise ValueError(
            f"probs and grads must both be [B, heads, L, K], got {tuple(probs.shape)}, {tuple(grads.shape)}"
        )
    patches = grid[0] * grid[1]
    prefix = probs.shape[-1] - patches
    if prefix < 0:
        raise ValueError(f"{probs.shape[-1]} attended image tokens cannot hold the {grid} patch grid")
    cam = (probs[..., prefix:].float() * grads[..., prefix:].float().clamp(min=0)).mean(dim=1)  # [B, L, N]
    weights = text_mask.to(cam.dtype)
    cam = (cam * weights.unsqueeze(-1)).sum(dim=1) / weights.sum(dim=1, keepdim=True).clamp(min=1)
    return cam.view(-1, *grid)


def default_gradcam_layer(stream: SingleStreamTransformer) -> int:
    """Two thirds of the way up the stack: layer 8 of 12, as the reference (``block_num 8``), and never below the
    first fusion layer of an ALBEF split."""
    config = stream.config
    return max(stream.fusion_layers.start, (2 * config.num_layers) // 3)


def resolve_gradcam_layer(stream: SingleStreamTransformer, layer: int | None, key: str = "layer") -> int:
    """``layer`` as a non-negative index of a stream layer that cross-attends to the image (None: the default).

    Raises:
        ValueError: naming ``key``, the layer and the valid range.
    """
    if layer is None:
        return default_gradcam_layer(stream)
    count = stream.config.num_layers
    index = layer + count if layer < 0 else layer
    fusion = stream.fusion_layers
    if index not in fusion or stream.encoder.layer[index].crossattention is None:
        raise ValueError(
            f"{key}={layer}: Grad-CAM needs a layer that cross-attends to the image, one of "
            f"{fusion.start}..{fusion.stop - 1} of this {count}-layer stream (negative values count from the top)"
        )
    return index


def cross_attention_gradcam(
    backbone: Backbone,
    itm_head: nn.Module,
    images: Tensor,
    input_ids: Tensor,
    attention_mask: Tensor,
    layer: int,
) -> tuple[Tensor, Tensor]:
    """Grad-CAM maps of the ITM match score on layer ``layer``'s cross-attention: ``(maps [B, gh, gw], logits [B])``.

    The ViT runs without gradients; its tokens are made a leaf that requires a gradient, so the cross-attention
    probabilities do whatever the parameters' ``requires_grad``. The gradient of the summed match logits (each
    expression's logit depends on its own pair only) is taken w.r.t. those probabilities alone with
    ``torch.autograd.grad``: no parameter ``.grad`` is touched. Call it with gradients enabled (outside
    ``torch.no_grad`` / ``torch.inference_mode``).

    The probabilities are read from the layer's cross-attention core (``crossattention.self``, an
    ``AttentionCore``) through forward hooks that ask it for them (its ``need_probs`` argument); ``layer`` must be
    a non-negative index checked by :func:`resolve_gradcam_layer`.
    """
    core = backbone.stream.encoder.layer[layer].crossattention
    if core is None:
        raise ValueError(f"stream layer {layer} has no cross-attention (see resolve_gradcam_layer)")
    core = core.self
    captured: dict[str, Tensor] = {}

    def ask_for_probs(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        # AttentionCore.forward(hidden, context, mask, need_probs=False)
        if len(args) >= 4:
            return (*args[:3], True, *args[4:]), kwargs
        return args, {**kwargs, "need_probs": True}

    def keep_probs(module: nn.Module, args: tuple, output: tuple[Tensor, Tensor | None]) -> None:
        captured["probs"] = output[1]

    with torch.no_grad():
        tokens = backbone.vision(images)
    tokens = tokens.detach().requires_grad_(True)
    hooks = [
        core.register_forward_pre_hook(ask_for_probs, with_kwargs=True),
        core.register_forward_hook(keep_probs),
    ]
    try:
        fused = backbone.fuse(input_ids, attention_mask, tokens)
    finally:
        for hook in hooks:
            hook.remove()
    probs = captured.get("probs")
    if probs is None:
        raise RuntimeError(f"stream layer {layer} did not run its cross-attention in multimodal mode")
    logits = itm_head(fused.last_hidden_state[:, 0]).float()[:, 1]
    (grads,) = torch.autograd.grad(logits.sum(), probs)
    maps = gradcam_map(probs.detach(), grads, attention_mask, tuple(backbone.vision.grid_size))
    return maps, logits.detach()


def model_heatmap(
    model: VisionLanguageModel, image: ImageInput | Tensor, text: str, layer: int | None = None
) -> Tensor:
    """Where ``text`` grounds in ``image`` for a loaded model: a ``[H, W]`` float32 map on the CPU.

    ``image`` is a PIL image, a path or encoded bytes (the map has the image's own size) or a preprocessed
    ``[3, S, S]`` tensor (the map is ``S × S``). ``layer``: the stream layer whose cross-attention is explained
    (None: :func:`default_gradcam_layer`; negative values count from the top). What :meth:`VisionLanguageModel.heatmap`
    returns.
    """
    if model.itm is None:
        raise RuntimeError(
            f"{model.source or 'this model'} was trained without ITM (model.itm: null): the heat map explains the ITM "
            "match score, so it needs a model trained with model.itm"
        )
    if not isinstance(text, str):
        raise TypeError(f"heatmap takes one caption (a str), got {type(text).__name__}")
    index = resolve_gradcam_layer(model.backbone.stream, layer)
    if isinstance(image, Tensor):
        side = model.image_size
        if tuple(image.shape) != (3, side, side):
            raise ValueError(
                f"an image tensor must be one preprocessed [3, {side}, {side}] image, got {tuple(image.shape)}"
            )
        pixels, size = image, (side, side)
    else:
        pil = _open(image)
        pixels, size = model.preprocess_image(pil), (pil.height, pil.width)
    pixels = pixels.to(device=model.device, dtype=model.dtype)
    ids, mask = model.tokenize([text])
    with torch.inference_mode(False), torch.enable_grad():
        maps, _ = cross_attention_gradcam(
            model.backbone,
            model.itm.itm_head,
            pixels.unsqueeze(0),
            ids.to(model.device),
            mask.to(model.device),
            index,
        )
    return upsample_map(maps[0].detach().float(), size).cpu()


def _open(image: Any) -> Image.Image:
    """A PIL image of ``image`` (PIL, path or bytes), decoded as evaluation decodes it."""
    from vlalign.data.transforms import BadSampleError, load_rgb
    from vlalign.errors import InputFileError

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    try:
        return load_rgb(image if isinstance(image, bytes) else Path(image).expanduser())
    except BadSampleError as err:
        what = "image bytes" if isinstance(image, bytes) else str(image)
        raise InputFileError(f"{what}: cannot be used as an image ({err}); give a readable image file") from None


# -- pictures ----------------------------------------------------------------------------------------------------------
TRUE_BOX = GREEN
PREDICTED_BOX = RED
BOX_WIDTH = 2
HEAT_OPACITY = 0.5
COLOURMAP = "jet"


def heat_overlay(
    image: Image.Image,
    heat: Tensor | np.ndarray,
    boxes: Sequence[tuple[Sequence[float], tuple[int, int, int]]] = (),
    opacity: float = HEAT_OPACITY,
) -> Image.Image:
    """``image`` with ``heat`` (any ``[h, w]``, stretched to the image and scaled to its own min..max) blended on
    top in the ``jet`` colour map, and ``boxes`` ``[((x, y, w, h), colour), ...]`` outlined (image pixels)."""
    from matplotlib import colormaps

    picture = image.convert("RGB")
    values = torch.as_tensor(np.asarray(heat), dtype=torch.float32)
    if values.dim() != 2:
        raise ValueError(f"heat must be a [H, W] map, got shape {tuple(values.shape)}")
    if tuple(values.shape) != (picture.height, picture.width):
        values = upsample_map(values, (picture.height, picture.width))
    low, high = float(values.min()), float(values.max())
    scaled = ((values - low) / (high - low) if high > low else torch.zeros_like(values)).numpy()
    colours = (colormaps[COLOURMAP](scaled)[..., :3] * 255).astype(np.float32)
    blended = (1 - opacity) * np.asarray(picture, dtype=np.float32) + opacity * colours
    out = Image.fromarray(blended.clip(0, 255).astype(np.uint8), mode="RGB")
    draw = ImageDraw.Draw(out)
    for (x, y, w, h), colour in boxes:
        draw.rectangle((x, y, x + w - 1, y + h - 1), outline=colour, width=BOX_WIDTH)
    return out


def save_heatmap(
    image: ImageInput,
    heat: Tensor | np.ndarray,
    path: str | Path,
    boxes: Sequence[tuple[Sequence[float], tuple[int, int, int]]] = (),
) -> Path:
    """Save :func:`heat_overlay` of ``image`` (PIL, path or bytes) and ``heat`` (e.g. from ``model.heatmap``) as a
    PNG at ``path`` (folders created); returns the path."""
    target = Path(path).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    heat_overlay(_open(image), heat, boxes).save(target, format="PNG")
    return target


@dataclass(frozen=True)
class GroundingExample:
    """One row of :func:`grounding_picture`."""

    image: Image.Image | str | Path
    text: str
    heat: Tensor  # [gh, gw] or [H, W]
    true_box: tuple[float, float, float, float]
    predicted_box: tuple[float, float, float, float]
    iou: float
    split: str = ""


def grounding_picture(examples: Sequence[GroundingExample], thumb: int = 192, text_width: int = 260) -> Image.Image:
    """One row per example: the image with the true (green) and predicted (red) boxes, the same with the heat map
    blended in, and the expression with its split and IoU (``correct`` at IoU >= 0.5)."""
    if not examples:
        raise ValueError("grounding_picture needs at least one example")
    header = 22
    width = PAD + 2 * (thumb + PAD) + text_width + PAD
    height = header + PAD + len(examples) * (thumb + PAD)
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    draw.text(
        (PAD, 4), "green: true box, red: predicted box; right: Grad-CAM heat of the ITM score", fill=TEXT, font=_font()
    )
    for row, example in enumerate(examples):
        image = _open(example.image)
        scale = thumb / max(image.width, image.height)
        fitted = image.resize(
            (max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.Resampling.BICUBIC
        )
        boxes = [
            (tuple(v * scale for v in example.true_box), TRUE_BOX),
            (tuple(v * scale for v in example.predicted_box), PREDICTED_BOX),
        ]
        top = header + PAD + row * (thumb + PAD)
        for column, opacity in enumerate((0.0, HEAT_OPACITY)):
            picture = heat_overlay(fitted, example.heat, boxes, opacity=opacity)
            left = PAD + column * (thumb + PAD)
            canvas.paste(picture, (left + (thumb - fitted.width) // 2, top + (thumb - fitted.height) // 2))
        verdict = "correct" if example.iou >= IOU_THRESHOLD else "wrong"
        split = f"[{example.split}] " if example.split else ""
        text = f"{split}{example.text} (IoU {example.iou:.2f}, {verdict})"
        _text_block(draw, (PAD + 2 * (thumb + PAD), top), text, text_width, thumb)
    return canvas


def split_accuracies(correct: Tensor, split: Tensor, names: Mapping[int, str]) -> dict[str, float]:
    """Accuracy (fraction correct, in [0, 1]) per split name and over all (``"all"``); ``split`` holds the ids."""
    out: dict[str, float] = {}
    for index, name in names.items():
        chosen = split == index
        if bool(chosen.any()):
            out[name] = float(correct[chosen].float().mean())
    out["all"] = float(correct.float().mean()) if correct.numel() else float("nan")
    return out
