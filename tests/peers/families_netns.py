"""Run inside a fresh network namespace (unshare -n): SOCKS requests against
torsocksd (in this process, or the command as a child) with test hosts of
both address families on the loopback interface.

    unshare -n python3 families_netns.py SPEC_JSON

The network (fixed, set up first):

    lo        up; 192.0.2.5, 192.0.2.10, 192.0.2.11 (/32) and 2001:db8::5,
              2001:db8::10, 2001:db8::11 (/128)
    DEAD      192.0.2.99 and 2001:db8::99 are routed into an interface where
              packets vanish (a dummy interface, or an ifb one when the
              kernel has no dummy driver): connect() to them hangs, it does
              not fail
    ifb1      up, no address, no route (for --outbound-interface)
    ifb2      down (for --outbound-interface)

Targets: an echo server on every (host, port) of spec["targets"] recording
the peer address of every connection it accepts.  Nothing listens on
192.0.2.11 or 2001:db8::11: connecting there is refused at once.

SPEC_JSON (a JSON object):

    targets   [[host, port], ...]
    dnsmasq   extra dnsmasq arguments (optional); "{dns}" in daemon args
              becomes its 127.0.0.1:PORT
    runs      [run, ...], each one of
              {"server": {Server keyword arguments}, "names": {FakeResolver
               names}, "requests": [...]}
              {"daemon": [torsocksd arguments], "requests": [...]}
              (a daemon must listen on 127.0.0.1:1080)

A request: {"command": "connect" | "resolve", "host": ..., "port": ...,
"data": "text to echo"}; always SOCKS5, no authentication, a name as ATYP 3
and an IP literal as ATYP 1 or 4, sent to the server's first listener.

Prints one line "RESULT " + JSON: the dead-route mechanism and whether the
dead address really hangs, then per run per request the reply (hex), the
seconds from request to reply, the echoed text and the peer address(es) the
targets saw for it, and the server's log lines.  Exits 0 unless the
harness itself broke; the calling test makes the assertions.
"""

import errno
import json
import logging
import select
import socket
import subprocess
import sys
import time

# common first: it puts torsocksd, torpeer and conftest on sys.path.
from common import Daemon, add_test_hosts, ip
import torsocksd
from torpeer import find_program
from conftest import (EchoServer, FakeResolver, recv_exactly,
                      socks5_greeting, socks5_request)

HOSTS4 = ["192.0.2.5", "192.0.2.10", "192.0.2.11"]
HOSTS6 = ["2001:db8::5", "2001:db8::10", "2001:db8::11"]
DEAD4, DEAD6 = "192.0.2.99", "2001:db8::99"
DAEMON_ADDRESS = ("127.0.0.1", 1080)
TIMEOUT = 15.0
COMMANDS = {"connect": 1, "resolve": 0xF0}


def set_up_network():
    add_test_hosts(*HOSTS4, *HOSTS6)
    # Somewhere packets vanish: a dummy interface if the kernel has the
    # driver, else an ifb one (both NOARP, always "up", and they drop what
    # is sent to them).  A blackhole route would fail at once instead.
    mechanism = None
    for kind in ("dummy", "ifb"):
        if ip("link", "add", "dead0", "type", kind, check=False).returncode == 0:
            mechanism = kind
            break
    if mechanism is None:
        raise SystemExit("neither a dummy nor an ifb interface can be made")
    ip("link", "set", "dead0", "up")
    ip("route", "add", DEAD4 + "/32", "dev", "dead0")
    ip("-6", "route", "add", DEAD6 + "/128", "dev", "dead0")
    ip("link", "add", "ifb1", "type", mechanism)
    ip("link", "set", "ifb1", "up")
    ip("link", "add", "ifb2", "type", mechanism)
    return mechanism


def dead_address_hangs(address, wait=0.15):
    """Does a connect() to address stay pending (rather than fail)?"""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setblocking(False)
        error = probe.connect_ex((address, 8000))
        if error != errno.EINPROGRESS:
            return False
        _, writable, _ = select.select([], [probe], [], wait)
        return not writable


class Target(EchoServer):
    """An echo server on (host, port) that records each peer address."""

    def __init__(self, host, port):
        super().__init__(host=host, port=port)
        self.name = torsocksd.format_address(self.listener.getsockname())

    @property
    def peers(self):
        return [peer[0] for peer in self.accepted]


def read_reply(sock):
    head = recv_exactly(sock, 4)
    if head[3] == 1:
        rest = recv_exactly(sock, 6)
    elif head[3] == 4:
        rest = recv_exactly(sock, 18)
    else:
        length = recv_exactly(sock, 1)
        rest = length + recv_exactly(sock, length[0] + 2)
    return head + rest


def one_request(address, request, targets):
    before = {t.name: len(t.peers) for t in targets}
    result = {"request": request}
    with socket.create_connection(address, timeout=TIMEOUT) as client:
        client.sendall(socks5_greeting(0))
        result["method"] = recv_exactly(client, 2).hex()
        start = time.monotonic()
        client.sendall(socks5_request(COMMANDS[request["command"]],
                                      request["host"], request["port"]))
        try:
            reply = read_reply(client)
        except (OSError, EOFError) as error:
            result["error"] = repr(error)
            result["elapsed"] = time.monotonic() - start
            return result
        result["elapsed"] = time.monotonic() - start
        result["reply"] = reply.hex()
        data = request.get("data")
        if reply[1] == 0 and request["command"] == "connect" and data:
            client.sendall(data.encode())
            result["echo"] = recv_exactly(client, len(data)).decode()
    # The target accepted before it echoed: its record is complete.
    result["peers"] = [peer for t in targets
                       for peer in t.peers[before[t.name]:]]
    return result


def run_server(run, targets, records):
    server = torsocksd.Server(
        listen=[("127.0.0.1", 0)], resolver=FakeResolver(run.get("names")),
        log_destinations=True, **run["server"]).start()
    try:
        return [one_request(server.address, request, targets)
                for request in run["requests"]]
    finally:
        server.stop()


def run_daemon(run, targets, records, dns):
    daemon = Daemon(*[a.replace("{dns}", dns or "") for a in run["daemon"]])
    try:
        results = [one_request(DAEMON_ADDRESS, request, targets)
                   for request in run["requests"]]
        results.append({"daemon_alive": daemon.process.poll() is None})
        return results
    finally:
        daemon.stop()
        records.extend("daemon: " + line for line in daemon.lines)


def start_dnsmasq(extra):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [find_program("dnsmasq"), "--no-daemon", "--no-resolv",
         "--no-hosts", "--listen-address=127.0.0.1", "--port=%d" % port,
         "--bind-interfaces", *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    query = torsocksd.encode_dns_query(7, "ready.test", torsocksd.DnsType.A)
    deadline = time.monotonic() + TIMEOUT
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.settimeout(0.05)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise SystemExit("dnsmasq exited")
            probe.sendto(query, ("127.0.0.1", port))
            try:
                probe.recv(512)
                return process, "127.0.0.1:%d" % port
            except OSError:
                continue
    process.kill()
    raise SystemExit("dnsmasq did not answer")


def main():
    spec = json.loads(sys.argv[1])
    output = {"dead_mechanism": set_up_network()}
    output["dead_hangs"] = {DEAD4: dead_address_hangs(DEAD4),
                            DEAD6: dead_address_hangs(DEAD6)}
    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    torsocksd.log.addHandler(handler)
    torsocksd.log.setLevel(logging.INFO)
    targets = [Target(host, port) for host, port in spec.get("targets", [])]
    dnsmasq = dns = None
    if "dnsmasq" in spec:
        dnsmasq, dns = start_dnsmasq(spec["dnsmasq"])
    runs = []
    try:
        for run in spec["runs"]:
            if "daemon" in run:
                runs.append(run_daemon(run, targets, records, dns))
            else:
                runs.append(run_server(run, targets, records))
    finally:
        if dnsmasq is not None:
            dnsmasq.terminate()
            dnsmasq.wait()
        for target in targets:
            target.listener.close()
    output["runs"] = runs
    output["log"] = records
    print("RESULT " + json.dumps(output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
