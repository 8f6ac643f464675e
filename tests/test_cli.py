"""The command line: defaults, options, signals, exit statuses."""

import fcntl
import ipaddress
import os
import select
import signal
import socket
import subprocess
import sys
import time

import pytest

import torsocksd
from conftest import TIMEOUT, free_port, recv_exactly, recv_until_eof

SCRIPT = os.path.join(os.path.dirname(__file__), os.pardir, "torsocksd.py")


@pytest.fixture(autouse=True)
def reap_daemons():
    yield
    for daemon in Daemon.started:
        daemon.kill()
    Daemon.started.clear()


class Daemon:
    """torsocksd as a child process; waits (bounded) for its "listening on"
    lines."""
    started = []

    def __init__(self, *args, listeners=1):
        self.process = subprocess.Popen([sys.executable, SCRIPT, *args],
                                        stderr=subprocess.PIPE)
        Daemon.started.append(self)
        self.lines = []
        self.listening = []
        unread = b""
        deadline = time.monotonic() + TIMEOUT
        while len(self.listening) < listeners:
            # os.read, not readline: a buffered reader would hide lines
            # from select.
            ready, _, _ = select.select([self.process.stderr], [], [],
                                        max(0.0, deadline - time.monotonic()))
            if not ready:
                raise AssertionError("daemon not listening after %.0f s: %r"
                                     % (TIMEOUT, self.lines))
            chunk = os.read(self.process.stderr.fileno(), 65536)
            if not chunk:
                raise AssertionError("daemon exited: %r" % self.lines)
            unread += chunk
            *complete, unread = unread.split(b"\n")
            for line in complete:
                line = line.decode() + "\n"
                self.lines.append(line)
                if " listening on " in line:
                    self.listening.append(line.rsplit(" ", 1)[1].strip())
        self.unread = unread

    def kill(self):
        if self.process.poll() is None:
            self.process.kill()
        self.process.communicate()

    def finish(self, timeout=TIMEOUT):
        _, rest = self.process.communicate(timeout=timeout)
        self.lines.extend((self.unread + rest).decode().splitlines(True))
        return self.process.returncode


def test_version_and_help():
    version = subprocess.run([sys.executable, SCRIPT, "--version"],
                             stdout=subprocess.PIPE, universal_newlines=True)
    assert version.stdout.strip() == "torsocksd " + torsocksd.__version__
    helped = subprocess.run([sys.executable, SCRIPT, "--help"],
                            stdout=subprocess.PIPE, universal_newlines=True)
    for option in ("--port", "--listen", "--credentials", "--safe-socks",
                   "--log-destinations", "--handshake-timeout"):
        assert option in helped.stdout


def test_default_address_is_loopback_and_sigterm_exits_cleanly():
    port = free_port()
    daemon = Daemon("--port", str(port))
    assert daemon.listening == ["127.0.0.1:%d" % port]
    daemon.process.send_signal(signal.SIGTERM)
    assert daemon.finish() == 0
    assert not any("Traceback" in line for line in daemon.lines)


def test_listen_ipv4_and_ipv6_together():
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    port = free_port()
    daemon = Daemon("--listen", "127.0.0.1:%d" % port,
                    "--listen", "[::1]:%d" % port, listeners=2)
    assert daemon.listening == ["127.0.0.1:%d" % port, "[::1]:%d" % port]
    with socket.create_connection(("::1", port), timeout=TIMEOUT) as client:
        # SOCKS5 refusal to a client on IPv6: the 22-byte ATYP 4 form.
        client.sendall(b"\x05\x01\x00\x05\x02\x00\x01\x7f\x00\x00\x01\x00\x50")
        assert recv_exactly(client, 2) == b"\x05\x00"
        assert recv_exactly(client, 22) == b"\x05\x07\x00\x04" + bytes(18)
    daemon.process.send_signal(signal.SIGINT)
    assert daemon.finish() == 0


def test_sigterm_drains_open_connections_then_second_signal_ends_them(
        echo_server):
    daemon = Daemon("--port", str(free_port()), "--drain-timeout", "30",
                    "--log-destinations")
    host, port = daemon.listening[0].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=TIMEOUT) as c:
        c.sendall(b"\x05\x01\x00\x05\x01\x00\x01\x7f\x00\x00\x01"
                  + echo_server.port.to_bytes(2, "big"))
        assert recv_exactly(c, 12) == b"\x05\x00\x05\x00\x00\x01" + bytes(6)
        daemon.process.send_signal(signal.SIGTERM)
        # The listener closes, but the open connection still relays.
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            try:
                socket.create_connection((host, int(port)), timeout=1).close()
            except OSError:
                break
            time.sleep(0.05)
        else:
            raise AssertionError("listener still open after SIGTERM")
        c.sendall(b"still here")
        assert recv_exactly(c, 10) == b"still here"
        daemon.process.send_signal(signal.SIGTERM)
        assert recv_until_eof(c) == b""
    assert daemon.finish() == 0
    assert any("cut at shutdown" in line for line in daemon.lines)


def test_port_in_use_is_an_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        result = subprocess.run(
            [sys.executable, SCRIPT, "--port", str(taken.getsockname()[1])],
            stderr=subprocess.PIPE, universal_newlines=True, timeout=TIMEOUT)
    assert result.returncode == 69
    assert "cannot start" in result.stderr


@pytest.mark.parametrize("spec", ["::1:9050", "127.0.0.1:port",
                                  "127.0.0.1:70000"])
def test_bad_listen_is_a_usage_error(spec):
    result = subprocess.run([sys.executable, SCRIPT, "--listen", spec],
                            stderr=subprocess.PIPE, universal_newlines=True,
                            timeout=TIMEOUT)
    assert result.returncode == 2
    assert "--listen" in result.stderr


@pytest.mark.parametrize("contents", [
    pytest.param("", id="empty"),
    pytest.param("# alice:secret\n\n   \n#bob:hunter2\n", id="commented-out"),
])
def test_credentials_file_without_a_user_is_refused_at_start(tmp_path,
                                                             contents):
    """Authentication never switches off by accident: a credentials file
    with no user:password line stops the start, naming the file."""
    users = tmp_path / "users"
    users.write_text(contents)
    result = subprocess.run(
        [sys.executable, SCRIPT, "--port", str(free_port()),
         "--credentials", str(users)],
        stderr=subprocess.PIPE, universal_newlines=True, timeout=TIMEOUT)
    assert result.returncode == torsocksd.EX_USAGE, result.stderr
    assert "cannot read credentials: %s: no user:password line" % users \
        in result.stderr
    assert "listening on" not in result.stderr


def test_destinations_are_scrubbed_by_default(echo_server):
    daemon = Daemon("--port", str(free_port()))
    host, port = daemon.listening[0].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=TIMEOUT) as c:
        c.sendall(b"\x05\x01\x00\x05\x01\x00\x03\x09localhost"
                  + echo_server.port.to_bytes(2, "big"))
        assert recv_exactly(c, 12)[:4] == b"\x05\x00\x05\x00"
    daemon.process.send_signal(signal.SIGTERM)
    assert daemon.finish() == 0
    text = "".join(daemon.lines)
    assert "CONNECT [scrubbed]:%d" % echo_server.port in text
    assert "localhost" not in text


def children_of(pid):
    with open("/proc/%d/task/%d/children" % (pid, pid)) as listing:
        return sorted(int(child) for child in listing.read().split())


def test_workers_share_the_listener_and_a_dead_worker_is_replaced(
        echo_server):
    # The main process's line and both workers': then both are forked.
    daemon = Daemon("--port", str(free_port()), "--workers", "2",
                    listeners=3)
    host, port = daemon.listening[0].rsplit(":", 1)
    workers = children_of(daemon.process.pid)
    assert len(workers) == 2
    for _ in range(4):
        with socket.create_connection((host, int(port)), timeout=TIMEOUT) as c:
            c.sendall(b"\x05\x01\x00\x05\x01\x00\x01\x7f\x00\x00\x01"
                      + echo_server.port.to_bytes(2, "big") + b"ping")
            assert recv_exactly(c, 16) == \
                b"\x05\x00\x05\x00\x00\x01" + bytes(6) + b"ping"
    os.kill(workers[0], signal.SIGKILL)
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        now = children_of(daemon.process.pid)
        if len(now) == 2 and workers[0] not in now:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the killed worker was not replaced")
    with socket.create_connection((host, int(port)), timeout=TIMEOUT) as c:
        c.sendall(b"\x05\x01\x00")
        assert recv_exactly(c, 2) == b"\x05\x00"
    daemon.process.send_signal(signal.SIGTERM)
    assert daemon.finish() == 0
    assert any("starting another" in line for line in daemon.lines)


class StderrPipe:
    """A child's stderr as a pipe that holds one page (4 KiB), read only
    while a line is waited for: a child that logs more blocks, and so
    stays where it is while nobody reads."""

    def __init__(self):
        self.reader, self.writer = os.pipe()
        fcntl.fcntl(self.writer, getattr(fcntl, "F_SETPIPE_SZ", 1031), 4096)
        self.text = ""

    def wait_for(self, text, count=1):
        """Read until text has come count times (None: until EOF)."""
        deadline = time.monotonic() + TIMEOUT
        while text is None or self.text.count(text) < count:
            ready, _, _ = select.select([self.reader], [], [], max(
                0.0, deadline - time.monotonic()))
            if not ready:
                raise AssertionError("no %r within %s s: %r"
                                     % (text, TIMEOUT, self.text))
            chunk = os.read(self.reader, 4096)
            if not chunk and text is None:
                return
            if not chunk:
                raise AssertionError("stderr closed before %r: %r"
                                     % (text, self.text))
            self.text += chunk.decode()

    def close(self):
        for fd in (self.reader, self.writer):
            if fd is not None:
                os.close(fd)
        self.reader = self.writer = None


@pytest.mark.parametrize("number", [signal.SIGHUP, signal.SIGTERM])
def test_workers_handle_a_signal_sent_at_the_first_listening_line(
        number, tmp_path):
    # From the first "listening on" line on, as without --workers: SIGHUP
    # reloads and SIGTERM drains, even before the workers are forked.  Its
    # 150 listeners' lines do not fit in the pipe: the main process is still
    # opening them (before it forks) when the signal comes.
    listeners = []
    for index in range(150):
        listeners += ["--listen", "unix:%s" % (tmp_path / str(index))]
    stderr = StderrPipe()
    process = subprocess.Popen([sys.executable, SCRIPT, "--workers", "2"]
                               + listeners, stderr=stderr.writer)
    try:
        os.close(stderr.writer)
        stderr.writer = None
        stderr.wait_for(" listening on ")
        assert stderr.text.count(" listening on ") < 150
        process.send_signal(number)
        stderr.wait_for("2 workers started")
        if number == signal.SIGHUP:
            # The parent's line and each worker's.
            stderr.wait_for("reload: applied", count=3)
            process.send_signal(signal.SIGTERM)
        stderr.wait_for(None)   # every process has ended
        assert process.wait(TIMEOUT) == 0, stderr.text
        assert "Traceback" not in stderr.text
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(TIMEOUT)
        stderr.close()


# -- one address grammar --------------------------------------------------------

@pytest.mark.parametrize("arguments", [
    ["--port", "99999"], ["--port", "-1"], ["--port", "80a"],
    ["--listen", "127.0.0.1:65536"], ["--listen", "::1:9050"],
    ["--nameserver", "::1:53"], ["--nameserver", "2001:db8::1:53"],
    ["--nameserver", "127.0.0.1:0"], ["--nameserver", "[::1]x"],
    ["--policy", "accept ::1:80"], ["--policy", "reject *:70000"],
    ["--policy", "reject *:90-80"],
    ["--pin-relay", "::1:9001=" + "AB" * 20],
    ["--pin-relay", "127.0.0.1:0=" + "AB" * 20],
])
def test_ambiguous_or_out_of_range_addresses_are_usage_errors(arguments,
                                                                capsys):
    with pytest.raises(SystemExit) as exited:
        torsocksd.build_argument_parser().parse_args(arguments)
    assert exited.value.code == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize("arguments", [
    ["--handshake-timeout", "inf"], ["--connect-timeout", "nan"],
    ["--idle-timeout", "0"], ["--idle-exit", "inf"],
    ["--drain-timeout", "nan"], ["--drain-timeout", "-1"],
    ["--happy-eyeballs-delay", "inf"], ["--unix-mode", "-1"],
    ["--unix-mode", "1000"], ["--unix-mode", "8"],
    ["--max-login-failures", "-3"],
])
def test_times_modes_and_counts_out_of_range_are_usage_errors(arguments,
                                                              capsys):
    """inf would overflow the loop's select(), nan make it spin; chmod(-1)
    would open a Unix socket to everyone."""
    with pytest.raises(SystemExit) as exited:
        torsocksd.build_argument_parser().parse_args(arguments)
    assert exited.value.code == 2
    assert "error: argument " + arguments[0] in capsys.readouterr().err


@pytest.mark.parametrize("option, value", [
    ("handshake_timeout", float("inf")), ("connect_timeout", float("nan")),
    ("idle_timeout", 0.0), ("exit_when_idle", -1.0),
    ("drain_timeout", float("nan")), ("happy_eyeballs_delay", float("inf")),
    ("drain_timeout", -0.5), ("unix_mode", -1), ("unix_mode", 0o1000),
    ("max_login_failures", -1), ("handshake_timeout", None),
    ("connect_timeout", None),
])
def test_settings_refuse_what_the_command_line_refuses(option, value):
    with pytest.raises(ValueError, match=option):
        torsocksd.Settings(**{option: value})


@pytest.mark.parametrize("rule, parsed", [
    ("accept [::1]:80", (True, "::1/128", 80, 80)),
    ("reject [::1]:25", (False, "::1/128", 25, 25)),
    ("accept [2001:db8::]/32:80", (True, "2001:db8::/32", 80, 80)),
    ("accept [2001:db8::/32]:80-90", (True, "2001:db8::/32", 80, 90)),
    ("reject 127.0.0.0/8", (False, "127.0.0.0/8", 0, 65535)),
    ("accept 192.0.2.7:443", (True, "192.0.2.7/32", 443, 443)),
])
def test_policy_rules_read_one_grammar(rule, parsed):
    verdict, network, low, high = torsocksd.DestinationPolicy.parse_rule(rule)
    assert (verdict, str(network), low, high) == parsed


def test_a_rule_for_ipv6_port_25_blocks_only_port_25():
    policy = torsocksd.DestinationPolicy(["reject [::1]:25"])
    loopback = ipaddress.ip_address("::1")
    assert policy.refusal(True, loopback, 25)
    assert not policy.refusal(True, loopback, 80)


@pytest.mark.parametrize("text, expected", [
    ("[::1]:53", ("::1", 53)), ("[::1]", ("::1", 53)),
    ("127.0.0.1", ("127.0.0.1", 53)), ("127.0.0.1:5353", ("127.0.0.1", 5353)),
])
def test_nameservers_read_one_grammar(text, expected):
    assert torsocksd.parse_nameserver(text) == expected
