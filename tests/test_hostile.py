"""Hostile clients and hostile conditions, over real sockets.

* Fuzzing: tests/fuzz_campaign.py's seeded campaign with the CI sizes, first
  against the pure parsers, then against live servers over loopback (every
  byte checked against a reference model, torsocksd's log watched for errors
  and tracebacks, descriptors counted before and after).
* Slowloris: 2,000 clients trickling a greeting one byte a second; a fresh
  client is still served at once and every trickler is cut at the deadline.
* Descriptor exhaustion: torsocksd as a child process with RLIMIT_NOFILE 64.
* Backpressure: a fast sender into a slow reader (each way); torsocksd's RSS
  stays bounded, then every byte arrives in order.
* Half-close and integrity: FIN from either side first, RST from either side
  (also while the other side is stalled, and before a RESOLVE is answered).
* Policy: a refused client address, bad credentials, and (in a network
  namespace) a remote client that may not reach this host's loopback.

Figures are printed (pytest -s shows them).  Set TORSOCKSD_FUZZ_SEED to
replay a failing random run; the seed is printed and in every failure.
"""

import hashlib
import heapq
import os
import random
import resource
import selectors
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

import fuzz_campaign
import torsocksd
from conftest import (TIMEOUT, FakeResolver, connect, each_relay_mode,
                      free_port, hash_until_eof, open_socks5_tunnel,
                      recv_exactly, recv_until_eof, run_peer_checks)

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, os.pardir, "torsocksd.py")

FUZZ_SEED = int(os.environ.get("TORSOCKSD_FUZZ_SEED")
                or random.SystemRandom().randrange(1 << 32))

METHOD_NO_AUTH = b"\x05\x00"
SOCKS5_OK = b"\x05\x00\x00\x01" + bytes(6)
RST_LINGER = struct.pack("ii", 1, 0)


def socks5_connect(address, port, timeout=TIMEOUT):
    """A client tunnelled to 127.0.0.1:port through the SOCKS server at
    address; returns the socket after the success reply."""
    return open_socks5_tunnel(address, "127.0.0.1", port, timeout)


def wait_for(predicate, seconds=5.0, interval=0.02):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def raise_nofile(wanted):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY:
        wanted = min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


@pytest.fixture
def log_problems():
    """torsocksd's log records with a traceback or of level ERROR or worse."""
    with fuzz_campaign.ProblemLog() as problems:
        yield problems
    assert not problems.problems, problems.problems[:3]


# =============================================================================
# Fuzzing
# =============================================================================

def test_fuzz_parsers():
    """>= 200,000 seeded inputs (valid, mutated, interleaved messages of
    every version) to every parser: NEED_MORE, Parsed with 0 < used <= len
    that re-encodes to the bytes used, or Rejected with a valid reply."""
    print("\nparser campaign seed %d (TORSOCKSD_FUZZ_SEED)" % FUZZ_SEED)
    figures = fuzz_campaign.fuzz_parsers(fuzz_campaign.FUZZ_CASES, FUZZ_SEED)
    print("parsers: %d cases fuzzed, %d parser calls, %.1f s" % (
        figures["cases"], figures["parser_calls"], figures["seconds"]))
    for outcome, count in figures["outcomes"].items():
        print("  %-40s %d" % (outcome, count))
    assert figures["cases"] >= 200_000


LIVE_PHASES = [
    # (id, connections, credentials, splice)
    ("plain-copy", fuzz_campaign.FUZZ_CONNECTIONS * 4 // 5, None, False),
    ("credentials-splice", fuzz_campaign.FUZZ_CONNECTIONS // 5,
     fuzz_campaign.CREDENTIALS, torsocksd.HAVE_SPLICE),
]


@pytest.mark.parametrize("phase, connections, credentials, splice",
                         LIVE_PHASES, ids=[p[0] for p in LIVE_PHASES])
def test_fuzz_live_server(make_server, phase, connections, credentials,
                          splice):
    """The campaign's connections (together the CI's 20,000), 64 at once,
    against a live server: exact protocol replies and clean closes, no error
    in the log, no descriptor leaked, nothing left active, and a normal
    client served afterwards."""
    print("\nlive campaign %s seed %d (TORSOCKSD_FUZZ_SEED)"
          % (phase, FUZZ_SEED))
    campaign = fuzz_campaign.LiveCampaign(FUZZ_SEED)
    try:
        listen = [("127.0.0.1", 0)]
        if campaign.echo6:
            listen.append(("::1", 0))
        server = make_server(
            listen=listen, handshake_timeout=fuzz_campaign.HANDSHAKE_TIMEOUT,
            splice=splice,
            resolver=FakeResolver(fuzz_campaign.NAMES, fuzz_campaign.REVERSE),
            destination_policy=campaign.policy(),
            credentials=torsocksd.Credentials(credentials)
            if credentials else None,
            max_login_failures=0)   # the campaign fails logins on purpose
        figures = fuzz_campaign.live_campaign(server, campaign, connections,
                                               credentials=credentials)
        problem = campaign.check_normal_client(server, credentials)
        if problem:
            figures["failures"].append("seed %d: a normal client was not "
                                       "served afterwards: %s"
                                       % (FUZZ_SEED, problem))
    finally:
        campaign.close()
    print("live %s: %d connections in %.1f s (%.0f/s)" % (
        phase, figures["connections"], figures["seconds"],
        figures["connections"] / max(figures["seconds"], 1e-9)))
    print("  " + ", ".join("%s %s" % (k, v) for k, v in sorted(
        figures.items()) if k.startswith(("mode", "outcome", "reset"))))
    print("  descriptors (sockets, pipes, all) before %r after %r"
          % (figures["fds_before"], figures["fds_after"]))
    if figures["warnings"]:
        print("  torsocksd warnings: %r" % figures["warnings"])
    for failure in figures["failures"]:
        print("FAILED: " + failure)
    assert not figures["failures"], "seed %d: %d problem(s), first: %s" % (
        FUZZ_SEED, len(figures["failures"]), figures["failures"][0])
    assert figures["connections"] == connections


class DelayedResolver(FakeResolver):
    """FakeResolver whose answers come `delay` seconds late."""

    def __init__(self, *args, delay=0.3, **kwargs):
        super().__init__(*args, **kwargs)
        self.delay = delay

    def lookup(self, hostname, callback):
        return super().lookup(hostname, self._later(callback))

    def reverse(self, address, callback):
        return super().reverse(address, self._later(callback))

    def _later(self, callback):
        def deliver(result):
            timer = threading.Timer(self.delay, callback, (result,))
            timer.daemon = True
            timer.start()
        return deliver


RESET_BEFORE_ANSWER = [
    ("RESOLVE answered",
     b"\x05\x01\x00\x05\xf0\x00\x03\x09echo.test\x00\x00"),
    ("RESOLVE failed",
     b"\x05\x01\x00\x05\xf0\x00\x03\x0cmissing.test\x00\x00"),
    ("RESOLVE_PTR answered",
     b"\x05\x01\x00\x05\xf1\x00\x01\x7f\x00\x00\x01\x00\x00"),
    ("SOCKS4A RESOLVE answered",
     b"\x04\xf0\x00\x00\x00\x00\x00\x01\x00echo.test\x00"),
    ("RESOLVE lookup deadline",
     b"\x05\x01\x00\x05\xf0\x00\x03\x09slow.test\x00\x00"),
]


@pytest.mark.parametrize("case, request_bytes", RESET_BEFORE_ANSWER,
                         ids=[c[0].replace(" ", "-")
                              for c in RESET_BEFORE_ANSWER])
def test_client_reset_before_its_answer_does_not_stop_the_server(
        make_server, echo_server, case, request_bytes):
    """A client sends a RESOLVE (or RESOLVE_PTR) and resets before the
    answer: when the answer (or the lookup deadline) comes, sending it fails
    with ECONNRESET/EPIPE.  The server must close that one connection and
    keep serving, with no traceback in its log."""
    resolver = DelayedResolver(fuzz_campaign.NAMES, fuzz_campaign.REVERSE,
                               silent=["slow.test"], delay=0.15)
    server = make_server(resolver=resolver, connect_timeout=0.5)
    with fuzz_campaign.ProblemLog() as problems, \
            fuzz_campaign.ThreadErrors() as thread_errors:
        with connect(server) as sock:
            sock.sendall(request_bytes)
            if request_bytes[0] == 5:
                assert recv_exactly(sock, 2) == METHOD_NO_AUTH
            time.sleep(0.05)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RST_LINGER)
        time.sleep(0.8)         # the answer or the deadline comes
        alive = server._thread.is_alive()
        served = None
        if alive:
            try:
                with socks5_connect(server.address, echo_server.port,
                                    timeout=3) as sock:
                    sock.sendall(b"ok")
                    served = recv_exactly(sock, 2) == b"ok"
            except (OSError, AssertionError, EOFError) as error:
                served = repr(error)
    print("\nclient reset before its %s: loop alive %s, next client served "
          "%s, thread errors %s, log problems %d"
          % (case, alive, served, thread_errors.errors,
             len(problems.problems)))
    assert alive, "the server's loop died: %s" % thread_errors.errors
    assert served is True
    assert not problems.problems, problems.problems[0]
    assert wait_for(lambda: server.stats()["active"] == 0), server.stats()


# =============================================================================
# Slowloris
# =============================================================================

SLOW_CLIENTS = 2000
SLOW_DEADLINE = 3.0
SLOW_SLACK = 2.0            # a cut may come this much after the deadline


class Trickler:
    __slots__ = ("sock", "opened", "next_byte", "sent", "ended", "end",
                 "received")


def test_slowloris_tricklers_are_cut_and_fresh_clients_served(make_server,
                                                              echo_server):
    """2,000 clients send 05, then one byte a second of a greeting offering
    255 methods (never complete); each one cut is replaced while the trickle
    runs.  A fresh client's whole handshake + CONNECT still completes
    promptly; every trickler sees EOF (or a reset) at the handshake deadline
    and not a byte before it."""
    if raise_nofile(4 * SLOW_CLIENTS + 1000) < 4 * SLOW_CLIENTS + 1000:
        pytest.skip("RLIMIT_NOFILE cannot be raised to %d"
                    % (4 * SLOW_CLIENTS + 1000))
    server = make_server(handshake_timeout=SLOW_DEADLINE)
    selector = selectors.DefaultSelector()
    tricklers = []
    live = {}
    stop_replacing = threading.Event()
    stop = threading.Event()
    greeting = b"\x05\xff" + bytes(range(1, 256))

    schedule = []           # (when the next byte is due, sequence, t)
    sequence = [0]

    def open_trickler():
        t = Trickler()
        t.sock = socket.socket()
        t.sock.setblocking(False)
        t.sock.connect_ex(server.address)
        t.opened = time.monotonic()
        t.next_byte = t.opened          # 05 at once, then 0.5 s, 1.5 s, ...
        t.sent = 0
        t.ended = None
        t.end = None
        t.received = b""
        selector.register(t.sock, selectors.EVENT_READ, t)
        live[t.sock.fileno()] = t
        tricklers.append(t)
        sequence[0] += 1
        heapq.heappush(schedule, (t.next_byte, sequence[0], t))

    def finish(t, end):
        t.ended = time.monotonic()
        t.end = end
        selector.unregister(t.sock)
        del live[t.sock.fileno()]
        t.sock.close()
        if not stop_replacing.is_set():
            open_trickler()

    def trickle():
        sweep = time.monotonic() + 1.0
        while not stop.is_set() and (live or not stop_replacing.is_set()):
            for key, _ in selector.select(0.02):
                t = key.data
                try:
                    data = t.sock.recv(4096)
                except BlockingIOError:
                    continue
                except ConnectionResetError:
                    finish(t, "reset")
                    continue
                except OSError as error:
                    finish(t, repr(error))
                    continue
                if data:
                    t.received += data
                else:
                    finish(t, "eof")
            now = time.monotonic()
            while schedule and schedule[0][0] <= now:
                _, _, t = heapq.heappop(schedule)
                if t.end is not None or t.sent >= len(greeting):
                    continue
                try:
                    t.sock.send(greeting[t.sent:t.sent + 1])
                except OSError:
                    t.next_byte = now + 0.01    # not connected yet
                else:
                    t.sent += 1
                    t.next_byte = t.opened + t.sent - 0.5
                sequence[0] += 1
                heapq.heappush(schedule, (t.next_byte, sequence[0], t))
            if now >= sweep:
                sweep = now + 1.0
                for t in list(live.values()):
                    if now - t.opened > SLOW_DEADLINE + 10:
                        finish(t, "never cut")

    # Ramp up in batches, so that the listen backlog never overflows.
    for batch in range(0, SLOW_CLIENTS, 200):
        for _ in range(200):
            open_trickler()
        time.sleep(0.02)
    runner = threading.Thread(target=trickle, name="tricklers", daemon=True)
    runner.start()
    try:
        time.sleep(0.5)
        latencies = []
        for _ in range(20):
            started = time.monotonic()
            with socks5_connect(server.address, echo_server.port,
                                timeout=SLOW_DEADLINE + SLOW_SLACK) as sock:
                done = time.monotonic()
                sock.sendall(b"ping")
                assert recv_exactly(sock, 4) == b"ping"
            latencies.append(done - started)
            time.sleep(0.3)
        population = len(live)
        stop_replacing.set()
        runner.join(SLOW_DEADLINE + SLOW_SLACK + 15)
        assert not runner.is_alive(), "tricklers still open: %d" % len(live)
    finally:
        stop.set()
        stop_replacing.set()
        runner.join(5)
        for t in list(live.values()):
            t.sock.close()
        selector.close()

    lifetimes = [t.ended - t.opened for t in tricklers]
    ends = {}
    for t in tricklers:
        ends[t.end] = ends.get(t.end, 0) + 1
    print("\nslowloris: %d tricklers in all (%d open while the fresh "
          "clients ran), cut after %.2f..%.2f s (deadline %.1f s), ends %r"
          % (len(tricklers), population, min(lifetimes), max(lifetimes),
             SLOW_DEADLINE, ends))
    print("slowloris: fresh client handshake + CONNECT latency over %d "
          "tries: p50 %.1f ms, p99 %.1f ms, max %.1f ms" % (
              len(latencies), 1000 * percentile(latencies, 0.5),
              1000 * percentile(latencies, 0.99), 1000 * max(latencies)))
    assert population >= SLOW_CLIENTS * 0.9
    assert not [t for t in tricklers if t.received], \
        "a trickler got bytes: %r" % [t.received for t in tricklers
                                      if t.received][:3]
    assert set(ends) <= {"eof", "reset"}, ends
    early = [x for x in lifetimes if x < SLOW_DEADLINE - 0.1]
    late = [x for x in lifetimes if x > SLOW_DEADLINE + SLOW_SLACK]
    assert not early, "cut before the deadline: %r" % early[:5]
    assert not late, "cut after deadline + %.1f s: %r" % (SLOW_SLACK,
                                                          late[:5])
    assert wait_for(lambda: server.stats()["active"] == 0), server.stats()
    with socks5_connect(server.address, echo_server.port) as sock:
        sock.sendall(b"after")
        assert recv_exactly(sock, 5) == b"after"


# =============================================================================
# Descriptor exhaustion (torsocksd as a child process)
# =============================================================================

class Child:
    """torsocksd.py as a child process; stderr lines kept with the time."""

    def __init__(self, *args, preexec_fn=None):
        self.port = free_port()
        self.process = subprocess.Popen(
            [sys.executable, SCRIPT, "--port", str(self.port), *args],
            stderr=subprocess.PIPE, universal_newlines=True,
            preexec_fn=preexec_fn)
        self.lines = []
        self.listening = threading.Event()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        if not self.listening.wait(TIMEOUT):
            self.stop()
            raise AssertionError("torsocksd did not start: %r" % self.lines)
        self.address = ("127.0.0.1", self.port)

    def _read(self):
        for line in self.process.stderr:
            self.lines.append((time.monotonic(), line.rstrip("\n")))
            if " listening on " in line:
                self.listening.set()

    def cpu_seconds(self):
        with open("/proc/%d/stat" % self.process.pid) as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        return (int(fields[11]) + int(fields[12])) / ticks  # utime + stime

    def rss_kib(self):
        with open("/proc/%d/status" % self.process.pid) as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.reader.join(TIMEOUT)
        self.process.stderr.close()

    def logged_at(self, text):
        """Wall-clock times (from the log's own timestamps, to the
        millisecond) of the lines that contain text."""
        times = []
        for _, line in self.lines:
            if text in line:
                stamp, millis = line[:23].split(",")
                times.append(time.mktime(time.strptime(
                    stamp, "%Y-%m-%d %H:%M:%S")) + int(millis) / 1000)
        return times

    def problems(self):
        return [line for _, line in self.lines
                if "Traceback" in line or " ERROR " in line]


def limit_descriptors():
    # torsocksd raises its soft limit to the hard one: lower both.
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))


def test_descriptor_exhaustion_pauses_accepting_then_recovers(echo_server):
    """With 64 descriptors and 150 clients: accept failures are logged at
    most about once a second, the server stays near idle while paused, a
    request that needs a descriptor gets a general failure, and once the
    clients go a new client is served again."""
    child = Child("--max-connections", "1000", "--handshake-timeout", "60",
                  preexec_fn=limit_descriptors)
    clients = []
    try:
        for _ in range(150):
            sock = socket.create_connection(child.address, timeout=TIMEOUT)
            sock.sendall(b"\x05\x01\x00")
            clients.append(sock)
        # Which clients has the server accepted (answered their greeting)?
        time.sleep(1.5)
        answered = []
        for sock in clients:
            sock.setblocking(False)
            try:
                if sock.recv(2) == METHOD_NO_AUTH:
                    answered.append(sock)
            except BlockingIOError:
                pass
            sock.setblocking(True)
            sock.settimeout(TIMEOUT)
        assert 10 < len(answered) < len(clients), len(answered)

        # Paused: CPU and the rate of "accept failed" lines over ~2 s.
        window_start = time.time()
        cpu_start = child.cpu_seconds()
        time.sleep(2.0)
        cpu = child.cpu_seconds() - cpu_start
        window = time.time() - window_start
        time.sleep(0.1)         # the reader thread catches up
        failures = child.logged_at("accept failed")
        in_window = [when for when in failures
                     if window_start <= when <= window_start + window]
        print("\nfd exhaustion: %d of %d clients accepted under "
              "RLIMIT_NOFILE 64; paused CPU time %.3f s over %.2f s; "
              "%d 'accept failed' lines in all, %d in that window"
              % (len(answered), len(clients), cpu, window, len(failures),
                 len(in_window)))
        assert failures, "no accept failure logged: %r" % child.lines[-5:]
        gaps = [b - a for a, b in zip(failures, failures[1:])]
        assert all(gap >= 0.9 for gap in gaps), gaps
        assert len(in_window) <= window + 1
        assert cpu < 0.25 * window, "busy while paused: %.3f s" % cpu

        # A request that needs a descriptor now: a general failure, at once.
        sock = answered.pop()
        sock.sendall(b"\x05\x01\x00\x01\x7f\x00\x00\x01"
                     + echo_server.port.to_bytes(2, "big"))
        reply = recv_exactly(sock, 10)
        print("fd exhaustion: CONNECT with no descriptor left -> %s"
              % reply.hex())
        assert reply == b"\x05\x01\x00\x01" + bytes(6)
        assert recv_until_eof(sock) == b""
        sock.close()
    finally:
        for sock in clients:
            sock.close()
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socks5_connect(child.address, echo_server.port,
                                    timeout=3) as sock:
                    sock.sendall(b"back")
                    assert recv_exactly(sock, 4) == b"back"
                break
            except (OSError, AssertionError, EOFError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        print("fd exhaustion: served again %.2f s after the clients left"
              % (10 - (deadline - time.monotonic())))
    finally:
        child.stop()
    assert not child.problems(), child.problems()[:5]


# =============================================================================
# Backpressure (torsocksd as a child process)
# =============================================================================

SLOW_PHASE = 3.0            # seconds the reader takes 1 KiB every 10 ms
PUSH_BYTES = 64 << 20       # what the fast side tries to push


def pattern(size, seed):
    if not size:
        return b""
    return random.Random(seed).getrandbits(8 * size).to_bytes(size, "little")


@pytest.mark.parametrize("direction", ["upstream", "downstream"])
def test_backpressure_bounds_buffers_then_delivers_everything(make_peer,
                                                              direction):
    """A fast sender through torsocksd into a reader that takes 1 KiB every
    ~10 ms: torsocksd's RSS stays bounded; then the reader speeds up and
    every byte arrives, in order."""
    payload = pattern(PUSH_BYTES, direction)
    expected = hashlib.sha256(payload).hexdigest()
    slow_until = []         # when the slow phase ends (set by the reader)
    progress = {"sent": 0, "read": 0, "read_when_slow_ended": 0,
                "sent_when_slow_ended": 0}
    result = {}

    def slow_then_fast_reader(sock):
        digest = hashlib.sha256()
        started = time.monotonic()
        sock.settimeout(TIMEOUT)
        while time.monotonic() - started < SLOW_PHASE:
            data = sock.recv(1024)
            if not data:
                break
            digest.update(data)
            progress["read"] += len(data)
            time.sleep(0.01)
        progress["read_when_slow_ended"] = progress["read"]
        progress["sent_when_slow_ended"] = progress["sent"]
        slow_until.append(time.monotonic())
        hash_until_eof(sock, digest, progress, "read")
        result["digest"] = digest.hexdigest()
        result["bytes"] = progress["read"]

    def fast_sender(sock):
        view = memoryview(payload)
        for offset in range(0, len(view), 1 << 16):
            sock.sendall(view[offset:offset + (1 << 16)])
            progress["sent"] += len(view[offset:offset + (1 << 16)])
        sock.shutdown(socket.SHUT_WR)

    def target(sock):
        if direction == "upstream":
            slow_then_fast_reader(sock)
        else:
            fast_sender(sock)
            recv_until_eof(sock)

    peer = make_peer(target)
    child = Child()
    samples = []
    sampling = threading.Event()

    def sample():
        while not sampling.is_set():
            try:
                samples.append((time.monotonic(), child.rss_kib()))
            except (OSError, AssertionError, ValueError):
                return      # the child is gone
            time.sleep(0.02)

    try:
        baseline = child.rss_kib()
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        with socks5_connect(child.address, peer.port, timeout=30) as sock:
            if direction == "upstream":
                fast_sender(sock)
                assert recv_until_eof(sock) == b""
            else:
                sock.shutdown(socket.SHUT_WR)
                slow_then_fast_reader(sock)
        assert wait_for(lambda: "digest" in result, 30)
        sampling.set()
        sampler.join()
    finally:
        sampling.set()
        child.stop()
    slow_end = slow_until[0]
    slow_peak = max(rss for when, rss in samples if when <= slow_end)
    peak = max(rss for _, rss in samples)
    in_flight = progress["sent_when_slow_ended"] \
        - progress["read_when_slow_ended"]
    print("\nbackpressure %s: RSS baseline %.1f MiB, peak %.1f MiB while "
          "slow (+%.1f), %.1f MiB overall; during the %.0f s slow phase "
          "%.2f MiB read, %.2f MiB sent (%.2f MiB in kernel buffers and "
          "torsocksd); %d MiB in all"
          % (direction, baseline / 1024, slow_peak / 1024,
             (slow_peak - baseline) / 1024, peak / 1024, SLOW_PHASE,
             progress["read_when_slow_ended"] / (1 << 20),
             progress["sent_when_slow_ended"] / (1 << 20),
             in_flight / (1 << 20), PUSH_BYTES >> 20))
    assert result["bytes"] == PUSH_BYTES
    assert result["digest"] == expected
    # The fast side was held back (not all 64 MiB swallowed by the proxy)...
    assert progress["sent_when_slow_ended"] < PUSH_BYTES // 2
    # ...and torsocksd buffered a bounded amount: its relay keeps at most
    # HIGH_WATER per direction plus one receive buffer; 16 MiB is generous.
    assert slow_peak - baseline < 16 * 1024, \
        "RSS grew by %.1f MiB" % ((slow_peak - baseline) / 1024)
    assert not child.problems(), child.problems()[:5]


# =============================================================================
# Half-close, resets and integrity
# =============================================================================

SCENARIOS = ["client-fin-first", "target-fin-first", "both-at-once",
             "client-rst", "target-rst"]


def chunked_send(sock, data, rng, stop_after=None):
    """Send data in random chunks (1 B .. 64 KiB) with small random pauses;
    stop after stop_after bytes if given.  Returns the bytes sent."""
    position = 0
    limit = len(data) if stop_after is None else min(stop_after, len(data))
    while position < limit:
        size = min(limit - position, rng.choice((1, 7, 512, 4096, 65536,
                                                 rng.randrange(1, 65536))))
        sock.sendall(data[position:position + size])
        position += size
        if rng.random() < 0.05:
            time.sleep(rng.random() * 0.005)
    return position


def send_then_shut(sock, data, rng, errors, key):
    try:
        chunked_send(sock, data, rng)
        sock.shutdown(socket.SHUT_WR)
    except OSError as error:
        errors[key] = repr(error)


def read_all(sock):
    """(bytes, how it ended: "eof", "reset", or the error)."""
    chunks = []
    try:
        while True:
            data = sock.recv(1 << 17)
            if not data:
                return b"".join(chunks), "eof"
            chunks.append(data)
    except ConnectionResetError:
        return b"".join(chunks), "reset"
    except OSError as error:
        return b"".join(chunks), repr(error)


def run_scenario(server, make_peer, kind, seed):
    """One tunnel through server; returns a list of problems."""
    rng = random.Random("%s-%d" % (kind, seed))
    up = pattern(rng.choice((0, 1, 1000, rng.randrange(1, 1 << 20))),
                 "up-%s-%d" % (kind, seed))
    down = pattern(rng.choice((0, 1, 1000, rng.randrange(1, 1 << 20))),
                   "down-%s-%d" % (kind, seed))
    seen = {}
    problems = []
    target_done = threading.Event()

    def target(sock):
        trng = random.Random("target-%s-%d" % (kind, seed))
        try:
            if kind == "client-fin-first":
                seen["up"] = read_all(sock)     # the client's FIN first
                chunked_send(sock, down, trng)
                sock.shutdown(socket.SHUT_WR)
            elif kind == "target-fin-first":
                chunked_send(sock, down, trng)
                sock.shutdown(socket.SHUT_WR)
                seen["up"] = read_all(sock)
            elif kind == "both-at-once":
                sender = threading.Thread(
                    target=send_then_shut, args=(sock, down, trng, seen,
                                                 "target_error"))
                sender.start()
                seen["up"] = read_all(sock)
                sender.join(TIMEOUT)
            elif kind == "client-rst":
                seen["up"] = read_all(sock)
                seen["up_end_at"] = time.monotonic()
            else:   # target-rst: some bytes, then a reset
                chunked_send(sock, down, trng, stop_after=len(down) // 2)
                time.sleep(0.05)
                seen["rst_at"] = time.monotonic()
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                RST_LINGER)
        except OSError as error:
            seen["target_error"] = repr(error)
        finally:
            target_done.set()

    peer = make_peer(target)
    with socks5_connect(server.address, peer.port) as sock:
        if kind == "client-fin-first":
            chunked_send(sock, up, rng)
            sock.shutdown(socket.SHUT_WR)
            got, end = read_all(sock)
        elif kind == "target-fin-first":
            got, end = read_all(sock)           # the target's FIN first
            chunked_send(sock, up, rng)
            sock.shutdown(socket.SHUT_WR)
            rest, end = read_all(sock)
            got += rest
        elif kind == "both-at-once":
            sender = threading.Thread(
                target=send_then_shut, args=(sock, up, rng, seen,
                                             "client_error"))
            sender.start()
            got, end = read_all(sock)
            sender.join(TIMEOUT)
        elif kind == "client-rst":
            chunked_send(sock, up, rng, stop_after=len(up) // 2)
            time.sleep(0.05)
            rst_at = time.monotonic()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RST_LINGER)
            got, end = b"", "client reset"
        else:
            got, end = read_all(sock)
            got_end_at = time.monotonic()
    if not target_done.wait(TIMEOUT):
        return ["%s seed %d: the target never finished" % (kind, seed)]
    where = "%s seed %d (up %d B, down %d B)" % (kind, seed, len(up),
                                                 len(down))
    for key in ("target_error", "client_error"):
        if key in seen:
            problems.append("%s: %s %s" % (where, key, seen[key]))
    if kind in ("client-fin-first", "target-fin-first", "both-at-once"):
        if end != "eof":
            problems.append("%s: the client's read ended with %s" % (where,
                                                                     end))
        if seen.get("up", (None, None))[1] != "eof":
            problems.append("%s: the target's read ended with %s"
                            % (where, seen.get("up", (None, None))[1]))
        if hashlib.sha256(got).digest() != hashlib.sha256(down).digest():
            problems.append("%s: client got %d of %d bytes, hash differs"
                            % (where, len(got), len(down)))
        target_got = seen.get("up", (b"", None))[0]
        if hashlib.sha256(target_got).digest() != \
                hashlib.sha256(up).digest():
            problems.append("%s: target got %d of %d bytes, hash differs"
                            % (where, len(target_got), len(up)))
    elif kind == "client-rst":
        target_got, target_end = seen["up"]
        if target_end not in ("eof", "reset"):
            problems.append("%s: the target's read ended with %s"
                            % (where, target_end))
        if seen["up_end_at"] - rst_at > 5.0:
            problems.append("%s: the target saw the end %.1f s after the "
                            "client's reset" % (where,
                                                seen["up_end_at"] - rst_at))
        if up[:len(target_got)] != target_got:
            problems.append("%s: the target's bytes are not a prefix of "
                            "what the client sent" % where)
    else:
        if end not in ("eof", "reset"):
            problems.append("%s: the client's read ended with %s"
                            % (where, end))
        if got_end_at - seen["rst_at"] > 5.0:
            problems.append("%s: the client saw the end %.1f s after the "
                            "target's reset" % (where,
                                                got_end_at - seen["rst_at"]))
        if down[:len(got)] != got:
            problems.append("%s: the client's bytes are not a prefix of "
                            "what the target sent" % where)
    return problems


@each_relay_mode
def test_half_close_reset_and_integrity(make_server, make_peer, relay_mode,
                                        log_problems):
    """Random-sized chunks with small random pauses both ways; FIN from
    either side first or both at once (every byte arrives, hashes match);
    RST from either side (the other side sees a reset or EOF within 5 s);
    no connection left behind."""
    server = make_server()
    seeds = range(FUZZ_SEED % 1000, FUZZ_SEED % 1000 + 8)
    jobs = [(kind, seed) for kind in SCENARIOS for seed in seeds]
    problems = []
    lock = threading.Lock()

    def worker(batch):
        for kind, seed in batch:
            try:
                found = run_scenario(server, make_peer, kind, seed)
            except Exception as error:      # a failure, reported below
                found = ["%s seed %d: %r" % (kind, seed, error)]
            with lock:
                problems.extend(found)

    started = time.monotonic()
    threads = [threading.Thread(target=worker, args=(jobs[i::6],))
               for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    print("\nhalf-close/reset (%s relay): %d scenarios in %.1f s, seeds "
          "%d..%d" % (relay_mode, len(jobs), time.monotonic() - started,
                      seeds[0], seeds[-1]))
    assert not [t for t in threads if t.is_alive()], "scenarios hang"
    assert not problems, problems
    assert wait_for(lambda: server.stats()["active"] == 0), server.stats()


@pytest.mark.parametrize("resetting", ["client", "target"])
def test_reset_while_the_other_side_is_stalled_is_noticed(make_server,
                                                         make_peer, resetting,
                                                         log_problems):
    """One side fills the tunnel towards a peer that has stopped reading,
    then resets: the server must notice at once (drop the connection and
    pass the reset on), not only when the stalled peer reads again."""
    server = make_server()
    release = threading.Event()
    seen = {}

    def fill_then_reset(sock):
        sock.setblocking(False)
        sent = 0
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:      # until the tunnel is full
            try:
                sent += sock.send(bytes(1 << 16))
            except BlockingIOError:
                time.sleep(0.2)
                try:
                    sent += sock.send(bytes(1 << 16))
                except BlockingIOError:
                    break
        seen["sent"] = sent
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RST_LINGER)
        sock.close()

    def stalled(sock):
        release.wait(20)
        sock.settimeout(TIMEOUT)
        seen["end"] = read_all(sock)[1]

    def target(sock):
        if resetting == "target":
            fill_then_reset(sock)
            seen["reset"] = time.monotonic()
        else:
            stalled(sock)

    peer = make_peer(target)
    client = socks5_connect(server.address, peer.port)
    try:
        if resetting == "client":
            fill_then_reset(client)
            seen["reset"] = time.monotonic()
        else:
            assert wait_for(lambda: "reset" in seen, 10)
        noticed = wait_for(lambda: server.stats()["active"] == 0, 5.0)
        waited = time.monotonic() - seen["reset"]
        release.set()
        if resetting == "target":
            stalled(client)
    finally:
        release.set()
        client.close()
    print("\n%s reset while the other side is stalled: %.1f MiB in the "
          "tunnel; connection dropped %s; the stalled side then saw %s"
          % (resetting, seen["sent"] / (1 << 20),
             "within %.1f s" % waited if noticed else "only after it read "
             "again (not within 5 s)",
             wait_for(lambda: "end" in seen) and seen["end"]))
    assert noticed, "%s reset not noticed in 5 s while the other side is " \
        "stalled: %r" % (resetting, server.stats())
    assert seen["end"] in ("eof", "reset")


# =============================================================================
# Policy
# =============================================================================

@pytest.mark.parametrize("first_bytes", [b"", b"\x05\x01\x00",
                                         b"\x04\x01\x00\x50\x7f\0\0\x01\0",
                                         b"GET / HTTP/1.0\r\n\r\n"])
def test_client_outside_client_policy_gets_no_byte(make_server, first_bytes,
                                                   log_problems):
    server = make_server(
        client_policy=torsocksd.ClientPolicy([(False, "127.0.0.0/8")]))
    with connect(server) as sock:
        if first_bytes:
            try:
                sock.sendall(first_bytes)
            except (BrokenPipeError, ConnectionResetError):
                pass
        data, end = read_all(sock)
    assert data == b""
    assert end in ("eof", "reset")
    assert wait_for(lambda: server.stats()["refused_at_accept"] == 1)
    assert server.stats()["active"] == 0


@pytest.mark.parametrize("username, password", [
    (b"alice", b"wrong"), (b"bob", b"secret"), (b"alice", b""),
    (b"", b""), (b"alice", b"secre"), (b"alice", b"secret1"),
    (b"alice\x00", b"secret"), (b"ALICE", b"secret"), (b"x" * 255, b"y" * 255),
    (b"secret", b"alice"),
])
def test_bad_credentials_get_01_01_and_close(make_server, username, password,
                                             log_problems):
    server = make_server(
        credentials=torsocksd.Credentials([(b"alice", b"secret")]))
    with connect(server) as sock:
        sock.sendall(b"\x05\x01\x02")
        assert recv_exactly(sock, 2) == b"\x05\x02"
        sock.sendall(bytes((1, len(username))) + username
                     + bytes((len(password),)) + password
                     + b"\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x50")
        assert recv_until_eof(sock) == b"\x01\x01"
    assert wait_for(lambda: server.stats()["active"] == 0)


def test_right_credentials_still_work(make_server, echo_server, log_problems):
    server = make_server(
        credentials=torsocksd.Credentials([(b"alice", b"secret")]))
    with connect(server) as sock:
        sock.sendall(b"\x05\x01\x02\x01\x05alice\x06secret"
                     b"\x05\x01\x00\x01\x7f\x00\x00\x01"
                     + echo_server.port.to_bytes(2, "big") + b"ping")
        assert recv_exactly(sock, 4 + 10 + 4) == \
            b"\x05\x02\x01\x00" + SOCKS5_OK + b"ping"


def test_remote_client_cannot_reach_loopback_in_a_network_namespace():
    """In a loopback-only network namespace with the test host address
    192.0.2.1: a client bound to 192.0.2.1 gets 02 for every loopback (and
    unspecified, link-local, multicast) destination, and reaches 192.0.2.1
    itself (tests/peers/remote_client_policy.py)."""
    run_peer_checks("remote_client_policy.py")

