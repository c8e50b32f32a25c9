"""Data-quality counting: the bad samples the data workers skipped, logged per reason and summarised per epoch.

Workers skip and count bad samples (see docs/robustness.md); the counts travel with the next batch a worker produces
as ``batch["skipped"]`` (``{reason: count}``). This callback turns them into running totals ``data/skipped_<reason>``
(TensorBoard) and one line per epoch on rank zero, summed over ranks. The CLI always adds it.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import lightning as L
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info


class DataQualityMonitor(Callback):
    """Log ``data/skipped_<reason>`` running totals and an epoch summary of skipped samples."""

    def __init__(self) -> None:
        self.totals: Counter[str] = Counter()
        self._at_epoch_start: Counter[str] = Counter()

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        skipped = batch.get("skipped") if isinstance(batch, dict) else None
        if not skipped:
            return
        for reason, count in skipped.items():
            self.totals[reason] += int(count)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        for reason, count in self.totals.items():
            pl_module.log(f"data/skipped_{reason}", float(count), reduce_fx="sum", batch_size=1)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """One summary line per epoch on rank zero: the bad samples skipped this epoch, by reason, over all ranks."""
        epoch = self.totals - self._at_epoch_start
        self._at_epoch_start = Counter(self.totals)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list[dict[str, int] | None] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, dict(epoch))
            epoch = Counter()
            for counts in gathered:
                epoch.update(counts or {})
        if epoch:
            reasons = ", ".join(
                f"{reason}={count}" for reason, count in sorted(epoch.items(), key=lambda x: (-x[1], x[0]))
            )
            rank_zero_info(f"epoch {trainer.current_epoch}: skipped {sum(epoch.values())} bad samples ({reasons})")
        else:
            rank_zero_info(f"epoch {trainer.current_epoch}: skipped no bad samples")

    def state_dict(self) -> dict[str, Any]:
        return {"totals": dict(self.totals)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.totals = Counter(state_dict.get("totals", {}))
        self._at_epoch_start = Counter(self.totals)
