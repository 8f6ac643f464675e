"""What a start costs: modules that only some modes need are imported when
that mode first uses them, "python3 torsocksd.py" runs from the bytecode
cache it leaves beside itself, and idle workers sleep.  The figures are
bench/footprint.py's business; these tests check the behaviour behind
them, and time nothing."""

import ast
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from conftest import TIMEOUT, recv_exactly

SCRIPT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir,
                                      "torsocksd.py"))
# What loads OpenSSL (CONNECT_DIR's TLS and digests, --credentials) and
# what only --syslog needs.
ON_FIRST_USE = ("ssl", "_ssl", "hashlib", "_hashlib", "hmac",
                "logging.handlers")
PYC = "torsocksd.%s.pyc" % sys.implementation.cache_tag


def modules_loaded_after(statement):
    """Which of ON_FIRST_USE a fresh interpreter has loaded after importing
    torsocksd and running statement."""
    program = ("import sys; sys.path.insert(0, %r); import torsocksd\n%s\n"
               "print(sorted(set(sys.modules) & set(%r)))"
               % (os.path.dirname(SCRIPT), statement, ON_FIRST_USE))
    result = subprocess.run([sys.executable, "-c", program],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            universal_newlines=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr
    return ast.literal_eval(result.stdout)


def test_importing_torsocksd_loads_neither_openssl_nor_syslog():
    assert modules_loaded_after("") == []


@pytest.mark.parametrize("statement, loaded", [
    ("torsocksd.Credentials([(b'u', b'p')]).check(b'u', b'p')",
     {"hashlib", "hmac"}),
    ("torsocksd.tor_tls_context()", {"ssl"}),
    ("torsocksd.kdf_tor(bytes(20), 72)", {"hashlib"}),
    # (Before 3.11 the handler fails at once when no syslog listens.)
    ("try:\n    torsocksd.configure_logging('info', use_syslog=True)\n"
     "except OSError:\n    pass", {"logging.handlers"}),
])
def test_a_mode_imports_what_it_needs_when_first_used(statement, loaded):
    assert loaded <= set(modules_loaded_after(statement))


# -- the script and its bytecode cache ------------------------------------------

def script_env(**extra):
    """This environment without what would change where bytecode goes (or
    whether it is written at all), nor a service manager's variables."""
    env = {name: value for name, value in os.environ.items()
           if name not in ("PYTHONDONTWRITEBYTECODE", "PYTHONPYCACHEPREFIX",
                           "NOTIFY_SOCKET")
           and not name.startswith("LISTEN_")}
    env.update(extra)
    return env


class Script:
    """python3 [options] torsocksd.py --port 0 ... started in directory;
    waits (bounded) for its "listening on" lines."""

    def __init__(self, directory, *args, options=(), listeners=1,
                 wrapper=()):
        self.process = subprocess.Popen(
            [*wrapper, sys.executable, *options, "torsocksd.py", "--port",
             "0", *args],
            cwd=directory, env=script_env(), stdin=subprocess.DEVNULL,
            stderr=subprocess.PIPE, start_new_session=True)
        self.lines = []
        self.listening = []
        unread = b""
        deadline = time.monotonic() + TIMEOUT
        while len(self.listening) < listeners:
            ready, _, _ = select.select([self.process.stderr], [], [], max(
                0.0, deadline - time.monotonic()))
            if not ready:
                raise AssertionError("not listening after %.0f s: %r"
                                     % (TIMEOUT, self.lines))
            # os.read: a buffered reader would hide lines from select.
            chunk = os.read(self.process.stderr.fileno(), 65536)
            if not chunk:
                self.process.wait(TIMEOUT)
                raise AssertionError("exited: %r" % self.lines)
            unread += chunk
            *complete, unread = unread.split(b"\n")
            for line in complete:
                self.lines.append(line.decode())
                if " listening on " in line.decode():
                    self.listening.append(line.decode().rsplit(" ", 1)[1])

    def serving_pids(self):
        """The process IDs the log lines give (torsocksd[PID])."""
        return {int(pid) for line in self.lines
                for pid in re.findall(r"torsocksd\[(\d+)\]", line)}

    def greet(self):
        host, port = self.listening[0].rsplit(":", 1)
        with socket.create_connection((host, int(port)),
                                      timeout=TIMEOUT) as client:
            client.sendall(b"\x05\x01\x00")
            assert recv_exactly(client, 2) == b"\x05\x00"

    def stop(self):
        self.process.send_signal(signal.SIGTERM)
        self.process.stderr.read()
        return self.process.wait(TIMEOUT)

    def kill(self):
        """End the daemon and whatever workers it left."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(TIMEOUT)
        self.process.stderr.close()


@pytest.fixture
def scripts():
    started = []
    yield lambda *args, **how: started.append(Script(*args, **how)) \
        or started[-1]
    for script in started:
        script.kill()


@pytest.fixture
def copy_dir():
    """A world-readable directory holding a copy of torsocksd.py and
    nothing else (tmp_path is not readable by nobody)."""
    directory = tempfile.mkdtemp(prefix="torsocksd-copy-")
    os.chmod(directory, 0o755)
    shutil.copy(SCRIPT, directory)
    os.chmod(os.path.join(directory, "torsocksd.py"), 0o644)
    yield directory
    os.chmod(directory, 0o755)
    shutil.rmtree(directory)


def test_the_script_serves_from_the_bytecode_cache_it_leaves(scripts,
                                                             copy_dir):
    """The first start writes __pycache__ beside the file (a script alone
    never does), the next one uses it as it is; the process started is the
    one that serves."""
    cache = os.path.join(copy_dir, "__pycache__", PYC)
    first = scripts(copy_dir)
    first.greet()
    assert first.serving_pids() == {first.process.pid}
    assert first.stop() == 0
    assert os.path.isfile(cache)
    written = os.stat(cache).st_mtime_ns
    second = scripts(copy_dir)
    second.greet()
    assert second.serving_pids() == {second.process.pid}
    assert second.stop() == 0
    assert os.stat(cache).st_mtime_ns == written


def test_the_interpreter_options_are_kept(scripts, copy_dir, tmp_path):
    """-X pycache_prefix reaches the interpreter that imports torsocksd:
    the bytecode goes under the prefix, not beside the file."""
    prefix = tmp_path / "prefix"
    script = scripts(copy_dir, options=["-X", "pycache_prefix=%s" % prefix])
    script.greet()
    assert script.stop() == 0
    assert os.path.isfile(os.path.join(str(prefix),
                                       os.path.realpath(copy_dir).lstrip("/"),
                                       PYC))
    assert not os.path.exists(os.path.join(copy_dir, "__pycache__"))


@pytest.mark.parametrize("command_line, argv, options", [
    (["python3", "f.py", "--port", "1"], ["f.py", "--port", "1"], []),
    (["python3", "-u", "-X", "dev", "-Wd", "f.py", "-m"], ["f.py", "-m"],
     ["-u", "-X", "dev", "-Wd"]),
    (["python3", "--check-hash-based-pycs", "never", "f.py"], ["f.py"],
     ["--check-hash-based-pycs", "never"]),
    # Someone else's runner: the interpreter did not run FILE itself.
    (["python3", "-m", "pdb", "f.py"], ["f.py"], None),
    (["python3", "-Bc", "code", "f.py"], ["f.py"], None),
    (["python3", "/usr/bin/coverage", "run", "f.py"], ["f.py"], None),
    (["python3", "-X", "f.py"], ["f.py"], None),
    (["python3", "other.py", "f.py"], ["f.py", "x"], None),
])
def test_the_handover_happens_only_for_python3_options_file_args(
        monkeypatch, command_line, argv, options):
    import torsocksd
    monkeypatch.setattr(sys, "argv", argv)
    assert torsocksd._interpreter_options(command_line) == options


@pytest.mark.parametrize("how", ["stdin", "exec"])
def test_the_file_still_runs_without_a_file_name(how):
    """Fed on standard input, or exec()uted with nothing but __name__ in
    its globals, the file runs in the process that read it."""
    if how == "stdin":
        argv = [sys.executable, "-", "--version"]
    else:
        argv = [sys.executable, "-c",
                "import sys; sys.argv[1:] = ['--version']; "
                "exec(compile(sys.stdin.read(), 'torsocksd', 'exec'), "
                "{'__name__': '__main__'})"]
    with open(SCRIPT, "rb") as source:
        result = subprocess.run(argv, stdin=source, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, timeout=TIMEOUT)
    assert (result.returncode, result.stderr) == (0, b"")
    assert result.stdout.startswith(b"torsocksd ")


def test_a_read_only_directory_serves_and_writes_nothing(scripts, copy_dir):
    """The daemon then compiles at every start, serves all the same, and
    leaves no file.  Root writes anywhere a mode bit forbids, so as root
    the directory is bind-mounted read-only in a mount namespace of its own
    (unshare execs, so the PID stays the daemon's)."""
    wrapper = ()
    if os.geteuid() == 0:
        unshare = shutil.which("unshare")
        if unshare is None or subprocess.run(
                [unshare, "-m", "true"], stderr=subprocess.DEVNULL).returncode:
            pytest.skip("cannot make a mount namespace")
        wrapper = (unshare, "-m", "sh", "-c",
                   'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" '
                   '&& exec "$@"', copy_dir)
    else:
        os.chmod(copy_dir, 0o555)
    for _ in range(2):
        script = scripts(copy_dir, wrapper=wrapper)
        script.greet()
        assert script.serving_pids() == {script.process.pid}
        assert script.stop() == 0
    assert os.listdir(copy_dir) == ["torsocksd.py"]


def test_the_loop_sleeps_once_the_last_client_has_gone(scripts, copy_dir):
    """A client that leaves cancels its deadline (here the one-second
    handshake timeout); the loop then has nothing to wake up for, at that
    deadline or after."""
    daemon = scripts(copy_dir, "--handshake-timeout", "1")
    daemon.greet()
    time.sleep(0.3)         # the close is handled
    before = context_switches([daemon.process.pid])
    time.sleep(2.0)
    assert context_switches([daemon.process.pid]) == before
    assert daemon.stop() == 0


# -- workers ---------------------------------------------------------------------

def children_of(pid):
    with open("/proc/%d/task/%d/children" % (pid, pid)) as listing:
        return sorted(int(child) for child in listing.read().split())


def context_switches(pids):
    """Voluntary and involuntary context switches of every thread of pids:
    a process blocked with nothing to do makes none."""
    total = 0
    for pid in pids:
        for task in os.listdir("/proc/%d/task" % pid):
            with open("/proc/%d/task/%s/status" % (pid, task)) as status:
                total += sum(int(line.split()[1]) for line in status
                             if "ctxt_switches:" in line)
    return total


def gone(pid):
    """Exited (a zombie nobody reaps counts as exited)."""
    try:
        with open("/proc/%d/stat" % pid) as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def test_idle_workers_sleep(scripts, copy_dir):
    """Nothing pending, nothing to wake up for: over two and a half seconds
    at rest the workers (which watched their parent every second) do not
    run at all."""
    daemon = scripts(copy_dir, "--workers", "2", listeners=3)
    workers = children_of(daemon.process.pid)
    assert len(workers) == 2
    time.sleep(0.5)         # both are in their loops by now
    before = context_switches(workers)
    time.sleep(2.5)
    assert context_switches(workers) == before
    assert daemon.stop() == 0


def test_workers_drain_and_exit_when_the_parent_is_killed(scripts,
                                                          copy_dir):
    daemon = scripts(copy_dir, "--workers", "2", listeners=3)
    workers = children_of(daemon.process.pid)
    assert len(workers) == 2
    daemon.process.kill()
    daemon.process.wait(TIMEOUT)
    deadline = time.monotonic() + TIMEOUT
    while not all(gone(pid) for pid in workers):
        assert time.monotonic() < deadline, "orphaned workers serve on"
        time.sleep(0.05)
    rest = daemon.process.stderr.read().decode()
    assert rest.count("the parent process is gone: draining") == 2
