"""Per-stage accounting summed on the driver from the metric columns that stages write on each row."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from workers.rows import STAGE_NAMES


@dataclass
class StageMeter:
    """Busy seconds and peak RSS per stage, and the segments they cover."""

    busy_s: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGE_NAMES, 0.0))
    peak_rss_mb: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGE_NAMES, 0.0))
    segments: int = 0
    chunks: int = 0
    bf16_emulated_chunks: int = 0  # chunks an encoder ran in bf16 on a CPU without native bf16

    def add(self, row: dict[str, Any]) -> None:
        for s in STAGE_NAMES:
            self.busy_s[s] += float(row.get(f"busy_{s}_s", 0.0) or 0.0)
            self.peak_rss_mb[s] = max(self.peak_rss_mb[s], float(row.get(f"rss_{s}_mb", 0.0) or 0.0))
        if not row.get("error_kind"):
            self.segments += int(row["core_end"]) - int(row["core_start"])
            self.chunks += 1
            self.bf16_emulated_chunks += float(row.get("bf16_emulated", 0.0) or 0.0) > 0

    def to_dict(self) -> dict[str, Any]:
        return {"busy_s": dict(self.busy_s), "peak_rss_mb": dict(self.peak_rss_mb), "segments": self.segments,
                "chunks": self.chunks, "bf16_emulated_chunks": self.bf16_emulated_chunks}
