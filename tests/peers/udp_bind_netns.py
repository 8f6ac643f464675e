"""Run inside a fresh network namespace (unshare -n), as root: UDP ASSOCIATE
and BIND with test hosts, real clients among them.

    unshare -n python3 udp_bind_netns.py

The network, set up first:

    this namespace    lo up; veth tsd0: 192.0.2.1, 192.0.2.2 and 2001:db8::1,
                      each alone (/32, /128), with a route to the far host
    a second one      veth tsd1: 192.0.2.53 and 2001:db8::53, each alone,
                      with a route back to 192.0.2.0/24 and 2001:db8::/64;
                      dnsmasq
    (the "far host")  on port 53 of both (v4.test A 192.0.2.10, v6.test AAAA
                      2001:db8::42), and a UDP service on 192.0.2.53 port
                      7007 that answers each datagram with the address it
                      came from

Dante's client sends to its own host's addresses and networks directly,
without the proxy, so the DNS server needs a host of its own (the second
namespace) outside every network this one has an address in.

Checks:
- Dante's socksify runs drill (ldnsutils) against the far host's dnsmasq
  through the torsocksd daemon's UDP ASSOCIATE; the daemon logs the
  association's end.  (dig cannot be socksified: BIND 9.18 sends on a
  connected socket with sendmsg, which Dante's client passes on without the
  SOCKS header, so danted drops those datagrams too.  Dante's client does
  not relay IPv6 datagrams at all.)
- With --outbound-address 192.0.2.2, datagrams reach the far host from
  192.0.2.2, and BIND listens there: a connection from the far host is the
  peer, and the second reply names it.
- A client from another host (192.0.2.1, as far as torsocksd can tell) may
  not send datagrams to this host's loopback, however it names it: each is
  dropped, counted and never answered, and the loopback service sees none;
  datagrams to the far host still go.  Its BIND to a loopback or the
  unspecified address is refused with 02.

Prints one line per check and exits non-zero if any fails.
"""

import os
import re
import socket
import subprocess
import sys
import time

# common first: it puts torsocksd, torpeer and conftest on sys.path.
from common import TIMEOUT, Daemon, check, finish
import torsocksd
from torpeer import find_program
from conftest import (FakeResolver, recv_exactly, recv_socks5_reply,
                      reply_address, socks5_greeting, socks5_request,
                      socks5_target, wait_for_dns)

NEAR4, NEAR4_OUTBOUND, NEAR6 = "192.0.2.1", "192.0.2.2", "2001:db8::1"
FAR4, FAR6 = "192.0.2.53", "2001:db8::53"
FAR_ECHO_PORT = 7007
DAEMON = ("127.0.0.1", 1080)

# The far host's UDP service: each datagram is answered with "host port" of
# where it came from; it also takes one TCP connection to host:port given on
# its command line (for BIND) and sends "hello from the far host".
FAR_SERVICE = r"""
import socket, sys
if sys.argv[1] == "udp":
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((sys.argv[2], int(sys.argv[3])))
        while True:
            data, source = sock.recvfrom(65535)
            sock.sendto(("%s %d" % source[:2]).encode(), source)
else:
    with socket.create_connection((sys.argv[2], int(sys.argv[3])), 10) as s:
        s.sendall(b"hello from the far host")
        s.shutdown(socket.SHUT_WR)
        print(s.recv(100).decode())
"""


def program(name):
    """A peer program's path: a user's PATH often lacks /usr/sbin."""
    path = find_program(name)
    if path is None:
        raise SystemExit("%s is not installed" % name)
    return path


def run(name, *args, check=True, env=None):
    return subprocess.run([program(name), *args], check=check,
                          stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True,
                          timeout=TIMEOUT, env=env)


class FarHost:
    """The second namespace, joined to this one by a veth pair."""

    def __init__(self):
        self.processes = []
        self.holder = self._spawn([program("unshare"), "-n",
                                   program("sleep"), "300"])
        ours = os.readlink("/proc/self/ns/net")
        deadline = time.monotonic() + TIMEOUT
        while os.readlink("/proc/%d/ns/net" % self.holder.pid) == ours:
            if time.monotonic() > deadline:
                raise SystemExit("the far host's namespace did not appear")
            time.sleep(0.01)
        run("ip", "link", "set", "lo", "up")
        run("ip", "link", "add", "tsd0", "type", "veth", "peer", "name",
            "tsd1")
        run("ip", "link", "set", "tsd1", "netns", str(self.holder.pid))
        for address in (NEAR4, NEAR4_OUTBOUND):
            run("ip", "addr", "add", address + "/32", "dev", "tsd0")
        run("ip", "-6", "addr", "add", NEAR6 + "/128", "dev", "tsd0",
            "nodad")
        run("ip", "link", "set", "tsd0", "up")
        run("ip", "route", "add", FAR4 + "/32", "dev", "tsd0")
        run("ip", "-6", "route", "add", FAR6 + "/128", "dev", "tsd0")
        self.ip("link", "set", "lo", "up")
        self.ip("addr", "add", FAR4 + "/32", "dev", "tsd1")
        self.ip("-6", "addr", "add", FAR6 + "/128", "dev", "tsd1", "nodad")
        self.ip("link", "set", "tsd1", "up")
        self.ip("route", "add", "192.0.2.0/24", "dev", "tsd1")
        self.ip("-6", "route", "add", "2001:db8::/64", "dev", "tsd1")
        self.dnsmasq = self._spawn(self.inside(
            "dnsmasq", "--no-daemon", "--no-resolv", "--no-hosts",
            "--listen-address=" + FAR4, "--listen-address=" + FAR6,
            "--bind-interfaces", "--port=53", "--log-queries",
            "--address=/v4.test/192.0.2.10",
            "--address=/v6.test/2001:db8::42"))
        service = self._spawn(self.inside(
            sys.executable, "-c", FAR_SERVICE, "udp", FAR4,
            str(FAR_ECHO_PORT)))
        # Both bind late.  The service answers any datagram, a DNS query too.
        wait_for_dns((FAR4, 53), self.dnsmasq)
        wait_for_dns((FAR4, FAR_ECHO_PORT), service)

    def inside(self, name, *args):
        return [program("nsenter"), "-t", str(self.holder.pid), "-n",
                program(name), *args]

    def ip(self, *args):
        return run(*self.inside("ip", *args))

    def connect_to(self, host, port):
        """From the far host: connect to host:port, send a line, print what
        comes back (a process: communicate() for its output)."""
        return subprocess.Popen(
            self.inside(sys.executable, "-c", FAR_SERVICE, "tcp", host,
                        str(port)),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            universal_newlines=True)

    def _spawn(self, command):
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE)
        self.processes.append(process)
        return process

    def close(self):
        for process in reversed(self.processes):
            process.terminate()
            try:
                process.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            process.stderr.close()


def socks_daemon(*arguments):
    """torsocksd.py as a daemon on 127.0.0.1:1080, its log collected."""
    return Daemon("--listen", "%s:%d" % DAEMON, "--log-destinations",
                  *arguments)


# -- a SOCKS5 client at the wire ----------------------------------------------

def request(proxy, command, host, port, source=None):
    """A control connection (from source, when given) that made one
    request: (socket, first reply)."""
    control = socket.create_connection(proxy, timeout=TIMEOUT,
                                       source_address=source)
    control.sendall(socks5_greeting(0))
    assert recv_exactly(control, 2) == b"\x05\x00"
    control.sendall(socks5_request(command, host, port))
    return control, recv_socks5_reply(control)


def datagram(host, port, data):
    return b"\0\0\0" + socks5_target(host, port) + data


def exchange(relay, source_host, datagrams, wait=1.0):
    """Send datagrams to relay from source_host; what comes back within
    wait seconds of the last."""
    answers = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.bind((source_host, 0))
        for data in datagrams:
            client.sendto(data, relay)
        client.settimeout(wait)
        while True:
            try:
                answers.append(client.recv(65535))
            except socket.timeout:
                return answers


# -- the checks ---------------------------------------------------------------

def socksify_dig(tmp):
    conf = os.path.join(tmp, "dante.conf")
    with open(conf, "w") as file:
        file.write("route {\n  from: 0.0.0.0/0 to: 0.0.0.0/0 via: %s "
                   "port = %d\n  protocol: udp tcp\n  proxyprotocol: "
                   "socks_v5\n  method: none\n}\n" % DAEMON)
    daemon = socks_daemon("--enable-udp")
    try:
        result = run("socksify", program("drill"), "@" + FAR4, "v4.test", "A",
                     check=False, env=dict(os.environ, SOCKS_CONF=conf))
        check("drill @%s v4.test A through socksify" % FAR4, re.search(
            r"^v4\.test\.\s+\d+\s+IN\s+A\s+192\.0\.2\.10$",
            result.stdout, re.M),
            "rc %d, out %r, err %r" % (result.returncode, result.stdout,
                                       result.stderr[-300:]))
        ended = daemon.wait_for_log("UDP association ended: 1 datagrams up")
        check("the daemon logs each association's end", ended,
              "\n".join(daemon.lines[-6:]))
    finally:
        daemon.stop()
    print("\n".join("  log: " + line for line in daemon.lines))


def outbound_address_and_far_bind(far):
    daemon = socks_daemon("--enable-udp", "--enable-bind",
                          "--outbound-address", NEAR4_OUTBOUND)
    try:
        control, reply = request(DAEMON, 3, "0.0.0.0", 0)
        with control:
            answers = exchange(reply_address(reply), "127.0.0.1",
                               [datagram(FAR4, FAR_ECHO_PORT, b"who am I")])
        check("UDP leaves from --outbound-address",
              len(answers) == 1 and answers[0].startswith(
                  datagram(FAR4, FAR_ECHO_PORT, NEAR4_OUTBOUND.encode()
                           + b" ")), repr(answers))
        control, first = request(DAEMON, 2, FAR4, 0)
        with control:
            where = reply_address(first)
            check("BIND listens on --outbound-address",
                  first[:4] == b"\x05\x00\x00\x01"
                  and where[0] == NEAR4_OUTBOUND, first.hex())
            peer = far.connect_to(*where)
            try:
                second = recv_socks5_reply(control)
                check("the second reply names the far host",
                      second[:4] == b"\x05\x00\x00\x01"
                      and reply_address(second)[0] == FAR4, second.hex())
                data = recv_exactly(control, 23)
                control.sendall(b"hello back")
                control.shutdown(socket.SHUT_WR)
                out, err = peer.communicate(timeout=TIMEOUT)
            finally:
                if peer.poll() is None:
                    peer.kill()
                    peer.communicate()
            check("bytes flow both ways with the far host",
                  data == b"hello from the far host"
                  and out.strip() == "hello back", out + err)
    finally:
        daemon.stop()


class LoopbackService:
    """A UDP service on 127.0.0.1 that records every datagram it gets."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.sock.settimeout(0.05)

    def received(self):
        got = []
        while True:
            try:
                got.append(self.sock.recv(65535))
            except socket.timeout:
                return got


# What the servers' resolver knows (FakeResolver: never DNS).
NAMES = {"loop.test": ["127.0.0.1"], "loop6.test": ["::1"],
         "far.test": [FAR4], "localhost": ["127.0.0.1"]}


def remote_client_guard():
    loopback = LoopbackService()
    server = torsocksd.Server(listen=[("0.0.0.0", 0)], open_proxy=True,
                              enable_udp=True, enable_bind=True,
                              resolver=FakeResolver(NAMES),
                              log_destinations=True)
    server.start()
    try:
        proxy = (NEAR4, server.address[1])
        port = loopback.port
        local_forms = [("127.0.0.1", port), ("127.0.0.2", port),
                       ("0.0.0.0", port), ("::1", port),
                       ("::ffff:127.0.0.1", port), ("loop.test", port),
                       ("loop6.test", port), ("localhost", port),
                       ("169.254.169.254", port)]
        control, reply = request(proxy, 3, "0.0.0.0", 0, source=(NEAR4, 0))
        with control:
            check("a remote client's association is on the address it "
                  "reached", reply[:4] == b"\x05\x00\x00\x01"
                  and reply_address(reply)[0] == NEAR4, reply.hex())
            answers = exchange(reply_address(reply), NEAR4, [
                datagram(host, port, b"to loopback") for host, port
                in local_forms] + [datagram("far.test", FAR_ECHO_PORT,
                                            b"to the far host")])
            check("only the far host answers the remote client",
                  len(answers) == 1 and answers[0].startswith(
                      datagram(FAR4, FAR_ECHO_PORT, NEAR4.encode() + b" ")),
                  repr(answers))
            deadline = time.monotonic() + TIMEOUT
            while server.stats()["udp"].get("dropped: refused", 0) \
                    < len(local_forms) and time.monotonic() < deadline:
                time.sleep(0.02)
            check("every datagram to loopback is counted as refused",
                  server.stats()["udp"].get("dropped: refused")
                  == len(local_forms), server.stats()["udp"])
        check("the loopback service saw none", loopback.received() == [])
        # The control: a client on this host may send to loopback.
        control, reply = request(("127.0.0.1", server.address[1]), 3,
                                 "0.0.0.0", 0)
        with control:
            exchange(reply_address(reply), "127.0.0.1",
                     [datagram("127.0.0.1", port, b"local")], wait=0.3)
        check("a local client reaches the loopback service",
              loopback.received() == [b"local"])
        for host in ("127.0.0.1", "0.0.0.0", "::1", "loop.test"):
            control, reply = request(proxy, 2, host, 0, source=(NEAR4, 0))
            with control:
                check("a remote client's BIND to %s is refused" % host,
                      reply == b"\x05\x02\x00\x01" + bytes(6), reply.hex())
    finally:
        server.stop()
        loopback.sock.close()


def main():
    far = FarHost()
    tmp = os.environ.get("TMPDIR", "/tmp")
    try:
        socksify_dig(tmp)
        outbound_address_and_far_bind(far)
        remote_client_guard()
    finally:
        far.close()
    return finish()


if __name__ == "__main__":
    sys.exit(main())
