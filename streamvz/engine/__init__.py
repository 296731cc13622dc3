"""The streaming engine: one model on one device, many sessions, one forward per step.

    core.py       Engine: the public API and the loop (schedule -> run on the worker -> apply)
    state.py      session and answer state, owned by the event loop
    scheduler.py  which rows go into the next forward (pure bookkeeping)
    step.py       Step / Row / StepOutput: the scheduler-runner contract
    runner.py     the worker side: vision batch, one LM forward over all rows, sampling
    prompt.py / sampling.py / detok.py
"""
from .core import Engine
from .step import CacheView

__all__ = ["CacheView", "Engine"]
