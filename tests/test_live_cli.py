"""`run_stream.py live` as a person runs it: a real process watching a real camera (ffmpeg),
stopped with Ctrl-C typed on its terminal (a pseudo-terminal) or with a signal, with and
without stdin; the camera killed under it. Repeated runs: `make test-all` (marker `slow`)."""
from __future__ import annotations

import signal

import pytest

from camera import FFMPEG, FfmpegCamera, LiveProcess

pytestmark = pytest.mark.skipif(FFMPEG is None, reason="ffmpeg not installed (make system-deps installs it)")

STOP_WITHIN_S = 10  # the bar: every run exits within 10 s of the signal


def live_args(model: str, url: str, *extra: str) -> list[str]:
    return [url, "--model", model, "--tokens-per-frame", "8", "--fps", "2", "--every", "1",
            "--watch", "What is shown?", *extra]


def assert_clean_stop(live: LiveProcess, rc, waited: float, code: int) -> None:
    err = "\n".join(live.err)
    assert rc is not None, f"still running {waited:.1f} s after the signal:\n{err[-3000:]}"
    assert waited < STOP_WITHIN_S
    assert rc == code, err[-3000:]
    assert "stopping" in err and "streamvz: stopped" in err, err[-3000:]  # the clean path, not the forced one
    assert "exiting now" not in err and "Traceback" not in err, err[-3000:]
    assert "Warning" not in err and "Loading weights" not in err, err[-3000:]  # no library chatter


def stop_once(model: str, stdin: str | None, how: str) -> None:
    with FfmpegCamera() as cam, LiveProcess(*live_args(model, cam.url), stdin=stdin) as live:
        live.wait_for("camera connected")
        live.wait_for(r'"What is shown\?" -> ')  # the first standing answer: the model is at work
        if how == "ctrl-c":
            live.ctrl_c()
        else:
            live.signal(getattr(signal, how))
        rc, waited = live.wait_exit(STOP_WITHIN_S + 20)
        print(f"live ({stdin or 'no stdin'}, {how}): exit {rc} {waited:.2f} s after the signal")
        assert_clean_stop(live, rc, waited, 130 if how in ("ctrl-c", "SIGINT") else 143)


def test_ctrl_c_on_the_terminal_stops_live(tiny_llava):
    stop_once(tiny_llava, "pty", "ctrl-c")


def test_sigterm_stops_live_without_stdin(tiny_llava):
    stop_once(tiny_llava, None, "SIGTERM")


@pytest.mark.slow
@pytest.mark.parametrize("run", range(10))
@pytest.mark.parametrize("stdin,how", [("pty", "ctrl-c"), (None, "SIGINT")])
def test_live_stops_every_time(tiny_llava, stdin, how, run):
    stop_once(tiny_llava, stdin, how)


def test_typed_questions_are_answered_and_the_camera_going_is_told(tiny_llava):
    """Lines typed on the terminal are questions; killing the camera prints, in plain words, that
    it is lost and each reconnect attempt; Ctrl-C then stops live while it reconnects."""
    with FfmpegCamera() as cam, LiveProcess(*live_args(tiny_llava, cam.url)) as live:
        live.wait_for(r"\d\d:\d\d:\d\d camera connected: http://127\.0\.0\.1")
        first = live.wait_for(r'\[video (\d+\.\d) s\] "What is shown\?" -> (.*)$')
        assert first.group(2).strip()
        live.type("Is it moving?\n")
        live.wait_for(r"Q: Is it moving\?")
        live.wait_for(r"A: ")
        cam.kill()
        live.wait_for(r"\d\d:\d\d:\d\d camera lost \(connection ended\); reconnecting")
        live.wait_for(r"reconnecting to the camera \(attempt 1, waiting [\d.]+ s\)")
        live.wait_for(r"reconnecting to the camera \(attempt 2,")
        live.ctrl_c()  # mid-reconnect
        rc, waited = live.wait_exit(STOP_WITHIN_S + 20)
        assert_clean_stop(live, rc, waited, 130)


def test_json_lines_for_scripts(tiny_llava):
    import json

    with FfmpegCamera() as cam, LiveProcess(*live_args(tiny_llava, cam.url, "--json"), stdin=None) as live:
        live.wait_for(r'"event": "first_answer"')
        cam.kill()
        live.wait_for(r'"event": "reconnecting"')
        live.signal(signal.SIGINT)
        rc, _ = live.wait_exit(STOP_WITHIN_S + 20)
        assert rc == 130
    events = [json.loads(line) for line in live.out]  # every stdout line is one JSON object
    kinds = [e.get("event") for e in events]
    assert kinds[0] == "connected" and "first_answer" in kinds
    assert kinds.index("disconnected") < kinds.index("reconnecting")
    first = events[kinds.index("first_answer")]
    assert first["question"] == "What is shown?" and isinstance(first["answer"], str) and first["t"] >= 0


def test_live_ends_on_its_own_when_a_realtime_file_ends_with_a_terminal_attached(tiny_llava, tmp_path):
    """The file ends: live exits on its own (once the frames still queued are taken in), without
    waiting for Enter on its terminal (it did wait, with stdin read by an executor thread)."""
    from videos import write_h264

    clip = write_h264(str(tmp_path / "clip.mp4"), 20, fps=10, size=(160, 96))  # 2 s
    with LiveProcess(*live_args(tiny_llava, clip, "--realtime")) as live:
        live.wait_for("the video ended", timeout=120)
        rc, waited = live.wait_exit(120)
        assert rc == 0, "\n".join(live.err[-30:])
        assert "Warning" not in "\n".join(live.err)
