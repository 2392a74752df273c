import base64
import fractions
import io
import threading

import av
import numpy as np
import pytest
import torch
from PIL import Image

from kimivl.processing.chat_template import IMAGE_PLACEHOLDER, apply_chat_template
from kimivl.processing.image import ImageProcessor, source_size
from kimivl.processing.processor import KimiVLProcessor
from kimivl.processing.video import VideoError, format_timestamp, frames_to_parts, load_video


def make_video(n: int = 25, rate: int = 10, codec: str = "mpeg4", fmt: str = "mp4", w: int = 64, h: int = 48) -> bytes:
    """A video whose frame i is uniformly grey at level 10*i mod 256 (2.5 s at 10 fps by default)."""
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as c:
        s = c.add_stream(codec, rate=rate)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(np.full((h, w, 3), 10 * i % 256, np.uint8), format="rgb24")
            for packet in s.encode(frame):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)
    return buf.getvalue()


@pytest.fixture(scope="module")
def video() -> bytes:
    return make_video()


def levels(frames) -> list[int]:
    return [round(float(np.asarray(f).mean()) / 10) for f in frames]


def test_one_fps(video, tmp_path, monkeypatch):
    frames, times = load_video(video)
    assert times == [0.0, 1.0, 2.0] and levels(frames) == [0, 10, 20]
    assert all(f.mode == "RGB" and f.size == (64, 48) for f in frames)
    path = tmp_path / "v.mp4"
    path.write_bytes(video)
    assert load_video(str(path))[1] == times and load_video(io.BytesIO(video))[1] == times
    url = "data:video/mp4;base64," + base64.b64encode(video).decode()  # as images take one (FFmpeg's protocol is off)
    assert load_video(url)[1] == times
    (tmp_path / "data:clip.mp4").write_bytes(video)  # a file so named is a file, not a data: URL
    assert load_video(str(tmp_path / "data:clip.mp4"))[1] == times
    monkeypatch.chdir(tmp_path)
    assert load_video("data:clip.mp4")[1] == times
    with pytest.raises(VideoError) as e:  # the path named once, shortened: a data URL's error held it twice in full
        load_video("data:" + "x" * 5000)
    assert len(str(e.value)) < 600
    f = io.BytesIO(video)  # an open file is left where it was: a second turn or a batch holding it twice reads it again
    assert levels(load_video(f)[0]) == levels(load_video(f)[0]) == [0, 10, 20] and f.tell() == 0


def test_fps_and_uniform_cap(video):
    frames, times = load_video(video, fps=4)  # 10 samples over 2.5 s
    assert times == pytest.approx([0, 0.2, 0.5, 0.7, 1.0, 1.2, 1.5, 1.7, 2.0, 2.2])  # frame on screen at k/4
    frames, times = load_video(video, fps=4, max_frames=5)  # thinned evenly over the whole clip
    assert len(frames) == 5 and times[0] == 0 and times[-1] == pytest.approx(2.2)
    assert levels(frames) == [round(t * 10) for t in times]
    frames, times = load_video(video, fps=100)  # faster than the video: each frame once
    assert len(frames) == 25
    assert load_video(video, fps=0.1)[1] == [0.0]


def test_unknown_duration():
    video = make_video(fmt="m4v")  # a raw MPEG-4 stream declares no duration
    frames, times = load_video(video)
    assert times == [0.0, 1.0, 2.0] and levels(frames) == [0, 10, 20]
    # 10 samples at 4 fps reach 2 x max_frames at the last: every other one is dropped
    assert load_video(video, fps=4, max_frames=5)[1] == pytest.approx([0, 0.5, 1.0, 1.5, 2.0])
    # every frame sampled: held samples halve at 6 (keeping 0 2 4), 6 again (0 4 8 ...), ... then 4 thinned to 3
    frames, times = load_video(video, fps=10, max_frames=3)
    assert times == pytest.approx([0, 1.6, 2.4]) and levels(frames) == [0, 16, 24]
    # 2 s exactly (20 frames at 10 fps): the sample at 2.0 s is past the last frame's end, so it is not taken
    assert load_video(make_video(n=20, fmt="m4v"))[1] == [0.0, 1.0]


def test_a_bound_on_decoded_frames():
    video = make_video(n=25, rate=5, fmt="m4v")  # 5 s
    with pytest.raises(VideoError, match="more than 20 frames to decode"):
        load_video(video, max_decoded=20)
    assert load_video(video, max_decoded=25)[1] == [0.0, 1.0, 2.0, 3.0, 4.0]
    with pytest.raises(VideoError, match="more than 24 frames to decode"):  # one frame over the bound
        load_video(video, max_decoded=24)


def test_a_bound_on_decoded_pixels_counts_every_decoded_frame():
    video = make_video(n=25, rate=5, fmt="m4v", w=64, h=48)  # 5 s of 64x48 frames, all decoded for 5 samples
    with pytest.raises(VideoError, match=r"more than max_decoded_pixels=61440 pixels to decode .*frame 21, of 64x48"):
        load_video(video, max_decoded_pixels=20 * 64 * 48)
    assert load_video(video, max_decoded_pixels=25 * 64 * 48)[1] == [0.0, 1.0, 2.0, 3.0, 4.0]
    with pytest.raises(VideoError, match="frame 25, of 64x48"):  # one pixel under what the 25 frames hold
        load_video(video, max_decoded_pixels=25 * 64 * 48 - 1)
    part = {"type": "video", "video": video, "max_decoded_pixels": 20 * 64 * 48}  # as a chat part too
    with pytest.raises(VideoError, match="max_decoded_pixels=61440"):
        apply_chat_template([{"role": "user", "content": [part]}])
    with pytest.raises(VideoError, match="need max_decoded_pixels > 0"):
        load_video(video, max_decoded_pixels=0)


def test_at_most_64_frames_by_default():
    """More samples than the default ``max_frames`` (64) are thinned evenly to 64, the first and last kept."""
    frames, times = load_video(make_video(n=70, rate=10, w=32, h=32), fps=10)  # 70 samples
    assert len(frames) == 64 and times == pytest.approx([round(k) / 10 for k in np.linspace(0, 69, 64)])


def test_libx264():
    frames, times = load_video(make_video(codec="libx264"))
    assert times == [0.0, 1.0, 2.0] and levels(frames) == [0, 10, 20]


def test_audio_only_file_has_no_video_stream():
    buf = io.BytesIO()
    with av.open(buf, "w", format="matroska") as c:  # an audio-only Matroska (.mka) file
        s = c.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in [*s.encode(frame), *s.encode()]:
            c.mux(packet)
    with pytest.raises(VideoError, match="has no video stream"):
        load_video(buf.getvalue())


def test_unreadable(video, tmp_path):
    with pytest.raises(VideoError, match="cannot open video <11 bytes>"):
        load_video(b"not a video")
    with pytest.raises(VideoError, match="missing.mp4"):
        load_video(str(tmp_path / "missing.mp4"))
    with pytest.raises(VideoError):
        load_video(video[:300])  # truncated
    with pytest.raises(ValueError, match="fps > 0"):
        load_video(video, fps=0)
    huge = 10**400  # too large for a float: was an OverflowError
    for settings in ({"fps": huge}, {"fps": float("nan")}, {"max_frames": 0}, {"max_frames": 2.0}):
        with pytest.raises(VideoError, match=f"need {next(iter(settings))} > 0"):
            load_video(video, **settings)
    assert len(load_video(video, max_frames=huge)[0]) == 3  # a huge integer cap is a cap


def test_timestamps_and_chat_parts(video):
    assert [format_timestamp(t) for t in (0, 1, 61.25, 3599.96, 3723.5)] == [
        "00:00.0",
        "00:01.0",
        "01:01.2",
        "1:00:00.0",
        "1:02:03.5",
    ]
    frames, times = load_video(video)
    parts = frames_to_parts(frames, times)
    with pytest.raises(VideoError, match="holds no frames"):
        frames_to_parts([], [])
    for bad in (float("inf"), -1, 1e308):
        with pytest.raises(VideoError, match="timestamps must be finite numbers of seconds >= 0 and under 360000"):
            frames_to_parts(frames[:1], [bad])
    assert [p["type"] for p in parts] == ["text", "image"] * 3 and parts[2]["text"] == "00:01.0"
    text, media = apply_chat_template(
        [{"role": "user", "content": [{"type": "video", "video": video}, {"type": "text", "text": "What changes?"}]}]
    )
    assert (
        "<|im_user|>user<|im_middle|>00:00.0"
        + IMAGE_PLACEHOLDER
        + "00:01.0"
        + IMAGE_PLACEHOLDER
        + "00:02.0"
        + IMAGE_PLACEHOLDER
        + "What changes?<|im_end|>"
        in text
    )
    assert levels(media) == [0, 10, 20]
    _, media = apply_chat_template(
        [{"role": "user", "content": [{"type": "video", "video": video, "fps": 2, "max_frames": 2}]}]
    )
    assert len(media) == 2
    with pytest.raises(VideoError, match="more than 5 frames to decode"):  # a server's bound reaches the decoder
        apply_chat_template([{"role": "user", "content": [{"type": "video", "video": video, "max_decoded": 5}]}])


def make_clip(start: float = 0.0, n: int = 10, rate: int = 10, fmt: str = "matroska", rotation: int = 0) -> bytes:
    """A 64x32 clip whose frame i is grey at level 2*i with a green top-left corner; pts from ``start`` seconds; a
    display matrix rotating it ``rotation`` degrees counter-clockwise."""
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as c:
        s = c.add_stream("flv" if fmt == "flv" else "mpeg4", rate=rate)
        s.width, s.height, s.pix_fmt = 64, 32, "yuv420p"
        if rotation:
            s.set_display_rotation(rotation)
        for i in range(n):
            a = np.full((32, 64, 3), 2 * i, np.uint8)
            a[:16, :16] = (0, 255, 0)
            frame = av.VideoFrame.from_ndarray(a, format="rgb24")
            frame.pts, frame.time_base = round((start + i / rate) * 1000), fractions.Fraction(1, 1000)
            for packet in s.encode(frame):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)
    return buf.getvalue()


def green_corner(frame) -> str:
    """Which corner of ``frame`` is green."""
    a = np.asarray(frame)
    h, w = a.shape[:2]
    corners = {"top-left": (2, 2), "top-right": (2, w - 3), "bottom-left": (h - 3, 2), "bottom-right": (h - 3, w - 3)}
    (corner,) = [k for k, yx in corners.items() if a[yx][1] > 200]
    return corner


@pytest.mark.parametrize(
    "rotation, size, scaled, corner",
    [
        (0, (64, 32), (45, 22), "top-left"),
        (-90, (32, 64), (22, 45), "top-right"),  # a 90 degree clockwise turn, as a phone held upright records
        (90, (32, 64), (22, 45), "bottom-left"),
        (180, (64, 32), (45, 22), "bottom-right"),
    ],
)
def test_frames_are_turned_upright_by_the_display_rotation(rotation, size, scaled, corner):
    video = make_clip(fmt="mp4", rotation=rotation)
    assert next(av.open(io.BytesIO(video)).decode(video=0)).rotation == (rotation if rotation != 180 else -180)
    frames, times = load_video(video, image_processor=ImageProcessor(in_token_limit=4))  # 8 patches: 0.71 a side
    assert times == [0.0] and frames[0].size == scaled
    frames, _ = load_video(video)
    assert frames[0].size == size and green_corner(frames[0]) == corner


@pytest.mark.parametrize("fmt, container_duration", [("matroska", 70.0), ("flv", 10.0)])
def test_a_late_start_without_a_stream_duration_is_sampled_over_its_frames(fmt, container_duration):
    video = make_clip(start=60.0, n=100, fmt=fmt)  # the container's duration: Matroska's is the end, FLV's the length
    c = av.open(io.BytesIO(video))
    assert c.streams.video[0].duration is None and c.duration / av.time_base == pytest.approx(container_duration)
    frames, times = load_video(video, fps=1, max_frames=8)
    assert len(frames) == 8 and times[0] == 0.0 and times[-1] > 8.9
    grey = [float(np.asarray(f)[:, 32:].mean()) / 2 for f in frames]  # frame i, grey at 2*i
    assert all(abs(g - t * 10) <= 2 for g, t in zip(grey, times)), (grey, times)  # samples are 10 frames apart
    assert load_video(video, fps=1, max_frames=64)[1][:10] == pytest.approx(range(10))
    at_zero = load_video(make_clip(n=100), fps=1, max_frames=8)[1]  # starting at 0 the duration is unambiguous
    assert at_zero == load_video(make_clip(n=100, fmt="mp4"), fps=1, max_frames=8)[1] == [0, 1, 3, 4, 5, 6, 8, 9]


@pytest.mark.parametrize("fps, max_frames", [(1, 64), (1, 70), (1, 8), (10, 64), (4, 32)])
def test_a_late_start_is_sampled_alike_whatever_the_container(fps, max_frames):
    """Ten seconds of frames from 60 s, sampled as the same frames from 0. Matroska's duration (70 s, the end time)
    gave one sample too many, the last frame again at 9.9 s: read as a length where no thinning was planned, or, where
    the length was unknown, through floats (69.9 - 60 + 0.1 lands past the sample at 10.0)."""
    want = load_video(make_clip(n=100, fmt="mp4"), fps=fps, max_frames=max_frames)[1]
    assert len(want) == min(10 * fps, max_frames) and want[-1] == pytest.approx(10 - 1 / fps, abs=0.11)
    for fmt in ("matroska", "flv", "mp4"):
        assert load_video(make_clip(start=60.0, n=100, fmt=fmt), fps=fps, max_frames=max_frames)[1] == pytest.approx(
            want
        ), fmt
    if (fps, max_frames) == (1, 64):
        assert want == [float(i) for i in range(10)]


def test_a_container_duration_that_cannot_be_an_end_time_is_the_length():
    """Matroska's duration for a start at 0, and FLV's (10 s) for a start past it (60 s), are lengths, so thinning is
    planned over them: an unknown length would hold 8 samples, halve them and thin 0 2 4 6 8 to 0 2 6 8."""
    for video in (make_clip(n=100), make_clip(start=60.0, n=100, fmt="flv")):
        assert load_video(video, fps=1, max_frames=4)[1] == [0.0, 3.0, 6.0, 9.0]


def make_timed(pts_ms: list[int], fmt: str = "matroska", **options: str) -> bytes:
    """A 64x48 MPEG-4 clip whose frame i is grey at level 10*i with pts ``pts_ms[i]`` milliseconds (gaps allowed);
    ``options`` go to the encoder (``bf="2"``: B-frames)."""
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as c:
        s = c.add_stream("mpeg4", rate=10, options=options)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        for i, pts in enumerate(pts_ms):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 10 * i, np.uint8), format="rgb24")
            frame.pts, frame.time_base = pts, fractions.Fraction(1, 1000)
            for packet in s.encode(frame):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)
    return buf.getvalue()


def test_a_first_frame_after_the_stream_start_is_sampled_once_at_its_own_time():
    """An AVI with B-frames starts at 0 but shows its first frame from 0.1 s: sample 0 takes that frame, at 0.1, and
    the samples that would show it again (0.1 s at 10 fps) do not repeat it."""
    video = make_timed([100 * i for i in range(10)], fmt="avi", bf="2")
    c = av.open(io.BytesIO(video))
    assert c.streams.video[0].start_time == 0 and next(c.decode(video=0)).time == pytest.approx(0.1)
    frames, times = load_video(video, fps=10)
    assert times == pytest.approx([i / 10 for i in range(1, 10)]) and levels(frames) == list(range(9))
    frames, times = load_video(video, fps=4)  # samples at 0, 0.25, 0.5, 0.75 s
    assert times == pytest.approx([0.1, 0.2, 0.5, 0.7]) and levels(frames) == [0, 1, 4, 6]


def test_a_variable_frame_rate_gives_the_frame_on_screen_at_each_sample():
    """Each frame is on screen until the next (Matroska: 2.2 s). The samples from 0.75 to 1.75 s at 4 fps show the frame
    at 0.6 s, taken already: the next is the frame at 2.0 s for the sample at 2.0, and the one at 2.1 s ends before
    2.25."""
    video = make_timed([0, 100, 500, 600, 2000, 2100])
    frames, times = load_video(video, fps=4)
    assert times == pytest.approx([0, 0.1, 0.5, 0.6, 2.0]) and levels(frames) == [0, 1, 2, 3, 4]
    frames, times = load_video(video, fps=1)
    assert times == pytest.approx([0, 0.6, 2.0]) and levels(frames) == [0, 3, 4]
    assert load_video(video, fps=10)[1] == pytest.approx([0, 0.1, 0.5, 0.6, 2.0, 2.1])


def test_samples_end_before_the_declared_duration_through_float_rounding():
    """25 frames at 3 fps declare 25/3 s, 250.00000000000003 samples at 30 fps: 250 of them (0 to 249/30 s), not
    251, the last at the end. Thinned to two: the frame on screen at 8.3 s, not a sample at 8.33 s past the end."""
    frames, times = load_video(make_video(n=25, rate=3), fps=30, max_frames=2)
    assert times == [0.0, 8.0] and levels(frames) == [0, 24]


def test_a_clip_with_fewer_frames_than_samples_gives_each_frame_once():
    video = make_video(n=3, rate=10)
    for fps in (10, 20, 100):
        frames, times = load_video(video, fps=fps)
        assert times == pytest.approx([0, 0.1, 0.2]) and levels(frames) == [0, 1, 2]


def test_a_late_start_without_a_frame_rate_ends_after_its_last_frame():
    """NUT declares no frame rate, and its duration (5.1 s) is the last frame's start: two frames from 5 s are taken
    up to the sample at 0.1 s, and the sample at 0.25 s is past them (25 fps assumed: the last ends at 0.14 s)."""
    video = make_timed([5000, 5100], fmt="nut")
    c = av.open(io.BytesIO(video))
    assert c.streams.video[0].average_rate is None and c.duration == 5_100_000
    frames, times = load_video(video, fps=4)
    assert times == [0.0] and levels(frames) == [0]
    frames, times = load_video(video, fps=10)
    assert times == pytest.approx([0.0, 0.1]) and levels(frames) == [0, 1]


def test_a_declared_duration_of_zero_is_no_length():
    """A one-frame NUT file declares a duration of 0: its frame, at 0, was never sampled ("no decodable frames")."""
    video = make_timed([0], fmt="nut")
    c = av.open(io.BytesIO(video))
    assert c.duration == 0 and c.streams.video[0].duration is None
    frames, times = load_video(video)
    assert times == [0.0] and levels(frames) == [0]


def test_an_unknown_length_ending_exactly_on_a_sample_does_not_take_it():
    """A raw MPEG-4 stream declares no duration: 25 frames at 25 fps end at 1.0 s exactly, so the sample at 1.0 is past
    them; a 26th frame is on screen then."""
    for n, want in ((25, [0.0]), (26, [0.0, 1.0])):
        video = make_video(n=n, rate=25, fmt="m4v")
        c = av.open(io.BytesIO(video))
        assert c.streams.video[0].duration is None and c.duration is None and c.streams.video[0].average_rate == 25
        frames, times = load_video(video)
        assert times == want and levels(frames) == [round(25 * t) for t in want]


def test_frames_without_timestamps_are_timed_by_the_frame_rate():
    video = make_video(n=10, rate=25, codec="libx264", fmt="h264")  # a raw H.264 stream: no pts, start or duration
    c = av.open(io.BytesIO(video))
    stream = c.streams.video[0]
    assert stream.start_time is None and stream.average_rate == 25 and {f.time for f in c.decode(stream)} == {None}
    frames, times = load_video(video, fps=10)  # frame i from i/25 s; after the last (0.36 to 0.4) nothing
    assert times == pytest.approx([0, 0.08, 0.2, 0.28]) and levels(frames) == [0, 2, 5, 7]


def test_frames_over_max_frame_pixels_are_refused_before_decoding(monkeypatch):
    video = make_video(n=3, rate=1, w=640, h=480, codec="libx264")
    decoded = []
    monkeypatch.setattr(av.container.InputContainer, "decode", lambda *a, **k: decoded.append(1) or iter(()))
    with pytest.raises(VideoError, match=r"has 640x480 frames = 307200 pixels, over max_frame_pixels=300000"):
        load_video(video, max_frame_pixels=300_000)
    assert not decoded
    monkeypatch.undo()
    assert load_video(video, max_frame_pixels=307_200)[1] == [0.0, 1.0, 2.0]
    video = make_video(n=3, rate=1, w=640, h=480)  # MPEG-4 Part 2 in MP4: FFmpeg learns the size by decoding
    with pytest.raises(VideoError, match=r"has 640x480 frames = 307200 pixels, over max_frame_pixels=300000"):
        load_video(video, max_frame_pixels=300_000)  # the first frame, which the decoder caps at about 1.25x that
    assert load_video(video, max_frame_pixels=307_200)[1] == [0.0, 1.0, 2.0]  # a frame at the limit decodes
    with pytest.raises(VideoError, match="over max_frame_pixels=99"):  # a chat part carries the bound
        apply_chat_template([{"role": "user", "content": [{"type": "video", "video": video, "max_frame_pixels": 99}]}])


def test_sampling_far_above_the_frame_rate_costs_no_more_than_the_frames():
    video = make_video(fmt="m4v")  # no duration: samples every 1/fps to the end
    result = []
    thread = threading.Thread(target=lambda: result.append(load_video(video, fps=1e9)), daemon=True)
    thread.start()
    thread.join(timeout=30)  # one step per sample would be 2.5e9 steps
    assert not thread.is_alive(), "sampling stepped through every 1/fps"
    frames, times = result[0]
    assert len(frames) == 25 and levels(frames) == list(range(25))


def make_still(w: int, h: int, rotation: int = 0) -> bytes:
    """A one-frame mp4 of a w x h picture with detail everywhere (gradients, a checkerboard, stripes)."""
    y, x = np.mgrid[0:h, 0:w]
    a = np.stack([x * 255 // w, y * 255 // h, (x // 37 + y // 23) % 2 * 200 + (x + y) % 50], -1).astype(np.uint8)
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as c:
        s = c.add_stream("mpeg4", rate=1)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        if rotation:
            s.set_display_rotation(rotation)
        for packet in [*s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")), *s.encode()]:
            c.mux(packet)
    return buf.getvalue()


@pytest.mark.parametrize(
    "w, h, rotation",
    [(1920, 1080, 0), (1080, 1920, 0), (3840, 2160, 0), (1210, 676, 0), (160, 90, 0), (1920, 1080, -90)],
)
def test_a_decoded_frame_is_processed_as_the_whole_frame_given_as_an_image(small_processor, tmp_path, w, h, rotation):
    path = tmp_path / "still.mp4"
    path.write_bytes(make_still(w, h, rotation))
    whole = next(av.open(str(path)).decode(video=0)).to_image()
    if rotation:  # -90: a quarter turn clockwise
        whole = whole.transpose(Image.Transpose.ROTATE_270)
    video = small_processor.encode([{"role": "user", "content": [{"type": "video", "video": str(path)}]}])
    image = small_processor.encode(
        [{"role": "user", "content": [{"type": "text", "text": "00:00.0"}, {"type": "image", "image": whole}]}]
    )
    ip = small_processor.image_processor
    assert video.image_grid_hws.tolist() == image.image_grid_hws.tolist() == [list(ip.grid_hw(*whole.size))]
    assert video.input_ids == image.input_ids  # the same tokens: the frame's text and its (h/2)*(w/2) pads
    # FFmpeg's bicubic scaler (from YUV 4:2:0) in place of Pillow's (from RGB): close (0.04-0.07 here), not equal
    assert (video.pixel_values - image.pixel_values).abs().mean() < 0.1  # 0.1 of a unit: 7 of 255 levels
    (frame,), _ = load_video(path)  # held at the size the processor gives it, not whole
    assert frame.size == ip.resized_size(*whole.size) and source_size(frame) == whole.size
    # 1210x676 is resized to 1205x673, which is over the budget again: resizing it anew would give a (48, 86) grid
    assert (w, h) != (1210, 676) or ip.grid_hw(*frame.size) == (48, 86) != ip.grid_hw(*whole.size)


def test_frames_are_resized_for_the_processor_that_reads_them(small_processor):
    video = make_still(1920, 1080)
    whole = next(av.open(io.BytesIO(video)).decode(video=0)).to_image()
    ip = ImageProcessor(in_token_limit=64)
    enc = KimiVLProcessor(small_processor.tokenizer, ip).encode(
        [{"role": "user", "content": [{"type": "video", "video": video}]}]
    )
    as_image = ip(whole)
    assert enc.image_grid_hws.tolist() == as_image["image_grid_hws"].tolist() == [[6, 12]]
    assert (enc.pixel_values - as_image["pixel_values"]).abs().mean() < 0.05
    frames, _ = load_video(video)  # resized for the official settings (1196x672), then read by another processor
    got = ip(frames)
    assert frames[0].size == (1196, 672) and got["image_grid_hws"].tolist() == [[6, 12]]
    assert (got["pixel_values"] - as_image["pixel_values"]).abs().mean() < 0.05  # resized twice, so not exactly


def test_frames_too_elongated_to_be_images_are_refused_before_decoding(monkeypatch):
    video = make_video(n=1, rate=1, codec="rawvideo", fmt="matroska", w=2, h=16000)
    decoded = []
    monkeypatch.setattr(av.container.InputContainer, "decode", lambda *a, **k: decoded.append(1) or iter(()))
    with pytest.raises(VideoError, match=r"2x16000 image is too elongated: .*under 512 patches"):
        load_video(video)
    assert not decoded


def test_numpy_numbers_and_arrays_of_timestamps_are_accepted(video):
    frames = [np.zeros((28, 28, 3), np.uint8)] * 3

    def chat(**part):
        return apply_chat_template([{"role": "user", "content": [{"type": "video", "frames": frames, **part}]}])[0]

    want = chat(timestamps=[0.0, 1.0, 2.5])
    assert "00:00.0" in want and "00:02.5" in want
    for times in (
        np.array([0.0, 1.0, 2.5]),
        np.array([0.0, 1.0, 2.5], np.float32),
        [np.float32(0), np.int64(1), np.float64(2.5)],
        (0, np.int32(1), 2.5),
        torch.tensor([0.0, 1.0, 2.5]),
    ):
        assert chat(timestamps=times) == want, times
    assert chat() == chat(timestamps=np.arange(3))  # none given: one a second
    for bad, message in (
        (np.array([0.0, np.nan, 1.0]), "frame 1 has timestamp nan"),
        (np.array([[0.0, 1.0, 2.0]]), "1 timestamps"),
        ([0.0, np.bool_(True), 2.0], "frame 1 has timestamp"),
        ([], "3 frames but 0 timestamps"),  # an empty list is not a missing one
        ("0 1 2", "timestamps a list or an array, got list and str"),
    ):
        with pytest.raises(VideoError, match=message):
            chat(timestamps=bad)
    settings = {"fps": np.float32(4), "max_frames": np.int64(5), "max_decoded": np.int32(100)}
    times = load_video(video, **settings)[1]
    assert times == load_video(video, fps=4, max_frames=5)[1] and len(times) == 5
    assert all(type(t) is float for t in times)
    text, media = apply_chat_template([{"role": "user", "content": [{"type": "video", "video": video, **settings}]}])
    assert len(media) == 5 and "00:02.2" in text
    with pytest.raises(VideoError, match="need max_frames > 0"):
        load_video(video, max_frames=np.float64(5))


def test_timestamps_too_large_for_a_float_are_refused_as_out_of_range():
    frames = [np.zeros((28, 28, 3), np.uint8)]
    for bad in (10**400, -(10**400), 10**309):
        with pytest.raises(VideoError, match="timestamps must be finite numbers of seconds >= 0 and under 360000"):
            frames_to_parts(frames, [bad])
        part = {"type": "video", "frames": frames, "timestamps": [bad]}
        with pytest.raises(VideoError, match="frame 0 has timestamp"):  # generate's path
            apply_chat_template([{"role": "user", "content": [part]}])
    assert frames_to_parts(frames, [359_999])[0]["text"] == "99:59:59.0"


def test_a_display_rotation_turns_to_the_nearest_quarter():
    from kimivl.processing.video import _quarters

    assert [_quarters(r) for r in (0, 40, 50, 89.99, 90, 179.9, -90, -89.99, -180, 270)] == [
        0,
        0,
        1,
        1,
        1,
        2,
        3,
        3,
        2,
        3,
    ]
