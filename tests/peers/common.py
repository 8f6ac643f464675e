"""What the peer scripts in this folder share.

Each script runs as root in a fresh network namespace (`unshare -n`),
started by a test in tests/ that reads what it prints.  Importing this
module puts the repository's root and tests/ on sys.path, so that a script
can then import torsocksd, conftest's helpers and torpeer.

Checks: check() prints "ok: LABEL" or "FAILED: LABEL (detail)" and
remembers the failures; finish() prints the tally, its last line "all
checks passed" when none failed, and returns the exit status.

The network: add_test_hosts() brings lo up and gives it addresses of
other hosts (192.0.2.0/24, 2001:db8::/32), each alone, so that a socket
bound to one is, as far as torsocksd can tell, a client on another host.

Sockets: connect_from() opens a TCP connection from a given address, and
read_to_end() reads until the peer closes it (and says how it ended).
wait_until() polls a condition, within a bounded time.

torsocksd as a process of its own: Daemon(*arguments) returns once its
log says it listens, and collects the log lines from then on.
"""

import os
import signal
import socket
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
ROOT = os.path.dirname(TESTS)
SCRIPT = os.path.join(ROOT, "torsocksd.py")
for _folder in (TESTS, ROOT):
    if _folder not in sys.path:
        sys.path.insert(0, _folder)

from torpeer import find_program  # noqa: E402

TIMEOUT = 10.0          # seconds a socket operation or a wait may take


# -- checks -------------------------------------------------------------------

FAILURES = []


def check(label, condition, detail=""):
    """Print one line for a check (detail in brackets after it); remember a
    failed one for finish()."""
    print("%s: %s%s" % ("ok" if condition else "FAILED", label,
                        (" (%s)" % (detail,)) if detail else ""), flush=True)
    if not condition:
        FAILURES.append(label)


def finish():
    """Print how the checks went; the script's exit status (0: all
    passed)."""
    if FAILURES:
        print("%d check(s) failed" % len(FAILURES))
        return 1
    print("all checks passed")
    return 0


# -- the network --------------------------------------------------------------

def require_root():
    """Exit (status 2) unless this runs as root, as `unshare -n` does."""
    if os.geteuid() != 0:
        print("needs root (unshare -n as root)")
        sys.exit(2)


def ip(*args, check=True):
    """Run ip(8) with args; the CompletedProcess (its output as text).  With
    check, a failure ends the script with what ip said."""
    result = subprocess.run([find_program("ip"), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            universal_newlines=True)
    if check and result.returncode != 0:
        raise SystemExit("ip %s: %s" % (" ".join(args),
                                        result.stderr.strip()))
    return result


def add_test_hosts(*addresses):
    """Bring lo up and add each address to it alone (/32, or /128 without
    duplicate address detection, so that it is usable at once)."""
    require_root()
    ip("link", "set", "lo", "up")
    for address in addresses:
        if ":" in address:
            ip("-6", "addr", "add", address + "/128", "dev", "lo", "nodad")
        else:
            ip("addr", "add", address + "/32", "dev", "lo")


# -- sockets ------------------------------------------------------------------

def connect_from(source, address, timeout=TIMEOUT):
    """A TCP connection to address from the address source (of this
    namespace); timeout on every operation."""
    return socket.create_connection(address, timeout, (source, 0))


CLOSED = ("eof", "reset")      # what read_to_end() says when the peer closed


def read_to_end(sock, limit=1 << 24):
    """What the peer sends until it closes: (data, how it ended), "eof",
    "reset", or "no end" when sock's timeout or the limit of bytes passed
    first."""
    data = bytearray()
    end = "no end"
    try:
        while len(data) <= limit:
            chunk = sock.recv(65536)
            if not chunk:
                end = "eof"
                break
            data += chunk
    except ConnectionResetError:
        end = "reset"
    except socket.timeout:
        pass
    return bytes(data), end


# -- waiting ------------------------------------------------------------------

def wait_until(condition, timeout=TIMEOUT, step=0.02):
    """Ask condition() every step seconds until it is true (True) or
    timeout seconds have passed (False)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(step)
    return True


# -- torsocksd as a process ---------------------------------------------------

class Daemon:
    """torsocksd.py with arguments as a process of its own, logging to
    stderr, which a thread reads into `lines`.  The constructor returns once
    a line has `ready` in it, and ends the script if none comes."""

    def __init__(self, *arguments, ready=" listening on ", timeout=TIMEOUT):
        self.process = subprocess.Popen(
            [sys.executable, SCRIPT, *arguments], stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            universal_newlines=True)
        self.lines = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        # The reader ends at the end of stderr: torsocksd exited.
        wait_until(lambda: self.said(ready) or not self._reader.is_alive(),
                   timeout)
        if not self.said(ready):
            self.stop()
            raise SystemExit("torsocksd %s never said %r:\n%s"
                             % (" ".join(arguments), ready, self.text()))

    def _read(self):
        for line in self.process.stderr:
            self.lines.append(line.rstrip("\n"))

    def text(self):
        """The log so far."""
        return "\n".join(self.lines)

    def said(self, text):
        """Whether a log line so far has text in it."""
        return any(text in line for line in self.lines)

    def wait_for_log(self, text, timeout=TIMEOUT):
        """Until a log line has text in it; whether one came."""
        return wait_until(lambda: self.said(text), timeout)

    def stop(self, sig=signal.SIGTERM):
        """Send sig (if it still runs) and wait for the end of the process
        and of its log; safe to call again."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(TIMEOUT)
        self._reader.join(TIMEOUT)
        self.process.stderr.close()
