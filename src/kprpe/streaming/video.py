"""Frames sampled from video files at a fixed rate, with PyAV (the ``kprpe[video]`` extra), in segments.

Sampling rule (the same whether a video is read whole or in segments, so workers can split it): time is cut
into bins of ``1 / fps`` seconds from the start of the stream, and the first decoded frame of each bin is
kept. Bins are grouped into segments of ``segment_frames`` bins; :func:`sample_frames` decodes one segment
after seeking to the keyframe before it, so a long video never has to be held or decoded twice.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ..errors import KprpeError

__all__ = [
    "VIDEO_EXTENSIONS",
    "VideoError",
    "VideoFrame",
    "SegmentEnd",
    "is_video_path",
    "sample_frames",
    "segment_count",
    "video_available",
]

VIDEO_EXTENSIONS = frozenset(
    {".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".wmv", ".flv", ".ts", ".3gp"}
)
_HINT = "install the optional extra: pip install 'kprpe[video]' (PyAV)"


class VideoError(KprpeError, ValueError):
    """A video that cannot be opened or decoded (or PyAV is missing); the message names the file."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):  # crosses process boundaries (worker -> main) intact
        return (type(self), (self.path, self.reason))


@dataclass
class VideoFrame:
    """One sampled frame: its number in the stream (from its timestamp), its time in seconds, RGB pixels."""

    number: int
    time: float
    image: np.ndarray


@dataclass
class SegmentEnd:
    """Filled in by :func:`sample_frames` when the generator finishes: ``end`` is True when the stream
    ended inside the segment (there is nothing after it); otherwise ``next_segment`` is the segment holding
    the next frame, so a gap in the timestamps (hours between two frames) is stepped over, not read segment
    by empty segment."""

    end: bool = False
    decoded: int = 0
    next_segment: int | None = None  # the segment of the first frame after this one (bins may be empty)


def _check_frame_size(path, width: int | None, height: int | None) -> None:
    """Frames obey ``KPRPE_MAX_PIXELS`` like photos, checked from the stream's header before any decoding
    (a 144-megapixel MJPEG frame would otherwise take a gigabyte to convert)."""
    from ..images import ImageLoadError, check_pixels

    if width and height:
        try:
            check_pixels(int(width), int(height), path)
        except ImageLoadError as exc:
            raise VideoError(path, f"video frames: {exc.reason}") from None


def is_video_path(path: str | os.PathLike) -> bool:
    return os.path.splitext(str(path))[1].lower() in VIDEO_EXTENSIONS


def video_available() -> bool:
    try:
        import av  # noqa: F401
    except ImportError:
        return False
    return True


def _import_av(path):
    try:
        import av
    except ImportError:
        raise VideoError(path, f"reading videos needs PyAV; {_HINT}") from None
    return av


def sample_frames(
    path: str | os.PathLike,
    *,
    fps: float,
    segment: int = 0,
    segment_frames: int = 16,
    status: SegmentEnd | None = None,
) -> Iterator[VideoFrame]:
    """Yield the frames of bins ``[segment * segment_frames, (segment + 1) * segment_frames)`` (see the
    module notes). ``status.end`` says afterwards whether the video ended within this segment.

    Raises :class:`VideoError` naming the file when it is not a readable video.
    """
    if not fps > 0 or not math.isfinite(fps):
        raise VideoError(path, f"the sampling rate must be a positive number of frames per second, got {fps}")
    if segment < 0 or segment_frames <= 0:
        raise VideoError(path, f"bad segment {segment} of {segment_frames} frames")
    av = _import_av(path)
    status = status if status is not None else SegmentEnd()
    first_bin = segment * segment_frames
    stop_bin = first_bin + segment_frames
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise VideoError(path, f"not a video PyAV can open ({exc})") from None
    with container:
        if not container.streams.video:
            raise VideoError(path, "the file has no video stream")
        stream = container.streams.video[0]
        time_base = stream.time_base
        if time_base is None:
            raise VideoError(path, "the video stream has no time base")
        _check_frame_size(path, stream.codec_context.width, stream.codec_context.height)
        origin = stream.start_time or 0
        rate = stream.average_rate or stream.guessed_rate
        start = first_bin / fps
        try:
            if start > 0:  # to the keyframe at or before the segment, then decode forward
                container.seek(origin + int(start / time_base), stream=stream, backward=True)
            last_bin = -1
            for frame in container.decode(stream):
                status.decoded += 1
                if frame.pts is None:
                    continue
                seconds = float((frame.pts - origin) * time_base)
                bin_index = math.floor(seconds * fps + 1e-6)
                if bin_index < first_bin or bin_index == last_bin:
                    continue
                if bin_index >= stop_bin:
                    status.end = False
                    status.next_segment = bin_index // segment_frames
                    return
                last_bin = bin_index
                _check_frame_size(path, frame.width, frame.height)  # the size may change mid-stream
                number = round(seconds * float(rate)) if rate else bin_index
                yield VideoFrame(number=int(number), time=seconds, image=frame.to_ndarray(format="rgb24"))
        except (av.FFmpegError, OSError, ValueError) as exc:
            raise VideoError(path, f"cannot decode frames after {start:.2f} s ({exc})") from None
    status.end = True


def segment_count(path: str | os.PathLike, *, fps: float, segment_frames: int) -> int | None:
    """How many segments the stream's header says the video has (its duration), or None when it does not
    say or the file cannot be opened. An estimate for splitting the work (kprpe.streaming.ray_data): the
    header may be wrong, so whoever reads the last segment must read on to the real end."""
    try:
        import av

        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            if stream.duration and stream.time_base:
                seconds = float(stream.duration * stream.time_base)
            elif container.duration:
                seconds = container.duration / av.time_base
            else:
                return None
    except Exception:  # no PyAV, no video stream, not a video: the actor that reads it says which
        return None
    if not (math.isfinite(seconds) and seconds > 0):
        return None
    return max(1, math.ceil(seconds * fps / segment_frames - 1e-6))
