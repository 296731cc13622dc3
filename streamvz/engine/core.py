"""The engine: sessions in, one LM forward per step, answers out.

    async with Engine("path/to/llava", tokens_per_frame=64, window_frames=120) as engine:
        session = engine.session(system_prompt="You watch a kitchen camera.")
        await session.add_frame(frame, t=12.5)          # encoded, compressed, prefilled now
        async for delta in session.ask("What is on the table?"):
            print(delta, end="")

The loop, on the event loop:

    while running:
        step = scheduler.schedule(sessions)                  # plain data: which rows (scheduler.py)
        out = await worker(runner.execute, step)             # one vision batch + ONE forward (runner.py)
        apply(step, out, states)                             # futures, tokens, ends (update.py)

All session and answer state belongs to the loop; the worker thread owns the model and the KV
store and sees only immutable steps. Memory is fixed at start: max_sessions x budget rows.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from ..config import EngineConfig
from ..errors import StreamError
from ..images import check_image
from ..session import Answer, Session
from ..temporal import TemporalConfig
from .detok import Detokenizer
from .prompt import Prompt
from .runner import Runner, internal
from .scheduler import Scheduler
from .state import AnswerState, QueuedFrame, SessionState
from .step import CacheView, RowResult, StepOutput
from .update import apply

log = logging.getLogger(__name__)


class Engine:
    def __init__(self, model="streamvz-tiny", device=None, dtype=None, config: EngineConfig | None = None,
                 **settings):
        """`settings` override `config` field by field (tokens_per_frame=16, window_frames=30, ...)."""
        cfg = (config or EngineConfig()).with_(**settings)
        if isinstance(model, str):
            from ..adapters import load_adapter

            if device is None:
                device = "cuda" if torch.cuda.is_available() else "cpu"
            model = load_adapter(model, tokens_per_frame=cfg.tokens_per_frame, device=device, dtype=dtype)
        self.adapter = model
        max_pos = self.adapter.max_position_embeddings
        budget = cfg.cache_budget_tokens or max_pos
        if budget > max_pos:
            raise ValueError(f"cache_budget_tokens={budget} is over the model's {max_pos} positions")
        self.config = cfg.with_(cache_budget_tokens=budget)
        self.prompt = Prompt(self.adapter.tokenizer, self.adapter.chat)
        temporal = TemporalConfig(cfg.temporal, cfg.temporal_threshold, cfg.key_frame_every, cfg.scene_change,
                                  cfg.temporal_min_tokens)
        self.runner = Runner(self.adapter, budget, cfg.max_sessions, cfg.window_frames, cfg.turn_share, temporal)
        self.scheduler = Scheduler(self.config, self.prompt.frame, self.prompt.end_of_turn)
        self.sessions: dict[str, Session] = {}
        self._states: dict[str, SessionState] = {}
        self._free = list(range(cfg.max_sessions))
        self._eos = set(self.adapter.eos_token_ids)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="streamvz-model")
        self._task: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self._closed = False
        self._answer_ids = 0

    @property
    def budget_tokens(self) -> int:
        return self.config.cache_budget_tokens

    def memory(self) -> dict:
        """The KV store, fixed at start: max_sessions x budget x bytes per token."""
        st = self.runner.store
        return dict(slots=st.slots, budget_tokens=st.budget, bytes_per_token=st.bytes_per_token,
                    bytes_total=st.nbytes_total)

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        """Start the loop on the running event loop (idempotent; the first await on a session
        starts it too, so plain scripts need not call it)."""
        loop = asyncio.get_running_loop()
        if self._closed or (self._task is not None and not self._task.done() and self._task.get_loop() is loop):
            return
        self._wake = asyncio.Event()
        self._task = loop.create_task(self._run(), name="streamvz-engine")

    def _kick(self) -> None:
        try:
            self.start()
        except RuntimeError:  # called outside a running loop: the first await starts the engine
            return
        self._wake.set()

    async def __aenter__(self):
        self.start()
        return self

    async def __aexit__(self, *exc):
        await self.aclose()

    async def aclose(self) -> None:
        for sid in list(self._states):
            await self.close_session(sid)
        self._closed = True
        if self._task is not None:
            self._wake.set()
            try:
                async with asyncio.timeout(30):
                    await self._task
            except Exception:  # noqa: BLE001 - shutting down regardless
                self._task.cancel()
        await asyncio.get_running_loop().run_in_executor(None, self._pool.shutdown)

    # -- the loop ------------------------------------------------------------------------------
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._closed:
            self._wake.clear()
            step = self.scheduler.schedule(list(self._states.values()))
            if step is None:
                await self._wake.wait()
                continue
            try:
                out = await loop.run_in_executor(self._pool, self.runner.execute, step)
            except Exception as e:  # noqa: BLE001 - a bug in a step must not leave every session hanging
                err = internal(e, "step")
                out = StepOutput([RowResult(error=err, frame_errors=[err] * len(r.frames)) for r in step.rows])
            apply(step, out, self._states)

    # -- sessions ------------------------------------------------------------------------------
    def session(self, system_prompt: str | None = None, session_id: str | None = None) -> Session:
        if self._closed:
            raise StreamError("engine_closed", "the engine is shut down")
        if not self._free:
            raise StreamError("too_many_sessions", f"the engine holds {self.config.max_sessions} sessions")
        if session_id is None:
            session_id = secrets.token_urlsafe(12)
        if session_id in self._states:
            raise StreamError("session_exists", f"session {session_id!r} already exists")
        if system_prompt is None:
            system_prompt = getattr(self.adapter, "default_system", "")
        ids = self.prompt.system(system_prompt)
        most = int(self.budget_tokens * self.config.system_share)
        if len(ids) > most:
            raise StreamError("system_prompt_too_long", f"the system prompt is {len(ids)} tokens; "
                              f"at most {most} fit a {self.budget_tokens}-token cache")
        st = SessionState(session_id, system_prompt, ids, slot=self._free.pop(0))
        st.idle.set()
        self._states[session_id] = st
        self.sessions[session_id] = Session(self, st)
        return self.sessions[session_id]

    def get_session(self, session_id: str) -> Session:
        if session_id not in self.sessions:
            raise StreamError("unknown_session", f"no session {session_id!r}")
        return self.sessions[session_id]

    def _open_state(self, session_id: str) -> SessionState:
        s = self._states.get(session_id)
        if s is None or s.closed:
            raise StreamError("session_closed", f"session {session_id!r} is closed")
        return s

    @staticmethod
    def _stamp(s: SessionState, t) -> float:
        return time.monotonic() - s.t0 if t is None else float(t)

    async def add_frame(self, session_id: str, image, t: float | None = None) -> None:
        """Encode, compress and prefill one frame; returns once it is in the cache."""
        s = self._open_state(session_id)
        image = check_image(image)
        f = QueuedFrame(image, self._stamp(s, t), s.next_seq())
        f.done = s.frame_futures[f.seq] = asyncio.get_running_loop().create_future()
        s.frames.append(f)
        s.frames_seen += 1
        self._kick()
        await f.done

    def submit_frame(self, session_id: str, image, t: float | None = None) -> None:
        """Queue a frame without waiting. Past the backlog limit the oldest queued frame is dropped."""
        s = self._open_state(session_id)
        image = check_image(image)
        s.frames.append(QueuedFrame(image, self._stamp(s, t), s.next_seq()))
        s.frames_seen += 1
        droppable = [f for f in s.frames if f.done is None]
        while len(s.frames) > self.config.max_backlog_frames and droppable:
            s.frames.remove(droppable.pop(0))
            s.frames_dropped += 1
        self._kick()

    def ask(self, session_id: str, question: str, max_new_tokens: int | None = None, temperature: float = 0.0,
            top_p: float = 1.0, seed: int | None = None, since: float | None = None, ignore_eos: bool = False) -> Answer:
        """Queue a question; it sees every frame added or submitted before it (with `since`, only
        the frames of the last `since` seconds of stream time before it). `ignore_eos` keeps
        generating to max_new_tokens (benchmarks, as vLLM's sampling parameter of that name)."""
        s = self._open_state(session_id)
        max_new_tokens = self.config.check_ask(question, max_new_tokens, temperature, top_p, since)
        if len(s.answers) + (s.active is not None) >= self.config.max_queued_questions:
            raise StreamError("too_many_requests",
                              f"at most {self.config.max_queued_questions} questions queued per session")
        ids = self.prompt.question(question)
        turn = len(ids) + max_new_tokens + len(self.prompt.end_of_turn)
        room = self.budget_tokens - len(s.system_ids)
        if turn > room:
            raise StreamError("context_full", f"the question and {max_new_tokens} new tokens need {turn} tokens; "
                              f"the cache has room for {room}")
        self._answer_ids += 1
        a = AnswerState(self._answer_ids, s.id, question, ids, max_new_tokens, float(temperature), float(top_p),
                        seed, s.next_seq(), Detokenizer(self.adapter.tokenizer), set() if ignore_eos else self._eos,
                        s.since_t(since))
        s.answers.append(a)
        self._kick()
        return Answer(a, self)

    def cancel(self, a: AnswerState) -> None:
        """Stop an answer; a started one keeps its partial text in the conversation."""
        if a.ended or a.cancelled:
            return
        a.cancelled = True
        s = self._states.get(a.session)
        if s is not None and a in s.answers:
            s.answers.remove(a)
            a.end("cancelled")
        self._kick()

    def _known_state(self, session_id: str) -> SessionState:
        s = self._states.get(session_id)
        if s is None:
            raise StreamError("unknown_session", f"no session {session_id!r}")
        return s

    def stats(self, session_id: str) -> dict:
        return self._known_state(session_id).stats()

    async def cache_view(self, session_id: str) -> CacheView:
        """A copy of a session's cache (blocks and per-layer keys/values), read on the worker."""
        slot = self._known_state(session_id).slot
        return await asyncio.get_running_loop().run_in_executor(self._pool, self.runner.view, slot)

    async def close_session(self, session_id: str) -> None:
        """Cancel what is queued or running and free the slot. Idempotent."""
        s = self._states.get(session_id)
        if s is None:
            return
        if not s.closed:
            s.closed = True
            err = StreamError("session_closed", f"session {s.id!r} was closed")
            for f in s.frames:
                if f.done is not None and not f.done.done():
                    f.done.set_exception(err)
                s.frame_futures.pop(f.seq, None)
            s.frames.clear()
            while s.answers:
                s.answers.popleft().end("cancelled")
            if s.active is not None and not s.in_flight:
                s.active.end("cancelled")
                s.active = None
            self._kick()
        await s.idle.wait()
        if self._states.get(session_id) is s:
            del self._states[session_id]
            del self.sessions[session_id]
            self._free.append(s.slot)
            self._free.sort()  # lowest slots first: active sessions stay packed, batches are views
