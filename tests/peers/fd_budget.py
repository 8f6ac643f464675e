"""Run inside a fresh network namespace (unshare -n), as root: CONNECTs to
addresses that never answer hold a bounded number of sockets, and a fresh
client is served while they wait.

192.0.2.0/24 is routed to lo, where no address of it lives: a SYN to it
vanishes, so a connect() there stays pending (a "black hole").  The name hole.test resolves to 16 such addresses.
torsocksd runs in a forked child whose RLIMIT_NOFILE is 1024 (its default
--max-connections follows from that), with a Happy Eyeballs delay of 10 ms,
so that without a cap every CONNECT would soon hold 17 sockets.  The parent
opens 250 such CONNECTs, then checks that at most two connects per request
are out (SYN-SENT sockets in /proc/net/tcp, which this namespace owns
alone), that the server logs no "accept failed", and that a fresh client's
CONNECT to an echo server on 127.0.0.1 is relayed.

Prints one line per check and exits non-zero if any fails.
"""

import os
import resource
import signal
import socket
import sys
import time

# common first: it puts torsocksd and conftest on sys.path.
from common import TIMEOUT, add_test_hosts, check, finish, ip
import torsocksd
from conftest import (EchoServer, FakeResolver, recv_exactly,
                      socks5_request)

HOLES = ["192.0.2.%d" % n for n in range(100, 116)]
REQUESTS = 250


def syn_sent() -> int:
    """Sockets of this namespace waiting for a SYN-ACK (state 02)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as lines:
            next(lines)
            count += sum(1 for line in lines if line.split()[3] == "02")
    return count


def serve(port_writer, log_path):
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))
    torsocksd.configure_logging("info", log_path)
    server = torsocksd.Server([("127.0.0.1", 0)],
                              resolver=FakeResolver({"hole.test": HOLES}),
                              happy_eyeballs_delay=0.01, connect_timeout=30)
    server.bind()
    os.write(port_writer, b"%d\n" % server.address[1])
    os.close(port_writer)
    signal.signal(signal.SIGTERM, lambda *_: server.stop(0, wait=False))
    server.serve_forever()


def main():
    add_test_hosts()
    ip("route", "add", "192.0.2.0/24", "dev", "lo")
    resource.setrlimit(resource.RLIMIT_NOFILE, (4096, 4096))
    log_path = "/tmp/fd_budget.%d.log" % os.getpid()
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(reader)
        try:
            serve(writer, log_path)
        finally:
            os._exit(0)
    os.close(writer)
    with os.fdopen(reader) as lines:
        port = int(lines.readline())
    echo = EchoServer(host="127.0.0.1")
    clients = []
    try:
        for _ in range(REQUESTS):
            sock = socket.create_connection(("127.0.0.1", port), TIMEOUT)
            sock.sendall(b"\x05\x01\x00"
                         + socks5_request(1, "hole.test", 80))
            clients.append(sock)
        time.sleep(1.0)     # 16 delays of 10 ms many times over
        pending = syn_sent()
        check("at most two connects out per request", pending
              <= 2 * REQUESTS,
              "%d SYN-SENT for %d requests" % (pending, REQUESTS))
        check("the black holes are being tried", pending >= REQUESTS,
              "%d SYN-SENT" % pending)
        with socket.create_connection(("127.0.0.1", port), TIMEOUT) as fresh:
            fresh.sendall(b"\x05\x01\x00"
                          + socks5_request(1, "127.0.0.1", echo.port)
                          + b"ping")
            got = recv_exactly(fresh, 2 + 10 + 4)
        check("a fresh client is relayed",
              got == b"\x05\x00\x05\x00\x00\x01" + bytes(6) + b"ping",
              repr(got))
    finally:
        for sock in clients:
            sock.close()
        os.kill(child, signal.SIGTERM)
        os.waitpid(child, 0)
        echo.close()
    with open(log_path) as log:
        text = log.read()
    os.unlink(log_path)
    check("no accept failed for want of descriptors",
          "accept failed" not in text and "cannot open" not in text,
          [line for line in text.splitlines() if "fail" in line][:3])
    return finish()


if __name__ == "__main__":
    sys.exit(main())
