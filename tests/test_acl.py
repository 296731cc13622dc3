"""docs/scale-out/mosquitto.acl on a real mosquitto, checked with the stock mosquitto_sub/pub:
a client reads its own session's topics and nobody else's."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from fixtures_serve import MOSQUITTO, Broker

ACL = Path(__file__).resolve().parents[1] / "docs" / "scale-out" / "mosquitto.acl"
USERS = {"worker": "pw-w", "alice": "pw-a", "bob": "pw-b", "cameras": "pw-c"}


@pytest.fixture(scope="module")
def secured():
    if MOSQUITTO is None:
        pytest.skip("mosquitto not installed (make system-deps installs it)")
    b = Broker(users=USERS)
    with open(b.conf, "a") as f:
        f.write(f"acl_file {ACL}\n")
    yield b.start()
    b.stop()


def sub(broker, user: str, topic: str) -> subprocess.Popen:
    """Stock mosquitto_sub as `user`: one message or a 4 s wait, whichever first."""
    return subprocess.Popen(["mosquitto_sub", "-V", "mqttv5", "-h", "127.0.0.1", "-p", str(broker.port), "-u", user,
                             "-P", USERS[user], "-t", topic, "-C", "1", "-W", "4", "-v"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def pub(broker, user: str, topic: str, message: str) -> None:
    subprocess.run(["mosquitto_pub", "-V", "mqttv5", "-h", "127.0.0.1", "-p", str(broker.port), "-u", user,
                    "-P", USERS[user], "-t", topic, "-m", message, "-q", "1"], check=False, timeout=10)


def settle():
    import time

    time.sleep(0.7)  # let the subscriptions land before anything is published


@pytest.mark.parametrize("topic", ["streamvz/alice/events", "streamvz/alice/answers/app1"])
def test_only_the_owner_reads_its_session(secured, topic):
    owner, other, owned_by_cameras = sub(secured, "alice", topic), sub(secured, "bob", topic), sub(secured, "cameras", topic)
    settle()
    pub(secured, "worker", topic, '{"op":"opened"}')  # what a worker says to the session's client
    assert owner.communicate(timeout=10)[0].strip() == f'{topic} {{"op":"opened"}}'
    out, _ = other.communicate(timeout=10)  # the broker delivers nothing to bob: he may not read it
    assert "opened" not in out and other.returncode != 0
    assert "opened" not in owned_by_cameras.communicate(timeout=10)[0]


def test_a_client_cannot_write_into_another_session_or_open_it(secured):
    worker_view = sub(secured, "worker", "streamvz/alice/ask")
    pool_view = sub(secured, "worker", "$share/g/streamvz/open/+")  # workers take opens from the shared topic
    settle()
    pub(secured, "bob", "streamvz/alice/ask", '{"text":"leak?"}')
    pub(secured, "bob", "streamvz/open/alice", '{"op":"open"}')
    assert "leak" not in worker_view.communicate(timeout=10)[0]
    assert "open" not in pool_view.communicate(timeout=10)[0]
    pool_view = sub(secured, "worker", "$share/g/streamvz/open/+")
    door = sub(secured, "cameras", "streamvz/door/events")
    settle()
    pub(secured, "cameras", "streamvz/open/door", '{"op":"open"}')  # a user with explicit lines for its sessions
    pub(secured, "worker", "streamvz/door/events", '{"op":"opened"}')
    assert pool_view.communicate(timeout=10)[0].strip() == 'streamvz/open/door {"op":"open"}'
    assert "opened" in door.communicate(timeout=10)[0]


def test_every_client_reads_worker_announcements(secured):
    watcher = sub(secured, "bob", "streamvz/workers/+")
    settle()
    pub(secured, "worker", "streamvz/workers/w1", '{"op":"worker","state":"down"}')
    assert "down" in watcher.communicate(timeout=10)[0]
