"""The merged export: a plain Hugging Face model folder, the adapter folded into its base, in shards."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from qmor import hints
from qmor.export.merge import check_dtype, parse_size
from qmor.export.steps import Job, Written, check_merge, model_card, write_checked_merge
from qmor.model.base import TrainedAdapter


@dataclass
class Merged:
    """A plain Hugging Face model folder: the adapter merged into its base, in shards."""

    dtype: str = "fp16"
    merge_base: str = "dequantized"
    shard_size: str | int = "2GB"
    tolerance: float | None = None
    name: ClassVar[str] = "merged"

    def check(self, adapter: TrainedAdapter) -> None:
        check_merge(adapter.meta, self.merge_base, adapter.source)
        check_dtype(self.dtype)
        parse_size(self.shard_size)

    def check_checkpoint(self, folder: Path) -> None:
        """Every checkpoint that loads merges: nothing to refuse beyond what loading refuses."""

    def write(self, job: Job, out: Path) -> Written:
        dtype = check_dtype(self.dtype)
        index, check = write_checked_merge(job, out, dtype, parse_size(self.shard_size), self.merge_base,
                                           self.tolerance)
        card = model_card(job.meta, self.merge_base, dtype, check,
                          f"{job.output.name}: merged {job.meta.adapter.family} model")
        shards = sorted(set(index["weight_map"].values()))
        lines = [f"wrote {job.output} ({len(shards)} shard(s), {index['metadata']['total_size'] / 1e6:.1f} MB)",
                 hints.chat_merged(job.output)]
        return Written(card, lines, {"output": str(job.output), "shards": shards, "max_abs": check.max_abs,
                                     "top1": check.top1, "tolerance": check.tolerance})
