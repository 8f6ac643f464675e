"""Shared fixtures: a torsocksd Server hosted in a thread on port 0, loopback
peers (echo and sink servers), an injectable resolver, and peer programs.

Nothing here touches the machine's DNS for anything but "localhost".
"""

import importlib
import ipaddress
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir))

import torsocksd  # noqa: E402
from torpeer import find_program  # noqa: E402

REQUIRE_PEERS = os.environ.get("TORSOCKSD_REQUIRE_PEERS") == "1"
TIMEOUT = 10.0      # seconds any single socket operation in a test may take


def require_program(name):
    """The path of a peer program (also looked for in /usr/sbin and /sbin,
    which a user's PATH often lacks); skip without it, fail under
    TORSOCKSD_REQUIRE_PEERS=1 (CI installs every peer)."""
    path = find_program(name)
    if path is None:
        message = "peer program %r is not installed" % name
        if REQUIRE_PEERS:
            pytest.fail(message + " (TORSOCKSD_REQUIRE_PEERS=1)")
        pytest.skip(message)
    return path


def require_module(name):
    """A Python module a test drives as a peer (PySocks: "socks"); skip
    without it, fail under TORSOCKSD_REQUIRE_PEERS=1 (CI installs it into
    the test environment)."""
    try:
        return importlib.import_module(name)
    except ImportError:
        message = "peer module %r is not installed" % name
        if REQUIRE_PEERS:
            pytest.fail(message + " (TORSOCKSD_REQUIRE_PEERS=1)")
        pytest.skip(message)


def require_network_namespace():
    """unshare and ip, and the root needed to make a loopback-only network
    namespace with test host addresses; skip without them, fail under
    TORSOCKSD_REQUIRE_PEERS=1 (CI runs as root)."""
    require_program("unshare")
    require_program("ip")
    if os.geteuid() != 0:
        message = "a network namespace with test addresses needs root"
        if REQUIRE_PEERS:
            pytest.fail(message + " (TORSOCKSD_REQUIRE_PEERS=1)")
        pytest.skip(message)


PEERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peers")


def run_in_namespace(script, *args, timeout=120):
    """Run peers/<script> with args under `unshare -n` (a loopback-only
    network namespace of its own; skipped as require_network_namespace()
    says), print what it wrote, check that it exited 0; its stdout."""
    require_network_namespace()
    result = subprocess.run(
        ["unshare", "-n", sys.executable, os.path.join(PEERS, script)]
        + list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        timeout=timeout, universal_newlines=True)
    print(result.stdout)
    print(result.stderr)
    assert result.returncode == 0
    return result.stdout


def run_peer_checks(script, *args, timeout=120):
    """run_in_namespace() for a peer script that prints a line per check
    ("ok: ..." or "FAILED: ...") and "all checks passed" last: no check
    failed.  Its stdout."""
    output = run_in_namespace(script, *args, timeout=timeout)
    assert output.splitlines()[-1] == "all checks passed"
    assert "FAILED" not in output
    return output


class FakeResolver:
    """A resolver answering from a dict, for tests: name -> list of address
    strings (or a torsocksd.Reply to fail with); address -> name for reverse.
    Answers come from a thread, as the system resolver's do; a name listed in
    `silent` is never answered (to test lookup deadlines)."""

    def __init__(self, names=None, reverse_names=None, silent=()):
        self.names = dict(names or {})
        self.reverse_names = dict(reverse_names or {})
        self.silent = set(silent)
        self.queries = []

    def lookup(self, hostname, callback):
        self.queries.append(hostname)
        if hostname in self.silent:
            return None
        answer = self.names.get(hostname, torsocksd.Reply.HOST_UNREACHABLE)
        if isinstance(answer, torsocksd.Reply):
            result = torsocksd.ResolverResult((), answer, "no such test name")
        else:
            result = torsocksd.ResolverResult(
                tuple(ipaddress.ip_address(a) for a in answer))
        threading.Thread(target=callback, args=(result,)).start()
        return None

    def reverse(self, address, callback):
        self.queries.append(str(address))
        name = self.reverse_names.get(str(address))
        if name is None:
            result = torsocksd.ResolverResult(
                (), torsocksd.Reply.HOST_UNREACHABLE, "no such test address")
        else:
            result = torsocksd.ResolverResult((name,))
        threading.Thread(target=callback, args=(result,)).start()
        return None


@pytest.fixture
def relay_mode(request):
    """"copy" (the default relay) or "splice"; a test that relays bytes runs
    with both when marked @each_relay_mode (a module: pytestmark =
    each_relay_mode)."""
    mode = getattr(request, "param", "copy")
    if mode == "splice" and not torsocksd.HAVE_SPLICE:
        pytest.skip("os.splice needs Linux and Python 3.10+")
    return mode


RELAY_MODES = ["copy", "splice"]
each_relay_mode = pytest.mark.parametrize("relay_mode", RELAY_MODES,
                                          indirect=True)


def closing_factory(make, close=lambda thing: thing.close()):
    """The body of a factory fixture (`yield from closing_factory(...)`):
    yields a function that calls make(*args, **kwargs) and remembers what
    it made, then closes each thing made, in order, at teardown."""
    made = []

    def make_and_remember(*args, **kwargs):
        thing = make(*args, **kwargs)
        made.append(thing)
        return thing

    yield make_and_remember
    for thing in made:
        close(thing)


@pytest.fixture
def make_server(relay_mode):
    """make_server(**options) -> a started torsocksd.Server on 127.0.0.1:0
    (or options["listen"]); stopped at teardown."""
    def start(**options):
        options.setdefault("listen", [("127.0.0.1", 0)])
        options.setdefault("splice", relay_mode == "splice")
        options.setdefault("drain_timeout", 0.0)    # stop() at teardown
        return torsocksd.Server(**options).start()

    yield from closing_factory(start, torsocksd.Server.stop)


@pytest.fixture
def server(make_server):
    return make_server()


class EchoServer:
    """A threaded loopback TCP server; each accepted connection is handled by
    handler(sock) in its own thread (default: echo until EOF, then close)."""

    def __init__(self, handler=None, family=None, host="127.0.0.1", port=0):
        self.handler = handler or self.echo
        if family is None:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.listener = socket.socket(family, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((host, port))
        self.listener.listen(128)
        self.address = self.listener.getsockname()[:2]
        self.port = self.address[1]
        self.accepted = []
        self.threads = []
        self.closed = False
        self.acceptor = threading.Thread(target=self._accept_loop, daemon=True)
        self.acceptor.start()

    @staticmethod
    def echo(sock):
        while True:
            data = sock.recv(65536)
            if not data:
                break
            sock.sendall(data)

    def _accept_loop(self):
        while True:
            try:
                sock, peer = self.listener.accept()
            except OSError:
                return
            if self.closed:
                sock.close()
                return
            sock.settimeout(TIMEOUT)
            self.accepted.append(peer)
            thread = threading.Thread(target=self._run, args=(sock,),
                                      daemon=True)
            self.threads.append(thread)
            thread.start()

    def _run(self, sock):
        try:
            self.handler(sock)
        except OSError:
            pass
        finally:
            sock.close()

    def close(self):
        self.closed = True
        # Wake the acceptor with a connection of our own, then close.
        try:
            socket.create_connection(self.address, timeout=1).close()
        except OSError:
            pass
        self.acceptor.join(TIMEOUT)
        self.listener.close()
        for thread in self.threads:
            thread.join(TIMEOUT)


@pytest.fixture
def echo_server():
    peer = EchoServer()
    yield peer
    peer.close()


@pytest.fixture
def make_peer():
    """make_peer(handler, family=..., host=...) -> an EchoServer with handler."""
    yield from closing_factory(EchoServer)


def ipv6_loopback():
    """Whether ::1 can be bound here."""
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


def free_port():
    """A loopback TCP port with nothing listening (to get ECONNREFUSED)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def connect(server, timeout=TIMEOUT):
    """A blocking client socket connected to the server's first listener."""
    return socket.create_connection(server.address, timeout=timeout)


# -- receiving ----------------------------------------------------------------

def recv_up_to(sock, size):
    """Up to size bytes: fewer when the peer closes first (for checks that
    compare what did arrive)."""
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def recv_exactly(sock, size):
    """Exactly size bytes; EOFError, naming what did arrive, when the peer
    closes first."""
    data = recv_up_to(sock, size)
    if len(data) < size:
        raise EOFError("closed after %d of %d bytes: %r"
                       % (len(data), size, data))
    return data


def recv_until_eof(sock, limit=1 << 20):
    """Everything until the peer's EOF; AssertionError past limit bytes (a
    peer that never stops sending)."""
    data = b""
    while len(data) <= limit:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    raise AssertionError("more than %d bytes before EOF" % limit)


def hash_until_eof(sock, digest, counts, key):
    """Everything until the peer's EOF into digest (a hashlib object),
    each piece's length added to counts[key] as it comes (for a thread that
    watches the progress)."""
    while True:
        data = sock.recv(1 << 20)
        if not data:
            return
        digest.update(data)
        counts[key] += len(data)


def assert_echoes(sock, data):
    """Send data: the same bytes come back (through a tunnel to an echo
    peer)."""
    sock.sendall(data)
    assert recv_exactly(sock, len(data)) == data


# -- SOCKS messages, byte for byte --------------------------------------------
# What a client sends (RFC 1928, RFC 1929, SOCKS4 and 4A) and the SOCKS5
# reply without an address.  Fields go in as given, so a test can build an
# empty or overlong name with them; other malformed bytes a test writes out.

def socks5_greeting(*methods):
    """VER NMETHODS METHODS: socks5_greeting(0) is 05 01 00 (no auth),
    socks5_greeting(2) is 05 01 02 (username/password)."""
    return bytes((5, len(methods))) + bytes(methods)


def userpass(username, password):
    """An RFC 1929 username/password request: 01 ULEN UNAME PLEN PASSWD
    (both bytes)."""
    return (bytes((1, len(username))) + username
            + bytes((len(password),)) + password)


def socks5_target(host, port):
    """ATYP, DST.ADDR and DST.PORT of a SOCKS5 request for host:port: ATYP 1
    or 4 for an IPv4 or IPv6 literal, ATYP 3 for any other str (ASCII).  A
    bytes host goes in unchanged as ATYP 3 (to send an IP literal as a
    name)."""
    if isinstance(host, bytes):
        name = host
    else:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            name = host.encode("ascii")
        else:
            atyp = b"\x01" if address.version == 4 else b"\x04"
            return atyp + address.packed + port.to_bytes(2, "big")
    return b"\x03" + bytes((len(name),)) + name + port.to_bytes(2, "big")


def socks5_request(command, host, port):
    """VER CMD RSV, then socks5_target(host, port)."""
    return bytes((5, command, 0)) + socks5_target(host, port)


def socks5_connect_request(host, port):
    """The no-auth greeting and the CONNECT request for host:port."""
    return socks5_greeting(0), socks5_request(1, host, port)


def socks4_request(command, address, port, userid=b""):
    """VN CD DSTPORT DSTIP USERID NUL, address an IPv4 literal (or its four
    packed bytes)."""
    return (bytes((4, command)) + port.to_bytes(2, "big")
            + ipaddress.IPv4Address(address).packed + userid + b"\0")


def socks4a_request(command, name, port, userid=b""):
    """SOCKS4A: a SOCKS4 request to 0.0.0.1, then the name (str in ASCII,
    or bytes) and NUL."""
    if isinstance(name, str):
        name = name.encode("ascii")
    return socks4_request(command, "0.0.0.1", port, userid) + name + b"\0"


def socks5_reply(code, ipv6_client=False):
    """VER REP RSV ATYP and an all-zero BND.ADDR and BND.PORT: the 10-byte
    form (ATYP 1) an IPv4 client gets, or the 22-byte form (ATYP 4) an IPv6
    or Unix-socket client gets."""
    if ipv6_client:
        return bytes((5, code, 0, 4)) + bytes(16) + bytes(2)
    return bytes((5, code, 0, 1)) + bytes(4) + bytes(2)


def recv_socks5_reply(sock):
    """A whole SOCKS5 reply whose BND.ADDR is an IP address (ATYP 1 or 4)."""
    head = recv_exactly(sock, 4)
    return head + recv_exactly(sock, {1: 6, 4: 18}[head[3]])


def reply_address(reply):
    """(address, port) that a SOCKS5 reply's BND fields, or a SOCKS4
    reply's DSTIP and DSTPORT, name."""
    if reply[0] == 0:
        return (socket.inet_ntoa(reply[4:8]),
                int.from_bytes(reply[2:4], "big"))
    family = socket.AF_INET if reply[3] == 1 else socket.AF_INET6
    return (socket.inet_ntop(family, reply[4:-2]),
            int.from_bytes(reply[-2:], "big"))


def open_socks5_tunnel(address, host, port, timeout=TIMEOUT):
    """A blocking client of the SOCKS server at address with a SOCKS5
    CONNECT tunnel to host:port up; the method reply (05 00) and the success
    reply (of the client's family) are checked byte for byte."""
    sock = socket.create_connection(address, timeout=timeout)
    try:
        greeting, request = socks5_connect_request(host, port)
        sock.sendall(greeting)
        assert recv_exactly(sock, 2) == b"\x05\x00"
        sock.sendall(request)
        expected = socks5_reply(0, ipv6_client=sock.family != socket.AF_INET)
        assert recv_exactly(sock, len(expected)) == expected
    except BaseException:
        sock.close()
        raise
    return sock


@pytest.fixture
def dnsmasq():
    """dnsmasq on 127.0.0.1 answering only from its own records: v4.test A
    192.0.2.10, v6.test AAAA 2001:db8::42, and the PTR of 192.0.2.10.
    Yields its (address, port)."""
    path = require_program("dnsmasq")
    port = free_udp_and_tcp_port()
    process = subprocess.Popen(
        [path, "--no-daemon", "--no-resolv", "--no-hosts",
         "--listen-address=127.0.0.1", "--port=%d" % port, "--bind-interfaces",
         "--address=/v4.test/192.0.2.10", "--address=/v6.test/2001:db8::42",
         "--ptr-record=10.2.0.192.in-addr.arpa,v4.test"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_dns(("127.0.0.1", port), process)
        yield ("127.0.0.1", port)
    finally:
        process.terminate()
        process.wait(TIMEOUT)
        process.stderr.close()


def free_udp_and_tcp_port():
    """A loopback port free for both UDP and TCP (dnsmasq binds both)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp, \
                socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            udp.bind(("127.0.0.1", 0))
            port = udp.getsockname()[1]
            try:
                tcp.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no port free for both UDP and TCP")


def wait_for_dns(address, process):
    """Until the server at address answers a query (dnsmasq binds late)."""
    query = torsocksd.encode_dns_query(1, "v4.test", torsocksd.DnsType.A)
    deadline = time.monotonic() + TIMEOUT
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.settimeout(0.05)
        while time.monotonic() < deadline:
            assert process.poll() is None, process.stderr.read().decode()
            probe.sendto(query, address)
            try:
                probe.recv(512)
                return
            except OSError:
                continue
    pytest.fail("dnsmasq did not answer")
