"""HeadStage: image + audio embeddings of a chunk → per-segment label probabilities (top-k)."""

from __future__ import annotations

import numpy as np

from pipeline.bundle import ModelBundle
from pipeline.head import HeadRunner, topk
from workers.rows import Row
from workers.stage import Stage


class HeadStage(Stage):
    """Run the fusion + BiLSTM head over each chunk and keep its core segments' results."""

    name = "head"

    def __init__(self, bundle: ModelBundle, *, device: str = "cpu", threads: int | None = None,
                 top_k: int = 5, with_embedding: bool = False) -> None:
        self.head_spec = bundle.head
        self.head_state = bundle.head_state()
        self.device = device
        self.threads = threads
        self.top_k = max(1, min(top_k, bundle.head.n_labels))
        self.with_embedding = with_embedding
        # multilabel heads also say which labels are active (probability >= the label's tuned threshold)
        self.thresholds = (np.asarray(bundle.head.label_thresholds(), np.float32)
                           if bundle.head.task == "multilabel" else None)
        self._runner: HeadRunner | None = None

    def setup(self) -> None:
        # fp32 even on CUDA: the head is tiny and bf16 would let chunk borders move near-tied labels
        self._runner = HeadRunner(self.head_spec, self.head_state, device=self.device, threads=self.threads,
                                  precision="fp32")
        self._runner.setup()

    def empty_outputs(self) -> Row:
        out: Row = {
            "segment_index": np.zeros(0, np.int32),
            "start_s": np.zeros(0, np.float64),
            "end_s": np.zeros(0, np.float64),
            "topk_idx": np.zeros((0, self.top_k), np.int32),
            "topk_scores": np.zeros((0, self.top_k), np.float32),
        }
        if self.with_embedding:
            out["embedding"] = np.zeros((0, 2 * self.head_spec.lstm_hidden), np.float32)
        if self.thresholds is not None:
            out["active_mask"] = np.zeros((0, self.head_spec.n_labels), np.bool_)
        return out

    def process_row(self, row: Row) -> Row:
        if self._runner is None:
            self.setup()
        runner = self._runner
        if runner is None:
            raise RuntimeError("head did not set up")
        grid = row.get("image_grid")
        first, core_start, core_end = int(row["first_segment"]), int(row["core_start"]), int(row["core_end"])
        result = runner.label(np.asarray(row["image_emb"], np.float32), np.asarray(row["audio_emb"], np.float32),
                              None if grid is None else np.asarray(grid, np.float32),
                              first_segment=first, core_start=core_start, core_end=core_end,
                              is_last=bool(row["is_last"]), return_embedding=self.with_embedding)
        idx, scores = topk(result.probs, self.top_k)
        core = slice(core_start - first, core_end - first)
        out: Row = {
            "segment_index": np.arange(core_start, core_end, dtype=np.int32),
            "start_s": np.asarray(row["start_s"], np.float64)[core],
            "end_s": np.asarray(row["end_s"], np.float64)[core],
            "topk_idx": idx.astype(np.int32),
            "topk_scores": scores.astype(np.float32),
        }
        if self.with_embedding:
            if result.embedding is None:
                raise RuntimeError("head returned no embedding though one was asked for")
            out["embedding"] = result.embedding.astype(np.float32)
        if self.thresholds is not None:
            out["active_mask"] = result.probs >= self.thresholds[None, :]
        return out
