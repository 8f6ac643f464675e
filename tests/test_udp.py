"""UDP ASSOCIATE (RFC 1928 §7), turned on with enable_udp: the datagram
header's parser and builder byte for byte, then associations at the wire
with real UDP peers on loopback, PySocks as a client, and, in a network
namespace, Dante's socksify and a client from another host
(peers/udp_bind_netns.py).

Only loopback addresses; names go through FakeResolver.
"""

import collections
import ipaddress
import logging
import random
import socket
import threading
import time

import pytest

import torsocksd
from torsocksd import (NEED_MORE, AddressType, Parsed, Rejected,
                       parse_udp_datagram, udp_datagram_header)
from conftest import (TIMEOUT, FakeResolver, closing_factory, ipv6_loopback,
                      recv_exactly, recv_socks5_reply, reply_address,
                      require_module, require_network_namespace,
                      require_program, run_in_namespace, socks5_greeting,
                      socks4_request, socks5_reply, socks5_request,
                      socks5_target)

h = bytes.fromhex
BIND = 2
UDP_ASSOCIATE = 3

needs_ipv6 = pytest.mark.skipif(not ipv6_loopback(),
                                reason="no IPv6 loopback (::1) here")


# =============================================================================
# The datagram header, pure
# =============================================================================

def header(host, port):
    """RSV FRAG 00 and socks5_target(host, port)."""
    return b"\0\0\0" + socks5_target(host, port)


VALID = [
    (h("000000 01 c0000201 0035"), AddressType.IPV4, "192.0.2.1", 53),
    (h("000000 04 20010db8000000000000000000000001 1f90"), AddressType.IPV6,
     "2001:db8::1", 8080),
    (h("000000 04 00000000000000000000ffff01020304 0001"), AddressType.IPV6,
     "::ffff:1.2.3.4", 1),
    (h("000000 03 0b") + b"example.com" + h("0050"), AddressType.DOMAIN,
     "example.com", 80),
    # An IP literal written as a name is that address: one destination.
    (h("000000 03 09") + b"127.0.0.1" + h("0007"), AddressType.IPV4,
     "127.0.0.1", 7),
    (h("000000 03 05") + b"[::1]" + h("0007"), AddressType.IPV6, "::1", 7),
    (h("000000 01 7f000001 0000"), AddressType.IPV4, "127.0.0.1", 0),
]


@pytest.mark.parametrize("data, address_type, host, port", VALID)
def test_headers_parse_and_the_data_follows(data, address_type, host, port):
    for payload in (b"", b"payload \0 bytes"):
        result = parse_udp_datagram(data + payload)
        assert result == Parsed(torsocksd.UdpDatagram(address_type, host,
                                                      port), len(data))
        assert (data + payload)[result.used:] == payload


@pytest.mark.parametrize("data", [case[0] for case in VALID])
def test_every_prefix_of_a_header_needs_more(data):
    for end in range(len(data)):
        assert parse_udp_datagram(data[:end]) is NEED_MORE, end
        assert parse_udp_datagram(memoryview(data)[:end]) is NEED_MORE


@pytest.mark.parametrize("data, reason", [
    (h("000001 01 c0000201 0035") + b"x", torsocksd.UDP_FRAGMENT),
    (h("0000ff 01 c0000201 0035"), torsocksd.UDP_FRAGMENT),
    (h("0000 80"), torsocksd.UDP_FRAGMENT),
    (h("01"), "reserved bytes are not zero"),
    (h("0001 00 01 c0000201 0035"), "reserved bytes are not zero"),
    (h("000000 00 c0000201 0035"), "unknown address type 0x00"),
    (h("000000 02"), "unknown address type 0x02"),
    (h("000000 05"), "unknown address type 0x05"),
    (h("000000 03 00 0035"), "empty hostname"),
    (h("000000 03 03") + b"a b" + h("0035"),
     "hostname has a byte outside printable ASCII"),
    (h("000000 03 03") + b"a\0b" + h("0035"),
     "hostname has a byte outside printable ASCII"),
    (h("000000 03 04") + b"a..b" + h("0035"), "not a valid hostname"),
    (h("000000 03 09") + b"[1.2.3.4]" + h("0035"),
     "brackets around something that is not an IPv6 address"),
])
def test_bad_headers_are_rejected_without_a_reply(data, reason):
    assert parse_udp_datagram(data) == Rejected(b"", reason)


def test_the_reply_header_names_the_destination():
    assert udp_datagram_header(ipaddress.ip_address("192.0.2.1"), 53) \
        == h("000000 01 c0000201 0035")
    assert udp_datagram_header(ipaddress.ip_address("2001:db8::1"), 8080) \
        == h("000000 04 20010db8000000000000000000000001 1f90")


def test_random_bytes_and_random_headers():
    seed = random.randrange(1 << 32)
    print("seed", seed)
    rng = random.Random(seed)
    for _ in range(3000):
        data = bytes(rng.randrange(256) for _ in range(rng.randrange(40)))
        if rng.random() < 0.5:
            data = b"\0\0\0" + bytes((rng.choice((1, 3, 4)),)) + data
        result = parse_udp_datagram(data)
        assert result is NEED_MORE or isinstance(result, (Parsed, Rejected))
        if isinstance(result, Parsed):
            assert result.used <= len(data)
        elif isinstance(result, Rejected):
            assert result.reply == b""
    for _ in range(1000):
        version = rng.choice((4, 6))
        address = ipaddress.ip_address(rng.getrandbits(32 if version == 4
                                                       else 128))
        if version == 6 and address.ipv4_mapped:
            continue
        port = rng.randrange(65536)
        payload = bytes(rng.randrange(256) for _ in range(rng.randrange(9)))
        result = parse_udp_datagram(udp_datagram_header(address, port)
                                    + payload)
        assert result.message.host == str(address), seed
        assert result.message.port == port
        assert (udp_datagram_header(address, port) + payload)[
            result.used:] == payload


# =============================================================================
# Associations at the wire
# =============================================================================

class UdpEcho:
    """A UDP service on host that sends each datagram back (or, with a
    reply function, reply(data)) and records (data, source) of each."""

    def __init__(self, host="127.0.0.1", reply=None):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.address = self.sock.getsockname()[:2]
        self.port = self.address[1]
        self.reply = reply or (lambda data: data)
        self.received = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            try:
                data, source = self.sock.recvfrom(65535)
            except OSError:
                return
            if source is None:      # shut down
                return
            self.received.append((data, source))
            try:
                self.sock.sendto(self.reply(data), source)
            except OSError:
                return

    def close(self):
        # shutdown() wakes the thread blocked in recvfrom.
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.thread.join(TIMEOUT)
        self.sock.close()


@pytest.fixture
def udp_peers():
    """udp_peers(host="127.0.0.1", reply=None) -> a UdpEcho."""
    yield from closing_factory(UdpEcho)


@pytest.fixture
def udp_echo(udp_peers):
    return udp_peers()


class Association:
    """A UDP ASSOCIATE made at the wire: the control connection, the reply,
    and a client UDP socket (from client_host) to talk through it."""

    def __init__(self, proxy, host="0.0.0.0", port=0, client_host=None):
        family = socket.AF_INET6 if ":" in proxy[0] else socket.AF_INET
        client_host = client_host or proxy[0]
        self.control = socket.create_connection(
            proxy, timeout=TIMEOUT, source_address=(client_host, 0))
        self.udp = socket.socket(family, socket.SOCK_DGRAM)
        self.udp.settimeout(TIMEOUT)
        self.udp.bind((client_host, 0))
        self.control.sendall(socks5_greeting(0))
        assert recv_exactly(self.control, 2) == b"\x05\x00"
        self.control.sendall(socks5_request(UDP_ASSOCIATE, host, port))
        self.reply = recv_socks5_reply(self.control)
        self.relay = reply_address(self.reply) if self.reply[1] == 0 \
            else None

    def send(self, host, port, data, frag=0):
        self.udp.sendto(bytes((0, 0, frag)) + socks5_target(host, port)
                        + data, self.relay)

    def receive(self, timeout=TIMEOUT):
        self.udp.settimeout(timeout)
        data, source = self.udp.recvfrom(65535)
        assert source[:2] == self.relay
        return data

    def nothing_more(self, wait=0.3):
        """No datagram arrives within wait seconds."""
        self.udp.settimeout(wait)
        try:
            data = self.udp.recv(65535)
        except socket.timeout:
            return True
        raise AssertionError("unexpected datagram %r" % data)

    def close(self):
        self.control.close()
        self.udp.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


def wait_for(condition, what):
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for " + what
        time.sleep(0.01)


def dropped(server, reason):
    return server.stats()["udp"].get("dropped: " + reason, 0)


@pytest.fixture
def udp_server(make_server):
    return make_server(enable_udp=True)


# -- both flags off, and only one on ----------------------------------------------

@pytest.mark.parametrize("command, target, options", [
    (BIND, ("127.0.0.1", 80), {}),
    (BIND, ("127.0.0.1", 80), {"enable_udp": True}),
    (UDP_ASSOCIATE, ("0.0.0.0", 0), {}),
    (UDP_ASSOCIATE, ("0.0.0.0", 0), {"enable_bind": True}),
], ids=["bind-default", "bind-udp-only", "udp-default", "udp-bind-only"])
def test_a_disabled_command_keeps_todays_bytes(make_server, command, target,
                                               options):
    """BIND and UDP ASSOCIATE are each refused (07; SOCKS4: 5b) until their
    own flag turns them on."""
    server = make_server(**options)
    with socket.create_connection(server.address, timeout=TIMEOUT) as client:
        client.sendall(socks5_greeting(0) + socks5_request(command, *target))
        assert recv_exactly(client, 12) == h("0500") + socks5_reply(7)
        assert client.recv(1) == b""
    if command == BIND:         # SOCKS4 has no UDP
        with socket.create_connection(server.address,
                                      timeout=TIMEOUT) as client:
            client.sendall(socks4_request(BIND, *target))
            assert recv_exactly(client, 8) == h("005b 0000 00000000")
            assert client.recv(1) == b""
    with socket.create_connection(server.address, timeout=TIMEOUT) as client:
        # The command comes before the address type (09: none), whatever is
        # enabled.
        client.sendall(socks5_greeting(0) + bytes((5, command, 0, 9)))
        assert recv_exactly(client, 12) == h("0500") + socks5_reply(7)
    assert server.stats()["udp_associations"] == 0


# -- the reply, and datagrams both ways ---------------------------------------------

def test_reply_names_a_udp_socket_where_the_client_reached_us(make_server,
                                                               udp_echo):
    server = make_server(enable_udp=True, listen=[("127.0.0.2", 0)])
    with Association(server.address, client_host="127.0.0.2") as client:
        assert client.reply[:8] == h("05000001 7f000002")
        assert client.relay[1] != 0
        client.send("127.0.0.1", udp_echo.port, b"ping")
        assert client.receive() == header("127.0.0.1", udp_echo.port) \
            + b"ping"
    assert udp_echo.received[0][0] == b"ping"


@needs_ipv6
def test_dual_stack_clients_and_destinations(make_server, udp_peers):
    server = make_server(enable_udp=True,
                         listen=[("::1", 0), ("127.0.0.1", 0)])
    echo4, echo6 = udp_peers("127.0.0.1"), udp_peers("::1")
    with Association(tuple(server.addresses[0][:2])) as client:
        assert client.reply[:20] == h("05000004") + bytes(15) + h("01")
        for echo in (echo4, echo6):
            client.send(echo.address[0], echo.port, b"from v6")
            assert client.receive() == header(echo.address[0], echo.port) \
                + b"from v6"
    with Association(tuple(server.addresses[1][:2])) as client:
        assert client.reply[:8] == h("05000001 7f000001")
        client.send("::1", echo6.port, b"from v4")
        assert client.receive() == header("::1", echo6.port) + b"from v4"
        # An IPv4-mapped destination is the IPv4 address, answered as such.
        client.send("::ffff:127.0.0.1", echo4.port, b"mapped")
        assert client.receive() == header("127.0.0.1", echo4.port) \
            + b"mapped"


def test_names_are_looked_up_once_for_a_stream_of_datagrams(make_server,
                                                            udp_echo):
    resolver = FakeResolver({"echo.test": ["127.0.0.1"]})
    server = make_server(enable_udp=True, resolver=resolver)
    with Association(server.address) as client:
        for number in range(5):
            client.send("echo.test", udp_echo.port, b"%d" % number)
        replies = [client.receive() for _ in range(5)]
    # The header names the address that answered; the order is kept, also
    # for the datagrams that waited for the lookup.
    assert replies == [header("127.0.0.1", udp_echo.port) + b"%d" % number
                       for number in range(5)]
    assert resolver.queries == ["echo.test"]


def test_names_that_fail_or_are_special_are_dropped(make_server, udp_echo):
    resolver = FakeResolver({"echo.test": ["127.0.0.1"]})
    server = make_server(enable_udp=True, resolver=resolver)
    with Association(server.address) as client:
        for name in ("nx.test", "nx.test", "hidden.onion", "a.exit"):
            client.send(name, udp_echo.port, b"lost")
        client.send("echo.test", udp_echo.port, b"kept")
        assert client.receive() == header("127.0.0.1", udp_echo.port) \
            + b"kept"
        assert client.nothing_more()
        wait_for(lambda: dropped(server, "refused") == 2, "two refusals")
        assert dropped(server, "name not found") == 2
    assert resolver.queries == ["nx.test", "echo.test"]
    assert [data for data, _ in udp_echo.received] == [b"kept"]


@pytest.mark.parametrize("name", ["0", "x.onion", "foo.exit"])
def test_a_name_as_the_clients_address_is_not_looked_up(make_server,
                                                        udp_echo, name):
    """PySocks asks UDP ASSOCIATE for "0" (ATYP 3) and its own port; any
    name there, .onion and .exit too, only says "not known yet"."""
    resolver = FakeResolver()
    server = make_server(enable_udp=True, resolver=resolver)
    with Association(server.address, host=name) as client:
        assert client.reply[:2] == h("0500")
        client.send("127.0.0.1", udp_echo.port, b"ok")
        assert client.receive().endswith(b"ok")
    assert resolver.queries == []


# -- what is dropped ---------------------------------------------------------------

def test_fragments_are_dropped(udp_server, udp_echo):
    with Association(udp_server.address) as client:
        client.send("127.0.0.1", udp_echo.port, b"fragment", frag=1)
        client.send("127.0.0.1", udp_echo.port, b"fragment", frag=0x81)
        client.send("127.0.0.1", udp_echo.port, b"whole")
        assert client.receive() == header("127.0.0.1", udp_echo.port) \
            + b"whole"
        # Also once the destination is known.
        client.send("127.0.0.1", udp_echo.port, b"fragment", frag=1)
        client.udp.sendto(h("0100 00") + socks5_target("127.0.0.1",
                                                       udp_echo.port)
                          + b"reserved", client.relay)
        assert client.nothing_more()
    assert [data for data, _ in udp_echo.received] == [b"whole"]
    assert dropped(udp_server, "fragment") == 3
    assert dropped(udp_server, "malformed") == 1


def test_a_third_partys_datagrams_never_reach_the_client(udp_server,
                                                         udp_echo):
    with Association(udp_server.address) as client, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as stranger, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as neighbour:
        stranger.bind(("127.0.0.2", 0))
        # Another host sends to the association's socket: not relayed.
        stranger.sendto(header("127.0.0.1", udp_echo.port) + b"injected",
                        client.relay)
        client.send("127.0.0.1", udp_echo.port, b"mine")
        assert client.receive().endswith(b"mine")
        # A non-destination sends to where the datagrams left from: not
        # relayed; the destination may send unasked, and that is.
        outbound = udp_echo.received[-1][1]
        stranger.sendto(b"spoofed reply", outbound)
        udp_echo.sock.sendto(b"unasked", outbound)
        assert client.receive() == header("127.0.0.1", udp_echo.port) \
            + b"unasked"
        # The same host, another port: not the client once it has spoken.
        neighbour.bind(("127.0.0.1", 0))
        neighbour.sendto(header("127.0.0.1", udp_echo.port) + b"neighbour",
                         client.relay)
        assert client.nothing_more()
        wait_for(lambda: dropped(udp_server, "not from the client") == 2,
                 "the stranger's and the neighbour's datagrams")
        assert dropped(udp_server, "not from a destination") == 1
    assert [data for data, _ in udp_echo.received] == [b"mine"]


def test_a_named_client_port_is_the_only_one(udp_server, udp_echo):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as named:
        named.bind(("127.0.0.1", 0))
        named.settimeout(TIMEOUT)
        with Association(udp_server.address, "127.0.0.1",
                         named.getsockname()[1]) as client:
            client.send("127.0.0.1", udp_echo.port, b"wrong port")
            named.sendto(header("127.0.0.1", udp_echo.port) + b"right port",
                         client.relay)
            assert named.recv(100).endswith(b"right port")
    assert [data for data, _ in udp_echo.received] == [b"right port"]


def test_a_request_naming_another_host_is_refused(udp_server):
    with Association(udp_server.address, "127.0.0.2", 0) as client:
        assert client.reply == socks5_reply(2)
        assert client.control.recv(1) == b""


def test_the_policy_drops_and_counts_but_never_answers(make_server, udp_peers,
                                                       caplog):
    refused, allowed = udp_peers(), udp_peers()
    server = make_server(enable_udp=True, log_destinations=True,
                         destination_policy=["reject 127.0.0.1:%d"
                                             % refused.port])
    with caplog.at_level(logging.INFO, logger="torsocksd"):
        with Association(server.address) as client:
            for _ in range(3):
                client.send("127.0.0.1", refused.port, b"refused")
            client.send("127.0.0.1", allowed.port, b"allowed")
            assert client.receive().endswith(b"allowed")
            assert client.nothing_more()
            assert dropped(server, "refused") == 3
    assert refused.received == []
    refusals = [r.getMessage() for r in caplog.records
                if "UDP: dropping" in r.getMessage()]
    assert refusals == ["conn 1: UDP: dropping datagrams to 127.0.0.1:%d: "
                        "refused by --policy" % refused.port]


def test_datagrams_up_to_65507_bytes(udp_server, udp_peers):
    largest = torsocksd.MAX_UDP_DATAGRAM - 10
    echo = udp_peers()
    big = udp_peers(reply=lambda data: bytes(torsocksd.MAX_UDP_DATAGRAM))
    with Association(udp_server.address) as client:
        client.send("127.0.0.1", echo.port, bytes(largest))
        assert client.receive() == header("127.0.0.1", echo.port) \
            + bytes(largest)
        # The destination's largest datagram cannot carry a header too.
        client.send("127.0.0.1", big.port, b"give me all")
        assert client.nothing_more()
        wait_for(lambda: dropped(udp_server, "too large") == 1, "the drop")


@needs_ipv6
def test_a_client_datagram_over_65507_bytes_is_dropped(make_server,
                                                       udp_echo):
    server = make_server(enable_udp=True, listen=[("::1", 0)])
    with Association(tuple(server.address)) as client:
        client.send("127.0.0.1", udp_echo.port, bytes(65507))
        client.send("127.0.0.1", udp_echo.port, b"small")
        assert client.receive().endswith(b"small")
    assert dropped(server, "too large") == 1
    assert [data for data, _ in udp_echo.received] == [b"small"]


def test_datagrams_waiting_for_a_name_are_bounded(make_server):
    slow = ["slow%d.test" % number for number in range(10)]
    resolver = FakeResolver(silent=slow)
    server = make_server(enable_udp=True, resolver=resolver)
    count = torsocksd.UDP_QUEUE_DATAGRAMS + 6
    with Association(server.address) as client:
        for _ in range(count):
            client.send(slow[0], 9, b"wait")
        wait_for(lambda: dropped(server, "queue full") == 6, "six drops")
    # Names looked up at once are bounded too.
    with Association(server.address) as client:
        for name in slow:
            client.send(name, 9, b"")
        wait_for(lambda: dropped(server, "queue full") == 6 + len(slow)
                 - torsocksd.UDP_PENDING_LOOKUPS, "the lookups' drops")
    assert resolver.queries == slow[:1] + slow[:torsocksd.UDP_PENDING_LOOKUPS]


def test_a_destination_in_use_stays_heard_past_the_table_bound(
        make_server, udp_peers, monkeypatch):
    """Destinations are remembered up to a bound, the oldest forgotten
    first; one whose route is renewed (its name looked up again) counts
    as new, so its answers are not forgotten while datagrams go to it."""
    monkeypatch.setattr(torsocksd, "UDP_MAX_DESTINATIONS", 2)
    monkeypatch.setattr(torsocksd, "UDP_NAME_TTL", 0.5)
    first, second, third = udp_peers(), udp_peers(), udp_peers()
    resolver = FakeResolver({"first.test": ["127.0.0.1"]})
    server = make_server(enable_udp=True, resolver=resolver)
    with Association(server.address) as client:
        client.send("first.test", first.port, b"1")
        assert client.receive().endswith(b"1")
        client.send("127.0.0.1", second.port, b"2")
        assert client.receive().endswith(b"2")
        time.sleep(0.6)     # first.test is due to be looked up again
        client.send("first.test", first.port, b"3")
        assert client.receive().endswith(b"3")
        client.send("127.0.0.1", third.port, b"4")
        assert client.receive().endswith(b"4")
        client.send("first.test", first.port, b"5")
        assert client.receive() == header("127.0.0.1", first.port) + b"5"
    assert resolver.queries == ["first.test", "first.test"]


# -- the association's life ---------------------------------------------------------

def test_the_association_ends_with_its_connection(udp_server, udp_echo,
                                                  caplog):
    with caplog.at_level(logging.INFO, logger="torsocksd"):
        client = Association(udp_server.address)
        with client:
            client.send("127.0.0.1", udp_echo.port, b"one")
            client.send("127.0.0.1", udp_echo.port, b"two", frag=2)
            assert client.receive().endswith(b"one")
            assert udp_server.stats()["udp_associations"] == 1
            client.control.close()
            wait_for(lambda: udp_server.stats()["udp_associations"] == 0,
                     "the association to end")
            # Its socket is closed: a connected socket hears of it.
            client.udp.connect(client.relay)
            client.udp.send(header("127.0.0.1", udp_echo.port) + b"late")
            with pytest.raises(ConnectionRefusedError):
                client.udp.recv(100)
    assert [data for data, _ in udp_echo.received] == [b"one"]
    summary = [r.getMessage() for r in caplog.records
               if "UDP association ended" in r.getMessage()]
    assert len(summary) == 1
    assert summary[0].startswith("conn 1: UDP association ended: 1 datagrams "
                                 "up (3 bytes), 1 down (3 bytes); dropped: "
                                 "1 fragment; ")
    udp = udp_server.stats()["udp"]
    assert (udp["datagrams_up"], udp["bytes_down"]) == (1, 3)


def test_the_idle_timeout_ends_an_association(make_server, udp_echo):
    server = make_server(enable_udp=True, idle_timeout=0.2)
    with Association(server.address) as client:
        client.send("127.0.0.1", udp_echo.port, b"once")
        assert client.receive().endswith(b"once")
        assert client.control.recv(1) == b""
    wait_for(lambda: server.stats()["udp_associations"] == 0, "the end")


def test_a_bug_in_an_association_ends_only_its_connection(udp_server,
                                                          udp_echo,
                                                          monkeypatch):
    def broken(self, datagram):
        raise RuntimeError("a bug")

    monkeypatch.setattr(torsocksd.UdpAssociation, "_relay_out", broken)
    with Association(udp_server.address) as client:
        client.send("127.0.0.1", udp_echo.port, b"boom")
        assert client.control.recv(1) == b""
    wait_for(lambda: udp_server.stats()["udp_associations"] == 0, "the end")
    with socket.create_connection(udp_server.address, TIMEOUT) as other:
        other.sendall(socks5_greeting(0)
                      + socks5_request(0xF0, "127.0.0.1", 0))
        assert recv_exactly(other, 12) == h("0500 05000001 7f000001 0000")


def test_a_write_event_after_the_association_closed_does_nothing(
        udp_server):
    """One round of events can hold the control connection's end and then
    a write event for the association's socket (its queue waited for room
    after EAGAIN): by then the association is closed, and the event is
    nothing to act on.  UDP sends on loopback never meet EAGAIN, so the
    round is played in the loop as it would run it."""
    outcome = []

    def in_the_loop():
        association = next(iter(udp_server._udp_associations))
        sock = association.client_side
        association.send_queues[sock] = collections.deque(
            [(b"x", ("127.0.0.1", 9))])
        association.queued += 1
        association._watch(sock, torsocksd.EVENT_READ | torsocksd.EVENT_WRITE)
        handler, _ = udp_server._loop.selector.get_key(sock).data
        association.connection.close()
        try:
            handler(torsocksd.EVENT_WRITE)
        except Exception as error:      # what the loop would count as a bug
            outcome.append(error)
        outcome.append("done")

    with Association(udp_server.address) as client:
        assert client.reply[:2] == h("0500")
        udp_server.call_soon_threadsafe(in_the_loop)
        wait_for(lambda: outcome, "the round of events")
    assert outcome == ["done"]


@pytest.mark.parametrize("options", [{"max_udp_per_client": 1},
                                     {"max_udp_associations": 1}])
def test_associations_are_capped(make_server, options):
    server = make_server(enable_udp=True, **options)
    first = Association(server.address)
    with first:
        assert first.reply[:2] == h("0500")
        with Association(server.address) as second:
            assert second.reply == socks5_reply(1)
        # Other commands are not counted.
        with socket.create_connection(server.address, TIMEOUT) as other:
            other.sendall(socks5_greeting(0)
                          + socks5_request(0xF0, "127.0.0.1", 0))
            assert recv_exactly(other, 12) == h("0500 05000001 7f000001 0000")
    wait_for(lambda: server.stats()["udp_associations"] == 0, "the end")
    with Association(server.address) as third:
        assert third.reply[:2] == h("0500")


def test_a_unix_socket_client_cannot_associate(make_server, tmp_path):
    path = str(tmp_path / "socks")
    make_server(enable_udp=True, listen=["unix:" + path])
    with socket.socket(socket.AF_UNIX) as client:
        client.settimeout(TIMEOUT)
        client.connect(path)
        client.sendall(socks5_greeting(0)
                       + socks5_request(UDP_ASSOCIATE, "0.0.0.0", 0))
        assert recv_exactly(client, 24) == h("0500") \
            + socks5_reply(7, ipv6_client=True)


# =============================================================================
# Real clients
# =============================================================================

def pysocks_socket(server, family=socket.AF_INET):
    socks = require_module("socks")
    sock = socks.socksocket(family, socket.SOCK_DGRAM)
    sock.set_proxy(socks.SOCKS5, *server.address)
    sock.settimeout(TIMEOUT)
    return sock


def test_pysocks_by_address_and_by_name(make_server, udp_echo):
    resolver = FakeResolver({"echo.test": ["127.0.0.1"]})
    server = make_server(enable_udp=True, resolver=resolver)
    with pysocks_socket(server) as sock:
        sock.sendto(b"by address", ("127.0.0.1", udp_echo.port))
        assert sock.recvfrom(100) == (b"by address",
                                      ("127.0.0.1", udp_echo.port))
        sock.sendto(b"by name", ("echo.test", udp_echo.port))
        # PySocks gives the address the header names.
        assert sock.recvfrom(100) == (b"by name",
                                      ("127.0.0.1", udp_echo.port))
    assert resolver.queries == ["echo.test"]
    wait_for(lambda: server.stats()["udp_associations"] == 0, "the end")
    assert server.stats()["udp"]["datagrams_up"] == 2


@needs_ipv6
def test_pysocks_to_an_ipv6_destination(make_server, udp_peers):
    server = make_server(enable_udp=True)
    echo6 = udp_peers("::1")
    with pysocks_socket(server) as sock:
        sock.sendto(b"to v6", ("::1", echo6.port))
        assert sock.recvfrom(100) == (b"to v6", ("::1", echo6.port))
    wait_for(lambda: server.stats()["udp_associations"] == 0, "the end")
    assert server.stats()["udp"]["datagrams_down"] == 1


def test_socksify_and_a_remote_client_in_a_network_namespace():
    """peers/udp_bind_netns.py: drill through socksify to dnsmasq on a host
    of its own, --outbound-address for datagrams and BIND, and a client
    from another host kept from this host's loopback."""
    require_network_namespace()
    for program in ("socksify", "drill", "dnsmasq", "nsenter"):
        require_program(program)
    output = run_in_namespace("udp_bind_netns.py")
    assert "FAILED" not in output
    assert output.count("ok: ") == 15
