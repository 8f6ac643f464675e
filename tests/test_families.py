"""Address families: listeners on IPv4, IPv6 and Unix sockets, and the
outbound side (Happy Eyeballs, outbound addresses and interface, IPv6 off,
IPv6 preferred).

The listener tests run here, on loopback.  Everything that needs addresses
of its own runs as peers/families_netns.py inside a loopback-only network
namespace (unshare -n, as root): test hosts 192.0.2.0/24 and 2001:db8::/32 on
lo, and 192.0.2.99 / 2001:db8::99 routed into an interface where packets
vanish, so that connect() to them hangs.  That script only reports what
happened (replies, seconds, what peer address the targets saw); the
assertions are here.

SOCKS5 replies follow DECISIONS row 9: ATYP 1 (10 bytes) to a client on
IPv4, ATYP 4 (22 bytes) to a client on IPv6 or a Unix socket, address and
port zero.
"""

import errno
import http.client
import http.server
import ipaddress
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time

import pytest

import torsocksd
from conftest import (TIMEOUT, FakeResolver, free_port, ipv6_loopback,
                      recv_exactly, recv_until_eof, require_network_namespace,
                      require_program, socks5_connect_request, socks5_reply)

HERE = os.path.dirname(os.path.abspath(__file__))
NETNS_SCRIPT = os.path.join(HERE, "peers", "families_netns.py")

PAYLOAD = b"families round trip"
NAMES = {"web.test": ["127.0.0.1"], "v6.test": ["2001:db8::42"]}


needs_ipv6 = pytest.mark.skipif(not ipv6_loopback(),
                                reason="no IPv6 loopback (::1) here")


def client_to(address, family):
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(TIMEOUT)
    try:
        sock.connect(address)
    except OSError:
        sock.close()
        raise
    return sock


def socks5_exchange(client, host, port, reply_size):
    """Greeting + CONNECT; returns the method reply and the reply."""
    greeting, request = socks5_connect_request(host, port)
    client.sendall(greeting + request)
    method = recv_exactly(client, 2)
    return method, recv_exactly(client, reply_size)


def round_trip(client):
    client.sendall(PAYLOAD)
    assert recv_exactly(client, len(PAYLOAD)) == PAYLOAD
    client.shutdown(socket.SHUT_WR)
    assert recv_until_eof(client) == b""


# =============================================================================
# Listeners
# =============================================================================

def test_ipv4_listener_replies_with_atyp_1(make_server, echo_server):
    server = make_server(resolver=FakeResolver(NAMES))
    with client_to(server.address, socket.AF_INET) as client:
        method, answer = socks5_exchange(client, "127.0.0.1", echo_server.port,
                                         10)
        assert (method, answer) == (b"\x05\x00", socks5_reply(0))
        round_trip(client)
    with client_to(server.address, socket.AF_INET) as client:
        _, answer = socks5_exchange(client, "127.0.0.1", free_port(), 10)
        assert answer == socks5_reply(5)          # connection refused
        assert recv_until_eof(client) == b""
    with client_to(server.address, socket.AF_INET) as client:
        _, answer = socks5_exchange(client, "missing.test", 80, 10)
        assert answer == socks5_reply(4)
        assert recv_until_eof(client) == b""


@needs_ipv6
def test_ipv6_listener_replies_with_atyp_4(make_server, echo_server):
    server = make_server(listen=[("::1", 0)], resolver=FakeResolver(NAMES))
    assert server._listeners[0].sock.family == socket.AF_INET6
    assert server._listeners[0].sock.getsockopt(socket.IPPROTO_IPV6,
                                          socket.IPV6_V6ONLY) == 1
    address = server.addresses[0]
    # To an IPv4 target too: the reply follows the client's family.
    with client_to(address, socket.AF_INET6) as client:
        method, answer = socks5_exchange(client, "web.test", echo_server.port,
                                         22)
        assert (method, answer) == (b"\x05\x00",
                                    socks5_reply(0, ipv6_client=True))
        round_trip(client)
    with client_to(address, socket.AF_INET6) as client:
        _, answer = socks5_exchange(client, "127.0.0.1", free_port(), 22)
        assert answer == socks5_reply(5, ipv6_client=True)
        assert recv_until_eof(client) == b""
    with client_to(address, socket.AF_INET6) as client:
        _, answer = socks5_exchange(client, "missing.test", 80, 22)
        assert answer == socks5_reply(4, ipv6_client=True)
        assert recv_until_eof(client) == b""
    # SOCKS4 has one reply form whatever the client's family.
    with client_to(address, socket.AF_INET6) as client:
        client.sendall(b"\x04\x01" + echo_server.port.to_bytes(2, "big")
                       + b"\x7f\x00\x00\x01\x00")
        assert recv_exactly(client, 8) == b"\x00\x5a" + bytes(6)
        round_trip(client)


def two_family_port():
    """A port free on both 0.0.0.0 and [::]."""
    for _ in range(20):
        with socket.socket(socket.AF_INET6) as six:
            six.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            six.bind(("::", 0))
            port = six.getsockname()[1]
            with socket.socket(socket.AF_INET) as four:
                try:
                    four.bind(("0.0.0.0", port))
                except OSError:
                    continue
        return port
    pytest.fail("no port free on both families")


@needs_ipv6
@pytest.mark.parametrize("order", ["ipv4 first", "ipv6 first"])
def test_wildcard_listeners_of_both_families_share_a_port(make_server,
                                                          echo_server, order):
    """[::]:PORT is IPv6-only (set explicitly, whatever
    net.ipv6.bindv6only says), so 0.0.0.0:PORT binds beside it, in either
    order, and each family's clients get their own reply form."""
    with open("/proc/sys/net/ipv6/bindv6only") as sysctl:
        print("net.ipv6.bindv6only =", sysctl.read().strip())
    port = two_family_port()
    listen = [("0.0.0.0", port), ("::", port)]
    if order == "ipv6 first":
        listen.reverse()
    server = make_server(listen=listen, open_proxy=True)
    families = {listener.sock.family: listener.sock
                for listener in server._listeners}
    assert set(families) == {socket.AF_INET, socket.AF_INET6}
    assert families[socket.AF_INET6].getsockopt(
        socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
    assert sorted(a[1] for a in server.addresses) == [port, port]
    for address, family, expected in (
            (("127.0.0.1", port), socket.AF_INET, socks5_reply(0)),
            (("::1", port), socket.AF_INET6,
             socks5_reply(0, ipv6_client=True))):
        with client_to(address, family) as client:
            _, answer = socks5_exchange(client, "127.0.0.1", echo_server.port,
                                        len(expected))
            assert answer == expected
            round_trip(client)


@pytest.mark.parametrize("host", ["0.0.0.0", "::"])
def test_wildcard_listener_needs_open_proxy(host):
    if host == "::" and not ipv6_loopback():
        pytest.skip("no IPv6 here")
    server = torsocksd.Server(listen=[(host, 0)],
                              resolver=FakeResolver())
    with pytest.raises(ValueError, match="--open-proxy"):
        server.start()
    assert server._listeners == []


# -- Unix stream sockets --------------------------------------------------------

@pytest.fixture
def sock_dir():
    """A short directory for socket paths (sun_path holds 108 bytes)."""
    path = tempfile.mkdtemp(prefix="tsd-fam-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def unix_client(path):
    return client_to(path, socket.AF_UNIX)


@pytest.mark.parametrize("mode", [None, 0o600, 0o660, 0o666, 0o700])
def test_unix_listener_mode(make_server, sock_dir, mode):
    """The socket file gets exactly unix_mode (default 0600), whatever the
    umask, and is removed when the server stops."""
    path = os.path.join(sock_dir, "socks.sock")
    options = {} if mode is None else {"unix_mode": mode}
    old_umask = os.umask(0o077 if mode == 0o666 else 0o022)
    try:
        server = make_server(listen=["unix:" + path], **options)
    finally:
        os.umask(old_umask)
    status = os.stat(path)
    print("unix_mode=%s -> %s %o" % (None if mode is None else oct(mode),
                                     path, stat.S_IMODE(status.st_mode)))
    assert stat.S_ISSOCK(status.st_mode)
    assert stat.S_IMODE(status.st_mode) == (0o600 if mode is None else mode)
    assert server.addresses == [path]
    server.stop()
    assert not os.path.lexists(path)


@pytest.mark.parametrize("mode", [0o600, 0o660, 0o700])
def test_unix_listener_is_never_looser_than_its_mode(make_server, sock_dir,
                                                     monkeypatch, mode):
    """Between bind() and chmod() the socket file is already there and
    connectable: its permissions then must be no looser than unix_mode
    (whatever the umask), and the umask is put back afterwards."""
    path = os.path.join(sock_dir, "socks.sock")
    modes_at_chmod = []
    real_chmod = os.chmod

    def chmod_right_after_bind(target, *args, **kwargs):
        if target == path:
            modes_at_chmod.append(stat.S_IMODE(os.stat(target).st_mode))
        return real_chmod(target, *args, **kwargs)
    monkeypatch.setattr(torsocksd.os, "chmod", chmod_right_after_bind)
    old_umask = os.umask(0o022)
    try:
        make_server(listen=["unix:" + path], unix_mode=mode)
        umask_after = os.umask(0o022)
    finally:
        os.umask(old_umask)
    print("unix_mode %o: %s at bind" % (mode, " ".join(
        "%o" % seen for seen in modes_at_chmod)))
    assert umask_after == 0o022
    assert modes_at_chmod, "the socket file was never chmod-ed"
    assert modes_at_chmod[0] & ~mode == 0, \
        "mode %o at bind is looser than %o" % (modes_at_chmod[0], mode)
    assert stat.S_IMODE(os.stat(path).st_mode) == mode


def test_unix_listener_replies_with_atyp_4(make_server, echo_server,
                                           sock_dir):
    path = os.path.join(sock_dir, "socks.sock")
    server = make_server(listen=["unix:" + path],
                         resolver=FakeResolver(NAMES))
    with unix_client(path) as client:
        method, answer = socks5_exchange(client, "web.test", echo_server.port,
                                         22)
        assert (method, answer) == (b"\x05\x00",
                                    socks5_reply(0, ipv6_client=True))
        round_trip(client)
    with unix_client(path) as client:
        _, answer = socks5_exchange(client, "127.0.0.1", free_port(), 22)
        assert answer == socks5_reply(5, ipv6_client=True)
        assert recv_until_eof(client) == b""
    with unix_client(path) as client:
        _, answer = socks5_exchange(client, "missing.test", 80, 22)
        assert answer == socks5_reply(4, ipv6_client=True)
        assert recv_until_eof(client) == b""
    with unix_client(path) as client:      # unsupported command: BIND
        client.sendall(b"\x05\x01\x00\x05\x02\x00\x01\x7f\x00\x00\x01\x00\x50")
        assert recv_exactly(client, 2) == b"\x05\x00"
        assert recv_exactly(client, 22) == socks5_reply(7, ipv6_client=True)
    # A RESOLVE answer carries the address in its own family.
    with unix_client(path) as client:
        client.sendall(b"\x05\x01\x00\x05\xf0\x00\x03\x07v6.test\x00\x00")
        assert recv_exactly(client, 2) == b"\x05\x00"
        assert recv_exactly(client, 22) == (
            b"\x05\x00\x00\x04" + ipaddress.ip_address("2001:db8::42").packed
            + b"\x00\x00")
    with unix_client(path) as client:
        client.sendall(b"\x05\x01\x00\x05\xf0\x00\x03\x08web.test\x00\x00")
        assert recv_exactly(client, 2) == b"\x05\x00"
        assert recv_exactly(client, 10) == b"\x05\x00\x00\x01\x7f\x00\x00\x01" \
            b"\x00\x00"
    # SOCKS4a: 8 bytes, as on any listener.
    with unix_client(path) as client:
        client.sendall(b"\x04\x01" + echo_server.port.to_bytes(2, "big")
                       + b"\x00\x00\x00\x01\x00web.test\x00")
        assert recv_exactly(client, 8) == b"\x00\x5a" + bytes(6)
        round_trip(client)
    assert server.stats()["listeners"] == ["unix:" + path]


def test_stale_unix_socket_is_replaced(make_server, echo_server, sock_dir):
    """A socket file whose listener is gone (a crashed run) is replaced."""
    path = os.path.join(sock_dir, "socks.sock")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)
    dead.listen(1)
    dead.close()
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    # A second name keeps the stale inode from being reused at once.
    os.link(path, os.path.join(sock_dir, "stale.sock"))
    stale_inode = os.lstat(path).st_ino
    make_server(listen=["unix:" + path])
    assert os.lstat(path).st_ino != stale_inode
    with unix_client(path) as client:
        _, answer = socks5_exchange(client, "127.0.0.1", echo_server.port, 22)
        assert answer == socks5_reply(0, ipv6_client=True)
        round_trip(client)


def test_live_unix_socket_is_an_error(sock_dir):
    """Another server listening at the path keeps it: torsocksd refuses to
    start, and neither unlinks the file nor disturbs that server."""
    path = os.path.join(sock_dir, "socks.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as live:
        live.bind(path)
        live.listen(4)
        inode = os.lstat(path).st_ino
        server = torsocksd.Server(listen=["unix:" + path],
                                  resolver=FakeResolver())
        with pytest.raises(OSError) as raised:
            server.start()
        print("live socket:", raised.value)
        assert raised.value.errno == errno.EADDRINUSE
        assert os.lstat(path).st_ino == inode
        assert server._listeners == []
        # The other server still gets its clients.
        with unix_client(path):
            pass
        # Beside a listener of its own: that one is closed and unlinked
        # again, the live one is left alone.
        ours = os.path.join(sock_dir, "ours.sock")
        server = torsocksd.Server(listen=["unix:" + ours, "unix:" + path],
                                  resolver=FakeResolver())
        with pytest.raises(OSError):
            server.start()
        assert not os.path.lexists(ours)
        assert os.lstat(path).st_ino == inode


PROBE_SCRIPT = os.path.join(HERE, "peers", "families_unix_probe.py")


def unix_probe(case, directory, timeout):
    """peers/families_unix_probe.py CASE DIRECTORY: its report."""
    try:
        result = subprocess.run(
            [sys.executable, PROBE_SCRIPT, case, directory],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout,
            universal_newlines=True)
    except subprocess.TimeoutExpired as expired:
        for output in (expired.stdout, expired.stderr):
            if output:
                print(output.decode() if isinstance(output, bytes) else output)
        pytest.fail("%s: Server.start() had not returned after %d s (the "
                    "probe connect() blocks)" % (case, timeout))
    print(result.stdout, result.stderr)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines()
             if line.startswith("RESULT ")]
    assert len(lines) == 1, result.stdout
    return json.loads(lines[0][len("RESULT "):])


def test_live_unix_socket_with_a_full_accept_queue_is_an_error(sock_dir):
    """A live server that is slow to accept (its queue is full) is still
    live: starting must fail at once, not wait for room in that queue."""
    report = unix_probe("full-backlog", sock_dir, timeout=5)
    assert report["outcome"] == "error", report
    assert report["errno"] == errno.EADDRINUSE, report
    assert report["live_intact"], report


def test_live_unix_socket_it_may_not_connect_to_is_an_error(sock_dir):
    """Run as nobody, beside a root server's 0600 socket in a directory
    nobody owns: connect() says EACCES, which is not "stale"; the live
    socket must not be unlinked and replaced."""
    if os.geteuid() != 0:
        pytest.skip("needs root to set up a socket nobody may not use")
    report = unix_probe("no-permission", sock_dir, timeout=10)
    assert report["probe_errno"] == errno.EACCES, report    # the premise
    assert report["outcome"] == "error", report
    assert report["live_intact"], report


@pytest.mark.parametrize("kind", ["regular file", "directory", "symlink",
                                  "dangling symlink", "fifo",
                                  "symlink to a stale socket"])
def test_other_files_at_the_unix_path_are_never_deleted(sock_dir, kind):
    path = os.path.join(sock_dir, "socks.sock")
    other = os.path.join(sock_dir, "other")
    if kind == "regular file":
        with open(path, "w") as file:
            file.write("precious\n")
    elif kind == "directory":
        os.mkdir(path)
    elif kind == "symlink":
        with open(other, "w") as file:
            file.write("precious\n")
        os.symlink(other, path)
    elif kind == "dangling symlink":
        os.symlink(other, path)
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
            dead.bind(other)
        os.symlink(other, path)
    before = os.lstat(path)
    server = torsocksd.Server(listen=["unix:" + path],
                              resolver=FakeResolver())
    with pytest.raises(OSError) as raised:
        server.start()
    print("%s: %s" % (kind, raised.value))
    after = os.lstat(path)
    assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)
    if kind == "regular file":
        with open(path) as file:
            assert file.read() == "precious\n"
    if kind == "symlink":
        with open(other) as file:
            assert file.read() == "precious\n"
    if kind == "symlink to a stale socket":
        assert stat.S_ISSOCK(os.lstat(other).st_mode)


def test_unix_listener_end_to_end_with_http_client(make_server, sock_dir):
    """Python's http.client fetches a page through a SOCKS5 tunnel opened
    over the Unix socket; the name is resolved by torsocksd."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = ("hello %s" % self.path).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=web.serve_forever, daemon=True)
    thread.start()
    try:
        path = os.path.join(sock_dir, "socks.sock")
        make_server(listen=["unix:" + path], resolver=FakeResolver(NAMES))
        tunnel = unix_client(path)
        _, answer = socks5_exchange(tunnel, "web.test", web.server_port, 22)
        assert answer == socks5_reply(0, ipv6_client=True)
        connection = http.client.HTTPConnection("web.test", web.server_port,
                                                timeout=TIMEOUT)
        connection.sock = tunnel
        try:
            connection.request("GET", "/over-unix")
            response = connection.getresponse()
            body = response.read()
        finally:
            connection.close()
        print("fetched over unix:", response.status, body)
        assert (response.status, body) == (200, b"hello /over-unix")
    finally:
        web.shutdown()
        web.server_close()
        thread.join(TIMEOUT)


def test_unix_listener_end_to_end_with_socat(make_server, echo_server,
                                             sock_dir):
    """socat carries the raw SOCKS5 bytes (and early data) over the Unix
    socket; the reply is the 22-byte form and the data comes back."""
    socat = require_program("socat")
    path = os.path.join(sock_dir, "socks.sock")
    make_server(listen=["unix:" + path], resolver=FakeResolver(NAMES))
    greeting, request = socks5_connect_request("web.test", echo_server.port)
    result = subprocess.run([socat, "-t", "5", "-", "UNIX-CONNECT:" + path],
                            input=greeting + request + PAYLOAD,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            timeout=30)
    print("socat rc=%d out=%r err=%r" % (result.returncode, result.stdout,
                                         result.stderr))
    assert result.returncode == 0
    assert result.stdout == (b"\x05\x00" + socks5_reply(0, ipv6_client=True)
                             + PAYLOAD)


def test_unix_listener_from_the_command_line(sock_dir, echo_server):
    from test_cli import Daemon
    path = os.path.join(sock_dir, "cli.sock")
    daemon = Daemon("--listen", "unix:" + path, "--unix-mode", "640")
    try:
        assert daemon.listening == ["unix:" + path]
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
        with unix_client(path) as client:
            _, answer = socks5_exchange(client, "127.0.0.1",
                                        echo_server.port, 22)
            assert answer == socks5_reply(0, ipv6_client=True)
            round_trip(client)
        daemon.process.terminate()
        assert daemon.finish() == 0
        assert not os.path.lexists(path)
    finally:
        daemon.kill()


# =============================================================================
# Outbound: inside a network namespace
# =============================================================================

DEAD4, DEAD6 = "192.0.2.99", "2001:db8::99"     # connect() hangs
LIVE4, LIVE6 = "192.0.2.10", "2001:db8::10"     # echo servers on :8000
REFUSED4 = "192.0.2.11"                         # nothing listens
SOURCE4, SOURCE6 = "192.0.2.5", "2001:db8::5"   # outbound addresses
PORT = 8000
TARGETS = [[LIVE4, PORT], [LIVE6, PORT]]


def in_namespace(spec):
    """Run peers/families_netns.py with spec under unshare -n; its report."""
    require_network_namespace()
    started = time.monotonic()
    result = subprocess.run(
        ["unshare", "-n", sys.executable, NETNS_SCRIPT, json.dumps(spec)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60,
        universal_newlines=True)
    print("namespace run: %.2f s, rc=%d" % (time.monotonic() - started,
                                             result.returncode))
    if result.stderr:
        print(result.stderr)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines()
             if line.startswith("RESULT ")]
    assert len(lines) == 1, result.stdout
    report = json.loads(lines[0][len("RESULT "):])
    for line in report["log"]:
        print("  log: " + line)
    print("dead route: %s interface; hangs: %s" % (report["dead_mechanism"],
                                                  report["dead_hangs"]))
    # The premise of every Happy Eyeballs test: the dead addresses hang.
    assert report["dead_hangs"] == {DEAD4: True, DEAD6: True}
    return report


def connect(host, data="ping", port=PORT):
    return {"command": "connect", "host": host, "port": port, "data": data}


def resolve(host):
    return {"command": "resolve", "host": host, "port": 0}


def show(results):
    for result in results:
        if "request" not in result:
            print("  %s" % result)
            continue
        request = result["request"]
        print("  %-7s %-16s reply=%s %.3f s echo=%r peers=%s%s" % (
            request["command"], request["host"], result.get("reply"),
            result["elapsed"], result.get("echo"), result.get("peers"),
            " error=" + result["error"] if "error" in result else ""))


def code_of(result):
    assert "reply" in result, result
    return bytes.fromhex(result["reply"])[1]


def succeeded(result, peer=None):
    assert result.get("reply") == socks5_reply(0).hex(), result
    assert result["echo"] == result["request"]["data"], result
    assert len(result["peers"]) == 1, result
    if peer is not None:
        assert result["peers"][0] == peer, result
    return result["peers"][0]


def answer_of(result):
    raw = bytes.fromhex(result["reply"])
    assert raw[:3] == b"\x05\x00\x00", result
    return str(ipaddress.ip_address(raw[4:-2]))


HE_NAMES = {"dead4-live4.test": [DEAD4, LIVE4],
            "dead6-live4.test": [DEAD6, LIVE4],
            "dead4-live6.test": [DEAD4, LIVE6],
            "refused-live.test": [REFUSED4, LIVE4]}


def test_happy_eyeballs_skips_a_hanging_first_address():
    """The first address hangs; the second is tried after the Happy
    Eyeballs delay (0.25 s) and wins, long before the 10 s connect
    timeout."""
    report = in_namespace({
        "targets": TARGETS,
        "runs": [{"server": {"happy_eyeballs_delay": 0.25,
                             "connect_timeout": 10},
                  "names": HE_NAMES,
                  "requests": [connect("dead4-live4.test"),
                               connect("dead6-live4.test"),
                               connect("dead4-live6.test")]}]})
    results = report["runs"][0]
    show(results)
    for result in results:
        print("HAPPY EYEBALLS delay 0.25 s, connect timeout 10 s: %s "
              "connected in %.3f s" % (result["request"]["host"],
                                       result["elapsed"]))
    assert succeeded(results[0]) == LIVE4
    assert succeeded(results[1]) == LIVE4
    assert ipaddress.ip_address(succeeded(results[2])).version == 6
    for result in results:
        # The dead address was tried first (the delay passed), and the live
        # one took over well within the connect timeout.
        assert 0.25 <= result["elapsed"] < 2.0, result


def test_without_happy_eyeballs_a_hanging_first_address_costs_the_timeout():
    """Same name, happy_eyeballs_delay 30 s: the second address is never
    tried; the client waits the whole 3 s connect timeout and gets TTL
    expired (06)."""
    report = in_namespace({
        "targets": TARGETS,
        "runs": [{"server": {"happy_eyeballs_delay": 30,
                             "connect_timeout": 3},
                  "names": HE_NAMES,
                  "requests": [connect("dead4-live4.test")]}]})
    result = report["runs"][0][0]
    show([result])
    print("HAPPY EYEBALLS delay 30 s, connect timeout 3 s: %s answered "
          "%s after %.3f s" % (result["request"]["host"], result.get("reply"),
                               result["elapsed"]))
    assert result.get("reply") == socks5_reply(6).hex(), result
    assert result["peers"] == []
    assert 2.9 <= result["elapsed"] < 6.0, result


def test_a_refused_first_address_moves_on_at_once():
    """A failed attempt starts the next one without waiting for the delay
    (30 s here)."""
    report = in_namespace({
        "targets": TARGETS,
        "runs": [{"server": {"happy_eyeballs_delay": 30,
                             "connect_timeout": 10},
                  "names": HE_NAMES,
                  "requests": [connect("refused-live.test")]}]})
    result = report["runs"][0][0]
    show([result])
    assert succeeded(result) == LIVE4
    assert result["elapsed"] < 2.0


def test_outbound_addresses_for_both_families():
    """With a source address per family, the target sees that address,
    whichever family the destination has (by literal or by name, and after
    a Happy Eyeballs fallback to the other family)."""
    report = in_namespace({
        "targets": TARGETS,
        "runs": [{"server": {"outbound_addresses": [SOURCE4, SOURCE6]},
                  "names": {"v4.test": [LIVE4], "v6.test": [LIVE6],
                            "dead6-live4.test": [DEAD6, LIVE4],
                            "dead4-live6.test": [DEAD4, LIVE6]},
                  "requests": [connect(LIVE4), connect(LIVE6),
                               connect("v4.test"), connect("v6.test"),
                               connect("dead6-live4.test"),
                               connect("dead4-live6.test")]}]})
    results = report["runs"][0]
    show(results)
    expected = [SOURCE4, SOURCE6, SOURCE4, SOURCE6, SOURCE4, SOURCE6]
    assert [succeeded(r) for r in results] == expected


def test_one_outbound_address_leaves_the_other_family_to_the_routes():
    report = in_namespace({
        "targets": TARGETS,
        "runs": [{"server": {"outbound_addresses": [SOURCE4]},
                  "requests": [connect(LIVE4), connect(LIVE6)]},
                 {"server": {"outbound_addresses": [SOURCE6]},
                  "requests": [connect(LIVE6), connect(LIVE4)]}]})
    only4, only6 = report["runs"]
    show(only4)
    show(only6)
    assert succeeded(only4[0]) == SOURCE4
    assert ipaddress.ip_address(succeeded(only4[1])).version == 6
    assert succeeded(only4[1]) != SOURCE6
    assert succeeded(only6[0]) == SOURCE6
    assert ipaddress.ip_address(succeeded(only6[1])).version == 4
    assert succeeded(only6[1]) != SOURCE4


def test_ipv6_off():
    """ipv6=False: an IPv6 literal is refused with 02 (not allowed), RESOLVE
    answers IPv4 only, and a dual-stack name connects over IPv4 even when
    its IPv6 address comes first."""
    report = in_namespace({
        "targets": TARGETS,
        "runs": [{"server": {"ipv6": False},
                  "names": {"six-first.test": [LIVE6, LIVE4],
                            "v6.test": [LIVE6]},
                  "requests": [connect(LIVE6), resolve("six-first.test"),
                               resolve("v6.test"), connect("six-first.test"),
                               connect("v6.test"), connect(LIVE4)]}]})
    results = report["runs"][0]
    show(results)
    literal6, resolve_both, resolve6, both, only6, literal4 = results
    assert literal6.get("reply") == socks5_reply(2).hex()
    assert literal6["peers"] == []
    assert resolve_both["reply"] == (b"\x05\x00\x00\x01"
                                     + ipaddress.ip_address(LIVE4).packed
                                     + b"\x00\x00").hex()
    assert code_of(resolve6) != 0 and len(resolve6["reply"]) == 20
    assert succeeded(both) == LIVE4
    assert code_of(only6) != 0 and only6["peers"] == []
    assert succeeded(literal4) == LIVE4


def test_preferred_ip_version():
    """preferred_ip_version=6: RESOLVE of a dual-stack name answers IPv6,
    CONNECT tries IPv6 first (the target sees an IPv6 peer; with a dead
    IPv6 address the IPv4 one follows after the delay).  Without a
    preference RESOLVE answers IPv4 and CONNECT follows the resolver's
    order; preferred_ip_version=4 puts IPv4 first."""
    names = {"four-first.test": [LIVE4, LIVE6],
             "six-first.test": [LIVE6, LIVE4],
             "live4-dead6.test": [LIVE4, DEAD6]}
    requests = [resolve("four-first.test"), connect("four-first.test"),
                resolve("six-first.test"), connect("six-first.test"),
                connect("live4-dead6.test")]
    report = in_namespace({
        "targets": TARGETS,
        "runs": [{"server": {"preferred_ip_version": 6}, "names": names,
                  "requests": requests},
                 # A 30 s delay: had the dead IPv6 address of
                 # live4-dead6.test been tried first, the connect would time
                 # out (3 s) instead of succeeding.
                 {"server": {"happy_eyeballs_delay": 30,
                             "connect_timeout": 3},
                  "names": names, "requests": requests},
                 {"server": {"preferred_ip_version": 4,
                             "happy_eyeballs_delay": 30,
                             "connect_timeout": 3},
                  "names": names, "requests": requests}]})
    prefer6, default, prefer4 = report["runs"]
    for name, results in (("prefer 6", prefer6), ("default", default),
                          ("prefer 4", prefer4)):
        print(name)
        show(results)

    assert answer_of(prefer6[0]) == LIVE6
    assert len(prefer6[0]["reply"]) == 44          # ATYP 4, 22 bytes
    assert ipaddress.ip_address(succeeded(prefer6[1])).version == 6
    assert answer_of(prefer6[2]) == LIVE6
    assert ipaddress.ip_address(succeeded(prefer6[3])).version == 6
    assert succeeded(prefer6[4]) == LIVE4          # after the dead IPv6 one
    assert 0.25 <= prefer6[4]["elapsed"] < 2.0

    assert answer_of(default[0]) == LIVE4
    assert succeeded(default[1]) == LIVE4
    assert answer_of(default[2]) == LIVE4
    assert ipaddress.ip_address(succeeded(default[3])).version == 6
    assert succeeded(default[4]) == LIVE4          # the live one came first

    assert answer_of(prefer4[0]) == LIVE4
    assert succeeded(prefer4[1]) == LIVE4
    assert answer_of(prefer4[2]) == LIVE4
    assert succeeded(prefer4[3]) == LIVE4
    assert succeeded(prefer4[4]) == LIVE4          # IPv4 first


DAEMON = ["--listen", "127.0.0.1:1080", "--log-destinations"]


def test_command_line_families_options():
    """The command: --prefer-ipv6, --happy-eyeballs-delay,
    --outbound-address (twice), --no-ipv6, with names from dnsmasq through
    --nameserver.  he.test has a live IPv4 and a dead IPv6 address."""
    require_program("dnsmasq")
    report = in_namespace({
        "targets": TARGETS,
        "dnsmasq": ["--host-record=he.test,%s,%s" % (LIVE4, DEAD6),
                    "--host-record=both.test,%s,%s" % (LIVE4, LIVE6)],
        "runs": [
            {"daemon": DAEMON + ["--nameserver", "{dns}", "--prefer-ipv6",
                                 "--happy-eyeballs-delay", "0.1",
                                 "--outbound-address", SOURCE4,
                                 "--outbound-address", SOURCE6],
             "requests": [resolve("both.test"), connect("both.test"),
                          connect("he.test")]},
            # A 30 s delay: had the dead IPv6 address of he.test been tried
            # at all (first), the connect would time out.
            {"daemon": DAEMON + ["--nameserver", "{dns}", "--no-ipv6",
                                 "--happy-eyeballs-delay", "30",
                                 "--connect-timeout", "3"],
             "requests": [resolve("both.test"), connect(LIVE6),
                          connect("he.test")]},
            {"daemon": DAEMON + ["--nameserver", "{dns}", "--prefer-ipv6",
                                 "--happy-eyeballs-delay", "30",
                                 "--connect-timeout", "2"],
             "requests": [connect("he.test")]}]})
    prefer6, no6, slow = report["runs"]
    for results in report["runs"]:
        show(results)
    assert answer_of(prefer6[0]) == LIVE6
    assert succeeded(prefer6[1]) == SOURCE6
    assert succeeded(prefer6[2]) == SOURCE4         # the dead IPv6 came first
    assert 0.1 <= prefer6[2]["elapsed"] < 2.0
    print("CLI --happy-eyeballs-delay 0.1: he.test connected in %.3f s"
          % prefer6[2]["elapsed"])
    assert answer_of(no6[0]) == LIVE4
    assert no6[1]["reply"] == socks5_reply(2).hex()
    assert succeeded(no6[2]) == LIVE4               # IPv6 never tried
    assert slow[0].get("reply") == socks5_reply(6).hex()
    assert 1.9 <= slow[0]["elapsed"] < 5.0
    print("CLI --happy-eyeballs-delay 30 --connect-timeout 2: he.test "
          "answered %s after %.3f s" % (slow[0]["reply"], slow[0]["elapsed"]))
    for results in report["runs"]:
        assert results[-1] == {"daemon_alive": True}


def test_command_line_outbound_interface():
    """--outbound-interface: lo carries the connection (SO_BINDTODEVICE as
    root); an interface that cannot reach the target gets the client a
    SOCKS error reply, never a hang past the connect timeout, and the
    daemon goes on serving."""
    report = in_namespace({
        "targets": TARGETS,
        "runs": [
            {"daemon": DAEMON + ["--outbound-interface", "lo"],
             "requests": [connect(LIVE4), connect(LIVE6)]},
            # up, no address, no route: the kernel sends on-link, packets
            # vanish; the connect timeout must answer.
            {"daemon": DAEMON + ["--outbound-interface", "ifb1",
                                 "--connect-timeout", "2"],
             "requests": [connect(LIVE4), connect(LIVE6)]},
            # down: unreachable at once.
            {"daemon": DAEMON + ["--outbound-interface", "ifb2",
                                 "--connect-timeout", "10"],
             "requests": [connect(LIVE4)]},
            # no such interface.
            {"daemon": DAEMON + ["--outbound-interface", "nosuch0",
                                 "--connect-timeout", "10"],
             "requests": [connect(LIVE4)]}]})
    via_lo, up_no_route, down, missing = report["runs"]
    for results in report["runs"]:
        show(results)
        assert results[-1] == {"daemon_alive": True}
    assert succeeded(via_lo[0]) == LIVE4
    assert ipaddress.ip_address(succeeded(via_lo[1])).version == 6
    for result in up_no_route[:2]:
        assert code_of(result) != 0 and result["peers"] == []
        assert len(result["reply"]) == 20
        assert result["elapsed"] < 2 + 3.0
    assert down[0].get("reply") == socks5_reply(3).hex()  # network unreachable
    assert down[0]["elapsed"] < 2.0
    assert code_of(missing[0]) != 0 and len(missing[0]["reply"]) == 20
    assert missing[0]["elapsed"] < 2.0
