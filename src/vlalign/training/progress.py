"""What the progress bar shows during training."""

from __future__ import annotations

import lightning as L


def losses_on_progress_bar(module: L.LightningModule) -> bool:
    """Whether a training step logs its losses with ``prog_bar=True``: on the CPU only.

    Lightning turns every value logged with ``prog_bar=True`` into a Python number at every training batch (its
    logger connector builds the bar's dict whether or not a bar is shown), which on an accelerator is a host sync
    per step: the host cannot queue the next step while the device computes. Off the CPU the losses still reach
    TensorBoard every ``log_every_n_steps`` (docs/benchmarks.md, "`fit` end to end")."""
    return module.device.type == "cpu"
