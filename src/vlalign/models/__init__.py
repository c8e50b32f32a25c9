"""Encoders and heads: the timm ViT image encoder and the shared BERT-compatible text/fusion stack."""

from vlalign.models.heads import MaskedLMHead
from vlalign.models.stream import SingleStreamTransformer, StreamConfig, StreamOutput, load_hf_bert
from vlalign.models.vision import VisionConfig, VisionEncoder, interpolate_pos_embed, load_vision_weights
from vlalign.weights.reading import LoadReport

__all__ = [
    "LoadReport",
    "MaskedLMHead",
    "SingleStreamTransformer",
    "StreamConfig",
    "StreamOutput",
    "VisionConfig",
    "VisionEncoder",
    "interpolate_pos_embed",
    "load_hf_bert",
    "load_vision_weights",
]
