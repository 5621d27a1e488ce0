"""Fusion + BiLSTM head: per-segment image and audio features of a chunk → per-segment label probabilities.

The head labels *windows* of ``W = spec.window_segments`` segments aligned to absolute segment indices:
window ``k`` labels the core segments ``[k*W, (k+1)*W)`` and is computed from the input span
``[k*W - X, (k+1)*W + X)`` (``X = spec.context_segments``), clipped only at the video's start and end.
A window's result therefore depends on the video and the bundle, never on how the video was cut into
chunks; ``window_plan`` states and checks the contract between chunk and head.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import dataclass
from typing import Literal, get_args, overload

import numpy as np
import torch
from torch import Tensor, nn

from pipeline.errors import ConfigError
from pipeline.specs import HeadSpec

HeadTask = Literal["multiclass", "multilabel"]
HeadPrecision = Literal["bf16", "fp32"]
HEAD_PRECISIONS: tuple[str, ...] = get_args(HeadPrecision)
HEAD_TASKS: tuple[str, ...] = get_args(HeadTask)
# ``multilabel``: an independent sigmoid per label; bundles record it in ``HeadSpec.task``.

# Windows of equal input length are run as one LSTM batch of at most this many windows.
MAX_BATCH_WINDOWS = 256


def _projection(in_dim: int, out_dim: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.ReLU(), nn.Dropout(dropout))


class FusionHead(nn.Module):
    """Fuse image and audio features per segment, run a 1-layer BiLSTM over segments, classify each.

    Fusion kinds (``spec.fusion``):

    - ``concat``: each modality → ``proj_dim`` (Linear + ReLU + dropout), concatenated.
    - ``weighted``: each modality → ``proj_dim``, summed with learned modality weights
      (softmax over two learnable logits, initialised equal; see ``modality_weights``).
    - ``attention``: audio-guided visual attention of Tian et al. 2018 (AVE): the audio feature
      queries the ``R`` spatial regions of ``grid`` with additive attention
      ``w = softmax_r(u^T tanh(W_v v_r + W_a a))``; the attended visual vector ``sum_r w_r v_r`` is
      projected and concatenated with the projected audio.  Without a grid the pooled image vector
      is the single region (``R = 1``, weight 1), which reduces to ``concat`` with its own weights.
    """

    def __init__(self, spec: HeadSpec) -> None:
        super().__init__()
        self.spec = spec
        p = spec.proj_dim
        self.image_proj = _projection(spec.image_dim, p, spec.dropout)
        self.audio_proj = _projection(spec.audio_dim, p, spec.dropout)
        fused_dim = 2 * p
        if spec.fusion == "weighted":
            # Equal logits → equal weights at init; softmax keeps the weights positive and summing to 1.
            self.modality_logits = nn.Parameter(torch.zeros(2))
            fused_dim = p
        elif spec.fusion == "attention":
            self.att_visual = nn.Linear(spec.image_dim, p)  # W_v
            self.att_audio = nn.Linear(spec.audio_dim, p, bias=False)  # W_a (one bias is enough)
            self.att_score = nn.Linear(p, 1, bias=False)  # u
        self.lstm = nn.LSTM(fused_dim, spec.lstm_hidden, num_layers=1, batch_first=True, bidirectional=True)
        self.dropout = nn.Dropout(spec.dropout)
        self.classifier = nn.Linear(2 * spec.lstm_hidden, spec.n_labels)

    @property
    def embedding_dim(self) -> int:
        return 2 * self.spec.lstm_hidden

    def modality_weights(self) -> Tensor:
        """The ``[image, audio]`` weights of ``weighted`` fusion (softmax of the learned logits)."""
        if self.spec.fusion != "weighted":
            raise ValueError(f"modality_weights exist for fusion 'weighted' only, this head is {self.spec.fusion!r}")
        return torch.softmax(self.modality_logits, dim=0)

    def region_weights(self, audio: Tensor, grid: Tensor) -> Tensor:
        """Attention weights ``[B, T, R]`` of the audio query over the visual regions (sum to 1 over R)."""
        if self.spec.fusion != "attention":
            raise ValueError(f"region_weights exist for fusion 'attention' only, this head is {self.spec.fusion!r}")
        # [B,T,R,p] + [B,T,1,p] → score per region
        hidden = torch.tanh(self.att_visual(grid) + self.att_audio(audio).unsqueeze(2))
        return torch.softmax(self.att_score(hidden).squeeze(-1), dim=-1)

    def fuse(self, image: Tensor, audio: Tensor, grid: Tensor | None = None) -> Tensor:
        """Per-segment fused features ``[B, T, fused_dim]`` (the LSTM's input)."""
        self._check_inputs(image, audio, grid)
        a = self.audio_proj(audio)
        fusion = self.spec.fusion
        if fusion == "concat":
            return torch.cat([self.image_proj(image), a], dim=-1)
        if fusion == "weighted":
            w = self.modality_weights()
            return w[0] * self.image_proj(image) + w[1] * a
        regions = image.unsqueeze(2) if grid is None else grid
        weights = self.region_weights(audio, regions)
        attended = (weights.unsqueeze(-1) * regions).sum(dim=2)
        return torch.cat([self.image_proj(attended), a], dim=-1)

    @overload
    def forward(self, image: Tensor, audio: Tensor, grid: Tensor | None = ...,
                *, return_embedding: Literal[False] = ...) -> Tensor: ...

    @overload
    def forward(self, image: Tensor, audio: Tensor, grid: Tensor | None = ...,
                *, return_embedding: Literal[True]) -> tuple[Tensor, Tensor]: ...

    def forward(
        self, image: Tensor, audio: Tensor, grid: Tensor | None = None, *, return_embedding: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Logits ``[B, T, n_labels]``; with ``return_embedding`` also the BiLSTM output ``[B, T, 2*lstm_hidden]``.

        Args:
            image: ``[B, T, image_dim]`` pooled image features.
            audio: ``[B, T, audio_dim]``.
            grid: ``[B, T, R, image_dim]`` regional image features; used by ``attention`` only.
        """
        fused = self.fuse(image, audio, grid)
        embedding, _ = self.lstm(fused)
        logits = self.classifier(self.dropout(embedding))
        if return_embedding:
            return logits, embedding
        return logits

    def _check_inputs(self, image: Tensor, audio: Tensor, grid: Tensor | None) -> None:
        s = self.spec
        if image.ndim != 3 or image.shape[-1] != s.image_dim:
            raise ValueError(f"image must be [B, T, {s.image_dim}], got {tuple(image.shape)}")
        if audio.ndim != 3 or audio.shape[-1] != s.audio_dim or audio.shape[:2] != image.shape[:2]:
            raise ValueError(f"audio must be [{image.shape[0]}, {image.shape[1]}, {s.audio_dim}], got {tuple(audio.shape)}")
        if grid is not None and s.fusion == "attention":
            if grid.ndim != 4 or grid.shape[:2] != image.shape[:2] or grid.shape[-1] != s.image_dim or grid.shape[2] < 1:
                raise ValueError(
                    f"grid must be [{image.shape[0]}, {image.shape[1]}, R>=1, {s.image_dim}], got {tuple(grid.shape)}"
                )


def build_head(spec: HeadSpec, state_dict: dict[str, Tensor] | None = None) -> FusionHead:
    """A FusionHead initialised from ``spec.seed`` (global RNG untouched), then loaded strictly from ``state_dict``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        head = FusionHead(spec)
    if state_dict is not None:
        head.load_state_dict(state_dict, strict=True)
    return head


def probabilities(logits: Tensor, task: HeadTask = "multiclass") -> Tensor:
    """Per-segment label probabilities from logits (``multiclass``: softmax over labels; ``multilabel``: sigmoid)."""
    if task == "multiclass":
        return torch.softmax(logits.float(), dim=-1)
    if task == "multilabel":
        return torch.sigmoid(logits.float())
    raise ConfigError(f"unknown head task {task!r}; choose one of: {', '.join(HEAD_TASKS)}")


@dataclass(frozen=True)
class Window:
    """One head window, absolute segment indices: labels ``[out_lo, out_hi)`` from input ``[in_lo, in_hi)``."""

    in_lo: int
    in_hi: int
    out_lo: int
    out_hi: int

    @property
    def in_len(self) -> int:
        return self.in_hi - self.in_lo


def window_plan(
    first_segment: int,
    n_segments: int,
    core_start: int,
    core_end: int,
    spec: HeadSpec,
    *,
    video_n_segments: int | None = None,
) -> list[Window]:
    """The windows that label exactly the core ``[core_start, core_end)`` of a chunk; raises ValueError if it cannot.

    The chunk holds segments ``[first_segment, first_segment + n_segments)``.  Contract, with
    ``W = spec.window_segments`` and ``X = spec.context_segments``:

    - ``core_start`` is a multiple of ``W``; ``core_end`` is a multiple of ``W`` or the video's end
      (the video's last window may be short).  An empty core gives no windows and no checks.
    - Window ``k`` labels ``[k*W, min((k+1)*W, core_end))`` from ``[max(0, k*W - X), min((k+1)*W + X, end))``
      where ``end`` is the video's end.  That span must lie inside the chunk: context missing on the
      left (the video always starts at segment 0) raises.
    - Right edge: with ``video_n_segments`` known (``HeadRunner.label`` passes it for the last chunk) the
      right context is checked the same way.  When it is None, the chunk's end may be the video's end
      (the decoder clips context there even on a chunk that is not the last, whose successor then holds
      only the video's tail), so a chunk end closer than ``X`` after a window is taken to be the video's
      end.  A chunking whose context is short of ``X`` is still caught: the video's next chunk then lacks
      left context and raises.
    """
    W, X = spec.window_segments, spec.context_segments
    chunk_end = first_segment + n_segments
    if first_segment < 0 or n_segments < 0:
        raise ValueError(f"invalid chunk: first_segment={first_segment}, n_segments={n_segments}")
    if not first_segment <= core_start <= core_end <= chunk_end:
        raise ValueError(f"core [{core_start}, {core_end}) is not inside the chunk [{first_segment}, {chunk_end})")
    if video_n_segments is not None and chunk_end > video_n_segments:
        raise ValueError(f"chunk [{first_segment}, {chunk_end}) runs past the video's end ({video_n_segments} segments)")
    if core_start == core_end:
        return []
    if core_start % W:
        raise ValueError(
            f"core_start {core_start} is not a multiple of the head window ({W} segments): "
            f"chunk cores must be multiples of window_segments"
        )
    video_end = chunk_end if video_n_segments is None else video_n_segments
    if core_end % W and core_end != video_end:
        raise ValueError(
            f"core_end {core_end} is neither a multiple of the head window ({W} segments) nor the video's end "
            f"({'unknown, the chunk ends at ' + str(chunk_end) if video_n_segments is None else video_n_segments})"
        )
    windows: list[Window] = []
    for k in range(core_start // W, -(-core_end // W)):
        out_lo, out_hi = k * W, min((k + 1) * W, core_end)
        in_lo, in_hi = max(0, out_lo - X), min((k + 1) * W + X, video_end)
        if in_lo < first_segment:
            raise ValueError(
                f"missing left context: window [{out_lo}, {out_hi}) needs segments from {in_lo}, "
                f"the chunk starts at {first_segment}; chunks must carry >= {X} context segments (head context_segments)"
            )
        if in_hi > chunk_end:
            raise ValueError(
                f"missing right context: window [{out_lo}, {out_hi}) needs segments up to {in_hi}, "
                f"the chunk ends at {chunk_end} and the video at {video_end}; chunks must carry >= {X} context segments"
            )
        windows.append(Window(in_lo, in_hi, out_lo, out_hi))
    return windows


@dataclass
class ChunkLabels:
    """The head's results for the core segments of one chunk, in segment order."""

    probs: np.ndarray  # float32 [n_core, n_labels]
    embedding: np.ndarray | None = None  # float32 [n_core, 2*lstm_hidden]

    def __post_init__(self) -> None:
        if self.probs.ndim != 2 or self.probs.dtype != np.float32:
            raise ValueError(f"ChunkLabels.probs must be float32 [n, n_labels], got {self.probs.dtype} {self.probs.shape}")
        if self.embedding is not None and (
            self.embedding.ndim != 2 or self.embedding.dtype != np.float32 or len(self.embedding) != len(self.probs)
        ):
            raise ValueError(
                f"ChunkLabels.embedding must be float32 [{len(self.probs)}, d], got "
                f"{self.embedding.dtype} {self.embedding.shape}"
            )

    @property
    def n_segments(self) -> int:
        return len(self.probs)

    def __repr__(self) -> str:
        emb = None if self.embedding is None else tuple(self.embedding.shape)
        return f"ChunkLabels(probs={tuple(self.probs.shape)}, embedding={emb})"


class HeadRunner:
    """Runs a FusionHead over chunks, window by window, so labels do not depend on chunk borders.

    The constructor only keeps configuration (cheap, picklable); ``setup`` builds the model on its device.
    ``state_dict`` None gives the seeded random head of ``spec.seed``.  On CPU the head runs in float32.
    On CUDA ``precision="bf16"`` runs it under bf16 autocast; windows batched differently (another
    chunking) then differ by up to ~1e-3 in probability, so a near-tie can change a label.
    ``precision="fp32"`` runs float32 with cuDNN's TF32 off, for chunk invariance to float rounding.
    """

    def __init__(
        self,
        spec: HeadSpec,
        state_dict: dict[str, Tensor] | None,
        *,
        device: str = "cpu",
        threads: int | None = None,
        task: HeadTask | None = None,
        precision: HeadPrecision = "bf16",
    ) -> None:
        if precision not in HEAD_PRECISIONS:
            raise ConfigError(f"unknown head precision {precision!r}; choose one of: {', '.join(HEAD_PRECISIONS)}")
        task = task or spec.task  # None: the task the head was trained for
        if task not in HEAD_TASKS:
            raise ConfigError(f"unknown head task {task!r}; choose one of: {', '.join(HEAD_TASKS)}")
        if task != spec.task:
            raise ConfigError(f"head task {task!r} differs from the task {spec.task!r} the head was built for "
                              f"(HeadSpec.task); its logits mean nothing under another task")
        if threads is not None and threads < 1:
            raise ConfigError(f"threads must be >= 1, got {threads}")
        self.spec = spec
        self.state_dict = state_dict
        self.device = device
        self.threads = threads
        self.task: HeadTask = task
        self.precision: HeadPrecision = precision
        self._model: FusionHead | None = None
        self._device: torch.device | None = None

    def __repr__(self) -> str:
        state = "seeded" if self.state_dict is None else f"{len(self.state_dict)} tensors"
        return f"HeadRunner(fusion={self.spec.fusion!r}, device={self.device!r}, state={state}, ready={self._model is not None})"

    def setup(self) -> None:
        """Build the head on its device (in the worker)."""
        if self._model is not None:
            return
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        device = torch.device(self.device)
        model = build_head(self.spec, self.state_dict).to(device=device, dtype=torch.float32)
        model.eval()
        self._model, self._device = model, device

    def label(
        self,
        image: np.ndarray,
        audio: np.ndarray,
        grid: np.ndarray | None,
        *,
        first_segment: int,
        core_start: int,
        core_end: int,
        is_last: bool,
        return_embedding: bool = False,
        video_n_segments: int | None = None,
    ) -> ChunkLabels:
        """Label the core segments of one chunk.

        Args:
            image: float32 ``[n, image_dim]``, the chunk's segments ``first_segment ..``.
            audio: float32 ``[n, audio_dim]``.
            grid: float32 ``[n, R, image_dim]`` regions for ``attention`` fusion (ignored by the others).
            is_last: the chunk ends at the video's end (then the right edge is checked strictly).
            video_n_segments: the video's length when known; see ``window_plan``.
        """
        self.setup()
        model, device = self._model, self._device
        if model is None or device is None:
            raise RuntimeError("HeadRunner.setup did not build the model")
        s = self.spec
        n = self._check_arrays(image, audio, grid)
        if is_last:
            if video_n_segments is not None and video_n_segments != first_segment + n:
                raise ValueError(
                    f"is_last chunk ends at {first_segment + n} but video_n_segments is {video_n_segments}"
                )
            video_n_segments = first_segment + n
        windows = window_plan(first_segment, n, core_start, core_end, s, video_n_segments=video_n_segments)
        n_core = core_end - core_start
        probs = np.zeros((n_core, s.n_labels), np.float32)
        embedding = np.zeros((n_core, model.embedding_dim), np.float32) if return_embedding else None
        use_grid = grid is not None and s.fusion == "attention"

        image_t = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
        audio_t = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))
        grid_t = torch.from_numpy(np.ascontiguousarray(grid, dtype=np.float32)) if use_grid and grid is not None else None

        by_len: dict[int, list[Window]] = defaultdict(list)
        for w in windows:
            by_len[w.in_len].append(w)
        with torch.inference_mode(), self._numerics(device):
            for length in sorted(by_len):
                group = by_len[length]
                for b in range(0, len(group), MAX_BATCH_WINDOWS):
                    batch = group[b : b + MAX_BATCH_WINDOWS]
                    spans = [slice(w.in_lo - first_segment, w.in_hi - first_segment) for w in batch]
                    img = torch.stack([image_t[sl] for sl in spans]).to(device, non_blocking=True)
                    aud = torch.stack([audio_t[sl] for sl in spans]).to(device, non_blocking=True)
                    grd = None if grid_t is None else torch.stack([grid_t[sl] for sl in spans]).to(device, non_blocking=True)
                    logits, emb = model(img, aud, grd, return_embedding=True)
                    p = probabilities(logits, self.task).cpu().numpy()
                    e = emb.float().cpu().numpy() if embedding is not None else None
                    for i, w in enumerate(batch):
                        src = slice(w.out_lo - w.in_lo, w.out_hi - w.in_lo)
                        dst = slice(w.out_lo - core_start, w.out_hi - core_start)
                        probs[dst] = p[i, src]
                        if embedding is not None and e is not None:
                            embedding[dst] = e[i, src]
        return ChunkLabels(probs=probs, embedding=embedding)

    def _numerics(self, device: torch.device) -> contextlib.AbstractContextManager[object]:
        if device.type != "cuda":
            return contextlib.nullcontext()
        if self.precision == "bf16":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        # A context, not the global flag: the encoders may share this process and want TF32.
        return torch.backends.cudnn.flags(enabled=True, allow_tf32=False)

    def _check_arrays(self, image: np.ndarray, audio: np.ndarray, grid: np.ndarray | None) -> int:
        s = self.spec
        if image.ndim != 2 or audio.ndim != 2 or len(audio) != len(image):
            raise ValueError(f"image and audio must be [n, dim] with equal n, got {image.shape} and {audio.shape}")
        if image.shape[1] != s.image_dim:
            raise ConfigError(
                f"the head expects image features of dim {s.image_dim}, got {image.shape[1]}: "
                f"the model bundle and the image encoder disagree"
            )
        if audio.shape[1] != s.audio_dim:
            raise ConfigError(
                f"the head expects audio features of dim {s.audio_dim}, got {audio.shape[1]}: "
                f"the model bundle and the audio encoder disagree"
            )
        if grid is not None and s.fusion == "attention":
            if grid.ndim != 3 or len(grid) != len(image) or grid.shape[2] != s.image_dim or grid.shape[1] < 1:
                raise ValueError(f"grid must be [{len(image)}, R>=1, {s.image_dim}], got {grid.shape}")
        return len(image)


def topk(probs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` labels per row: indices int32 ``[n, k]`` and scores float32 ``[n, k]``.

    Sorted by score descending, ties broken by the lower label index; ``k`` is capped at the number of labels.
    """
    if probs.ndim != 2:
        raise ValueError(f"probs must be [n, n_labels], got shape {probs.shape}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    k = min(k, probs.shape[1])
    scores = np.asarray(probs, dtype=np.float32)
    # A stable sort of the negated scores keeps equal scores in index order.
    idx = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return idx.astype(np.int32), np.take_along_axis(scores, idx, axis=1)
