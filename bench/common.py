"""What the benchmark scripts share: where torsocksd.py is, loopback ports
and SOCKS5 bytes, processes seen from /proc, ending processes, an echo
target, and the frame of a run (signals, the closing lines of a report).

A script imports it as `common`: `python3 bench/X.py`, from any directory,
puts bench/ first on sys.path.  Standard library only; Linux; loopback
only; not collected by pytest.
"""

import argparse
import multiprocessing
import os
import selectors
import signal
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TORSOCKSD = os.path.normpath(os.path.join(HERE, os.pardir, "torsocksd.py"))
LOCALHOST = "127.0.0.1"
TICKS = os.sysconf("SC_CLK_TCK")


# -- loopback and SOCKS5 -------------------------------------------------------

def free_port():
    """A loopback TCP port nothing listens on (yet)."""
    with socket.socket() as probe:
        probe.bind((LOCALHOST, 0))
        return probe.getsockname()[1]


def wait_for_port(port, timeout=10.0, source=None):
    """Until something accepts connections on 127.0.0.1:port (from source,
    an address of this host, when given); RuntimeError after timeout
    seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if source:
                probe.bind((source, 0))
            if probe.connect_ex((LOCALHOST, port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError("nothing listens on port %d" % port)


def receive_exactly(sock, size):
    """size bytes; ConnectionError when the peer closes first."""
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("closed after %d of %d bytes"
                                  % (len(data), size))
        data += chunk
    return data


def connect_request(port):
    """The SOCKS5 CONNECT request for 127.0.0.1:port (after the greeting
    05 01 00 and its answer 05 00)."""
    return b"\x05\x01\x00\x01\x7f\x00\x00\x01" + port.to_bytes(2, "big")


# -- processes seen from /proc ---------------------------------------------------

def process_tree(root):
    """root and all its descendants (by walking /proc: this kernel may not
    have /proc/PID/task/*/children)."""
    children = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name) as stat:
                parent = int(stat.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


def proc_kib(pid, name, field):
    """The KiB figure of field in /proc/PID/name ("status": VmRSS, VmHWM,
    ...; "smaps_rollup": Pss, ...); None when the process is gone."""
    try:
        with open("/proc/%d/%s" % (pid, name)) as lines:
            for line in lines:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def cpu_seconds(pids, reaped=False):
    """User and system CPU time of pids; reaped: with that of their children
    that have exited and been waited for (danted's come and go)."""
    total = 0
    for pid in pids:
        try:
            with open("/proc/%d/stat" % pid) as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])      # utime, stime
        if reaped:
            total += int(fields[13]) + int(fields[14])  # cutime, cstime
    return total / TICKS


def cpu_model():
    """The CPU's model name from /proc/cpuinfo, or ""."""
    try:
        with open("/proc/cpuinfo") as info:
            for text in info:
                if text.startswith("model name"):
                    return text.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def log_tail(path):
    """The last 600 bytes of a log file as text ("" when there is none)."""
    try:
        with open(path, "rb") as log:
            return log.read()[-600:].decode(errors="replace").strip()
    except (OSError, TypeError):
        return ""


# -- ending processes -------------------------------------------------------------

def stop_process(process, number=signal.SIGTERM, wait=10.0):
    """End a subprocess.Popen: signal number, then SIGKILL if it has not
    exited after wait seconds."""
    if process.poll() is None:
        process.send_signal(number)
        try:
            process.wait(wait)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def stop_process_group(process, term_wait):
    """End a subprocess.Popen started in a session of its own, and its whole
    group: SIGTERM (term_wait seconds), SIGKILL, then SIGKILL to what is
    left of the group (workers, danted's children)."""
    if process.poll() is None:
        for number, wait in ((signal.SIGTERM, term_wait),
                             (signal.SIGKILL, 5.0)):
            try:
                os.killpg(process.pid, number)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                process.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# -- an echo target ----------------------------------------------------------------

def serve_echo(listener, parent):
    """Echo every connection to listener until it closes, in one selectors
    loop, while the process parent lives.  Made for short exchanges (a
    handshake and a byte or two): a send the socket cannot take whole is
    cut short."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # the parent cleans up
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    listener.setblocking(False)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    while os.getppid() == parent:
        for key, _ in selector.select(1.0):
            if key.fileobj is listener:
                try:
                    client, _ = listener.accept()
                except OSError:
                    continue
                client.setblocking(False)
                selector.register(client, selectors.EVENT_READ)
                continue
            try:
                data = key.fileobj.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if data:
                try:
                    key.fileobj.send(data)
                    continue
                except OSError:
                    pass
            selector.unregister(key.fileobj)
            key.fileobj.close()


class EchoTarget:
    """serve_echo() on 127.0.0.1:port in a forked process of its own (which
    keeps this one's CPU affinity); ends with stop() or with this process."""

    def __init__(self):
        listener = socket.create_server((LOCALHOST, 0), backlog=1024)
        self.port = listener.getsockname()[1]
        self.process = multiprocessing.get_context("fork").Process(
            target=serve_echo, args=(listener, os.getpid()),
            name="bench-echo", daemon=True)
        self.process.start()
        listener.close()

    def stop(self):
        self.process.terminate()
        self.process.join(10)


# -- the frame of a run ------------------------------------------------------------

def argument_parser(doc):
    """An ArgumentParser whose description is the first paragraph of doc
    (a script's docstring), as written."""
    return argparse.ArgumentParser(
        description=doc.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)


def run_main(name, body, cleanup):
    """body() -> exit status, with SIGTERM and SIGINT (even when started
    with it ignored) as KeyboardInterrupt (status 130) and SIGALRM as the
    time limit (status 1), each said in one line on stderr; then
    cleanup(), whatever happened."""
    def on_signal(number, frame):
        raise KeyboardInterrupt

    def on_alarm(number, frame):
        raise TimeoutError("time limit reached")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGALRM, on_alarm)
    try:
        return body()
    except KeyboardInterrupt:
        print("%s: interrupted" % name, file=sys.stderr)
        return 130
    except TimeoutError as error:
        print("%s: %s" % (name, error), file=sys.stderr)
        return 1
    finally:
        signal.alarm(0)
        cleanup()


def closing_lines(notes, failed, seconds):
    """The end of a report: the notes, what failed, the time taken."""
    lines = []
    if notes:
        lines.append("")
        lines.extend("note: %s" % note for note in notes)
    if failed:
        lines.append("")
        lines.extend("FAILED: %s" % why for why in failed)
    lines.append("")
    lines.append("took %.0f s" % seconds)
    return lines
