"""The README's Python blocks run as written, on the embedded model (each in its own process,
from a fresh directory). A block preceded by `<!-- not run: why -->` is skipped, and says why."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(<!-- not run: [^>]*-->\n)?```python\n(.*?)```", re.S)


def blocks() -> list[tuple[str, str | None]]:
    return [(code, skip) for skip, code in BLOCK.findall((ROOT / "README.md").read_text())]


def test_the_readme_has_python_blocks_and_says_why_one_is_not_run():
    found = blocks()
    assert len(found) >= 3
    assert sum(bool(skip) for _, skip in found) <= 1  # only the drop-in, which needs a LLaVA checkpoint


@pytest.mark.tiny
@pytest.mark.parametrize("index", range(len(blocks())))
def test_readme_python_block_runs(index, tmp_path):
    from streamvz.errors import StreamError
    from streamvz.tiny import weights

    code, skip = blocks()[index]
    if skip:
        pytest.skip(skip.strip())
    try:
        weights.verify(full=False)
    except StreamError as e:
        pytest.skip(f"streamvz-tiny not installed: {e.message}")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip()  # every block prints what it shows
    if "session.ask" in code:
        assert "'finish_reason'" in r.stdout and "completion_tokens" in r.stdout
    if "vz.compress" in code:
        assert "torch.Size([1, 64, 384]) torch.Size([1, 54])" in r.stdout


def test_help_shows_the_defaults_and_when_analyze_answers(capsys):
    sys.path.insert(0, str(ROOT))
    from run_stream import build_parser

    shown = {}
    for cmd in ("serve", "analyze", "live", "demo"):
        with pytest.raises(SystemExit):
            build_parser().parse_args([cmd, "--help"])
        shown[cmd] = " ".join(capsys.readouterr().out.split())  # unwrapped
    assert "--port PORT websocket/HTTP port (default: 8765)" in shown["serve"]
    assert "(default: 64)" in shown["serve"]  # --tokens-per-frame, an engine option
    assert "--every EVERY seconds of video between standing checks (default: 10.0)" in shown["live"]
    assert "(default: auto)" in shown["live"] and "--json" in shown["live"]
    assert "--seconds SECONDS length of the generated sample clip (default: 8.0)" in shown["demo"]
    assert "once, at the end of the video, from the frames still in the window" in shown["analyze"]
    assert "(default: None)" not in " ".join(shown.values())
