"""A real tor client on loopback, for tests that compare torsocksd with it.

TorClient writes a torrc for a client with a SocksPort and/or an
HTTPTunnelPort on 127.0.0.1 in a fresh temporary data directory, starts
Debian's tor with it, waits until every port accepts connections, tells
their port numbers, and stops tor again:

    with TorClient(socks=True, http_tunnel=True) as tor:
        tor.socks_address          # ("127.0.0.1", port)
        tor.http_tunnel_address
        tor.log()                  # the notice log so far

Run it only inside a network namespace that has nothing but loopback
(`unshare -n`, then `ip link set lo up`): tor then cannot reach anything.
Its one directory authority is a dummy at 127.0.0.1:2, where nothing
listens, so tor never even tries the public authorities and never builds a
circuit: a request that needs one waits.  Every other option keeps tor's
default, so its answers are those of a stock client.
"""

import os
import re
import select
import shutil
import socket
import subprocess
import tempfile
import time
from typing import NamedTuple

START_TIMEOUT = 30.0    # seconds for tor to open its ports (usually < 1 s)
STOP_TIMEOUT = 10.0

# A directory authority at a loopback port where nothing listens (see the
# module docstring).  The fingerprints are placeholders; tor never gets far
# enough to check them.
DUMMY_AUTHORITY = (
    "DirAuthority dummyauth orport=1 no-v2 "
    "v3ident=0000000000000000000000000000000000000000 127.0.0.1:2 "
    "0000000000000000000000000000000000000000")

# tor logs this once a listener is open; "auto" ports learn their number here.
LISTENER_OPENED = re.compile(
    r"Opened (Socks|HTTP tunnel) listener connection \(ready\) on "
    r"127\.0\.0\.1:(\d+)")
TOR_VERSION = re.compile(r"\bTor (\d+\.\d+\.\d+\.\d+\S*) (?:opening|running)")


def find_program(name):
    """The path of a program, also looked for in /usr/sbin and /sbin (where
    Debian puts tor and ip), or None."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def client_torrc(data_directory, socks=True, http_tunnel=False, extra=()):
    """torrc text for a client listening on 127.0.0.1 with ports chosen by
    tor ("auto"); extra lines are appended as they are."""
    lines = [
        "DataDirectory " + data_directory,
        "PidFile " + os.path.join(data_directory, "tor.pid"),
        "Log notice file " + os.path.join(data_directory, "notice.log"),
        DUMMY_AUTHORITY,
        # Exit when the process that started tor does (checked every few
        # seconds), so a crashed test leaves no tor behind.
        "__OwningControllerProcess %d" % os.getpid(),
        "SocksPort " + ("127.0.0.1:auto" if socks else "0"),
    ]
    if http_tunnel:
        lines.append("HTTPTunnelPort 127.0.0.1:auto")
    lines.extend(extra)
    return "\n".join(lines) + "\n"


class TorClient:
    """tor as a SOCKS and/or HTTP CONNECT client on 127.0.0.1 (see the
    module docstring).  start() returns once every port accepts."""

    def __init__(self, socks=True, http_tunnel=False, extra=(), tor=None):
        self.wanted = {"Socks": socks, "HTTP tunnel": http_tunnel}
        self.program = tor or find_program("tor")
        self.directory = tempfile.TemporaryDirectory(prefix="torpeer-")
        self.data_directory = os.path.join(self.directory.name, "data")
        os.mkdir(self.data_directory, 0o700)
        self.torrc = os.path.join(self.directory.name, "torrc")
        with open(self.torrc, "w") as file:
            file.write(client_torrc(self.data_directory, socks, http_tunnel,
                                    extra))
        self.ports = {}         # listener kind -> port
        self.process = None
        self._stdout = None

    @property
    def socks_address(self):
        return ("127.0.0.1", self.ports["Socks"])

    @property
    def http_tunnel_address(self):
        return ("127.0.0.1", self.ports["HTTP tunnel"])

    def start(self):
        if self.program is None:
            raise RuntimeError("tor is not installed")
        self._stdout = open(os.path.join(self.directory.name, "stdout"), "wb")
        self.process = subprocess.Popen(
            [self.program, "--defaults-torrc", os.devnull, "-f", self.torrc],
            stdin=subprocess.DEVNULL, stdout=self._stdout,
            stderr=subprocess.STDOUT)
        try:
            self._wait_for_ports()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_for_ports(self):
        wanted = {kind for kind, on in self.wanted.items() if on}
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.process.poll() is not None:
                raise RuntimeError("tor exited with %d:\n%s"
                                   % (self.process.returncode, self.output()))
            for kind, port in LISTENER_OPENED.findall(self.log()):
                self.ports[kind] = int(port)
            if wanted <= set(self.ports) and all(
                    accepts(("127.0.0.1", self.ports[kind]))
                    for kind in wanted):
                return
            if time.monotonic() > deadline:
                raise RuntimeError("tor opened no %s port in %.0f s:\n%s"
                                   % (sorted(wanted), START_TIMEOUT,
                                      self.log()))
            time.sleep(0.05)

    def log(self):
        """tor's notice log so far ("" before tor wrote it)."""
        try:
            with open(os.path.join(self.data_directory, "notice.log"),
                      encoding="utf-8", errors="replace") as file:
                return file.read()
        except FileNotFoundError:
            return ""

    def version(self):
        """The version tor logged ("0.4.9.11"), or None."""
        found = TOR_VERSION.search(self.log())
        return found.group(1) if found else None

    def output(self):
        """What tor wrote to stdout and stderr."""
        with open(os.path.join(self.directory.name, "stdout"), "rb") as file:
            return file.read().decode("utf-8", "replace")

    def stop(self):
        """Stop tor (SIGTERM, then SIGKILL) and remove its directory; safe
        to call twice."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(STOP_TIMEOUT)
        if self._stdout is not None:
            self._stdout.close()
            self._stdout = None
        if self.directory is not None:
            self.directory.cleanup()
            self.directory = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()


class Outcome(NamedTuple):
    """What a server did with a client's bytes: what it sent back within
    the window, and whether it closed the connection (closed by a reset is
    closed too; reset tells them apart)."""
    received: bytes
    closed: bool
    reset: bool = False


def replay(address, chunks, pauses=(), pause=0.1, silence=0.3, limit=2.0):
    """Connect to address, send each chunk of bytes in turn, reading all the
    while, and return the Outcome.

    pauses[i] is the number of seconds to wait before chunk i + 1 (`pause`
    when not given), so that the server reads the chunks apart.  Sending stops
    early once the server closes.  After the last chunk, reading goes on
    until the server closes, or nothing arrived for `silence` seconds, or
    `limit` seconds passed.
    """
    received = bytearray()
    ending = None
    with socket.create_connection(address, timeout=limit) as sock:
        for index, chunk in enumerate(chunks):
            if index:
                wait = pauses[index - 1] if index - 1 < len(pauses) else pause
                ending = _read_for(sock, received, wait)
                if ending:
                    break
            try:
                sock.sendall(chunk)
            except OSError:
                break       # the server closed: read what it sent first
        if ending is None:
            ending = _read_for(sock, received, limit, silence)
    return Outcome(bytes(received), ending is not None, ending == "reset")


def _read_for(sock, received, seconds, silence=None):
    """Read from sock into received for `seconds`, or until `silence`
    seconds pass without a byte.  Returns None while the connection is
    open, "closed" after an end of file, "reset" after a reset."""
    now = time.monotonic()
    end = quiet_until = now + seconds
    if silence is not None:
        quiet_until = now + silence
    while min(end, quiet_until) > now:
        if select.select([sock], [], [], min(end, quiet_until) - now)[0]:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                return "reset"
            if not data:
                return "closed"
            received.extend(data)
            if silence is not None:
                quiet_until = time.monotonic() + silence
        now = time.monotonic()
    return None


def accepts(address):
    """Whether a TCP connection to address is accepted right now."""
    try:
        socket.create_connection(address, timeout=1.0).close()
    except OSError:
        return False
    return True
