"""Who is serving: worker announcements, the MQTT v5 will, and the pool's topic names.

Every MQTT server (a lone `serve --transport mqtt` or a pool worker) has an id and keeps a
retained JSON announcement on `P/workers/<id>`: `state: "up"` with its capacity and load
while connected, and `state: "down"` when it is gone. The "down" message is the MQTT v5
will the broker publishes when the connection dies without a clean DISCONNECT (killed
process, lost network: within 1.5 x keepalive), so clients, operators and the gateway learn
of a dead worker from the broker itself; a clean shutdown publishes the same message first.
The `opened` reply names the worker, so a client watches exactly that one topic.

Pool topics (P = prefix, G = group, S = session, W = worker):
  P/open/S             a client's `open`; workers subscribe `$share/G/P/open/+`
  P/workers/W/open/S   an `open` passed on by a full worker to W (user property `tried`)
  P/workers/W          W's retained announcement (the will replaces it with `down`)
"""
from __future__ import annotations

import json
import secrets
import time

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from streamvz import protocol

DOWN_TTL_S = 3600  # a dead worker's retained "down" notice expires after this (MQTT v5 message expiry)


def new_worker_id() -> str:
    return "w-" + secrets.token_hex(4)


def worker_topic(prefix: str, worker: str) -> str:
    return f"{prefix}/workers/{worker}"


def open_topic(prefix: str, sid: str) -> str:
    return f"{prefix}/open/{sid}"


def shared_open(prefix: str, group: str) -> str:
    return f"$share/{group}/{prefix}/open/+"


def inbox(prefix: str, worker: str, sid: str = "+") -> str:
    return f"{prefix}/workers/{worker}/open/{sid}"


def down_message(worker: str, reason: str) -> bytes:
    return protocol.dump("worker", worker=worker, state="down", reason=reason).encode()


def will(prefix: str, worker: str) -> aiomqtt.Will:
    """The broker publishes this (retained) when the worker's connection dies uncleanly."""
    props = Properties(PacketTypes.WILLMESSAGE)
    props.MessageExpiryInterval = DOWN_TTL_S
    return aiomqtt.Will(worker_topic(prefix, worker), down_message(worker, "connection lost"), qos=1, retain=True,
                        properties=props)


def down_properties() -> Properties:
    props = Properties(PacketTypes.PUBLISH)
    props.MessageExpiryInterval = DOWN_TTL_S
    return props


def up_message(worker: str, **load) -> bytes:
    return protocol.dump("worker", worker=worker, state="up", t=round(time.time(), 3), **load).encode()


class PoolView:
    """The last announcement of every worker seen on `P/workers/+` (what a worker or the
    gateway knows of the pool). One owner: whoever reads that subscription."""

    def __init__(self):
        self.workers: dict[str, dict] = {}

    def update(self, worker: str, payload: bytes) -> dict | None:
        """Record an announcement; returns it (None for an empty retained-clear payload)."""
        if not payload:
            self.workers.pop(worker, None)
            return None
        try:
            info = json.loads(payload)
        except ValueError:
            return None
        if not isinstance(info, dict) or info.get("state") not in ("up", "down"):
            return None
        self.workers[worker] = info
        return info

    def live(self) -> dict[str, dict]:
        return {w: i for w, i in self.workers.items() if i.get("state") == "up"}

    def owner_of(self, sid: str) -> str | None:
        for w, info in self.live().items():
            if sid in info.get("session_ids", ()):
                return w
        return None

    def with_room(self, exclude: set[str]) -> list[str]:
        """Live workers not in `exclude` that announced free capacity, most room first."""
        free = [(i.get("capacity", 0) - i.get("sessions", 0), w) for w, i in self.live().items() if w not in exclude]
        return [w for room, w in sorted(free, key=lambda x: (-x[0], x[1])) if room > 0]
