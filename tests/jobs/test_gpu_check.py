"""The GPU check's in-process pipeline, run on CPU: every chunk of every copy reaches the models once."""

from __future__ import annotations

import pytest

import jobs.gpu_check as gpu_check
from jobs.models import resolve_bundle
from tests.conftest import SAMPLES

pytestmark = pytest.mark.slow


def test_inprocess_pipeline_streams_every_chunk(monkeypatch):
    monkeypatch.setattr(gpu_check, "DEVICE", "cpu")
    bundle = resolve_bundle(None, allow_untrained=False)
    r = gpu_check.pipeline_inprocess(str(SAMPLES / "bbb_5s_51.mp4"), bundle, processes=2, copies=3)
    assert r["segments"] == 3 * 6  # 5.28 s in 1 s segments, the short last one included
    assert r["video_s_per_s"] == pytest.approx(3 * 5.28 / r["wall_s"], rel=0.02)
    assert 0 < r["gpu_model_busy_fraction"] <= 1.0


def test_inprocess_pipeline_reports_a_decoder_that_fails(monkeypatch, tmp_path):
    monkeypatch.setattr(gpu_check, "DEVICE", "cpu")
    bundle = resolve_bundle(None, allow_untrained=False)
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video")
    with pytest.raises(RuntimeError, match="decode worker failed"):
        gpu_check.pipeline_inprocess(str(broken), bundle, processes=2, copies=2)
