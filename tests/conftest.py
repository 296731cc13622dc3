"""Shared fixtures: tiny random checkpoints saved once per test session."""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/ helpers (tiny_models, videos) import by name

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory) -> str:
    """Path of a tiny random LlavaForConditionalGeneration + LlavaProcessor (CLIP tower, 37 tokens)."""
    from tiny_models import make_tiny_llava

    return make_tiny_llava(str(tmp_path_factory.mktemp("tiny_llava")))
