"""Video input as sampled frames (the released Kimi-VL processor has no video path).

A video enters the chat as its sampled frames, each an ordinary image preceded by its timestamp as text::

    00:00.0<|media_start|>image<|media_content|><|media_pad|><|media_end|>00:01.0<|media_start|>image...

Timestamps are ``MM:SS.d`` (minutes, seconds, tenths), with an ``H:`` prefix from one hour on (``1:02:03.5``); they must
be finite, non-negative and under ``MAX_TIMESTAMP`` (a hundred hours). Each kept frame is resized as it is decoded
(FFmpeg's bicubic scaler) to the size the image processor gives the whole frame, and marked with the whole frame's
size (``image.mark_source_size``) so that the processor leaves it as it is: a video of huge frames holds small ones in
memory, and a frame gets the grid and tokens of the whole frame given as an image, and nearly its pixels. Frames over
``max_frame_pixels`` (the image processor's pixel cap) are refused from the container's header, before any is decoded,
where it gives their size; the decoder refuses a larger frame than that from the frame's own header, before allocating
it. Frames are turned upright as the file's display rotation asks. ``frames_to_parts`` builds these content parts;
``apply_chat_template`` does it for ``{"type": "video"}`` parts.

Every video is opened by ``open_video``: only the containers in ``CONTAINERS``, and FFmpeg opens no file, socket or
URL itself.
"""

from __future__ import annotations

import contextlib
import io
import math
import numbers
import os
from typing import Any, BinaryIO

import numpy as np
from PIL import Image

from kimivl.processing.data_url import data_url_bytes, is_inline_data
from kimivl.processing.image import MAX_PIXELS, ImageError, ImageProcessor, mark_source_size, short_name

DEFAULT_FPS = 1.0
DEFAULT_MAX_FRAMES = 64
MAX_TIMESTAMP = 360_000.0  # seconds

# FFmpeg's demuxers for the video containers read here, by their names, and what a message calls them. FFmpeg picks a
# demuxer from the bytes, whatever the file's name or the data URL's type says: others (an ffconcat or HLS playlist,
# which opens the files it names; an SDP session, which listens on the ports it names; a text file drawn as a picture;
# an image sequence) are refused before they read anything. MPEG-PS (.mpg, .vob) is not among them: its streams' frame
# delays are learned only by decoding while opening, which is not done here (an MPEG-1 one's first frame came out
# late), so it is refused too (`ffmpeg -i in.mpg -c copy out.ts` remuxes it unchanged).
CONTAINERS = {
    "mov,mp4,m4a,3gp,3g2,mj2": "MP4/MOV",
    "matroska,webm": "Matroska/WebM",
    "avi": "AVI",
    "flv": "FLV",
    "nut": "NUT",
    "mpegts": "MPEG-TS",
    "asf": "ASF/WMV",
    "ogg": "Ogg",
    "gif": "GIF",
    "m4v": "raw MPEG-4",
    "h264": "raw H.264",
    "hevc": "raw HEVC",
    "mpegvideo": "raw MPEG-1/2",
    "ivf": "IVF",
    "mxf": "MXF",
    "mjpeg": "raw MJPEG",
    "yuv4mpegpipe": "Y4M",
    "dv": "DV",
    "apng": "APNG",
}


class VideoError(ValueError):
    """A video that cannot be opened or decoded."""


def format_timestamp(seconds: float) -> str:
    tenths = round(seconds * 10)
    h, rest = divmod(tenths, 36000)
    m, rest = divmod(rest, 600)
    s = f"{m:02d}:{rest // 10:02d}.{rest % 10}"
    return f"{h}:{s}" if h else s


def _is_real(value: Any) -> bool:
    """A real number, numpy's included; not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def frames_to_parts(frames: list, timestamps: Any = None) -> list[dict]:
    """Content parts for a video: timestamp text then the frame image, per frame. ``timestamps`` (seconds) is a list
    or tuple of numbers (numpy's too), an array of them (a numpy array or a tensor: anything with ``tolist``), or
    None for one frame a second."""
    if timestamps is None and isinstance(frames, (list, tuple)):
        timestamps = [float(i) for i in range(len(frames))]
    if not isinstance(timestamps, (list, tuple)) and hasattr(timestamps, "tolist"):
        timestamps = timestamps.tolist()
    if not isinstance(frames, (list, tuple)) or not isinstance(timestamps, (list, tuple)):
        raise VideoError(
            f"video frames must be a list and timestamps a list or an array, got {type(frames).__name__} and "
            f"{type(timestamps).__name__}"
        )
    if not frames:
        raise VideoError("a video part holds no frames: give at least one")
    if len(frames) != len(timestamps):
        raise VideoError(f"{len(frames)} frames but {len(timestamps)} timestamps")
    for i, t in enumerate(timestamps):
        if not _is_real(t) or not 0 <= t < MAX_TIMESTAMP:  # compared as it is: a huge int is out of range, NaN too
            raise VideoError(
                f"video frame {i} has timestamp {t!r}: timestamps must be finite numbers of seconds >= 0 and under "
                f"{MAX_TIMESTAMP:.0f}"
            )
    parts: list[dict] = []
    for frame, t in zip(frames, timestamps):
        parts += [{"type": "text", "text": format_timestamp(float(t))}, {"type": "image", "image": frame}]
    return parts


def _describe(source: Any) -> str:
    if isinstance(source, (str, os.PathLike)):
        return short_name(source)
    if isinstance(source, (bytes, bytearray)):
        return f"<{len(source)} bytes>"
    return f"<{type(source).__name__}>"


def _sample_times(duration: float, fps: float, max_frames: int) -> list[float]:
    """Sampling times: every 1/fps seconds over the duration, thinned uniformly to max_frames."""
    n = max(1, math.ceil(duration * fps - 1e-6))
    idx = range(n) if n <= max_frames else np.round(np.linspace(0, n - 1, max_frames)).astype(int)
    return [int(k) / fps for k in idx]


def _sample_time(plan: list[float] | None, fps: float, k: int) -> float | None:
    """The time of sample k: from the plan, or every 1/fps seconds without end when there is none (no duration)."""
    if plan is None:
        return k / fps
    return plan[k] if k < len(plan) else None


def _next_sample(plan: list[float] | None, fps: float, k: int, t: float) -> int:
    """The first sample after k that is not before time t: the ones between would show the frame already taken."""
    if plan is None:  # jump there at once, however far above the frame rate fps is
        k = max(k + 1, math.floor((t - 1e-6) * fps) - 1)
    else:
        k += 1
    while (target := _sample_time(plan, fps, k)) is not None and t > target + 1e-6:
        k += 1
    return k


def _duration(container, stream, start: float) -> float | None:
    """The stream's length in seconds from its header, or None (sample to the end) when unknown or unusable.

    A container's duration (the fallback when the stream declares none) means the end time for some formats
    (Matroska, WebM, NUT) and the length for others (FLV). For a stream that starts late the two readings differ, so
    it is used only where it cannot be the end time: when the stream starts at 0, or after it. Zero is no length: a
    one-frame NUT file declares it.
    """
    import av

    if stream.duration is not None and stream.time_base is not None:
        duration = float(stream.duration * stream.time_base)
    elif container.duration is not None and not 0 < start < container.duration / av.time_base:
        duration = container.duration / av.time_base
    else:
        return None
    return duration if math.isfinite(duration) and duration > 0 else None  # else a damaged header


def _positive(value: Any, name: str, kind: type) -> float | int:
    """``value`` as a Python ``kind`` (float or int) once checked to be a finite number (numpy's too) above 0."""
    number = None
    if _is_real(value) and (kind is float or isinstance(value, numbers.Integral)):
        with contextlib.suppress(OverflowError):  # an integer too large for a float
            number = kind(value)
    if number is None or not ((kind is int or math.isfinite(number)) and number > 0):
        raise VideoError(f"need {name} > 0 (a finite {'number' if kind is float else 'integer'}), got {value!r}")
    return number


def _quarters(rotation: float) -> int:
    """Quarter turns counter-clockwise for a display matrix's ``rotation`` (degrees, as PyAV gives it)."""
    return round(rotation / 90) % 4


def _upright(image: Image.Image, rotation: float) -> Image.Image:
    """``image`` turned as the file's display matrix asks, to the nearest quarter turn: a phone's portrait video
    comes out portrait."""
    quarter = _quarters(rotation)
    turns = {1: Image.Transpose.ROTATE_90, 2: Image.Transpose.ROTATE_180, 3: Image.Transpose.ROTATE_270}
    return image.transpose(turns[quarter]) if quarter else image


def _decoder_pixels(max_frame_pixels: int) -> int:
    """The decoders' frame cap (FFmpeg's ``max_pixels``) for ``max_frame_pixels``, above it so that a frame at the limit
    still decodes (and is then checked exactly): FFmpeg counts a frame's rows padded, to 64 pixels with AVX-512, and
    MPEG-4 Part 2 allocates at least 280 rows. A quarter more and 2^20 pixels cover a frame at least 256 wide and 280
    high, and a smaller one up to about 16,000 rows high."""
    return min(max_frame_pixels + max_frame_pixels // 4 + (1 << 20), (1 << 31) - 1)


@contextlib.contextmanager
def open_video(source: str | os.PathLike | bytes | BinaryIO, name: str, max_frame_pixels: int = MAX_PIXELS):
    """``source`` (a path, a ``data:`` URL, bytes or a binary file) opened as one of ``CONTAINERS``, a ``VideoError``
    otherwise.

    The file is opened here, not by FFmpeg, and FFmpeg may open nothing itself (no protocol): a file or address the
    bytes name is never read. Nothing is decoded while opening: FFmpeg decodes a stream's first frames to learn its
    details unless no decoder is allowed, uncapped for a stream that its container declares only as its packets come
    (FLV, MPEG-TS). The details come from the container alone (a frame size it leaves out, as MP4 does for MPEG-4 Part
    2, is learned from the first frame), and the video streams' decoders refuse a frame over
    ``_decoder_pixels(max_frame_pixels)`` from its own header, before allocating it: a frame larger than the
    container says costs no more than one at the limit."""
    import av

    with contextlib.ExitStack() as stack:
        try:
            if is_inline_data(source):  # as images take one (FFmpeg's own data protocol is not allowed)
                source = io.BytesIO(data_url_bytes(source))
            elif isinstance(source, (str, os.PathLike)):
                source = stack.enter_context(open(source, "rb"))
            elif isinstance(source, (bytes, bytearray)):
                source = io.BytesIO(source)
            elif source.seekable():  # a file of the caller's is left where it was: a next turn reads it again
                stack.callback(source.seek, source.tell())
            container = stack.enter_context(
                av.open(
                    source,
                    container_options={
                        "format_whitelist": ",".join(CONTAINERS),
                        "protocol_whitelist": "",
                        "codec_whitelist": "none",  # the streams' details come from the container, not from decoding
                    },
                )
            )
        except av.ArgumentError:  # FFmpeg's error for a demuxer not on the list
            raise VideoError(
                f"cannot open video {name}: it is no container kimivl reads; send one of "
                f"{', '.join(CONTAINERS.values())}"
            ) from None
        except (av.FFmpegError, OSError, ValueError, TypeError) as e:
            raise VideoError(
                f"cannot open video {name}: {_reason(e)}; kimivl reads {', '.join(CONTAINERS.values())}"
            ) from None
        for stream in container.streams.video:
            if stream.codec_context is not None:  # None: no decoder for it, which decoding reports
                stream.codec_context.options = {"max_pixels": str(_decoder_pixels(max_frame_pixels))}
        yield container


def _reason(error: Exception) -> str:
    """An error's text; FFmpeg's without the C function that failed."""
    import av

    if isinstance(error, (av.FFmpegError, OSError)) and error.strerror:
        return error.strerror  # not the file's name again: the caller names it, shortened
    return str(error)


def _decode_error(name: str, error: Exception, max_frame_pixels: int) -> VideoError:
    return VideoError(
        f"cannot decode video {name}: {_reason(error)}; it is damaged, or holds a frame over max_frame_pixels="
        f"{max_frame_pixels} that its header does not declare (the decoder refuses such a frame before decoding it; "
        "send it scaled down)"
    )


def check_video_file(path: str, data: bytes | None = None) -> None:
    """A ``VideoError`` unless ``path`` opens as one of ``CONTAINERS`` holding a video stream whose first frame decodes
    (opening reads no frame): the cheap check before a long job. ``data``: the file's bytes, read already (a pipe can
    be read once), checked in its place."""
    import av

    name = short_name(path)
    with open_video(path if data is None else data, name) as container:
        if not container.streams.video:
            raise VideoError(f"video {name} holds no video stream")
        try:
            frame = next(container.decode(video=0), None)
        except (av.FFmpegError, OSError, ValueError) as e:
            raise _decode_error(name, e, MAX_PIXELS) from None
    if frame is None:
        raise VideoError(f"video {name} holds no frame that decodes")


def load_video(
    source: str | os.PathLike | bytes | BinaryIO,
    fps: float = DEFAULT_FPS,
    max_frames: int = DEFAULT_MAX_FRAMES,
    max_decoded: int | None = None,
    max_frame_pixels: int = MAX_PIXELS,
    image_processor: ImageProcessor | None = None,
    max_decoded_pixels: int | None = None,
) -> tuple[list[Image.Image], list[float]]:
    """Decode ``source`` and sample frames at ``fps``; more than ``max_frames`` samples are thinned uniformly.

    The frame for time t is the one on screen at t (the last frame starting at or before t). Returns RGB PIL frames,
    upright (turned as the file's display rotation asks), each decoded straight to the size ``image_processor``
    (default: the official settings) gives the whole frame, and their times in seconds from the start of the stream (a
    frame before the start counts as 0). A stream whose duration is unknown (or ambiguous, see ``_duration``) is sampled
    at ``fps`` to its end, holding at most ``2 * max_frames`` samples (every other one is dropped, and then every other
    sample is skipped, whenever they reach that), then thinned. A video whose frames are over ``max_frame_pixels`` (the
    image processor's ``max_pixels``), or too elongated for it, is a ``VideoError`` before any frame is decoded where
    the container's header gives their size, else at the first frame (see ``open_video`` for the decoder's cap). With
    ``max_decoded``, a video with more frames to decode is a ``VideoError``, and with ``max_decoded_pixels``, one
    whose decoded frames hold more pixels (frames x width x height, counted as they are decoded: every frame up to
    the last sample is decoded, sampled or not); a server's bounds on the work one request can ask for.
    """
    import av

    fps = _positive(fps, "fps", float)
    max_frames = _positive(max_frames, "max_frames", int)
    max_frame_pixels = _positive(max_frame_pixels, "max_frame_pixels", int)
    if max_decoded is not None:
        max_decoded = _positive(max_decoded, "max_decoded", int)
    if max_decoded_pixels is not None:
        max_decoded_pixels = _positive(max_decoded_pixels, "max_decoded_pixels", int)
    processor = image_processor or ImageProcessor()
    name = _describe(source)
    frames: list[Image.Image] = []
    times: list[float] = []

    def check_size(width: int, height: int) -> None:
        if width * height > max_frame_pixels:
            raise VideoError(
                f"video {name} has {width}x{height} frames = {width * height} pixels, over max_frame_pixels="
                f"{max_frame_pixels}; send it scaled down"
            )
        try:
            if width and height:  # a header may leave the size to the first frame
                processor.resized_size(width, height)  # a frame too elongated to be an image
        except ImageError as e:
            raise VideoError(f"video {name}: {e}") from None

    with open_video(source, name, max_frame_pixels) as container:
        if not container.streams.video:
            raise VideoError(f"{name} has no video stream")
        stream = container.streams.video[0]
        if stream.codec_context is not None:  # None: no decoder for it, which decoding reports
            check_size(stream.codec_context.width, stream.codec_context.height)  # from the header: nothing decoded yet
        stream.thread_type = "AUTO"
        rate = float(stream.average_rate or 25)
        start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
        duration = _duration(container, stream, start)
        plan = None if duration is None else _sample_times(duration, fps, max_frames)
        k, target = 0, 0.0  # the next sample and its time
        prev = None

        every, sampled, last = 1, 0, None  # unknown duration: keep one sample in `every`
        decoded = 0  # pixels decoded so far

        def take(frame, t):
            nonlocal every, sampled, last
            if max(t, 0.0) == last:  # the frame on screen at the last sampled time too
                return
            sampled, last = sampled + 1, max(t, 0.0)
            if (sampled - 1) % every:
                return
            # straight to the size the processor gives the whole frame (the same turned, so turning after is the same)
            w, h = processor.resized_size(frame.width, frame.height)
            image = _upright(frame.to_image(width=w, height=h, interpolation="BICUBIC"), frame.rotation)
            turned = _quarters(frame.rotation) % 2
            mark_source_size(image, (frame.height, frame.width) if turned else (frame.width, frame.height))
            frames.append(image)
            times.append(max(t, 0.0))
            if len(frames) == 2 * max_frames:
                del frames[1::2], times[1::2]
                every *= 2

        try:
            for i, frame in enumerate(container.decode(stream)):
                if max_decoded is not None and i >= max_decoded:
                    raise VideoError(
                        f"video {name} has more than {max_decoded} frames to decode (the limit); send a shorter clip "
                        "or frames sampled from it"
                    )
                check_size(frame.width, frame.height)  # a stream may change size midway
                decoded += frame.width * frame.height
                if max_decoded_pixels is not None and decoded > max_decoded_pixels:
                    raise VideoError(
                        f"video {name} has more than max_decoded_pixels={max_decoded_pixels} pixels to decode (frames "
                        f"x width x height: frame {i + 1}, of {frame.width}x{frame.height}, passes it); send a shorter "
                        "or smaller clip, or frames sampled from it"
                    )
                t = frame.time - start if frame.time is not None else i / rate
                if not math.isfinite(t):
                    raise VideoError(f"video {name}: frame {i} has no usable timestamp ({t})")
                if t > target + 1e-6:
                    take(*(prev or (frame, t)))
                    k = _next_sample(plan, fps, k, t)
                    target = _sample_time(plan, fps, k)
                    if target is None:
                        break
                prev = (frame, t)
        except VideoError:
            raise
        except (av.FFmpegError, OSError, ValueError) as e:
            raise _decode_error(name, e, max_frame_pixels) from None
        if prev is not None and target is not None:
            end = duration if duration is not None else prev[1] + 1 / rate
            if target < end - 1e-6:  # a sample on the end is past it, within rounding (times here are differences)
                take(*prev)
    if not frames:
        raise VideoError(f"{name} has no decodable frames")
    if len(frames) > max_frames:  # unknown duration: thin what was collected
        keep = np.round(np.linspace(0, len(frames) - 1, max_frames)).astype(int)
        frames, times = [frames[k] for k in keep], [times[k] for k in keep]
    return [f.convert("RGB") for f in frames], times
