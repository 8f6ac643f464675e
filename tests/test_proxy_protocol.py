"""The PROXY protocol (--proxy-protocol-from): the pure header parser for
versions 1 and 2, then a Server behind a "balancer" on loopback: a test
client that connects from 127.0.0.1 (the trusted source) and writes the
header a balancer would, naming clients from TEST-NET addresses.  The real
HAProxy is in tests/test_haproxy.py.

Only loopback; names go through FakeResolver.
"""

import ipaddress
import logging
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import time

import pytest

import torsocksd
from torsocksd import NEED_MORE, Parsed, ProxyHeader, Rejected
from conftest import (TIMEOUT, FakeResolver, free_port, recv_exactly,
                      recv_until_eof, socks4_request, socks5_connect_request,
                      socks5_greeting, socks5_reply, socks5_request,
                      userpass)

SCRIPT = os.path.join(os.path.dirname(__file__), os.pardir, "torsocksd.py")
SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
ip = ipaddress.ip_address


def v1(source, destination="127.0.0.1", source_port=40000,
       destination_port=9050):
    family = "TCP6" if ":" in source else "TCP4"
    return ("PROXY %s %s %s %d %d\r\n" % (family, source, destination,
                                          source_port, destination_port)
            ).encode("ascii")


def v2(source=None, destination="127.0.0.1", source_port=40000,
       destination_port=9050, command=0x21, family=None, tlvs=b""):
    """A v2 header: PROXY (0x21) over TCP for source, or LOCAL (0x20)."""
    if source is None:
        addresses = b""
        family = 0x00 if family is None else family
    else:
        source, destination = ip(source), ip(destination)
        addresses = source.packed + destination.packed + struct.pack(
            "!HH", source_port, destination_port)
        if family is None:
            family = 0x11 if source.version == 4 else 0x21
    body = addresses + tlvs
    return SIGNATURE + bytes((command, family)) + struct.pack(
        "!H", len(body)) + body


LOCAL = v2(command=0x20)


# =============================================================================
# The parser
# =============================================================================

VALID = [
    (v1("192.0.2.7"), ProxyHeader(1, (ip("192.0.2.7"), 40000),
                                  (ip("127.0.0.1"), 9050))),
    (b"PROXY TCP6 2001:DB8::7 ::1 0 65535\r\n",
     ProxyHeader(1, (ip("2001:db8::7"), 0), (ip("::1"), 65535))),
    (b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff "
     b"ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n",
     ProxyHeader(1, (ip("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"), 65535),
                 (ip("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"), 65535))),
    # HAProxy's v1 for an IPv4 client of a dual-stack (::) frontend.
    (b"PROXY TCP6 ::ffff:192.0.2.7 ::FFFF:127.0.0.1 40000 9050\r\n",
     ProxyHeader(1, (ip("::ffff:192.0.2.7"), 40000),
                 (ip("::ffff:127.0.0.1"), 9050))),
    (b"PROXY UNKNOWN\r\n", ProxyHeader(1, None, None)),
    (b"PROXY UNKNOWN ffff::1 x y z\r\n", ProxyHeader(1, None, None)),
    (v2("192.0.2.7"), ProxyHeader(2, (ip("192.0.2.7"), 40000),
                                  (ip("127.0.0.1"), 9050))),
    (v2("2001:db8::7", "2001:db8::1", 1, 2),
     ProxyHeader(2, (ip("2001:db8::7"), 1), (ip("2001:db8::1"), 2))),
    (v2("::ffff:192.0.2.7", "::1"),
     ProxyHeader(2, (ip("::ffff:192.0.2.7"), 40000), (ip("::1"), 9050))),
    # TLVs after the addresses are skipped.
    (v2("192.0.2.7", tlvs=b"\x04\x00\x03abc\x05\x00\x01z"),
     ProxyHeader(2, (ip("192.0.2.7"), 40000), (ip("127.0.0.1"), 9050))),
    (LOCAL, ProxyHeader(2, None, None)),
    # LOCAL with addresses: they are skipped all the same.
    (v2("192.0.2.7", command=0x20), ProxyHeader(2, None, None)),
    (v2(command=0x21), ProxyHeader(2, None, None)),              # UNSPEC
    (v2(command=0x21, family=0x31, tlvs=bytes(216)),
     ProxyHeader(2, None, None)),                                 # UNIX
    (v2("192.0.2.7", family=0x12), ProxyHeader(2, None, None)),  # UDP
]


@pytest.mark.parametrize("data, header", VALID)
def test_valid_headers_and_every_prefix(data, header):
    assert torsocksd.parse_proxy_header(data + b"\x05\x01\x00") == \
        Parsed(header, len(data))
    for end in range(len(data)):
        assert torsocksd.parse_proxy_header(data[:end]) is NEED_MORE, \
            data[:end]


@pytest.mark.parametrize("data, reason", [
    (b"\x05\x01\x00", "no PROXY protocol header (first bytes \\x05\\x01"
                      "\\x00)"),
    (b"GET / HTTP/1.0\r\n", "no PROXY protocol header (first bytes GET / "
                            "HTTP/1)"),
    (b"PROXY\r\n", "no PROXY protocol header (first bytes PROXY\\r\\n)"),
    (b"proxy TCP4", "no PROXY protocol header (first bytes proxy TCP4)"),
    (b"\r\n\r\n\x01", "no PROXY protocol header (first bytes "
                      "\\r\\n\\r\\n\\x01)"),
    (b"PROXY TCP4 1.2.3.4\n", "bad PROXY header: a CR or LF alone in a v1 "
                              "line"),
    (b"PROXY TCP4 1.2.3.4\rx", "bad PROXY header: a CR or LF alone in a v1 "
                               "line"),
    (b"PROXY " + b"x" * 101, "bad PROXY header: no CRLF in the first 107 "
                             "bytes"),
    (SIGNATURE + b"\x11", "bad PROXY header: v2 version and command 0x11"),
    (SIGNATURE + b"\x22", "bad PROXY header: v2 version and command 0x22"),
    (SIGNATURE + b"\x21\x41", "bad PROXY header: v2 family and protocol "
                              "0x41"),
    (SIGNATURE + b"\x21\x13", "bad PROXY header: v2 family and protocol "
                              "0x13"),
    (SIGNATURE + b"\x21\x11\x01\xf1", "bad PROXY header: v2 header of 513 "
                                      "bytes, more than 512"),
    (SIGNATURE + b"\x21\x11\x00\x0b" + bytes(11),
     "bad PROXY header: v2 addresses of 11 bytes for family 1"),
    (SIGNATURE + b"\x21\x21\x00\x0c" + bytes(12),
     "bad PROXY header: v2 addresses of 12 bytes for family 2"),
])
def test_bad_headers_are_rejected_as_soon_as_they_show(data, reason):
    assert torsocksd.parse_proxy_header(data) == Rejected(b"", reason)


@pytest.mark.parametrize("line", [
    "PROXY TCP4 192.0.2.07 127.0.0.1 1 2",      # leading zero
    "PROXY TCP4 192.0.2.256 127.0.0.1 1 2",
    "PROXY TCP4 192.0.2 127.0.0.1 1 2",
    "PROXY TCP4 ::1 127.0.0.1 1 2",             # family mismatch
    "PROXY TCP6 192.0.2.7 ::1 1 2",
    "PROXY TCP6 ::1:192.0.2.7 ::1 1 2",         # a dotted tail only as
    "PROXY TCP6 ::ffff:192.0.2.07 ::1 1 2",     # ::ffff:a.b.c.d, HAProxy's
    "PROXY TCP6 1::ffff:192.0.2.7 ::1 1 2",
    "PROXY TCP6 ::ffff:192.0.2 ::1 1 2",
    "PROXY TCP6 fe80::1%lo ::1 1 2",
    "PROXY TCP6 1:2:3:4:5:6:7:8:9 ::1 1 2",
    "PROXY TCP4 192.0.2.7 127.0.0.1 01 2",      # leading zero
    "PROXY TCP4 192.0.2.7 127.0.0.1 65536 2",
    "PROXY TCP4 192.0.2.7 127.0.0.1 -1 2",
    "PROXY TCP4 192.0.2.7 127.0.0.1 1",
    "PROXY TCP4 192.0.2.7 127.0.0.1 1 2 3",
    "PROXY TCP4  192.0.2.7 127.0.0.1 1 2",      # two spaces
    "PROXY TCP4 192.0.2.7 127.0.0.1 1 2 ",
    "PROXY UDP4 192.0.2.7 127.0.0.1 1 2",
    "PROXY  UNKNOWN",
    "PROXY ",
])
def test_v1_lines_that_are_not_exactly_the_protocol(line):
    result = torsocksd.parse_proxy_header(line.encode() + b"\r\n")
    assert isinstance(result, Rejected) and result.reply == b"", result
    assert result.reason.startswith("bad PROXY header: v1 line ")


def test_random_bytes_never_break_the_parser():
    seed = random.randrange(1 << 32)
    rng = random.Random(seed)
    starts = [b"", b"PROXY ", b"PROXY TCP4 ", SIGNATURE, SIGNATURE + b"\x21",
              SIGNATURE + b"\x21\x11\x00"]
    alphabet = b"PROXYTCP46UNK 0123456789.:abcdef\r\n\x00\x11\x21\xff"
    for _ in range(5000):
        data = rng.choice(starts) + bytes(
            rng.choice(alphabet) for _ in range(rng.randrange(40)))
        result = torsocksd.parse_proxy_header(data)
        assert result is NEED_MORE or isinstance(result, (Parsed, Rejected)),\
            "seed %d: %r" % (seed, data)
        if isinstance(result, Parsed):
            assert 0 < result.used <= len(data), seed
        elif result is NEED_MORE:
            assert len(data) < torsocksd.MAX_PROXY_HEADER_BYTES, seed


def test_a_limit_other_than_the_default():
    header = v2("192.0.2.7", tlvs=b"\x04\x00\x64" + bytes(100))
    assert isinstance(torsocksd.parse_proxy_header(header, len(header)),
                      Parsed)
    assert torsocksd.parse_proxy_header(header, len(header) - 1) == \
        Rejected(b"", "bad PROXY header: v2 header of %d bytes, more than %d"
                 % (len(header), len(header) - 1))


# =============================================================================
# A Server behind a balancer at 127.0.0.1
# =============================================================================

ALLOWED, OTHER = "192.0.2.7", "192.0.2.8"


@pytest.fixture
def balanced(make_server):
    """make(**options): a Server that takes PROXY headers from 127.0.0.1 and
    lets in only 192.0.2.7 (and whatever the balancer's own connections
    are)."""
    def make(**options):
        options.setdefault("proxy_protocol_from", ["127.0.0.1/32"])
        options.setdefault("client_policy", [(True, ALLOWED + "/32")])
        options.setdefault("resolver", FakeResolver(
            {"echo.test": ["127.0.0.1"]}))
        return make_server(**options)
    return make


def through_balancer(server, header, *messages, address=None):
    """A client socket at the server with header and messages sent."""
    sock = socket.create_connection(address or server.address,
                                    timeout=TIMEOUT)
    sock.sendall(header + b"".join(messages))
    return sock


def socks5_tunnel_reply(sock):
    """The method reply and the CONNECT reply of an IPv4 client."""
    return recv_exactly(sock, 2), recv_exactly(sock, 10)


@pytest.mark.parametrize("header", [v1(ALLOWED), v2(ALLOWED)],
                         ids=["v1", "v2"])
def test_the_header_names_the_client_for_allow(balanced, echo_server, header):
    server = balanced()
    with through_balancer(server, header, *socks5_connect_request(
            "echo.test", echo_server.port)) as sock:
        # The client is remote (192.0.2.7): echo.test is 127.0.0.1, which
        # the guard keeps from remote clients.
        assert socks5_tunnel_reply(sock) == (b"\x05\x00", socks5_reply(2))
    other = header.replace(ALLOWED.encode(), OTHER.encode()) \
        if header.startswith(b"PROXY") else v2(OTHER)
    with through_balancer(server, other, socks5_greeting(0)) as sock:
        assert recv_until_eof(sock) == b""
    assert echo_server.accepted == []


def test_a_named_remote_client_needs_access_control(balanced, echo_server,
                                                   caplog):
    """Without --allow/--deny or credentials, the clients a balancer names
    from other hosts are refused, as inetd's are; its own connections and
    clients on its host are still served."""
    caplog.set_level(logging.INFO, logger="torsocksd")
    server = balanced(client_policy=None)
    with through_balancer(server, v2(ALLOWED), socks5_greeting(0)) as sock:
        assert recv_until_eof(sock) == b""
    with through_balancer(server, v1("127.0.0.1"), *socks5_connect_request(
            "echo.test", echo_server.port)) as sock:
        assert socks5_tunnel_reply(sock) == (b"\x05\x00", socks5_reply(0))
    with through_balancer(server, LOCAL, socks5_greeting(0)) as sock:
        assert recv_exactly(sock, 2) == b"\x05\x00"
    deadline = time.monotonic() + TIMEOUT
    while "needs --allow" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.01)
    assert "a client from another host needs --allow/--deny or " \
        "--credentials (or --open-proxy)" in caplog.text


def test_udp_associate_hears_the_client_the_header_names(balanced):
    """The datagrams of a client behind a balancer come from the client
    itself: the association takes them from the named host, not from the
    balancer's."""
    server = balanced(client_policy=[(True, "127.0.0.0/8")], enable_udp=True)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as destination, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as balancer:
        destination.bind(("127.0.0.1", 0))
        destination.settimeout(TIMEOUT)
        client.bind(("127.0.0.5", 0))
        balancer.bind(("127.0.0.1", 0))
        datagram = b"\x00\x00\x00\x01\x7f\x00\x00\x01" + \
            destination.getsockname()[1].to_bytes(2, "big")
        with through_balancer(server, v1("127.0.0.5"), socks5_greeting(0),
                              socks5_request(3, "0.0.0.0", 0)) as control:
            assert recv_exactly(control, 2) == b"\x05\x00"
            reply = recv_exactly(control, 10)
            assert reply[:4] == b"\x05\x00\x00\x01"
            relay = (socket.inet_ntoa(reply[4:8]),
                     int.from_bytes(reply[8:10], "big"))
            balancer.sendto(datagram + b"not the client", relay)
            client.sendto(datagram + b"the client", relay)
            assert destination.recvfrom(100)[0] == b"the client"
            destination.settimeout(0.3)
            with pytest.raises(socket.timeout):
                destination.recvfrom(100)


def test_a_mapped_v1_client_is_its_ipv4_address(balanced, echo_server):
    """HAProxy on a dual-stack frontend names an IPv4 client ::ffff:a.b.c.d
    in v1: --allow judges a.b.c.d (its replies are an IPv6 client's, as
    for one that reaches a dual-stack listener directly)."""
    server = balanced()
    mapped = v1("::ffff:" + ALLOWED, "::ffff:127.0.0.1")
    assert mapped.startswith(b"PROXY TCP6 ")
    with through_balancer(server, mapped, *socks5_connect_request(
            "echo.test", echo_server.port)) as sock:
        assert recv_exactly(sock, 2) == b"\x05\x00"
        assert recv_exactly(sock, 22) == socks5_reply(2, ipv6_client=True)
    other = v1("::ffff:" + OTHER, "::ffff:127.0.0.1")
    with through_balancer(server, other, socks5_greeting(0)) as sock:
        assert recv_until_eof(sock) == b""
    assert echo_server.accepted == []


def test_a_client_on_the_balancers_host_is_local(balanced, echo_server):
    """The balancer is on this host and says its client is on its host:
    the client is local and may reach loopback."""
    server = balanced(client_policy=[(True, "127.0.0.0/8")])
    with through_balancer(server, v2("127.0.0.9"), *socks5_connect_request(
            "echo.test", echo_server.port), b"ping") as sock:
        assert socks5_tunnel_reply(sock)[1] == socks5_reply(0)
        assert recv_exactly(sock, 4) == b"ping"


def test_a_remote_balancers_loopback_client_is_not_local():
    """Decisions only: a header naming 127.0.0.1 from a balancer on another
    host is that host's loopback, not ours."""
    server = torsocksd.Server(listen=[], proxy_protocol_from=["192.0.2.0/24"],
                              client_policy=[(True, "127.0.0.0/8")])

    class Connection:
        balancer = ip("192.0.2.1")
        peer = ("192.0.2.1", 5555)
        balancer_peer = None
        balancers_own = False
        client_key = None
        remote_address = None
        client_is_local = True
        client_label = torsocksd.Connection.client_label

    connection = Connection()
    assert server._admit_proxied(connection, ProxyHeader(
        2, (ip("127.0.0.1"), 4444), (ip("192.0.2.2"), 9050))) is None
    assert (connection.client_is_local, connection.remote_address,
            connection.client_label()) == (
        False, ip("127.0.0.1"), "127.0.0.1:4444 via 192.0.2.1:5555")
    assert server._per_client[ip("127.0.0.1")] == 1


@pytest.mark.parametrize("header", [LOCAL, b"PROXY UNKNOWN\r\n",
                                    v2(command=0x21),
                                    v2("192.0.2.7", family=0x12)],
                         ids=["v2-local", "v1-unknown", "v2-unspec",
                              "v2-udp"])
def test_the_balancers_own_connection_is_never_refused(balanced, echo_server,
                                                       header):
    """Health checks: LOCAL and the like are the balancer's (127.0.0.1, a
    local client here), and --allow does not apply to it."""
    server = balanced()
    with through_balancer(server, header, *socks5_connect_request(
            "echo.test", echo_server.port), b"ping") as sock:
        assert socks5_tunnel_reply(sock) == (b"\x05\x00", socks5_reply(0))
        assert recv_exactly(sock, 4) == b"ping"


def test_max_per_client_counts_the_named_client(balanced):
    server = balanced(max_per_client=1)
    with through_balancer(server, v1(ALLOWED), socks5_greeting(0)) as first:
        assert recv_exactly(first, 2) == b"\x05\x00"
        with through_balancer(server, v1(ALLOWED), socks5_greeting(0)) as s:
            assert recv_until_eof(s) == b""
        # Another client behind the same balancer is not held back.
        with through_balancer(server, LOCAL, socks5_greeting(0)) as other:
            assert recv_exactly(other, 2) == b"\x05\x00"
    deadline = time.monotonic() + TIMEOUT
    while server.stats()["active"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert dict(server._per_client) == {}


@pytest.mark.parametrize("data", [
    socks5_greeting(0),                         # no header at all
    b"PROXY TCP4 192.0.2.07 127.0.0.1 1 2\r\n",  # a malformed one
    SIGNATURE + b"\x21\x11\xff\xff",            # an oversized one
])
def test_a_trusted_source_without_a_good_header_is_closed(balanced, data,
                                                          caplog):
    server = balanced()
    with caplog.at_level(logging.INFO, logger="torsocksd"):
        with through_balancer(server, data) as sock:
            assert recv_until_eof(sock) == b""
        server.stop()
    lines = [record.getMessage() for record in caplog.records
             if "from a --proxy-protocol-from source" in record.getMessage()]
    assert len(lines) == 1, lines
    assert "refused: from a --proxy-protocol-from source: " in lines[0]


def test_the_header_arrives_within_the_handshake_timeout(balanced, caplog):
    server = balanced(handshake_timeout=0.3)
    with caplog.at_level(logging.INFO, logger="torsocksd"):
        with through_balancer(server, v1(ALLOWED)[:20]) as sock:
            assert recv_until_eof(sock) == b""
        server.stop()
    assert any("no whole PROXY header within the handshake timeout"
               in record.getMessage() for record in caplog.records)


def test_the_header_and_the_handshake_share_one_deadline(balanced):
    """The deadline set at accept runs on after the header: a handshake
    that stalls after it gets the SOCKS5 timeout reply at that deadline."""
    server = balanced(handshake_timeout=0.5)
    with through_balancer(server, LOCAL, socks5_greeting(0)) as sock:
        assert recv_exactly(sock, 2) == b"\x05\x00"
        assert recv_until_eof(sock) == socks5_reply(1)


def test_the_header_counts_toward_the_handshake_byte_limit(balanced):
    """1024 bytes for the header and the handshake together: with a
    500-byte header, a handshake of 3 + 513 + 262 bytes is too long (it
    would fit without the header)."""
    header = v2(tlvs=b"\x04\x01\xe4" + bytes(484), command=0x20)
    assert len(header) == 503
    name = "n" * 251 + ".tst"
    greeting = socks5_greeting(2)
    login = userpass(b"u" * 255, b"p" * 255)
    request = socks5_request(1, name, 80)
    server = balanced()
    with through_balancer(server, header, greeting, login, request) as sock:
        assert recv_until_eof(sock) == b"\x05\x02\x01\x00" + socks5_reply(1)


def test_the_header_counts_toward_the_http_head_limit(balanced, caplog):
    """8191 bytes for the header and the HTTP head together: past them
    the client gets 400, as without a header, never a silent close."""
    caplog.set_level(logging.INFO, logger="torsocksd")
    header = v1(ALLOWED)
    server = balanced(listen=[], http_tunnel=[("127.0.0.1", 0)])
    head = b"CONNECT echo.test:80 HTTP/1.1\r\nX: " + b"x" * (
        8191 - len(header))
    with through_balancer(server, header, head) as sock:
        assert recv_until_eof(sock).startswith(
            b"HTTP/1.0 400 Bad Request\r\n")
    deadline = time.monotonic() + TIMEOUT
    while "head longer" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.01)
    assert "request head longer than 8191 bytes" in caplog.text


def test_a_handshake_that_ends_right_at_the_limit_is_refused(balanced,
                                                            caplog):
    """A 512-byte header, a greeting and an RFC 1929 message make exactly
    1024 bytes with no request yet: the generic error, not a silent close
    taken for the client's."""
    caplog.set_level(logging.INFO, logger="torsocksd")
    header = v2(ALLOWED, tlvs=b"\x04\x01\xe1" + bytes(481))
    login = userpass(b"u" * 253, b"p" * 253)
    assert len(header) + 3 + len(login) == 1024
    server = balanced()
    with through_balancer(server, header, socks5_greeting(0), login) as sock:
        assert recv_exactly(sock, 4) == b"\x05\x00\x01\x00"
        assert recv_until_eof(sock) == socks5_reply(1)
    deadline = time.monotonic() + TIMEOUT
    while "handshake longer" not in caplog.text \
            and time.monotonic() < deadline:
        time.sleep(0.01)
    assert "handshake longer than 1024 bytes" in caplog.text


def test_a_header_from_an_untrusted_source_is_not_honoured(make_server):
    """From a source not in --proxy-protocol-from, "PROXY ..." is an HTTP
    request to the SOCKS port ("P"), and a v2 header bad bytes."""
    server = make_server(proxy_protocol_from=["192.0.2.0/24"])
    with through_balancer(server, v1("127.0.0.1"), socks5_greeting(0)) as s:
        assert recv_until_eof(s).startswith(b"HTTP/1.0 501 ")
    with through_balancer(server, v2("127.0.0.1"), socks5_greeting(0)) as s:
        assert recv_until_eof(s) == b""


def test_header_split_across_reads_and_sent_with_the_request(balanced,
                                                             echo_server):
    server = balanced(client_policy=[(True, "127.0.0.0/8")])
    header = v1("127.0.0.5")
    with socket.create_connection(server.address, timeout=TIMEOUT) as sock:
        for index in range(len(header)):
            sock.sendall(header[index:index + 1])
            time.sleep(0.002)
        sock.sendall(socks4_request(1, "127.0.0.1", echo_server.port)
                     + b"ping")
        assert recv_exactly(sock, 12) == b"\x00\x5a" + bytes(6) + b"ping"


def test_an_ipv6_client_gets_the_22_byte_reply(balanced, echo_server):
    server = balanced(client_policy=[(True, "2001:db8::/32")])
    with through_balancer(server, v2("2001:db8::7", "2001:db8::1"),
                          *socks5_connect_request(
                              "127.0.0.1", echo_server.port)) as sock:
        assert recv_exactly(sock, 2) == b"\x05\x00"
        # Its family decides the reply's form (the guard refuses it
        # loopback: it is remote).
        assert recv_until_eof(sock) == socks5_reply(2, ipv6_client=True)


def test_the_log_line_names_the_client_and_the_balancer(balanced,
                                                        echo_server, caplog):
    """The client via the balancer; the balancer's own connections that
    ask for nothing (its health checks) at debug level only."""
    server = balanced(client_policy=[(True, "127.0.0.0/8")])
    with caplog.at_level(logging.DEBUG, logger="torsocksd"):
        with through_balancer(server, v1("127.0.0.5", source_port=4321),
                              *socks5_connect_request(
                                  "echo.test", echo_server.port)) as sock:
            socks5_tunnel_reply(sock)
        with through_balancer(server, LOCAL, socks5_greeting(0)) as sock:
            recv_exactly(sock, 2)
        with through_balancer(server, LOCAL, *socks5_connect_request(
                "echo.test", echo_server.port)) as sock:
            socks5_tunnel_reply(sock)
        server.stop()
    lines = {record.getMessage(): record.levelno for record in caplog.records
             if record.getMessage().startswith("conn ")}
    relayed = [line for line in lines if "from 127.0.0.5:4321 via "
               "127.0.0.1:" in line and ": relayed" in line]
    assert len(relayed) == 1 and lines[relayed[0]] == logging.INFO
    own = sorted((level, line.split(": ", 2)[1]) for line, level
                 in lines.items() if "(the balancer's own)" in line)
    assert own == [(logging.DEBUG, "SOCKS5"),
                   (logging.INFO, "SOCKS5 CONNECT [scrubbed]:%d"
                    % echo_server.port)], own


def test_the_http_tunnel_takes_a_header_too(balanced, echo_server):
    server = balanced(listen=[], http_tunnel=[("127.0.0.1", 0)])
    with through_balancer(server, v2(ALLOWED), b"CONNECT echo.test:%d "
                          b"HTTP/1.1\r\n\r\n" % echo_server.port) as sock:
        assert recv_until_eof(sock) == (
            b"HTTP/1.0 403 Forbidden (exit policy)\r\nTor-Capabilities: "
            b"\r\nTor-Request-Failed: end/EXITPOLICY\r\n\r\n")
    with through_balancer(server, LOCAL, b"CONNECT echo.test:%d HTTP/1.1"
                          b"\r\n\r\nping" % echo_server.port) as sock:
        expected = b"HTTP/1.0 200 OK\r\nTor-Capabilities: \r\n\r\nping"
        assert recv_exactly(sock, len(expected)) == expected


def test_settings_take_cidrs():
    settings = torsocksd.Settings(proxy_protocol_from=["10.0.0.0/8",
                                                       "192.0.2.1"])
    assert settings.proxy_protocol_from == (
        ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network(
            "192.0.2.1/32"))


# =============================================================================
# The command line, workers and socket activation
# =============================================================================

def test_command_line_with_workers(echo_server):
    from test_cli import Daemon
    port = free_port()
    daemon = Daemon("--port", str(port), "--workers", "2",
                    "--proxy-protocol-from", "127.0.0.1/32",
                    "--allow", "127.0.0.0/8", listeners=3)
    try:
        for _ in range(4):
            with socket.create_connection(("127.0.0.1", port),
                                          timeout=TIMEOUT) as sock:
                sock.sendall(v1("127.0.0.3", source_port=5555)
                             + b"".join(socks5_connect_request(
                                 "127.0.0.1", echo_server.port)) + b"ping")
                assert recv_exactly(sock, 16) == \
                    b"\x05\x00" + socks5_reply(0) + b"ping"
        with socket.create_connection(("127.0.0.1", port),
                                      timeout=TIMEOUT) as sock:
            sock.sendall(socks5_greeting(0))
            assert recv_until_eof(sock) == b""
    finally:
        daemon.process.send_signal(signal.SIGTERM)
    assert daemon.finish() == 0
    text = "".join(daemon.lines)
    assert text.count("from 127.0.0.3:5555 via 127.0.0.1:") == 4
    assert "no PROXY protocol header" in text


def test_command_line_socket_activation():
    from test_deploy import Child, activated
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    try:
        daemon = Child(activated([sys.executable, SCRIPT,
                                  "--proxy-protocol-from", "127.0.0.1"], 1),
                       socks=[listener])
    finally:
        listener.close()
    try:
        address = daemon.listening()[0]
        host, port = address.rsplit(":", 1)
        with socket.create_connection((host, int(port)),
                                      timeout=TIMEOUT) as sock:
            sock.sendall(LOCAL + socks5_greeting(0))
            assert recv_exactly(sock, 2) == b"\x05\x00"
        daemon.process.send_signal(signal.SIGTERM)
        assert daemon.finish() == 0
    finally:
        daemon.stop()


@pytest.mark.parametrize("value", ["nonsense", "10.0.0.0/33"])
def test_command_line_bad_cidr(value):
    result = subprocess.run([sys.executable, SCRIPT, "--proxy-protocol-from",
                             value], stderr=subprocess.PIPE,
                            universal_newlines=True, timeout=TIMEOUT)
    assert result.returncode == 2
    assert "--proxy-protocol-from" in result.stderr
