"""Video ingest on real encoded video: files (decord, PyAV fallback) and live MPEG-TS on loopback."""
from __future__ import annotations

import asyncio
import math
import time

import numpy as np
import pytest

import videos as V
from streamvz.errors import StreamError
from streamvz.sources import FileSource, Frame, LiveSource, SourceError, open_source, probe

FPS, N, SIZE = 25, 75, (160, 96)  # 3 s pattern clips


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("clips")
    c = {
        "h264": V.write_h264(d / "a.mp4", N, FPS, SIZE),
        "faststart": V.write_h264(d / "fs.mp4", N, FPS, SIZE, faststart=True),
        "bframes": V.write_h264(d / "b.mp4", N, FPS, SIZE, preset="fast", gop=12),  # B-frames, short GOPs
        "bframes_ts": V.write_video(d / "b.ts", N, FPS, SIZE, "libx264", format="mpegts",
                                    options={"preset": "fast", "g": "12"}),  # Annex B, pts from 1.4 s
        "mjpeg": V.write_mjpeg(d / "m.avi", N, FPS, SIZE),
        "av1": V.write_av1(d / "av1.mp4", 10, FPS, SIZE),
        "empty": V.write_empty(d / "empty.avi"),
        "audio": V.write_audio_only(d / "audio.mp4"),
        "random": V.write_random_bytes(d / "random.mp4"),
        "missing": str(d / "missing.mp4"),
    }
    c["truncated"] = V.truncate_copy(c["faststart"], d / "trunc_fs.mp4", 0.5)
    c["no_index"] = V.truncate_copy(c["h264"], d / "trunc.mp4", 0.5)  # moov atom lost
    (d / "zero.mp4").write_bytes(b"")
    c["zero_bytes"] = str(d / "zero.mp4")
    return c


async def collect(src, limit=None, delay=0.0):
    out = []
    async for f in src:
        out.append(f)
        if delay:
            await asyncio.sleep(delay)
        if limit and len(out) >= limit:
            break
    return out


# ---- files: sampling, seeking, metadata ------------------------------------------

@pytest.mark.parametrize("kind", ["h264", "mjpeg"])
@pytest.mark.parametrize("fps", [1, 2, 5, 25])
def test_fps_sampling_count_and_timestamps(clips, kind, fps):
    with FileSource(clips[kind], fps=fps) as src:
        times, images = zip(*src.batches(batch_size=4))
    t, img = np.concatenate(times), np.concatenate(images)
    assert len(t) == math.ceil(N / FPS * fps)
    targets = np.arange(len(t)) / fps
    assert np.all(t >= targets - 1e-3) and np.all(t - targets < 1 / FPS + 1e-3)  # within one frame
    assert [V.index_of(x) for x in img] == [round(x * FPS) for x in t]  # the image is that frame
    assert img.dtype == np.uint8 and img.shape[1:] == (SIZE[1], SIZE[0], 3)


def test_rgb_channel_order(clips):
    with FileSource(clips["h264"], count=1) as src:
        (_, img), = src.batches()
    bottom = img[0, -10:, :, :].reshape(-1, 3).mean(0)  # pattern: R ramp, G = 128, B = 0
    assert abs(bottom[1] - 128) < 12 and bottom[2] < 20 and bottom[0] > 60


def test_metadata_up_front(clips):
    src = FileSource(clips["h264"], fps=1).open()
    assert src.backend == "pyav"  # auto: the faster decoder in bench/decode_bench.py
    assert src.native_fps == pytest.approx(FPS)
    assert src.frame_count == N
    assert src.duration == pytest.approx(N / FPS, abs=1e-3)
    assert (src.info.width, src.info.height) == SIZE and src.info.codec == "h264"
    assert np.allclose(src.timestamps(), [0, 1, 2])


def test_count_spreads_evenly(clips):
    with FileSource(clips["h264"], count=6) as src:
        t = np.concatenate([b[0] for b in src.batches()])
    assert len(t) == 6
    assert np.allclose(np.diff(t), 0.5, atol=1 / FPS + 1e-3)
    assert t[0] < 0.5 and t[-1] > 2.5


@pytest.mark.parametrize("decoder", ["decord", "pyav"])
def test_seek_start_end(clips, decoder):
    with FileSource(clips["h264"], fps=5, start=1.2, end=2.2, decoder=decoder) as src:
        assert src.backend == decoder
        t, img = (np.concatenate(x) for x in zip(*src.batches()))
    assert len(t) == 5
    assert np.allclose(t, 1.2 + np.arange(5) * 0.2, atol=1 / FPS + 1e-3)
    assert [V.index_of(x) for x in img] == [round(x * FPS) for x in t]


def test_pyav_and_decord_sample_the_same_frames(clips):
    picks = {}
    for dec in ("decord", "pyav"):
        with FileSource(clips["h264"], fps=3, decoder=dec) as src:
            t, img = (np.concatenate(x) for x in zip(*src.batches()))
        picks[dec] = (np.round(t, 3).tolist(), [V.index_of(x) for x in img])
    assert picks["decord"] == picks["pyav"]


@pytest.mark.parametrize("kw", [dict(fps=1), dict(fps=2), dict(fps=8), dict(count=7),
                                dict(fps=3, start=0.7, end=2.5)])
def test_pyav_gop_skipping_matches_decord_with_bframes(clips, kw):
    out = {}
    for dec in ("decord", "pyav"):
        with FileSource(clips["bframes"], decoder=dec, **kw) as src:
            out[dec] = [np.concatenate(x) for x in zip(*src.batches())]
    assert np.allclose(out["decord"][0], out["pyav"][0], rtol=0, atol=1e-6)
    assert np.array_equal(out["decord"][1], out["pyav"][1])  # same frames, bit for bit


@pytest.mark.parametrize("kind", ["bframes", "bframes_ts"])
@pytest.mark.parametrize("kw", [dict(fps=2), dict(count=7), dict(fps=3, start=0.7, end=2.5),
                                dict(fps=1, start=1.9)])
def test_pyav_sampling_equals_picking_from_a_full_decode(clips, kind, kw):
    from streamvz.sources.file import pick_indices, sample_targets

    with FileSource(clips[kind], decoder="pyav") as src:  # no sampling: every frame decoded
        all_t, all_img = (np.concatenate(x) for x in zip(*src.batches()))
    assert len(all_t) == N and np.allclose(all_t, np.arange(N) / FPS)
    start, end = kw.get("start", 0.0), kw.get("end", N / FPS)
    pick = pick_indices(all_t, sample_targets(start, end, kw.get("fps"), kw.get("count")))
    with FileSource(clips[kind], decoder="pyav", **kw) as src:
        t, img = (np.concatenate(x) for x in zip(*src.batches()))
    assert np.allclose(t, all_t[pick]) and np.array_equal(img, all_img[pick])


def test_sparse_sampling_decodes_fewer_packets(clips):
    import av
    from streamvz.sources.file import _needed_packets, h264_nonref_test

    targets = np.array([0.4, 1.4, 2.4])  # late in their GOPs: B-frames before them
    with av.open(clips["bframes"]) as c:
        vs = c.streams.video[0]
        every = [p for p in c.demux(vs) if p.size]
        nonref = h264_nonref_test(vs.codec_context)
        c.seek(0, stream=vs)
        prefixes = list(_needed_packets(c.demux(vs), targets, 0.0, vs.time_base))
        c.seek(0, stream=vs)
        picked = list(_needed_packets(c.demux(vs), targets, 0.0, vs.time_base, nonref))
    keys = sum(p.is_keyframe for p in every)
    assert keys > 3 and len(prefixes) < len(every) // 2  # 3 targets need 3 GOP prefixes at most
    assert [p.is_keyframe for p in prefixes].count(True) <= 3
    assert sum(nonref(bytes(p)) for p in every) > 0 and len(picked) < len(prefixes)


async def test_async_file_source_yields_frames_in_order(clips):
    async with open_source(clips["h264"], fps=5) as src:
        assert isinstance(src, FileSource)
        frames = await collect(src)
    assert all(isinstance(f, Frame) for f in frames)
    assert [V.index_of(f.image) for f in frames] == list(range(0, N, 5))
    assert src.frames_read == len(frames) == 15 and src.frames_dropped == 0


async def test_file_backpressure_never_drops(clips):
    async with open_source(clips["h264"], queue_size=2, batch_size=4) as src:
        frames = await collect(src, delay=0.01)
    assert [V.index_of(f.image) for f in frames] == list(range(N))
    assert src.frames_dropped == 0


async def test_cancelling_the_consumer_stops_the_decoder(clips):
    src = open_source(clips["h264"], queue_size=1, batch_size=1)
    got = asyncio.Event()

    async def consume():
        async with src:
            async for _ in src:
                got.set()
                await asyncio.sleep(3600)  # a consumer that never keeps up

    task = asyncio.create_task(consume())
    await asyncio.wait_for(got.wait(), 10)
    assert src.running  # the decoder is blocked on the full queue
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not src.running and src.frames_read < N


# ---- files: bad input ----------------------------------------------------------------

@pytest.mark.parametrize("kind,code", [
    ("missing", "file_not_found"),
    ("random", "not_a_video"),
    ("audio", "not_a_video"),
    ("empty", "empty_video"),
    ("zero_bytes", "empty_video"),
    ("no_index", "corrupt_video"),
])
async def test_bad_files_fail_up_front_with_a_code(clips, kind, code):
    with pytest.raises(SourceError) as e:
        async with open_source(clips[kind], fps=1):
            pass
    assert e.value.code == code and isinstance(e.value, StreamError)
    assert e.value.to_dict()["code"] == code and clips[kind].split("/")[-1] in e.value.message


def test_resolution_limit(clips):
    with pytest.raises(SourceError) as e:
        probe(clips["h264"], max_pixels=100 * 100)
    assert e.value.code == "resolution_too_large" and e.value.details["width"] == SIZE[0]


def test_unsupported_codec_for_decord_and_pyav_fallback(clips):
    with pytest.raises(SourceError) as e:
        FileSource(clips["av1"], decoder="decord").open()
    assert e.value.code == "unsupported_codec"
    with FileSource(clips["av1"], fps=25) as src:  # PyAV decodes AV1
        assert src.backend == "pyav"
        t, img = (np.concatenate(x) for x in zip(*src.batches()))
    assert [V.index_of(x) for x in img] == list(range(10))


async def test_truncated_file_yields_good_frames_then_corrupt_error(clips):
    frames = []
    with pytest.raises(SourceError) as e:
        async with open_source(clips["truncated"], fps=5) as src:
            async for f in src:
                frames.append(f)
    assert e.value.code == "corrupt_video"
    last_good = e.value.details["last_good_t"]
    assert 0.2 < last_good < N / FPS - 0.5  # about half the clip decoded
    assert frames and frames[-1].t <= last_good
    assert [V.index_of(f.image) for f in frames] == [round(f.t * FPS) for f in frames]


async def test_truncated_file_warn_mode_ends_with_a_status_event(clips):
    events = []
    async with open_source(clips["truncated"], fps=5, on_corrupt="warn", on_status=events.append) as src:
        frames = await collect(src)
    warn = [e for e in events if e["event"] == "warning"]
    assert frames and len(warn) == 1 and warn[0]["code"] == "corrupt_video"
    assert warn[0]["last_good_t"] >= frames[-1].t


# ---- live: MPEG-TS over loopback TCP/UDP -------------------------------------------

LIVE = dict(stall_timeout=2.0, open_timeout=3.0, backoff=(0.2, 1.0))


async def test_live_tcp_in_order_without_drops_when_consumer_keeps_up():
    port = V.free_port()
    with V.MpegTsSender("tcp", port, n_frames=40, fps=FPS) as snd:
        async with open_source(snd.reader_url, queue_size=64, reconnect=False, **LIVE) as src:
            assert isinstance(src, LiveSource)
            frames = await collect(src)
    assert [V.index_of(f.image) for f in frames] == list(range(40))
    assert src.frames_dropped == 0
    t = np.array([f.t for f in frames])
    assert t[0] == 0 and np.allclose(np.diff(t), 1 / FPS, atol=1e-3)  # the stream's clock


async def test_live_slow_consumer_drops_oldest_and_counts():
    port = V.free_port()
    with V.MpegTsSender("tcp", port, n_frames=50, fps=FPS) as snd:
        async with open_source(snd.reader_url, queue_size=4, reconnect=False, **LIVE) as src:
            frames = await collect(src, delay=0.1)  # ~4x slower than the stream
    idx = [V.index_of(f.image) for f in frames]
    assert idx == sorted(set(idx))  # strictly in order
    assert src.frames_dropped > 0
    assert src.frames_read == 50 == len(frames) + src.frames_dropped
    assert idx[-1] == 49  # the freshest frames survive


async def test_live_fps_sampling():
    port = V.free_port()
    with V.MpegTsSender("tcp", port, n_frames=50, fps=FPS) as snd:
        async with open_source(snd.reader_url, fps=5, queue_size=64, reconnect=False, **LIVE) as src:
            frames = await collect(src)
    idx = [V.index_of(f.image) for f in frames]
    assert idx == list(range(0, 50, 5))
    assert np.allclose(np.diff([f.t for f in frames]), 0.2, atol=1e-3)


async def test_live_reconnects_after_the_sender_restarts():
    port = V.free_port()
    events = []
    snd = V.MpegTsSender("tcp", port, n_frames=20, fps=FPS).start()
    frames = []
    try:
        async with open_source(snd.reader_url, queue_size=64, on_status=events.append, **LIVE) as src:
            async for f in src:
                frames.append(f)
                if V.index_of(f.image) == 19:  # the first sender is done: start another
                    snd.wait(10)
                    snd = V.MpegTsSender("tcp", port, n_frames=30, fps=FPS, start_index=1000).start()
                if V.index_of(f.image) >= 1010:
                    break
    finally:
        snd.stop()
    idx = [V.index_of(f.image) for f in frames]
    assert idx[:20] == list(range(20)) and idx[20:] == list(range(1000, 1011))
    kinds = [e["event"] for e in events]
    assert kinds[0] == "connected" and "disconnected" in kinds and "reconnecting" in kinds
    assert events[-1]["event"] == "connected" and events[-1]["reconnects"] == 1 == src.reconnects
    t = [f.t for f in frames]
    assert all(b > a for a, b in zip(t, t[1:]))  # time never goes back across the restart


async def test_live_stall_is_reported_and_bounded():
    port = V.free_port()
    events = []
    frames = []
    with V.MpegTsSender("tcp", port, n_frames=40, fps=FPS, pause_at=10, pause_s=30) as snd:
        t0 = time.monotonic()
        with pytest.raises(SourceError) as e:
            async with open_source(snd.reader_url, on_status=events.append, max_reconnects=2,
                                   **{**LIVE, "stall_timeout": 1.0}) as src:
                async for f in src:
                    frames.append(f)
        elapsed = time.monotonic() - t0
    assert e.value.code == "source_stalled"
    assert [V.index_of(f.image) for f in frames] == list(range(10))
    stalled = [ev for ev in events if ev["event"] == "stalled"]
    assert len(stalled) == 1 and stalled[0]["code"] == "source_stalled"
    assert sum(ev["event"] == "reconnecting" for ev in events) == 2
    assert elapsed < 15  # gave up instead of hanging on a silent sender


async def test_live_unreachable_url():
    port = V.free_port()  # nobody listens there
    with pytest.raises(SourceError) as e:
        async with open_source(f"tcp://127.0.0.1:{port}", open_retries=1, **LIVE):
            pass
    assert e.value.code == "unreachable_url" and str(port) in e.value.message


async def test_cancelling_a_live_consumer_stops_the_thread():
    port = V.free_port()
    with V.MpegTsSender("tcp", port, n_frames=500, fps=FPS) as snd:
        src = open_source(snd.reader_url, **LIVE)
        first = asyncio.Event()

        async def consume():
            async with src:
                async for _ in src:
                    first.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(first.wait(), 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not src.running
        read = src.frames_read
        await asyncio.sleep(0.3)
        assert src.frames_read == read  # nothing decodes any more


async def test_live_udp_mpegts():
    port = V.free_port(V.socket.SOCK_DGRAM)
    src = open_source(f"udp://127.0.0.1:{port}", queue_size=64, **LIVE)
    snd = None

    async def start_sender():
        nonlocal snd
        await asyncio.sleep(0.3)  # the reader binds the port first
        snd = await asyncio.to_thread(V.MpegTsSender("udp", port, n_frames=60, fps=FPS).start)

    sender = asyncio.create_task(start_sender())
    try:
        async with src:
            frames = await collect(src, limit=30)
    finally:
        await sender
        if snd:
            snd.stop()
    idx = [V.index_of(f.image) for f in frames]
    assert len(idx) == 30 and idx == sorted(set(idx))


async def test_file_played_in_real_time(clips):
    events = []
    t0 = time.monotonic()
    async with open_source(clips["h264"], fps=5, realtime=True, on_status=events.append) as src:
        assert isinstance(src, LiveSource)
        frames = await collect(src)
    elapsed = time.monotonic() - t0
    assert [V.index_of(f.image) for f in frames] == list(range(0, N, 5))
    assert elapsed >= frames[-1].t - 0.05  # paced by the clock, never ahead of it
    assert events[0]["event"] == "connected" and events[-1]["event"] == "ended"


async def test_file_played_in_a_loop(clips):
    async with open_source(clips["av1"], realtime=True, loop=True) as src:  # 10 frames, 0.4 s
        frames = await collect(src, limit=25)
    assert [V.index_of(f.image) for f in frames] == [*range(10), *range(10), *range(5)]
    t = [f.t for f in frames]
    assert all(b > a for a, b in zip(t, t[1:]))


@pytest.mark.parametrize("fmt", ["mpegts", "mpjpeg"])
async def test_live_http(fmt):
    port = V.free_port()
    frames = []
    with V.MpegTsSender("http", port, n_frames=30, fps=FPS, fmt=fmt) as snd:
        async with open_source(snd.reader_url, queue_size=64, **LIVE) as src:
            async for f in src:
                frames.append(f)
                if V.index_of(f.image) == 29:
                    break
    idx = [V.index_of(f.image) for f in frames]
    assert idx == list(range(30))


async def test_live_resolution_limit_is_not_retried():
    port = V.free_port()
    events = []
    with V.MpegTsSender("tcp", port, n_frames=50, fps=FPS) as snd:
        with pytest.raises(SourceError) as e:
            async with open_source(snd.reader_url, max_pixels=100 * 90, on_status=events.append,
                                   **LIVE):
                pass
    assert e.value.code == "resolution_too_large"
    assert not any(ev["event"] == "reconnecting" for ev in events)


# ---- RTSP: transport choice against a server that offers only UDP ------------------

@pytest.mark.skipif(__import__("shutil").which("ffmpeg") is None, reason="ffmpeg not installed")
@pytest.mark.parametrize("transport", ["auto", "udp", "tcp"])
async def test_rtsp_transport_with_a_udp_only_camera(transport):
    from rtsp_server import UdpOnlyRtspServer

    events = []
    with UdpOnlyRtspServer() as cam:
        src = open_source(cam.url, rtsp_transport=transport, reconnect=False, open_retries=0,
                          on_status=events.append, **LIVE)
        if transport == "tcp":  # RTP over TCP is what this camera refuses
            with pytest.raises(SourceError) as e:
                async with src:
                    pass
            assert e.value.code == "unreachable_url"
            assert ["TCP" in t for t in cam.setups] == [True]
            return
        async with src:
            frames = await collect(src, limit=5)
    assert len(frames) == 5 and frames[0].image.shape == (96, 160, 3)
    assert src.rtsp_transport_used == "udp" == events[0]["rtsp_transport"]
    # auto asked for TCP first, then UDP; udp asked for UDP only
    assert ["TCP" in t for t in cam.setups] == ([True, False] if transport == "auto" else [False])


def test_rtsp_transport_is_checked():
    with pytest.raises(ValueError):
        LiveSource("rtsp://127.0.0.1:1/x", rtsp_transport="http")
