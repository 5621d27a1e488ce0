"""Exception types.  A bad *file* is data (it becomes a ``failures`` row); bad *configuration* raises."""

from __future__ import annotations


class VidpipeError(Exception):
    """Base of vidpipe's own errors."""


class ConfigError(VidpipeError, ValueError):
    """A setting, flag or file given by the user is invalid; the message says which and what to do."""


class WeightsNotFoundError(ConfigError):
    """Model weights that were asked for are not on this machine."""


class MediaError(VidpipeError):
    """One input video could not be read or decoded.

    ``error_kind`` is a short stable token for the ``failures`` table (``not_found``, ``unreadable``,
    ``invalid_data``, ``no_video_stream``, ``no_frames``, ``decode_error``).
    """

    def __init__(self, uri: str, error_kind: str, message: str) -> None:
        super().__init__(f"{uri}: {message}")
        self.uri = uri
        self.error_kind = error_kind
        self.message = message

    def __reduce__(self) -> tuple[type[MediaError], tuple[str, str, str], dict[str, object]]:
        # Exception pickles as ``cls(*self.args)``, and ``args`` holds only the formatted text: without
        # this, a MediaError raised in a worker process cannot be rebuilt in the parent.
        return type(self), (self.uri, self.error_kind, self.message), self.__dict__
