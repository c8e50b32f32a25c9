"""Inference API: load a trained model and embed images and captions, score pairs with ITM.

Three lines from a checkpoint to scores::

    m = vlalign.load("runs/tiny/version_0/checkpoints/last.ckpt")   # or an exported folder, or a converted file
    image_emb, text_emb = m.encode_image(["cat.jpg", "dog.jpg"]), m.encode_text(["a cat", "a dog"])
    m.similarity(image_emb, text_emb), m.itm_scores(["cat.jpg"], ["a cat", "a dog"])

:func:`load` accepts

- a vlalign Lightning checkpoint (``.ckpt``; read with ``torch.load(weights_only=True)`` only): the model is rebuilt
  from the spec the checkpoint records under ``"vlalign_model"`` and its tensors are taken from ``state_dict``;
- a folder written by ``vlalign export`` (``config.json``, ``model.safetensors``, ``tokenizer/``);
- a ``.safetensors`` file written by ``vlalign convert reference`` (an official ALBEF / SIMLA checkpoint): it records
  no model, so one is built from the shapes of its tensors (:func:`vlalign.weights.published.infer_config`), and the
  tokenizer must be given (``tokenizer=DIR``). What shapes cannot tell comes from keyword overrides (below).

The returned :class:`VisionLanguageModel` holds the online encoders (``backbone``, no momentum twins), the ITC
projections (``itc``) and, when the model was trained with one, the ITM head (``itm``); its state-dict keys are the
training recipe's. Images are prepared exactly as in evaluation (``load_rgb`` then a squash-resize to the recorded
image size and normalisation); captions are cleaned with ``pre_caption`` and tokenised as in training
(``[CLS] word-pieces``, no ``[SEP]``).

Keyword overrides of :func:`load` (kept few on purpose):

- every source: ``image_size`` (images are resized to this side and the ViT's position embeddings interpolated to
  the new patch grid, as ALBEF / SIMLA fine-tuning does), ``max_words`` (``pre_caption`` keeps this many words;
  default: recorded, else 30), ``max_length`` (tokens per caption, ``[CLS]`` included; recorded, else 30);
- converted files only, for what tensor shapes cannot tell: ``stream_num_heads`` (default ``hidden_size // 64``, as
  BERT), ``text_pooling`` (``"cls"``, the reference and the default, or ``"mean"``), ``vision_name`` (the timm ViT,
  when the file's ViT is not one vlalign can name from its shapes).
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import json
import logging
import math
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from vlalign.data.preprocessing import Preprocessing, tokenizer_files
from vlalign.data.text import pre_caption
from vlalign.data.tokenization import VocabInfo, load_tokenizer, tokenize_captions, vocab_info
from vlalign.data.transforms import CLIP_MEAN, CLIP_STD, BadSampleError, EvalTransform, load_rgb
from vlalign.errors import InputFileError
from vlalign.models.backbone import Backbone, with_prefix
from vlalign.models.stream import StreamConfig
from vlalign.models.vision import VisionConfig, interpolate_pos_embed
from vlalign.objectives.base import BuildSpec, from_config

log = logging.getLogger(__name__)

__all__ = [
    "CONFIG_FILE",
    "TOKENIZER_DIR",
    "WEIGHTS_FILE",
    "ImageInput",
    "VisionLanguageModel",
    "build_model",
    "load",
    "read_checkpoint",
    "read_weights",
    "save_weights",
]

#: Key under which a vlalign checkpoint records how to rebuild its model; the same string as
#: ``vlalign.tasks.pretrain.SPEC_KEY`` (not imported: that module pulls in Lightning; a test checks they agree).
SPEC_KEY = "vlalign_model"
SPEC_FORMAT = 1
#: Files of an exported model folder (``vlalign export``).
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_DIR = "tokenizer"
README_FILE = "README.md"
#: Safetensors metadata entry of an exported folder: ``{"dropped key": "key holding the same tensor"}`` for tied
#: weights (the MLM decoder shares the word embeddings), which are written once.
ALIASES_METADATA = "vlalign_aliases"
#: ITC state that only training reads (the feature queues).
QUEUE_KEYS = ("itc.image_queue", "itc.text_queue", "itc.queue_ptr", "itc.image_id_queue")
#: Roots of the modules the inference model keeps (everything else in a checkpoint is ignored).
KEPT_ROOTS = ("backbone", "itc", "itm")

#: Overrides :func:`load` understands, by the sources they apply to.
GENERAL_OVERRIDES = ("image_size", "max_words", "max_length")
CONVERTED_OVERRIDES = ("stream_num_heads", "text_pooling", "vision_name")
DEFAULT_MAX_WORDS = 30
DEFAULT_MAX_LENGTH = 30

#: One image as :meth:`VisionLanguageModel.encode_image` accepts it.
ImageInput = Image.Image | str | Path | bytes
Progress = bool | None


# -- the model ---------------------------------------------------------------------------------------------------------
class VisionLanguageModel(nn.Module):
    """A trained vision-language model for inference: embeddings, similarities and ITM match scores.

    Build it with :func:`load`. Every method runs under ``torch.no_grad()`` in batches of ``batch_size``, shows a
    progress bar when the input spans more than one batch (``progress=None``; ``True`` / ``False`` force it), moves
    inputs to the model's device and dtype (``m.to("cuda")``, ``m.to(torch.bfloat16)``) and returns float32 tensors
    on the CPU.

    Attributes:
        backbone: the online ViT and stream (:class:`~vlalign.models.backbone.Backbone`, no momentum twins).
        itc: the ITC projections (``vision_proj``, ``text_proj``, ``temp``), or None for a model trained without ITC.
        itm: the ITM head (``itm_head``), or None for a model trained without ITM.
        tokenizer: the Hugging Face tokenizer captions are encoded with.
        preprocessing: image size, caption length limits and the tokenizer's files
            (:class:`~vlalign.data.preprocessing.Preprocessing`).
        config: the model spec it was built from (the format ``PretrainRecipe.model_spec`` writes).
        source: the file or folder it was loaded from.
    """

    def __init__(
        self,
        backbone: Backbone,
        itc: nn.Module | None,
        itm: nn.Module | None,
        tokenizer: Any,
        preprocessing: Preprocessing,
        config: Mapping[str, Any],
        source: str = "",
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.itc = itc
        self.itm = itm
        self.tokenizer = tokenizer
        self.preprocessing = preprocessing
        self.config = dict(config)
        self.source = source
        self.image_transform = _image_transform(preprocessing)

    # -- properties ----------------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def embed_dim(self) -> int:
        """Width of the joint embedding space (the rows :meth:`encode_image` / :meth:`encode_text` return)."""
        return int(self._itc().embed_dim)

    @property
    def image_size(self) -> int:
        return int(self.preprocessing.image_size)

    def _itc(self) -> nn.Module:
        if self.itc is None:
            raise RuntimeError(
                f"{self.source or 'this model'} was trained without ITC (model.itc: null), so it has no joint "
                "embedding space: encode_image / encode_text / similarity need a model trained with model.itc; "
                "itm_scores works without it"
            )
        return self.itc

    # -- preprocessing --------------------------------------------------------------------------------------------------
    def preprocess_image(self, image: ImageInput) -> Tensor:
        """One image (PIL image, path or encoded bytes) as the evaluation view ``[3, S, S]`` (float32, CPU).

        Raises:
            InputFileError: a path or bytes that cannot be decoded (the message names the file and the reason).
        """
        if isinstance(image, Image.Image):
            pil = _to_rgb(image)
        else:
            try:
                pil = load_rgb(image if isinstance(image, bytes) else Path(image).expanduser())
            except BadSampleError as err:
                what = "image bytes" if isinstance(image, bytes) else str(image)
                raise InputFileError(
                    f"{what}: cannot be used as an image ({err}); give a readable JPEG / PNG / WebP / BMP file"
                ) from None
        return self.image_transform(pil)

    def tokenize(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Captions as training encodes them: ``pre_caption(text, max_words)``, ``[CLS] word-pieces`` cut to
        ``max_length``, right-padded to the longest; returns ``(input_ids, attention_mask)`` on the CPU."""
        cleaned = [pre_caption(text, self.preprocessing.max_words) for text in texts]
        return tokenize_captions(self.tokenizer, cleaned, self.preprocessing.max_length, padding="longest")

    def _image_batches(
        self, images: ImageInput | Sequence[ImageInput] | Tensor, batch_size: int, progress: Progress, desc: str
    ) -> Iterator[Tensor]:
        """Preprocessed image batches on the model's device and dtype."""
        _check_batch_size(batch_size)
        device, dtype = self.device, self.dtype
        if isinstance(images, Tensor):
            pixels = images.unsqueeze(0) if images.dim() == 3 else images
            size = self.image_size
            if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (3, size, size):
                raise ValueError(
                    f"image tensors must be preprocessed [B, 3, {size}, {size}] batches (or one [3, {size}, {size}] "
                    f"image), got {tuple(images.shape)}; pass PIL images or paths to have them preprocessed"
                )
            for start in _progress(range(0, pixels.shape[0], batch_size), pixels.shape[0], batch_size, progress, desc):
                yield pixels[start : start + batch_size].to(device=device, dtype=dtype)
            return
        items = _as_list(images)
        for start in _progress(range(0, len(items), batch_size), len(items), batch_size, progress, desc):
            batch = torch.stack([self.preprocess_image(item) for item in items[start : start + batch_size]])
            yield batch.to(device=device, dtype=dtype)

    # -- embeddings -----------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_image(
        self,
        images: ImageInput | Sequence[ImageInput] | Tensor,
        batch_size: int = 64,
        progress: Progress = None,
    ) -> Tensor:
        """L2-normalised image embeddings ``[N, embed_dim]`` (float32, CPU): ITC's ``vision_proj`` of the ViT's [CLS].

        Args:
            images: PIL images, image paths or encoded bytes (one or a list), or an already preprocessed float tensor
                ``[B, 3, S, S]`` with ``S = preprocessing.image_size`` (what :meth:`preprocess_image` returns, stacked).
            batch_size: images per ViT pass.
            progress: show a progress bar; None: when there is more than one batch.
        """
        itc = self._itc()
        out = [
            itc.image_features(self.backbone.vision(batch)).float().cpu()
            for batch in self._image_batches(images, batch_size, progress, "encode images")
        ]
        return torch.cat(out) if out else torch.empty(0, self.embed_dim)

    @torch.no_grad()
    def encode_text(self, texts: str | Sequence[str], batch_size: int = 256, progress: Progress = None) -> Tensor:
        """L2-normalised caption embeddings ``[N, embed_dim]`` (float32, CPU): ITC's ``text_proj`` of the pooled
        text-mode states (the pooling the model was trained with).

        Args:
            texts: one caption or a list.
            batch_size: captions per stream pass.
            progress: show a progress bar; None: when there is more than one batch.
        """
        itc = self._itc()
        _check_batch_size(batch_size)
        items = [texts] if isinstance(texts, str) else list(texts)
        device = self.device
        out = []
        for start in _progress(range(0, len(items), batch_size), len(items), batch_size, progress, "encode texts"):
            ids, mask = self.tokenize(items[start : start + batch_size])
            ids, mask = ids.to(device), mask.to(device)
            out.append(itc.text_features(self.backbone.encode_text(ids, mask), mask).float().cpu())
        return torch.cat(out) if out else torch.empty(0, self.embed_dim)

    @staticmethod
    def similarity(image_emb: Tensor, text_emb: Tensor) -> Tensor:
        """Cosine similarities ``[N_images, N_texts]`` (float32) of two embedding sets (1-D inputs count as one row).

        Embeddings are normalised again, so any vectors may be compared.
        """
        a = F.normalize(torch.atleast_2d(image_emb).float(), dim=-1)
        b = F.normalize(torch.atleast_2d(text_emb).float(), dim=-1)
        return a @ b.to(a.device).t()

    # -- image-text matching --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def itm_scores(
        self,
        images: ImageInput | Sequence[ImageInput] | Tensor,
        texts: str | Sequence[str],
        batch_size: int = 64,
        logits: bool = False,
        progress: Progress = None,
    ) -> Tensor:
        """ITM scores of every (image, caption) pair: ``[N_images, N_texts]`` float32 on the CPU.

        Each image goes through the ViT once; pairs go through the fusion layers ``batch_size`` at a time, ordered by
        caption length and cut to the longest caption of each batch (so padding costs little).

        Args:
            images: as :meth:`encode_image`.
            texts: one caption or a list.
            batch_size: images per ViT pass and pairs per fusion pass.
            logits: return the raw "match" logit (``itm_head(fused[CLS])[:, 1]``), which ALBEF / SIMLA retrieval
                re-ranks with, instead of the match probability ``softmax(logits)[:, 1]``.
            progress: show a progress bar; None: when there is more than one fusion batch.
        """
        if self.itm is None:
            raise RuntimeError(
                f"{self.source or 'this model'} was trained without ITM (model.itm: null): itm_scores needs its "
                "itm_head; compare embeddings with similarity() instead"
            )
        _check_batch_size(batch_size)
        items = [texts] if isinstance(texts, str) else list(texts)
        if isinstance(images, Tensor):
            num_images = 1 if images.dim() == 3 else images.shape[0]
        else:
            images = _as_list(images)
            num_images = len(images)
        num_texts = len(items)
        scores = torch.empty(num_images, num_texts, dtype=torch.float32)
        if not num_images or not num_texts:
            return scores
        device = self.device
        ids, mask = self.tokenize(items)
        lengths = mask.sum(1)
        order = lengths.argsort(stable=True)  # pairs of similar caption length share a fusion batch
        ids, mask = ids[order].to(device), mask[order].to(device)
        lengths = lengths[order]
        backbone = self.backbone
        text_states = None  # an ALBEF split fuses from the text layers' output: computed once per caption
        if not backbone.single_stream:
            text_states = torch.cat(
                [
                    backbone.encode_text(ids[start : start + batch_size], mask[start : start + batch_size])
                    for start in range(0, num_texts, batch_size)
                ]
            )
        pairs_total = num_images * num_texts
        show = progress if progress is not None else pairs_total > batch_size
        done = 0
        with _bar(pairs_total, show, "ITM pairs") as bar:
            for batch in self._image_batches(images, batch_size, False, ""):
                tokens = backbone.vision(batch)
                count = tokens.shape[0]
                pairs = count * num_texts
                for start in range(0, pairs, batch_size):
                    index = torch.arange(start, min(start + batch_size, pairs))
                    text_index, image_index = index // count, index % count  # text-major: lengths grow along pairs
                    length = max(1, int(lengths[text_index].max()))
                    text_dev, image_dev = text_index.to(device), image_index.to(device)
                    fused = backbone.fuse(
                        ids[text_dev, :length],
                        mask[text_dev, :length],
                        tokens[image_dev],
                        text_states=None if text_states is None else text_states[text_dev, :length],
                    )
                    raw = self.itm.itm_head(fused.last_hidden_state[:, 0]).float()
                    score = raw[:, 1] if logits else raw.softmax(dim=-1)[:, 1]
                    scores[done + image_index, order[text_index]] = score.cpu()
                    bar.update(len(index))
                done += count
        return scores

    def heatmap(self, image: ImageInput | Tensor, text: str, layer: int | None = None) -> Tensor:
        """Where ``text`` grounds in ``image``: Grad-CAM of the ITM match score on stream layer ``layer``'s
        cross-attention, upsampled to the image, ``[H, W]`` float32 on the CPU (``[S, S]`` for a preprocessed
        ``[3, S, S]`` tensor). ``layer``: None, two thirds up the stack (8 of 12); negative counts from the top.
        Save it over the image with ``vlalign.evaluation.grounding.save_heatmap(image, heat, "heat.png")``;
        the method: :func:`vlalign.evaluation.grounding.model_heatmap`."""
        from vlalign.evaluation.grounding import model_heatmap

        return model_heatmap(self, image, text, layer)

    def extra_repr(self) -> str:
        return f"source={self.source!r}, image_size={self.preprocessing.image_size}"


# -- loading -----------------------------------------------------------------------------------------------------------
def load(
    path: str | Path,
    tokenizer: str | Path | Any | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    **overrides: Any,
) -> VisionLanguageModel:
    """Load a vlalign ``.ckpt``, an exported model folder or a converted ALBEF / SIMLA ``.safetensors`` file.

    Args:
        path: the checkpoint, folder or file (see the module docstring).
        tokenizer: a tokenizer directory (``save_pretrained`` layout) or a loaded Hugging Face tokenizer; required
            for converted reference files, which record none; replaces the recorded one otherwise.
        device: where the model runs (``"cuda"``, ``"cuda:1"``, ``"cpu"``).
        dtype: parameter dtype (``torch.bfloat16`` or ``"bfloat16"``, ...); None keeps float32.
        **overrides: ``image_size``, ``max_words``, ``max_length``; for converted files also ``stream_num_heads``,
            ``text_pooling``, ``vision_name`` (module docstring).

    Returns:
        A :class:`VisionLanguageModel` in eval mode, gradients off.

    Raises:
        InputFileError: the path does not exist or cannot be used (the message names it and the fix).
        ValueError: an unknown override, or one that does not apply to this kind of source.
    """
    unknown = sorted(set(overrides) - {*GENERAL_OVERRIDES, *CONVERTED_OVERRIDES})
    if unknown:
        raise ValueError(
            f"vlalign.load: unknown override(s) {', '.join(unknown)}; known: "
            f"{', '.join(GENERAL_OVERRIDES + CONVERTED_OVERRIDES)}"
        )
    source = Path(path).expanduser()
    if not source.exists():
        raise InputFileError(
            f"{source}: does not exist; give a vlalign .ckpt, a folder written by `vlalign export`, or a "
            "converted .safetensors file (`vlalign convert reference`)"
        )
    if source.is_file() and source.name == WEIGHTS_FILE and (source.parent / CONFIG_FILE).is_file():
        source = source.parent  # the weights of an exported folder: load the folder
    if source.is_dir():
        spec, state, tokenizer_dir = _read_exported(source)
        kind = "exported"
    elif source.suffix == ".safetensors":
        spec, state, tokenizer_dir = _read_converted(source, tokenizer, overrides)
        kind = "converted"
    else:
        checkpoint = read_checkpoint(source)
        spec, state, tokenizer_dir = checkpoint[SPEC_KEY], checkpoint["state_dict"], None
        kind = "checkpoint"
    if kind != "converted":
        given = sorted(set(overrides) & set(CONVERTED_OVERRIDES))
        if given:
            raise ValueError(
                f"vlalign.load: {', '.join(given)} only apply to converted reference files; {source} records "
                "its model, so these settings come from it"
            )
    model = build_model(spec, state, tokenizer=tokenizer, tokenizer_dir=tokenizer_dir, source=source, **overrides)
    if dtype is not None:
        model.to(dtype=_dtype(dtype))
    return model.to(device)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A vlalign Lightning checkpoint, read with ``torch.load(weights_only=True)`` (tensors memory-mapped).

    Raises:
        InputFileError: unreadable, an official ALBEF / SIMLA checkpoint (convert it first), or a checkpoint that
            records no model spec; the message names the file and the fix.
    """
    from vlalign.weights.reading import torch_load_weights_only
    from vlalign.weights.safe_loading import allow_config_classes_in_checkpoints

    file = Path(path).expanduser()
    allow_config_classes_in_checkpoints()
    checkpoint = torch_load_weights_only(file, mmap=True)
    if isinstance(checkpoint, dict) and SPEC_KEY in checkpoint and isinstance(checkpoint.get("state_dict"), dict):
        return checkpoint
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("model"), dict):
        raise InputFileError(
            f"{file}: an ALBEF / SIMLA checkpoint (a 'model' state dict), which records no vlalign model: convert it "
            f"first with `vlalign convert reference --checkpoint {file} --out model.safetensors`, then "
            "vlalign.load('model.safetensors', tokenizer='path/to/bert-tokenizer')"
        )
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        raise InputFileError(
            f"{file}: a Lightning checkpoint without a {SPEC_KEY!r} entry: it was written by an older vlalign version "
            "that did not record how to rebuild the model. Resume it for one more step with this version "
            "(`vlalign fit --config CONFIG --ckpt_path FILE --trainer.max_steps N+1`) to get a self-describing "
            "checkpoint, or load its state_dict into PretrainRecipe built from the training config"
        )
    raise InputFileError(
        f"{file}: not a vlalign checkpoint (expected a Lightning .ckpt written by `vlalign fit`, a folder written by "
        "`vlalign export`, or a .safetensors file written by `vlalign convert reference`)"
    )


def build_model(
    spec: Mapping[str, Any],
    state: Mapping[str, Tensor],
    tokenizer: str | Path | Any | None = None,
    tokenizer_dir: Path | None = None,
    source: str | Path = "",
    **overrides: Any,
) -> VisionLanguageModel:
    """Build the inference model a spec describes and load its tensors from ``state`` (recipe key layout).

    Only ``backbone.*``, ``itc.*`` (projections and temperature) and ``itm.*`` are read; every one of them must be in
    ``state`` with the model's shape (the error lists the missing ones). Twins, queues and other objectives' heads
    are ignored.
    """
    if spec.get("format") != SPEC_FORMAT:
        raise InputFileError(
            f"{source}: unknown vlalign model spec format {spec.get('format')!r} (this version reads {SPEC_FORMAT}); "
            "upgrade vlalign or export the model again with this version"
        )
    args = spec["init_args"]
    vision = VisionConfig(**{**args["vision"], "weights": None, "gradient_checkpointing": False})
    preprocessing, tok = _preprocessing(spec, tokenizer, tokenizer_dir, vision.img_size, source, overrides)
    # The ViT is built for the images it will see; position embeddings are interpolated when that differs.
    vision = dataclasses.replace(vision, img_size=preprocessing.image_size)
    stream = StreamConfig(**{**args["stream"], "gradient_checkpointing": False})
    vocab = VocabInfo(**args["vocab"]) if args.get("vocab") else None
    if vocab is not None:
        stream = dataclasses.replace(stream, vocab_size=vocab.vocab_size, pad_token_id=vocab.pad_token_id)
    else:
        vocab = VocabInfo(vocab_size=stream.vocab_size, pad_token_id=stream.pad_token_id)
    backbone = Backbone(vision, stream)
    itc, itm = _inference_objectives(args.get("objectives") or [], source)
    if itc is None and itm is None:
        raise InputFileError(
            f"{source}: the model has neither ITC nor ITM, so there is nothing to infer with (vlalign.load keeps the "
            "encoders, the ITC projections and the ITM head); train it with model.itc or model.itm enabled"
        )
    build = BuildSpec(
        vision_width=backbone.vision_width,
        text_width=backbone.text_width,
        vocab=vocab,
        patch_grid=backbone.vision.grid_size,
        patch_size=backbone.vision.patch_size,
        momentum=False,
        stream=backbone.stream,
        stream_m=None,
        embed_dim=itc.embed_dim if itc is not None else None,
    )
    for objective in (itc, itm):
        if objective is not None:
            objective.build(build)

    if len(tok) > stream.vocab_size:
        raise InputFileError(
            f"{source}: the tokenizer has {len(tok)} tokens but the model's word embeddings only {stream.vocab_size} "
            "rows: pass the tokenizer the model was trained with (tokenizer=DIR)"
        )
    model = VisionLanguageModel(
        backbone, itc, itm, tok, preprocessing, _with_preprocessing(spec, preprocessing), str(source)
    )
    _load_state(model, state, source)
    model.requires_grad_(False)
    return model.eval()


def _inference_objectives(configs: Sequence[Mapping[str, Any]], source: str | Path) -> tuple[Any, Any]:
    """ITC (rebuilt without queue or distillation) and ITM from the recorded objective configs; others are left out."""
    found: dict[str, Mapping[str, Any]] = {}
    for config in configs:
        module, _, name = str(config.get("class_path", "")).rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError, ValueError):
            log.warning(
                "%s: objective %s cannot be imported; inference does not need it", source, config.get("class_path")
            )
            continue
        if getattr(cls, "name", None) in ("itc", "itm"):
            found[cls.name] = config
    itc = itm = None
    if "itc" in found:
        config = copy.deepcopy(dict(found["itc"]))
        init_args = dict(config.get("init_args") or {})
        init_args.update(queue_size=0, distill=False)  # training-only state: no queues, no momentum projections
        itc = from_config({**config, "init_args": init_args})
    if "itm" in found:
        itm = from_config(found["itm"])
    return itc, itm


def _preprocessing(
    spec: Mapping[str, Any],
    tokenizer: str | Path | Any | None,
    tokenizer_dir: Path | None,
    vit_size: int,
    source: str | Path,
    overrides: Mapping[str, Any],
) -> tuple[Preprocessing, Any]:
    """The preprocessing (recorded, or defaults from the ViT's image size) with the overrides, and the tokenizer."""
    recorded = spec.get("preprocessing")
    preprocessing = (
        Preprocessing.from_dict(recorded)
        if recorded
        else Preprocessing(image_size=vit_size, max_words=DEFAULT_MAX_WORDS, max_length=DEFAULT_MAX_LENGTH)
    )
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, Path)) else tokenizer
    elif tokenizer_dir is not None:
        tok = load_tokenizer(tokenizer_dir)
    elif preprocessing.tokenizer_files:
        with tempfile.TemporaryDirectory(prefix="vlalign-tokenizer-") as tmp:
            tok = load_tokenizer(preprocessing.write_tokenizer(tmp))
    else:
        raise InputFileError(
            f"{source}: the model records no tokenizer: pass the one it was trained with, "
            "vlalign.load(..., tokenizer='path/to/tokenizer_dir') (`--tokenizer DIR` on the command line)"
        )
    if not preprocessing.tokenizer_files:
        preprocessing = dataclasses.replace(preprocessing, tokenizer_files=tokenizer_files(tok))
    updates = {key: int(overrides[key]) for key in GENERAL_OVERRIDES if overrides.get(key) is not None}
    preprocessing = dataclasses.replace(preprocessing, **updates)
    for key in GENERAL_OVERRIDES:
        if getattr(preprocessing, key) < 1:
            raise ValueError(f"{key} must be >= 1, got {getattr(preprocessing, key)}")
    positions = int(spec["init_args"]["stream"]["max_position_embeddings"])
    if preprocessing.max_length > positions:
        preprocessing = dataclasses.replace(preprocessing, max_length=positions)
    return preprocessing, tok


def _with_preprocessing(spec: Mapping[str, Any], preprocessing: Preprocessing) -> dict[str, Any]:
    config = copy.deepcopy(dict(spec))
    config["preprocessing"] = preprocessing.to_dict()
    return config


def _load_state(model: VisionLanguageModel, state: Mapping[str, Tensor], source: str | Path) -> None:
    """Load the model's keys strictly from ``state``; the vision position table follows a changed image size."""
    own = model.state_dict()
    missing = [key for key in own if key not in state]
    if missing:
        shown = ", ".join(missing[:8]) + (f", ... ({len(missing) - 8} more)" if len(missing) > 8 else "")
        raise InputFileError(
            f"{source}: {len(missing)} tensor(s) the model needs are not in the file: {shown}. The file does not "
            "belong to this model (or was truncated): export or convert it again"
        )
    selected = {key: state[key] for key in own}
    pos_key = "backbone.vision.vit.pos_embed"
    if pos_key in selected and selected[pos_key].shape != own[pos_key].shape:
        side = math.isqrt(own[pos_key].shape[1] - 1)
        selected[pos_key] = interpolate_pos_embed(selected[pos_key].float(), (side, side))
    wrong = [
        f"{key}: file {tuple(value.shape)}, model {tuple(own[key].shape)}"
        for key, value in selected.items()
        if tuple(value.shape) != tuple(own[key].shape)
    ]
    if wrong:
        raise InputFileError(
            f"{source}: {len(wrong)} tensor(s) have other shapes than the model built from its config: "
            f"{'; '.join(wrong[:5])}. For a converted file, give the settings the shapes cannot tell "
            "(stream_num_heads=..., vision_name=...); otherwise the file is damaged: export or convert it again"
        )
    model.load_state_dict(selected, strict=True)


# -- exported folders ---------------------------------------------------------------------------------------------------
def read_weights(file: str | Path) -> dict[str, Tensor]:
    """Tensors of an exported ``model.safetensors``, tied aliases restored (see :func:`save_weights`)."""
    from safetensors import safe_open

    from vlalign.weights.reading import read_safetensors

    file = Path(file)
    state = read_safetensors(file)
    with safe_open(str(file), framework="pt") as handle:
        metadata = handle.metadata() or {}
    for alias, target in json.loads(metadata.get(ALIASES_METADATA, "{}")).items():
        if target in state:
            state[alias] = state[target]
    return state


def save_weights(
    state: Mapping[str, Tensor], file: str | Path, metadata: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Write tensors as safetensors; a tensor identical to one already written (a tied weight) is written once and
    recorded in the metadata (``vlalign_aliases``). Returns the aliases ``{dropped key: written key}``.

    Keys under ``backbone.`` are written first, so the encoder keeps its own name for a tied weight (the MLM
    decoder refers to the word embeddings, not the other way round) and ``model.init_from`` finds it.
    """
    from safetensors.torch import save_file

    ordered = sorted(state, key=lambda key: (not key.startswith("backbone."),))
    written: dict[tuple[int, int, tuple[int, ...], tuple[int, ...], torch.dtype], str] = {}
    storages: set[int] = set()
    flat: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    for key in ordered:
        value = state[key].detach()
        identity = (
            value.untyped_storage().data_ptr(),
            value.storage_offset(),
            tuple(value.shape),
            tuple(value.stride()),
            value.dtype,
        )
        if identity in written:
            aliases[key] = written[identity]
            continue
        written[identity] = key
        value = value.cpu().contiguous()
        if value.untyped_storage().data_ptr() in storages:  # a different view of shared memory: a private copy
            value = value.clone()
        storages.add(value.untyped_storage().data_ptr())
        flat[key] = value
    meta = {"format": "vlalign", ALIASES_METADATA: json.dumps(aliases), **(metadata or {})}
    save_file(flat, str(file), metadata=meta)
    return aliases


def _read_exported(folder: Path) -> tuple[dict[str, Any], dict[str, Tensor], Path | None]:
    config_file, weights_file = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not config_file.is_file() or not weights_file.is_file():
        absent = " and ".join(
            name for name, f in ((CONFIG_FILE, config_file), (WEIGHTS_FILE, weights_file)) if not f.is_file()
        )
        raise InputFileError(
            f"{folder}: not an exported vlalign model folder ({absent} missing); write one with "
            f"`vlalign export --ckpt_path last.ckpt --out {folder}`, or give the .ckpt itself"
        )
    try:
        spec = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputFileError(
            f"{config_file}: not a readable JSON model config ({err}); export the model again"
        ) from None
    if not isinstance(spec, dict) or "init_args" not in spec:
        raise InputFileError(f"{config_file}: not a vlalign model config (no 'init_args'); export the model again")
    tokenizer_dir = folder / spec.get("tokenizer", TOKENIZER_DIR)
    return spec, read_weights(weights_file), tokenizer_dir if tokenizer_dir.is_dir() else None


# -- converted reference files ------------------------------------------------------------------------------------------
def _read_converted(
    file: Path, tokenizer: str | Path | Any | None, overrides: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, Tensor], None]:
    """A spec built from the tensors of a ``vlalign convert reference`` file (backbone-relative keys)."""
    from vlalign.weights.published import infer_config
    from vlalign.weights.reading import read_safetensors

    tensors = read_safetensors(file)
    if any(key.startswith("backbone.") for key in tensors):
        raise InputFileError(
            f"{file}: the weights of an exported model without its {CONFIG_FILE}: load the folder it came from "
            f"(it holds {CONFIG_FILE}, {WEIGHTS_FILE} and {TOKENIZER_DIR}/), or export the checkpoint again"
        )
    if "vision.vit.patch_embed.proj.weight" not in tensors or "stream.embeddings.word_embeddings.weight" not in tensors:
        raise InputFileError(
            f"{file}: holds no ViT and stream weights in the vlalign layout (vision.*, stream.*); expected a file "
            "written by `vlalign convert reference` (an ALBEF / SIMLA checkpoint) or a folder from `vlalign export`"
        )
    if tokenizer is None:
        raise InputFileError(
            f"{file}: a converted reference checkpoint records no tokenizer: pass the one it was trained with, "
            "vlalign.load(..., tokenizer='path/to/bert-base-uncased') (a save_pretrained directory; "
            "`--tokenizer DIR` on the command line)"
        )
    hints = infer_config(tensors)
    vision_name = overrides.get("vision_name") or hints["vision.name"]
    if vision_name.startswith("<"):
        raise InputFileError(
            f"{file}: the ViT is {vision_name}, not one vlalign can name from its shapes: pass vision_name='...' "
            "(the timm model name, e.g. vit_base_patch16_224)"
        )
    hidden = int(hints["stream.hidden_size"])
    heads = int(overrides.get("stream_num_heads") or max(1, hidden // 64))
    if hidden % heads:
        raise ValueError(f"stream_num_heads={heads} does not divide the stream width {hidden}")
    vision_width = int(tensors["vision.vit.patch_embed.proj.weight"].shape[0])
    stream = {
        "vocab_size": int(hints["stream.vocab_size"]),
        "hidden_size": hidden,
        "num_layers": int(hints["stream.num_layers"]),
        "num_heads": heads,
        "intermediate_size": int(hints.get("stream.intermediate_size", 4 * hidden)),
        "max_position_embeddings": int(hints.get("stream.max_position_embeddings", 512)),
        "type_vocab_size": int(hints.get("stream.type_vocab_size", 0)),
        "encoder_width": int(hints.get("stream.encoder_width", vision_width)),
        "fusion_layer": hints.get("stream.fusion_layer"),
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
    }
    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, Path)) else tokenizer
    info = vocab_info(tok)
    vocab = dataclasses.asdict(dataclasses.replace(info, vocab_size=stream["vocab_size"]))
    objectives = []
    if "itc.vision_proj.weight" in tensors:
        itc_args = {"embed_dim": int(hints["itc.embed_dim"]), "text_pooling": overrides.get("text_pooling") or "cls"}
        objectives.append({"class_path": "vlalign.objectives.itc.ITC", "init_args": itc_args})
    if "itm.itm_head.weight" in tensors:
        objectives.append({"class_path": "vlalign.objectives.itm.ITM", "init_args": {}})
    img_size = int(hints.get("vision.img_size", 224))
    spec = {
        "format": SPEC_FORMAT,
        "class_path": "vlalign.tasks.pretrain.PretrainRecipe",
        "init_args": {
            "vision": {"name": vision_name, "img_size": img_size, "mask_token": bool(hints.get("vision.mask_token"))},
            "stream": stream,
            "vocab": vocab,
            "objectives": objectives,
        },
        "preprocessing": Preprocessing(image_size=img_size, tokenizer_files=tokenizer_files(tok)).to_dict(),
        "source": {"converted_file": str(file)},
    }
    return spec, with_prefix(tensors), None


# -- helpers ------------------------------------------------------------------------------------------------------------
def _to_rgb(image: Image.Image) -> Image.Image:
    """An in-memory PIL image as 8-bit RGB, the way :func:`~vlalign.data.transforms.load_rgb` converts files."""
    from vlalign.data import transforms

    return transforms._to_rgb(image)  # noqa: SLF001 - the one conversion load_rgb applies, for in-memory images


def _image_transform(preprocessing: Preprocessing) -> Any:
    """The evaluation transform; a model recording other normalisation statistics than CLIP's gets its own."""
    if tuple(preprocessing.mean) == tuple(CLIP_MEAN) and tuple(preprocessing.std) == tuple(CLIP_STD):
        return EvalTransform(preprocessing.image_size)
    from torchvision import transforms as T
    from torchvision.transforms import InterpolationMode

    size = preprocessing.image_size
    return T.Compose(
        [
            T.Resize((size, size), interpolation=InterpolationMode.BICUBIC),
            T.ToTensor(),
            T.Normalize(preprocessing.mean, preprocessing.std),
        ]
    )


def _as_list(images: Any) -> list[Any]:
    if isinstance(images, (Image.Image, str, Path, bytes)):
        return [images]
    return list(images)


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


def _bar(total: int, show: bool, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="item", disable=not show, leave=False)


def _progress(steps: range, total: int, batch_size: int, progress: Progress, desc: str) -> Iterator[int]:
    """``steps`` with a progress bar over ``total`` items (shown when ``progress``, or auto: more than one batch)."""
    show = progress if progress is not None else total > batch_size
    bar = _bar(total, bool(show), desc)
    try:
        for start in steps:
            yield start
            bar.update(min(batch_size, total - start))
    finally:
        bar.close()


def _dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch dtype (bfloat16, float16, float32), got {dtype!r}")
    return value
