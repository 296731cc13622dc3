"""Analysis jobs on a real local Ray (2 CPUs): `analyze --ray` matches the single-process run."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from videos import pattern_frame, truncate_copy, write_h264

ray = pytest.importorskip("ray", reason="Ray is the `scale` extra (make test installs it)")
ROOT = Path(__file__).resolve().parents[1]
QUESTION = "What is shown?"


@pytest.fixture(scope="module")
def ray_address():
    from pipelines.analyze_ray import connect

    connect(num_cpus=2)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("clips")
    good = [write_h264(str(d / f"clip{k}.mp4"), [pattern_frame(i + 9 * k) for i in range(8)], fps=4) for k in range(4)]
    whole = write_h264(str(d / "whole.mp4"), 40, fps=4)
    bad = truncate_copy(whole, d / "cut.mp4", 0.4)  # a download cut short: the index is missing
    long = write_h264(str(d / "long.mp4"), [pattern_frame(i) for i in range(24)], fps=4)
    return good, bad, long


def answers(report: dict) -> dict:
    return {Path(v["video"]).name: [a["answer"] for a in v["answers"]] for v in report["videos"]}


async def test_analyze_ray_cli_matches_single_process_and_reports_the_corrupt_file(ray_address, clips, tiny_llava,
                                                                                   tmp_path):
    from pipelines.analyze_ray import analyze_here
    from streamvz.engine import Engine

    good, bad, _ = clips
    out = tmp_path / "job"
    cmd = [sys.executable, str(ROOT / "run_stream.py"), "analyze", "--ray", ray_address, "--actors", "2",
           *good[:2], bad, *good[2:], "-q", QUESTION, "--fps", "2", "--max-tokens", "8", "--model", tiny_llava,
           "--tokens-per-frame", "8", "--out", str(out)]
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=str(ROOT))
    _, err = await asyncio.wait_for(proc.communicate(), 280)
    assert proc.returncode == 0, err.decode()[-3000:]
    assert "jobs on 2 actors" in err.decode()  # one progress bar for the whole job
    job = json.loads(Path(f"{out}.json").read_text())
    assert job["actors"] == 2 and [Path(v["video"]).name for v in job["videos"]] == [Path(g).name for g in good]
    assert [(Path(e["video"]).name, e["code"]) for e in job["errors"]] == [("cut.mp4", "corrupt_video")]
    assert all(v["frames"] == 4 for v in job["videos"])
    md = Path(f"{out}.md").read_text()
    assert "4 done, 1 failed" in md and "cut.mp4" in md
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a 1-CPU Ray actor: same float sums, so the same greedy tokens
    try:
        async with Engine(model=tiny_llava, tokens_per_frame=8) as engine:
            here = await analyze_here(engine, [*good, bad], [QUESTION], None, fps=2, max_tokens=8, progress=False)
    finally:
        torch.set_num_threads(threads)
    assert answers(job) == answers(here) and all(a[0] for a in answers(here).values())
    assert here["errors"][0]["code"] == "corrupt_video"


async def test_segments_of_one_long_file_merge_in_time_order(ray_address, clips, tiny_llava):
    from pipelines.analyze_ray import analyze_on_ray

    _, _, long = clips
    report = await analyze_on_ray([long], {"model": tiny_llava, "tokens_per_frame": 8}, questions=[QUESTION],
                                  summary_every=1.0, fps=2, max_tokens=6, segments=2, actors=2, progress=False)
    assert report["actors"] == 2 and not report["errors"]
    (video,) = report["videos"]
    assert [(s["segment"], s["start"], s["end"]) for s in video["segments"]] == [(0, 0.0, 3.0), (1, 3.0, 6.0)]
    assert [s["frames"] for s in video["segments"]] == [6, 6] and video["frames"] == 12
    times = [e["t"] for e in video["summary"]]
    assert times == sorted(times) and {e["segment"] for e in video["summary"]} == {0, 1}
    assert all(e["t"] <= 3.0 for e in video["summary"] if e["segment"] == 0)
    assert all(e["t"] > 3.0 for e in video["summary"] if e["segment"] == 1)
    assert [a["segment"] for a in video["answers"]] == [0, 1]
