"""The connection state machine over real loopback sockets, byte for byte.

A torsocksd Server runs in a thread (conftest's make_server); clients are
plain blocking sockets with a timeout; targets are conftest's threaded
EchoServer.  Every test drives one transition of a Connection (handshake,
authentication, resolving, connecting, relaying, closing) and checks every
byte the client receives, then how the connection ends.

Only loopback addresses and "localhost"; every other name goes through
FakeResolver.
"""

import ipaddress
import logging
import socket
import threading
import time

import pytest

import torsocksd
from conftest import (TIMEOUT, FakeResolver, connect, each_relay_mode,
                      free_port, ipv6_loopback, open_socks5_tunnel,
                      recv_exactly, recv_until_eof, socks4_request,
                      socks4a_request, socks5_connect_request, socks5_reply,
                      socks5_request, userpass)

# A test that relays bytes through a tunnel runs over both relays, copying
# through Python and os.splice: it is marked @each_relay_mode.  The others
# never reach the relay and run once, with the default (copy).


# -- the bytes ----------------------------------------------------------------

GREETING_NO_AUTH = b"\x05\x01\x00"
GREETING_USERPASS = b"\x05\x01\x02"
METHOD_NO_AUTH = b"\x05\x00"
METHOD_USERPASS = b"\x05\x02"
METHOD_NONE = b"\x05\xff"
AUTH_OK = b"\x01\x00"
AUTH_FAILED = b"\x01\x01"
SOCKS4_GRANTED = b"\x00\x5a" + bytes(6)
SOCKS4_REJECTED = b"\x00\x5b" + bytes(6)
SOCKS5_OK = socks5_reply(0x00)

CONNECT, BIND, UDP_ASSOCIATE = 0x01, 0x02, 0x03
RESOLVE, RESOLVE_PTR = 0xF0, 0xF1


def send_byte_by_byte(sock, data):
    for byte in data:
        assert sock.send(bytes([byte])) == 1


def assert_reply(sock, expected):
    assert recv_exactly(sock, len(expected)) == expected


def assert_closed_after(sock, *replies):
    """Exactly these replies, in order, then EOF."""
    for reply in replies:
        assert_reply(sock, reply)
    assert recv_until_eof(sock) == b""


def assert_echo(sock, payload=b"ping through torsocksd"):
    sock.sendall(payload)
    assert recv_exactly(sock, len(payload)) == payload


needs_ipv6 = pytest.mark.skipif(not ipv6_loopback(),
                                reason="no IPv6 loopback (::1) here")


# -- GREETING/REQUESTING -> CONNECTING -> RELAYING, fragmented ----------------

@each_relay_mode
@pytest.mark.parametrize("host", ["127.0.0.1", "echo.test"])
def test_socks5_handshake_one_byte_per_segment(make_server, echo_server, host):
    resolver = FakeResolver({"echo.test": ["127.0.0.1"]})
    server = make_server(resolver=resolver)
    greeting, request = socks5_connect_request(host, echo_server.port)
    with connect(server) as client:
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        send_byte_by_byte(client, greeting)
        assert_reply(client, METHOD_NO_AUTH)
        send_byte_by_byte(client, request)
        assert_reply(client, SOCKS5_OK)
        assert_echo(client)


@each_relay_mode
def test_socks4_handshake_one_byte_per_segment(server, echo_server):
    request = socks4_request(CONNECT, "127.0.0.1", echo_server.port, b"user")
    with connect(server) as client:
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        send_byte_by_byte(client, request)
        assert_reply(client, SOCKS4_GRANTED)
        assert_echo(client)


@each_relay_mode
def test_socks4a_handshake_one_byte_per_segment(make_server, echo_server):
    resolver = FakeResolver({"echo.test": ["127.0.0.1"]})
    server = make_server(resolver=resolver)
    request = socks4a_request(CONNECT, "echo.test", echo_server.port, b"id")
    with connect(server) as client:
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        send_byte_by_byte(client, request)
        assert_reply(client, SOCKS4_GRANTED)
        assert_echo(client)
    assert resolver.queries == ["echo.test"]


@each_relay_mode
def test_socks5_auth_and_request_one_byte_per_segment(make_server,
                                                      echo_server):
    server = make_server(
        credentials=torsocksd.Credentials([(b"user", b"secret")]))
    _, request = socks5_connect_request("127.0.0.1", echo_server.port)
    with connect(server) as client:
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        send_byte_by_byte(client, GREETING_USERPASS)
        assert_reply(client, METHOD_USERPASS)
        send_byte_by_byte(client, userpass(b"user", b"secret"))
        assert_reply(client, AUTH_OK)
        send_byte_by_byte(client, request)
        assert_reply(client, SOCKS5_OK)
        assert_echo(client)


# -- coalesced messages (DECISIONS row 14) ------------------------------------

@each_relay_mode
def test_greeting_request_and_early_data_in_one_segment(server, echo_server):
    greeting, request = socks5_connect_request("127.0.0.1", echo_server.port)
    early = b"GET / HTTP/1.0\r\n\r\n"
    with connect(server) as client:
        client.sendall(greeting + request + early)
        assert_reply(client, METHOD_NO_AUTH + SOCKS5_OK + early)
        assert_echo(client)


@each_relay_mode
def test_greeting_auth_request_and_data_in_one_segment(server, echo_server):
    _, request = socks5_connect_request("127.0.0.1", echo_server.port)
    early = b"early data"
    with connect(server) as client:
        client.sendall(GREETING_USERPASS + userpass(b"any", b"thing")
                       + request + early)
        assert_reply(client, METHOD_USERPASS)
        assert_reply(client, AUTH_OK)
        assert_reply(client, SOCKS5_OK)
        assert_reply(client, early)


@each_relay_mode
def test_second_request_on_a_connection_is_data_for_the_target(server,
                                                              echo_server):
    """A connection carries one request: bytes after it, even a well formed
    second request, go to the target untouched."""
    greeting, request = socks5_connect_request("127.0.0.1", echo_server.port)
    second = socks5_request(CONNECT, "127.0.0.1", free_port())
    with connect(server) as client:
        client.sendall(greeting + request + second)
        assert_reply(client, METHOD_NO_AUTH + SOCKS5_OK + second)
        assert_echo(client)


@each_relay_mode
def test_socks4a_request_with_early_data(make_server, echo_server):
    server = make_server(resolver=FakeResolver({"echo.test": ["127.0.0.1"]}))
    early = b"\x05\x01\x00 not SOCKS"
    with connect(server) as client:
        client.sendall(socks4a_request(CONNECT, "echo.test", echo_server.port)
                       + early)
        assert_reply(client, SOCKS4_GRANTED + early)


def test_greeting_and_resolve_in_one_segment(make_server):
    server = make_server(resolver=FakeResolver({"host.test": ["192.0.2.7"]}))
    with connect(server) as client:
        client.sendall(GREETING_NO_AUTH
                       + socks5_request(RESOLVE, "host.test", 0))
        assert_closed_after(client, METHOD_NO_AUTH,
                            b"\x05\x00\x00\x01\xc0\x00\x02\x07\x00\x00")


# -- AUTHENTICATING (DECISIONS row 3) -----------------------------------------

@each_relay_mode
def test_userpass_offered_alone_accepts_any_credentials(server, echo_server):
    _, request = socks5_connect_request("127.0.0.1", echo_server.port)
    with connect(server) as client:
        client.sendall(GREETING_USERPASS)
        assert_reply(client, METHOD_USERPASS)
        client.sendall(userpass(b"isolation", b"key"))
        assert_reply(client, AUTH_OK)
        client.sendall(request)
        assert_reply(client, SOCKS5_OK)
        assert_echo(client)


def test_userpass_with_empty_fields_is_accepted(server, echo_server):
    _, request = socks5_connect_request("127.0.0.1", echo_server.port)
    with connect(server) as client:
        client.sendall(GREETING_USERPASS)
        assert_reply(client, METHOD_USERPASS)
        client.sendall(b"\x01\x00\x00")
        assert_reply(client, AUTH_OK)
        client.sendall(request)
        assert_reply(client, SOCKS5_OK)


def test_no_auth_preferred_when_both_offered(server):
    with connect(server) as client:
        client.sendall(b"\x05\x02\x02\x00")
        assert_reply(client, METHOD_NO_AUTH)


@pytest.fixture
def guarded_server(make_server):
    return make_server(credentials=torsocksd.Credentials([(b"u", b"p")]))


@each_relay_mode
def test_credentials_right_password(guarded_server, echo_server):
    _, request = socks5_connect_request("127.0.0.1", echo_server.port)
    with connect(guarded_server) as client:
        client.sendall(b"\x05\x02\x00\x02")
        assert_reply(client, METHOD_USERPASS)
        client.sendall(userpass(b"u", b"p"))
        assert_reply(client, AUTH_OK)
        client.sendall(request)
        assert_reply(client, SOCKS5_OK)
        assert_echo(client)


@pytest.mark.parametrize("username, password", [
    (b"u", b"wrong"), (b"nobody", b"p"), (b"", b""), (b"u", b"p" * 2)])
def test_credentials_wrong_password(guarded_server, username, password):
    with connect(guarded_server) as client:
        client.sendall(GREETING_USERPASS)
        assert_reply(client, METHOD_USERPASS)
        client.sendall(userpass(username, password))
        assert_closed_after(client, AUTH_FAILED)


def test_credentials_required_but_only_no_auth_offered(guarded_server):
    with connect(guarded_server) as client:
        client.sendall(GREETING_NO_AUTH)
        assert_closed_after(client, METHOD_NONE)


def test_no_acceptable_method_without_credentials(server):
    with connect(server) as client:
        client.sendall(b"\x05\x01\x01")     # GSSAPI only
        assert_closed_after(client, METHOD_NONE)


def test_zero_methods_is_closed_without_reply(server):
    with connect(server) as client:
        client.sendall(b"\x05\x00")
        assert recv_until_eof(client) == b""


def test_socks4_refused_when_credentials_are_required(guarded_server,
                                                      echo_server):
    with connect(guarded_server) as client:
        client.sendall(socks4_request(CONNECT, "127.0.0.1", echo_server.port,
                                      b"u"))
        assert_closed_after(client, SOCKS4_REJECTED)
    assert echo_server.accepted == []


# -- client EOF mid-handshake -------------------------------------------------

@pytest.mark.parametrize("sent, replies", [
    (b"\x05", []),
    (b"\x05\x01", []),
    (b"\x04\x01\x00\x50\x7f", []),
    (GREETING_NO_AUTH + b"\x05\x01\x00\x01\x7f", [METHOD_NO_AUTH]),
    (GREETING_USERPASS + b"\x01\x01u", [METHOD_USERPASS]),
], ids=["socks5-version", "socks5-greeting", "socks4-request",
        "socks5-request", "userpass"])
def test_client_eof_mid_handshake_closes_without_reply(server, sent, replies):
    with connect(server) as client:
        client.sendall(sent)
        client.shutdown(socket.SHUT_WR)
        assert_closed_after(client, *replies)


# -- CONNECTING -> refused ----------------------------------------------------

def test_socks5_connect_refused(server):
    _, request = socks5_connect_request("127.0.0.1", free_port())
    with connect(server) as client:
        client.sendall(GREETING_NO_AUTH)
        assert_reply(client, METHOD_NO_AUTH)
        client.sendall(request)
        assert_closed_after(client, b"\x05\x05\x00\x01" + bytes(6))


def test_socks5_connect_refused_drops_early_data(server):
    _, request = socks5_connect_request("127.0.0.1", free_port())
    with connect(server) as client:
        client.sendall(GREETING_NO_AUTH + request + b"early data")
        assert_closed_after(client, METHOD_NO_AUTH, socks5_reply(0x05))


def test_socks4_connect_refused(server):
    with connect(server) as client:
        client.sendall(socks4_request(CONNECT, "127.0.0.1", free_port()))
        assert_closed_after(client, b"\x00\x5b\x00\x00\x00\x00\x00\x00")


# -- IPv6 ---------------------------------------------------------------------

@each_relay_mode
@needs_ipv6
def test_ipv6_client_gets_22_byte_success_reply(make_server, echo_server):
    server = make_server(listen=[("::1", 0)])
    greeting, request = socks5_connect_request("127.0.0.1", echo_server.port)
    with connect(server) as client:
        assert client.family == socket.AF_INET6
        client.sendall(greeting)
        assert_reply(client, METHOD_NO_AUTH)
        client.sendall(request)
        assert_reply(client, b"\x05\x00\x00\x04" + bytes(16) + b"\x00\x00")
        assert_echo(client)


@needs_ipv6
@pytest.mark.parametrize("request_bytes, code", [
    (socks5_request(CONNECT, "127.0.0.1", free_port()), 0x05),
    (socks5_request(BIND, "127.0.0.1", 80), 0x07),
], ids=["refused", "bind"])
def test_ipv6_client_gets_22_byte_failure_reply(make_server, request_bytes,
                                                code):
    server = make_server(listen=[("::1", 0)])
    with connect(server) as client:
        client.sendall(GREETING_NO_AUTH)
        assert_reply(client, METHOD_NO_AUTH)
        client.sendall(request_bytes)
        assert_closed_after(client, socks5_reply(code, ipv6_client=True))


@each_relay_mode
@needs_ipv6
def test_ipv6_client_socks4_reply_stays_8_bytes(make_server, echo_server):
    server = make_server(listen=[("::1", 0)])
    with connect(server) as client:
        client.sendall(socks4_request(CONNECT, "127.0.0.1", echo_server.port))
        assert_reply(client, SOCKS4_GRANTED)
        assert_echo(client)


@each_relay_mode
@needs_ipv6
def test_ipv6_target(server, make_peer):
    peer = make_peer(family=socket.AF_INET6, host="::1")
    greeting, request = socks5_connect_request("::1", peer.port)
    assert request[3] == 0x04
    with connect(server) as client:
        client.sendall(greeting)
        assert_reply(client, METHOD_NO_AUTH)
        client.sendall(request)
        assert_reply(client, SOCKS5_OK)
        assert_echo(client)
    assert peer.accepted[0][0] == "::1"


# -- RELAYING: each direction closes on its own -------------------------------

@each_relay_mode
def test_client_half_close_reaches_target_which_can_still_answer(server,
                                                                 make_peer):
    received = []

    def answer_after_eof(sock):
        data = recv_until_eof(sock)
        received.append(data)
        sock.sendall(b"after EOF: " + data)

    peer = make_peer(answer_after_eof)
    payload = bytes(range(256)) * 400       # 100 KB
    with open_socks5_tunnel(server.address, "127.0.0.1", peer.port) as client:
        client.sendall(payload)
        client.shutdown(socket.SHUT_WR)
        assert recv_until_eof(client) == b"after EOF: " + payload
    assert received == [payload]


@each_relay_mode
def test_target_half_close_reaches_client_which_can_still_send(server,
                                                               make_peer):
    received = []
    done = threading.Event()
    banner = b"banner " * 50000             # 350 KB, more than HIGH_WATER

    def speak_then_listen(sock):
        try:
            sock.sendall(banner)
            sock.shutdown(socket.SHUT_WR)
            received.append(recv_until_eof(sock))
        finally:
            done.set()

    peer = make_peer(speak_then_listen)
    with open_socks5_tunnel(server.address, "127.0.0.1", peer.port) as client:
        assert recv_until_eof(client) == banner
        client.sendall(b"sent after the target's EOF")
        client.shutdown(socket.SHUT_WR)
        assert done.wait(TIMEOUT)
        assert received == [b"sent after the target's EOF"]
        assert recv_until_eof(client) == b""


@each_relay_mode
def test_target_closes_first_client_gets_all_data_then_eof(server, make_peer):
    body = bytes(range(251)) * 2000         # 502 KB

    def send_and_close(sock):
        sock.sendall(body)

    peer = make_peer(send_and_close)
    with open_socks5_tunnel(server.address, "127.0.0.1", peer.port) as client:
        assert recv_until_eof(client) == body


@each_relay_mode
def test_large_transfer_both_ways(server, echo_server):
    payload = bytes(range(256)) * 4096      # 1 MB, several HIGH_WATERs
    with open_socks5_tunnel(server.address, "127.0.0.1",
                            echo_server.port) as client:
        writer = threading.Thread(target=client.sendall, args=(payload,))
        writer.start()
        try:
            echoed = recv_exactly(client, len(payload))
        finally:
            writer.join(TIMEOUT)
        assert echoed == payload


# -- RESOLVING -> CONNECTING through names ------------------------------------

@each_relay_mode
def test_name_with_refusing_first_address_connects_to_second(make_server,
                                                             echo_server):
    # The echo server listens on 127.0.0.1 only: 127.0.0.3 on its port refuses.
    resolver = FakeResolver({"multi.test": ["127.0.0.3", "127.0.0.1"]})
    server = make_server(resolver=resolver)
    with open_socks5_tunnel(server.address, "multi.test",
                            echo_server.port) as client:
        assert_echo(client)
    assert resolver.queries == ["multi.test"]
    assert len(echo_server.accepted) == 1


def test_name_whose_every_address_refuses(make_server):
    resolver = FakeResolver({"dead.test": ["127.0.0.3", "127.0.0.4"]})
    server = make_server(resolver=resolver)
    with connect(server) as client:
        client.sendall(GREETING_NO_AUTH
                       + socks5_request(CONNECT, "dead.test", free_port()))
        assert_closed_after(client, METHOD_NO_AUTH, socks5_reply(0x05))


def test_unknown_name_is_host_unreachable(make_server):
    resolver = FakeResolver({})
    server = make_server(resolver=resolver)
    with connect(server) as client:
        client.sendall(GREETING_NO_AUTH
                       + socks5_request(CONNECT, "missing.test", 80))
        assert_closed_after(client, METHOD_NO_AUTH,
                            b"\x05\x04\x00\x01" + bytes(6))
    assert resolver.queries == ["missing.test"]


def test_unknown_name_socks4a_rejected(make_server):
    server = make_server(resolver=FakeResolver({}))
    with connect(server) as client:
        client.sendall(socks4a_request(CONNECT, "missing.test", 80))
        assert_closed_after(client, SOCKS4_REJECTED)


@pytest.mark.parametrize("name", [
    "expyuzz4wqqyqhjn.onion", "www.EXAMPLE.onion.", "relay.exit"])
def test_special_names_never_reach_the_resolver(make_server, name):
    resolver = FakeResolver({name: ["127.0.0.1"]})
    server = make_server(resolver=resolver)
    with connect(server) as client:
        client.sendall(GREETING_NO_AUTH + socks5_request(CONNECT, name, 80))
        assert_closed_after(client, METHOD_NO_AUTH, socks5_reply(0x04))
    assert resolver.queries == []


@each_relay_mode
def test_hostname_that_is_an_ip_literal_is_not_looked_up(make_server,
                                                         echo_server):
    resolver = FakeResolver({})
    server = make_server(resolver=resolver)
    request = socks5_request(CONNECT, b"127.0.0.1", echo_server.port)
    with connect(server) as client:
        client.sendall(GREETING_NO_AUTH + request)
        assert_reply(client, METHOD_NO_AUTH + SOCKS5_OK)
        assert_echo(client)
    assert resolver.queries == []


def test_lookup_deadline(make_server):
    resolver = FakeResolver(silent={"slow.test"})
    server = make_server(resolver=resolver, connect_timeout=0.5)
    with connect(server) as client:
        client.sendall(GREETING_NO_AUTH
                       + socks5_request(CONNECT, "slow.test", 80))
        assert_reply(client, METHOD_NO_AUTH)
        started = time.monotonic()
        assert_closed_after(client, socks5_reply(0x06))
        assert time.monotonic() - started < 5.0


# -- RESOLVE (DECISIONS row 11) -----------------------------------------------

@pytest.fixture
def resolver():
    return FakeResolver({
        "a.test": ["192.0.2.1"],
        "aaaa.test": ["2001:db8::1"],
        "both.test": ["2001:db8::2", "192.0.2.2"],
    }, reverse_names={
        "127.0.0.7": "seven.test",
        "::1": "ip6-localhost.",
    })


@pytest.fixture
def resolving_server(make_server, resolver):
    return make_server(resolver=resolver)


@pytest.mark.parametrize("name, reply", [
    ("a.test", b"\x05\x00\x00\x01\xc0\x00\x02\x01\x00\x00"),
    ("aaaa.test", b"\x05\x00\x00\x04"
     + ipaddress.IPv6Address("2001:db8::1").packed + b"\x00\x00"),
    ("both.test", b"\x05\x00\x00\x01\xc0\x00\x02\x02\x00\x00"),
    ("missing.test", b"\x05\x04\x00\x01" + bytes(6)),
])
def test_socks5_resolve(resolving_server, resolver, name, reply):
    with connect(resolving_server) as client:
        client.sendall(GREETING_NO_AUTH)
        assert_reply(client, METHOD_NO_AUTH)
        client.sendall(socks5_request(RESOLVE, name, 0))
        assert_closed_after(client, reply)
    assert resolver.queries == [name]


def test_socks5_resolve_ignores_the_port_and_drops_pipelined_data(
        resolving_server):
    with connect(resolving_server) as client:
        client.sendall(GREETING_NO_AUTH + socks5_request(RESOLVE, "a.test", 42)
                       + b"ignored")
        assert_closed_after(client, METHOD_NO_AUTH,
                            b"\x05\x00\x00\x01\xc0\x00\x02\x01\x00\x00")


@pytest.mark.parametrize("name, reply", [
    ("a.test", b"\x00\x5a\x00\x00\xc0\x00\x02\x01"),
    ("both.test", b"\x00\x5a\x00\x00\xc0\x00\x02\x02"),
    ("aaaa.test", SOCKS4_REJECTED),
    ("missing.test", SOCKS4_REJECTED),
])
def test_socks4a_resolve(resolving_server, resolver, name, reply):
    with connect(resolving_server) as client:
        client.sendall(socks4a_request(RESOLVE, name, 0))
        assert_closed_after(client, reply)
    assert resolver.queries == [name]


@pytest.mark.parametrize("request_bytes, reply", [
    (socks5_request(RESOLVE, "192.0.2.9", 0),
     b"\x05\x00\x00\x01\xc0\x00\x02\x09\x00\x00"),
    (socks5_request(RESOLVE, b"192.0.2.9", 0),
     b"\x05\x00\x00\x01\xc0\x00\x02\x09\x00\x00"),
    (socks5_request(RESOLVE, "2001:db8::9", 0),
     b"\x05\x00\x00\x04" + ipaddress.IPv6Address("2001:db8::9").packed
     + b"\x00\x00"),
    (socks5_request(RESOLVE, b"[2001:db8::9]", 0),
     b"\x05\x00\x00\x04" + ipaddress.IPv6Address("2001:db8::9").packed
     + b"\x00\x00"),
], ids=["atyp1", "atyp3-ipv4", "atyp4", "atyp3-ipv6"])
def test_socks5_resolve_ip_literal_without_lookup(resolving_server, resolver,
                                                  request_bytes, reply):
    with connect(resolving_server) as client:
        client.sendall(GREETING_NO_AUTH + request_bytes)
        assert_closed_after(client, METHOD_NO_AUTH, reply)
    assert resolver.queries == []


@pytest.mark.parametrize("request_bytes", [
    socks4_request(RESOLVE, "192.0.2.9", 0),
    socks4a_request(RESOLVE, "192.0.2.9", 0),
], ids=["socks4", "socks4a"])
def test_socks4_resolve_ip_literal_without_lookup(resolving_server, resolver,
                                                  request_bytes):
    with connect(resolving_server) as client:
        client.sendall(request_bytes)
        assert_closed_after(client, b"\x00\x5a\x00\x00\xc0\x00\x02\x09")
    assert resolver.queries == []


# -- RESOLVE_PTR (DECISIONS row 12) -------------------------------------------

@pytest.mark.parametrize("host, reply", [
    ("127.0.0.7", b"\x05\x00\x00\x03\x0aseven.test\x00\x00"),
    (b"127.0.0.7", b"\x05\x00\x00\x03\x0aseven.test\x00\x00"),
    ("::1", b"\x05\x00\x00\x03\x0dip6-localhost\x00\x00"),
    ("127.0.0.8", b"\x05\x04\x00\x01" + bytes(6)),
], ids=["atyp1", "atyp3-literal", "atyp4", "unknown"])
def test_socks5_resolve_ptr(resolving_server, host, reply):
    with connect(resolving_server) as client:
        client.sendall(GREETING_NO_AUTH)
        assert_reply(client, METHOD_NO_AUTH)
        client.sendall(socks5_request(RESOLVE_PTR, host, 0))
        assert_closed_after(client, reply)


def test_socks5_resolve_ptr_of_a_hostname(resolving_server, resolver):
    with connect(resolving_server) as client:
        client.sendall(GREETING_NO_AUTH
                       + socks5_request(RESOLVE_PTR, "a.test", 0))
        assert_closed_after(client, METHOD_NO_AUTH,
                            b"\x05\x08\x00\x01" + bytes(6))
    assert resolver.queries == []


class TwoNamesResolver(FakeResolver):
    """Every address has two names, the first of which no reply carries."""

    def reverse(self, address, callback):
        callback(torsocksd.ResolverResult(("bad name.test", "good.test")))


def test_socks5_resolve_ptr_answers_the_first_name_it_can_carry(
        make_server):
    server = make_server(resolver=TwoNamesResolver())
    with connect(server) as client:
        client.sendall(GREETING_NO_AUTH
                       + socks5_request(RESOLVE_PTR, "192.0.2.9", 0))
        assert_closed_after(client, METHOD_NO_AUTH,
                            b"\x05\x00\x00\x03\x09good.test\x00\x00")


@pytest.mark.parametrize("request_bytes", [
    socks4_request(RESOLVE_PTR, "127.0.0.7", 1),
    socks4a_request(RESOLVE_PTR, "127.0.0.7", 1),
], ids=["socks4", "socks4a"])
def test_socks4_resolve_ptr_rejected(resolving_server, resolver,
                                      request_bytes):
    with connect(resolving_server) as client:
        client.sendall(request_bytes)
        assert_closed_after(client, SOCKS4_REJECTED)
    assert resolver.queries == []


# -- unsupported commands and address types (DECISIONS rows 6-8) --------------

@pytest.mark.parametrize("request_bytes, code", [
    (socks5_request(BIND, "127.0.0.1", 80), 0x07),
    (socks5_request(UDP_ASSOCIATE, "0.0.0.0", 0), 0x07),
    (socks5_request(0x04, "127.0.0.1", 80), 0x07),
    (b"\x05\x01\x00\x05" + bytes(6), 0x08),
], ids=["bind", "udp-associate", "unknown-command", "unknown-atyp"])
def test_socks5_unsupported(server, request_bytes, code):
    with connect(server) as client:
        client.sendall(GREETING_NO_AUTH)
        assert_reply(client, METHOD_NO_AUTH)
        client.sendall(request_bytes)
        assert_closed_after(client, socks5_reply(code))


@pytest.mark.parametrize("request_bytes", [
    socks4_request(BIND, "127.0.0.1", 80),
    socks4_request(0x04, "127.0.0.1", 80),
], ids=["bind", "unknown-command"])
def test_socks4_unsupported(server, request_bytes):
    with connect(server) as client:
        client.sendall(request_bytes)
        assert_closed_after(client, SOCKS4_REJECTED)


def test_socks4_request_after_socks5_greeting(server, echo_server):
    with connect(server) as client:
        client.sendall(GREETING_NO_AUTH)
        assert_reply(client, METHOD_NO_AUTH)
        client.sendall(socks4_request(CONNECT, "127.0.0.1", echo_server.port))
        assert_closed_after(client, socks5_reply(0x01))


# -- handshake deadline and size (DECISIONS row 17) ---------------------------

@pytest.mark.parametrize("sent, replies", [
    (b"\x05", []),
    (GREETING_NO_AUTH, [METHOD_NO_AUTH, socks5_reply(0x01)]),
    (GREETING_NO_AUTH + b"\x05\x01\x00\x01\x7f",
     [METHOD_NO_AUTH, socks5_reply(0x01)]),
    (b"\x04\x01\x00\x50\x7f\x00\x00\x01us", [SOCKS4_REJECTED]),
], ids=["socks5-version-only", "socks5-greeting", "socks5-partial-request",
        "socks4-partial-request"])
def test_handshake_deadline(make_server, sent, replies):
    server = make_server(handshake_timeout=0.5)
    with connect(server) as client:
        started = time.monotonic()
        client.sendall(sent)
        assert_closed_after(client, *replies)
        elapsed = time.monotonic() - started
    # A liveness bound, not a measurement: closed by the deadline, not at once
    # and not by the socket timeout.
    assert 0.3 <= elapsed < 5.0


@each_relay_mode
def test_deadline_does_not_cut_a_relayed_connection(make_server, echo_server):
    server = make_server(handshake_timeout=0.2)
    with open_socks5_tunnel(server.address, "127.0.0.1",
                            echo_server.port) as client:
        client.settimeout(0.7)
        # Still open after the handshake deadline has passed.
        with pytest.raises(socket.timeout):
            client.recv(1)
        assert_echo(client)


def test_socks4_userid_longer_than_512_bytes(server):
    with connect(server) as client:
        client.sendall(b"\x04\x01\x00\x50\x7f\x00\x00\x01" + b"u" * 513)
        assert_closed_after(client, SOCKS4_REJECTED)


@each_relay_mode
def test_socks4_userid_of_512_bytes(server, echo_server):
    with connect(server) as client:
        client.sendall(socks4_request(CONNECT, "127.0.0.1", echo_server.port,
                                      b"u" * 512))
        assert_reply(client, SOCKS4_GRANTED)
        assert_echo(client)


def test_socks4a_hostname_longer_than_255_bytes(server):
    with connect(server) as client:
        client.sendall(b"\x04\x01\x00\x50\x00\x00\x00\x01" + b"u" * 512
                       + b"\0" + b"h" * 256)
        assert_closed_after(client, SOCKS4_REJECTED)


def test_handshake_over_1024_bytes_is_closed(make_server):
    """Greeting (257 bytes) + username/password (513) + 255 bytes of a
    request: 1025 bytes and still no whole request.  Every single message
    is within its own limit, so only the handshake limit can close this
    connection; the handshake deadline is far away."""
    server = make_server(handshake_timeout=60.0)
    greeting = b"\x05\xff" + b"\x02" * 255
    auth = userpass(b"u" * 255, b"p" * 255)
    partial_request = b"\x05\x01\x00\x03\xff" + b"h" * 250
    assert len(greeting) + len(auth) + len(partial_request) == 1025
    with connect(server, timeout=3.0) as client:
        client.sendall(greeting)
        assert_reply(client, METHOD_USERPASS)
        client.sendall(auth)
        assert_reply(client, AUTH_OK)
        client.sendall(partial_request)
        try:
            assert_closed_after(client, socks5_reply(0x01))
        except socket.timeout:
            pytest.fail("a 1025-byte handshake without a whole request was "
                        "not closed (nothing within 3 s)")


# -- not SOCKS (DECISIONS rows 1 and 2) ---------------------------------------

def split_http(response):
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers = dict(line.split(b": ", 1) for line in lines[1:])
    return lines[0], headers, body


@pytest.mark.parametrize("method", [
    b"GET", b"POST", b"PUT", b"CONNECT", b"OPTIONS", b"DELETE", b"TRACE"])
def test_http_request_gets_the_501_page(server, method):
    with connect(server) as client:
        client.sendall(method + b" / HTTP/1.1\r\nHost: x\r\n\r\n")
        response = recv_until_eof(client)
    assert response.startswith(b"HTTP/1.0 501 ")
    status, headers, body = split_http(response)
    assert headers[b"Content-Type"] == b"text/html; charset=utf-8"
    assert headers[b"Connection"] == b"close"
    assert int(headers[b"Content-Length"]) == len(body) > 0
    assert b"SOCKS" in body
    assert not body.endswith(b"\0")


def test_http_head_gets_headers_only(server):
    with connect(server) as client:
        client.sendall(b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n")
        response = recv_until_eof(client)
    assert response.startswith(b"HTTP/1.0 501 ")
    assert response.endswith(b"\r\n\r\n")
    status, headers, body = split_http(response)
    assert body == b""
    assert int(headers[b"Content-Length"]) > 0


def test_http_head_one_byte_per_segment(server):
    with connect(server) as client:
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        send_byte_by_byte(client, b"HEAD ")
        response = recv_until_eof(client)
    assert response.startswith(b"HTTP/1.0 501 ")
    assert response.endswith(b"\r\n\r\n")


@pytest.mark.parametrize("first_bytes", [
    b"\x16\x03\x01\x02\x00", b"\x00", b"\x00\x01\x02\x03", b"\xff"],
    ids=["tls", "nul", "nul-and-more", "ff"])
def test_unknown_protocol_closed_without_reply(server, first_bytes):
    with connect(server) as client:
        client.sendall(first_bytes)
        assert recv_until_eof(client) == b""


# -- safe_socks (DECISIONS row 18) --------------------------------------------

@pytest.fixture
def safe_server(make_server):
    return make_server(safe_socks=True,
                       resolver=FakeResolver({"echo.test": ["127.0.0.1"]}))


@pytest.mark.parametrize("request_bytes", [
    socks5_request(CONNECT, "127.0.0.1", 80),
    socks5_request(CONNECT, "::1", 80),
    socks5_request(RESOLVE, "127.0.0.1", 0),
], ids=["connect-ipv4", "connect-ipv6", "resolve-ipv4"])
def test_safe_socks_refuses_socks5_ip_requests(safe_server, request_bytes):
    with connect(safe_server) as client:
        client.sendall(GREETING_NO_AUTH)
        assert_reply(client, METHOD_NO_AUTH)
        client.sendall(request_bytes)
        assert_closed_after(client, socks5_reply(0x02))


def test_safe_socks_refuses_socks4(safe_server, echo_server):
    with connect(safe_server) as client:
        client.sendall(socks4_request(CONNECT, "127.0.0.1", echo_server.port))
        assert_closed_after(client, SOCKS4_REJECTED)
    assert echo_server.accepted == []


@each_relay_mode
def test_safe_socks_allows_socks5_hostname(safe_server, echo_server):
    with open_socks5_tunnel(safe_server.address, "echo.test",
                            echo_server.port) as client:
        assert_echo(client)


@each_relay_mode
def test_safe_socks_allows_socks4a_hostname(safe_server, echo_server):
    with connect(safe_server) as client:
        client.sendall(socks4a_request(CONNECT, "echo.test", echo_server.port))
        assert_reply(client, SOCKS4_GRANTED)
        assert_echo(client)


# -- the server goes on -------------------------------------------------------

@each_relay_mode
def test_server_serves_normally_after_failures(server, echo_server):
    with connect(server) as client:             # refused target
        client.sendall(GREETING_NO_AUTH
                       + socks5_request(CONNECT, "127.0.0.1", free_port()))
        assert_closed_after(client, METHOD_NO_AUTH, socks5_reply(0x05))
    with connect(server) as client:             # garbage
        client.sendall(b"\x00garbage")
        assert recv_until_eof(client) == b""
    with connect(server) as client:             # bad request
        client.sendall(GREETING_NO_AUTH + b"\x05\x01\x01\x01" + bytes(6))
        assert_closed_after(client, METHOD_NO_AUTH, socks5_reply(0x01))
    with connect(server) as client:             # vanished mid-handshake
        client.sendall(b"\x05\x01")
    with open_socks5_tunnel(server.address, "127.0.0.1",
                            echo_server.port) as client:
        assert_echo(client)
    assert server.stats()["accepted"] == 5


@each_relay_mode
def test_concurrent_tunnels_are_independent(server, echo_server):
    clients = [open_socks5_tunnel(server.address, "127.0.0.1",
                                  echo_server.port)
               for _ in range(5)]
    try:
        for number, client in enumerate(clients):
            client.sendall(b"client %d" % number)
        for number, client in reversed(list(enumerate(clients))):
            assert_reply(client, b"client %d" % number)
    finally:
        for client in clients:
            client.close()


def test_stop_twice_and_stats(make_server):
    server = make_server()
    port = server.address[1]
    stats = server.stats()
    assert (stats["accepted"], stats["active"]) == (0, 0)
    assert stats["listeners"] == ["127.0.0.1:%d" % port]
    for _ in range(3):
        with connect(server) as client:
            client.sendall(GREETING_NO_AUTH)
            assert_reply(client, METHOD_NO_AUTH)
    assert server.stats()["accepted"] == 3
    server.stop()
    server.stop()
    assert server.stats()["accepted"] == 3
    assert server.stats()["active"] == 0
    with pytest.raises(ConnectionRefusedError):
        connect(server, timeout=2.0)


@each_relay_mode
def test_stop_closes_open_tunnels(make_server, echo_server):
    server = make_server()
    with open_socks5_tunnel(server.address, "127.0.0.1",
                            echo_server.port) as client:
        server.stop()
        assert recv_until_eof(client) == b""
    server.stop()


# -- found by a second reading ---------------------------------------------------

@each_relay_mode
def test_stalled_sink_does_not_spin_the_loop(make_server, make_peer):
    """A target that stops reading: the relay must wait for it, not poll.
    (The splice relay once kept reading interest on a full pipe.)"""
    stop = threading.Event()
    peer = make_peer(lambda sock: stop.wait(TIMEOUT))
    server = make_server()
    greeting, request = socks5_connect_request("127.0.0.1", peer.port)
    try:
        with connect(server) as client:
            client.sendall(greeting + request)
            assert recv_exactly(client, 12)[:4] == b"\x05\x00\x05\x00"
            client.setblocking(False)
            chunk = bytes(65536)
            deadline = time.monotonic() + TIMEOUT
            while time.monotonic() < deadline:     # fill every buffer
                try:
                    client.send(chunk)
                except BlockingIOError:
                    time.sleep(0.2)
                    try:
                        client.send(chunk)
                    except BlockingIOError:
                        break
            started = time.process_time()
            time.sleep(1.0)
            busy = time.process_time() - started
    finally:
        stop.set()
    # The whole test process, server thread included, stays nearly idle.
    assert busy < 0.5, "%.2f s of CPU in 1 s while the target is stalled" % busy


def test_resolve_failures_are_04_in_the_10_byte_form(make_server):
    server = make_server(listen=[("::1", 0)], resolver=FakeResolver(
        silent=["slow.test"]), connect_timeout=0.5)
    for name in (b"unknown.test", b"slow.test"):
        with socket.create_connection(server.address[:2],
                                      timeout=TIMEOUT) as client:
            client.sendall(b"\x05\x01\x00\x05\xf0\x00\x03" + bytes([len(name)])
                           + name + b"\x00\x00")
            assert recv_until_eof(client) == \
                b"\x05\x00" + b"\x05\x04\x00\x01" + bytes(6)


def test_handed_in_listener_on_all_interfaces_needs_a_policy():
    listener = socket.socket()
    listener.bind(("0.0.0.0", 0))
    listener.listen(1)
    server = torsocksd.Server(sockets=[listener])
    with pytest.raises(ValueError, match="--open-proxy"):
        server.bind()
    listener.close()


def test_stop_from_another_thread_than_serve_forever():
    server = torsocksd.Server(listen=[("127.0.0.1", 0)])
    server.bind()
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    with socket.create_connection(server.address, timeout=TIMEOUT) as client:
        client.sendall(b"\x05\x01\x00")
        assert recv_exactly(client, 2) == b"\x05\x00"
        server.stop()
        assert recv_until_eof(client) == b""
    thread.join(TIMEOUT)
    assert not thread.is_alive()
    server.stop()


def test_a_deadline_a_month_away_does_not_stop_the_loop(make_server):
    """epoll takes milliseconds in a C int (24.8 days at most): a longer
    wait for the next timer overflowed it and ended serve_forever."""
    server = make_server(handshake_timeout=3e6, connect_timeout=3e6)
    with connect(server) as first:
        first.sendall(b"\x05")             # its deadline is a month away
        time.sleep(0.2)                    # the loop now sleeps until then
        with connect(server) as second:
            second.sendall(b"\x05\x01\x00")
            assert recv_exactly(second, 2) == b"\x05\x00"


def test_address_and_url_of_each_listener_family(make_server, tmp_path):
    """Server.address is where the first listener listens, and Server.url
    the proxy URL a client takes: brackets around IPv6, curl's
    socks5h://localhost/PATH for a Unix socket."""
    server = make_server()
    host, port = server.address
    assert (host, server.url) == ("127.0.0.1",
                                  "socks5h://127.0.0.1:%d" % port)
    path = str(tmp_path / "s")
    if len(path) < 100:
        unix = make_server(listen=["unix:" + path])
        assert (unix.address, unix.url) == (path, "socks5h://localhost" + path)
    if ipv6_loopback():
        ipv6 = make_server(listen=[("::1", 0)])
        host, port = ipv6.address
        assert (host, ipv6.url) == ("::1", "socks5h://[::1]:%d" % port)


def test_a_command_without_a_handler_is_refused_never_connected(
        make_server, echo_server, monkeypatch, caplog):
    """The one dispatch from command to handler is closed: a command that
    reaches it without a handler gets 07, however far it got."""
    caplog.set_level(logging.INFO, logger="torsocksd")
    monkeypatch.delitem(torsocksd.COMMAND_HANDLERS, torsocksd.Command.CONNECT)
    server = make_server()
    with connect(server) as client:
        client.sendall(b"".join(socks5_connect_request(
            "127.0.0.1", echo_server.port)))
        assert recv_until_eof(client) == b"\x05\x00" + socks5_reply(7)
    assert echo_server.accepted == []
    # The connection's line is written once its sockets are closed.
    deadline = time.monotonic() + TIMEOUT
    while "has no handler" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.01)
    assert "refused: command CONNECT has no handler" in caplog.text
