#!/usr/bin/env python3
"""Throughput, handshake rate, latency and memory of torsocksd next to a
direct loopback connection and the SOCKS servers found on this machine.

    python3 bench/bench.py [--quick] [--install-peers] [--json FILE]

Columns: direct (no proxy), torsocksd with --workers 1 and --workers 2 (and
--splice when torsocksd has it), microsocks and Dante's danted when they are
installed (--install-peers runs apt-get for them first).

Rows:
  bulk          MB/s (10^6 bytes) of one stream and of 8 streams at once, each
                way: "up" is client -> target, "down" target -> client.  Every
                transfer is checked: exact byte count, and a CRC-32 of a
                sample (64 KiB of every 8 MiB, and the last 64 KiB).
  handshakes    per second at 1, 16 and 64 concurrent clients, with p50/p99
                latency.  One handshake: TCP connect to the proxy, SOCKS5
                greeting 05 01 00, wait for 05 00, CONNECT to 127.0.0.1:echo,
                wait for the 10-byte reply, one byte echoed through the
                tunnel, close.  "direct" is the same minus SOCKS.
  ping-pong     round-trip time of 1 byte each way through one tunnel.
  memory        RSS (VmRSS, summed over the proxy's processes) and PSS of the
                proxy at 1,000 idle relayed connections and at as many as the
                file descriptor limit allows (2 per connection in the proxy),
                as KiB per connection over the baseline of a fresh proxy.

How: the targets (bulk source/sink and echo, one selectors loop) and the load
generator (selectors-driven clients: C concurrent handshake state machines in
one process) run in their own processes, pinned to one core; the proxy under
test is pinned to the other core with taskset (workers 2: both cores).  The
load sends from memory in chunks of up to 4 MiB and receives with MSG_TRUNC
outside the sampled ranges (the kernel discards those bytes without copying
them), so it does about half the work of a relaying proxy per byte: the
"direct" column shows what the load side can do on its core.  Figures are
medians of a few repetitions, run in turn over all columns.

Exit status: 0, or 1 when a proxied transfer was wrong (byte count, sampled
CRC, a wrong SOCKS reply or echo), a torsocksd handshake failed, or a proxy
could not be started; 130 on Ctrl-C.  Every child process is killed at the
end.  Standard library only; Linux; loopback only; not collected by pytest.
"""

import collections
import ctypes
import datetime
import errno
import json
import multiprocessing
import os
import platform
import random
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import zlib

from common import (LOCALHOST, TICKS, TORSOCKSD, argument_parser,
                    closing_lines, connect_request, cpu_model, cpu_seconds,
                    free_port, log_tail, proc_kib, process_tree,
                    receive_exactly, run_main, stop_process_group)

# -- the byte stream ----------------------------------------------------------
# A pseudo-random block of an odd size, repeated: a chunk that is lost,
# doubled or moved changes the sampled CRC.  DOUBLE holds it twice so that any
# run of up to len(PATTERN) bytes from any offset is one contiguous slice.
PATTERN = random.Random(20240601).randbytes(4 * 1024 * 1024 + 7)
PATTERN_SIZE = len(PATTERN)
DOUBLE = memoryview(PATTERN + PATTERN)
CHUNK = 4 * 1024 * 1024                 # largest send
RECV_BUFFER = 4 * 1024 * 1024           # largest receive
SAMPLE_EVERY = 8 * 1024 * 1024          # a sampled window starts every 8 MiB
SAMPLE_SIZE = 64 * 1024                 # and is this long (and the last one)
SEND_BUFFER = 4 * 1024 * 1024           # SO_SNDBUF of the bulk senders
# Linux TCP discards the bytes of a recv with MSG_TRUNC instead of copying.
TRUNC = getattr(socket, "MSG_TRUNC", 0) if sys.platform.startswith("linux") \
    else 0
HEADER_SIZE = 9                         # mode byte + 8-byte size
TRAILER_SIZE = 12                       # 8-byte count + 4-byte CRC
READS_PER_EVENT = 8

CLIENT_ADDRESS = "127.0.0.2"            # where handshake clients come from
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
BULK_TIMEOUT = 120.0                    # seconds for one bulk transfer
STEP_TIMEOUT = 10.0                     # seconds for one handshake, and
                                        # without progress in a transfer
ANSWER_TIMEOUT = 300.0                  # seconds for a helper to answer
DISTURBED = 0.15    # a run during which other processes took more than this
                    # share of a core is done again (--retries times at most)


def sample_windows(size):
    """Sorted, disjoint [start, end) ranges of a size-byte stream that are
    checked: SAMPLE_SIZE bytes at every SAMPLE_EVERY, and the last ones."""
    windows = []
    for start in range(0, size, SAMPLE_EVERY):
        windows.append([start, min(start + SAMPLE_SIZE, size)])
    if size:
        last = max(0, size - SAMPLE_SIZE)
        if windows[-1][1] >= last:
            windows[-1][1] = size
        else:
            windows.append([last, size])
    return [tuple(window) for window in windows]


def expected_crc(size, _cache={}):
    if size not in _cache:
        crc = 0
        for start, end in sample_windows(size):
            offset = start % PATTERN_SIZE
            crc = zlib.crc32(DOUBLE[offset:offset + end - start], crc)
        _cache[size] = crc
    return _cache[size]


class Sampler:
    """Follows a received stream: says how much the next recv may take and
    whether it must be copied (inside a sampled window), and keeps the CRC
    of the windows."""
    __slots__ = ("windows", "index", "offset", "crc")

    def __init__(self, size):
        self.windows = sample_windows(size)
        self.index = 0
        self.offset = 0
        self.crc = 0

    def receive(self, sock, buffer, view):
        """One recv_into from sock; returns its size (0 at EOF)."""
        if self.index < len(self.windows):
            start, end = self.windows[self.index]
            if self.offset < start:
                limit, copy = start - self.offset, False
            else:
                limit, copy = end - self.offset, True
        else:
            limit, copy = RECV_BUFFER, False    # past the end: just count
        size = sock.recv_into(buffer, min(limit, RECV_BUFFER),
                              0 if copy else TRUNC)
        if copy and size:
            self.crc = zlib.crc32(view[:size], self.crc)
        self.offset += size
        if self.index < len(self.windows) \
                and self.offset >= self.windows[self.index][1]:
            self.index += 1
        return size


def send_pattern(sock, offset, left):
    """One non-blocking send of the stream from offset; returns its size."""
    start = offset % PATTERN_SIZE
    return sock.send(DOUBLE[start:start + min(left, CHUNK)])


# -- helper processes: common set-up ------------------------------------------

def set_parent_death_signal():
    """Linux: get SIGKILL when the parent dies (PR_SET_PDEATHSIG)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def raise_file_limit():
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard
    except (ImportError, OSError, ValueError):
        return None


def file_limit():
    try:
        import resource
        return resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    except (ImportError, OSError, ValueError):
        return 1024


def child_setup(cpus):
    set_parent_death_signal()
    raise_file_limit()
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # the parent cleans up
    if cpus and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cpus)


# -- the targets: bulk source/sink and echo, one selectors loop ---------------

class EchoConnection:
    """Echoes what it gets.  once: close after the first echo, so that the
    TIME_WAIT of the connection stays on this side (the handshake test)."""
    __slots__ = ("sock", "selector", "out", "events", "once", "registry")

    def __init__(self, sock, selector, once, registry):
        self.sock = sock
        self.selector = selector
        self.out = bytearray()
        self.events = selectors.EVENT_READ
        self.once = once
        self.registry = registry
        registry.add(self)
        selector.register(sock, self.events, self)

    def on_event(self, mask):
        try:
            if mask & selectors.EVENT_WRITE and self.out:
                del self.out[:self.sock.send(self.out)]
            if mask & selectors.EVENT_READ:
                data = self.sock.recv(65536)
                if not data:
                    self.close()
                    return
                if self.out:
                    self.out += data
                else:
                    sent = self.sock.send(data)
                    self.out += data[sent:]
            if self.once and not self.out:
                self.close()
                return
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self.close()
            return
        events = selectors.EVENT_WRITE if len(self.out) > 1 << 20 else \
            selectors.EVENT_READ | (selectors.EVENT_WRITE if self.out else 0)
        if events != self.events:
            self.selector.modify(self.sock, events, self)
            self.events = events

    def close(self):
        if self in self.registry:
            self.registry.discard(self)
            self.selector.unregister(self.sock)
            self.sock.close()


class BulkConnection:
    """Reads a 9-byte header: b"U" + size (receive size bytes, answer with
    count and sampled CRC) or b"D" + size (send size bytes, close)."""
    __slots__ = ("sock", "selector", "target", "header", "mode", "size",
                 "sampler", "count", "offset")

    def __init__(self, sock, selector, target):
        self.sock = sock
        self.selector = selector
        self.target = target
        self.header = b""
        self.mode = None
        self.count = 0
        self.offset = 0
        selector.register(sock, selectors.EVENT_READ, self)

    def on_event(self, mask):
        try:
            if self.mode is None:
                data = self.sock.recv(HEADER_SIZE - len(self.header))
                if not data:
                    self.close()
                    return
                self.header += data
                if len(self.header) < HEADER_SIZE:
                    return
                self.mode = self.header[:1]
                self.size = int.from_bytes(self.header[1:], "big")
                if self.mode == b"U":
                    self.sampler = Sampler(self.size)
                elif self.mode == b"D":
                    self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF,
                                         SEND_BUFFER)
                    self.selector.modify(self.sock, selectors.EVENT_WRITE,
                                         self)
                else:
                    self.close()
                return
            if self.mode == b"U":
                self._receive()
            elif self.mode == b"D":
                self._send()
            else:       # b"E": answered, waiting for EOF
                if not self.sock.recv_into(self.target.buffer, RECV_BUFFER,
                                           TRUNC):
                    self.close()
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self.close()

    def _receive(self):
        target = self.target
        for _ in range(READS_PER_EVENT):
            size = self.sampler.receive(self.sock, target.buffer, target.view)
            if not size:
                self.close()        # EOF before the end: no trailer
                return
            self.count += size
            if self.count >= self.size:
                self.sock.send(self.count.to_bytes(8, "big")
                               + self.sampler.crc.to_bytes(4, "big"))
                self.mode = b"E"
                return

    def _send(self):
        for _ in range(READS_PER_EVENT):
            left = self.size - self.offset
            if not left:
                self.close()
                return
            self.offset += send_pattern(self.sock, self.offset, left)

    def close(self):
        self.selector.unregister(self.sock)
        self.sock.close()


class Targets:
    """Listeners: "bulk" (BulkConnection), "echo" (echoes until EOF) and
    "echo1" (echoes once, then closes)."""

    def __init__(self, listeners):
        self.selector = selectors.DefaultSelector()
        self.buffer = bytearray(RECV_BUFFER)
        self.view = memoryview(self.buffer)
        self.echoes = set()
        for kind, listener in listeners.items():
            listener.setblocking(False)
            self.selector.register(listener, selectors.EVENT_READ,
                                   _Acceptor(self, listener, kind))

    def serve(self, control, parent):
        self.selector.register(control.fileno(), selectors.EVENT_READ, None)
        while os.getppid() == parent:
            for key, mask in self.selector.select(1.0):
                if key.data is None:
                    try:
                        message = control.recv()
                    except EOFError:
                        return
                    if message == "stop":
                        return
                    if message == "close-echo":
                        # the target closes first: the TIME_WAIT stays here
                        for echo in list(self.echoes):
                            echo.close()
                    control.send("done")
                else:
                    key.data.on_event(mask)


class _Acceptor:
    def __init__(self, targets, listener, kind):
        self.targets = targets
        self.listener = listener
        self.kind = kind

    def on_event(self, mask):
        for _ in range(256):
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:     # EMFILE and the like: the client sees a reset
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.kind.startswith("echo"):
                EchoConnection(sock, self.targets.selector,
                               self.kind == "echo1", self.targets.echoes)
            else:
                BulkConnection(sock, self.targets.selector, self.targets)


def target_main(listeners, control, cpus, parent):
    child_setup(cpus)
    Targets(listeners).serve(control, parent)


# -- the load generator -------------------------------------------------------

class WrongAnswer(Exception):
    """The proxy answered with bytes it should not have sent."""


class Refused(ConnectionError):
    """A well-formed SOCKS5 failure reply."""


def check_socks_reply(reply):
    if reply[:1] == b"\x05" and reply[1] and reply[2:3] == b"\x00":
        raise Refused("SOCKS5 reply %02x" % reply[1])
    if reply[:3] != b"\x05\x00\x00" or reply[3] != 1:
        raise WrongAnswer("SOCKS reply %s" % reply.hex())


def open_tunnel(proxy_port, target_port, timeout=STEP_TIMEOUT):
    """A blocking socket to 127.0.0.1:target_port, through the SOCKS5 proxy
    at proxy_port (None: directly)."""
    if proxy_port is None:
        sock = socket.create_connection((LOCALHOST, target_port), timeout)
    else:
        sock = socket.create_connection((LOCALHOST, proxy_port), timeout)
        try:
            sock.sendall(b"\x05\x01\x00")
            greeting = receive_exactly(sock, 2)
            if greeting != b"\x05\x00":
                raise WrongAnswer("SOCKS greeting reply %s" % greeting.hex())
            sock.sendall(connect_request(target_port))
            check_socks_reply(receive_exactly(sock, 10))
        except BaseException:
            sock.close()
            raise
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


class Load:
    """Runs in its own process; answers commands from the parent."""

    def __init__(self, ports):
        self.bulk_port = ports["bulk"]
        self.echo_port = ports["echo"]
        self.echo1_port = ports["echo1"]
        self.buffer = bytearray(RECV_BUFFER)
        self.view = memoryview(self.buffer)
        self.idle = []

    # bulk ------------------------------------------------------------------

    def bulk(self, proxy_port, mode, streams, size):
        """streams transfers of size bytes each, at once; MB/s overall."""
        errors = []
        socks = []
        try:
            for _ in range(streams):
                socks.append(open_tunnel(proxy_port, self.bulk_port))
        except (OSError, WrongAnswer) as error:
            for sock in socks:
                sock.close()
            return {"errors": ["tunnel: %s" % error],
                    "wrong": isinstance(error, WrongAnswer)}
        selector = selectors.DefaultSelector()
        state = {}
        started = time.perf_counter()
        header = (b"U" if mode == "up" else b"D") + size.to_bytes(8, "big")
        for sock in socks:
            sock.setblocking(False)
            sock.send(header)
            if mode == "up":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF,
                                SEND_BUFFER)
                state[sock] = {"offset": 0, "trailer": b""}
                selector.register(sock, selectors.EVENT_WRITE)
            else:
                state[sock] = {"sampler": Sampler(size), "count": 0}
                selector.register(sock, selectors.EVENT_READ)
        deadline = started + BULK_TIMEOUT
        finished = progress = started
        wrong = False
        try:
            while state and time.perf_counter() < deadline:
                events = selector.select(1.0)
                now = time.perf_counter()
                if events:
                    progress = now
                elif now - progress > STEP_TIMEOUT:
                    errors.append("%s: stalled for %.0f s (bytes lost?)" % (
                        mode, STEP_TIMEOUT))
                    wrong = True
                    break
                for key, mask in events:
                    sock = key.fileobj
                    entry = state[sock]
                    try:
                        done = (self._bulk_up if mode == "up" else
                                self._bulk_down)(sock, entry, size, selector)
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError as error:
                        errors.append("%s: %s" % (mode, error))
                        done = True
                    if done:
                        if entry.get("error"):
                            errors.append(entry["error"])
                            wrong |= entry.get("wrong", False)
                        selector.unregister(sock)
                        del state[sock]
                        finished = time.perf_counter()
            if state:
                errors.append("%d of %d streams unfinished" % (len(state),
                                                               streams))
        finally:
            selector.close()
            for sock in socks:
                sock.close()
        elapsed = finished - started
        return {"errors": errors, "wrong": wrong, "seconds": elapsed,
                "mbps": streams * size / elapsed / 1e6 if elapsed else 0.0}

    def _bulk_up(self, sock, entry, size, selector):
        if entry["offset"] < size:
            for _ in range(READS_PER_EVENT):
                left = size - entry["offset"]
                entry["offset"] += send_pattern(sock, entry["offset"], left)
                if entry["offset"] == size:
                    selector.modify(sock, selectors.EVENT_READ)
                    break
            return False
        data = sock.recv(TRAILER_SIZE - len(entry["trailer"]))
        if not data:
            entry["error"] = "up: closed before the target's answer"
            return True
        entry["trailer"] += data
        if len(entry["trailer"]) < TRAILER_SIZE:
            return False
        count = int.from_bytes(entry["trailer"][:8], "big")
        crc = int.from_bytes(entry["trailer"][8:], "big")
        if count != size or crc != expected_crc(size):
            entry["error"] = ("up: target received %d bytes (sent %d), "
                              "sampled CRC %08x (expected %08x)"
                              % (count, size, crc, expected_crc(size)))
            entry["wrong"] = True
        return True

    def _bulk_down(self, sock, entry, size, selector):
        sampler = entry["sampler"]
        for _ in range(READS_PER_EVENT):
            received = sampler.receive(sock, self.buffer, self.view)
            if not received:
                if entry["count"] != size or sampler.crc != expected_crc(size):
                    entry["error"] = ("down: received %d bytes (sent %d), "
                                      "sampled CRC %08x (expected %08x)"
                                      % (entry["count"], size, sampler.crc,
                                         expected_crc(size)))
                    entry["wrong"] = True
                return True
            entry["count"] += received
        return False

    # handshakes --------------------------------------------------------------

    def handshakes(self, proxy_port, concurrency, seconds, limit, keep=False):
        """Handshake state machines, concurrency at a time, for seconds or
        limit handshakes.  keep: leave the tunnels open (idle connections)."""
        machine = Handshakes(proxy_port,
                             self.echo_port if keep else self.echo1_port,
                             concurrency, seconds, limit,
                             self.idle if keep else None)
        return machine.run()

    def close_idle(self):
        """Close the idle connections once the targets have closed theirs
        (so that no TIME_WAIT is left on a port of 127.0.0.1)."""
        selector = selectors.DefaultSelector()
        for sock in self.idle:
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ)
        open_ = len(self.idle)
        deadline = time.monotonic() + 10
        try:
            while open_ and time.monotonic() < deadline:
                for key, mask in selector.select(0.5):
                    try:
                        if key.fileobj.recv(64):
                            continue
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError:
                        pass
                    selector.unregister(key.fileobj)
                    key.fileobj.close()
                    open_ -= 1
        finally:
            selector.close()
            count = len(self.idle)
            for sock in self.idle:
                sock.close()
            self.idle = []
        return {"closed": count, "without_eof": open_}

    # ping-pong ---------------------------------------------------------------

    def pingpong(self, proxy_port, rounds):
        try:
            sock = open_tunnel(proxy_port, self.echo_port)
        except (OSError, WrongAnswer) as error:
            return {"errors": ["tunnel: %s" % error],
                    "wrong": isinstance(error, WrongAnswer)}
        sock.settimeout(STEP_TIMEOUT)
        times = []
        clock = time.perf_counter_ns
        try:
            for number in range(rounds + rounds // 10):     # 10% warm-up
                byte = bytes((number % 251 + 1,))
                before = clock()
                sock.send(byte)
                answer = sock.recv(1)
                times.append(clock() - before)
                if answer != byte:
                    return {"errors": ["echo %r for %r" % (answer, byte)],
                            "wrong": bool(answer)}
        except OSError as error:
            return {"errors": ["ping-pong: %s" % error], "wrong": False}
        finally:
            sock.close()
        return {"errors": [], "wrong": False,
                "rtt_us": [t / 1000 for t in times[rounds // 10:]]}


CONNECTING, GREETED, REQUESTED, ECHOING = range(4)


class Handshakes:
    """C concurrent clients in one selectors loop, each a small state
    machine; each finished one starts the next."""

    def __init__(self, proxy_port, echo_port, concurrency, seconds, limit,
                 keep):
        self.address = (LOCALHOST, proxy_port or echo_port)
        self.socks = proxy_port is not None
        self.request = connect_request(echo_port)
        self.concurrency = concurrency
        self.seconds = seconds
        self.limit = limit
        self.keep = keep
        self.selector = selectors.DefaultSelector()
        self.clients = {}       # sock -> [phase, started, received, byte]
        self.latencies = []
        self.errors = collections.Counter()
        self.wrong = 0
        self.started = 0

    def run(self):
        begin = time.perf_counter()
        self.stop_at = begin + self.seconds
        last = begin
        next_sweep = begin + 0.5
        try:
            while self.clients or self._may_start():
                while len(self.clients) < self.concurrency \
                        and self._may_start():
                    self._start()
                if not self.clients:
                    break
                for key, mask in self.selector.select(0.2):
                    if self._step(key.fileobj, key.data):
                        last = time.perf_counter()
                now = time.perf_counter()
                if now >= next_sweep:
                    next_sweep = now + 0.5
                    for sock, entry in list(self.clients.items()):
                        if now - entry[1] > STEP_TIMEOUT:
                            self._fail(sock, "timed out")
                    if now > self.stop_at + 2 * STEP_TIMEOUT:
                        for sock in list(self.clients):
                            self._fail(sock, "timed out")
        finally:
            for sock in list(self.clients):
                self._drop(sock)
            self.selector.close()
        elapsed = last - begin
        return {"done": len(self.latencies), "seconds": elapsed,
                "rate": len(self.latencies) / elapsed if elapsed else 0.0,
                "latencies_ms": [x * 1000 for x in self.latencies],
                "errors": dict(self.errors), "wrong": self.wrong}

    def _may_start(self):
        return self.started < self.limit \
            and time.perf_counter() < self.stop_at

    def _start(self):
        self.started += 1
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        entry = [CONNECTING, time.perf_counter(), b"",
                 bytes((self.started % 251 + 1,))]
        try:
            # From another loopback address: the TIME_WAIT of these many
            # short connections must not fill the ports of 127.0.0.1, which
            # a proxy that binds before connecting (danted) needs.
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((CLIENT_ADDRESS, 0))
        except OSError as error:
            sock.close()
            self.errors["bind: %s" % error] += 1
            return
        code = sock.connect_ex(self.address)
        if code not in (0, errno.EINPROGRESS):
            sock.close()
            self.errors[errno.errorcode.get(code, str(code))] += 1
            return
        self.clients[sock] = entry
        self.selector.register(sock, selectors.EVENT_WRITE, entry)

    def _step(self, sock, entry):
        """Advance one client; True when its handshake is complete."""
        try:
            if entry[0] == CONNECTING:
                code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if code:
                    self._fail(sock, errno.errorcode.get(code, str(code)))
                    return False
                if self.socks:
                    sock.send(b"\x05\x01\x00")
                    entry[0] = GREETED
                else:
                    sock.send(entry[3])
                    entry[0] = ECHOING
                self.selector.modify(sock, selectors.EVENT_READ, entry)
                return False
            data = sock.recv(64)
            if not data:
                self._fail(sock, "closed by the proxy")
                return False
            entry[2] += data
            received = entry[2]
            if entry[0] == GREETED:
                if len(received) < 2:
                    return False
                if received != b"\x05\x00":
                    self._fail(sock, "greeting reply %s" % received.hex(),
                               wrong=True)
                    return False
                entry[0], entry[2] = REQUESTED, b""
                sock.send(self.request)
            elif entry[0] == REQUESTED:
                if len(received) < 10:
                    return False
                try:
                    if len(received) != 10:
                        raise WrongAnswer("SOCKS reply %s" % received.hex())
                    check_socks_reply(received)
                except WrongAnswer as error:
                    self._fail(sock, str(error), wrong=True)
                    return False
                entry[0], entry[2] = ECHOING, b""
                sock.send(entry[3])
            else:
                if received != entry[3]:
                    self._fail(sock, "echo %s for %s" % (
                        received.hex(), entry[3].hex()), wrong=True)
                    return False
                self.latencies.append(time.perf_counter() - entry[1])
                if self.keep is not None:
                    self.selector.unregister(sock)
                    del self.clients[sock]
                    self.keep.append(sock)
                else:
                    self._drop(sock)
                return True
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as error:
            self._fail(sock, errno.errorcode.get(error.errno, str(error)))
        return False

    def _fail(self, sock, why, wrong=False):
        self.errors[why[:60]] += 1
        self.wrong += wrong
        self._drop(sock)

    def _drop(self, sock):
        if self.clients.pop(sock, None) is not None:
            self.selector.unregister(sock)
        sock.close()


def load_main(control, ports, cpus, parent):
    child_setup(cpus)
    load = Load(ports)
    while os.getppid() == parent:
        if not control.poll(1.0):
            continue
        try:
            command, arguments = control.recv()
        except EOFError:
            return
        if command == "stop":
            return
        try:
            answer = getattr(load, command)(**arguments)
        except Exception as error:      # reported, the parent decides
            answer = {"errors": ["load: %r" % error], "wrong": False}
        control.send(answer)


# -- processes seen from /proc ------------------------------------------------

def memory_kib(pids):
    """(sum of VmRSS, sum of Pss, number of processes) in KiB."""
    rss = pss = count = 0
    for pid in pids:
        resident = proc_kib(pid, "status", "VmRSS")
        if resident is None:
            continue
        rss += resident
        count += 1
        pss += proc_kib(pid, "smaps_rollup", "Pss") or 0
    return rss, pss, count


def machine_cpu():
    """(user+nice+system, steal) seconds of all CPUs, from /proc/stat."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(x) for x in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return 0.0, 0.0
    steal = fields[7] if len(fields) > 7 else 0
    return (fields[0] + fields[1] + fields[2]) / TICKS, steal / TICKS


def machine_busy(seconds):
    """Share of all CPUs busy (user, nice, system) over the next seconds."""
    def sample():
        try:
            with open("/proc/stat") as stat:
                fields = [int(x) for x in stat.readline().split()[1:]]
        except (OSError, ValueError):
            return 0, 1
        return fields[0] + fields[1] + fields[2], sum(fields[:8])
    first = sample()
    time.sleep(seconds)
    second = sample()
    return (second[0] - first[0]) / max(1, second[1] - first[1])


# -- the proxies --------------------------------------------------------------

class StartError(Exception):
    pass


class Proxy:
    """One proxy under test, in its own session (so that the whole group
    can be ended), pinned with taskset."""

    def __init__(self, name, kind, workdir, cpus, workers=1, extra=()):
        self.name = name
        self.kind = kind
        self.workdir = workdir
        self.cpus = cpus
        self.workers = workers
        self.extra = list(extra)
        self.process = None
        self.port = None
        self.log_path = None
        self.runs = 0

    def argv(self):
        port = str(self.port)
        if self.kind == "torsocksd":
            # As many connections as the descriptors allow when they are
            # idle (two each): the default budgets three for each.
            argv = [sys.executable, TORSOCKSD, "--port", port,
                    "--log-level", "warning",
                    "--max-connections", str(max(1000, file_limit() // 2))]
            if self.workers != 1 or HAS_WORKERS:
                argv += ["--workers", str(self.workers)]
            return argv + self.extra
        if self.kind == "microsocks":
            return [shutil.which("microsocks"), "-i", LOCALHOST, "-p", port]
        if self.kind == "danted":
            config = os.path.join(self.workdir, "danted-%d.conf" % self.runs)
            with open(config, "w") as out:
                out.write(DANTED_CONFIG % {"port": port})
            os.chmod(config, 0o644)
            rundir = os.path.join(self.workdir, "run")
            os.makedirs(rundir, exist_ok=True)
            os.chmod(rundir, 0o777)     # danted runs as nobody
            return [find_danted(), "-f", config,
                    "-p", os.path.join(rundir, "danted-%d.pid" % self.port)]
        raise ValueError(self.kind)

    def start(self, check_port):
        self.runs += 1
        self.port = free_port()
        argv = self.argv()
        if self.cpus and TASKSET:
            argv = [TASKSET, "-c", ",".join(map(str, sorted(self.cpus)))] \
                + argv
        self.log_path = os.path.join(self.workdir, "%s-%d.log" % (
            self.name.replace(" ", "-"), self.runs))
        unprivileged = self.kind == "danted" and os.geteuid() == 0
        cpus = self.cpus if not TASKSET else None

        def prepare():
            raise_file_limit()
            if cpus:
                os.sched_setaffinity(0, cpus)
            if unprivileged:
                os.setgroups([])
                os.setgid(NOBODY[1])
                os.setuid(NOBODY[0])
            set_parent_death_signal()   # after setuid, which clears it

        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL if self.kind == "microsocks"
                else log,
                stderr=subprocess.DEVNULL if self.kind == "microsocks"
                else log,
                start_new_session=True, preexec_fn=prepare)
        deadline = time.monotonic() + 15
        while True:
            if self.process.poll() is not None:
                raise StartError("%s exited with status %s: %s" % (
                    self.name, self.process.returncode, self.log_tail()))
            try:
                sock = open_tunnel(self.port, check_port, timeout=2)
                sock.sendall(b"!")
                sock.settimeout(2)
                if sock.recv(1) != b"!":
                    raise StartError("%s: no echo through the tunnel"
                                     % self.name)
                sock.close()
                if len(self.pids()) > self.workers or self.workers == 1:
                    return self
            except (OSError, WrongAnswer) as error:
                if time.monotonic() > deadline:
                    raise StartError("%s did not answer on port %d: %s %s" % (
                        self.name, self.port, error, self.log_tail()))
            time.sleep(0.05)

    def log_tail(self):
        return log_tail(self.log_path)

    def pids(self):
        return process_tree(self.process.pid) if self.process else []

    def stop(self):
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        stop_process_group(process, term_wait=3.0)


DANTED_CONFIG = """\
# minimal: loopback clients, loopback destinations, no authentication
logoutput: stderr
internal: 127.0.0.1 port = %(port)s
external: 127.0.0.1
clientmethod: none
socksmethod: none
client pass {
    from: 127.0.0.0/8 to: 127.0.0.0/8
}
socks pass {
    from: 127.0.0.0/8 to: 127.0.0.0/8
    command: connect
}
"""


def find_danted():
    return shutil.which("danted") or next(
        (path for path in ("/usr/sbin/danted", "/usr/local/sbin/danted")
         if os.access(path, os.X_OK)), None)


def nobody_ids():
    try:
        import pwd
        entry = pwd.getpwnam("nobody")
        return entry.pw_uid, entry.pw_gid
    except (ImportError, KeyError):
        return 65534, 65534


NOBODY = nobody_ids()
TASKSET = shutil.which("taskset")
HAS_WORKERS = False
HAS_SPLICE = False


def torsocksd_help():
    try:
        return subprocess.run([sys.executable, TORSOCKSD, "--help"],
                              capture_output=True, text=True,
                              timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def command_output(argv):
    try:
        result = subprocess.run(argv, capture_output=True, text=True,
                                timeout=30)
        return (result.stdout + result.stderr).strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def package_version(name):
    if not shutil.which("dpkg-query"):
        return ""
    return command_output(["dpkg-query", "-W", "-f", "${Version}", name])


def install_peers():
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    argv = ["apt-get", "install", "-y", "-q", "microsocks", "dante-server"]
    print("bench: %s" % " ".join(argv), file=sys.stderr)
    if subprocess.run(argv, env=env, stdout=subprocess.DEVNULL).returncode:
        subprocess.run(["apt-get", "update", "-q"], env=env,
                       stdout=subprocess.DEVNULL)
        subprocess.run(argv, env=env, stdout=subprocess.DEVNULL)


# -- the run ------------------------------------------------------------------

class Bench:
    def __init__(self, options):
        self.options = options
        self.quick = options.quick
        self.reps = options.reps or (1 if self.quick else 3)
        self.failed = []            # why the exit status is 1
        self.notes = []
        # column -> row -> value
        self.results = collections.defaultdict(dict)
        # column -> test -> [proxy CPU s, load side CPU s, wall s]
        self.cpu = collections.defaultdict(dict)
        self.others = [0.0, 0.0, 0.0]   # CPU s of other processes, steal, wall
        self.retries = (0 if self.quick else 2) if options.retries is None \
            else options.retries
        self.reruns = 0
        self.helpers = []
        self.proxies = []
        self.workdir = tempfile.mkdtemp(prefix="torsocksd-bench-")
        os.chmod(self.workdir, 0o755)
        self.begin = time.monotonic()
        cpus = sorted(os.sched_getaffinity(0)) \
            if hasattr(os, "sched_getaffinity") else []
        if len(cpus) >= 2:
            self.load_cpus = {cpus[0]}
            self.proxy_cpus = {cpus[1]}
            self.both_cpus = {cpus[0], cpus[1]}
        else:
            self.load_cpus = self.proxy_cpus = self.both_cpus = None

    def progress(self, text):
        print("[%5.1fs] %s" % (time.monotonic() - self.begin, text),
              file=sys.stderr, flush=True)

    # helper processes -------------------------------------------------------

    def start_helpers(self):
        context = multiprocessing.get_context("fork")
        listeners = {kind: socket.create_server((LOCALHOST, 0), backlog=4096)
                     for kind in ("bulk", "echo", "echo1")}
        ports = {kind: listener.getsockname()[1]
                 for kind, listener in listeners.items()}
        self.bulk_port = ports["bulk"]
        self.echo_port = ports["echo"]
        self.target_control, theirs = context.Pipe()
        self.target = context.Process(
            target=target_main, name="bench-targets", daemon=True,
            args=(listeners, theirs, self.load_cpus, os.getpid()))
        self.target.start()
        self.helpers.append(self.target)
        for listener in listeners.values():
            listener.close()
        self.load_control, theirs = context.Pipe()
        self.load = context.Process(
            target=load_main, name="bench-load", daemon=True,
            args=(theirs, ports, self.load_cpus, os.getpid()))
        self.load.start()
        self.helpers.append(self.load)
        if self.load_cpus and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, self.load_cpus)     # this one mostly waits

    def ask(self, command, **arguments):
        self.load_control.send((command, arguments))
        if not self.load_control.poll(ANSWER_TIMEOUT):
            raise RuntimeError("the load process did not answer %s in %.0f s"
                               % (command, ANSWER_TIMEOUT))
        return self.load_control.recv()

    def tell_targets(self, message):
        self.target_control.send(message)
        if not self.target_control.poll(ANSWER_TIMEOUT):
            raise RuntimeError("the targets did not answer %s" % message)
        return self.target_control.recv()

    def measured(self, column, test, command, **arguments):
        """ask(), and the CPU the proxy and the load side used meanwhile."""
        proxy = column["proxy"]
        load_pids = [self.load.pid, self.target.pid, os.getpid()]
        for attempt in range(1 + self.retries):
            proxy_pids = proxy.pids() if proxy else []
            machine = machine_cpu()
            before = (cpu_seconds(proxy_pids, reaped=True),
                      cpu_seconds(load_pids), time.perf_counter())
            answer = self.ask(command, **arguments)
            wall = time.perf_counter() - before[2]
            if proxy:
                proxy_pids = proxy.pids()   # danted forks and reaps
            used = (cpu_seconds(proxy_pids, reaped=True) - before[0],
                    cpu_seconds(load_pids) - before[1])
            # what the rest of the machine did meanwhile: other processes
            # disturb the figures, so such a run is done again
            after = machine_cpu()
            others = max(0.0, after[0] - machine[0] - sum(used))
            if test == "warm-up":
                return answer
            if others / wall < DISTURBED or answer.get("errors"):
                break       # errors are kept, never run away from
            if attempt < self.retries:
                self.reruns += 1
                self.progress("  again: other processes took %.0f%% of a "
                              "core" % (100 * others / wall))
                time.sleep(0.5)
        totals = self.cpu[column["name"]].setdefault(test, [0.0, 0.0, 0.0])
        totals[0] += used[0]
        totals[1] += used[1]
        totals[2] += wall
        self.others[0] += others
        self.others[1] += after[1] - machine[1]
        self.others[2] += wall
        return answer

    def stop_all(self):
        for proxy in self.proxies:
            try:
                proxy.stop()
            except Exception:
                pass
        for control in ("load_control", "target_control"):
            try:
                getattr(self, control).send(("stop", {}) if control ==
                                            "load_control" else "stop")
            except (AttributeError, OSError):
                pass
        for process in self.helpers:
            process.join(2)
            if process.is_alive():
                process.kill()
                process.join(2)
        shutil.rmtree(self.workdir, ignore_errors=True)

    # columns -----------------------------------------------------------------

    def columns(self):
        wanted = set(self.options.only.split(",")) if self.options.only \
            else None
        columns = [{"name": "direct", "kind": None}]
        columns.append({"name": "torsocksd w1", "kind": "torsocksd",
                        "workers": 1})
        if HAS_WORKERS and self.both_cpus:
            columns.append({"name": "torsocksd w2", "kind": "torsocksd",
                            "workers": 2})
        elif not HAS_WORKERS:
            self.notes.append("torsocksd has no --workers option: no w2 "
                              "column")
        if HAS_SPLICE and not self.options.no_splice:
            columns.append({"name": "tsd w1 splice", "kind": "torsocksd",
                            "workers": 1, "extra": ["--splice"]})
        if not self.options.no_peers:
            if shutil.which("microsocks"):
                columns.append({"name": "microsocks", "kind": "microsocks"})
            else:
                self.notes.append("microsocks not installed "
                                  "(--install-peers)")
            if find_danted():
                columns.append({"name": "danted", "kind": "danted"})
            else:
                self.notes.append("danted not installed (--install-peers)")
        if wanted:
            columns = [c for c in columns if c["name"] in wanted
                       or c["name"].replace(" ", "-") in wanted
                       or (c["kind"] or "direct") in wanted]
        for column in columns:
            column["proxy"] = None
            column["dead"] = False
        return columns

    def new_proxy(self, column):
        cpus = self.both_cpus if column.get("workers", 1) > 1 \
            else self.proxy_cpus
        proxy = Proxy(column["name"], column["kind"], self.workdir, cpus,
                      column.get("workers", 1), column.get("extra", ()))
        self.proxies.append(proxy)
        try:
            return proxy.start(self.echo_port)
        except StartError as error:
            proxy.stop()
            self.fail(column, "could not start: %s" % error)
            return None

    def fail(self, column, why):
        self.failed.append("%s: %s" % (column["name"], why))
        self.progress("FAILED %s: %s" % (column["name"], why))

    def port_of(self, column):
        return column["proxy"].port if column["proxy"] else None

    def check(self, column, what, answer):
        """Record errors of one answer; True when it may be used."""
        errors = answer.get("errors") or {}
        if not errors:
            return True
        wrong = answer.get("wrong")
        text = "%s: %s" % (what, errors if isinstance(errors, dict)
                           else "; ".join(errors[:3]))
        if wrong or column["kind"] == "torsocksd":
            self.fail(column, text)
        else:
            self.notes.append("%s %s" % (column["name"], text))
        if "mbps" in answer:
            return False    # a bulk figure counts only when all was right
        return "rate" in answer or "rtt_us" in answer

    # measurements ------------------------------------------------------------

    def run(self):
        columns = self.columns()
        self.column_names = [c["name"] for c in columns]
        for column in columns:
            if column["kind"]:
                column["proxy"] = self.new_proxy(column)
                column["dead"] = column["proxy"] is None
        live = [c for c in columns if not c["dead"]]
        tests = self.options.tests.split(",")
        if "bulk" in tests:
            self.run_bulk(live)
        if "handshakes" in tests:
            self.run_handshakes(live)
        if "pingpong" in tests:
            self.run_pingpong(live)
        for column in live:
            if column["proxy"]:
                column["proxy"].stop()
                column["proxy"] = None
        if "memory" in tests:
            self.run_memory([c for c in live if c["kind"]])

    def run_bulk(self, columns):
        tests = [(streams, mode) for streams in (1, 8)
                 for mode in ("up", "down")]
        sizes = {}
        target_seconds = 0.3 if self.quick else 1.5
        for column in columns:
            for streams, mode in tests:
                # a first, short transfer: warm-up, and tells the size that
                # takes about target_seconds
                per_stream = (64 if self.quick else 256) * 2**20 // streams
                answer = self.measured(column, "warm-up", "bulk",
                                       proxy_port=self.port_of(column),
                                       mode=mode, streams=streams,
                                       size=per_stream)
                rate = answer.get("mbps", 0) if self.check(
                    column, "bulk %s x%d" % (mode, streams), answer) else 0
                total = rate * 1e6 * target_seconds
                low, high = (64 if self.quick else 256) * 2**20, \
                    (1024 if self.quick else 8192) * 2**20
                total = min(max(total, low), high)
                sizes[column["name"], streams, mode] = \
                    max(1, int(total / streams / 2**20)) * 2**20
        rates = collections.defaultdict(list)
        for rep in range(self.reps):
            for streams, mode in tests:
                for column in columns:
                    size = sizes[column["name"], streams, mode]
                    self.progress("bulk %s x%d, %s, %d MiB each (%d/%d)" % (
                        mode, streams, column["name"], size >> 20, rep + 1,
                        self.reps))
                    answer = self.measured(
                        column, "bulk %s x%d" % (mode, streams), "bulk",
                        proxy_port=self.port_of(column), mode=mode,
                        streams=streams, size=size)
                    if self.check(column, "bulk %s x%d" % (mode, streams),
                                  answer):
                        rates[column["name"], streams, mode].append(
                            answer["mbps"])
        for (name, streams, mode), values in rates.items():
            self.results[name]["bulk %s x%d" % (mode, streams)] = \
                statistics.median(values)
            self.results[name]["bulk %s x%d size" % (mode, streams)] = \
                sizes[name, streams, mode] * streams

    def run_handshakes(self, columns):
        seconds = 0.5 if self.quick else 2.0
        for column in columns:      # warm-up
            self.ask("handshakes", proxy_port=self.port_of(column),
                     concurrency=4, seconds=0.2, limit=2000)
        gathered = collections.defaultdict(lambda: {"rates": [], "lat": [],
                                                    "errors": 0})
        for rep in range(self.reps):
            for concurrency in (1, 16, 64):
                for column in columns:
                    self.progress("handshakes c=%d, %s (%d/%d)" % (
                        concurrency, column["name"], rep + 1, self.reps))
                    answer = self.measured(
                        column, "handshakes c=%d" % concurrency,
                        "handshakes", proxy_port=self.port_of(column),
                        concurrency=concurrency, seconds=seconds,
                        limit=200000)
                    entry = gathered[column["name"], concurrency]
                    entry["errors"] += sum(answer.get("errors", {}).values())
                    if self.check(column, "handshakes c=%d" % concurrency,
                                  answer):
                        entry["rates"].append(answer["rate"])
                        entry["lat"].extend(answer["latencies_ms"])
                    time.sleep(0.2)
        for (name, concurrency), entry in gathered.items():
            row = self.results[name]
            if entry["rates"]:
                row["hs c=%d" % concurrency] = statistics.median(
                    entry["rates"])
            if entry["lat"]:
                row["hs c=%d p50" % concurrency] = percentile(entry["lat"], 50)
                row["hs c=%d p99" % concurrency] = percentile(entry["lat"], 99)
            row["hs c=%d errors" % concurrency] = entry["errors"]

    def run_pingpong(self, columns):
        rounds = 1000 if self.quick else 5000
        times = collections.defaultdict(list)
        for rep in range(self.reps):
            for column in columns:
                self.progress("ping-pong, %s (%d/%d)" % (
                    column["name"], rep + 1, self.reps))
                answer = self.measured(column, "ping-pong", "pingpong",
                                       proxy_port=self.port_of(column),
                                       rounds=rounds)
                if self.check(column, "ping-pong", answer):
                    times[column["name"]].extend(answer["rtt_us"])
        for name, values in times.items():
            self.results[name]["rtt p50"] = percentile(values, 50)
            self.results[name]["rtt p99"] = percentile(values, 99)

    def run_memory(self, columns):
        limit = file_limit()
        most = self.options.max_idle \
            or max(1000, (limit - 100) // 2 // 50 * 50)
        steps = [1000] if self.quick else [1000, most]
        self.idle_steps = steps
        for column in columns:
            proxy = self.new_proxy(column)      # fresh: no bulk buffers
            if proxy is None:
                continue
            column["proxy"] = proxy
            try:
                self.ask("handshakes", proxy_port=proxy.port, concurrency=8,
                         seconds=5, limit=64)
                time.sleep(0.5)
                base = memory_kib(proxy.pids())
                row = self.results[column["name"]]
                row["rss base"] = base[0]
                row["pss base"] = base[1]
                row["procs base"] = base[2]
                opened = 0
                for step in steps:
                    self.progress("memory at %d idle connections, %s" % (
                        step, column["name"]))
                    answer = self.ask("handshakes", proxy_port=proxy.port,
                                      concurrency=64, seconds=180,
                                      limit=step - opened, keep=True)
                    opened += answer.get("done", 0)
                    if answer.get("wrong"):
                        self.check(column, "idle connections", answer)
                    elif answer.get("errors"):
                        self.notes.append(
                            "%s: %d of %d idle connections opened (%s)" % (
                                column["name"], opened, step,
                                ", ".join("%s x%d" % item for item in
                                          answer["errors"].items())))
                    time.sleep(1.0)
                    now = memory_kib(proxy.pids())
                    if opened:
                        row["rss %d" % step] = (now[0] - base[0]) / opened
                        row["pss %d" % step] = (now[1] - base[1]) / opened
                    row["opened %d" % step] = opened
                    row["procs %d" % step] = now[2]
                    if opened < step:
                        break
            finally:
                self.tell_targets("close-echo")
                self.ask("close_idle")
                proxy.stop()
                column["proxy"] = None

    # the report --------------------------------------------------------------

    def report(self):
        names = self.column_names
        width = 14
        out = []

        def line(label, cells):
            out.append("%-30s" % label + "".join("%*s" % (width, cell)
                                                 for cell in cells))

        def cell(name, key, fmt):
            value = self.results.get(name, {}).get(key)
            return "-" if value is None else fmt % value

        line("", names)
        rows = []
        for streams in (1, 8):
            for mode in ("up", "down"):
                label = "bulk %s, %d stream%s MB/s" % (
                    mode, streams, "s" if streams > 1 else "")
                rows.append((label, "bulk %s x%d" % (mode, streams), "%.0f",
                             True))
        for concurrency in (1, 16, 64):
            rows.append(("handshakes/s, c=%d" % concurrency,
                         "hs c=%d" % concurrency, "%.0f", True))
            rows.append(("  latency p50 ms", "hs c=%d p50" % concurrency,
                         "%.3f", False))
            rows.append(("  latency p99 ms", "hs c=%d p99" % concurrency,
                         "%.3f", False))
        rows.append(("ping-pong RTT p50 us", "rtt p50", "%.1f", False))
        rows.append(("ping-pong RTT p99 us", "rtt p99", "%.1f", False))
        rows.append(("RSS baseline KiB (fresh)", "rss base", "%.0f", None))
        rows.append(("  processes", "procs base", "%d", None))
        for step in getattr(self, "idle_steps", []):
            rows.append(("RSS KiB/conn, %d idle" % step, "rss %d" % step,
                         "%.1f", False))
            rows.append(("PSS KiB/conn, %d idle" % step, "pss %d" % step,
                         "%.1f", False))
            rows.append(("  connections reached", "opened %d" % step, "%d",
                         None))
            rows.append(("  processes", "procs %d" % step, "%d", None))
        for label, key, fmt, _ in rows:
            cells = [cell(name, key, fmt) for name in names]
            if any(c != "-" for c in cells):
                line(label, cells)
        if any("hs c=1 errors" in self.results.get(name, {})
               for name in names):
            line("handshake errors", ["%d" % sum(
                self.results.get(name, {}).get("hs c=%d errors" % c, 0)
                for c in (1, 16, 64)) for name in names])

        out.append("")
        out.append("CPU during the run, % of one core (proxy / load+targets):")
        for test in ("bulk up x1", "bulk down x1", "bulk up x8",
                     "bulk down x8", "handshakes c=1", "handshakes c=16",
                     "handshakes c=64", "ping-pong"):
            cells = []
            for name in names:
                value = self.cpu.get(name, {}).get(test)
                if value is None or not value[2]:
                    cells.append("-")
                else:
                    cells.append("%s / %.0f" % (
                        "-" if name == "direct" else
                        "%.0f" % (100 * value[0] / value[2]),
                        100 * value[1] / value[2]))
            if any(c != "-" for c in cells):
                line("  " + test, cells)

        others = [n for n in ("direct", "microsocks", "danted") if n in names]
        pairs = [(a, b) for a in ("torsocksd w1", "torsocksd w2")
                 for b in others if a in names]
        pairs += [(a, "torsocksd w1") for a in ("torsocksd w2",
                                                "tsd w1 splice")
                  if a in names and "torsocksd w1" in names]
        if pairs:
            out.append("")
            out.append("Ratios, torsocksd / other (rates: above 1 means "
                       "torsocksd is faster; latency and memory: below 1 "
                       "means torsocksd is better):")
            short = {"torsocksd w1": "w1", "torsocksd w2": "w2",
                     "tsd w1 splice": "splice", "direct": "direct",
                     "microsocks": "micro", "danted": "danted"}
            ratio_width = 12
            header = "%-30s" % "" + "".join(
                "%*s" % (ratio_width, "%s/%s" % (short.get(a, a),
                                                 short.get(b, b)))
                for a, b in pairs)
            out.append(header)
            for label, key, fmt, higher in rows:
                if higher is None:
                    continue
                cells = []
                for a, b in pairs:
                    x = self.results.get(a, {}).get(key)
                    y = self.results.get(b, {}).get(key)
                    cells.append(format_ratio(x / y) if x is not None and y
                                 else "-")
                if any(c != "-" for c in cells):
                    out.append("%-30s" % label + "".join(
                        "%*s" % (ratio_width, c) for c in cells))

        # the load is not the bottleneck: direct against the best proxy,
        # and the CPU the load side used while a proxy was measured
        checks = []
        for label, key, fmt, higher in rows:
            if not higher:
                continue
            direct = self.results.get("direct", {}).get(key)
            proxied = [(self.results.get(n, {}).get(key), n) for n in names
                       if n != "direct"]
            proxied = [p for p in proxied if p[0]]
            if direct and proxied:
                best = max(proxied)
                test = key.replace("hs ", "handshakes ")
                busy = [n for n in names if n != "direct" and self.cpu.get(
                    n, {}).get(test, (0, 0, 0))[2] and 100 * self.cpu[n][
                        test][1] / self.cpu[n][test][2] >= 90]
                checks.append((label, direct / best[0], best[1], busy))
        if checks:
            out.append("")
            out.append("Load check: direct / fastest proxy, i.e. how much "
                       "more the load side did with no proxy in the way:")
            for label, factor, best, busy in checks:
                flag = "" if factor >= 1.5 else "  <- under 1.5"
                if busy:
                    flag += "  load side >= 90%% CPU with %s: a lower " \
                            "bound there" % ", ".join(busy)
                out.append("  %-28s %5.1fx (fastest: %s)%s" % (
                    label, factor, best, flag))

        return out


def format_ratio(ratio):
    if ratio >= 10:
        return "%.1f" % ratio
    if ratio >= 0.1:
        return "%.2f" % ratio
    return "%.2g" % ratio


def percentile(values, percent):
    ordered = sorted(values)
    if not ordered:
        return None
    index = min(len(ordered) - 1,
                max(0, int(round(percent / 100 * len(ordered) + 0.5)) - 1))
    return ordered[index]


def describe_machine(bench):
    lines = []
    now = datetime.datetime.now().astimezone()
    lines.append("torsocksd benchmark, %s%s" % (
        now.strftime("%Y-%m-%d %H:%M %Z"), " (--quick)" if bench.quick
        else ""))
    model = cpu_model()
    lines.append("machine: %d cores (nproc) %s, Python %s, %s %s" % (
        os.cpu_count() or 0, ("(%s)" % model) if model else "",
        platform.python_version(), platform.system(), platform.release()))
    version = command_output([sys.executable, TORSOCKSD, "--version"])
    commit = command_output(["git", "-C", os.path.dirname(TORSOCKSD),
                             "describe", "--always", "--dirty"])
    lines.append("torsocksd: %s%s; microsocks %s; dante-server %s" % (
        version or "?", (" (git %s)" % commit) if commit and
        "fatal" not in commit else "",
        package_version("microsocks") or "-",
        package_version("dante-server") or "-"))
    if bench.proxy_cpus:
        how = "taskset -c" if TASKSET else "sched_setaffinity"
        lines.append(
            "pinning: proxy on CPU %s (%s %s; workers 2: %s), load generator "
            "and targets on CPU %s" % (
                min(bench.proxy_cpus), how, min(bench.proxy_cpus),
                ",".join(map(str, sorted(bench.both_cpus))),
                min(bench.load_cpus)))
    else:
        lines.append("pinning: none (fewer than 2 CPUs)")
    lines.append("method: medians of %d run(s); bulk sized to ~%s s per run; "
                 "handshakes %s s per run; %d ping-pongs per run; "
                 "MB = 10^6 bytes" % (
                     bench.reps, "0.3" if bench.quick else "1.5",
                     "0.5" if bench.quick else "2", 1000 if bench.quick
                     else 5000))
    lines.append("load: sends from memory, receives with %s outside the "
                 "sampled 64 KiB of each 8 MiB; fd limit %d (%d idle "
                 "connections max)" % (
                     "MSG_TRUNC" if TRUNC else "copies",
                     file_limit(), max(1000, (file_limit() - 100) // 2
                                       // 50 * 50)))
    return lines


def main():
    global HAS_WORKERS, HAS_SPLICE
    parser = argument_parser(__doc__)
    parser.add_argument("--quick", action="store_true",
                        help="under a minute: small sizes, one run each, "
                        "memory at 1,000 connections only")
    parser.add_argument("--install-peers", action="store_true",
                        help="apt-get install microsocks dante-server first")
    parser.add_argument("--no-peers", action="store_true",
                        help="leave out microsocks and danted")
    parser.add_argument("--no-splice", action="store_true",
                        help="leave out the torsocksd --splice column")
    parser.add_argument("--only", metavar="COLUMNS",
                        help="comma-separated columns (direct, torsocksd-w1, "
                        "torsocksd-w2, tsd-w1-splice, microsocks, danted)")
    parser.add_argument("--tests", default="bulk,handshakes,pingpong,memory",
                        help="comma-separated subset of %(default)s")
    parser.add_argument("--reps", type=int, help="runs per figure "
                        "(default 3, --quick 1)")
    parser.add_argument("--max-idle", type=int,
                        help="idle connections for the second memory figure "
                        "(default: what the fd limit allows)")
    parser.add_argument("--time-limit", type=float,
                        help="give up after this many seconds (default 1200, "
                        "--quick 120)")
    parser.add_argument("--retries", type=int, metavar="N",
                        help="runs disturbed by other processes (over 15%% "
                        "of a core) are done again up to N times "
                        "(default 2, --quick 0)")
    parser.add_argument("--wait-quiet", type=float, default=0, metavar="S",
                        help="first wait up to S seconds for the machine to "
                        "be under 10%% busy")
    parser.add_argument("--json", metavar="FILE",
                        help="also write the figures to FILE")
    options = parser.parse_args()
    if not sys.platform.startswith("linux"):
        parser.error("Linux only (reads /proc)")
    if options.install_peers:
        install_peers()

    help_text = torsocksd_help()
    if "--port" not in help_text:
        print("bench: %s --help failed" % TORSOCKSD, file=sys.stderr)
        return 1
    HAS_WORKERS = "--workers" in help_text
    HAS_SPLICE = "--splice" in help_text
    raise_file_limit()
    bench = Bench(options)

    def run():
        if options.wait_quiet:
            deadline = time.monotonic() + options.wait_quiet
            while True:
                busy = machine_busy(3.0)
                if busy < 0.1 or time.monotonic() > deadline:
                    break
                bench.progress("the machine is %.0f%% busy: waiting"
                               % (100 * busy))
            bench.begin = time.monotonic()
        signal.alarm(int(options.time_limit
                         or (120 if options.quick else 1200)))
        bench.start_helpers()
        bench.run()
        signal.alarm(0)
        lines = describe_machine(bench)
        lines.append("")
        lines.extend(bench.report())
        others, steal, wall = bench.others
        if wall:
            lines.append("")
            lines.append(
                "other processes on the machine used %.0f%% of a core on "
                "average while the figures kept were taken (steal: %.0f%%; "
                "%d disturbed run(s) done again)%s" % (
                    100 * others / wall, 100 * steal / wall, bench.reruns,
                    "" if others / wall < 0.1 else
                    ": the figures are disturbed, run again on a quiet "
                    "machine"))
        lines.extend(closing_lines(bench.notes, bench.failed,
                                   time.monotonic() - bench.begin))
        print("\n".join(lines))
        if options.json:
            with open(options.json, "w") as out:
                json.dump({"results": bench.results,
                           "cpu": bench.cpu, "notes": bench.notes,
                           "failed": bench.failed,
                           "header": describe_machine(bench)}, out,
                          indent=1, sort_keys=True)
        return 1 if bench.failed else 0

    return run_main("bench", run, bench.stop_all)


if __name__ == "__main__":
    sys.exit(main())
