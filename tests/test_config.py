"""The config file (--config), --check-config, and SIGHUP: the file and the
command line read again and applied whole, or not at all.

The file is the command line one option a line, read by the same parser;
the command line comes on top (a scalar overrides the file's value, a
repeatable option adds to the file's).  Daemons here run as child
processes; readiness and reloads are waited for on a NOTIFY_SOCKET, as
systemd does.
"""

import hashlib
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest

import torsocksd
from conftest import (TIMEOUT, assert_echoes, free_port, hash_until_eof,
                      open_socks5_tunnel, recv_exactly, recv_until_eof,
                      socks5_request)
from test_cli import children_of
from test_metrics import scrape_daemon
from test_deploy import (SCRIPT, Child, activated, base_env,  # noqa: F401
                         client_for, notify, reap_children, wait_for_file)


def parse(argv, config_text=None, tmp_path=None):
    """(options, problems) for argv, with a config file holding
    config_text when it is given."""
    parser = torsocksd.build_argument_parser()
    argv = list(argv)
    if config_text is not None:
        path = tmp_path / "torsocksd.conf"
        path.write_text(config_text)
        argv = ["--config", str(path)] + argv
    return torsocksd.load_options(parser, argv)


def comparable(options):
    values = dict(vars(options))
    values.pop("config")
    return values


# A value for every option a config file may hold (None: a flag).  An
# option added to the command line must be added here: the test below
# fails until it is.
SAMPLES = {
    "port": "1080", "address": "127.0.0.2", "listen": "[::1]:9050",
    "unix-mode": "640", "allow": "192.0.2.0/24", "deny": "192.0.2.7",
    "policy": "accept *:443", "open-proxy": None,
    "pin-relay": "127.0.0.1:9001=" + "AB" * 20,
    "credentials": "/etc/torsocksd/users", "safe-socks": None,
    "test-socks": None, "handshake-timeout": "3", "connect-timeout": "4",
    "idle-timeout": "600", "max-per-client": "8", "drain-timeout": "2",
    "max-connections": "100", "max-login-failures": "3",
    "nameserver": "[2001:db8::53]:5353",
    "resolver-threads": "2", "outbound-address": "192.0.2.5",
    "outbound-interface": "eth0", "prefer-ipv6": None, "prefer-ipv4": None,
    "no-ipv6": None, "happy-eyeballs-delay": "0.1", "inetd": None,
    "inetd-wait": None, "idle-exit": "30", "workers": "3", "splice": None,
    "user": "nobody", "log-level": "debug", "log-file": "/var/log/t.log",
    "syslog": None, "log-destinations": None, "metrics": "[::1]:9051",
    "enable-bind": None, "enable-udp": None, "max-udp-associations": "64",
    "max-udp-per-client": "4", "http-tunnel": "127.0.0.1:8118",
    "proxy-protocol-from": "192.0.2.1/32",
}


def test_every_command_line_option_means_the_same_in_the_file(tmp_path):
    parser = torsocksd.build_argument_parser()
    names = set(torsocksd.config_file_options(parser))
    assert names == set(SAMPLES), "SAMPLES lacks or has extra options"
    for name, value in sorted(SAMPLES.items()):
        line = name if value is None else "%s %s" % (name, value)
        argv = ["--" + name] + ([] if value is None else [value])
        from_file, problems = parse([], line + "\n", tmp_path)
        assert problems == [], line
        assert comparable(from_file) == comparable(parse(argv)[0]), line


def test_comments_blank_lines_values_with_spaces(tmp_path):
    text = ("# torsocksd.conf\n\n   \n"
            "listen 127.0.0.1:9050\n"
            "listen   [::1]:9050  \n"
            "\tallow 192.0.2.0/24\n"
            "deny 192.0.2.7\n"
            "policy accept *:443\n"
            "policy reject 10.0.0.0/8:1-1024\n"
            "  # an indented comment\n"
            "log-destinations\n"
            "handshake-timeout 3\n")
    options, problems = parse([], text, tmp_path)
    assert problems == []
    assert options.listen == [("127.0.0.1", 9050), ("::1", 9050)]
    assert options.client_policy == [(True, "192.0.2.0/24"),
                                     (False, "192.0.2.7")]
    assert options.destination_policy == ["accept *:443",
                                          "reject 10.0.0.0/8:1-1024"]
    assert options.log_destinations is True
    assert options.handshake_timeout == 3.0


def test_command_line_overrides_scalars_and_adds_to_repeatables(tmp_path):
    text = ("listen 127.0.0.1:9050\nallow 192.0.2.0/24\n"
            "handshake-timeout 3\nlog-level warning\nport 1080\n")
    options, problems = parse(
        ["--listen", "127.0.0.1:9150", "--deny", "198.51.100.0/24",
         "--handshake-timeout", "4", "--safe-socks"], text, tmp_path)
    assert problems == []
    assert options.listen == [("127.0.0.1", 9050), ("127.0.0.1", 9150)]
    assert options.client_policy == [(True, "192.0.2.0/24"),
                                     (False, "198.51.100.0/24")]
    assert options.handshake_timeout == 4.0
    assert (options.log_level, options.port, options.safe_socks) == (
        "warning", 1080, True)


def test_the_help_says_which_comes_first():
    helped = subprocess.run([sys.executable, SCRIPT, "--help"],
                            stdout=subprocess.PIPE, universal_newlines=True,
                            timeout=TIMEOUT, check=True).stdout
    text = " ".join(helped.split())
    assert "its options override the file's, except repeatable ones " \
           "(--listen, --allow, --policy, ...), which add to it" in text


def test_problems_name_the_file_and_line_and_all_are_reported(tmp_path):
    text = ("listen 127.0.0.1:9050\n"
            "lisen 127.0.0.1:9051\n"            # 2: no such option
            "listen 127.0.0.1:port\n"           # 3: bad value
            "open-proxy yes\n"                  # 4: a flag with a value
            "listen\n"                          # 5: no value
            "config /etc/other.conf\n"          # 6: command line only
            "check-config\n"                    # 7: command line only
            "policy allow *:80\n"               # 8: bad rule
            "log-level chatty\n")               # 9: not a choice
    path = str(tmp_path / "torsocksd.conf")
    _, problems = parse([], text, tmp_path)
    lines = [int(re.match(re.escape(path) + r":(\d+): ", problem).group(1))
             for problem in problems]
    assert lines == [2, 3, 4, 5, 6, 7, 8, 9], problems
    assert "unknown option 'lisen'" in problems[0]
    assert "argument --listen: 'port' is not a port number" in problems[1]
    assert "ignored explicit argument 'yes'" in problems[2]
    assert "expected one argument" in problems[3]
    assert "unknown option 'config'" in problems[4]
    assert "invalid choice: 'chatty'" in problems[7]


def test_bad_file_stops_the_start_naming_each_problem(tmp_path):
    config = tmp_path / "torsocksd.conf"
    config.write_text("listen 127.0.0.1:0\nmax-connections none\n"
                      "handshake-timeout -1\n")
    result = subprocess.run([sys.executable, SCRIPT, "--config", str(config)],
                            stderr=subprocess.PIPE, universal_newlines=True,
                            timeout=TIMEOUT, env=base_env())
    assert result.returncode == torsocksd.EX_USAGE, result.stderr
    assert "%s:2: argument --max-connections: 'none' is not a whole number" \
        % config in result.stderr
    assert "%s:3: argument --handshake-timeout: must be more than 0 " \
        "seconds" % config in result.stderr
    assert "listening on" not in result.stderr


def test_missing_config_file_is_a_usage_error(tmp_path):
    result = subprocess.run(
        [sys.executable, SCRIPT, "--config", str(tmp_path / "none.conf")],
        stderr=subprocess.PIPE, universal_newlines=True, timeout=TIMEOUT,
        env=base_env())
    assert result.returncode == torsocksd.EX_USAGE
    assert "cannot read the config file: [Errno 2] No such file" \
        in result.stderr


def test_exclusive_options_on_separate_lines_are_refused(tmp_path):
    _, problems = parse([], "listen 127.0.0.1:0\n", tmp_path)
    assert problems == []
    options, _ = parse([], "prefer-ipv4\nno-ipv6\n", tmp_path)
    assert torsocksd.combination_problems(options, False) == [
        "--prefer-ipv4 and --no-ipv6 exclude each other"]
    options, _ = parse(["--inetd-wait"], "inetd\n", tmp_path)
    assert torsocksd.combination_problems(options, False) == [
        "--inetd and --inetd-wait exclude each other"]


# -- --check-config -----------------------------------------------------------

def check_config(tmp_path, text, *more):
    config = tmp_path / "check.conf"
    config.write_text(text)
    return subprocess.run(
        [sys.executable, SCRIPT, "--config", str(config), "--check-config"]
        + list(more), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        universal_newlines=True, timeout=TIMEOUT, env=base_env())


def test_check_config_accepts_a_good_configuration(tmp_path):
    users = tmp_path / "users"
    users.write_text("alice:secret\n")
    with socket.socket() as taken:      # as if the daemon held it
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = check_config(
            tmp_path, "listen 127.0.0.1:%d\nlisten unix:%s\ncredentials %s\n"
            "policy accept *:443\n" % (port, tmp_path / "s.sock", users))
    assert (result.returncode, result.stdout) == (0, ""), result.stderr
    assert result.stderr.splitlines() == [
        "torsocksd: note: 127.0.0.1:%d is in use now (by this torsocksd, "
        "when it runs)" % port,
        "torsocksd: the configuration is valid"]


def test_check_config_lists_every_problem(tmp_path):
    result = check_config(
        tmp_path,
        "listen 192.0.2.1:9050\n"              # not an address of this host
        "listen 0.0.0.0:%d\n"                  # open proxy
        "listen unix:%s/nowhere/s.sock\n"      # no such directory
        "credentials %s/nobody-here\n"         # cannot be read
        "user no-such-user-for-torsocksd\n"
        "bogus line\n"
        "prefer-ipv6\nno-ipv6\n" % (free_port(), tmp_path, tmp_path))
    assert result.returncode == torsocksd.EX_USAGE
    problems = result.stderr.splitlines()
    assert [line.split(":", 1)[0] for line in problems] == ["torsocksd"] * 4
    text = result.stderr
    assert "check.conf:6: unknown option 'bogus'" in problems[0]
    assert "--prefer-ipv6 and --no-ipv6 exclude each other" in problems[1]
    assert "cannot read credentials: [Errno 2]" in problems[2]
    assert "--user no-such-user-for-torsocksd: no such user" in text
    assert "the configuration is valid" not in text
    # Once the credentials are readable, the listeners are looked at too.
    (tmp_path / "nobody-here").write_text("alice:secret\n")
    result = check_config(
        tmp_path, "listen 192.0.2.1:9050\nlisten 0.0.0.0:%d\n"
        "listen unix:%s/nowhere/s.sock\n" % (free_port(), tmp_path))
    problems = result.stderr.splitlines()
    assert result.returncode == torsocksd.EX_USAGE
    assert problems[0] == "torsocksd: 192.0.2.1:9050: Cannot assign " \
                          "requested address"
    assert problems[1].endswith("/nowhere/s.sock: no such directory")
    assert problems[2].startswith("torsocksd: refusing to listen on 0.0.0.0:")
    assert len(problems) == 3


def test_check_config_without_a_file_checks_the_command_line(tmp_path):
    result = subprocess.run(
        [sys.executable, SCRIPT, "--check-config", "--listen", "0.0.0.0:0"],
        stderr=subprocess.PIPE, universal_newlines=True, timeout=TIMEOUT,
        env=base_env())
    assert result.returncode == torsocksd.EX_USAGE
    assert "refusing to listen on 0.0.0.0:0" in result.stderr


# -- SIGHUP: the whole configuration, read again ---------------------------------

class Reloadable:
    """torsocksd --config FILE as a child, with the file (in folder) and
    its notifications at hand."""

    def __init__(self, folder, notify, text, *more):
        self.config = folder / "torsocksd.conf"
        self.config.write_text(text)
        self.ready = notify()
        self.daemon = Child([sys.executable, SCRIPT, "--config",
                             str(self.config)] + list(more),
                            env=self.ready.env())
        self.ready.wait_ready()

    def reload(self, text=None):
        """Write text to the file (if given), SIGHUP, wait for RELOADING=1
        then READY=1; the RELOADING message."""
        if text is not None:
            self.config.write_text(text)
        self.daemon.process.send_signal(signal.SIGHUP)
        reloading = self.ready.receive()
        assert reloading[0] == "RELOADING=1", reloading
        assert re.fullmatch(r"MONOTONIC_USEC=\d+", reloading[1]), reloading
        assert self.ready.receive()[0] == "READY=1"
        return reloading

    def stop(self):
        self.daemon.process.send_signal(signal.SIGTERM)
        assert self.daemon.finish() == 0, self.daemon.text()


def refused_at_accept(port):
    try:
        with socket.create_connection(("127.0.0.1", port),
                                      timeout=TIMEOUT) as client:
            client.sendall(b"\x05\x01\x00")
            return recv_until_eof(client) == b""
    except ConnectionResetError:
        return True


def test_sighup_applies_the_changed_file_whole(tmp_path, notify,
                                               echo_server):
    first, second = free_port(), free_port()
    daemon = Reloadable(tmp_path, notify,
                        "listen 127.0.0.1:%d\nlog-level info\n" % first)
    with open_socks5_tunnel(("127.0.0.1", first), "127.0.0.1",
                            echo_server.port) as tunnel:
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        reloading = daemon.reload(
            "listen 127.0.0.1:%d\nlisten 127.0.0.1:%d\n"
            "policy reject 127.0.0.1:%d\ndeny 127.0.0.2\n"
            "log-destinations\n" % (first, second, echo_server.port))
        usec = int(reloading[1].split("=")[1])
        assert before <= usec <= time.clock_gettime_ns(
            time.CLOCK_MONOTONIC) // 1000
        daemon.daemon.wait_for("reload: applied; listeners: 1 kept, "
                               "1 opened, 0 closed")
        # The old tunnel relays on; new requests meet the new policy.
        assert_echoes(tunnel, b"old rules")
        for port in (first, second):
            with client_for("127.0.0.1:%d" % port) as client:
                client.sendall(b"\x05\x01\x00" + socks5_request(
                    1, "127.0.0.1", echo_server.port))
                assert recv_exactly(client, 12) == \
                    b"\x05\x00\x05\x02\x00\x01" + bytes(6)
        daemon.daemon.wait_for("CONNECT 127.0.0.1:%d" % echo_server.port)
        # Removing a listener closes it; the other one stays.
        daemon.reload("listen 127.0.0.1:%d\n" % second)
        daemon.daemon.wait_for("stopped listening on 127.0.0.1:%d" % first)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", first), timeout=TIMEOUT)
        with open_socks5_tunnel(("127.0.0.1", second), "127.0.0.1",
                                echo_server.port) as fresh:
            assert_echoes(fresh, b"new")
        assert_echoes(tunnel, b"still")
    daemon.stop()


def test_sighup_with_any_problem_changes_nothing(tmp_path, notify,
                                                 echo_server):
    first, second = free_port(), free_port()
    good = "listen 127.0.0.1:%d\n" % first
    daemon = Reloadable(tmp_path, notify, good)
    daemon.reload(good + "listen 127.0.0.1:%d\npolicy reject *:*\n"
                  "max-connections lots\n" % second)
    failed = daemon.daemon.wait_for(" ERROR reload: ")
    assert "torsocksd.conf:4: argument --max-connections: 'lots' is not a " \
           "whole number" in failed
    daemon.daemon.wait_for("reload: nothing changed; the old configuration "
                           "stays")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", second), timeout=TIMEOUT)
    with open_socks5_tunnel(("127.0.0.1", first), "127.0.0.1",
                            echo_server.port) as tunnel:  # no reject *:*
        assert_echoes(tunnel, b"x")
    # The exposure check refuses a listener other hosts could reach, and
    # the log level that came with it is not applied either.
    daemon.reload(good + "listen 0.0.0.0:%d\nlog-level debug\n" % second)
    daemon.daemon.wait_for("ERROR reload: refusing to listen on 0.0.0.0:%d"
                           % second)
    daemon.daemon.wait_for("the old configuration stays")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", second), timeout=TIMEOUT)
    with open_socks5_tunnel(("127.0.0.1", first), "127.0.0.1",
                            echo_server.port):
        pass
    # A value that would stop the loop or open the Unix socket to all.
    for line, problem in (
            ("handshake-timeout inf", "argument --handshake-timeout: must "
             "be a finite number of seconds"),
            ("unix-mode -1", "argument --unix-mode: must be an octal mode")):
        daemon.reload(good + line + "\n")
        failed = daemon.daemon.wait_for(" ERROR reload: ")
        assert "torsocksd.conf:2: " + problem in failed
        daemon.daemon.wait_for("nothing changed")
    with open_socks5_tunnel(("127.0.0.1", first), "127.0.0.1",
                            echo_server.port) as tunnel:
        assert_echoes(tunnel, b"y")
    daemon.stop()
    assert " DEBUG " not in daemon.daemon.text()


def test_sighup_changes_log_level_and_reopens_the_log(tmp_path, notify):
    log_path = tmp_path / "torsocksd.log"
    port = free_port()
    daemon = Reloadable(tmp_path, notify, "listen 127.0.0.1:%d\n"
                        "log-file %s\nlog-level warning\n" % (port, log_path))
    for number in (1, 2):
        if number == 2:
            os.rename(str(log_path), str(log_path) + ".1")
            daemon.reload("listen 127.0.0.1:%d\nlog-file %s\n"
                          "log-level debug\n" % (port, log_path))
        with client_for("127.0.0.1:%d" % port) as client:
            client.sendall(b"\x05\x01\x00")
            assert recv_exactly(client, 2) == b"\x05\x00"
    wait_for_file(str(log_path), " INFO conn 2 from ")
    daemon.stop()
    # At warning level, nothing was written before the reload.
    assert (tmp_path / "torsocksd.log.1").read_text() == ""


def test_log_reopen_that_fails_keeps_the_old_log_and_applies_the_rest(
        tmp_path, notify, request):
    """After --user, or with its directory gone, the log cannot be
    reopened: the old one stays in use, says why, and the rest of the new
    configuration applies."""
    folder = tmp_path / "logs"
    folder.mkdir()
    log_path = folder / "torsocksd.log"
    first, second = free_port(), free_port()
    more, config_folder = [], tmp_path
    if os.geteuid() == 0:
        # The log stays root's; the config file must be one nobody can
        # read, outside pytest's private folder.
        more = ["--user", "nobody"]
        config_folder = pathlib.Path(tempfile.mkdtemp(prefix="torsocksd-"))
        config_folder.chmod(0o755)
        request.addfinalizer(lambda: shutil.rmtree(str(config_folder)))
    text = "listen 127.0.0.1:%d\nlog-file %s\n" % (first, log_path)
    daemon = Reloadable(config_folder, notify, text, *more)
    moved = tmp_path / "logs.old"
    folder.rename(moved)
    daemon.reload(text + "listen 127.0.0.1:%d\n" % second)
    old_log = str(moved / "torsocksd.log")
    line = wait_for_file(old_log, "cannot reopen the log")
    assert "logging goes on as before" in line
    wait_for_file(old_log, "listening on 127.0.0.1:%d" % second)
    with client_for("127.0.0.1:%d" % second) as client:
        client.sendall(b"\x05\x01\x00")
        assert recv_exactly(client, 2) == b"\x05\x00"
    daemon.stop()
    assert not folder.exists()


def test_sighup_with_socket_activation_keeps_the_passed_listeners(
        tmp_path, notify, echo_server):
    with socket.socket() as passed:
        passed.bind(("127.0.0.1", 0))
        passed.listen(16)
        config = tmp_path / "torsocksd.conf"
        config.write_text("handshake-timeout 5\n")
        ready = notify()
        daemon = Child(activated([sys.executable, SCRIPT, "--config",
                                  str(config)], 1),
                       socks=[passed], env=ready.env())
        ready.wait_ready()
        config.write_text("handshake-timeout 6\nlisten 127.0.0.1:0\n")
        daemon.process.send_signal(signal.SIGHUP)
        assert ready.receive()[0] == "RELOADING=1"
        assert ready.receive()[0] == "READY=1"
        daemon.wait_for("ERROR reload: sockets came from systemd")
        config.write_text("handshake-timeout 6\n")
        daemon.process.send_signal(signal.SIGHUP)
        daemon.wait_for("reload: the SOCKS listeners were handed in "
                        "(socket activation or inetd): they are not ours "
                        "to change")
        daemon.wait_for("reload: applied")
        with open_socks5_tunnel(passed.getsockname(), "127.0.0.1",
                                echo_server.port) as tunnel:
            assert_echoes(tunnel, b"x")
        daemon.process.send_signal(signal.SIGTERM)
        assert daemon.finish() == 0


# -- a reload under load: no byte lost ----------------------------------------

CHUNK = 64 * 1024


def pattern(index):
    """The index-th chunk of a stream nobody could compress or guess."""
    return hashlib.shake_256(b"chunk %d" % index).digest(CHUNK)


def test_reload_under_load_loses_no_byte(tmp_path, notify, echo_server):
    """A tunnel carries 64 MiB each way (SHA-256 checked) while the config
    file changes (a listener added and removed, the policy, the log level)
    and SIGHUP arrives five times: every byte arrives, in order."""
    chunks = 1024                                   # 64 MiB
    port, extra = free_port(), free_port()
    base = "listen 127.0.0.1:%d\n" % port
    daemon = Reloadable(tmp_path, notify, base)
    sent_digest, received_digest = hashlib.sha256(), hashlib.sha256()
    progress = {"sent": 0, "received": 0}
    with open_socks5_tunnel(("127.0.0.1", port), "127.0.0.1",
                            echo_server.port) as tunnel:
        def send():
            for index in range(chunks):
                data = pattern(index)
                sent_digest.update(data)
                tunnel.sendall(data)
                progress["sent"] += len(data)
            tunnel.shutdown(socket.SHUT_WR)
        sender = threading.Thread(target=send)
        sender.start()
        in_flight = []
        receiver = threading.Thread(target=hash_until_eof, args=(
            tunnel, received_digest, progress, "received"))
        receiver.start()
        configs = [base + "listen 127.0.0.1:%d\n" % extra,
                   base + "policy reject 192.0.2.0/24\nlog-level debug\n",
                   base + "listen 127.0.0.1:%d\nmax-connections 50\n" % extra,
                   base + "deny 192.0.2.9\nlog-destinations\n",
                   base]
        for number, text in enumerate(configs, 1):
            goal = number * chunks * CHUNK // (len(configs) + 2)
            deadline = time.monotonic() + 60
            while progress["received"] < goal and time.monotonic() < deadline:
                time.sleep(0.001)
            at_signal = dict(progress)
            daemon.reload(text)
            in_flight.append((at_signal, dict(progress)))
        sender.join(120)
        receiver.join(120)
        assert not sender.is_alive() and not receiver.is_alive()
    assert progress == {"sent": chunks * CHUNK, "received": chunks * CHUNK}
    assert received_digest.hexdigest() == sent_digest.hexdigest()
    # Every reload happened with the stream half way: bytes moved during
    # it and were still to come after it.
    for before, _ in in_flight:
        assert 0 < before["received"] < chunks * CHUNK, in_flight
    daemon.stop()
    text = daemon.daemon.text()
    assert text.count("reload: applied") == 5, text
    print("\nreload under load: %d MiB each way, SHA-256 %s both ways; "
          "bytes echoed when each SIGHUP was sent: %s"
          % (chunks * CHUNK >> 20, sent_digest.hexdigest()[:16],
             ", ".join(str(before["received"]) for before, _ in in_flight)))


# -- with --workers: the parent reads, every worker applies ----------------------

def test_workers_reload_once_and_every_worker_applies(tmp_path, notify,
                                                      echo_server):
    first, second = free_port(), free_port()
    base = "listen 127.0.0.1:%d\n" % first
    daemon = Reloadable(tmp_path, notify, base, "--workers", "2")
    daemon.daemon.wait_for("2 workers started")
    with open_socks5_tunnel(("127.0.0.1", first), "127.0.0.1",
                            echo_server.port) as tunnel:
        daemon.reload(base + "listen 127.0.0.1:%d\n" % second)
        # READY=1 came once both workers had it: each can serve the new one.
        for _ in range(3):
            daemon.daemon.wait_for("listening on 127.0.0.1:%d" % second)
        daemon.daemon.wait_for("reload: applied")
        for _ in range(6):
            with open_socks5_tunnel(("127.0.0.1", second), "127.0.0.1",
                                    echo_server.port) as fresh:
                assert_echoes(fresh, b"new")
        assert_echoes(tunnel, b"kept")
        # A bad file: said once, by the parent, and nothing changes.
        daemon.reload(base + "bogus\n")
        daemon.reload(base + "listen 127.0.0.1:%d\n" % second)
        assert_echoes(tunnel, b"still")
    daemon.stop()
    text = daemon.daemon.text()
    assert text.count("unknown option 'bogus'") == 1, text
    assert text.count("reload: applied") == 6, text     # parent + 2, twice


def login(port, username, password):
    """The RFC 1929 status reply (01 STATUS) to username:password at the
    SOCKS5 listener on port."""
    with socket.create_connection(("127.0.0.1", port),
                                  timeout=TIMEOUT) as client:
        client.sendall(b"\x05\x01\x02")
        assert recv_exactly(client, 2) == b"\x05\x02"
        client.sendall(bytes((1, len(username))) + username
                       + bytes((len(password),)) + password)
        return recv_exactly(client, 2)


def test_workers_take_a_configuration_larger_than_a_datagram(tmp_path, notify,
                                                             echo_server):
    # 8000 users pickle to some 300 KB, more than one datagram on the
    # workers' control socket holds: it reaches them all the same, and
    # none is stopped (which would cut its connections).
    users = tmp_path / "users"
    others = "".join("user%05d:%032d\n" % (n, n) for n in range(8000))
    users.write_text("alice:old\n" + others)
    port = free_port()
    daemon = Reloadable(tmp_path, notify, "listen 127.0.0.1:%d\ncredentials "
                        "%s\n" % (port, users), "--workers", "2")
    workers = children_of(daemon.daemon.pid)
    assert len(workers) == 2
    with socket.create_connection(("127.0.0.1", port),
                                  timeout=TIMEOUT) as tunnel:
        tunnel.sendall(b"\x05\x01\x02\x01\x05alice\x03old" + socks5_request(
            1, "127.0.0.1", echo_server.port))
        assert recv_exactly(tunnel, 14) == \
            b"\x05\x02\x01\x00\x05\x00\x00\x01" + bytes(6)
        users.write_text("bob:new\n" + others)
        daemon.reload()
        for _ in range(3):      # the parent's line and each worker's
            daemon.daemon.wait_for("reload: applied")
        assert children_of(daemon.daemon.pid) == workers
        assert_echoes(tunnel, b"kept")
        for _ in range(4):
            assert login(port, b"bob", b"new") == b"\x01\x00"
        assert login(port, b"alice", b"old") == b"\x01\x01"
    daemon.stop()
    assert "cannot take the new configuration" not in daemon.daemon.text()


def test_sighup_reopens_every_log_even_when_the_new_file_is_refused(
        tmp_path, notify):
    log_file, rotated = tmp_path / "torsocksd.log", tmp_path / "old.log"
    base = "listen 127.0.0.1:%d\nlog-file %s\n" % (free_port(), log_file)
    daemon = Reloadable(tmp_path, notify, base, "--workers", "2")
    workers = children_of(daemon.daemon.pid)
    for pid in workers:
        wait_for_file(log_file, "torsocksd[%d] INFO worker listening" % pid)
    os.rename(log_file, rotated)        # what logrotate does
    daemon.reload(base + "bogus\n")
    # Every worker writes a line: SIGUSR1's statistics, passed on to them.
    daemon.daemon.process.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + TIMEOUT
    while True:
        new = log_file.read_text() if log_file.exists() else ""
        old = rotated.read_text()
        if (new + old).count(" INFO statistics: ") >= 2:
            break
        assert time.monotonic() < deadline, (new, old)
        time.sleep(0.02)
    for pid in workers:
        assert "torsocksd[%d] INFO statistics: " % pid in new, new
    assert "unknown option 'bogus'" in new, new
    assert "statistics" not in old and "bogus" not in old, old
    daemon.stop()


def test_workers_parent_outlives_a_listener_name_idna_cannot_encode(
        tmp_path, notify, echo_server):
    """Its UnicodeError once escaped the reload and ended the parent; now
    a problem like any other (run_workers also contains whatever else a
    reload might raise, which no input is known to do)."""
    first, second, metrics = free_port(), free_port(), free_port()
    base = "listen 127.0.0.1:%d\nmetrics 127.0.0.1:%d\n" % (first, metrics)
    daemon = Reloadable(tmp_path, notify, base, "--workers", "2")
    # IDNA refuses a 64-letter label before any lookup is made.
    daemon.reload(base + "listen %s.invalid:1\n" % ("a" * 64))
    daemon.daemon.wait_for("reload: cannot listen on %s.invalid:1 for socks"
                           % ("a" * 64))
    daemon.daemon.wait_for("the old configuration stays")
    daemon.reload(base + "listen 127.0.0.1:%d\n" % second)
    daemon.daemon.wait_for("reload: applied")
    for port in (first, second):
        with open_socks5_tunnel(("127.0.0.1", port), "127.0.0.1",
                                echo_server.port) as tunnel:
            assert_echoes(tunnel, b"served")
    page = scrape_daemon(metrics)
    assert page['torsocksd_reloads_total{result="failure"}'] == 1
    assert page['torsocksd_reloads_total{result="success"}'] == 1
    daemon.stop()
