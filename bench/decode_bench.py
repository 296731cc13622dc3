"""Decode + sample throughput: decord vs PyAV on 720p and 1080p H.264, at 1, 2 and 8 fps.

    .venv/bin/python bench/decode_bench.py                 # 20 s clips in a temp dir
    .venv/bin/python bench/decode_bench.py --seconds 10 --repeat 1 --keep /tmp/clips

The clips pan across real photos (scikit-image) with a moving object, 30 fps, libx264
(preset fast, CRF 20, 2 s GOP, B-frames). Smooth pans compress very well (~1.5 Mbit/s at
1080p), so a second 1080p clip adds sensor-like grain (~6 Mbit/s, closer to a camera):
decoding cost grows with bitrate. A 5-minute 360p clip checks sparse sampling of long files.
Each run opens the file and reads every sampled frame as uint8 RGB through FileSource,
i.e. exactly what the pipeline does (PyAV: only the GOP prefixes the samples need). Figures:
sampled frames per second of wall time, "x real time" = clip duration / wall time (best of
--repeat, after one warm-up run), and the process CPU seconds (all threads), which moves
less than wall time when other jobs share the cores. Writes bench/results/decode.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from fractions import Fraction

import av
import numpy as np

from streamvz.sources import FileSource

HERE = os.path.dirname(os.path.abspath(__file__))


def _canvas(w: int, h: int) -> np.ndarray:
    """A 2x-wide mosaic of real photos to pan across."""
    from skimage import data
    from skimage.transform import resize

    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    tiles = [(resize(p, (h, w), preserve_range=True, anti_aliasing=True)).astype(np.uint8)
             for p in photos]
    return np.concatenate([np.concatenate(tiles[:2], 1), np.concatenate(tiles[2:], 1)], 0)


def make_clip(path: str, size: tuple[int, int], seconds: float, fps: int = 30, gop: int = 60,
              noise: float = 0.0) -> str:
    w, h = size
    canvas = _canvas(w, h)  # [2h, 2w, 3]
    n = int(seconds * fps)
    rng = np.random.default_rng(0)  # sensor-like grain, cycled: raises the bitrate to camera levels
    grain = [rng.normal(0, noise, (h, w, 1)).astype(np.int16) for _ in range(7)] if noise else None
    with av.open(path, "w") as out:
        st = out.add_stream("libx264", rate=Fraction(fps))
        st.width, st.height, st.pix_fmt = w, h, "yuv420p"
        st.options = {"preset": "fast", "crf": "20", "g": str(gop)}
        for i in range(n):
            a = i / max(1, n - 1)
            x = int(a * w) & ~1  # pan right and down across the mosaic
            y = int(0.5 * (1 - np.cos(2 * np.pi * a)) * h / 2) & ~1
            img = canvas[y:y + h, x:x + w].copy()
            bx = int((0.5 + 0.4 * np.sin(i / 15)) * (w - w // 8))
            img[h // 3:h // 3 + h // 8, bx:bx + w // 8] = (220, 40, 40)  # a moving object
            if grain is not None:
                img = np.clip(img + grain[i % len(grain)], 0, 255).astype(np.uint8)
            fr = av.VideoFrame.from_ndarray(img, format="rgb24")
            fr.pts = i
            fr.time_base = Fraction(1, fps)
            for p in st.encode(fr):
                out.mux(p)
        for p in st.encode():
            out.mux(p)
    return path


def run_once(path: str, decoder: str, fps: float | None, count: int | None = None):
    """(wall seconds, CPU seconds of all threads, frames) to open and read every sampled frame."""
    t0, c0 = time.perf_counter(), time.process_time()
    n = 0
    with FileSource(path, fps=fps, count=count, decoder=decoder, batch_size=8) as src:
        for _, images in src.batches():
            n += len(images)
    return time.perf_counter() - t0, time.process_time() - c0, n


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--repeat", type=int, default=2, help="runs per cell; the best is reported")
    p.add_argument("--fps", default="1,2,8")
    p.add_argument("--count", dest="counts", type=int, action="append", default=None,
                   help="also time count=N sampling (default: 16)")
    p.add_argument("--sizes", default="1280x720,1920x1080")
    p.add_argument("--grain", type=float, default=3.0,
                   help="std of the grain added to an extra 1080p clip (0: skip it)")
    p.add_argument("--long-seconds", type=float, default=300.0,
                   help="length of the 360p clip for sparse sampling (0: skip it)")
    p.add_argument("--decoders", default="decord,pyav")
    p.add_argument("--keep", help="directory to write/reuse the clips in (default: a temp dir)")
    p.add_argument("--out", default=os.path.join(HERE, "results", "decode.json"))
    a = p.parse_args(argv)
    a.counts = a.counts if a.counts is not None else [16]

    tmp = None if a.keep else tempfile.TemporaryDirectory(prefix="decode_bench_")
    clip_dir = a.keep or tmp.name
    os.makedirs(clip_dir, exist_ok=True)
    rows = []
    clips = []
    modes = [(float(f), None) for f in a.fps.split(",")] + [(None, c) for c in a.counts]
    plan = [(size, a.seconds, 0.0, modes) for size in a.sizes.split(",")]
    if a.grain > 0:  # the same 1080p pan with sensor grain: camera-like bitrate, harder to decode
        plan.append(("1920x1080", a.seconds, a.grain, modes[:len(a.fps.split(","))]))
    if a.long_seconds > 0:  # sparse sampling of a long file: does reading every packet hurt?
        plan.append(("640x360", a.long_seconds, 0.0, [(1.0, None)] + [(None, c) for c in a.counts]))
    for size, seconds, grain, modes in plan:
        w, h = (int(v) for v in size.split("x"))
        name = f"pan_{h}p_{seconds:g}s" + (f"_grain{grain:g}" if grain else "")
        path = os.path.join(clip_dir, name + ".mp4")
        if not os.path.exists(path):
            t0 = time.perf_counter()
            make_clip(path, (w, h), seconds, noise=grain)
            print(f"made {path} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        mbps = os.path.getsize(path) * 8 / seconds / 1e6
        label = f"{h}p {seconds:g}s {mbps:.1f}Mb/s" + (" grain" if grain else "")
        clips.append({"path": os.path.basename(path), "width": w, "height": h, "grain": grain,
                      "seconds": seconds, "fps": 30, "mbit_s": round(mbps, 2)})
        for dec in a.decoders.split(","):  # warm-up: library and codec initialisation, page cache
            run_once(path, dec, 1.0)
        for fps, count in modes:
            for dec in a.decoders.split(","):
                runs = [run_once(path, dec, fps, count) for _ in range(a.repeat)]
                best, cpu, n = min(runs)
                rows.append({"video": label, "sample_fps": fps, "count": count, "decoder": dec,
                             "frames": n,
                             "seconds_best": round(best, 3),
                             "seconds_median": round(statistics.median(r[0] for r in runs), 3),
                             "cpu_seconds": round(cpu, 3),
                             "frames_per_s": round(n / best, 1),
                             "x_realtime": round(seconds / best, 1),
                             "x_realtime_per_cpu_s": round(seconds / cpu, 1)})
                mode = f"{fps:g} fps" if fps else f"count={count}"
                print(f"{label} {mode} {dec:6s} {n:4d} frames {best:6.2f}s (cpu {cpu:6.2f}s) "
                      f"{n / best:7.1f} frames/s {seconds / best:6.1f}x real time", file=sys.stderr)
    result = {
        "bench": "decode",
        "command": "python bench/decode_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "av": av.__version__,
                    "note": "shared 2-core machine; other jobs may have been running"},
        "clips": clips,
        "encode": "libx264 preset=fast crf=20 g=60, 30 fps, yuv420p",
        "results": rows,
    }
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
    print("| video | sampling | decoder | frames | wall s | CPU s | frames/s | x real time |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        mode = f"{r['sample_fps']:g}" if r["sample_fps"] else f"count={r['count']}"
        print(f"| {r['video']} | {mode} | {r['decoder']} | {r['frames']} | "
              f"{r['seconds_best']:.2f} | {r['cpu_seconds']:.2f} | {r['frames_per_s']:.1f} | "
              f"{r['x_realtime']:.1f} |")
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
