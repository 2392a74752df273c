"""Hostile media: endless devices and pipes, huge sparse files, videos of huge frames, broken timestamps. Each is
a clear error (or bounded work), never a read of the whole input or frames kept at full size."""

import fractions
import functools
import io
import json
import math
import os
import struct
import threading
import time
import zlib

import av
import numpy as np
import pytest
from PIL import Image

from kimivl.data.formats import DataError, iter_records
from kimivl.processing.chat_template import apply_chat_template
from kimivl.processing.image import JPEG_MAX_SCANS, ImageError, ImageProcessor, jpeg_scans
from kimivl.processing.video import VideoError, check_video_file, frames_to_parts, load_video
from tests.processing.test_video_frames import make_video


def png_bytes(w=20, h=10) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), 200, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_dev_zero_is_refused_after_its_first_bytes():
    start = time.perf_counter()
    with pytest.raises(ImageError, match=r"/dev/zero does not start like an image in an accepted format"):
        ImageProcessor().load("/dev/zero")
    assert time.perf_counter() - start < 1.0


def _feed_fifo(path, data: bytes, endless: bytes = b""):
    """Write ``data`` then ``endless`` forever into the FIFO at ``path`` until the reader goes away."""

    def run():
        try:
            with open(path, "wb") as f:
                f.write(data)
                while endless:
                    f.write(endless)
        except (BrokenPipeError, OSError):
            pass

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_endless_pipe_of_zeros(tmp_path):
    fifo = tmp_path / "zeros"
    os.mkfifo(fifo)
    thread = _feed_fifo(fifo, b"", endless=b"\0" * 65536)
    with pytest.raises(ImageError, match="does not start like an image"):
        ImageProcessor().load(str(fifo))
    thread.join(timeout=5)
    assert not thread.is_alive()


def test_pipe_with_an_image_header_and_no_end_stops_at_max_bytes(tmp_path):
    fifo = tmp_path / "endless.png"
    os.mkfifo(fifo)
    thread = _feed_fifo(fifo, png_bytes(), endless=b"\0" * 65536)
    with pytest.raises(ImageError, match=r"longer than max_bytes=4000000; stopped reading"):
        ImageProcessor(max_bytes=4_000_000).load(str(fifo))
    thread.join(timeout=5)
    assert not thread.is_alive()


def test_an_image_through_a_pipe_still_works(tmp_path):
    fifo = tmp_path / "piped.png"
    os.mkfifo(fifo)
    _feed_fifo(fifo, png_bytes(20, 10))  # the writer ends on its own
    img = ImageProcessor().load(str(fifo))
    assert img.size == (20, 10) and img.getpixel((3, 3)) == (200, 200, 200)


@pytest.mark.parametrize("data", [b"", b"BM", b"BM\0\0\0", b"\0\0"])
def test_empty_or_short_pipes_are_an_image_error(tmp_path, data):
    fifo = tmp_path / "short"
    os.mkfifo(fifo)
    _feed_fifo(fifo, data)  # the writer ends on its own
    with pytest.raises(ImageError, match="short is empty" if not data else "short"):  # never a plugin's struct.error
        ImageProcessor().load(str(fifo))


def test_dev_null_is_empty():
    with pytest.raises(ImageError, match="image /dev/null is empty"):
        ImageProcessor().load("/dev/null")


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n0 0 moveto 10 10 lineto stroke\nshowpage\n"


def test_formats_outside_the_allow_list_never_reach_their_plugin(tmp_path, monkeypatch):
    from PIL import EpsImagePlugin

    def never(*args, **kwargs):
        raise AssertionError("the EPS plugin was asked to open client bytes")

    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", never)
    path = tmp_path / "a.eps"
    path.write_bytes(EPS)
    fifo = tmp_path / "eps-pipe"
    os.mkfifo(fifo)
    _feed_fifo(fifo, EPS)
    for source in (EPS, str(path)):
        with pytest.raises(ImageError, match=r"looks like EPS, a format not accepted here; send one of PNG, JPEG"):
            ImageProcessor().load(source)
    with pytest.raises(ImageError, match=r"does not start like an image in an accepted format \(PNG, JPEG"):
        ImageProcessor().load(str(fifo))
    for fmt in ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF"):  # the accepted ones still decode
        buf = io.BytesIO()
        Image.new("RGB", (16, 16), (250, 0, 0)).save(buf, fmt)
        assert ImageProcessor().load(buf.getvalue()).getpixel((8, 8))[0] > 240, fmt


def test_an_icon_is_refused_before_pillow_decodes_its_embedded_png(monkeypatch):
    from PIL import IcoImagePlugin, PngImagePlugin

    embedded = io.BytesIO()
    Image.new("RGBA", (300, 200), (250, 0, 0, 255)).save(embedded, "PNG")  # an icon's PNG may be any size
    png = embedded.getvalue()
    icon = struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 16, 16, 0, 0, 1, 32, len(png), 22) + png
    with pytest.warns(UserWarning, match="not the expected size"):  # Pillow decodes the PNG as it opens the icon
        assert Image.open(io.BytesIO(icon)).size == (300, 200)

    def never(*args, **kwargs):
        raise AssertionError("an icon was opened: Pillow decodes its embedded PNG while reading the header")

    monkeypatch.setattr(IcoImagePlugin.IcoImageFile, "_open", never)
    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", never)
    with pytest.raises(ImageError, match=r"looks like ICO, a format not accepted here; send one of PNG, JPEG"):
        ImageProcessor(max_pixels=100).load(icon)


def test_huge_sparse_file_is_refused_from_its_size(tmp_path):
    path = tmp_path / "huge.png"
    with open(path, "wb") as f:
        f.write(png_bytes())
        f.truncate(64 * 2**30)  # 64 GiB, sparse: nothing is stored
    start = time.perf_counter()
    with pytest.raises(ImageError, match=rf"is {64 * 2**30} bytes, over max_bytes={1 << 28}"):
        ImageProcessor().load(str(path))
    assert time.perf_counter() - start < 1.0


def test_bytes_over_the_cap_and_directories(tmp_path):
    with pytest.raises(ImageError, match="over max_bytes=100"):
        ImageProcessor(max_bytes=100).load(png_bytes() + b"\0" * 200)
    with pytest.raises(ImageError, match="is a directory"):
        ImageProcessor().load(str(tmp_path))
    with pytest.raises(ValueError, match="max_bytes must be a positive integer"):
        ImageProcessor(max_bytes=0)


def test_regular_files_are_decoded_from_their_header_without_a_whole_read(tmp_path, monkeypatch):
    """A regular file is opened by Pillow through the file object (header first), never read into memory whole."""
    path = tmp_path / "big_header.png"
    from tests.processing.test_image_processor import png_header_only

    path.write_bytes(png_header_only(10_000, 10_000) + b"\0" * 5_000_000)
    reads = []
    real_open = open

    def counting_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        if str(file) == str(path):
            original = f.read
            f.read = lambda n=-1: reads.append(n) or original(n)
        return f

    monkeypatch.setattr("builtins.open", counting_open)
    with pytest.raises(ImageError, match="over max_pixels"):
        ImageProcessor().load(str(path))
    assert reads and all(0 <= n < 1_000_000 for n in reads)  # no read() of the whole file


def jpeg_of_scans(n: int) -> bytes:
    """A 64x64 grey progressive JPEG whose last scan is repeated to make ``n`` scans in all (a 'scan bomb' in small)."""
    buf = io.BytesIO()
    Image.new("L", (64, 64), 128).save(buf, "JPEG", progressive=True)
    data = buf.getvalue()
    last = data.rindex(b"\xff\xda")
    before = jpeg_scans(data)
    return data[:last] + data[last:-2] * (n - before + 1) + b"\xff\xd9"


def test_a_jpeg_of_too_many_scans_is_refused_before_it_is_decoded(tmp_path):
    """Every scan is decoded over the whole image: 600 scans in a few KB would be minutes at 4096x4096."""
    bomb = jpeg_of_scans(600)
    assert len(bomb) < 20_000 and jpeg_scans(bomb, stop=10_000) == 600
    path = tmp_path / "bomb.jpg"
    path.write_bytes(bomb)
    for source in (bomb, str(path)):  # bytes in memory, and a file (walked through a map, never read whole)
        start = time.perf_counter()
        with pytest.raises(ImageError, match=r"is a JPEG of more than 100 scans \(start-of-scan markers\)"):
            ImageProcessor().load(source)
        assert time.perf_counter() - start < 0.5
    edge = ImageProcessor().load(jpeg_of_scans(JPEG_MAX_SCANS))  # as many as allowed: decoded, the same grey
    assert edge.size == (64, 64) and abs(np.asarray(edge).astype(float).mean() - 128) < 2


def test_jpeg_scans_counts_the_markers_libjpeg_reads():
    def segment(code: int, body: bytes) -> bytes:
        return bytes([0xFF, code]) + (len(body) + 2).to_bytes(2, "big") + body

    sos = segment(0xDA, bytes([1, 1, 0, 0, 63, 0]))
    stream = (
        b"\xff\xd8"
        + segment(0xFE, b"comment ending in \xff")  # the SOS right after it still counts
        + sos
        + b"\x12\xff\x00\x34\xff\xd3\x56\xff\xff\x00"  # entropy data: stuffed bytes and a restart are no markers
        + b"\xff\xff"  # fill bytes before the next marker
        + sos
        + b"\xff" * 100_000  # a long run of 0xFF: one search, not one per byte
        + b"\x00\x01\xff\xd9"
        + sos  # after the end of image: libjpeg stops before it
    )
    assert jpeg_scans(stream) == 2
    assert jpeg_scans(stream[: stream.index(b"\xff\xd9")] + sos * 5, stop=3) == 4  # counts stop past ``stop``
    soi, eoi = b"\xff\xd8", b"\xff\xd9"
    assert jpeg_scans(soi + sos + b"\x12\xff\x01" + sos + eoi) == 2  # TEM is no marker: the next SOS is still seen
    assert jpeg_scans(soi + sos + eoi + b"\x00\x02" + sos * 3) == 1  # nothing after the end of image counts
    thumbnail = segment(0xE1, soi + sos * 3 + eoi)  # an EXIF thumbnail's scans are inside a segment, skipped whole
    assert jpeg_scans(soi + thumbnail + sos + eoi) == 1
    for progressive, scans in ((False, 1), (True, 10)):  # what an encoder writes for a colour image
        buf = io.BytesIO()
        Image.new("RGB", (32, 32), (10, 200, 30)).save(buf, "JPEG", progressive=progressive)
        assert jpeg_scans(buf.getvalue()) == scans


def test_video_of_huge_frames_is_downscaled_as_it_is_decoded():
    w, h = 2400, 1600
    video = make_video(n=3, rate=1, w=w, h=h)
    frames, times = load_video(video)
    assert times == [0.0, 1.0, 2.0]
    assert all(f.size == (1100, 733) for f in frames)  # 171x114 patches scaled to the 4096 of the image processor
    # the frames' content survives the scaling: frame i is uniformly grey at level 10*i
    assert [round(float(np.asarray(f).mean()) / 10) for f in frames] == [0, 1, 2]
    small, _ = load_video(video, image_processor=ImageProcessor(in_token_limit=50))
    assert all(f.size == (121, 81) for f in small)  # to the budget of the processor that will read them
    full, _ = load_video(make_video(n=2, rate=1, w=64, h=48))
    assert all(f.size == (64, 48) for f in full)  # frames under the cap are untouched


REFUSED = "it is no container kimivl reads; send one of MP4/MOV, Matroska/WebM, AVI"


def test_playlists_and_network_sessions_are_refused_before_they_open_anything(tmp_path, monkeypatch):
    """FFmpeg picks its demuxer from the bytes: an ffconcat playlist opened the files it names (relative to the
    working directory) and showed them as frames; an SDP description listened on UDP for ~20 s."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cam.mp4").write_bytes(make_video(n=3, rate=1))
    playlist = b"ffconcat version 1.0\nfile cam.mp4\n"
    sdp = b"v=0\no=- 0 0 IN IP4 127.0.0.1\ns=x\nc=IN IP4 127.0.0.1\nt=0 0\nm=video 18161 RTP/AVP 96\n"
    for payload in (playlist, sdp + b"a=rtpmap:96 H264/90000\n"):
        start = time.perf_counter()
        with pytest.raises(VideoError, match=f"cannot open video <{len(payload)} bytes>: {REFUSED}"):
            load_video(payload)
        assert time.perf_counter() - start < 2
    (tmp_path / "clip.mp4").write_bytes(playlist)  # the CLI's and the trainer's check, and a path in a chat
    with pytest.raises(VideoError, match=f"cannot open video clip.mp4: {REFUSED}"):
        check_video_file("clip.mp4")
    with pytest.raises(VideoError, match=f"cannot open video clip.mp4: {REFUSED}"):
        apply_chat_template([{"role": "user", "content": [{"type": "video", "video": "clip.mp4"}]}])
    assert load_video("cam.mp4")[1] == [0.0, 1.0, 2.0]  # the named file itself is a video that opens


@functools.cache
def _zero_png(w: int, h: int) -> bytes:
    """A w x h PNG in 16-bit RGBA, all zeros (8 bytes a pixel, compressed about 1000:1)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z, row = zlib.compressobj(9), b"\0" * (1 + 8 * w)
    idat = b"".join(z.compress(row) for _ in range(h)) + z.flush()
    header = struct.pack(">IIBBBBB", w, h, 16, 6, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def png_in_mov(sizes: list[tuple[int, int]]) -> bytes:
    """A MOV whose header says 64x64 and whose frames are zero PNGs of ``sizes``: a frame's true size is in its own
    PNG header only."""
    pngs = {size: _zero_png(*size) for size in set(sizes)}
    buf = io.BytesIO()
    with av.open(buf, "w", format="mov") as c:
        s = c.add_stream("png", rate=1)
        s.width, s.height, s.pix_fmt = 64, 64, "rgba64be"
        for k, size in enumerate(sizes):
            packet = av.Packet(pngs[size])
            packet.stream, packet.pts, packet.dts, packet.time_base = s, k, k, fractions.Fraction(1, 1)
            c.mux(packet)
    return buf.getvalue()


def _peak_mb() -> int:
    return int(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1]) // 1024


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux's resettable peak RSS")
@pytest.mark.parametrize("small", [0, 30])
def test_a_frame_larger_than_its_header_says_is_refused_before_it_is_allocated(small):
    """A 6000x6000 16-bit RGBA frame (288 MB decoded) behind a 64x64 header: FFmpeg decoded it inside av.open to
    learn the stream's details, or (after ``small`` 64x64 frames) its frame threads decoded several at once, before
    the per-frame check saw one. The decoder now refuses it from its own header."""
    video = png_in_mov([(64, 64)] * small + [(6000, 6000)] * 4)
    assert len(video) < 2_000_000
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS to the current RSS
    before = _peak_mb()
    with pytest.raises(VideoError, match="over max_frame_pixels=1048576"):
        load_video(video, max_frame_pixels=1 << 20, fps=30)
    assert _peak_mb() - before < 100


@pytest.mark.parametrize(
    "fmt, codec",
    [
        ("mp4", "mpeg4"),
        ("mov", "libx264"),
        ("matroska", "mpeg4"),
        ("webm", "libvpx-vp9"),
        ("avi", "mpeg4"),
        ("flv", "flv"),
        ("nut", "mpeg4"),
        ("mpegts", "libx264"),
        ("asf", "wmv2"),
        ("ogg", "libvpx"),
        ("gif", "gif"),
        ("m4v", "mpeg4"),
        ("h264", "libx264"),
        ("ivf", "libvpx-vp9"),
        ("mxf", "mpeg2video"),
        ("yuv4mpegpipe", "rawvideo"),
        ("mjpeg", "mjpeg"),
        ("mpeg2video", "mpeg2video"),
        ("apng", "apng"),
    ],
)
def test_every_container_read_decodes_as_ffmpeg_alone_does(fmt, codec):
    """Opened with only these demuxers allowed and no decoding while opening, a video gives the frames FFmpeg gives
    unrestricted, each once (fps above the frame rate)."""
    y, x = np.mgrid[0:48, 0:64]
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as c:
        s = c.add_stream(codec, rate=25)
        s.width, s.height, s.pix_fmt = (
            64,
            48,
            {"gif": "rgb8", "mjpeg": "yuvj420p", "apng": "rgb24"}.get(codec, "yuv420p"),
        )
        for i in range(8):
            a = np.stack([(x * 4 + 30 * i) % 256, y * 5, np.full_like(x, 25 * i)], -1).astype(np.uint8)
            for packet in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)
    with av.open(io.BytesIO(buf.getvalue())) as c:
        want = [f.to_image(width=64, height=48, interpolation="BICUBIC") for f in c.decode(video=0)]
    frames, _ = load_video(buf.getvalue(), fps=1000)
    assert len(want) == 8 and len(frames) == (7 if fmt == "nut" else 8)  # NUT's end: the last frame's start
    assert all(np.array_equal(np.asarray(a), np.asarray(b.convert("RGB"))) for a, b in zip(frames, want))


@pytest.mark.parametrize("bad", [float("nan"), -1.0, float("inf"), "1.0", True, None])
def test_bad_frame_timestamps(bad):
    frames = [np.zeros((28, 28, 3), np.uint8)] * 2
    with pytest.raises(
        VideoError,
        match=rf"video frame 1 has timestamp {bad!r}"
        if not isinstance(bad, float) or math.isfinite(bad)
        else "video frame 1 has timestamp",
    ):
        frames_to_parts(frames, [0.0, bad])
    with pytest.raises(VideoError, match="timestamps must be finite numbers of seconds >= 0"):
        apply_chat_template(
            [{"role": "user", "content": [{"type": "video", "frames": frames, "timestamps": [0.0, bad]}]}]
        )


@pytest.mark.parametrize(
    "fps,max_frames,message",
    [
        (float("nan"), 4, "need fps > 0"),
        (1.0, 2.5, "need max_frames"),
        (float("inf"), 4, "need fps > 0"),
        (1.0, -1, "need max_frames"),
    ],
)
def test_bad_sampling_settings(fps, max_frames, message):
    with pytest.raises(VideoError, match=message):
        load_video(b"anything", fps=fps, max_frames=max_frames)


def test_bad_timestamps_in_a_data_file(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "f.png")
    for bad in ("NaN", "-1", "Infinity"):
        record = (
            '{"messages": [{"role": "user", "content": [{"type": "video", "frames": ["f.png", "f.png"], '
            f'"timestamps": [0, {bad}]}}]}}, {{"role": "assistant", "content": "x"}}]}}'
        )
        json.loads(record)  # Python's JSON reads NaN and Infinity
        (tmp_path / "d.jsonl").write_text(record + "\n")
        with pytest.raises(DataError, match="finite numbers of seconds >= 0"):
            list(iter_records(tmp_path / "d.jsonl"))
