"""Pretraining objectives as plug-ins. Importing the package registers the built-in ones in their canonical order
(ITC, ITM, XMM, PSL), which breaks ties in the execution order (:func:`vlalign.objectives.base.execution_order`)."""

# isort: off
from vlalign.objectives import itc  # noqa: F401 - registration order matters
from vlalign.objectives import itm  # noqa: F401
from vlalign.objectives import xmm  # noqa: F401
from vlalign.objectives import psl  # noqa: F401

# isort: on
