"""vidpipe's exceptions survive pickling: worker processes (bench's decode pool, Ray) send them back to the caller."""

from __future__ import annotations

import pickle

import pytest

from pipeline.errors import ConfigError, MediaError, VidpipeError, WeightsNotFoundError


def test_media_error_round_trips_through_pickle():
    error = MediaError("/videos/a.mp4", "invalid_data", "not a readable media file")
    error.video_id = "a"  # an attribute set after construction travels too
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is MediaError
    assert (back.uri, back.error_kind, back.message) == ("/videos/a.mp4", "invalid_data", "not a readable media file")
    assert str(back) == str(error) == "/videos/a.mp4: not a readable media file"
    assert back.video_id == "a"


@pytest.mark.parametrize("cls", [VidpipeError, ConfigError, WeightsNotFoundError])
def test_one_message_errors_round_trip_through_pickle(cls):
    back = pickle.loads(pickle.dumps(cls("--model x: no such bundle")))
    assert type(back) is cls and str(back) == "--model x: no such bundle"
