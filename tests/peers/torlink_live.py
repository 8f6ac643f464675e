"""Run by tests/test_torlink.py inside a loopback-only network namespace:
a real tor relay (Debian's tor) on 127.0.0.1, torsocksd's link to it, and
CONNECT_DIR through a SOCKS server end to end.  Not collected on its own
(its name does not start with test_): outside a namespace tor could dial
out.
"""

import os
import re
import socket
import subprocess
import sys
import tempfile
import time

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                os.pardir))
import torsocksd  # noqa: E402
from conftest import (recv_exactly, recv_until_eof,  # noqa: E402
                      require_program)
from test_torlink import StreamWatcher, run_in_loop  # noqa: E402

TIMEOUT = 30.0


RELAY_TORRC = """\
DataDirectory {datadir}
PidFile {datadir}/tor.pid
Log notice file {datadir}/notice.log
SafeLogging 0
TestingTorNetwork 1
DirAuthority dummyauth orport=1 no-v2 v3ident=0000000000000000000000000000000000000000 127.0.0.1:2 0000000000000000000000000000000000000000
Nickname labrelay
ContactInfo lab
Address 127.0.0.1
ORPort 127.0.0.1:{port}
{ipv6_orport}AssumeReachable 1
PublishServerDescriptor 0
ExitRelay 0
ExitPolicy reject *:*
DirCache {dircache}
SocksPort 0
ServerDNSDetectHijacking 0
"""


class Relay:
    """A tor relay on 127.0.0.1 in its own data directory."""

    def __init__(self, dircache):
        self.directory = tempfile.TemporaryDirectory()
        self.datadir = os.path.join(self.directory.name, "data")
        os.mkdir(self.datadir, 0o700)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.ipv6_port = None
        if socket.has_ipv6:
            try:
                with socket.socket(socket.AF_INET6) as probe:
                    probe.bind(("::1", 0))
                    self.ipv6_port = probe.getsockname()[1]
            except OSError:
                pass            # no IPv6 on this loopback
        ipv6_orport = ""
        if self.ipv6_port is not None:
            ipv6_orport = "ORPort [::1]:%d\n" % self.ipv6_port
        torrc = os.path.join(self.directory.name, "relay.torrc")
        with open(torrc, "w") as file:
            file.write(RELAY_TORRC.format(datadir=self.datadir, port=self.port,
                                          ipv6_orport=ipv6_orport,
                                          dircache=dircache))
        self.process = subprocess.Popen(
            ["tor", "--defaults-torrc", os.devnull, "-f", torrc],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def fingerprint(self):
        with open(os.path.join(self.datadir, "fingerprint")) as file:
            return file.read().split()[1]

    def stop(self):
        self.process.terminate()
        self.process.wait(TIMEOUT)
        self.directory.cleanup()


def fetch(loop, pool, relay, path="/tor/server/authority", fingerprint=None,
          request=None):
    if request is None:
        request = b"GET %s HTTP/1.0\r\n\r\n" % path.encode()
    return StreamWatcher(loop, pool, "127.0.0.1", relay.port, request,
                         fingerprint).wait()


def fetch_when_ready(loop, pool, relay, ready):
    """tor tells no one when its ORPort and descriptor are ready, so ask
    until the answer says so (about 1.5 s after the first start)."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        watcher = fetch(loop, pool, relay)
        if ready(watcher):
            return watcher
        assert time.monotonic() < deadline, (watcher.reason, watcher.data[:80])
        time.sleep(0.1)


@pytest.fixture(scope="module")
def relays():
    require_program("tor")
    directory, not_directory = Relay(dircache=1), Relay(dircache=0)
    yield directory, not_directory
    directory.stop()
    not_directory.stop()


@pytest.fixture(scope="module")
def live_loop():
    # Destinations in the log, so failure details show the fingerprints.
    server = torsocksd.Server(listen=[("127.0.0.1", 0)],
                              log_destinations=True).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def live_pool(live_loop):
    links = torsocksd.TorLinkPool(live_loop._loop, timeout=10.0,
                                  scrub=live_loop._scrub)
    yield links
    run_in_loop(live_loop, links.close)


@pytest.fixture(scope="module")
def directory_relay(relays, live_loop, live_pool):
    relay = relays[0]
    fetch_when_ready(live_loop, live_pool, relay,
                     lambda w: w.data.startswith(b"HTTP/1.0 200"))
    return relay


@pytest.fixture(scope="module")
def socks(directory_relay):
    server = torsocksd.Server(listen=[("127.0.0.1", 0)]).start()
    yield server
    server.stop()


class TestLiveRelay:

    def test_fetch_the_relay_descriptor(self, live_loop, live_pool,
                                        directory_relay):
        watcher = fetch(live_loop, live_pool, directory_relay)
        head, _, body = watcher.data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 200 OK")
        assert body.startswith(b"router labrelay 127.0.0.1 %d 0 0\n"
                               % directory_relay.port)
        fingerprint = re.search(rb"\nfingerprint ([0-9A-F ]+)\n", body).group(1)
        assert fingerprint.replace(b" ", b"").decode() \
            == directory_relay.fingerprint()
        assert watcher.reason == torsocksd.EndReason.DONE
        link, = [link for link in live_pool.links.values()
                 if link.port == directory_relay.port]
        assert link.fingerprint.hex().upper() == directory_relay.fingerprint()
        assert link.link_version == 5

    def test_fetch_over_ipv6(self, live_loop, live_pool, directory_relay):
        if directory_relay.ipv6_port is None:
            pytest.skip("no IPv6 loopback")
        watcher = StreamWatcher(live_loop, live_pool, "::1",
                                directory_relay.ipv6_port,
                                b"GET /tor/server/authority HTTP/1.0\r\n\r\n")
        assert watcher.wait().data.startswith(b"HTTP/1.0 200 OK")

    def test_pinned_fingerprint(self, live_loop, live_pool, directory_relay):
        pin = torsocksd.parse_fingerprint(directory_relay.fingerprint())
        watcher = fetch(live_loop, live_pool, directory_relay, fingerprint=pin)
        assert watcher.data.startswith(b"HTTP/1.0 200 OK")

    def test_pin_mismatch_is_refused(self, live_loop, live_pool,
                                     directory_relay):
        wrong = bytes(20)
        watcher = fetch(live_loop, live_pool, directory_relay,
                        fingerprint=wrong)
        assert not watcher.connected and watcher.data == b""
        assert watcher.reason == torsocksd.EndReason.TORPROTOCOL
        assert torsocksd.reply_for_end_reason(watcher.reason) \
            == torsocksd.Reply.GENERAL_FAILURE
        assert "not the expected 0000" in watcher.detail
        assert directory_relay.fingerprint() in watcher.detail

    def test_missing_document_is_an_http_404(self, live_loop, live_pool,
                                             directory_relay):
        watcher = fetch(live_loop, live_pool, directory_relay,
                        path="/tor/server/d/" + "00" * 20)
        assert watcher.data.startswith(b"HTTP/1.0 404")

    def test_circuit_reused_and_circuit_sendmes_accepted(
            self, live_loop, live_pool, directory_relay):
        # ~5 DATA cells per descriptor: 250 fetches need 12 circuit SENDMEs
        # (v1, with our digests), else the relay would stop at 1000 cells.
        def link_now():
            return run_in_loop(live_loop, lambda: live_pool.links[
                ("127.0.0.1", directory_relay.port, None)])
        link = link_now()
        for _ in range(250):
            watcher = fetch(live_loop, live_pool, directory_relay)
            assert watcher.data.startswith(b"HTTP/1.0 200 OK")
        assert link_now() is link and link.usable

    def test_parallel_streams_share_the_circuit(self, live_loop, live_pool,
                                                directory_relay):
        watchers = [StreamWatcher(live_loop, live_pool, "127.0.0.1",
                                  directory_relay.port,
                                  b"GET /tor/server/authority HTTP/1.0\r\n\r\n")
                    for _ in range(30)]
        bodies = {watcher.wait().data.partition(b"\r\n\r\n")[2]
                  for watcher in watchers}
        assert len(bodies) == 1 and bodies.pop().startswith(b"router labrelay")
        assert len([link for link in live_pool.links.values()
                    if link.port == directory_relay.port]) == 1

    def test_big_upload_needs_the_relays_sendmes(self, live_loop, live_pool,
                                                 directory_relay):
        # 2 MB is 4000 DATA cells: past our stream window (500) and circuit
        # window (1000), so the relay's stream SENDMEs and authenticated
        # circuit SENDMEs must arrive and check out.  A relay that is no
        # authority answers 400 once it has read the whole body.
        body = os.urandom(2000000)
        request = b"POST /tor/ HTTP/1.0\r\nContent-Length: %d\r\n\r\n" \
            % len(body) + body
        watcher = fetch(live_loop, live_pool, directory_relay, request=request)
        assert watcher.sent == len(request)
        assert watcher.data.startswith(b"HTTP/1.0 400 ")
        assert watcher.reason == torsocksd.EndReason.DONE

    def test_paused_stream_holds_data_until_resumed(
            self, live_loop, live_pool, directory_relay):
        # Paused from the start: the whole answer and the END wait, then
        # come in order once the stream resumes.
        watcher = StreamWatcher(live_loop, live_pool, "127.0.0.1",
                                directory_relay.port,
                                b"GET /tor/server/authority HTTP/1.0\r\n\r\n",
                                pause_first=0.3).wait()
        assert watcher.data_before_resume == b""
        assert watcher.data.startswith(b"HTTP/1.0 200 OK")
        assert watcher.reason == torsocksd.EndReason.DONE

    def test_not_a_directory(self, relays, live_loop, live_pool):
        relay = relays[1]
        watcher = fetch_when_ready(
            live_loop, live_pool, relay,
            lambda w: w.reason != torsocksd.EndReason.CONNECTREFUSED)
        assert not watcher.connected and watcher.data == b""
        assert watcher.reason == torsocksd.EndReason.NOTDIRECTORY == 14
        assert torsocksd.reply_for_end_reason(watcher.reason) \
            == torsocksd.Reply.GENERAL_FAILURE

    # -- CONNECT_DIR through a SOCKS server, byte for byte ---------------------

    def test_socks5_connect_dir_fetches_the_descriptor(self, socks,
                                                       directory_relay):
        request = b"GET /tor/server/authority HTTP/1.0\r\n\r\n"
        with socket.create_connection(socks.address, timeout=TIMEOUT) as c:
            # Greeting, CONNECT_DIR and the HTTP request in one segment: the
            # request is early data, sent once RELAY_CONNECTED arrived.
            c.sendall(b"\x05\x01\x00\x05\xf2\x00\x01\x7f\x00\x00\x01"
                      + directory_relay.port.to_bytes(2, "big") + request)
            answer = recv_until_eof(c)
        assert answer[:12] == b"\x05\x00\x05\x00\x00\x01" + bytes(6)
        head, _, body = answer[12:].partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 200 OK")
        assert body.startswith(b"router labrelay 127.0.0.1 %d 0 0\n"
                               % directory_relay.port)

    def test_time_from_request_to_first_descriptor_byte(self,
                                                        directory_relay):
        """A figure for the notes: a fresh server builds its link (TLS,
        CERTS check, CREATE_FAST) on the first request; the second reuses
        the circuit."""
        server = torsocksd.Server(listen=[("127.0.0.1", 0)]).start()
        try:
            times = []
            for _ in range(2):
                with socket.create_connection(server.address,
                                              timeout=TIMEOUT) as c:
                    started = time.perf_counter()
                    c.sendall(b"\x05\x01\x00\x05\xf2\x00\x01\x7f\x00\x00"
                              b"\x01" + directory_relay.port.to_bytes(2, "big")
                              + b"GET /tor/server/authority HTTP/1.0\r\n\r\n")
                    assert recv_exactly(c, 12)[:4] == b"\x05\x00\x05\x00"
                    assert recv_exactly(c, 1) == b"H"
                    times.append(time.perf_counter() - started)
                    assert recv_until_eof(c).startswith(b"TTP/1.0 200 OK")
        finally:
            server.stop()
        print("CONNECT_DIR request to first descriptor byte: %.1f ms with a "
              "new link, %.1f ms on the open circuit" % (times[0] * 1000,
                                                         times[1] * 1000))

    def test_socks4_and_socks4a_connect_dir(self, socks, directory_relay):
        port = directory_relay.port.to_bytes(2, "big")
        for request in (b"\x04\xf2" + port + b"\x7f\x00\x00\x01\x00",
                        b"\x04\xf2" + port + b"\x00\x00\x00\x01\x00"
                        b"localhost\x00"):
            with socket.create_connection(socks.address,
                                          timeout=TIMEOUT) as c:
                c.sendall(request)
                assert recv_exactly(c, 8) == b"\x00\x5a" + bytes(6)
                c.sendall(b"GET /tor/server/authority HTTP/1.0\r\n\r\n")
                assert recv_until_eof(c).startswith(b"HTTP/1.0 200 OK")

    def test_pinned_relay_through_socks(self, directory_relay):
        right = torsocksd.parse_fingerprint(directory_relay.fingerprint())
        key = ("127.0.0.1", directory_relay.port)
        for pin, expected in ((right, b"\x05\x00"), (bytes(20), b"\x05\x01")):
            server = torsocksd.Server(listen=[("127.0.0.1", 0)],
                                      router_pins={key: pin}).start()
            try:
                with socket.create_connection(server.address,
                                              timeout=TIMEOUT) as c:
                    c.sendall(b"\x05\x01\x00\x05\xf2\x00\x01\x7f\x00\x00"
                              b"\x01" + directory_relay.port.to_bytes(2, "big"))
                    assert recv_exactly(c, 2) == b"\x05\x00"
                    assert recv_exactly(c, 10) == expected + b"\x00\x01" \
                        + bytes(6)
            finally:
                server.stop()

    def test_pins_hold_for_the_ipv4_mapped_spelling(self, directory_relay):
        """A pin holds however the relay's address is written: a pin on
        127.0.0.1 for CONNECT_DIR to ::ffff:127.0.0.1 (ATYP 4, or as a
        name), and a pin written as [::ffff:127.0.0.1] for 127.0.0.1."""
        port = directory_relay.port
        mapped = b"::ffff:127.0.0.1"
        targets = {
            "127.0.0.1": b"\x01\x7f\x00\x00\x01",
            "ATYP 4 ::ffff:127.0.0.1": b"\x04" + bytes(10) + b"\xff\xff"
                                       b"\x7f\x00\x00\x01",
            "name ::ffff:127.0.0.1": b"\x03" + bytes([len(mapped)]) + mapped,
        }
        for pinned_as in ("127.0.0.1", "[::ffff:127.0.0.1]"):
            for fingerprint, expected in (
                    (directory_relay.fingerprint(), b"\x05\x00"),
                    ("00" * 20, b"\x05\x01")):
                pin = torsocksd.router_pin("%s:%d=%s"
                                          % (pinned_as, port, fingerprint))
                server = torsocksd.Server(listen=[("127.0.0.1", 0)],
                                          router_pins=dict([pin])).start()
                try:
                    for what, target in targets.items():
                        with socket.create_connection(server.address,
                                                      timeout=TIMEOUT) as c:
                            c.sendall(b"\x05\x01\x00\x05\xf2\x00" + target
                                      + port.to_bytes(2, "big"))
                            assert recv_exactly(c, 2) == b"\x05\x00"
                            assert recv_exactly(c, 10) == expected \
                                + b"\x00\x01" + bytes(6), \
                                (pinned_as, fingerprint, what)
                finally:
                    server.stop()

    def test_refusals_through_socks(self, socks, relays):
        not_directory = relays[1]
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            closed_port = probe.getsockname()[1]
        for port, reply in ((not_directory.port, 0x01),     # NOTDIRECTORY
                            (closed_port, 0x05)):           # refused
            with socket.create_connection(socks.address,
                                          timeout=TIMEOUT) as c:
                c.sendall(b"\x05\x01\x00\x05\xf2\x00\x01\x7f\x00\x00\x01"
                          + port.to_bytes(2, "big"))
                assert recv_exactly(c, 2) == b"\x05\x00"
                assert recv_until_eof(c) == bytes((5, reply, 0, 1)) + bytes(6)

    def test_relay_going_away_ends_open_streams(self, live_loop, live_pool,
                                                directory_relay):
        # Last, as it stops the relay.  A stream that sent no request yet
        # stays open at the relay until the relay exits.
        watcher = StreamWatcher(live_loop, live_pool, "127.0.0.1",
                                directory_relay.port)
        assert watcher.connected_event.wait(TIMEOUT)
        directory_relay.process.terminate()
        watcher.wait()
        assert watcher.reason == torsocksd.EndReason.DESTROY
        assert torsocksd.reply_for_end_reason(watcher.reason) \
            == torsocksd.Reply.GENERAL_FAILURE
        assert run_in_loop(live_loop, lambda: [
            link for link in live_pool.links.values()
            if link.port == directory_relay.port]) == []
