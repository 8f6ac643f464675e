"""Deployment: the man page, the files in contrib/, and every way of
starting torsocksd that they describe, each run for real.

Each contrib file's own command line is parsed (ExecStart=, the inetd.conf
line, server/server_args, command/command_args) and run with this checkout's
torsocksd.py in place of /usr/local/lib/torsocksd/torsocksd.py, and the
Python running the tests in place of /usr/bin/python3.  Where a service
manager would pass sockets, the test makes them and passes them the same way.

Readiness: a daemon is ready when it says "listening on" (stderr), or when
it sends READY=1 to a NOTIFY_SOCKET made by the test, which tests that send
signals wait for: it is what systemd waits for.  Nothing sleeps; every wait
has a deadline.
"""

import argparse
import fcntl
import os
import pwd
import queue
import re
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

import torsocksd
from conftest import (TIMEOUT, EchoServer, ipv6_loopback, recv_exactly,
                      recv_until_eof, require_program, socks5_connect_request,
                      socks5_greeting, userpass)

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(TESTS, os.pardir))
SCRIPT = os.path.join(ROOT, "torsocksd.py")
MAN_PAGE = os.path.join(ROOT, "man", "torsocksd.8")
README = os.path.join(ROOT, "README.md")
CONTRIB = os.path.join(ROOT, "contrib")
INSTALLED_SCRIPT = "/usr/local/lib/torsocksd/torsocksd.py"
INSTALLED_CONFIG = "/etc/torsocksd/torsocksd.conf"
INSTALLED_PYTHON = "/usr/bin/python3"
PAYLOAD = b"through the proxy"


def contrib(*parts):
    return os.path.join(CONTRIB, *parts)


# -- reading the contrib files ------------------------------------------------

def unit_values(path, section, key):
    """Every value of key in [section] of a systemd unit file, in order (an
    empty assignment clears the ones before it, as systemd does)."""
    values, current = [], None
    with open(path) as lines:
        for line in lines:
            line = line.strip()
            if not line or line.startswith(("#", ";")):
                continue
            if line.startswith("["):
                current = line.strip("[]")
                continue
            name, _, value = line.partition("=")
            if current == section and name.strip() == key:
                value = value.strip()
                values = values + [value] if value else []
    return values


def unit_value(path, section, key):
    values = unit_values(path, section, key)
    assert len(values) == 1, "%s: [%s] %s=%r" % (path, section, key, values)
    return values[0]


def local_command(argv):
    """A contrib command line made to run from this checkout (with
    contrib/torsocksd.conf where the config file is installed).  One that
    reads "python3 -m torsocksd" runs in local_directory()."""
    assert INSTALLED_SCRIPT in argv or argv[1:3] == ["-m", "torsocksd"], argv
    local = {INSTALLED_PYTHON: sys.executable, INSTALLED_SCRIPT: SCRIPT,
             INSTALLED_CONFIG: contrib("torsocksd.conf")}
    return [local.get(word, word) for word in argv]


def local_directory(unit):
    """Where a unit's command runs in this checkout: its WorkingDirectory=,
    the installed file's directory, is this checkout's top."""
    directories = unit_values(contrib(unit), "Service", "WorkingDirectory")
    assert directories in ([], [os.path.dirname(INSTALLED_SCRIPT)]), \
        directories
    return ROOT if directories else None


def exec_start(unit):
    words = shlex.split(unit_value(contrib(unit), "Service", "ExecStart"))
    assert words[0] == INSTALLED_PYTHON, words    # no -, @, + prefixes
    return words


def inetd_entry(kind):
    """The inetd.conf entry for kind ("nowait", or "wait", which is given
    commented out): (fields, program, argv)."""
    with open(contrib("inetd.conf")) as lines:
        for line in lines:
            if kind == "wait":
                if not re.match(r"#\S+:\d+\s", line):
                    continue
                line = line[1:]
            elif line.startswith("#") or not line.strip():
                continue
            fields = line.split()
            if fields[3] == kind:
                return fields, fields[5], fields[6:]
    raise AssertionError("no %s entry in contrib/inetd.conf" % kind)


def xinetd_service():
    settings = {}
    with open(contrib("xinetd.d", "torsocksd")) as lines:
        for line in lines:
            name, equals, value = line.partition("=")
            if equals and not line.lstrip().startswith("#"):
                settings[name.strip()] = value.strip()
    return settings


def openrc_settings(options):
    """command and command_args of the OpenRC script, as openrc-run sees
    them with TORSOCKSD_OPTS=options from /etc/conf.d/torsocksd."""
    result = subprocess.run(
        ["sh", "-c", '. "$1" && printf "%s\\n" "$command" "$command_args" '
                     '"$command_user" "$retry"', "sh",
         contrib("openrc", "torsocksd")],
        env=dict(base_env(), TORSOCKSD_OPTS=options, RC_SVCNAME="torsocksd"),
        stdout=subprocess.PIPE, universal_newlines=True, timeout=TIMEOUT,
        check=True)
    return result.stdout.splitlines()


# -- processes ----------------------------------------------------------------

def base_env():
    """The test's environment without anything meant for the test runner
    itself (a NOTIFY_SOCKET or LISTEN_* of a service manager)."""
    return {name: value for name, value in os.environ.items()
            if name != "NOTIFY_SOCKET" and not name.startswith("LISTEN_")}


def on_fds(*socks):
    """A preexec_fn putting socks on fds 3, 4, ... of the child (run with
    close_fds=False: Python's own descriptors are not inheritable)."""
    fds = [sock.fileno() for sock in socks]

    def preexec():
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 64) for fd in fds]
        for number, fd in enumerate(high, 3):
            os.dup2(fd, number)
            os.close(fd)
    return preexec


def activated(argv, count, pid="$$"):
    """argv under a shell that sets LISTEN_PID to the PID argv will have
    (exec keeps it), as systemd does."""
    return ["sh", "-c", 'LISTEN_PID=%s LISTEN_FDS=%d exec "$0" "$@"'
            % (pid, count)] + argv


class Child:
    """A process whose stderr lines are read in a thread, so waiting for one
    has a deadline."""
    running = []

    def __init__(self, argv, *, socks=(), env=None, stdin=subprocess.DEVNULL,
                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                 **popen):
        if socks:
            popen.update(preexec_fn=on_fds(*socks), close_fds=False)
        self.process = subprocess.Popen(
            argv, env=base_env() if env is None else env, stdin=stdin,
            stdout=stdout, stderr=stderr, universal_newlines=True, **popen)
        Child.running.append(self)
        self.pid = self.process.pid
        # A child in a session of its own is stopped with all it started.
        self.group = popen.get("start_new_session", False)
        self.lines = []
        self._queue = queue.Queue()
        self._reader = None
        if stderr is subprocess.PIPE:
            self._reader = threading.Thread(target=self._read, daemon=True)
            self._reader.start()

    def _read(self):
        for line in self.process.stderr:
            self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, text, timeout=TIMEOUT):
        """The next stderr line that contains text."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                line = self._queue.get(timeout=max(remaining, 0.001))
            except queue.Empty:
                raise AssertionError("no line with %r within %s s: %r"
                                     % (text, timeout, self.lines))
            if line is None:
                self._queue.put(None)
                raise AssertionError("stderr closed (exit %r) before a line "
                                     "with %r: %r" % (self.process.poll(),
                                                      text, self.lines))
            self.lines.append(line)
            if text in line:
                return line

    def listening(self, count=1):
        return [self.wait_for(" listening on ").rsplit(" ", 1)[1].strip()
                for _ in range(count)]

    def finish(self, timeout=TIMEOUT):
        """Wait for the exit; the exit status."""
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
        else:
            timed_out = False
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait(TIMEOUT)
            if self.group:
                try:
                    os.killpg(self.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if self._reader is not None:
                self._reader.join(TIMEOUT)
                while True:
                    try:
                        line = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if line is not None:
                        self.lines.append(line)
                if not self._reader.is_alive():
                    self.process.stderr.close()
        if timed_out:
            raise AssertionError("pid %d still running after %s s: %r"
                                 % (self.pid, timeout, self.text()))
        return self.process.returncode

    def stop(self):
        if self.process.poll() is None:
            self.process.kill()
        self.finish()

    def text(self):
        return "".join(self.lines)


def reap():
    while Child.running:
        Child.running.pop().stop()


@pytest.fixture(autouse=True)
def reap_children():
    yield
    reap()


@pytest.fixture
def echo_server():
    """conftest's echo server, but the children go first at teardown: a
    daemon left running by a failed test holds connections to it."""
    peer = EchoServer()
    yield peer
    reap()
    peer.close()


class NotifySocket:
    """A datagram socket in the place of systemd's NOTIFY_SOCKET: a path, or
    a name in the abstract namespace ("@name")."""

    def __init__(self, path=None):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if path is None:
            name = "torsocksd-test-%d-%s" % (os.getpid(), os.urandom(6).hex())
            self.sock.bind("\0" + name)
            self.address = "@" + name
        else:
            self.sock.bind(path)
            self.address = path
        self.sock.settimeout(TIMEOUT)

    def env(self, **more):
        return dict(base_env(), NOTIFY_SOCKET=self.address, **more)

    def receive(self):
        try:
            return self.sock.recv(4096).decode().split("\n")
        except socket.timeout:
            raise AssertionError("no notification within %s s" % TIMEOUT)

    def wait_ready(self):
        message = self.receive()
        assert "READY=1" in message, message
        return message

    def close(self):
        self.sock.close()


@pytest.fixture
def notify():
    sockets = []

    def make(path=None):
        sockets.append(NotifySocket(path))
        return sockets[-1]
    yield make
    for sock in sockets:
        sock.close()


# -- sockets ------------------------------------------------------------------

def tcp_listener(host="127.0.0.1", port=0):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        if family == socket.AF_INET6:
            listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        listener.bind((host, port))
        listener.listen(16)
    except OSError:
        listener.close()
        raise
    return listener


def unix_listener(path):
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    return listener


@pytest.fixture
def sockets():
    """Sockets a test makes: closed at teardown."""
    made = []
    yield made
    for sock in made:
        sock.close()


def listeners_for_activation(sockets, tmp_path):
    """127.0.0.1, [::1] when there is IPv6, and a Unix socket: the kinds of
    socket a socket unit can pass."""
    listeners = [tcp_listener("127.0.0.1")]
    if ipv6_loopback():
        listeners.append(tcp_listener("::1"))
    listeners.append(unix_listener(str(tmp_path / "socks.sock")))
    sockets.extend(listeners)
    return listeners


def describe(sock):
    return torsocksd.format_address(sock.getsockname())


def client_for(address):
    """A blocking client connected to a "listening on" address."""
    if address.startswith("unix:"):
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.settimeout(TIMEOUT)
        try:
            client.connect(address[len("unix:"):])
        except OSError:
            client.close()
            raise
        return client
    host, _, port = address.rpartition(":")
    return socket.create_connection((host.strip("[]"), int(port)),
                                    timeout=TIMEOUT)


def socks_connect(client, port, reply_size=10):
    """SOCKS5 CONNECT to 127.0.0.1:port over client; checks the replies."""
    greeting, request = socks5_connect_request("127.0.0.1", port)
    client.sendall(greeting + request)
    assert recv_exactly(client, 2) == b"\x05\x00"
    reply = recv_exactly(client, reply_size)
    assert reply[:2] == b"\x05\x00", reply


def relay_round_trip(client, echo_port, reply_size=10):
    """CONNECT to the echo server, send PAYLOAD, get it back, finish."""
    socks_connect(client, echo_port, reply_size)
    client.sendall(PAYLOAD)
    assert recv_exactly(client, len(PAYLOAD)) == PAYLOAD
    client.shutdown(socket.SHUT_WR)
    assert recv_until_eof(client) == b""


def round_trip_via(address, echo_port):
    family_reply = 10 if re.match(r"\d", address) else 22
    with client_for(address) as client:
        relay_round_trip(client, echo_port, family_reply)


def proc_fields(pid, name):
    with open("/proc/%d/%s" % (pid, name)) as status:
        return status.read()


def initial_environment(pid):
    """The environment pid was started with (/proc/PID/environ shows that
    one only: it does not follow unsetenv())."""
    with open("/proc/%d/environ" % pid, "rb") as environ:
        entries = environ.read().split(b"\0")
    return dict(entry.decode().split("=", 1) for entry in entries if entry)


def fd_is_cloexec(pid, fd):
    flags = re.search(r"^flags:\s*([0-7]+)$",
                      proc_fields(pid, "fdinfo/%d" % fd), re.M).group(1)
    return bool(int(flags, 8) & os.O_CLOEXEC)


def wait_for_file(path, text, timeout=TIMEOUT):
    """The contents of path once they contain text (polled: the daemon
    writes it, nothing tells us when)."""
    deadline = time.monotonic() + timeout
    contents = ""
    while time.monotonic() < deadline:
        if os.path.exists(path):
            with open(path) as log_file:
                contents = log_file.read()
            if text in contents:
                return contents
        time.sleep(0.02)
    raise AssertionError("%s has no %r after %s s: %r"
                         % (path, text, timeout, contents))


# =============================================================================
# The man page
# =============================================================================

def help_options():
    helped = subprocess.run([sys.executable, SCRIPT, "--help"],
                            stdout=subprocess.PIPE, universal_newlines=True,
                            timeout=TIMEOUT, check=True)
    # Each option starts a line of its own, indented by two spaces.
    options = set(re.findall(r"^  (?:-\w, )?(--[a-z][a-z0-9-]*)",
                             helped.stdout, re.M))
    assert len(options) > 30, helped.stdout
    return options


def man_source():
    with open(MAN_PAGE) as page:
        return page.read()


def test_man_page_documents_every_option_of_help():
    """Each long option --help shows has an item in the man page's list, and
    the list has no option --help does not know."""
    source = man_source()
    documented = set("--" + name for name in
                     re.findall(r"^\.It Fl (?:h , Fl )?-([a-z0-9-]+)",
                                source, re.M))
    listed = help_options()
    assert listed - documented == set(), "options missing from the man page"
    assert documented - listed == set(), "the man page has stale options"
    synopsis = source.split(".Sh SYNOPSIS", 1)[1].split(".Sh ", 1)[0]
    for option in listed - {"--help", "--version"}:
        assert re.search(r"Fl .*%s(?![a-z-])" % re.escape(option[1:]),
                         synopsis), "%s is not in the SYNOPSIS" % option


def test_man_page_has_the_sections_and_facts():
    source = man_source()
    assert re.search(r"^\.Dt TORSOCKSD 8$", source, re.M)
    sections = re.findall(r"^\.Sh (.+)$", source, re.M)
    for section in ("NAME", "SYNOPSIS", "DESCRIPTION", "SIGNALS",
                    "ENVIRONMENT", "FILES", "EXIT STATUS", "EXAMPLES",
                    "SEE ALSO", "STANDARDS"):
        assert section in sections
    for fact in ("0xF0", "0xF1", "0xF2", "HTTP/1.0 501", "LISTEN_PID",
                 "LISTEN_FDS", "LISTEN_FDNAMES", "NOTIFY_SOCKET", "READY=1",
                 "STOPPING=1", "SIGTERM", "SIGINT", "SIGHUP", "SIGUSR1",
                 "RFC 1928", "RFC 1929", "socks-extensions",
                 "systemd-socket-activate", "torsocksd.Server", "Fl -inetd"):
        assert fact in source, fact
    exit_status = source.split(".Sh EXIT STATUS", 1)[1].split(".Sh ", 1)[0]
    codes = [int(code) for code in re.findall(r"^\.It (\d+)$", exit_status,
                                              re.M)]
    assert codes == [0, 2, torsocksd.EX_USAGE, torsocksd.EX_UNAVAILABLE]
    # The systemd unit and the inetd line the EXAMPLES show are the ones in
    # contrib/.
    assert "contrib/torsocksd.socket contrib/torsocksd.service" in source


# Notes that depend on which other manuals this machine has installed, not
# on the page: "Xr foo 1" is not installed, or mandoc.db is out of date.
MACHINE_DEPENDENT = re.compile(r"STYLE: referenced manual not found: Xr "
                               r"|outdated mandoc\.db lacks ")


def test_man_page_is_clean_under_mandoc_lint():
    mandoc = require_program("mandoc")
    result = subprocess.run([mandoc, "-T", "lint", MAN_PAGE],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            universal_newlines=True, timeout=TIMEOUT)
    notes = [line for line in result.stdout.splitlines()
             if not MACHINE_DEPENDENT.search(line)]
    assert notes == []
    rendered = subprocess.run([mandoc, "-T", "ascii", MAN_PAGE],
                              stdout=subprocess.PIPE, universal_newlines=True,
                              timeout=TIMEOUT, check=True).stdout
    rendered = re.sub(r".\x08", "", rendered)      # no overstrike
    assert "--drain-timeout" in rendered and "\\-" not in rendered


def test_man_page_is_clean_under_groff():
    groff = require_program("groff")
    result = subprocess.run([groff, "-ww", "-z", "-mdoc", MAN_PAGE],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            universal_newlines=True, timeout=TIMEOUT)
    assert (result.returncode, result.stdout) == (0, "")


# =============================================================================
# The contrib files, read
# =============================================================================

def seconds(value):
    match = re.fullmatch(r"(\d+)(s|sec)?", value)
    assert match, value
    return int(match.group(1))


def test_systemd_units_say_what_they_must():
    socket_unit = contrib("torsocksd.socket")
    assert unit_values(socket_unit, "Socket", "ListenStream") == [
        "127.0.0.1:9050", "[::1]:9050"]
    assert unit_value(socket_unit, "Socket", "BindIPv6Only") == "ipv6-only"
    assert unit_values(socket_unit, "Socket", "Accept") in ([], ["no"])
    assert unit_value(contrib("torsocksd.socket.d", "accept.conf"), "Socket",
                      "Accept") == "yes"
    drain = torsocksd.build_argument_parser().get_default("drain_timeout")
    assert exec_start("torsocksd.service") == [
        INSTALLED_PYTHON, INSTALLED_SCRIPT, "--config", INSTALLED_CONFIG]
    # A process per connection imports the bytecode made at install time
    # (README, "Footprint") instead of compiling the script each time.
    assert exec_start("torsocksd@.service") == [
        INSTALLED_PYTHON, "-m", "torsocksd", "--config", INSTALLED_CONFIG]
    assert local_directory("torsocksd@.service") == ROOT
    with open(contrib("torsocksd@.service")) as unit_text:
        assert "python3 -m py_compile %s" % INSTALLED_SCRIPT \
            in unit_text.read()
    for unit in ("torsocksd.service", "torsocksd@.service"):
        path = contrib(unit)
        for key, value in (("DynamicUser", "yes"), ("NoNewPrivileges", "yes"),
                           ("ProtectSystem", "strict"), ("ProtectHome", "yes"),
                           ("PrivateTmp", "yes"), ("PrivateDevices", "yes"),
                           ("RestrictAddressFamilies",
                            "AF_INET AF_INET6 AF_UNIX"),
                           ("KillSignal", "SIGTERM")):
            assert unit_value(path, "Service", key) == value, (unit, key)
        assert unit_values(path, "Service", "CapabilityBoundingSet") == []
        assert "@system-service" in unit_values(path, "Service",
                                                "SystemCallFilter")
        # systemd must not kill a draining torsocksd before it is done.
        assert seconds(unit_value(path, "Service", "TimeoutStopSec")) \
            > drain + 5
    service = contrib("torsocksd.service")
    assert unit_value(service, "Service", "Type") == "notify"
    assert unit_value(service, "Service", "ExecReload") \
        == "/bin/kill -HUP $MAINPID"
    assert unit_value(service, "Service", "KillMode") == "mixed"
    assert unit_value(service, "Unit", "Requires") == "torsocksd.socket"
    # One connection per instance: torsocksd sends no READY=1 then, so the
    # template must not wait for one.
    assert unit_values(contrib("torsocksd@.service"), "Service", "Type") \
        in ([], ["simple"], ["exec"])


def test_openrc_script_is_valid_shell_with_a_long_enough_stop_retry():
    script = contrib("openrc", "torsocksd")
    with open(script) as text:
        assert text.readline() == "#!/sbin/openrc-run\n"
    assert os.access(script, os.X_OK)
    subprocess.run(["sh", "-n", script], check=True, timeout=TIMEOUT)
    command, args, user, retry = openrc_settings("")
    assert command == INSTALLED_PYTHON
    assert shlex.split(args) == [INSTALLED_SCRIPT, "--syslog", "--config",
                                 INSTALLED_CONFIG]
    _, args, _, _ = openrc_settings("--listen [::1]:9050")
    assert shlex.split(args) == [INSTALLED_SCRIPT, "--syslog", "--config",
                                 INSTALLED_CONFIG, "--listen", "[::1]:9050"]
    assert user.split(":")[0] == "nobody"
    drain = torsocksd.build_argument_parser().get_default("drain_timeout")
    assert int(re.match(r"TERM/(\d+)/", retry).group(1)) > drain + 5


def systemd_analyze(tmp_path, units):
    """systemd-analyze verify in a directory holding only these contrib
    files, with the man page where man(1) finds it for Documentation=."""
    program = require_program("systemd-analyze")
    folder = tmp_path / "units"
    for unit in units:
        target = folder / unit
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(contrib(unit), str(target))
    manual = tmp_path / "man" / "man8"
    manual.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(MAN_PAGE, str(manual / "torsocksd.8"))
    options = [] if shutil.which("man") else ["--man=no"]
    return subprocess.run(
        [program, "verify"] + options + [str(folder / unit) for unit in units
                                         if unit.endswith(("socket",
                                                           "service"))],
        env=dict(base_env(), MANPATH=str(tmp_path / "man")),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        universal_newlines=True, timeout=60)


def test_systemd_analyze_verify_accept_no_units(tmp_path):
    result = systemd_analyze(tmp_path, ["torsocksd.socket",
                                        "torsocksd.service"])
    assert (result.returncode, result.stdout) == (0, "")


def test_systemd_analyze_verify_accept_yes_units(tmp_path):
    accept = ["torsocksd.socket", "torsocksd.socket.d/accept.conf"]
    result = systemd_analyze(tmp_path, accept + ["torsocksd@.service"])
    assert (result.returncode, result.stdout) == (0, "")
    # The drop-in is what makes the socket start torsocksd@ instances:
    # without the template, verify must miss it.
    shutil.rmtree(str(tmp_path / "units"))
    missing = systemd_analyze(tmp_path, accept)
    assert missing.returncode != 0 and "torsocksd@" in missing.stdout


@pytest.mark.parametrize("unit", ["torsocksd.service", "torsocksd@.service"])
def test_systemd_analyze_security_exposure_is_ok(tmp_path, unit):
    """systemd's own rating of the sandbox: at most 1.9 ("OK")."""
    program = require_program("systemd-analyze")
    target = tmp_path / unit
    shutil.copyfile(contrib(unit), str(target))
    result = subprocess.run(
        [program, "security", "--offline=true", "--threshold=19",
         "--no-pager", str(target)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        universal_newlines=True, timeout=60)
    if "--offline" in result.stdout and "unrecognized" in result.stdout:
        pytest.skip("systemd-analyze security has no --offline")
    assert result.returncode == 0, result.stdout


# =============================================================================
# systemd socket activation, Accept=no
# =============================================================================

def test_systemd_socket_activate_accept_no(tmp_path, echo_server, notify):
    """systemd-socket-activate binds what torsocksd.socket lists (port
    changed) and a Unix socket, and execs torsocksd.service's ExecStart= at
    the first client; torsocksd serves on all of them."""
    activate = require_program("systemd-socket-activate")
    ready = notify()
    addresses = []
    for listen in unit_values(contrib("torsocksd.socket"), "Socket",
                              "ListenStream"):
        host = listen.rsplit(":", 1)[0]
        if host.startswith("[") and not ipv6_loopback():
            continue
        with socket.socket(socket.AF_INET6 if host.startswith("[")
                           else socket.AF_INET) as probe:
            probe.bind((host.strip("[]"), 0))
            addresses.append("%s:%d" % (host, probe.getsockname()[1]))
    addresses.append(str(tmp_path / "socks.sock"))
    argv = [activate]
    for address in addresses:
        argv += ["-l", address]
    argv += ["-E", "NOTIFY_SOCKET=" + ready.address]
    daemon = Child(argv + local_command(exec_start("torsocksd.service")))
    for number, address in enumerate(addresses, 3):
        daemon.wait_for("Listening on %s as %d." % (address, number))
    # The first client starts torsocksd; it waits in the backlog.
    with client_for(addresses[0]) as first:
        daemon.wait_for("Execing ")
        ready.wait_ready()
        listening = daemon.listening(len(addresses))
        assert listening == addresses[:-1] + ["unix:" + addresses[-1]]
        relay_round_trip(first, echo_server.port)
    for address in listening[1:]:
        round_trip_via(address, echo_server.port)
    environ = initial_environment(daemon.pid)
    assert environ["LISTEN_PID"] == str(daemon.pid)
    assert environ["LISTEN_FDS"] == str(len(addresses))
    for fd in range(3, 3 + len(addresses)):
        assert fd_is_cloexec(daemon.pid, fd)
    daemon.process.send_signal(signal.SIGTERM)
    assert "STOPPING=1" in ready.receive()
    assert daemon.finish() == 0
    assert "Traceback" not in daemon.text()


def test_socket_activation_without_systemd(tmp_path, echo_server, sockets,
                                           notify):
    """Listening sockets made here on fds 3, 4, ... with LISTEN_PID set by
    the shell that then execs torsocksd.service's ExecStart=, as systemd
    does."""
    listeners = listeners_for_activation(sockets, tmp_path)
    ready = notify()
    command = local_command(exec_start("torsocksd.service"))
    daemon = Child(activated(command, len(listeners)), socks=listeners,
                   env=ready.env())
    for listener in listeners:
        listener.close()        # torsocksd holds them now
    listening = daemon.listening(len(listeners))
    ready.wait_ready()
    for address in listening:
        round_trip_via(address, echo_server.port)
    assert listening[-1] == "unix:" + str(tmp_path / "socks.sock")
    environ = initial_environment(daemon.pid)
    assert (environ["LISTEN_PID"], environ["LISTEN_FDS"]) == (
        str(daemon.pid), str(len(listeners)))
    for fd in range(3, 3 + len(listeners)):
        assert fd_is_cloexec(daemon.pid, fd)
    daemon.process.send_signal(signal.SIGTERM)
    assert "STOPPING=1" in ready.receive()
    assert daemon.finish() == 0
    # Not torsocksd's socket to remove: the socket unit owns the path.
    assert os.path.exists(str(tmp_path / "socks.sock"))


# Runs torsocksd.py exactly as python3 would, then reports what a program it
# started would inherit.
REPORTER = """\
import os, runpy, subprocess, sys
report, script = sys.argv[1], sys.argv[2]
sys.argv = sys.argv[2:]
status = "returned without sys.exit()"
try:
    runpy.run_path(script, run_name="__main__")
except SystemExit as end:
    status = end.code
names = sorted(name for name in os.environ if name.startswith("LISTEN_"))
inherited = subprocess.run(["env"], stdout=subprocess.PIPE,
                           universal_newlines=True).stdout.splitlines()
with open(report, "w") as out:
    out.write(repr((status, names, sorted(line.split("=")[0] for line in
                                          inherited
                                          if line.startswith("LISTEN_")))))
"""


def test_socket_activation_unsets_listen_variables(tmp_path, sockets,
                                                   notify):
    """LISTEN_PID, LISTEN_FDS and LISTEN_FDNAMES are gone from the daemon's
    environment (os.environ and the C environ a child would get).
    /proc/PID/environ cannot show this: it keeps the environment the
    process started with."""
    listener = tcp_listener()
    sockets.append(listener)
    ready = notify()
    report = tmp_path / "report"
    daemon = Child(activated([sys.executable, "-c", REPORTER, str(report),
                              SCRIPT], 1),
                   socks=[listener],
                   env=ready.env(LISTEN_FDNAMES="torsocksd.socket"))
    assert daemon.listening() == [describe(listener)]
    ready.wait_ready()
    assert initial_environment(daemon.pid)["LISTEN_PID"] == str(daemon.pid)
    daemon.process.send_signal(signal.SIGTERM)
    assert daemon.finish() == 0
    assert report.read_text() == repr((0, [], []))


@pytest.mark.parametrize("extra", [["--listen", "127.0.0.1:0"], ["--inetd"],
                                   ["--inetd-wait"]])
def test_listen_fds_with_other_sockets_is_a_usage_error(sockets, extra):
    listener = tcp_listener()
    sockets.append(listener)
    daemon = Child(activated([sys.executable, SCRIPT] + extra, 1),
                   socks=[listener])
    assert daemon.finish() == 2
    assert "LISTEN_FDS" in daemon.text()
    assert "listening on" not in daemon.text()


def test_listen_variables_for_another_process_are_ignored(sockets):
    """LISTEN_PID names the process the sockets are for; torsocksd is not
    it, so it binds its own listener."""
    listener = tcp_listener()
    sockets.append(listener)
    daemon = Child(activated([sys.executable, SCRIPT, "--port", "0"], 1,
                             pid=1), socks=[listener])
    (address,) = daemon.listening()
    assert address.startswith("127.0.0.1:") and address != describe(listener)


def test_passed_datagram_socket_is_refused(sockets):
    datagram = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sockets.append(datagram)
    datagram.bind(("127.0.0.1", 0))
    daemon = Child(activated([sys.executable, SCRIPT], 1), socks=[datagram])
    assert daemon.finish() == torsocksd.EX_USAGE
    assert "not a stream socket" in daemon.text()


# =============================================================================
# systemd socket activation, Accept=yes
# =============================================================================

def test_systemd_socket_activate_accept_yes(echo_server):
    """systemd-socket-activate -a accepts and starts torsocksd@.service's
    ExecStart= for the one connection, which it serves before exiting."""
    activate = require_program("systemd-socket-activate")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        address = "127.0.0.1:%d" % probe.getsockname()[1]
    manager = Child([activate, "-a", "-l", address]
                    + local_command(exec_start("torsocksd@.service")),
                    cwd=local_directory("torsocksd@.service"))
    manager.wait_for("Listening on %s as 3." % address)
    with client_for(address) as client:
        spawned = manager.wait_for("Spawned ")
        pid = int(re.search(r" as PID (\d+)", spawned).group(1))
        assert pid != manager.pid
        relay_round_trip(client, echo_server.port)
    manager.wait_for("Child %d died with code 0" % pid)
    assert "conn 1 from 127.0.0.1:" in manager.text()
    assert "listening on" not in manager.text()
    assert not os.path.exists("/proc/%d" % pid)
    manager.stop()


def test_connected_socket_on_fd_3_is_one_client(sockets, echo_server):
    """What systemd does for Accept=yes: the connection on fd 3, with
    LISTEN_FDNAMES=connection; torsocksd serves it and exits 0."""
    client, served = connected_pair("tcp", sockets)
    daemon = Child(activated(local_command(exec_start("torsocksd@.service")),
                             1),
                   socks=[served], env=dict(base_env(),
                                            LISTEN_FDNAMES="connection"),
                   cwd=local_directory("torsocksd@.service"))
    served.close()
    relay_round_trip(client, echo_server.port)
    assert daemon.finish() == 0
    assert "conn 1 from 127.0.0.1:" in daemon.text()


# =============================================================================
# sd_notify
# =============================================================================

@pytest.mark.parametrize("kind", ["path", "abstract"])
def test_sd_notify_ready_with_status_then_stopping(tmp_path, notify, sockets,
                                                   echo_server, kind):
    """torsocksd.service is Type=notify: READY=1 (with a STATUS= line) once
    it listens, STOPPING=1 at SIGTERM."""
    ready = notify(str(tmp_path / "notify") if kind == "path" else None)
    listener = tcp_listener()
    sockets.append(listener)
    daemon = Child(activated(local_command(exec_start("torsocksd.service")),
                             1), socks=[listener], env=ready.env())
    message = ready.wait_ready()
    status = [line for line in message if line.startswith("STATUS=")]
    assert len(status) == 1 and describe(listener) in status[0], message
    # Ready means ready: a client is served at once.
    round_trip_via(describe(listener), echo_server.port)
    daemon.process.send_signal(signal.SIGTERM)
    assert "STOPPING=1" in ready.receive()
    assert daemon.finish() == 0


def test_workers_stop_on_sigterm_right_after_ready(sockets, notify):
    """With --workers too, READY=1 means ready: a SIGTERM sent as soon as it
    arrives stops every worker and the main process.  (Tried three times: a
    worker that cannot handle signals yet loses it only sometimes.)"""
    command = local_command(exec_start("torsocksd.service"))
    for attempt in range(3):
        listener = tcp_listener()
        sockets.append(listener)
        ready = notify()
        daemon = Child(activated(command + ["--workers", "2"], 1),
                       socks=[listener], env=ready.env(),
                       start_new_session=True)
        listener.close()
        ready.wait_ready()
        daemon.process.send_signal(signal.SIGTERM)
        assert "STOPPING=1" in ready.receive()
        assert daemon.finish() == 0, "attempt %d: %r" % (
            attempt, daemon.text())


# =============================================================================
# inetd and xinetd
# =============================================================================

def inetd_nowait_command(source):
    """(executable, argv) that inetd or xinetd would start."""
    if source == "xinetd":
        settings = xinetd_service()
        assert (settings["socket_type"], settings["wait"]) == ("stream", "no")
        program = settings["server"]
        argv = [os.path.basename(program)] + shlex.split(
            settings["server_args"])
    else:
        fields, program, argv = inetd_entry("nowait")
        assert fields[1:4] == ["stream", "tcp", "nowait"]
    assert program == INSTALLED_PYTHON
    return sys.executable, local_command(argv)


def connected_pair(transport, sockets):
    if transport == "socketpair":
        pair = socket.socketpair()
        sockets.extend(pair)
        pair[0].settimeout(TIMEOUT)
        return pair
    with tcp_listener() as listener:
        client = socket.create_connection(listener.getsockname(),
                                          timeout=TIMEOUT)
        sockets.append(client)
        served, _ = listener.accept()
        sockets.append(served)
    return client, served


@pytest.mark.parametrize("source, transport, log_file", [
    ("inetd.conf", "tcp", True),
    ("inetd.conf", "socketpair", True),
    ("xinetd", "tcp", True),
    ("inetd.conf", "tcp", False),     # as written: the log goes to syslog
])
def test_inetd_nowait_serves_one_client_and_exits(
        tmp_path, sockets, echo_server, source, transport, log_file):
    """The connection is the daemon's stdin, stdout and stderr; it serves
    that client and exits 0, and not a byte of log reaches the client.
    (--test-socks makes a log line while the client still reads: the line
    at the end comes after the client's side is shut down.)"""
    executable, argv = inetd_nowait_command(source)
    argv += ["--test-socks"]
    log_path = str(tmp_path / "torsocksd.log")
    if log_file:
        argv += ["--log-file", log_path]
    client, served = connected_pair(transport, sockets)
    daemon = Child(argv, executable=executable, stdin=served, stdout=served,
                   stderr=served)
    served.close()
    greeting, request = socks5_connect_request("127.0.0.1", echo_server.port)
    client.sendall(greeting + request + PAYLOAD)
    # Method, then the CONNECT reply (ATYP 4 for a client on a Unix
    # socket), then the echo: exactly these bytes, and then EOF.
    reply = (b"\x05\x00\x00\x01" + bytes(6) if transport == "tcp"
             else b"\x05\x00\x00\x04" + bytes(18))
    expected = b"\x05\x00" + reply + PAYLOAD
    assert recv_exactly(client, len(expected)) == expected
    client.shutdown(socket.SHUT_WR)
    assert recv_until_eof(client) == b""      # no log text, ever
    assert daemon.finish() == 0
    if log_file:
        with open(log_path) as logged:
            text = logged.read()
        assert "CONNECT request for [scrubbed]:%d is unsafe" \
            % echo_server.port in text
        assert "conn 1 from " in text and "Traceback" not in text


def test_inetd_wait_serves_clients_then_exits_when_idle(tmp_path, sockets,
                                                        echo_server):
    """The listening socket is fd 0 (and 1 and 2, as inetd gives it);
    torsocksd accepts two clients one after the other, then exits after
    --idle-exit seconds without one."""
    fields, program, argv = inetd_entry("wait")
    assert fields[1:4] == ["stream", "tcp", "wait"]
    assert program == INSTALLED_PYTHON
    log_path = str(tmp_path / "torsocksd.log")
    listener = tcp_listener()
    sockets.append(listener)
    address = describe(listener)
    first = client_for(address)     # waits in the backlog
    sockets.append(first)
    daemon = Child(local_command(argv) + ["--log-file", log_path,
                                          "--idle-exit", "1"],
                   executable=sys.executable, stdin=listener, stdout=listener,
                   stderr=listener)
    listener.close()
    relay_round_trip(first, echo_server.port)
    with client_for(address) as second:
        socks_connect(second, echo_server.port)
        second.sendall(PAYLOAD)
        assert recv_exactly(second, len(PAYLOAD)) == PAYLOAD
        busy_until = time.monotonic()   # before the last connection ends
        second.shutdown(socket.SHUT_WR)
        assert recv_until_eof(second) == b""
    assert daemon.finish() == 0
    assert time.monotonic() - busy_until >= 1.0
    with open(log_path) as logged:
        text = logged.read()
    assert "conn 1 from " in text and "conn 2 from " in text
    assert "idle for 1 s: exiting" in text


# =============================================================================
# OpenRC
# =============================================================================

def test_openrc_command_serves_and_reloads(tmp_path, notify, echo_server):
    """command and command_args as openrc-run builds them (TORSOCKSD_OPTS
    from conf.d), run; reload is SIGHUP, stop is SIGTERM."""
    command, args, _, _ = openrc_settings("--listen 127.0.0.1:0")
    assert command == INSTALLED_PYTHON
    log_path = str(tmp_path / "torsocksd.log")
    ready = notify()
    daemon = Child(local_command([command] + shlex.split(args))
                   + ["--log-file", log_path], env=ready.env())
    ready.wait_ready()
    address = re.search(r"listening on (\S+)",
                        wait_for_file(log_path, "listening on")).group(1)
    round_trip_via(address, echo_server.port)
    daemon.process.send_signal(signal.SIGHUP)
    daemon.process.send_signal(signal.SIGUSR1)
    wait_for_file(log_path, "statistics: 1 accepted")
    daemon.process.send_signal(signal.SIGTERM)
    assert daemon.finish() == 0


# =============================================================================
# Signals
# =============================================================================

def authenticate(client, username, password):
    """The RFC 1929 answer to username and password (after 05 02)."""
    client.sendall(socks5_greeting(2))
    assert recv_exactly(client, 2) == b"\x05\x02"
    client.sendall(userpass(username, password))
    return recv_exactly(client, 2)


def daemon_with_credentials(users, notify):
    """torsocksd on 127.0.0.1:0 with --credentials users, once it is ready;
    (the Child, its address)."""
    ready = notify()
    daemon = Child([sys.executable, SCRIPT, "--listen", "127.0.0.1:0",
                    "--credentials", str(users)], env=ready.env())
    (address,) = daemon.listening()
    ready.wait_ready()
    return daemon, address


def test_sighup_rereads_credentials_and_keeps_open_connections(
        tmp_path, notify, echo_server):
    users = tmp_path / "users"
    users.write_text("# test users\nalice:old password\n")
    daemon, address = daemon_with_credentials(users, notify)
    with client_for(address) as kept:
        assert authenticate(kept, b"alice", b"old password") == b"\x01\x00"
        _, request = socks5_connect_request("127.0.0.1", echo_server.port)
        kept.sendall(request)
        assert recv_exactly(kept, 10)[:2] == b"\x05\x00"

        users.write_text("alice:new password\n")
        daemon.process.send_signal(signal.SIGHUP)
        daemon.wait_for("reload: applied")

        with client_for(address) as refused:
            assert authenticate(refused, b"alice", b"old password") \
                == b"\x01\x01"
            assert recv_until_eof(refused) == b""
        with client_for(address) as accepted:
            assert authenticate(accepted, b"alice", b"new password") \
                == b"\x01\x00"
            accepted.sendall(request)
            assert recv_exactly(accepted, 10)[:2] == b"\x05\x00"
            accepted.sendall(PAYLOAD)
            assert recv_exactly(accepted, len(PAYLOAD)) == PAYLOAD
        # The connection relayed before the reload still relays.
        kept.sendall(PAYLOAD)
        assert recv_exactly(kept, len(PAYLOAD)) == PAYLOAD
    daemon.process.send_signal(signal.SIGTERM)
    assert daemon.finish() == 0


def test_sighup_with_a_bad_credentials_file_keeps_the_old_ones(
        tmp_path, notify):
    users = tmp_path / "users"
    users.write_text("alice:secret\n")
    daemon, address = daemon_with_credentials(users, notify)
    users.write_text("no colon on this line\n")
    daemon.process.send_signal(signal.SIGHUP)
    daemon.wait_for("reload: nothing changed; the old configuration stays")
    with client_for(address) as client:
        assert authenticate(client, b"alice", b"secret") == b"\x01\x00"
    daemon.process.send_signal(signal.SIGTERM)
    assert daemon.finish() == 0


@pytest.mark.parametrize("contents", [
    pytest.param("", id="emptied"),
    pytest.param("# alice:secret\n\n", id="commented-out"),
])
def test_sighup_with_no_user_left_keeps_the_old_credentials(
        tmp_path, notify, echo_server, contents):
    """Emptying the credentials file (or commenting every user out) and
    sending SIGHUP must not switch authentication off: no-auth still gets
    05 ff, SOCKS4 still 5b, and the old user still gets through."""
    users = tmp_path / "users"
    users.write_text("alice:secret\n")
    daemon, address = daemon_with_credentials(users, notify)
    users.write_text(contents)
    daemon.process.send_signal(signal.SIGHUP)
    reloaded = daemon.wait_for("reload: ")
    with client_for(address) as client:
        client.sendall(b"\x05\x01\x00")
        assert recv_exactly(client, 2) == b"\x05\xff"
        assert recv_until_eof(client) == b""
    with client_for(address) as client:
        client.sendall(b"\x04\x01" + echo_server.port.to_bytes(2, "big")
                       + b"\x7f\x00\x00\x01alice\x00")
        assert recv_exactly(client, 8) == b"\x00\x5b" + bytes(6)
        assert recv_until_eof(client) == b""
    with client_for(address) as client:
        assert authenticate(client, b"alice", b"secret") == b"\x01\x00"
        _, request = socks5_connect_request("127.0.0.1", echo_server.port)
        client.sendall(request)
        assert recv_exactly(client, 10) == b"\x05\x00\x00\x01" + bytes(6)
        client.sendall(PAYLOAD)
        assert recv_exactly(client, len(PAYLOAD)) == PAYLOAD
    assert len(echo_server.accepted) == 1
    assert "reload: cannot read credentials: %s: no user:password line" \
        % users in reloaded
    assert " ERROR reload: " in reloaded
    daemon.process.send_signal(signal.SIGTERM)
    assert daemon.finish() == 0


def test_sighup_reopens_the_log_file(tmp_path, notify):
    """After logrotate moves the file away, SIGHUP makes a new one; lines
    after it go there, none to the old one."""
    log_path = str(tmp_path / "torsocksd.log")
    ready = notify()
    daemon = Child([sys.executable, SCRIPT, "--listen", "127.0.0.1:0",
                    "--log-file", log_path], env=ready.env())
    ready.wait_ready()
    wait_for_file(log_path, "listening on")
    os.rename(log_path, log_path + ".1")
    daemon.process.send_signal(signal.SIGHUP)
    # Signals are handled in order: the statistics come after the reopen.
    daemon.process.send_signal(signal.SIGUSR1)
    wait_for_file(log_path, "statistics:")
    daemon.process.send_signal(signal.SIGTERM)
    assert daemon.finish() == 0
    with open(log_path + ".1") as old:
        rotated = old.read()
    with open(log_path) as new:
        current = new.read()
    assert "listening on" in rotated and "statistics:" not in rotated
    assert "stopped" in current and "listening on" not in current
    assert daemon.text() == ""      # nothing on stderr with --log-file


def test_sigusr1_logs_statistics(notify, echo_server):
    ready = notify()
    daemon = Child([sys.executable, SCRIPT, "--listen", "127.0.0.1:0"],
                   env=ready.env())
    (address,) = daemon.listening()
    ready.wait_ready()
    round_trip_via(address, echo_server.port)
    daemon.process.send_signal(signal.SIGUSR1)
    line = daemon.wait_for("statistics:")
    assert ("statistics: 1 accepted, 0 open, 0 refused at accept, %d bytes "
            "relayed" % (2 * len(PAYLOAD))) in line, daemon.text()
    assert daemon.process.poll() is None        # still serving
    daemon.process.send_signal(signal.SIGTERM)
    assert daemon.finish() == 0


# =============================================================================
# Privileges and limits
# =============================================================================

def test_user_drops_root_and_still_serves(notify, echo_server):
    if os.geteuid() != 0:
        pytest.skip("--user needs root")
    nobody = pwd.getpwnam("nobody")
    ready = notify()        # abstract: nobody may send to it
    daemon = Child([sys.executable, SCRIPT, "--listen", "127.0.0.1:0",
                    "--user", "nobody"], env=ready.env())
    (address,) = daemon.listening()
    daemon.wait_for("running as nobody")
    ready.wait_ready()
    status = proc_fields(daemon.pid, "status")
    ids = {name: fields.split() for name, fields in
           re.findall(r"^(Uid|Gid|Groups):(.*)$", status, re.M)}
    assert ids["Uid"] == [str(nobody.pw_uid)] * 4
    assert ids["Gid"] == [str(nobody.pw_gid)] * 4
    assert sorted(ids["Groups"]) == sorted(
        str(group) for group in os.getgrouplist("nobody", nobody.pw_gid))
    round_trip_via(address, echo_server.port)
    daemon.process.send_signal(signal.SIGTERM)
    assert daemon.finish() == 0


def test_soft_file_limit_is_raised_to_the_hard_limit():
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 256:
        pytest.skip("hard RLIMIT_NOFILE is only %d" % hard)

    def lower():
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))

    daemon = Child([sys.executable, SCRIPT, "--listen", "127.0.0.1:0"],
                   preexec_fn=lower)
    daemon.listening()
    limits = proc_fields(daemon.pid, "limits")
    soft_now, hard_now = re.search(r"^Max open files\s+(\S+)\s+(\S+)",
                                   limits, re.M).groups()
    expected = "unlimited" if hard == resource.RLIM_INFINITY else str(hard)
    assert (soft_now, hard_now) == (expected, expected)


# =============================================================================
# Exit statuses the man page promises
# =============================================================================

@pytest.mark.parametrize("args, status, message", [
    (["--no-such-option"], 2, "unrecognized arguments"),
    (["--listen", "127.0.0.1:0", "--credentials", "/nonexistent/users"],
     torsocksd.EX_USAGE, "cannot read credentials"),
    (["--address", "0.0.0.0", "--port", "0"], torsocksd.EX_USAGE,
     "refusing to listen"),
    (["--listen", "127.0.0.1:0", "--user", "no-such-user-for-torsocksd"],
     torsocksd.EX_UNAVAILABLE, "cannot start"),
])
def test_exit_status(args, status, message):
    result = subprocess.run([sys.executable, SCRIPT] + args,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            universal_newlines=True, timeout=TIMEOUT,
                            env=base_env())
    assert result.returncode == status, result.stderr
    assert message in result.stderr
    assert result.stdout == ""


# =============================================================================
# The README's embedding example
# =============================================================================

README_USER = """

import socket

from conftest import recv_exactly


def test_the_readme_fixture(socks_proxy):
    scheme, _, address = socks_proxy.partition("://")
    host, _, port = address.rpartition(":")
    assert (scheme, host) == ("socks5h", "127.0.0.1")
    with socket.socket() as target:
        target.bind(("127.0.0.1", 0))
        target.listen(1)
        with socket.create_connection((host, int(port)), timeout=10) as c:
            c.sendall(b"\\x05\\x01\\x00"
                      b"\\x05\\x01\\x00\\x01\\x7f\\x00\\x00\\x01"
                      + target.getsockname()[1].to_bytes(2, "big"))
            assert recv_exactly(c, 12)[:4] == b"\\x05\\x00\\x05\\x00"
            served, _ = target.accept()
            with served:
                served.settimeout(10)
                c.sendall(b"ping")
                assert recv_exactly(served, 4) == b"ping"
"""


def test_readme_embedding_example_works_as_written(tmp_path):
    with open(README) as readme:
        text = readme.read()
    embedding = text.split("**Embedding.**", 1)[1]
    block = re.search(r"```python\n(.*?)```", embedding, re.S).group(1)
    assert "torsocksd.Server(" in block
    # The man page shows the same example.
    source = man_source()
    for line in block.splitlines():
        assert line in source
    test_file = tmp_path / "test_readme_example.py"
    test_file.write_text(block + README_USER)
    (tmp_path / "pytest.ini").write_text("[pytest]\nfilterwarnings = error\n")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         str(test_file)], cwd=str(tmp_path),
        env=dict(base_env(), PYTHONPATH=os.pathsep.join((ROOT, TESTS)),
                 PYTHONDONTWRITEBYTECODE="1"),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        universal_newlines=True, timeout=60)
    assert result.returncode == 0, result.stdout
    assert "1 passed" in result.stdout


def test_readme_deploying_section_matches_contrib_and_man_page():
    """Where the README's "Deploying" section, contrib/ and the man page
    say the same thing, they say it word for word."""
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
    with open(os.path.join(root, "README.md")) as file:
        readme = file.read()
    section = readme.split("## Deploying", 1)[1].split("\n## ", 1)[0]
    commands = [line[4:] for line in section.splitlines()
                if line.startswith("    $ ") or line.startswith("    # ")]
    assert len(commands) >= 7
    with open(os.path.join(root, "man", "torsocksd.8")) as file:
        man = file.read()
    examples = man.split(".Sh EXAMPLES", 1)[1].split(".Sh ", 1)[0]
    plain = examples.replace("\\-", "-").replace("\\e\n", "").replace("\\e", "\\")
    for command in commands:
        assert command in plain, command
    with open(os.path.join(root, "contrib", "inetd.conf")) as file:
        inetd_line = [line for line in file.read().splitlines()
                      if line and not line.startswith("#")][0]
    assert "\n    %s\n" % inetd_line in section
    with open(os.path.join(root, "contrib", "xinetd.d", "torsocksd")) as file:
        server_args = [line.split("=", 1)[1].strip()
                       for line in file.read().splitlines()
                       if line.strip().startswith("server_args")][0]
    assert "server_args = %s" % server_args in section


# =============================================================================
# Operating: the config file, reload and metrics, as README, man page and
# contrib/ describe them
# =============================================================================

def readme_section(title):
    with open(README) as readme:
        return readme.read().split("## %s\n" % title, 1)[1].split(
            "\n## ", 1)[0]


def indented_block(text, first_line):
    """The indented lines of the block that starts with first_line."""
    lines = text.split("\n    " + first_line + "\n", 1)[1].split("\n")
    block = [first_line]
    for line in lines:
        if not line.startswith("    "):
            break
        block.append(line[4:])
    return block


def test_example_config_file_is_valid_and_so_is_each_example_in_it(
        tmp_path):
    """contrib/torsocksd.conf passes --check-config as it is, and each
    option it shows commented out parses once uncommented."""
    path = contrib("torsocksd.conf")
    result = subprocess.run([sys.executable, SCRIPT, "--config", path,
                             "--check-config"], stderr=subprocess.PIPE,
                            universal_newlines=True, timeout=TIMEOUT,
                            env=base_env())
    assert result.returncode == 0, result.stderr
    parser = torsocksd.build_argument_parser()
    known = torsocksd.config_file_options(parser)
    with open(path) as file:
        text = file.read()
    assert INSTALLED_CONFIG in text
    examples = [line[1:] for line in text.splitlines()
                if line.startswith("#") and line[1:].split(" ", 1)[0] in known]
    assert len(examples) >= 15, examples
    for line in examples:
        single = tmp_path / "one.conf"
        single.write_text(line + "\n")
        problems = torsocksd.read_config_file(
            parser, str(single), argparse.Namespace())
        assert problems == [], line


def test_readme_and_man_page_cover_operating(tmp_path):
    section = readme_section("Operating")
    source = man_source()
    for needed in ("--config", "--check-config", "--metrics", "SIGHUP",
                   "RELOADING=1", "READY=1", "Server.reload()", "ConfigError",
                   "contrib/torsocksd.conf", "--workers"):
        assert needed in section, needed
    for needed in ("Fl -config", "Fl -check-config", "Fl -metrics",
                   "RELOADING=1", "MONOTONIC_USEC=", "Ss Reloading",
                   "Ss Metrics", "Ss Configuration file",
                   "Pa /etc/torsocksd/torsocksd.conf",
                   "Pa contrib/torsocksd.conf"):
        assert needed in source, needed
    # Every metric is described in both, and no other.
    names = {family.name for family in torsocksd.METRIC_FAMILIES}
    assert set(re.findall(r"\b((?:torsocksd|process)_[a-z_]+[a-z])",
                          section)) == names
    assert set(re.findall(r"\b((?:torsocksd|process)_[a-z_]+[a-z])",
                          source)) == names
    # The README's example file is the man page's, and it parses.
    example = indented_block(section, "listen 127.0.0.1:9050")
    man_example = source.split("\n.Ss Configuration file\n", 1)[1].split(
        ".Bd -literal -offset indent\n", 1)[1].split("\n.Ed\n", 1)[0]
    assert man_example.replace("\\-", "-").splitlines() == example
    config = tmp_path / "example.conf"
    config.write_text("\n".join(example) + "\n")
    assert torsocksd.read_config_file(torsocksd.build_argument_parser(),
                                      str(config), argparse.Namespace()) == []
    # So is the command that checks a file, and the Prometheus job's target
    # is the metrics address the example gives.
    examples = man_source().split(".Sh EXAMPLES", 1)[1].split(".Sh ", 1)[0]
    check = [line[6:] for line in section.splitlines()
             if line.startswith("    $ ")]
    assert check and all(command in examples.replace("\\-", "-")
                         for command in check)
    assert "targets: ['127.0.0.1:9051']" in section
    assert "metrics 127.0.0.1:9051" in example
