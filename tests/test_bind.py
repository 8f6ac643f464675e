"""BIND (RFC 1928 §4, §6; the SOCKS4 note's two 5a replies), turned on with
enable_bind: the first reply says where torsocksd listens, only DST.ADDR
may connect there, the second reply names the peer, then bytes relay as
for CONNECT.  And ncat listening through Dante's socksify.

Only loopback addresses (127.0.0.0/8 holds the "other hosts"); names go
through FakeResolver.  A remote client's BIND and one with a far peer are
in peers/udp_bind_netns.py (test_udp.py runs it).
"""

import logging
import os
import re
import socket
import subprocess
import time

import pytest

import torsocksd
from conftest import (TIMEOUT, FakeResolver, each_relay_mode, free_port,
                      ipv6_loopback, recv_exactly, recv_socks5_reply,
                      recv_until_eof, reply_address, require_program,
                      socks4_request, socks4a_request, socks5_greeting,
                      socks5_reply, socks5_request, socks5_target)

h = bytes.fromhex
BIND = 2

needs_ipv6 = pytest.mark.skipif(not ipv6_loopback(),
                                reason="no IPv6 loopback (::1) here")


def reply5(address, port):
    """05 00 00 ATYP BND.ADDR BND.PORT naming address:port."""
    return h("050000") + socks5_target(address, port)


def reply4(address, port):
    return h("005a") + port.to_bytes(2, "big") + socket.inet_aton(address)


def bind5(server, host, port=0, early=b""):
    """A SOCKS5 BIND for host:port: (control socket, first reply)."""
    control = socket.create_connection(server.address, timeout=TIMEOUT)
    control.sendall(socks5_greeting(0))
    assert recv_exactly(control, 2) == b"\x05\x00"
    control.sendall(socks5_request(BIND, host, port) + early)
    return control, recv_socks5_reply(control)


def peer_from(source, address):
    """A connection to address from source (an address of this host)."""
    return socket.create_connection(address, timeout=TIMEOUT,
                                    source_address=(source, 0))


def turned_away(source, address):
    """A connection from source to address is closed or reset by the
    server without a byte (the reset may come before connect() returns)."""
    try:
        with peer_from(source, address) as stranger:
            return stranger.recv(1) == b""
    except ConnectionResetError:
        return True


def second_reply_names_the_peer(control, source, listening):
    """A peer connects from source to the BIND's listener: the second
    reply names that peer."""
    with peer_from(source, listening) as peer:
        assert recv_socks5_reply(control) \
            == reply5(source, peer.getsockname()[1])


@pytest.fixture
def bind_server(make_server):
    return make_server(enable_bind=True)


# -- only its own flag turns it on ---------------------------------------------------
# (Off by default and with enable_udp alone: test_udp.py's
# test_a_disabled_command_keeps_todays_bytes.)

def test_an_enabled_bind_with_a_bad_address_type_is_08(bind_server):
    with socket.create_connection(bind_server.address, TIMEOUT) as client:
        client.sendall(h("050100 05020009"))
        assert recv_exactly(client, 12) == h("0500") + socks5_reply(8)


# -- the two replies and the relay --------------------------------------------------

@each_relay_mode
def test_socks5_bind_accepts_only_dst_addr_then_relays(make_server,
                                                       relay_mode):
    server = make_server(enable_bind=True)
    control, first = bind5(server, "127.0.0.1", 21)
    with control:
        listening = reply_address(first)
        assert first == reply5("127.0.0.1", listening[1])
        assert listening[1] != 0
        # Another host is turned away; the client hears nothing of it.
        assert turned_away("127.0.0.2", listening)
        control.settimeout(0.2)
        with pytest.raises(socket.timeout):
            control.recv(1)
        control.settimeout(TIMEOUT)
        with peer_from("127.0.0.1", listening) as peer:
            second = recv_socks5_reply(control)
            assert second == reply5("127.0.0.1", peer.getsockname()[1])
            peer.sendall(b"from the peer")
            assert recv_exactly(control, 13) == b"from the peer"
            control.sendall(b"from the client")
            assert recv_exactly(peer, 15) == b"from the client"
            # Half-close, as for CONNECT: each direction ends on its own.
            peer.shutdown(socket.SHUT_WR)
            assert recv_until_eof(control) == b""
            control.sendall(b"still open")
            control.shutdown(socket.SHUT_WR)
            assert recv_until_eof(peer) == b"still open"
        # The listener was for one connection only.
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(listening, timeout=TIMEOUT).close()


def test_socks4_bind_replies_twice_with_5a(bind_server):
    with socket.create_connection(bind_server.address, TIMEOUT) as control:
        control.sendall(socks4_request(BIND, "127.0.0.1", 21, b"me"))
        first = recv_exactly(control, 8)
        listening = reply_address(first)
        assert first == reply4("127.0.0.1", listening[1])
        with peer_from("127.0.0.1", listening) as peer:
            assert recv_exactly(control, 8) \
                == reply4("127.0.0.1", peer.getsockname()[1])
            peer.sendall(b"ok")
            assert recv_exactly(control, 2) == b"ok"


def test_bind_to_a_name(make_server):
    resolver = FakeResolver({"peer.test": ["127.0.0.3"]})
    server = make_server(enable_bind=True, resolver=resolver)
    control, first = bind5(server, "peer.test", 21)
    with control:
        assert turned_away("127.0.0.2", reply_address(first))
        second_reply_names_the_peer(control, "127.0.0.3", reply_address(first))
    with socket.create_connection(server.address, TIMEOUT) as control:
        control.sendall(socks4a_request(BIND, "peer.test", 21))
        listening = reply_address(recv_exactly(control, 8))
        with peer_from("127.0.0.3", listening) as peer:
            assert recv_exactly(control, 8) \
                == reply4("127.0.0.3", peer.getsockname()[1])
    assert resolver.queries == ["peer.test", "peer.test"]


def test_bytes_sent_before_the_peer_came_reach_it(bind_server):
    control, first = bind5(bind_server, "127.0.0.1", 21, early=b"early")
    with control, peer_from("127.0.0.1", reply_address(first)) as peer:
        assert recv_socks5_reply(control)[:2] == h("0500")
        assert recv_exactly(peer, 5) == b"early"


def test_an_unspecified_dst_addr_takes_any_allowed_peer(bind_server):
    control, first = bind5(bind_server, "0.0.0.0", 0)
    with control:
        assert reply_address(first)[0] == "127.0.0.1"
        second_reply_names_the_peer(control, "127.0.0.5", reply_address(first))


def test_an_unspecified_dst_addr_names_the_port_wanted(bind_server):
    wanted = free_port()
    control, first = bind5(bind_server, "0.0.0.0", wanted)
    with control:
        assert first == reply5("127.0.0.1", wanted)
        # Taken already: the kernel's choice, and the reply says which.
        other, second = bind5(bind_server, "0.0.0.0", wanted)
        with other:
            assert second[:8] == h("05000001 7f000001")
            assert reply_address(second)[1] not in (0, wanted)
    # A privileged port is never asked for.
    control, first = bind5(bind_server, "0.0.0.0", 21)
    with control:
        assert reply_address(first)[1] != 21


def test_bind_listens_on_the_outbound_address(make_server):
    server = make_server(enable_bind=True, outbound_addresses=["127.0.0.3"])
    control, first = bind5(server, "127.0.0.1", 21)
    with control:
        assert reply_address(first)[0] == "127.0.0.3"
        with peer_from("127.0.0.1", reply_address(first)):
            assert recv_socks5_reply(control)[:2] == h("0500")


@needs_ipv6
def test_bind_over_ipv6(bind_server):
    control, first = bind5(bind_server, "::1", 21)
    with control:
        listening = reply_address(first)
        assert first == reply5("::1", listening[1])
        second_reply_names_the_peer(control, "::1", listening)


# -- what ends a BIND ----------------------------------------------------------------

def test_no_peer_in_time_gets_the_second_reply_06(make_server):
    server = make_server(enable_bind=True, connect_timeout=0.3)
    control, first = bind5(server, "127.0.0.1", 21)
    with control:
        assert recv_socks5_reply(control) == socks5_reply(6)
        assert recv_until_eof(control) == b""
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(reply_address(first), timeout=TIMEOUT).close()
    with socket.create_connection(server.address, TIMEOUT) as control:
        control.sendall(socks4_request(BIND, "127.0.0.1", 21))
        assert recv_exactly(control, 8)[:2] == h("005a")
        assert recv_exactly(control, 8) == h("005b 0000 00000000")
        assert recv_until_eof(control) == b""


def test_the_policy_judges_dst_addr(make_server):
    server = make_server(enable_bind=True,
                         destination_policy=["reject 127.0.0.4"])
    control, first = bind5(server, "127.0.0.4", 21)
    with control:
        assert first == socks5_reply(2)
        assert recv_until_eof(control) == b""
    # With no peer named, the policy judges whoever connects.
    control, first = bind5(server, "0.0.0.0", 0)
    with control:
        assert turned_away("127.0.0.4", reply_address(first))
        second_reply_names_the_peer(control, "127.0.0.5", reply_address(first))


def test_the_client_leaving_closes_the_listener(make_server):
    server = make_server(enable_bind=True, connect_timeout=60)
    control, first = bind5(server, "127.0.0.1", 21)
    control.close()
    deadline = time.monotonic() + TIMEOUT
    while server.stats()["active"]:
        assert time.monotonic() < deadline, "the BIND outlived its client"
        time.sleep(0.01)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(reply_address(first), timeout=TIMEOUT).close()


def test_strangers_are_logged_up_to_a_bound_then_counted(make_server,
                                                         caplog):
    server = make_server(enable_bind=True, log_destinations=True)
    strangers = torsocksd.BIND_LOGGED_REFUSALS + 3
    with caplog.at_level(logging.INFO, logger="torsocksd"):
        control, first = bind5(server, "127.0.0.1", 21)
        with control:
            for _ in range(strangers):
                assert turned_away("127.0.0.2", reply_address(first))
            with peer_from("127.0.0.1", reply_address(first)):
                assert recv_socks5_reply(control)[:2] == h("0500")
        deadline = time.monotonic() + TIMEOUT
        while server.stats()["active"]:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    messages = [record.getMessage() for record in caplog.records]
    refused = [m for m in messages if "BIND: refused a connection" in m]
    assert len(refused) == torsocksd.BIND_LOGGED_REFUSALS
    assert all(m.startswith("conn 1: BIND: refused a connection from "
                            "127.0.0.2:") and m.endswith(": not DST.ADDR")
               for m in refused)
    outcome = [m for m in messages if m.startswith("conn 1 from ")]
    assert len(outcome) == 1
    assert ": relayed (%d stranger(s) refused);" % strangers in outcome[0]


# -- a real client ---------------------------------------------------------------------

def test_ncat_listens_through_socksify(bind_server, tmp_path):
    """Dante's client turns ncat's listen() and accept() into a BIND for
    0.0.0.0 and the port ncat asked for."""
    socksify = require_program("socksify")
    ncat = require_program("ncat")
    conf = tmp_path / "dante.conf"
    conf.write_text("route {\n  from: 0.0.0.0/0 to: 0.0.0.0/0 via: %s "
                    "port = %d\n  protocol: tcp\n  proxyprotocol: socks_v5\n"
                    "  method: none\n}\n" % bind_server.address)
    port = free_port()
    process = subprocess.Popen(
        [socksify, ncat, "-v", "-l", "127.0.0.1", str(port)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=dict(os.environ, SOCKS_CONF=str(conf)))
    try:
        banner = b""
        while b"Listening on" not in banner:
            line = process.stderr.readline()
            assert line, banner
            banner += line
        assert re.search(rb"Listening on 127\.0\.0\.1:%d" % port, banner)
        with socket.create_connection(("127.0.0.1", port), TIMEOUT) as peer:
            peer.sendall(b"hello ncat\n")
            process.stdin.write(b"hello peer\n")
            process.stdin.flush()
            assert recv_exactly(peer, 11) == b"hello peer\n"
        # ncat ends when the peer has gone; what it printed came from it.
        assert process.stdout.read() == b"hello ncat\n"
        assert process.wait(TIMEOUT) == 0
        # Through torsocksd, not a listener of ncat's own.
        deadline = time.monotonic() + TIMEOUT
        while bind_server.stats()["active"]:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert bind_server.stats()["accepted"] == 1
        assert bind_server.stats()["relayed_bytes"] == 22
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate()
