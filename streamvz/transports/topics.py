"""The MQTT topics the server reads, and the only topics it publishes to.

A client names where its answers go (the MQTT v5 response topic). Unchecked, one message
could make the server publish anywhere its broker account may: to an empty topic (the broker
then drops the server's connection, and every session's answers with it), to another
session's request topics, or to another application's topics. So every topic the server
will publish to passes `Topics.reply` before the request is accepted, and a bad one costs
that request an `error` on the session's events topic, nothing more.

With P the prefix and S the session (the topic level):
  read:  P/S/control, P/S/frames, P/S/ask
  write: P/S/events, P/S/answers, P/S/answers/<anything>  (+ prefixes the operator allows)
docs/protocol.md lists these for broker ACLs; docs/mosquitto-acl.conf is an example.
"""
from __future__ import annotations

from dataclasses import dataclass

from streamvz import protocol
from streamvz.errors import StreamError

MAX_TOPIC_BYTES = 256  # a response topic; ours are far shorter
MAX_CORRELATION_BYTES = 256  # echoed on every delta: a cap keeps a client from amplifying traffic
REQUEST_LEAVES = ("control", "frames", "ask")


def _plain_topic(topic) -> bool:
    """A topic name (not a filter) a broker accepts on PUBLISH, within our size cap."""
    if not isinstance(topic, str) or not topic or topic.startswith("$"):
        return False
    if any(c in topic for c in "+#\x00"):
        return False
    try:
        return len(topic.encode("utf-8")) <= MAX_TOPIC_BYTES
    except UnicodeEncodeError:  # a lone surrogate is no UTF-8 topic
        return False


@dataclass(frozen=True)
class Topics:
    prefix: str = "streamvz"
    reply_prefixes: tuple[str, ...] = ()  # extra response-topic prefixes the operator allows

    def parse(self, topic: str) -> tuple[str, str] | None:
        """P/S/leaf -> (S, leaf) for a request topic; None for anything else."""
        parts = topic.split("/")
        if len(parts) != 3 or parts[0] != self.prefix or parts[2] not in REQUEST_LEAVES:
            return None
        return parts[1], parts[2]

    def session(self, sid: str) -> str:
        if not protocol.SESSION_ID_RE.match(sid):
            raise StreamError("bad_field", "session ids are 1-64 of [A-Za-z0-9_-]", field="session")
        return sid

    def events(self, sid: str) -> str:
        return f"{self.prefix}/{sid}/events"

    def answers(self, sid: str) -> str:
        return f"{self.prefix}/{sid}/answers"

    def reply(self, topic: str | None, sid: str, default: str) -> str:
        """The topic to answer a request of session `sid` on: `default` when the client names
        none; else its response topic, if it is a plain topic inside this session's reply
        space or an allowed prefix."""
        if topic is None:
            return default
        if not _plain_topic(topic):
            raise StreamError("bad_field", f"the response topic must be a plain topic name of 1-{MAX_TOPIC_BYTES} "
                              "bytes (no wildcards, no leading $)", field="response_topic")
        answers = self.answers(sid)
        mine = topic in (self.events(sid), answers) or topic.startswith(answers + "/")
        allowed = any(topic == p or topic.startswith(p + "/") for p in (q.rstrip("/") for q in self.reply_prefixes) if p)
        if not (mine or allowed):
            raise StreamError("topic_not_allowed", f"responses go to {answers}[/...] or {self.events(sid)}"
                              + (f" or under {list(self.reply_prefixes)}" if self.reply_prefixes else ""),
                              field="response_topic")
        return topic

    @staticmethod
    def correlation(data) -> bytes | None:
        if data is not None and len(data) > MAX_CORRELATION_BYTES:
            raise StreamError("bad_field", f"correlation data is limited to {MAX_CORRELATION_BYTES} bytes",
                              field="correlation_data")
        return data
