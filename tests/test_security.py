"""Safe defaults (issue 23.5) that need no server: who counts as one client, which hosts a
client may make the server connect to."""
from __future__ import annotations

import pytest

from streamvz.errors import StreamError
from streamvz.transports.security import SourcePolicy, client_key


def test_an_ipv6_host_cannot_dodge_the_per_client_cap_by_switching_addresses():
    assert client_key("2001:db8:1:2::1") == client_key("2001:db8:1:2:ffff:ee:dd:cc")  # one /64: one client
    assert client_key("2001:db8:1:3::1") != client_key("2001:db8:1:2::1")
    assert client_key("::ffff:203.0.113.9") == client_key("203.0.113.9") == "203.0.113.9"
    assert client_key("203.0.113.9") != client_key("203.0.113.10")


@pytest.mark.parametrize("url", ["http://127.0.0.1:8080/a.ts", "http://localhost/x", "http://app.localhost/x",
                                 "rtsp://[fe80::1%25eth0]/s", "http://0x7f000001/x", "http://017700000001/x",
                                 "https://100.64.0.1/x", "rtsp://[fd00::5]/cam", "http://224.0.0.1/x"])
def test_private_hosts_are_refused_unless_allowed(url):
    with pytest.raises(StreamError) as ei:
        SourcePolicy().check_network(url)
    assert ei.value.code == "source_not_allowed"
    assert SourcePolicy(allow_private=True).check_network(url) == url
