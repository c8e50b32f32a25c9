"""vlalign: vision-language pretraining objectives (ITC, ITM, XMM, PSL) over a shared backbone.

``import vlalign`` stays light; :func:`load` imports the inference API (torch, the models) when called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vlalign.api import VisionLanguageModel

__all__ = ["load"]


def load(*args: Any, **kwargs: Any) -> VisionLanguageModel:
    """Load a trained model for inference: see :func:`vlalign.api.load` (a ``.ckpt``, an exported folder or a
    converted ALBEF / SIMLA ``.safetensors`` file; ``tokenizer=``, ``device=``, ``dtype=``, overrides)."""
    from vlalign.api import load as _load

    return _load(*args, **kwargs)
