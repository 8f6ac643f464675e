#!/usr/bin/env python3
"""What torsocksd costs a small host: memory at rest, start-up time, idle
wake-ups, the price of one process per connection, and system calls per
connection; next to a minimal Python listener and microsocks.

    python3 bench/footprint.py [--quick] [--tsd [LABEL=]PATH ...]

Every process measured runs Debian's /usr/bin/python3 (--python) in a clean
environment (PATH=/usr/bin:/bin and nothing else), from a fresh copy of the
file named torsocksd.py in a new temporary directory, started as the README
says: "python3 torsocksd.py --port PORT", with that directory as its working
directory.  --tsd may be given more than once (e.g. before=/tmp/before.py
after=torsocksd.py) to measure several versions in one run; they are run in
turn, so that the machine's noise falls on all of them alike.

Rows:
  idle RSS, first start   VmRSS ~1 s after the daemon answers a SOCKS5
                          greeting, started in a directory with no
                          __pycache__.
  idle RSS, later start   the second start in the same directory (with
                          whatever bytecode cache the first one left).
  read-only directory     the second start by a user who cannot write the
                          directory (root: as nobody), once with no writable
                          home, once with HOME a writable directory.
  start-up                exec -> first successful connect and SOCKS5 greeting
                          answered, median of --reps starts, and its ratio to
                          a minimal listener (socket + selectors: bind,
                          listen, select, answer 05 00) timed the same way;
                          also as "python3 -m torsocksd" from the directory
                          (a module comes from its bytecode cache, a script
                          is compiled at every start).
  idle wake-ups           context switches of all the daemon's threads and
                          processes (from /proc) over --idle seconds at rest,
                          as a rate per minute, and the CPU time they took.
  --inetd, Accept=yes     N daemons each serving one client: fd 0 (inetd) or
                          fd 3 with LISTEN_PID/LISTEN_FDS (systemd Accept=yes)
                          is one end of a connected loopback TCP pair; the
                          client does a SOCKS5 CONNECT to a loopback echo,
                          echoes one byte and closes.  Wall time from fork to
                          the reaped exit, time to the echo, and peak RSS
                          (wait4's ru_maxrss: the whole life of the process,
                          across exec; the spawner is a small python3 -S, so
                          its own few MiB are the floor).
  --workers N             PSS of the parent and of each worker (smaps_rollup)
                          at rest, and after --load connections spread over
                          the workers.
  syscalls/connection     strace -c -f on the running daemon over --syscalls
                          SOCKS5 CONNECT + one-byte echo + close connections
                          made one after the other, divided by their number,
                          with the most frequent calls.  Separate from the
                          timed figures: strace slows everything down.

The processes under test run on the last CPU, this script and its helpers on
CPU 0 (when there are two or more).  Figures only, no pass/fail: exit status
1 when a process could not be started or answered wrongly.  Standard
library only; Linux; loopback only; not collected by pytest.
"""

import ast
import json
import os
import platform
import pwd
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from common import (LOCALHOST, TORSOCKSD, EchoTarget, argument_parser,
                    closing_lines, connect_request, cpu_model, free_port,
                    log_tail, proc_kib, process_tree, receive_exactly,
                    run_main, stop_process, stop_process_group)

CLEAN_ENV = {"PATH": "/usr/bin:/bin"}
READY_TIMEOUT = 20.0        # seconds for a daemon to answer its first client
STEP_TIMEOUT = 10.0         # seconds for one exchange with a daemon
MIB = 1024.0                # KiB per MiB
GREETING = b"\x05\x01\x00"

# A listener with nothing but socket and selectors: the floor any Python
# daemon starts from.  It answers the SOCKS5 greeting so that it is timed
# exactly as the proxies are.
MINIMAL_LISTENER = r'''
import selectors, socket, sys
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("127.0.0.1", int(sys.argv[1])))
listener.listen(128)
selector = selectors.DefaultSelector()
selector.register(listener, selectors.EVENT_READ)
while True:
    selector.select()
    client, _ = listener.accept()
    client.recv(3)
    client.send(b"\x05\x00")
    client.close()
'''

# Forks and execs one daemon per client (inetd "nowait" or systemd
# Accept=yes) and plays the client.  The peak RSS wait4 reports for a child
# counts the pages it had before exec, so this runs as a small
# "python3 -I -S" with _socket and no json (the job comes and the figures go
# as Python literals): its own ~8 MiB is the floor, not this benchmark's size.
SPAWNER = r'''
import _socket, os, sys, time
job = eval(sys.argv[1])
echo = job["echo_port"]
request = b"\x05\x01\x00\x01\x7f\x00\x00\x01" + echo.to_bytes(2, "big")

def exactly(sock, size):
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("closed after %r" % data)
        data += chunk
    return data

results = []
for number in range(job["count"]):
    listener = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    client = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
    client.settimeout(10)
    client.connect(listener.getsockname())
    served, _ = listener._accept()
    listener.close()
    started = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        try:
            if job["cpu"] is not None:
                os.sched_setaffinity(0, {job["cpu"]})
            env = dict(job["env"])
            if job["mode"] == "inetd":
                for fd in (0, 1, 2):
                    os.dup2(served, fd)
            else:
                os.dup2(served, 3)
                null = os.open(os.devnull, os.O_RDWR)
                for fd in (0, 1, 2):
                    os.dup2(null, fd)
                env.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="1")
            os.chdir(job["cwd"])
            os.execve(job["argv"][0], job["argv"], env)
        finally:
            os._exit(127)
    os.close(served)
    entry = {"error": None}
    try:
        client.sendall(b"\x05\x01\x00")
        if exactly(client, 2) != b"\x05\x00":
            raise ConnectionError("greeting refused")
        client.sendall(request)
        reply = exactly(client, 10)
        if reply[:2] != b"\x05\x00":
            raise ConnectionError("SOCKS reply %s" % reply.hex())
        client.sendall(b"!")
        if exactly(client, 1) != b"!":
            raise ConnectionError("no echo")
        entry["echo_ms"] = 1000 * (time.perf_counter() - started)
        client.shutdown(_socket.SHUT_WR)
        while client.recv(4096):
            pass
    except OSError as error:
        entry["error"] = str(error)
    client.close()
    _, status, usage = os.wait4(pid, 0)
    entry["wall_ms"] = 1000 * (time.perf_counter() - started)
    entry["maxrss_kib"] = usage.ru_maxrss
    entry["status"] = status
    results.append(entry)
with open("/proc/self/status") as lines:
    floor = [int(line.split()[1]) for line in lines
             if line.startswith("VmHWM:")][0]
print(repr({"results": results, "floor_kib": floor}))
'''


class Failure(Exception):
    """A process under test did not start or answered wrongly."""


# -- /proc --------------------------------------------------------------------

def status_kib(pid, field):
    return proc_kib(pid, "status", field)


def pss_kib(pid):
    return proc_kib(pid, "smaps_rollup", "Pss")


TICKS = os.sysconf("SC_CLK_TCK")


def activity(pids):
    """(context switches, CPU seconds) of every thread of pids."""
    switches = ticks = 0
    for pid in pids:
        try:
            tasks = os.listdir("/proc/%d/task" % pid)
        except OSError:
            continue
        for task in tasks:
            base = "/proc/%d/task/%s/" % (pid, task)
            try:
                with open(base + "stat") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
                ticks += int(fields[11]) + int(fields[12])
                with open(base + "status") as lines:
                    for line in lines:
                        if line.startswith(("voluntary_ctxt_switches:",
                                            "nonvoluntary_ctxt_switches:")):
                            switches += int(line.split()[1])
            except (OSError, IndexError, ValueError):
                continue
    return switches, ticks / TICKS


# -- talking SOCKS ---------------------------------------------------------------

def greet(port):
    """Connect and have the SOCKS5 greeting answered; False when nothing
    listens yet."""
    with socket.socket() as sock:
        sock.settimeout(STEP_TIMEOUT)
        try:
            sock.connect((LOCALHOST, port))
        except ConnectionRefusedError:
            return False
        sock.sendall(GREETING)
        answer = receive_exactly(sock, 2)
    if answer != b"\x05\x00":
        raise Failure("greeting answered with %s" % answer.hex())
    return True


def socks_echo(port, echo_port):
    """One SOCKS5 CONNECT to the echo, one byte each way, close."""
    with socket.create_connection((LOCALHOST, port), STEP_TIMEOUT) as sock:
        sock.sendall(GREETING)
        if receive_exactly(sock, 2) != b"\x05\x00":
            raise Failure("greeting refused")
        sock.sendall(connect_request(echo_port))
        reply = receive_exactly(sock, 10)
        if reply[:2] != b"\x05\x00":
            raise Failure("CONNECT answered with %s" % reply.hex())
        sock.sendall(b"!")
        if receive_exactly(sock, 1) != b"!":
            raise Failure("wrong echo")


# -- processes ------------------------------------------------------------------

class Daemon:
    """One process under test, in its own session, on the proxy CPU."""

    def __init__(self, bench, argv, cwd, port, user=None, env=None):
        self.port = port
        self.argv = argv
        def become_user():
            os.setgroups([])
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)
        self.log_path = os.path.join(bench.workdir, "daemon-%d.log"
                                     % len(bench.running))
        with open(self.log_path, "wb") as log, bench.on_proxy_cpu():
            self.started = time.perf_counter()
            self.process = subprocess.Popen(
                argv, cwd=cwd, env=dict(CLEAN_ENV, **(env or {})),
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True,
                preexec_fn=None if user is None else become_user)
        self.pid = self.process.pid
        bench.running.append(self)

    def wait_ready(self, processes=1):
        """Seconds from exec to the first greeting answered; then wait for
        processes processes (the workers)."""
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            if self.process.poll() is not None:
                raise Failure("%s exited with status %s: %s" % (
                    " ".join(self.argv), self.process.returncode,
                    self.log_tail()))
            if greet(self.port):
                ready = time.perf_counter() - self.started
                break
            if time.monotonic() > deadline:
                raise Failure("%s did not answer" % " ".join(self.argv))
            time.sleep(0.0005)
        while len(process_tree(self.pid)) < processes:
            if time.monotonic() > deadline:
                raise Failure("%s: fewer than %d processes"
                              % (" ".join(self.argv), processes))
            time.sleep(0.01)
        return ready

    def pids(self):
        return process_tree(self.pid)

    def log_tail(self):
        return log_tail(self.log_path)

    def stop(self):
        stop_process_group(self.process, term_wait=5.0)


def nobody():
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        return None


# -- the run ---------------------------------------------------------------------

# How much of each thing a run does: (option, type, metavar, what it sets,
# default, default with --quick), in the order Bench takes them.
SIZES = [
    ("--reps", int, None, "starts timed per column", 15, 5),
    ("--rss-reps", int, None, "first/later start pairs per column", 3, 1),
    ("--idle", float, "S", "seconds of rest over which wake-ups are counted",
     10.0, 2.0),
    ("--spawns", int, None, "daemons per inetd mode", 40, 8),
    ("--load", int, None, "connections spread over the workers", 1000, 200),
    ("--syscalls", int, "N", "connections counted under strace", 800, 200),
]


class Bench:
    def __init__(self, options):
        self.options = options
        self.quick = options.quick
        self.python = options.python
        (self.reps, self.rss_reps, self.idle_seconds, self.spawns, self.load,
         self.syscall_connections) = (
            getattr(options, flag[2:].replace("-", "_"))
            or (quick if self.quick else default)
            for flag, _, _, _, default, quick in SIZES)
        self.running = []           # daemons, ended after each test
        self.helpers = []           # the echo target, ended at the end
        self.results = {}           # column -> row -> value
        self.syscalls = {}          # column -> (calls/conn, [(name, calls/conn)])
        self.notes = []
        self.failed = []
        self.workdir = tempfile.mkdtemp(prefix="torsocksd-footprint-")
        os.chmod(self.workdir, 0o755)   # nobody must reach the copies
        self.dirs = 0
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) >= 2:
            self.load_cpus, self.proxy_cpus = {cpus[0]}, {cpus[-1]}
        else:
            self.load_cpus = self.proxy_cpus = None
        if self.load_cpus:
            os.sched_setaffinity(0, self.load_cpus)
        self.versions = []          # (label, path)
        for spec in options.tsd or [TORSOCKSD]:
            label, equals, path = spec.partition("=")
            if not equals:
                label, path = "torsocksd", spec
            path = os.path.abspath(path)
            if not os.path.isfile(path):
                raise SystemExit("footprint: no such file: %s" % path)
            self.versions.append((label, path))
        self.minimal = self.write("minimal_listener.py", MINIMAL_LISTENER)
        self.microsocks = None if options.no_microsocks \
            else shutil.which("microsocks")

    # helpers -------------------------------------------------------------------

    def progress(self, text):
        print("footprint: %s" % text, file=sys.stderr, flush=True)

    def write(self, name, text):
        path = os.path.join(self.workdir, name)
        with open(path, "w") as out:
            out.write(text)
        os.chmod(path, 0o644)
        return path

    def fresh_copy(self, path):
        """A new directory holding path as torsocksd.py, and nothing else."""
        self.dirs += 1
        directory = os.path.join(self.workdir, "copy-%d" % self.dirs)
        os.mkdir(directory)
        os.chmod(directory, 0o755)
        shutil.copyfile(path, os.path.join(directory, "torsocksd.py"))
        os.chmod(os.path.join(directory, "torsocksd.py"), 0o644)
        return directory

    class _Pinned:
        def __init__(self, bench):
            self.bench = bench

        def __enter__(self):
            if self.bench.proxy_cpus:
                os.sched_setaffinity(0, self.bench.proxy_cpus)

        def __exit__(self, *exc):
            if self.bench.load_cpus:
                os.sched_setaffinity(0, self.bench.load_cpus)

    def on_proxy_cpu(self):
        """Children started inside inherit the proxy CPU."""
        return self._Pinned(self)

    def record(self, column, row, value):
        self.results.setdefault(column, {}).setdefault(row, []).append(value)

    def tsd_argv(self, port, *extra):
        return [self.python, "torsocksd.py", "--port", str(port)] \
            + list(extra)

    def start_tsd(self, directory, *extra, **how):
        port = free_port()
        return Daemon(self, self.tsd_argv(port, "--log-level", "warning",
                                          *extra), directory, port, **how)

    def start_minimal(self):
        port = free_port()
        return Daemon(self, [self.python, self.minimal, str(port)],
                      self.workdir, port)

    def start_microsocks(self):
        port = free_port()
        return Daemon(self, [self.microsocks, "-i", LOCALHOST, "-p",
                             str(port)], self.workdir, port)

    def at_rest(self, daemon, column, label):
        """After ~1 s at rest: VmRSS and PSS of the whole process tree."""
        time.sleep(1.0)
        pids = daemon.pids()
        rss = sum(status_kib(pid, "VmRSS") or 0 for pid in pids)
        pss = sum(pss_kib(pid) or 0 for pid in pids)
        self.record(column, "idle RSS MiB, %s" % label, rss / MIB)
        self.record(column, "idle PSS MiB, %s" % label, pss / MIB)
        return rss / MIB

    def idle_wakeups(self, daemon, column, row):
        pids = daemon.pids()
        before = activity(pids)
        time.sleep(self.idle_seconds)
        after = activity(pids)
        minutes = self.idle_seconds / 60
        self.record(column, row, (after[0] - before[0]) / minutes)
        self.record(column, row.replace("wake-ups", "CPU ms"),
                    1000 * (after[1] - before[1]) / minutes)

    def echo_port(self):
        """The port of the target of every CONNECT (started at the first
        call, on this script's CPU)."""
        if getattr(self, "_echo", None) is None:
            self._echo = EchoTarget()
            self.helpers.append(self._echo)
        return self._echo.port

    # the tests -------------------------------------------------------------------

    def run(self):
        tests = set(self.options.tests.split(","))
        steps = [("rss", self.test_rss), ("startup", self.test_startup),
                 ("readonly", self.test_readonly),
                 ("inetd", self.test_inetd), ("workers", self.test_workers),
                 ("syscalls", self.test_syscalls)]
        for name, test in steps:
            if name in tests:
                test()

    def columns(self, peers=True):
        columns = [(label, "tsd", path) for label, path in self.versions]
        if peers:
            columns.append(("minimal", "minimal", None))
            if self.microsocks:
                columns.append(("microsocks", "microsocks", None))
        return columns

    def guarded(self, column, what, function, *args):
        try:
            return function(*args)
        except (Failure, OSError, ValueError) as error:
            self.failed.append("%s, %s: %s" % (column, what, error))
            return None
        finally:
            self.stop_all()

    def test_rss(self):
        """First and later start: RSS at rest, start-up, idle wake-ups."""
        for rep in range(self.rss_reps):
            for column, kind, path in self.columns():
                self.progress("idle RSS, %s (%d/%d)" % (column, rep + 1,
                                                        self.rss_reps))
                self.guarded(column, "idle RSS", self._rss_once, column,
                             kind, path)

    def _rss_once(self, column, kind, path):
        if kind == "tsd":
            directory = self.fresh_copy(path)
            first = self.start_tsd(directory)
            self.record(column, "start-up ms, first start",
                        1000 * first.wait_ready())
            self.at_rest(first, column, "first start")
            first.stop()
            daemon = self.start_tsd(directory)
        elif kind == "minimal":
            daemon = self.start_minimal()
        else:
            daemon = self.start_microsocks()
        daemon.wait_ready()
        rss = self.at_rest(daemon, column, "later start")
        if kind != "tsd":       # no cache: every start is a first start
            self.record(column, "idle RSS MiB, first start", rss)
        self.idle_wakeups(daemon, column, "idle wake-ups/min")
        daemon.stop()

    def test_startup(self):
        """Start-up to the first greeting answered, median of reps."""
        directories = {}
        for column, kind, path in self.columns():
            if kind == "tsd":
                directories[column] = self.fresh_copy(path)
                self.guarded(column, "warm-up", self._startup_once, column,
                             kind, directories[column], False)
        for rep in range(self.reps):
            self.progress("start-up %d/%d" % (rep + 1, self.reps))
            for column, kind, path in self.columns():
                self.guarded(column, "start-up", self._startup_once, column,
                             kind, directories.get(column), True)
        for column, _, _ in self.columns():
            times = self.results.get(column, {}).get("start-up ms")
            minimal = self.results.get("minimal", {}).get("start-up ms")
            if times and minimal:
                self.results[column]["  ratio to minimal"] = [
                    statistics.median(times) / statistics.median(minimal)]

    def _startup_once(self, column, kind, directory, keep):
        if kind == "tsd":
            daemon = self.start_tsd(directory)
        elif kind == "minimal":
            daemon = self.start_minimal()
        else:
            daemon = self.start_microsocks()
        seconds = daemon.wait_ready()
        daemon.stop()
        if keep:
            self.record(column, "start-up ms", 1000 * seconds)
        if kind == "tsd":
            # The same file run as a module: Python then takes it from the
            # bytecode cache instead of compiling it, as it does a script.
            port = free_port()
            daemon = Daemon(self, [self.python, "-m", "torsocksd", "--port",
                                   str(port), "--log-level", "warning"],
                            directory, port)
            seconds = daemon.wait_ready()
            daemon.stop()
            if keep:
                self.record(column, "start-up ms, -m", 1000 * seconds)

    def test_readonly(self):
        """Second start from a directory the daemon cannot write."""
        user = nobody() if os.geteuid() == 0 else None
        if os.geteuid() == 0 and user is None:
            self.notes.append("read-only rows left out: no user nobody")
            return
        for column, kind, path in self.columns(peers=False):
            self.progress("read-only directory, %s" % column)
            self.guarded(column, "read-only", self._readonly_once, column,
                         path, user)

    def _readonly_once(self, column, path, user):
        for label, home in (("no writable cache", None),
                            ("writable HOME", True)):
            directory = self.fresh_copy(path)
            env = {}
            if home:
                home = os.path.join(self.workdir, "home-%d" % self.dirs)
                os.mkdir(home)
                if user is not None:
                    os.chown(home, user.pw_uid, user.pw_gid)
                env["HOME"] = home
            if user is None:
                os.chmod(directory, 0o555)
            for start in (1, 2):
                daemon = self.start_tsd(directory, user=user, env=env)
                daemon.wait_ready()
                if start == 2:
                    time.sleep(1.0)
                    self.record(column, "idle RSS MiB, read-only dir, %s"
                                % label, sum(status_kib(pid, "VmRSS") or 0
                                             for pid in daemon.pids()) / MIB)
                daemon.stop()
            os.chmod(directory, 0o755)
            written = [os.path.join(top, name)
                       for top, _, names in os.walk(directory)
                       for name in names if name != "torsocksd.py"]
            if written:
                self.failed.append("%s: wrote %s in a read-only directory"
                                   % (column, ", ".join(written)))

    def test_inetd(self):
        """One process per connection: --inetd and Accept=yes."""
        echo = self.echo_port()
        spawner = self.write("spawner.py", SPAWNER)
        for column, kind, path in self.columns(peers=False):
            directory = self.fresh_copy(path)
            # contrib/torsocksd@.service starts "python3 -m torsocksd" in
            # the file's directory: no script to compile at each start.
            for key, mode, label, start in (
                    ("inetd", "inetd", "--inetd", ["torsocksd.py", "--inetd"]),
                    ("accept", "accept", "Accept=yes", ["torsocksd.py"]),
                    ("accept -m", "accept", "Accept=yes, python3 -m",
                     ["-m", "torsocksd"])):
                self.progress("%s, %s" % (label, column))
                argv = [self.python] + start + ["--log-level", "warning"]
                job = {"argv": argv, "mode": mode, "cwd": directory,
                       "env": CLEAN_ENV, "echo_port": echo,
                       "count": self.spawns + 1,
                       "cpu": min(self.proxy_cpus) if self.proxy_cpus
                       else None}
                done = None
                try:
                    done = subprocess.run(
                        [self.python, "-I", "-S", spawner, repr(job)],
                        env=CLEAN_ENV, capture_output=True, text=True,
                        timeout=60 + 10 * self.spawns)
                    answer = ast.literal_eval(done.stdout)
                except (OSError, ValueError, subprocess.SubprocessError) \
                        as error:
                    self.failed.append("%s, %s: spawner: %s %s" % (
                        column, label, error, done.stderr if done else ""))
                    continue
                results = answer["results"][1:]     # the first compiles
                errors = [r["error"] or "exit status %d" % r["status"]
                          for r in results if r["error"] or r["status"]]
                if errors:
                    self.failed.append("%s, %s: %d of %d failed: %s" % (
                        column, label, len(errors), len(results), errors[0]))
                for entry in results:
                    if entry["error"] is None:
                        self.record(column, "%s wall" % key,
                                    entry["wall_ms"])
                        self.record(column, "%s echo" % key,
                                    entry["echo_ms"])
                        self.record(column, "%s peak" % key,
                                    entry["maxrss_kib"] / MIB)
                self.spawner_floor = answer["floor_kib"] / MIB

    def test_workers(self):
        echo = self.echo_port()
        for count in (2, 4):
            for column, kind, path in self.columns(peers=False):
                self.progress("--workers %d, %s" % (count, column))
                self.guarded(column, "workers", self._workers_once, column,
                             path, count, echo)

    def _workers_once(self, column, path, count, echo):
        directory = self.fresh_copy(path)
        self.start_tsd(directory).wait_ready()      # leaves the cache
        self.stop_all()
        daemon = self.start_tsd(directory, "--workers", str(count))
        daemon.wait_ready(processes=count + 1)
        time.sleep(1.0)

        def pss_rows(when):
            pids = daemon.pids()
            workers = [pss_kib(pid) or 0 for pid in pids[1:]]
            self.record(column, "w%d PSS MiB per worker, %s" % (count, when),
                        statistics.mean(workers) / MIB)
            self.record(column, "w%d PSS MiB total, %s" % (count, when),
                        (sum(workers) + (pss_kib(pids[0]) or 0)) / MIB)

        pss_rows("at rest")
        if count == 2:
            self.idle_wakeups(daemon, column, "w2 idle wake-ups/min")
        errors = []

        def client(share):
            try:
                for _ in range(share):
                    socks_echo(daemon.port, echo)
            except (OSError, Failure) as error:
                errors.append(error)

        threads = [threading.Thread(target=client, args=(self.load // 8,))
                   for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise Failure("load: %s" % errors[0])
        time.sleep(1.0)
        pss_rows("after %d connections" % (self.load // 8 * 8))
        daemon.stop()

    def test_syscalls(self):
        strace = shutil.which("strace")
        if not strace:
            self.notes.append("syscalls/connection left out: no strace")
            return
        echo = self.echo_port()
        columns = [c for c in self.columns() if c[1] != "minimal"]
        for column, kind, path in columns:
            self.progress("syscalls per connection, %s" % column)
            self.guarded(column, "syscalls", self._syscalls_once, column,
                         kind, path, strace, echo)

    def _syscalls_once(self, column, kind, path, strace, echo):
        if kind == "tsd":
            daemon = self.start_tsd(self.fresh_copy(path))
        else:
            daemon = self.start_microsocks()
        daemon.wait_ready()
        for _ in range(20):                 # warm-up, not counted
            socks_echo(daemon.port, echo)
        output = os.path.join(self.workdir, "strace-%d.txt" % self.dirs)
        self.dirs += 1
        tracer = subprocess.Popen([strace, "-c", "-f", "-qq", "-o", output,
                                   "-p", str(daemon.pid)],
                                  stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE)
        self.running.append(_Helper(tracer, signal.SIGINT))
        deadline = time.monotonic() + 10
        while not status_kib(daemon.pid, "TracerPid"):
            if tracer.poll() is not None or time.monotonic() > deadline:
                raise Failure("strace could not attach: %s"
                              % tracer.stderr.read().decode(errors="replace"))
            time.sleep(0.01)
        time.sleep(0.2)
        count = self.syscall_connections
        for _ in range(count):
            socks_echo(daemon.port, echo)
        time.sleep(0.5)                     # the last closes are done
        tracer.send_signal(signal.SIGINT)
        tracer.wait(20)
        calls = {}
        with open(output) as table:
            for line in table:
                fields = line.split()
                if len(fields) >= 5 and fields[0][0].isdigit() \
                        and fields[-1] != "total":
                    calls[fields[-1]] = int(fields[3])
        total = sum(calls.values())
        top = sorted(calls.items(), key=lambda item: -item[1])
        self.syscalls[column] = (total / count,
                                 [(name, n / count) for name, n in top])
        self.record(column, "syscalls/connection (strace)", total / count)
        daemon.stop()

    def stop_all(self, helpers=False):
        while self.running:
            self.running.pop().stop()
        while helpers and self.helpers:
            self.helpers.pop().stop()

    # the report --------------------------------------------------------------------

    ROWS = [    # (key, label, format)
        ("idle RSS MiB, first start", None, "%.1f"),
        ("idle RSS MiB, later start", None, "%.1f"),
        ("idle PSS MiB, later start", None, "%.1f"),
        ("idle RSS MiB, read-only dir, no writable cache", None, "%.1f"),
        ("idle RSS MiB, read-only dir, writable HOME", None, "%.1f"),
        ("start-up ms, first start", None, "%.1f"),
        ("start-up ms", "start-up ms, later start", "%.1f"),
        ("  ratio to minimal", None, "%.2f"),
        ("start-up ms, -m", "start-up ms, python3 -m torsocksd", "%.1f"),
        ("idle wake-ups/min", None, "%.1f"),
        ("idle CPU ms/min", None, "%.1f"),
        ("w2 idle wake-ups/min", "--workers 2: idle wake-ups/min", "%.1f"),
        ("w2 idle CPU ms/min", "--workers 2: idle CPU ms/min", "%.1f"),
        ("inetd wall", "--inetd: ms per connection", "%.1f"),
        ("inetd echo", "  ms to the echo", "%.1f"),
        ("inetd peak", "  peak RSS MiB", "%.1f"),
        ("accept wall", "Accept=yes: ms per connection", "%.1f"),
        ("accept echo", "  ms to the echo", "%.1f"),
        ("accept peak", "  peak RSS MiB", "%.1f"),
        ("accept -m wall", "Accept=yes as python3 -m: ms per connection",
         "%.1f"),
        ("accept -m echo", "  ms to the echo", "%.1f"),
        ("accept -m peak", "  peak RSS MiB", "%.1f"),
    ]

    def report(self):
        columns = [c for c, _, _ in self.columns()]
        rows = list(self.ROWS)
        for count in (2, 4):
            for name in ("PSS MiB per worker", "PSS MiB total"):
                for when in ("at rest", "after %d connections"
                             % (self.load // 8 * 8)):
                    key = "w%d %s, %s" % (count, name, when)
                    rows.append((key, "--workers %d: %s, %s" % (
                        count, name, when), "%.1f"))
        rows.append(("syscalls/connection (strace)", None, "%.1f"))
        width = max(14, max(len(c) for c in columns) + 2)
        label_width = max(len(label or key) for key, label, _ in rows) + 2
        out = ["%-*s" % (label_width, "") + "".join(
            "%*s" % (width, c) for c in columns)]
        for key, label, fmt in rows:
            cells = []
            for column in columns:
                values = self.results.get(column, {}).get(key)
                cells.append(fmt % statistics.median(values) if values
                             else "-")
            if any(cell != "-" for cell in cells):
                out.append("%-*s" % (label_width, label or key) + "".join(
                    "%*s" % (width, cell) for cell in cells))
        if self.syscalls:
            out.append("")
            out.append("system calls per connection (strace -c -f, %d "
                       "connections one after the other: SOCKS5 CONNECT, "
                       "1-byte echo, close):" % self.syscall_connections)
            for column, (total, top) in self.syscalls.items():
                out.append("  %-12s %6.1f  %s" % (column, total, ", ".join(
                    "%s %.2f" % item for item in top[:10])))
        return out

    def describe(self):
        lines = ["torsocksd footprint, %s%s" % (
            time.strftime("%Y-%m-%d %H:%M %Z"),
            " (--quick)" if self.quick else "")]
        model = cpu_model()
        version = subprocess.run([self.python, "-c",
                                  "import platform; print(platform."
                                  "python_version())"], env=CLEAN_ENV,
                                 capture_output=True, text=True).stdout
        lines.append("machine: %d cores %s, %s %s; measured with %s "
                     "(Python %s) in env -i PATH=/usr/bin:/bin" % (
                         os.cpu_count() or 0, "(%s)" % model if model else "",
                         platform.system(), platform.release(), self.python,
                         version.strip()))
        for label, path in self.versions:
            lines.append("%s: %s (%d bytes)" % (label, path,
                                                os.path.getsize(path)))
        if self.microsocks:
            lines.append("microsocks: %s" % self.microsocks)
        lines.append(
            "method: medians; idle RSS of %d start(s) each; start-up of %d "
            "starts; %s s idle intervals; %d spawns per inetd mode; %d "
            "connections for --workers; pinning: %s" % (
                self.rss_reps, self.reps, self.idle_seconds, self.spawns,
                self.load // 8 * 8,
                "daemons on CPU %d, this script on CPU %d" % (
                    min(self.proxy_cpus), min(self.load_cpus))
                if self.proxy_cpus else "none (one CPU)"))
        floor = getattr(self, "spawner_floor", None)
        if floor:
            lines.append("peak RSS floor (the spawner's own): %.1f MiB"
                         % floor)
        return lines


class _Helper:
    """A helper process, ended like a daemon."""

    def __init__(self, process, number=signal.SIGTERM):
        self.process = process
        self.number = number

    def stop(self):
        stop_process(self.process, self.number)


def main():
    parser = argument_parser(__doc__)
    parser.add_argument("--quick", action="store_true",
                        help="under a minute for one --tsd: fewer "
                        "repetitions and shorter intervals")
    parser.add_argument("--tsd", action="append", metavar="[LABEL=]PATH",
                        help="a torsocksd.py to measure (repeatable; "
                        "default: the one beside bench/)")
    parser.add_argument("--python", default="/usr/bin/python3"
                        if os.path.exists("/usr/bin/python3")
                        else sys.executable,
                        help="interpreter of the daemons (default "
                        "%(default)s)")
    parser.add_argument("--no-microsocks", action="store_true",
                        help="leave microsocks out")
    parser.add_argument("--tests", default="rss,startup,readonly,inetd,"
                        "workers,syscalls",
                        help="comma-separated subset of %(default)s")
    for flag, kind, metavar, what, default, quick in SIZES:
        parser.add_argument(flag, type=kind, metavar=metavar,
                            help="%s (default %g, --quick %g)"
                            % (what, default, quick))
    parser.add_argument("--json", metavar="FILE",
                        help="also write the figures to FILE")
    parser.add_argument("--time-limit", type=float, default=1800,
                        help="give up after this many seconds "
                        "(default %(default)s)")
    options = parser.parse_args()
    if not sys.platform.startswith("linux"):
        parser.error("Linux only (reads /proc)")
    bench = Bench(options)
    begin = time.monotonic()

    def run():
        signal.alarm(int(options.time_limit))
        bench.run()
        signal.alarm(0)
        lines = bench.describe() + [""] + bench.report()
        lines.extend(closing_lines(bench.notes, bench.failed,
                                   time.monotonic() - begin))
        print("\n".join(lines))
        if options.json:
            with open(options.json, "w") as out:
                json.dump({"header": bench.describe(),
                           "results": bench.results,
                           "syscalls": bench.syscalls,
                           "failed": bench.failed}, out, indent=1,
                          sort_keys=True)
        return 1 if bench.failed else 0

    def clean_up():
        bench.stop_all(helpers=True)
        shutil.rmtree(bench.workdir, ignore_errors=True)

    return run_main("footprint", run, clean_up)


if __name__ == "__main__":
    sys.exit(main())
