"""The HTTP CONNECT port (--http-tunnel): the request head parser, the
sans-I/O HttpTunnelHandshake, and a Server's --http-tunnel listener over
loopback sockets.

Answers are compared byte for byte with Tor 0.4.9's (the identity fields
aside: tests/test_http_tunnel_differential.py compares with a live tor);
real clients are in tests/test_http_tunnel_clients.py.  Names go through
FakeResolver only.
"""

import base64
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import time

import pytest

import torsocksd
from torsocksd import (NEED_MORE, HandshakeState, HttpTunnelHandshake,
                       Parsed, Protocol, Rejected, Reply)
from conftest import (TIMEOUT, FakeResolver, each_relay_mode, free_port,
                      recv_exactly, recv_until_eof)

SCRIPT = os.path.join(os.path.dirname(__file__), os.pardir, "torsocksd.py")
CAPABILITIES = b"Tor-Capabilities: \r\n"


def answer(status, failed=None):
    head = b"HTTP/1.0 " + status + b"\r\n" + CAPABILITIES
    if failed:
        head += b"Tor-Request-Failed: " + failed + b"\r\n"
    return head + b"\r\n"


OK = answer(b"200 OK")
BAD_REQUEST = answer(b"400 Bad Request")
TIMED_OUT_HEAD = answer(b"408 Request Timeout")
TOR_PROTOCOL = answer(b"502 Bad Gateway (tor protocol violation)",
                      b"end/TORPROTOCOL")
PROXY_AUTH = (b"HTTP/1.0 407 Proxy Authentication Required\r\n"
              b'Proxy-Authenticate: Basic realm="torsocksd"\r\n'
              b"Content-Length: 0\r\nConnection: close\r\n"
              + CAPABILITIES + b"\r\n")

# Tor's status line for each END reason (reasons.c, 0.4.9) and the reply
# that stands for it here.
FAILURES = [
    (Reply.GENERAL_FAILURE, False, b"500 Internal Server Error", b"end/MISC"),
    (Reply.NOT_ALLOWED, False, b"403 Forbidden (exit policy)",
     b"end/EXITPOLICY"),
    (Reply.NETWORK_UNREACHABLE, False, b"503 Service Unavailable (no route)",
     b"end/NOROUTE"),
    (Reply.HOST_UNREACHABLE, False, b"503 Service Unavailable (no route)",
     b"end/NOROUTE"),
    (Reply.HOST_UNREACHABLE, True,
     b"503 Service Unavailable (resolve failed)", b"end/RESOLVEFAILED"),
    (Reply.CONNECTION_REFUSED, False, b"403 Forbidden (connection refused)",
     b"end/CONNECTREFUSED"),
    (Reply.TTL_EXPIRED, False, b"504 Gateway Timeout", b"end/TIMEOUT"),
    (Reply.TTL_EXPIRED, True, b"504 Gateway Timeout", b"end/TIMEOUT"),
    (Reply.COMMAND_NOT_SUPPORTED, False, b"500 Internal Server Error",
     b"end/MISC"),
]


def connect_head(target=b"example.test:443", fields=b"",
                 version=b"HTTP/1.1"):
    return b"CONNECT " + target + b" " + version + b"\r\n" + fields + b"\r\n"


def basic(user, password):
    return b"Proxy-Authorization: Basic " + base64.b64encode(
        user + b":" + password) + b"\r\n"


# =============================================================================
# The request head parser
# =============================================================================

VALID_HEADS = [
    connect_head(),
    connect_head(b"[2001:db8::1]:443", b"Host: [2001:db8::1]:443\r\n"
                 b"User-Agent: curl/7.88.1\r\nProxy-Connection: Keep-Alive"
                 b"\r\n", b"HTTP/1.0"),
    b"GET http://x.test/ HTTP/1.1\r\nHost: x.test\r\nX-Empty:\r\n"
    b"X-Tab:\tv\t\r\n\r\n",
    b"OPTIONS * HTTP/1.1\r\nHost: localhost\r\n\r\n",
]


@pytest.mark.parametrize("head", VALID_HEADS)
def test_every_prefix_of_a_head_needs_more(head):
    for end in range(len(head)):
        assert torsocksd.parse_http_request_head(head[:end]) is NEED_MORE, \
            head[:end]
    result = torsocksd.parse_http_request_head(head + b"early")
    assert isinstance(result, Parsed) and result.used == len(head)


def test_head_fields_are_lower_case_names_and_trimmed_values():
    result = torsocksd.parse_http_request_head(VALID_HEADS[2])
    assert result.message == torsocksd.HttpRequestHead(
        b"GET", b"http://x.test/", b"HTTP/1.1",
        ((b"host", b"x.test"), (b"x-empty", b""), (b"x-tab", b"v")))


@pytest.mark.parametrize("data, reason", [
    # bytes that can never start a request: refused at once
    (b"\x05", "a SOCKS client at the HTTP CONNECT port"),
    (b"\x04\x01", "a SOCKS client at the HTTP CONNECT port"),
    (b"\x16\x03\x01", "TLS at the HTTP CONNECT port (an https:// proxy "
                      "URL?)"),
    (b"\x00", "a byte outside printable ASCII in the request line"),
    (b"CONNECT \xff", "a byte outside printable ASCII in the request line"),
    (b"CONN\tECT", "a byte outside printable ASCII in the request line"),
    (b"C(NNECT", "the request line does not start with a method"),
    (b"CONNECT\r\n", "the request line is not METHOD TARGET VERSION"),
    (b"CONNECT x:1\r\n", "the request line is not METHOD TARGET VERSION"),
    (b"CONNECT a b HTTP/1.1\r\n",
     "the request line is not METHOD TARGET VERSION"),
    (b"\r\n", "the request line is not METHOD TARGET VERSION"),
    (b"CONNECT x:1 HTTP/2.0\r\n", "not HTTP/1.x: HTTP/2.0"),
    (b"CONNECT x:1 http/1.1\r\n", "not HTTP/1.x: http/1.1"),
    (b"CONNECT x:1 HTTP/1.10\r\n", "not HTTP/1.x: HTTP/1.10"),
    # header lines, once the head is whole
    (connect_head(fields=b"no colon\r\n"), "malformed header line no colon"),
    (connect_head(fields=b"Host : x\r\n"), "malformed header line Host : x"),
    (connect_head(fields=b": x\r\n"), "malformed header line : x"),
    (connect_head(fields=b"A: 1\r\n folded\r\n"),
     "malformed header line  folded"),
    (connect_head(fields=b"A: 1\n\r\n"), "a control byte in header A"),
    (connect_head(fields=b"A: \x00\r\n"), "a control byte in header A"),
    (connect_head(fields=b"A: 1\rB: 2\r\n"), "a control byte in header A"),
    (connect_head(fields=b"X: y\r\n" * 129), "more than 128 header lines"),
])
def test_malformed_heads_get_400(data, reason):
    assert torsocksd.parse_http_request_head(data) == \
        Rejected(BAD_REQUEST, reason)


def test_head_limit_is_8191_bytes_as_tor():
    head = connect_head(fields=b"X-Pad: " + b"p" * 8100 + b"\r\n")
    pad = 8191 - len(head)
    largest = connect_head(fields=b"X-Pad: " + b"p" * (8100 + pad) + b"\r\n")
    assert len(largest) == 8191
    assert isinstance(torsocksd.parse_http_request_head(largest), Parsed)
    too_large = largest[:-4] + b"p\r\n\r\n"
    assert torsocksd.parse_http_request_head(too_large) == Rejected(
        BAD_REQUEST, "request head longer than 8191 bytes")
    # Incomplete, and already at the limit: no use waiting.
    assert torsocksd.parse_http_request_head(too_large[:8191]) == Rejected(
        BAD_REQUEST, "request head longer than 8191 bytes")
    assert torsocksd.parse_http_request_head(too_large[:8190]) is NEED_MORE
    assert torsocksd.parse_http_request_head(
        connect_head(fields=b"X: y\r\n" * 128)) is not None


def test_random_bytes_never_break_the_parser():
    seed = random.randrange(1 << 32)
    rng = random.Random(seed)
    alphabet = b"CONECT GHTP/1.0:\r\n[]ab\x00\xff\t"
    for _ in range(3000):
        data = bytes(rng.choice(alphabet) for _ in range(rng.randrange(60)))
        if rng.random() < 0.5:
            data = connect_head()[:rng.randrange(40)] + data
        result = torsocksd.parse_http_request_head(data)
        assert result is NEED_MORE or isinstance(result, (Parsed, Rejected)), \
            "seed %d: %r" % (seed, data)
        if isinstance(result, Parsed):
            assert data[:result.used].endswith(b"\r\n\r\n"), seed
            assert len(result.message.version) == 8, seed


@pytest.mark.parametrize("target, expected", [
    ("example.test:443", ("example.test", 443)),
    ("example.test:0443", ("example.test", 443)),
    ("1.2.3.4:80", ("1.2.3.4", 80)),
    ("[2001:db8::1]:443", ("[2001:db8::1]", 443)),
    ("example.test", ("example.test", None)),
    ("::1", ("::1", None)),
    ("2001:db8::1:80", ("2001:db8::1:80", None)),    # Tor reads no port
    ("[::1]", ("[::1]", None)),
    ("[::1", ("[::1", None)),
    (":80", ("", 80)),
])
def test_connect_targets(target, expected):
    assert torsocksd.split_connect_target(target) == expected


@pytest.mark.parametrize("target", [
    "example.test:0", "example.test:65536", "example.test:abc",
    "example.test:", "example.test:+80", "example.test:-1", "[::1]80",
    "[::1]:", "x:" + "0" * 11 + "1", "x:٣",
])
def test_bad_ports_are_errors(target):
    with pytest.raises(ValueError):
        torsocksd.split_connect_target(target)


@pytest.mark.parametrize("value, expected", [
    (b"Basic " + base64.b64encode(b"alice:s3cret"), (b"alice", b"s3cret")),
    (b"basic " + base64.b64encode(b"alice:a:b"), (b"alice", b"a:b")),
    (b"BASIC  " + base64.b64encode(b":"), (b"", b"")),
    (b"Basic " + base64.b64encode(b"alice"), None),         # no colon
    (b"Basic !!!!", None),
    (b"Basic YWxpY2U6czNjcmV0", (b"alice", b"s3cret")),
    (b"Basic YWxpY2U6czNjcmV", None),                       # bad padding
    (b"Basic YWxp Y2U6czNjcmV0", None),
    (b"Bearer abc", None),
    (b"", None),
    (None, None),
])
def test_basic_credentials(value, expected):
    assert torsocksd.basic_credentials(value) == expected


# =============================================================================
# The handshake, sans I/O
# =============================================================================

def handshake(**kwargs):
    kwargs.setdefault("local_address", lambda: "127.0.0.1:9080")
    return HttpTunnelHandshake(**kwargs)


def test_a_connect_becomes_a_request_with_its_early_data():
    shake = handshake()
    assert shake.receive(connect_head()[:10]) == b""
    assert shake.state is HandshakeState.REQUESTING
    assert shake.receive(connect_head()[10:] + b"\x16\x03early") == b""
    assert shake.state is HandshakeState.DONE
    assert shake.request == torsocksd.Request(
        Protocol.HTTP_CONNECT, torsocksd.Command.CONNECT, "example.test",
        443, None, None, False)
    assert shake.early_data == b"\x16\x03early"
    assert shake.success_reply() == OK


def test_an_ip_literal_is_the_address_and_unsafe():
    shake = handshake()
    shake.receive(connect_head(b"[2001:db8::1]:443"))
    request = shake.request
    assert (request.host, request.port, str(request.address),
            request.unsafe) == ("[2001:db8::1]", 443, "2001:db8::1", True)


@pytest.mark.parametrize("reply, during_lookup, status, failed", FAILURES)
def test_failure_replies_are_tors_status_lines(reply, during_lookup, status,
                                               failed):
    shake = handshake()
    shake.receive(connect_head())
    assert shake.failure_reply(reply, during_lookup) == answer(status, failed)


def test_socks_handshakes_take_during_lookup_too():
    shake = torsocksd.SocksHandshake()
    shake.receive(b"\x05\x01\x00")
    assert shake.failure_reply(Reply.HOST_UNREACHABLE, True) == \
        b"\x05\x04\x00\x01" + bytes(6)


def test_refused_before_the_head_is_whole_is_408():
    shake = handshake()
    shake.receive(b"CONNECT example.te")
    assert shake.refuse(Reply.GENERAL_FAILURE, "handshake timed out") == \
        TIMED_OUT_HEAD
    assert (shake.state, shake.refusal) == (HandshakeState.DONE,
                                            "handshake timed out")


def test_refused_after_the_head_is_the_failure_reply():
    shake = handshake()
    shake.receive(connect_head(b"[2001:db8::1]:443"))
    assert shake.refuse(Reply.NOT_ALLOWED, "IPv6 is off") == answer(
        b"403 Forbidden (exit policy)", b"end/EXITPOLICY")


@pytest.mark.parametrize("head, reply, refusal", [
    (connect_head(b"example.test:0"), BAD_REQUEST,
     "CONNECT target example.test:0: port '0'"),
    (connect_head(b"[::1]x"), BAD_REQUEST,
     "CONNECT target [::1]x: text after the brackets"),
    (connect_head(b"b" * 256 + b":1"),
     answer(b"414 Request-URI Too Long"), "host longer than 255 bytes"),
    (connect_head(fields=b"Tor-RPC-Target: x\r\n"),
     answer(b"501 Not implemented (No RPC Support)"),
     "Tor-RPC-Target (no RPC here)"),
    (connect_head(fields=b"Content-Length: 1\r\n"), BAD_REQUEST,
     "a CONNECT with content"),
    (connect_head(fields=b"Transfer-Encoding: chunked\r\n"), BAD_REQUEST,
     "a CONNECT with content"),
    (connect_head(b"example.test"), TOR_PROTOCOL, "no port"),
    (connect_head(b"a..b:1"), TOR_PROTOCOL, "not a valid hostname"),
    (connect_head(b":1"), TOR_PROTOCOL, "empty hostname"),
    (connect_head(b"[x]:1"), TOR_PROTOCOL,
     "brackets around something that is not an IPv6 address"),
    (connect_head(b"x.onion:1"), TOR_PROTOCOL,
     "a .onion or .exit name, which is never looked up"),
    (connect_head(b"x.exit.:1"), TOR_PROTOCOL,
     "a .onion or .exit name, which is never looked up"),
])
def test_connect_refusals_in_tors_order(head, reply, refusal):
    shake = handshake()
    assert shake.receive(head) == reply
    assert (shake.state, shake.request, shake.refusal) == (
        HandshakeState.DONE, None, refusal)


def test_other_methods_answer_only_a_localhost_host():
    for head in (b"GET / HTTP/1.1\r\nHost: example.test\r\n\r\n",
                 b"GET / HTTP/1.0\r\n\r\n",
                 b"OPTIONS * HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
                 b"GET / HTTP/1.1\r\nHost: example.test\r\n"
                 b"Host: localhost\r\n\r\n"):
        shake = handshake()
        assert shake.receive(head) == b""
        assert shake.state is HandshakeState.DONE and shake.request is None
        assert "Host is not localhost" in shake.refusal
    shake = handshake()
    assert shake.receive(b"OPTIONS * HTTP/1.1\r\nHost: Localhost:9080\r\n"
                         b"\r\n") == (
        b"HTTP/1.0 200 OK\r\nAllow: OPTIONS, CONNECT\r\nContent-Length: 0\r\n"
        b"Tor-Capabilities: \r\nServer: torsocksd/%s\r\n\r\n"
        % torsocksd.__version__.encode())


@pytest.mark.parametrize("method", [b"GET", b"POST", b"get", b"HEAD"])
def test_the_page_names_the_port_and_has_its_length(method):
    shake = handshake()
    reply = shake.receive(method + b" / HTTP/1.1\r\nHost: localhost\r\n\r\n")
    head, _, body = reply.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.0 405 Method Not Allowed"
    assert b"Allow: OPTIONS, CONNECT" in lines
    assert b"Content-Type: text/html; charset=utf-8" in lines
    assert b"Connection: close" in lines
    assert b"Tor-Capabilities: " in lines
    length = int(next(line for line in lines
                      if line.startswith(b"Content-Length: "))[16:])
    if method == b"HEAD":
        assert body == b""
    else:
        assert len(body) == length
        assert b"https_proxy=http://127.0.0.1:9080" in body
    assert shake.refusal == "HTTP %s instead of CONNECT" % method.decode()


def test_the_page_escapes_where():
    shake = handshake(local_address=lambda: "<x>&")
    reply = shake.receive(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert b"&lt;x&gt;&amp;" in reply and b"<x>" not in reply


def test_isolation_key_from_proxy_authorization_and_isolation_header():
    cases = [
        (b"", None),
        (b"Proxy-Authorization: Basic eDp5\r\n", b"Basic eDp5\0"),
        (b"X-Tor-Stream-Isolation: tab 1\r\n", b"\0tab 1"),
        (b"Tor-Stream-Isolation: a\r\nX-Tor-Stream-Isolation: b\r\n", b"\0a"),
        (b"Proxy-Authorization: x\r\nX-Tor-Stream-Isolation: y\r\n",
         b"x\0y"),
    ]
    for fields, key in cases:
        shake = handshake()
        shake.receive(connect_head(fields=fields))
        assert shake.request.userid == key, fields


class Authenticator:
    def __init__(self):
        self.asked = []

    def __call__(self, username, password):
        self.asked.append((username, password))
        return (username, password) == (b"alice", b"s3cret")


@pytest.mark.parametrize("fields", [
    b"",
    basic(b"alice", b"wrong"),
    basic(b"bob", b"s3cret"),
    b"Proxy-Authorization: Basic !!\r\n",
    b"Proxy-Authorization: Digest x\r\n",
    b"X-Tor-Stream-Isolation: alice:s3cret\r\n",
])
def test_credentials_without_a_good_basic_login_get_407(fields):
    authenticate = Authenticator()
    shake = handshake(credentials_required=True, authenticate=authenticate)
    # Checked before anything else about the request.
    assert shake.receive(connect_head(b"example.test:0", fields)) == \
        PROXY_AUTH
    assert shake.request is None
    assert shake.refusal == "no or bad Proxy-Authorization"


@pytest.mark.parametrize("method", [b"OPTIONS", b"GET", b"HEAD"])
def test_credentials_come_before_answers_to_other_methods(method):
    """A Host of localhost earns OPTIONS its answer and GET the page, but
    with credentials only after a good login; another Host still gets
    nothing at all."""
    head = b"%s / HTTP/1.1\r\nHost: localhost\r\n" % method
    shake = handshake(credentials_required=True,
                      authenticate=Authenticator())
    assert shake.receive(head + b"\r\n") == PROXY_AUTH
    shake = handshake(credentials_required=True,
                      authenticate=Authenticator())
    answer = shake.receive(head + basic(b"alice", b"s3cret") + b"\r\n")
    assert answer.startswith(b"HTTP/1.0 200 OK\r\n" if method == b"OPTIONS"
                             else b"HTTP/1.0 405 Method Not Allowed\r\n")
    shake = handshake(credentials_required=True,
                      authenticate=Authenticator())
    assert shake.receive(b"%s / HTTP/1.1\r\nHost: example.test\r\n\r\n"
                         % method) == b""
    assert shake.refusal.endswith("(closed unanswered)")


def test_credentials_with_a_good_basic_login_pass_and_name_the_user():
    authenticate = Authenticator()
    shake = handshake(credentials_required=True, authenticate=authenticate)
    assert shake.receive(connect_head(fields=basic(b"alice", b"s3cret"))) \
        == b""
    assert authenticate.asked == [(b"alice", b"s3cret")]
    assert shake.request.userid == b"alice"


def test_safe_socks_refuses_an_ip_literal_and_takes_a_name():
    shake = handshake(safe_socks=True)
    assert shake.receive(connect_head(b"192.0.2.1:443")) == answer(
        b"403 Forbidden (exit policy)", b"end/EXITPOLICY")
    assert shake.unsafe is True and shake.request is None
    shake = handshake(safe_socks=True)
    assert shake.receive(connect_head()) == b""
    assert shake.unsafe is False and shake.request is not None


def test_room_shrinks_to_the_head_limit():
    shake = handshake()
    assert shake.room() == 8191
    shake.receive(b"CONNECT ")
    assert shake.room() == 8183


# =============================================================================
# A Server's --http-tunnel listener, over loopback
# =============================================================================

@pytest.fixture
def tunnel_server(make_server, echo_server):
    def make(**options):
        options.setdefault("listen", [])
        options.setdefault("http_tunnel", [("127.0.0.1", 0)])
        options.setdefault("resolver", FakeResolver(
            {"echo.test": ["127.0.0.1"], "dead.test": ["127.0.0.1"]},
            silent={"slow.test"}))
        return make_server(**options)
    return make


def exchange(server, data, address=None):
    """Send data to the HTTP CONNECT port, half-close, and return everything
    until the server closes."""
    with socket.create_connection(address or server.address,
                                  timeout=TIMEOUT) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        return recv_until_eof(sock)


@each_relay_mode
def test_a_tunnel_relays_both_ways_with_early_data(tunnel_server,
                                                   echo_server):
    server = tunnel_server()
    with socket.create_connection(server.address, timeout=TIMEOUT) as sock:
        sock.sendall(connect_head(b"echo.test:%d" % echo_server.port)
                     + b"early")
        assert recv_exactly(sock, len(OK) + 5) == OK + b"early"
        payload = bytes(range(256)) * 1000
        sock.sendall(payload)
        assert recv_exactly(sock, len(payload)) == payload
        sock.shutdown(socket.SHUT_WR)
        assert recv_until_eof(sock) == b""


def test_connect_failures_over_the_wire(tunnel_server):
    server = tunnel_server(connect_timeout=0.5)
    closed = free_port()
    assert exchange(server, connect_head(b"nowhere.test:443")) == answer(
        b"503 Service Unavailable (resolve failed)", b"end/RESOLVEFAILED")
    assert exchange(server, connect_head(b"dead.test:%d" % closed)) == \
        answer(b"403 Forbidden (connection refused)", b"end/CONNECTREFUSED")
    assert exchange(server, connect_head(b"127.0.0.1:%d" % closed)) == \
        answer(b"403 Forbidden (connection refused)", b"end/CONNECTREFUSED")
    assert exchange(server, connect_head(b"slow.test:443")) == answer(
        b"504 Gateway Timeout", b"end/TIMEOUT")


def test_policy_refusal_is_403_exit_policy(tunnel_server, echo_server):
    server = tunnel_server(destination_policy=["reject *:%d"
                                               % echo_server.port])
    assert exchange(server, connect_head(
        b"echo.test:%d" % echo_server.port)) == answer(
            b"403 Forbidden (exit policy)", b"end/EXITPOLICY")
    assert echo_server.accepted == []


def test_a_slow_head_gets_408_at_the_handshake_timeout(tunnel_server):
    server = tunnel_server(handshake_timeout=0.3)
    with socket.create_connection(server.address, timeout=TIMEOUT) as sock:
        sock.sendall(b"CONNECT echo.test:1 HTTP/1.1\r\n")
        assert recv_until_eof(sock) == TIMED_OUT_HEAD


def test_a_head_past_the_limit_gets_400_and_the_rest_waits(tunnel_server):
    server = tunnel_server()
    with socket.create_connection(server.address, timeout=TIMEOUT) as sock:
        sock.sendall(b"CONNECT echo.test:1 HTTP/1.1\r\nX-Pad: "
                     + b"p" * 9000)
        assert recv_until_eof(sock) == BAD_REQUEST


def test_credentials_over_the_wire(tunnel_server, echo_server):
    credentials = torsocksd.Credentials([(b"alice", b"s3cret")])
    server = tunnel_server(credentials=credentials)
    target = b"echo.test:%d" % echo_server.port
    assert exchange(server, connect_head(target)) == PROXY_AUTH
    assert exchange(server, connect_head(
        target, basic(b"alice", b"nope"))) == PROXY_AUTH
    assert exchange(server, connect_head(
        target, basic(b"alice", b"s3cret")) + b"ping") == OK + b"ping"


def test_the_log_line_names_the_port_and_scrubs(tunnel_server, echo_server,
                                                caplog):
    server = tunnel_server()
    with caplog.at_level(logging.INFO, logger="torsocksd"):
        exchange(server, connect_head(b"echo.test:%d" % echo_server.port))
        exchange(server, b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        server.stop()
    lines = [record.getMessage() for record in caplog.records
             if " from " in record.getMessage()]
    assert any("HTTP_CONNECT CONNECT [scrubbed]:%d: relayed" % echo_server.port
               in line for line in lines), lines
    assert any("HTTP_CONNECT: refused: HTTP GET instead of CONNECT" in line
               for line in lines), lines
    assert not any("echo.test" in line for line in lines)


def test_both_kinds_of_listener_side_by_side(make_server, echo_server):
    server = make_server(http_tunnel=[("127.0.0.1", 0)],
                         resolver=FakeResolver({"echo.test": ["127.0.0.1"]}))
    socks_address, http_address = server.addresses
    assert exchange(server, connect_head(
        b"echo.test:%d" % echo_server.port) + b"x", http_address) == OK + b"x"
    with socket.create_connection(socks_address, timeout=TIMEOUT) as sock:
        sock.sendall(b"\x05\x01\x00")
        assert recv_exactly(sock, 2) == b"\x05\x00"
    # The SOCKS port still answers HTTP with its own page.
    reply = exchange(server, connect_head(), socks_address)
    assert reply.startswith(b"HTTP/1.0 501 ")


def test_a_unix_http_tunnel_listener(make_server, tmp_path, echo_server):
    path = str(tmp_path / "http.sock")
    server = make_server(listen=[], http_tunnel=["unix:" + path],
                         resolver=FakeResolver({"echo.test": ["127.0.0.1"]}))
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(TIMEOUT)
        sock.connect(path)
        sock.sendall(connect_head(b"echo.test:%d" % echo_server.port)
                     + b"hi")
        sock.shutdown(socket.SHUT_WR)
        assert recv_until_eof(sock) == OK + b"hi"
    assert server.addresses == [path]


def test_a_reachable_http_tunnel_needs_access_control():
    server = torsocksd.Server(listen=[], http_tunnel=[("0.0.0.0", 0)])
    with pytest.raises(ValueError, match="refusing to listen on 0.0.0.0"):
        server.bind()
    with torsocksd.Server(listen=[], http_tunnel=[("0.0.0.0", 0)],
                          client_policy=[(True, "127.0.0.0/8")]) as allowed:
        assert allowed.addresses[0][0] == "0.0.0.0"


def test_settings_keep_the_specs():
    settings = torsocksd.Settings(http_tunnel=[("127.0.0.1", 9080),
                                               "unix:/x"])
    assert settings.http_tunnel == (("127.0.0.1", 9080), "unix:/x")
    assert torsocksd.Settings().http_tunnel == ()


def test_listeners_are_records_with_the_kind_and_spec(make_server):
    server = make_server(http_tunnel=[("127.0.0.1", 0)])
    kinds = [(listener.kind, listener.spec)
             for listener in server._listeners]
    assert kinds == [("socks", ("127.0.0.1", 0)),
                     ("http-tunnel", ("127.0.0.1", 0))]


def test_no_connection_is_left_open(tunnel_server, echo_server):
    server = tunnel_server()
    for data in (b"garbage\r\n\r\n", b"GET / HTTP/1.0\r\n\r\n",
                 connect_head(b"x.onion:1"), connect_head(b"echo.test:%d"
                                                          % echo_server.port)):
        exchange(server, data)
    deadline = time.monotonic() + TIMEOUT
    while server.stats()["active"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.stats()["active"] == 0


# =============================================================================
# The command line
# =============================================================================

def test_command_line_http_tunnel_with_workers(echo_server):
    from test_cli import Daemon
    socks_port, http_port = free_port(), free_port()
    daemon = Daemon("--listen", "127.0.0.1:%d" % socks_port,
                    "--http-tunnel", "127.0.0.1:%d" % http_port,
                    "--workers", "2", "--log-destinations", listeners=4)
    try:
        assert daemon.listening[:2] == ["127.0.0.1:%d" % socks_port,
                                        "127.0.0.1:%d" % http_port]
        assert any("HTTP CONNECT listening on 127.0.0.1:%d" % http_port
                   in line for line in daemon.lines)
        for _ in range(4):
            with socket.create_connection(("127.0.0.1", http_port),
                                          timeout=TIMEOUT) as sock:
                sock.sendall(connect_head(b"localhost:%d" % echo_server.port)
                             + b"ping")
                assert recv_exactly(sock, len(OK) + 4) == OK + b"ping"
    finally:
        daemon.process.send_signal(signal.SIGTERM)
    assert daemon.finish() == 0
    assert any("HTTP_CONNECT CONNECT localhost:%d: relayed" % echo_server.port
               in line for line in daemon.lines)


@pytest.mark.parametrize("args, status, message", [
    (["--http-tunnel", "127.0.0.1:x"], 2, "--http-tunnel"),
    (["--inetd", "--http-tunnel", "127.0.0.1:0"], 2,
     "--http-tunnel needs listeners of its own"),
    (["--port", "0", "--http-tunnel", "0.0.0.0:0"], torsocksd.EX_USAGE,
     "refusing to listen on 0.0.0.0:"),
])
def test_command_line_errors(args, status, message):
    result = subprocess.run([sys.executable, SCRIPT] + args,
                            stdin=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, universal_newlines=True,
                            timeout=TIMEOUT)
    assert result.returncode == status, result.stderr
    assert message in result.stderr
