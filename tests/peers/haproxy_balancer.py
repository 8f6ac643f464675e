"""Run inside a fresh network namespace (unshare -n), as root: Debian's
HAProxy with contrib/haproxy.cfg in front of two torsocksd processes.

Brings lo up and adds test host addresses: 192.0.2.1 (HAProxy's frontend),
192.0.2.40 (a client torsocksd's --allow lets in), 192.0.2.41 (one it does
not) and 192.0.2.50 (a host with an echo server).  Both torsocksd processes
listen on 127.0.0.1, take PROXY headers from 127.0.0.1 (where HAProxy's
connections come from) and allow only 192.0.2.40: the balancer itself is
not allowed, so a relayed client proves the header's address was used.
contrib/haproxy.cfg is used as it is but for addresses, ports, a check
interval of 200 ms and a stats socket to read the servers' state from.

Checks, with send-proxy-v2: both servers come UP (the SOCKS5 health check
works through the PROXY header, as v2 LOCAL); 192.0.2.40 is relayed byte
for byte, 192.0.2.41 refused; the logs name 192.0.2.40; the health checks
leave no warning or error; a connection from 127.0.0.1 without a header,
and headers from untrusted sources, are not honoured; after one backend is
killed and marked DOWN, every new connection succeeds on the other.  With
send-proxy (v1): the checks name the balancer, so without --allow for it
the servers go DOWN, and with it they come UP and relay as before.

    unshare -n python3 haproxy_balancer.py

Prints one line per check and, when all passed, "all checks passed".
"""

import contextlib
import csv
import io
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile

# common first: it puts conftest on sys.path.
from common import (CLOSED, ROOT, TIMEOUT, Daemon, add_test_hosts, check,
                    connect_from, finish, read_to_end, wait_until)
from conftest import EchoServer, free_port, recv_up_to

CONFIG = os.path.join(ROOT, "contrib", "haproxy.cfg")
FRONTEND, CLIENT, STRANGER, TARGET = ("192.0.2.1", "192.0.2.40",
                                      "192.0.2.41", "192.0.2.50")
SUCCEEDED = b"\x05\x00\x05\x00\x00\x01" + bytes(6)  # method, CONNECT reply


class Backend(Daemon):
    """torsocksd on 127.0.0.1 behind the balancer: PROXY headers from
    127.0.0.1, clients from CLIENT only (and as extra arguments say)."""

    def __init__(self, *extra):
        self.port = free_port()
        super().__init__("--listen", "127.0.0.1:%d" % self.port,
                         "--proxy-protocol-from", "127.0.0.1",
                         "--allow", CLIENT, *extra)


class Balancer:
    """HAProxy with contrib/haproxy.cfg, addresses and ports filled in."""

    def __init__(self, directory, backends, version=2):
        self.port = free_port()     # free on FRONTEND too: nothing is there
        self.stats = os.path.join(directory, "haproxy-%d.sock" % version)
        config = open(CONFIG).read()
        config = config.replace("bind :9050", "bind %s:%d"
                                % (FRONTEND, self.port))
        for number, backend in enumerate(backends, 1):
            config = re.sub(r"(server torsocksd%d )\S+" % number,
                            r"\g<1>127.0.0.1:%d" % backend.port, config)
        config = config.replace("inter 2s", "inter 200ms")
        config = config.replace("global\n", "global\n    stats socket %s "
                                "level admin\n" % self.stats, 1)
        if version == 1:
            config = config.replace("send-proxy-v2", "send-proxy")
        self.config = os.path.join(directory, "haproxy-%d.cfg" % version)
        with open(self.config, "w") as file:
            file.write(config)
        self.log = open(os.path.join(directory, "haproxy-%d.log" % version),
                        "w")
        self.process = subprocess.Popen(
            ["haproxy", "-db", "-f", self.config], stdin=subprocess.DEVNULL,
            stdout=self.log, stderr=subprocess.STDOUT)
        if not wait_until(lambda: os.path.exists(self.stats)):
            raise RuntimeError("haproxy did not start")

    def states(self, field="status"):
        """{server name: status} (or another field of "show stat") from
        the stats socket."""
        try:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(TIMEOUT)
                sock.connect(self.stats)
                sock.sendall(b"show stat\n")
                data = b""
                while True:
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    data += chunk
        except OSError:
            return {}
        rows = csv.DictReader(io.StringIO(data.decode().lstrip("# ")))
        return {row["svname"]: row[field] for row in rows
                if row["svname"].startswith("torsocksd")}

    def wait_for(self, wanted):
        """Until the servers' states are wanted ({name: "UP"}); whether
        they came to be."""
        return wait_until(lambda: all(
            self.states().get(name) == state
            for name, state in wanted.items()))

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(TIMEOUT)
        self.log.close()


@contextlib.contextmanager
def balancing(directory, backends, version=2):
    """HAProxy in front of backends; stops them all on the way out."""
    balancer = Balancer(directory, backends, version)
    try:
        yield balancer
    finally:
        balancer.stop()
        for backend in backends:
            backend.stop()


def answer(source, address, data):
    """What a client at source gets for data sent to address, until the
    server closes: (bytes, how it ended)."""
    with connect_from(source, address) as sock:
        sock.sendall(data)
        return read_to_end(sock)


def socks_echo(source, address, echo_port, payload):
    """A SOCKS5 CONNECT to the echo host from source through address:
    (what came back: the two replies, then the echo; how it ended)."""
    request = (b"\x05\x01\x00\x05\x01\x00\x01" + socket.inet_aton(TARGET)
               + echo_port.to_bytes(2, "big"))
    with connect_from(source, address) as sock:
        sock.sendall(request)
        head = recv_up_to(sock, 12)
        if head == SUCCEEDED:
            sock.sendall(payload)
            head += recv_up_to(sock, len(payload))
            sock.shutdown(socket.SHUT_WR)
        rest, end = read_to_end(sock)
        return head + rest, end


def relays(source, address, echo_port):
    payload = os.urandom(65536)
    reply, end = socks_echo(source, address, echo_port, payload)
    return reply == SUCCEEDED + payload and end in CLOSED


def refused(source, address, echo_port):
    """Whether a client at source is closed without a byte."""
    reply, end = socks_echo(source, address, echo_port, b"x")
    return reply == b"" and end in CLOSED


def log_problems(backends):
    return [line for backend in backends for line in backend.lines
            if " WARNING " in line or " ERROR " in line
            or "Traceback" in line]


def check_balancing(label, balancer, echo_port, clients):
    """Both servers pass the health check, `clients` clients inside --allow
    are relayed byte for byte, and one outside it is refused."""
    front = (FRONTEND, balancer.port)
    check("%s: both servers pass the SOCKS5 health check" % label,
          balancer.wait_for({"torsocksd1": "UP", "torsocksd2": "UP"}),
          balancer.states())
    results = [relays(CLIENT, front, echo_port) for _ in range(clients)]
    check("%s: a client inside --allow is relayed byte for byte" % label,
          all(results), results)
    check("%s: a client outside --allow is refused" % label,
          refused(STRANGER, front, echo_port))


def version_2(directory, echo_port):
    backends = [Backend("--log-level", "debug"),
                Backend("--log-level", "debug")]
    with balancing(directory, backends) as balancer:
        check_balancing("send-proxy-v2", balancer, echo_port, 6)

        def named():
            return [line for backend in backends for line in backend.lines
                    if " from %s:" % CLIENT in line
                    and " via 127.0.0.1:" in line and ": relayed" in line]
        check("the logs name the client, via the balancer",
              wait_until(lambda: len(named()) == 6)
              and all(backend.said(" from %s:" % CLIENT)
                      for backend in backends), "%d lines" % len(named()))
        check("the refusal names the client", wait_until(lambda: any(
            " from %s:" % STRANGER in line and " via 127.0.0.1:" in line
            and "refused: not allowed by --allow/--deny" in line
            for backend in backends
            for line in backend.lines)))
        direct = ("127.0.0.1", backends[1].port)
        reply, end = answer("127.0.0.1", direct, b"\x05\x01\x00")
        check("a trusted source without a header is closed",
              reply == b"" and end in CLOSED, (reply[:60], end))
        check("... with one log line", wait_until(
            lambda: backends[1].text().count("no PROXY protocol header") == 1))
        lie = b"PROXY TCP4 %s 127.0.0.1 1 2\r\n\x05\x01\x00"
        reply, end = answer(STRANGER, direct, lie % CLIENT.encode())
        check("an untrusted source's header is not honoured (refused at "
              "accept)", reply == b"" and end in CLOSED, (reply[:60], end))
        reply, end = answer(CLIENT, direct, lie % STRANGER.encode())
        check("... nor read as one: it is HTTP to a SOCKS port",
              reply.startswith(b"HTTP/1.0 501 ") and end in CLOSED,
              (reply[:60], end))
        check("the health checks reach torsocksd, logged at debug level",
              wait_until(lambda: all(len(re.findall(
                  r"DEBUG conn .*\(the balancer's own\): SOCKS5: ",
                  backend.text())) >= 3 for backend in backends)) and not any(
                  " INFO " in line and "(the balancer's own)" in line
                  for backend in backends
                  for line in backend.lines))
        check("no warning or error from the health checks",
              not log_problems(backends), log_problems(backends)[:3])
        failed = balancer.states("chkfail")
        check("and none of them failed", set(failed.values()) == {"0"},
              failed)
        backends[0].stop(signal.SIGKILL)
        check("a killed backend is marked DOWN",
              balancer.wait_for({"torsocksd1": "DOWN", "torsocksd2": "UP"}),
              balancer.states())
        results = [relays(CLIENT, (FRONTEND, balancer.port), echo_port)
                   for _ in range(20)]
        check("then every new connection succeeds on the other",
              all(results), results.count(False))


def version_1(directory, echo_port):
    # The v2 backends are gone; the same arguments, without the balancer's
    # address allowed: v1 health checks name the balancer, and fail.
    unallowed = Backend()
    with balancing(directory, [unallowed, unallowed], 1) as balancer:
        check("send-proxy: without --allow for the balancer the checks fail",
              balancer.wait_for({"torsocksd1": "DOWN"}), balancer.states())
    backends = [Backend("--allow", "127.0.0.1"),
                Backend("--allow", "127.0.0.1")]
    with balancing(directory, backends, 1) as balancer:
        check_balancing("send-proxy", balancer, echo_port, 4)
        check("send-proxy: no warning or error", not log_problems(backends),
              log_problems(backends)[:3])


def main():
    add_test_hosts(FRONTEND, CLIENT, STRANGER, TARGET)
    echo = EchoServer(host=TARGET)
    try:
        with tempfile.TemporaryDirectory(prefix="haproxy-") as directory:
            version_2(directory, echo.port)
            version_1(directory, echo.port)
    finally:
        echo.close()
    return finish()


if __name__ == "__main__":
    sys.exit(main())
