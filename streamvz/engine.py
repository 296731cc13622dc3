"""The engine: one model on one device, many sessions, one scheduler.

    engine = Engine("path/to/llava", tokens_per_frame=64, window_frames=120)
    session = engine.session(system_prompt="You watch a kitchen camera.")
    await session.add_frame(frame, t=12.5)          # encoded, compressed, prefilled now
    async for delta in session.ask("What is on the table?"):
        print(delta, end="")

Model work runs on one worker thread that owns the model; the event loop only queues work
and hands out results. The scheduler runs rounds; each round is

  1. one frame batch: up to `max_batch_frames` queued frames, taken round-robin across
     sessions (oldest first within a session), encoded in one vision batch, then
     prefilled into their sessions' caches, up to `max_prefill_frames` frames of one
     session per LM call (a session that fell behind catches up in bigger, cheaper steps);
  2. for every active answer, up to `decode_tokens_per_round` steps (the question prefill
     counts as one step).

Fairness rule: between two frame batches every active answer advances by up to
`decode_tokens_per_round` tokens, and between two tokens of an answer at most one frame
batch runs, so a long answer never starves other sessions' frames and a burst of frames
never stalls an answer for more than one batch. Within a session order is kept: a
question waits for the frames queued before it, and frames that arrive while it is
answered wait (the KV cache is a single sequence) until its turn closes.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from .cache import RollingCache, rope_inv_freq
from .errors import StreamError
from .session import Answer, Session

log = logging.getLogger(__name__)


class Engine:
    def __init__(self, model="streamvz-tiny", device=None, dtype=None, tokens_per_frame: int | None = 64,
                 window_frames: int | None = None, cache_budget_tokens: int | None = None,
                 max_sessions: int = 16, max_question_chars: int = 2000, max_new_tokens_limit: int = 512,
                 turn_share: float = 0.5, max_batch_frames: int = 8, decode_tokens_per_round: int = 8,
                 max_backlog_frames: int = 8, max_queued_questions: int = 8, max_prefill_frames: int = 8):
        if isinstance(model, str):
            from .adapters import load_adapter

            if device is None:
                device = "cuda" if torch.cuda.is_available() else "cpu"
            model = load_adapter(model, tokens_per_frame=tokens_per_frame, device=device, dtype=dtype)
        self.adapter = model
        max_pos = self.adapter.max_position_embeddings
        self.budget_tokens = cache_budget_tokens or max_pos
        if self.budget_tokens > max_pos:
            raise ValueError(f"cache_budget_tokens={self.budget_tokens} is over the model's {max_pos} positions")
        self.window_frames = window_frames
        self.max_sessions, self.max_question_chars = max_sessions, max_question_chars
        self.max_new_tokens_limit, self.turn_share = max_new_tokens_limit, turn_share
        self.max_batch_frames, self.decode_tokens_per_round = max_batch_frames, decode_tokens_per_round
        self.max_backlog_frames, self.max_queued_questions = max_backlog_frames, max_queued_questions
        self.max_prefill_frames = max(1, max_prefill_frames)
        self.sessions: dict[str, Session] = {}
        self._inv_freq = rope_inv_freq(self.adapter.model)
        # HF fast tokenizers may raise "Already borrowed" when two threads call them at once.
        self._tok_lock = threading.Lock()
        self._eos = set(self.adapter.eos_token_ids)
        self._eot_ids = self.ids(self.adapter.chat.end_of_turn)
        self._suffix_ids = self.ids(self.adapter.chat.frame_suffix)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="streamvz-model")
        self._task: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None
        self._closed = False

    # -- text ------------------------------------------------------------------------------
    def ids(self, text: str, special: bool = False) -> list[int]:
        """Token ids of one chat piece; `special` adds the tokenizer's BOS (the system prompt only)."""
        if not text:
            return []
        with self._tok_lock:
            return list(self.adapter.tokenizer(text, add_special_tokens=special)["input_ids"])

    def system_ids(self, system_prompt: str) -> list[int]:
        return self.ids(self.adapter.chat.system.format(system_prompt), special=True)

    def frame_ids(self, t: float) -> tuple[list[int], list[int]]:
        """Text ids before and after a frame's visual tokens (the timestamp marker)."""
        return self.ids(self.adapter.chat.frame_prefix.format(t)), self._suffix_ids

    def question_ids(self, question: str) -> list[int]:
        return self.ids(self.adapter.chat.user.format(question))

    @property
    def end_of_turn_ids(self) -> list[int]:
        return list(self._eot_ids)

    # -- sessions ------------------------------------------------------------------------------
    def session(self, system_prompt: str | None = None, session_id: str | None = None) -> Session:
        if self._closed:
            raise StreamError("engine_closed", "the engine is shut down")
        if len(self.sessions) >= self.max_sessions:
            raise StreamError("too_many_sessions", f"the engine holds {self.max_sessions} sessions")
        if session_id is None:
            session_id = secrets.token_urlsafe(12)
        if session_id in self.sessions:
            raise StreamError("session_exists", f"session {session_id!r} already exists")
        if system_prompt is None:
            system_prompt = getattr(self.adapter, "default_system", "")
        n = len(self.system_ids(system_prompt))
        if n > self.budget_tokens // 4:
            raise StreamError("system_prompt_too_long", f"the system prompt is {n} tokens; "
                              f"at most {self.budget_tokens // 4} fit a {self.budget_tokens}-token cache")
        s = Session(self, session_id, system_prompt)
        self.sessions[session_id] = s
        return s

    def get_session(self, session_id: str) -> Session:
        s = self.sessions.get(session_id)
        if s is None:
            raise StreamError("unknown_session", f"no session {session_id!r}")
        return s

    def _forget(self, session: Session) -> None:
        if self.sessions.get(session.id) is session:
            del self.sessions[session.id]

    def _check_question(self, session: Session, question: str, max_new_tokens, temperature, top_p) -> None:
        if not isinstance(question, str) or not question.strip():
            raise StreamError("bad_question", "the question must be a non-empty string")
        if len(question) > self.max_question_chars:
            raise StreamError("question_too_long", f"questions are limited to {self.max_question_chars} characters")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise StreamError("bad_argument", "max_new_tokens must be a positive integer")
        if max_new_tokens > self.max_new_tokens_limit:
            raise StreamError("max_new_tokens_too_large", f"max_new_tokens is limited to {self.max_new_tokens_limit}")
        if not 0.0 <= float(temperature) <= 10.0 or not 0.0 < float(top_p) <= 1.0:
            raise StreamError("bad_argument", "temperature must be in [0, 10] and top_p in (0, 1]")
        if len(session._state.answers) >= self.max_queued_questions:
            raise StreamError("too_many_requests", f"at most {self.max_queued_questions} questions queued per session")
        turn = len(self.question_ids(question)) + max_new_tokens + len(self._eot_ids)
        room = self.budget_tokens - len(self.system_ids(session.system_prompt))
        if turn > room:
            raise StreamError("context_full", f"the question and {max_new_tokens} new tokens need {turn} tokens; "
                              f"the cache has room for {room}")

    # -- scheduler (event loop) ----------------------------------------------------------------------
    def _ensure_running(self) -> None:
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done() or self._task.get_loop() is not loop:
            if self._closed:
                return
            self._wake = asyncio.Event()
            self._task = loop.create_task(self._run(), name="streamvz-scheduler")

    def _wake_up(self) -> None:
        try:
            self._ensure_running()
        except RuntimeError:  # no running loop yet: the first await on a session starts it
            return
        self._wake.set()

    async def _work(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def _run(self) -> None:
        while not self._closed:
            try:
                did = await self._round()
            except Exception:  # a bug here must not leave every session hanging
                log.exception("scheduler round failed")
                did = False
            if not did:
                await self._wake.wait()

    async def _round(self) -> bool:
        """One frame batch, then a few decode steps for every active answer. True if it did work."""
        self._wake.clear()
        did = False
        batch = self._take_frames()
        if batch:
            did = True
            await self._ingest(batch)
        for s in list(self.sessions.values()):
            st = s._state
            if st.active is None and st.answers:
                nxt = st.answers[0]
                if not any(f.seq < nxt.seq for f in st.frames):  # its frames are in first
                    st.active = st.answers.popleft()
                    s._idle.clear()
            if st.active is not None:
                did = True
                for _ in range(self.decode_tokens_per_round):
                    if await self._advance(s, st.active):
                        st.active = None
                        s._idle.set()
                        break
        return did

    def _take_frames(self) -> list:
        """Round-robin over sessions, oldest frame first, skipping sessions mid-answer."""
        queues = []
        for s in self.sessions.values():
            st = s._state
            if s.closed or st.active is not None or not st.frames:
                continue
            limit = st.answers[0].seq if st.answers else None
            queues.append((s, [f for f in st.frames if limit is None or f.seq < limit]))
        batch, i = [], 0
        while len(batch) < self.max_batch_frames and any(i < len(q) for _, q in queues):
            for s, q in queues:
                if i < len(q) and len(batch) < self.max_batch_frames:
                    batch.append((s, q[i]))
            i += 1
        for s, f in batch:
            s._state.frames.remove(f)
            s._idle.clear()
        return batch

    async def _ingest(self, batch) -> None:
        try:
            errors = await self._work(self._ingest_worker, batch)
        except Exception as e:  # the vision batch failed: every frame in it fails
            log.exception("frame batch failed")
            errors = [StreamError("internal_error", f"frame encoding failed: {type(e).__name__}: {e}")] * len(batch)
        for (s, f), err in zip(batch, errors):
            if f.done is not None and not f.done.done():
                if err is None:
                    f.done.set_result(None)
                else:
                    f.done.set_exception(err)
            if s._state.active is None:
                s._idle.set()

    async def _advance(self, s: Session, ans: Answer) -> bool:
        """One step of an answer on the worker; True when it has finished."""
        try:
            finished, delta = await self._work(self._step_worker, s, ans)
        except Exception as e:
            if not isinstance(e, StreamError):
                log.exception("answer step failed")
                e = StreamError("internal_error", f"generation failed: {type(e).__name__}: {e}")
            ans._finish("error", e)
            return True
        ans._emit(delta)
        if finished:
            ans._finish(finished)
        return bool(finished)

    # -- model work (worker thread) ------------------------------------------------------------
    def _positions(self, start: int, n: int, offsets: torch.Tensor | None = None) -> torch.Tensor:
        """Position ids [1, n] (or [3, 1, n] for M-RoPE); text positions are (p, p, p)."""
        pos = torch.arange(start, start + n) if offsets is None else start + offsets.cpu().long()
        if self.adapter.rope_dims == 3:
            return (pos if pos.dim() == 2 else pos.expand(3, n))[:, None, :]
        return pos.reshape(1, n)

    def _lm(self, cache, kind: str | None, pieces, **meta):
        """Append one block made of text ids and embedding pieces (kind None: extend the open
        turn); returns the last logits. `pieces`: list of (ids list) or (embeds [k, D],
        offsets [rope_dims, k] | None)."""
        return self._lm_blocks(cache, kind, [(pieces, meta)])

    def _lm_blocks(self, cache, kind: str | None, blocks: list):
        """Append consecutive blocks [(pieces, meta)] with one model call; returns the last logits."""
        embeds, layout, specs = [], [], []  # layout: (block, position within it, offsets) per piece
        for b, (pieces, meta) in enumerate(blocks):
            rows = span = 0
            for p in pieces:
                if isinstance(p, list):
                    if not p:
                        continue
                    e, off, n = self.adapter.embed(torch.tensor([p]))[0], None, len(p)
                else:
                    e, off = p
                    n = len(e) if off is None else int(off.max()) + 1  # M-RoPE frames span fewer positions
                embeds.append(e)
                layout.append((b, span, off))
                rows += len(e)
                span += n
            specs.append((kind, rows, span, meta))
        x = torch.cat(embeds)
        starts = cache.append_many(specs) if kind else [cache.grow(len(x))]
        pos = [self._positions(starts[b] + at, len(e), off) for e, (b, at, off) in zip(embeds, layout)]
        try:
            logits = self.adapter.forward(x[None], cache, torch.cat(pos, dim=-1))
        except Exception:
            cache.discard(blocks=len(specs)) if kind else cache.discard(tokens=len(x))
            raise
        cache.check()
        return logits[0, -1]

    def _new_cache(self, s: Session) -> RollingCache:
        cache = RollingCache(self.adapter.model.config, self._inv_freq, self.budget_tokens,
                             max_frames=self.window_frames, turn_share=self.turn_share)
        ids = self.system_ids(s.system_prompt)
        if ids:
            self._lm(cache, "system", [ids])
        return cache

    @torch.inference_mode()
    def _ingest_worker(self, batch) -> list:
        """One vision batch for all frames, then one LM prefill per session for all of its frames
        (a session that fell behind catches up in larger, more efficient forward passes)."""
        embeds, offsets = self.adapter.encode_frames_positioned([f.image for _, f in batch])
        errors: list = [None] * len(batch)
        by_session: dict[Session, list[int]] = {}
        for i, (s, _) in enumerate(batch):
            by_session.setdefault(s, []).append(i)
        for s, idx in by_session.items():
            items = [(batch[i][1].t, embeds[i], None if offsets is None else offsets[i]) for i in idx]
            group = min(self.max_prefill_frames, self.window_frames or len(items))  # and fit the window
            for g in range(0, len(items), group):
                for i, err in zip(idx[g : g + group], self._prefill_frames(s, items[g : g + group])):
                    errors[i] = err
        return errors

    def _prefill_frames(self, s: Session, items: list) -> list:
        """Frames [(t, embeds, offsets)] of one session into its cache, in one LM call when they
        fit together, else one by one; returns one error (or None) per frame."""
        if s.closed:
            return [StreamError("session_closed", f"session {s.id!r} was closed")] * len(items)
        st = s._state
        try:
            if st.cache is None:
                st.cache = self._new_cache(s)
            blocks = []
            for t, e, off in items:
                before, after = self.frame_ids(t)
                blocks.append(([before, (e, off), after], {"t": t}))
            self._lm_blocks(st.cache, "frame", blocks)
            return [None] * len(items)
        except Exception as e:
            if len(items) > 1:  # nothing was kept (room is made first, a failed call is undone)
                return [err for it in items for err in self._prefill_frames(s, [it])]
            if not isinstance(e, StreamError):
                log.exception("frame prefill failed")
                e = StreamError("internal_error", f"frame prefill failed: {type(e).__name__}: {e}")
            return [e]

    @torch.inference_mode()
    def _step_worker(self, s: Session, ans: Answer):
        """Question prefill, or feed the last token and sample the next. Returns (finish_reason|None, delta)."""
        st = s._state
        if ans.cancelled or s.closed:
            if ans.started:
                self._close_turn(st.cache, ans)
            return "cancelled", ""
        if not ans.started:
            if st.cache is None:
                st.cache = self._new_cache(s)
            ids = self.question_ids(ans.question)
            ans.prompt_tokens = len(ids)
            logits = self._lm(st.cache, "turn", [ids], question=ans.question)
            ans.started = True
        else:
            logits = self._lm(st.cache, None, [[ans.pending]])
        token = self._sample(logits, ans)
        ans.sampled += 1
        now = time.perf_counter()
        if token in self._eos:
            ans.pending = None
            self._close_turn(st.cache, ans)
            return "stop", ""
        ans.token_ids.append(token)
        ans.t_first = ans.t_first or now
        ans.t_last = now
        ans.pending = token
        delta = self._delta(ans)
        if ans.sampled >= ans.max_new_tokens:
            self._close_turn(st.cache, ans)
            return "length", delta
        return None, delta

    def _close_turn(self, cache, ans: Answer) -> None:
        """Put the shown-but-unfed token and the end-of-turn marker into the conversation."""
        ids = ([ans.pending] if ans.pending is not None else []) + self._eot_ids
        ans.pending = None
        if ids:
            self._lm(cache, None, [ids])

    def _sample(self, logits: torch.Tensor, ans: Answer) -> int:
        logits = logits.float().cpu()
        if ans.temperature <= 0:
            return int(logits.argmax())
        probs = (logits / ans.temperature).softmax(-1)
        if ans.top_p < 1.0:
            p, idx = probs.sort(descending=True)
            keep = p.cumsum(-1) - p < ans.top_p  # the smallest prefix reaching top_p
            probs = torch.zeros_like(probs).scatter(0, idx[keep], p[keep])
        return int(torch.multinomial(probs, 1, generator=ans.generator))

    def _delta(self, ans: Answer) -> str:
        with self._tok_lock:
            text = self.adapter.tokenizer.decode(ans.token_ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # half a UTF-8 character: wait for the rest
            return ""
        delta = text[len(ans.text):] if text.startswith(ans.text) else ""
        ans.text = text
        return delta

    # -- shutdown ------------------------------------------------------------------------------
    async def aclose(self) -> None:
        for s in list(self.sessions.values()):
            await s.close()
        self._closed = True
        if self._task is not None:
            self._wake.set()
            try:
                await asyncio.wait_for(self._task, 30)
            except Exception:  # noqa: BLE001 - shutting down regardless
                self._task.cancel()
        await asyncio.get_running_loop().run_in_executor(None, self._pool.shutdown)

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.aclose()
