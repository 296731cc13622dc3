"""Checkpoints streamvz cannot stream are refused at load with the family and the reason:
Gemma 3 (sliding-window layers) and Qwen3.5 (linear-attention layers) name what is in the way;
any other class lists the supported families. Through `--model PATH` as a user runs it."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from streamvz.adapters import NAMES, load_adapter
from streamvz.errors import StreamError
from tiny_refused import make_tiny_gemma3, make_tiny_qwen3_5
from videos import write_h264

ROOT = Path(__file__).resolve().parent.parent
CASES = {
    "gemma3": (make_tiny_gemma3, ["Gemma 3", "'gemma3'", "5 of 6 layers use sliding-window attention",
                                  "last 64 keys"]),
    "qwen3_5": (make_tiny_qwen3_5, ["Qwen3.5", "'qwen3_5'", "3 of 4 layers use linear attention",
                                    "recurrent state"]),
}


@pytest.mark.parametrize("family", list(CASES))
def test_non_full_attention_lm_is_refused_with_the_reason(tmp_path, family):
    build, phrases = CASES[family]
    path = build(tmp_path / family)
    with pytest.raises(StreamError) as e:
        load_adapter(str(path), device="cpu")
    assert e.value.code == "unsupported_model"
    for phrase in phrases + ["rolling KV cache", "Supported families", "Qwen2.5-VL"]:
        assert phrase in e.value.message, (phrase, e.value.message)


@pytest.mark.parametrize("family", list(CASES))
def test_cli_refuses_without_a_traceback(tmp_path, family):
    build, phrases = CASES[family]
    path = build(tmp_path / family)
    video = write_h264(tmp_path / "clip.mp4", 10)
    run = subprocess.run([sys.executable, str(ROOT / "run_stream.py"), "analyze", video, "-q", "what?",
                          "--model", str(path), "--device", "cpu"],
                         capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert run.returncode == 2, run.stderr
    assert "error [unsupported_model]" in run.stderr and phrases[0] in run.stderr and phrases[2] in run.stderr
    assert "Traceback" not in run.stderr


def test_any_other_class_lists_the_supported_families(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "blip-2", "text_config": {"model_type": "opt"}}))
    with pytest.raises(StreamError) as e:
        load_adapter(str(tmp_path))
    assert e.value.code == "unsupported_model" and "'blip-2'" in e.value.message
    assert "cannot be streamed" not in e.value.message  # no invented reason
    for model_type, name in NAMES.items():
        assert f"{name} ({model_type})" in e.value.message


def test_remote_code_internvl_points_to_the_transformers_format(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "internvl_chat", "llm_config": {}}))
    with pytest.raises(StreamError) as e:
        load_adapter(str(tmp_path))
    assert e.value.code == "unsupported_model" and "remote-code" in e.value.message and "-hf" in e.value.message
