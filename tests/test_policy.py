"""Policy: which clients may connect, where they may go, what they must
present.  First the decisions alone (no sockets), then over real loopback
sockets with a Server in a thread or the command line, for clients on this
host.  Clients from another host need addresses of their own: those cases
run in a network namespace (peers/remote_client_policy.py, from
test_hostile.py).

Only loopback addresses; names go through FakeResolver.
"""

import ipaddress
import logging
import socket

import pytest

import torsocksd
from conftest import (TIMEOUT, FakeResolver, connect, free_port,
                      ipv6_loopback, recv_exactly, recv_until_eof,
                      socks5_connect_request)
from test_cli import Daemon, reap_daemons  # noqa: F401 (autouse fixture)

SOCKS5_OK = b"\x05\x00\x00\x01" + bytes(6)
SOCKS5_NOT_ALLOWED = b"\x05\x02\x00\x01" + bytes(6)
SOCKS4_REJECTED = b"\x00\x5b" + bytes(6)
FINGERPRINT = "2705DE41F653522E9A8CBA65051407D2D00AF8BF"

needs_ipv6 = pytest.mark.skipif(not ipv6_loopback(),
                                reason="no IPv6 loopback (::1) here")


def ip(text):
    return ipaddress.ip_address(text)


# =============================================================================
# The plain form of an address: IPv4-mapped IPv6 is IPv4
# =============================================================================

@pytest.mark.parametrize("given, plain", [
    ("::ffff:192.0.2.7", "192.0.2.7"),
    ("::ffff:127.0.0.1", "127.0.0.1"),
    ("::ffff:0.0.0.0", "0.0.0.0"),
    ("192.0.2.7", "192.0.2.7"),
    ("2001:db8::1", "2001:db8::1"),
    ("::127.0.0.1", "::7f00:1"),        # IPv4-compatible: not mapped
    ("fe80::1%lo", "fe80::1"),
])
def test_ip_of_gives_the_plain_form(given, plain):
    assert torsocksd.ip_of(given) == ip(plain)
    if "%" not in given:
        assert torsocksd.ip_of(ip(given)) == ip(plain)


@pytest.mark.parametrize("text, network", [
    ("::ffff:192.0.2.2", "192.0.2.2/32"),
    ("[::ffff:192.0.2.2]", "192.0.2.2/32"),
    ("::ffff:192.0.2.0/120", "192.0.2.0/24"),
    ("::ffff:0:0/96", "0.0.0.0/0"),
    ("::ffff:127.0.0.0/104", "127.0.0.0/8"),
    ("::fffe:0:0/95", "::fffe:0:0/95"),     # wider than the mapped range
    ("192.0.2.0/24", "192.0.2.0/24"),
    ("2001:db8::/32", "2001:db8::/32"),
])
def test_mapped_networks_are_ipv4_networks(text, network):
    assert torsocksd.parse_network(text) == ipaddress.ip_network(network)


@pytest.mark.parametrize("rules, address, permitted", [
    ([(False, "::ffff:192.0.2.2")], "192.0.2.2", False),
    ([(False, "::ffff:192.0.2.2")], "192.0.2.3", True),
    ([(False, "::ffff:192.0.2.0/120")], "192.0.2.200", False),
    ([(True, "::ffff:127.0.0.0/104")], "127.0.0.1", True),
    ([(True, "::ffff:127.0.0.0/104")], "192.0.2.1", False),
    ([(False, "::ffff:0:0/96")], "198.51.100.1", False),
    ([(False, "::ffff:0:0/96")], "2001:db8::1", True),
])
def test_client_rules_written_as_mapped_addresses(rules, address, permitted):
    assert torsocksd.ClientPolicy(rules).permits(ip(address)) is permitted


@pytest.mark.parametrize("text, key", [
    ("[::ffff:127.0.0.1]:9001=" + FINGERPRINT, ("127.0.0.1", 9001)),
    ("127.0.0.1:9001=" + FINGERPRINT, ("127.0.0.1", 9001)),
    ("[::1]:9001=" + FINGERPRINT, ("::1", 9001)),
])
def test_relay_pins_are_kept_under_the_plain_address(text, key):
    assert torsocksd.router_pin(text) == (key, bytes.fromhex(FINGERPRINT))


# =============================================================================
# Destination rules
# =============================================================================

BROAD = ["accept *:7001", "reject *:*"]
NARROW = ["accept 127.0.0.1:7001", "reject *:*"]
NO_LOOPBACK = ["reject 127.0.0.0/8", "reject [::1]", "accept *:*"]
REFUSED, ALLOWED = True, False


@pytest.mark.parametrize("rules, local, address, port, refused", [
    # A broad accept never opens the guarded ranges to a remote client.
    (BROAD, False, "127.0.0.1", 7001, REFUSED),
    (BROAD, False, "127.0.0.2", 7001, REFUSED),
    (BROAD, False, "::1", 7001, REFUSED),
    (BROAD, False, "::ffff:127.0.0.1", 7001, REFUSED),
    (BROAD, False, "0.0.0.0", 7001, REFUSED),
    (BROAD, False, "0.1.2.3", 7001, REFUSED),
    (BROAD, False, "::", 7001, REFUSED),
    (BROAD, False, "169.254.169.254", 7001, REFUSED),
    (BROAD, False, "fe80::1", 7001, REFUSED),
    (BROAD, False, "224.0.0.1", 7001, REFUSED),
    (BROAD, False, "ff02::1", 7001, REFUSED),
    (BROAD, False, "192.0.2.1", 7001, ALLOWED),
    (BROAD, False, "2001:db8::1", 7001, ALLOWED),
    (BROAD, False, "192.0.2.1", 7002, REFUSED),
    (BROAD, True, "127.0.0.1", 7001, ALLOWED),
    (BROAD, True, "127.0.0.1", 7002, REFUSED),
    (["accept 0.0.0.0/1:7001"], False, "127.0.0.1", 7001, REFUSED),
    (["accept 126.0.0.0/7:7001"], False, "127.0.0.1", 7001, REFUSED),
    (["accept [::/0]:7001"], False, "::1", 7001, REFUSED),
    # An accept inside the guarded ranges lifts the guard for what it names.
    (NARROW, False, "127.0.0.1", 7001, ALLOWED),
    (NARROW, False, "::ffff:127.0.0.1", 7001, ALLOWED),
    (NARROW, False, "0.0.0.0", 7001, ALLOWED),     # reaches 127.0.0.1:7001
    (NARROW, False, "127.0.0.1", 7002, REFUSED),
    (NARROW, False, "127.0.0.2", 7001, REFUSED),
    (NARROW, False, "::1", 7001, REFUSED),
    (NARROW, False, "::", 7001, REFUSED),
    (["accept 127.0.0.0/8"], False, "127.9.9.9", 1, ALLOWED),
    (["accept 169.254.169.254:80"], False, "169.254.169.254", 80, ALLOWED),
    (["accept 169.254.169.254:80"], False, "169.254.169.253", 80, REFUSED),
    (["accept [fe80::/10]:80"], False, "fe80::1", 80, ALLOWED),
    (["accept [::1]:7001"], False, "::", 7001, ALLOWED),
    # A broad accept first does not hide a narrow one after it...
    (["accept *:7001", "accept 127.0.0.1:7001"], False, "127.0.0.1", 7001,
     ALLOWED),
    # ...and rejects still decide in order.
    (["reject *:*", "accept 127.0.0.1:7001"], False, "127.0.0.1", 7001,
     REFUSED),
    (["reject 127.0.0.1:7001", "accept 127.0.0.0/8"], False, "127.0.0.1",
     7001, REFUSED),
    # 0.0.0.0 and :: reach this host's loopback: rules about loopback cover
    # them, for clients here as for remote ones.
    (NO_LOOPBACK, True, "0.0.0.0", 7001, REFUSED),
    (NO_LOOPBACK, True, "::ffff:0.0.0.0", 7001, REFUSED),
    (NO_LOOPBACK, True, "::", 7001, REFUSED),
    (NO_LOOPBACK, True, "127.0.0.1", 7001, REFUSED),
    (NO_LOOPBACK, True, "::1", 7001, REFUSED),
    (NO_LOOPBACK, True, "0.1.2.3", 7001, ALLOWED),  # not this host (Linux)
    (NO_LOOPBACK, True, "192.0.2.1", 7001, ALLOWED),
    (NO_LOOPBACK, False, "0.0.0.0", 7001, REFUSED),
    (NO_LOOPBACK, False, "::", 7001, REFUSED),
    (["reject 127.0.0.1:7001", "accept *:*"], True, "0.0.0.0", 7001, REFUSED),
    (["reject 127.0.0.1:7001", "accept *:*"], True, "0.0.0.0", 7002, ALLOWED),
    (["reject 127.0.0.2", "accept *:*"], True, "0.0.0.0", 7001, ALLOWED),
    # A rule for the unspecified address alone does not lift the guard:
    # 0.0.0.0 is this host's loopback, which such a rule does not name.
    (["accept 0.0.0.0:1024-65535"], False, "0.0.0.0", 7777, REFUSED),
    (["accept [::]:1024-65535"], False, "::", 7777, REFUSED),
    (["accept 0.0.0.0/8"], False, "0.0.0.0", 7777, REFUSED),
    (["accept 127.0.0.1:7777"], False, "0.0.0.0", 7777, ALLOWED),
    (["accept [::1]:7777"], False, "::", 7777, ALLOWED),
    (["reject [::1]", "accept *:*"], True, "0.0.0.0", 7001, ALLOWED),
    (["reject 127.0.0.0/8", "accept *:*"], True, "::", 7001, ALLOWED),
    # Rules written as IPv4-mapped addresses are IPv4 rules.
    (["reject ::ffff:192.0.2.7", "accept *:*"], True, "192.0.2.7", 80,
     REFUSED),
    (["reject ::ffff:192.0.2.7", "accept *:*"], False, "192.0.2.7", 80,
     REFUSED),
    (["reject ::ffff:192.0.2.7", "accept *:*"], True, "::ffff:192.0.2.7", 80,
     REFUSED),
    (["reject [::ffff:192.0.2.0/120]:80", "accept *:*"], True, "192.0.2.9",
     80, REFUSED),
    (["reject [::ffff:192.0.2.0/120]:80", "accept *:*"], True, "192.0.2.9",
     81, ALLOWED),
    (["reject ::ffff:127.0.0.1", "accept *:*"], True, "127.0.0.1", 80,
     REFUSED),
    (["reject ::ffff:127.0.0.1", "accept *:*"], True, "0.0.0.0", 80,
     REFUSED),
])
def test_destination_rules(rules, local, address, port, refused):
    refusal = torsocksd.DestinationPolicy(rules).refusal(local, ip(address),
                                                         port)
    if refused:
        assert isinstance(refusal, str) and refusal
    else:
        assert refusal is None


# =============================================================================
# Over sockets, clients on this host
# =============================================================================

def socks5_exchange(server, host, port):
    """Greeting and CONNECT to host:port; the CONNECT reply, then what came
    before the close (b"" when refused)."""
    with connect(server) as client:
        greeting, request = socks5_connect_request(host, port)
        client.sendall(greeting + request)
        assert recv_exactly(client, 2) == b"\x05\x00"
        reply = recv_exactly(client, 10)
        if reply != SOCKS5_OK:
            return reply, recv_until_eof(client)
        client.sendall(b"ping")
        echoed = recv_exactly(client, 4)
        client.shutdown(socket.SHUT_WR)
        return reply, echoed + recv_until_eof(client)


def test_unspecified_address_is_loopback_for_the_rules(make_server,
                                                      echo_server):
    """Rejecting loopback rejects 0.0.0.0 (and its IPv4-mapped spelling),
    which the kernel sends to 127.0.0.1; without the rules it does reach
    the echo server."""
    port = echo_server.port
    open_server = make_server()
    assert socks5_exchange(open_server, "0.0.0.0", port) == (SOCKS5_OK,
                                                            b"ping")
    seen = len(echo_server.accepted)
    server = make_server(destination_policy=torsocksd.DestinationPolicy(
        NO_LOOPBACK))
    for host in ("0.0.0.0", "::ffff:0.0.0.0", "127.0.0.1"):
        assert socks5_exchange(server, host, port) == (SOCKS5_NOT_ALLOWED,
                                                      b""), host
    assert len(echo_server.accepted) == seen


@needs_ipv6
def test_unspecified_ipv6_address_is_loopback_for_the_rules(make_server,
                                                           make_peer):
    echo6 = make_peer(host="::1")
    open_server = make_server()
    assert socks5_exchange(open_server, "::", echo6.port) == (SOCKS5_OK,
                                                             b"ping")
    server = make_server(destination_policy=torsocksd.DestinationPolicy(
        NO_LOOPBACK))
    assert socks5_exchange(server, "::", echo6.port) == (SOCKS5_NOT_ALLOWED,
                                                        b"")
    assert len(echo6.accepted) == 1


def first_bytes_or_end(sock):
    """What one recv gives: b"" when the server closed (or reset) without a
    byte, else the start of its answer."""
    try:
        return sock.recv(64)
    except ConnectionResetError:
        return b""


def test_mapped_destination_rule_refuses_the_ipv4_address(make_server,
                                                         echo_server):
    """reject ::ffff:127.0.0.1 refuses 127.0.0.1 however it is written: an
    IPv4 literal, a mapped literal, a name, SOCKS4."""
    resolver = FakeResolver({"loop.test": ["127.0.0.1"]})
    server = make_server(resolver=resolver,
                         destination_policy=torsocksd.DestinationPolicy(
                             ["reject ::ffff:127.0.0.1", "accept *:*"]))
    port = echo_server.port
    for host in ("127.0.0.1", "::ffff:127.0.0.1", "loop.test"):
        assert socks5_exchange(server, host, port) == (SOCKS5_NOT_ALLOWED,
                                                      b""), host
    with connect(server) as client:
        client.sendall(b"\x04\x01" + port.to_bytes(2, "big")
                       + b"\x7f\x00\x00\x01\x00")
        assert recv_until_eof(client) == SOCKS4_REJECTED
    assert echo_server.accepted == []


@pytest.mark.parametrize("rule", ["::ffff:127.0.0.1", "::ffff:127.0.0.0/104",
                                  "::ffff:0:0/96"])
def test_mapped_client_rule_refuses_the_ipv4_client(make_server, rule):
    server = make_server(client_policy=torsocksd.ClientPolicy([(False,
                                                                rule)]))
    with connect(server) as client:
        client.sendall(b"\x05\x01\x00")
        assert first_bytes_or_end(client) == b""
    assert server.stats()["refused_at_accept"] == 1


def test_mapped_rules_from_the_command_line(echo_server):
    """--deny and --policy given as IPv4-mapped addresses hold for the IPv4
    addresses they name, in the real program."""
    denied = Daemon("--port", str(free_port()), "--deny", "::ffff:127.0.0.1")
    host, port = denied.listening[0].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=TIMEOUT) as c:
        c.sendall(b"\x05\x01\x00")
        assert first_bytes_or_end(c) == b""
    policed = Daemon("--port", str(free_port()), "--policy",
                     "reject [::ffff:127.0.0.1]:%d" % echo_server.port)
    host, port = policed.listening[0].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=TIMEOUT) as c:
        greeting, request = socks5_connect_request("127.0.0.1",
                                                   echo_server.port)
        c.sendall(greeting + request)
        assert recv_until_eof(c) == b"\x05\x00" + SOCKS5_NOT_ALLOWED
    assert echo_server.accepted == []


# =============================================================================
# Credentials
# =============================================================================

def test_reload_that_would_leave_an_open_proxy_keeps_the_old_credentials(
        tmp_path, monkeypatch, caplog):
    """Whatever a reload reads, a listener on every interface with no
    client rules keeps its credentials even if a credentials file somehow
    gave none (Settings refuses them; the exposure check would too).  (Nobody connects to the
    listener: it lives only for the test's few lines.)"""
    users = tmp_path / "users"
    users.write_text("alice:secret\n")
    old = torsocksd.Credentials.from_file(str(users))
    server = torsocksd.Server(listen=[("0.0.0.0", 0)], credentials=old,
                              credentials_file=str(users),
                              resolver=FakeResolver())
    server.bind()
    try:
        monkeypatch.setattr(torsocksd.Credentials, "from_file",
                            classmethod(lambda cls, path: cls([])))
        with caplog.at_level(logging.ERROR, logger="torsocksd"), \
                pytest.raises(torsocksd.ConfigError) as refused:
            server.reload()
        assert server.settings.credentials is old
        assert refused.value.problems == ["credentials that name no user"]
        assert "reload: credentials that name no user" in caplog.text
        assert "nothing changed; the old configuration stays" in caplog.text
    finally:
        server.stop()
