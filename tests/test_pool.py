"""Worker pool over MQTT v5: two real `run_stream.py worker` processes behind a real mosquitto.

The tests share one pool and run in file order: the last one SIGKILLs a worker.
"""
from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest

from clients.mqtt_client import MqttChat
from fixtures_pool import PoolWatch, Worker, up
from fixtures_serve import broker  # noqa: F401  (fixture)
from streamvz.errors import StreamError
from videos import pattern_frame

KEEPALIVE = 2  # seconds; the broker declares a silent worker dead after 1.5 x this
CAPACITY = 3  # sessions per worker


@pytest.fixture(scope="module")
def pool(tiny_llava, broker):  # noqa: F811
    workers = {w: Worker(broker.port, tiny_llava, w, max_sessions=CAPACITY, keepalive=KEEPALIVE) for w in ("w1", "w2")}

    async def ready():
        async with PoolWatch(broker.port) as watch:
            await watch.until(up("w1", "w2"), timeout=240)

    try:
        asyncio.run(ready())
    except BaseException:
        for w in workers.values():
            w.stop()
        raise RuntimeError("workers did not come up:\n" + "\n".join(w.tail() for w in workers.values()))
    yield workers
    for w in workers.values():
        w.stop()


def chat(broker, sid: str) -> MqttChat:  # noqa: F811
    return MqttChat("127.0.0.1", broker.port, session=sid, pool=True, timeout=60)


async def open_all(broker, sids):  # noqa: F811
    chats = {sid: chat(broker, sid) for sid in sids}
    opened = {}
    for sid, c in chats.items():
        await c.__aenter__()
        opened[sid] = await c.open()
    return chats, opened


def workers_of(opened: dict) -> dict:
    return {sid: o["worker"] for sid, o in opened.items()}


async def close_all(chats):
    for c in chats.values():
        try:
            await c.close()
        finally:
            await c.__aexit__(None, None, None)


def load(*pairs):
    """A PoolWatch condition: worker w announces n sessions, for each (w, n)."""
    return lambda ws: all(ws.get(w, {}).get("sessions") == n for w, n in pairs)


async def test_sessions_spread_answers_return_frames_stay_on_their_worker(pool, broker):  # noqa: F811
    sids = [f"spread{i}" for i in range(6)]
    chats, opened = await open_all(broker, sids)
    where = workers_of(opened)
    try:
        assert Counter(where.values()) == {"w1": CAPACITY, "w2": CAPACITY}, where
        for i, sid in enumerate(sids):  # session i gets i+1 frames
            for k in range(i + 1):
                await chats[sid].push(pattern_frame(k), t=float(k))
        answers = {sid: chats[sid].ask(f"What is shown in {sid}?", max_tokens=6) for sid in sids}
        texts = await asyncio.gather(*(a.result() for a in answers.values()))
        for sid, text in zip(sids, texts):  # each answer came back on its asker's own response topic
            assert text and answers[sid].usage["completion_tokens"] >= 1, sid
        for i, sid in enumerate(sids):
            assert (await chats[sid].status())["frames_seen"] == i + 1
        # Each worker received exactly the frames of its own sessions: none of another worker's.
        expected = {w: sum(i + 1 for i, s in enumerate(sids) if where[s] == w) for w in ("w1", "w2")}
        async with PoolWatch(broker.port) as watch:
            seen = await watch.until(lambda ws: all(ws.get(w, {}).get("frames") == n for w, n in expected.items()), 30)
        for w in ("w1", "w2"):
            assert sorted(seen[w]["session_ids"]) == sorted(s for s in sids if where[s] == w)
    finally:
        await close_all(chats)


async def test_an_open_answering_elsewhere_is_refused_and_the_pool_goes_on(pool, broker):  # noqa: F811
    """The shared `open` checks its response topic like every request: answers go only to the
    session's own topics, so an open that names another topic gets `topic_not_allowed` (on the
    session's events topic) and opens nothing; the same client then opens normally."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    async with chat(broker, "elsewhere") as c:
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = "streamvz/someone-else/control"  # another session's request topic
        await c.client.publish("streamvz/open/elsewhere", b'{"v":1,"op":"open"}', qos=1, properties=props)
        with pytest.raises(StreamError) as ei:
            await c.expect("opened")
        assert ei.value.code == "topic_not_allowed"
        opened = await c.open()
        assert opened["worker"] in ("w1", "w2") and opened["resumed"] is False  # nothing was opened before
        await c.close()


async def test_full_worker_passes_the_open_on_then_pool_full(pool, broker):  # noqa: F811
    async with PoolWatch(broker.port) as watch:
        await watch.until(load(("w1", 0), ("w2", 0)), 30)
        chats, opened = await open_all(broker, [f"full{i}" for i in range(2 * CAPACITY)])
        where = workers_of(opened)
        try:
            assert Counter(where.values()) == {"w1": CAPACITY, "w2": CAPACITY}
            on_w2 = [s for s, w in where.items() if w == "w2"]
            for sid in on_w2[:2]:  # make room on w2 only
                await chats.pop(sid).close()
            await watch.until(load(("w1", CAPACITY), ("w2", CAPACITY - 2)), 30)
            # The broker hands opens round robin, so one of these two lands on the full w1 first.
            more, late = await open_all(broker, ["late1", "late2"])
            chats.update(more)
            assert {o["worker"] for o in late.values()} == {"w2"}
            assert ["w1"] in [o["passed_by"] for o in late.values()], late
            extra = chat(broker, "nowhere")
            async with extra:
                with pytest.raises(StreamError) as ei:
                    await extra.open()
                assert ei.value.code == "too_many_sessions" and "full" in ei.value.message
        finally:
            await close_all(chats)


async def test_broker_restart_workers_reconnect_and_keep_sessions(pool, broker):  # noqa: F811
    async with chat(broker, "keeper") as c:
        first = await c.open()
        await c.push(pattern_frame(3), t=0.5)
        assert await c.ask("Before?", max_tokens=4).result()
    broker.stop()
    await asyncio.sleep(0.5)
    broker.start()
    async with PoolWatch(broker.port) as watch:  # retained state died with the broker: they announce again
        seen = await watch.until(up("w1", "w2"), 60)
        assert "keeper" in seen[first["worker"]]["session_ids"]
    async with chat(broker, "keeper") as c:
        again = await c.open()  # whichever worker the broker picks, the owner answers
        assert again["resumed"] is True and again["worker"] == first["worker"] and again["frames_seen"] == 1
        assert await c.ask("After?", max_tokens=4).result()
        await c.close()


async def test_killed_worker_clients_get_worker_lost_others_untouched(pool, broker):  # noqa: F811
    async with PoolWatch(broker.port) as watch:
        await watch.until(load(("w1", 0), ("w2", 0)), 30)
        chats, opened = await open_all(broker, [f"k{i}" for i in range(4)])
        where = workers_of(opened)
        lost = [s for s, w in where.items() if w == "w1"]
        kept = [s for s, w in where.items() if w == "w2"]
        assert lost and kept
        try:
            for sid in chats:
                await chats[sid].push(pattern_frame(1), t=0.0)
            running = chats[lost[0]].ask("A long answer please.", max_tokens=200)
            t0 = time.monotonic()
            pool["w1"].kill()
            for sid in lost:
                with pytest.raises(StreamError) as ei:
                    await chats[sid].expect("never")
                assert ei.value.code == "worker_lost" and "w1" in ei.value.message
            with pytest.raises(StreamError) as ei:  # the answer being streamed ends with the same error
                await running.result()
            assert ei.value.code == "worker_lost"
            assert time.monotonic() - t0 < 1.5 * KEEPALIVE + 2  # the keepalive bound, with slack for the broker
            await watch.until(lambda ws: ws.get("w1", {}).get("state") == "down", 10)  # the will, retained for operators
            for sid in kept:  # the survivor's sessions keep answering
                assert await chats[sid].ask("Still there?", max_tokens=4).result()
                assert (await chats[sid].status())["frames_seen"] == 1
            async with chat(broker, lost[0]) as again:  # reopen: lands on the live worker
                reopened = await again.open()
                assert reopened["worker"] == "w2" and reopened["resumed"] is False
                await again.push(pattern_frame(2), t=0.0)
                assert await again.ask("New home?", max_tokens=4).result()
                await again.close()
        finally:
            for sid in kept:
                await chats[sid].close()
            for c in chats.values():
                await c.__aexit__(None, None, None)


async def test_lone_mqtt_server_death_reaches_its_clients(tiny_llava):
    """The will is not only for pools: a plain `serve --transport mqtt` that dies tells its clients."""
    from fixtures_serve import Broker

    own = Broker().start()  # its own broker: a plain server answers every session topic
    solo = Worker(own.port, tiny_llava, "solo", group=None)
    try:
        async with PoolWatch(own.port) as watch:
            await watch.until(up("solo"), 240)
            assert "group" not in watch.workers["solo"]  # a plain server, not a pool worker
        async with MqttChat("127.0.0.1", own.port, session="alone", timeout=30) as c:
            assert (await c.open())["worker"] == "solo"
            solo.kill()
            with pytest.raises(StreamError) as ei:
                await c.expect("never")
            assert ei.value.code == "worker_lost"
    finally:
        solo.stop()
        own.stop()
