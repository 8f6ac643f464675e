#!/usr/bin/env python3
"""Handshakes per second through HAProxy to two torsocksd backends, next to
one of those backends reached directly, in one run.

    python3 bench/haproxy.py [--seconds S] [--concurrency 1,16,64] [--reps N]

Runs as root in a network namespace of its own with only loopback (it
re-runs itself under `unshare -n`).  Starts an echo target, two torsocksd
processes (--proxy-protocol-from 127.0.0.1) and HAProxy with
contrib/haproxy.cfg (ports filled in), then a load generator: C concurrent
SOCKS5 clients in one selectors loop, each connecting, sending 05 01 00 and
a CONNECT to the echo target, waiting for 05 00 and the 10-byte reply, one
byte echoed, then closing; "handshakes/s" is how many of those finished a
second.  "direct" clients come from 127.0.0.2 to one backend (not a
balancer's address: no PROXY header); "HAProxy" clients go to HAProxy,
which sends a PROXY v2 header to whichever backend has fewer connections.
Every piece runs on the same cores, so the figure says what the extra hop
costs on this machine, not what N hosts would give.  Medians of --reps
runs.  Standard library only; Linux; not collected by pytest.
"""

import argparse
import multiprocessing
import os
import re
import selectors
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from common import (TORSOCKSD, EchoTarget, connect_request, free_port,
                    wait_for_port)

CONFIG = os.path.join(os.path.dirname(TORSOCKSD), "contrib", "haproxy.cfg")
# Where "direct" clients come from: not 127.0.0.1, whose connections the
# backends take to be HAProxy's (with a PROXY header).
DIRECT_SOURCE = "127.0.0.2"
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


# -- the load -----------------------------------------------------------------

def load_main(address, source, echo_port, concurrency, seconds, results):
    """C clients in turn for `seconds`; puts (handshakes, failures)."""
    request = b"\x05\x01\x00" + connect_request(echo_port) + b"x"
    expected = b"\x05\x00\x05\x00\x00\x01" + bytes(6) + b"x"
    selector = selectors.DefaultSelector()
    done = failed = 0
    end = time.monotonic() + seconds

    def start():
        sock = socket.socket()
        sock.setblocking(False)
        if source:
            # The port is picked at connect, for this destination: a bind
            # alone could pick one whose connection is still in TIME_WAIT.
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((source, 0))
        sock.connect_ex(address)
        selector.register(sock, selectors.EVENT_WRITE, [b"", False])

    for _ in range(concurrency):
        start()
    while time.monotonic() < end:
        for key, _ in selector.select(0.5):
            sock, state = key.fileobj, key.data
            if not state[1]:
                if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                    failed += 1
                else:
                    sock.send(request)
                    state[1] = True
                    selector.modify(sock, selectors.EVENT_READ, state)
                    continue
            else:
                try:
                    data = sock.recv(64)
                except OSError:
                    data = b""
                state[0] += data
                if data and len(state[0]) < len(expected):
                    continue
                if state[0] == expected:
                    done += 1
                else:
                    failed += 1
            selector.unregister(sock)
            sock.close()
            start()
    results.put((done, failed))


def measure(address, source, echo_port, concurrency, seconds):
    results = multiprocessing.Queue()
    load = multiprocessing.Process(target=load_main, args=(
        address, source, echo_port, concurrency, seconds, results))
    load.start()
    done, failed = results.get(timeout=seconds + 60)
    load.join()
    return done / seconds, failed


# -- the processes under test ---------------------------------------------------

def start_backend(port, directory, name):
    return subprocess.Popen(
        [sys.executable, TORSOCKSD, "--listen", "127.0.0.1:%d" % port,
         "--proxy-protocol-from", "127.0.0.1", "--log-level", "warning",
         "--log-file", os.path.join(directory, name + ".log")],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)


def start_haproxy(port, backend_ports, directory):
    config = open(CONFIG).read()
    config = config.replace("bind :9050", "bind 127.0.0.1:%d" % port)
    for number, backend in enumerate(backend_ports, 1):
        config = re.sub(r"(server torsocksd%d )\S+" % number,
                        r"\g<1>127.0.0.1:%d" % backend, config)
    # No log line per connection: it would be part of what is measured.
    config = config.replace("    option tcplog\n", "")
    config = config.replace("    log global\n", "")
    path = os.path.join(directory, "haproxy.cfg")
    with open(path, "w") as file:
        file.write(config)
    return subprocess.Popen(["haproxy", "-db", "-f", path],
                            stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--reps", type=int, default=3)
    options = parser.parse_args()
    if os.environ.get("TORSOCKSD_BENCH_NETNS") != "1":
        if os.geteuid() != 0:
            parser.error("needs root, for a network namespace of its own")
        os.environ["TORSOCKSD_BENCH_NETNS"] = "1"
        os.execvp("unshare", ["unshare", "-n", sys.executable,
                              os.path.abspath(__file__)] + sys.argv[1:])
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    # Tens of thousands of short connections between the same addresses:
    # let a new one reuse a port still in TIME_WAIT (this namespace only).
    for name, value in (("net/ipv4/tcp_tw_reuse", "1"),
                        ("net/ipv4/ip_local_port_range", "1024 65535")):
        with open("/proc/sys/" + name, "w") as setting:
            setting.write(value)
    concurrencies = [int(c) for c in options.concurrency.split(",")]

    children = []
    with tempfile.TemporaryDirectory(prefix="bench-haproxy-") as directory:
        echo = EchoTarget()
        echo_port = echo.port
        try:
            backend_ports = [free_port(), free_port()]
            for number, port in enumerate(backend_ports, 1):
                children.append(start_backend(port, directory,
                                              "torsocksd%d" % number))
            front = free_port()
            children.append(start_haproxy(front, backend_ports, directory))
            for port in backend_ports + [front]:
                wait_for_port(port, source=DIRECT_SOURCE)
            time.sleep(1.0)     # HAProxy's first health checks mark them UP
            print("handshakes/s (median of %d runs of %.0f s); %s; %s"
                  % (options.reps, options.seconds, subprocess.run(
                      ["haproxy", "-v"], stdout=subprocess.PIPE,
                      universal_newlines=True).stdout.splitlines()[0],
                      "%d CPUs" % os.cpu_count()))
            print("%-12s %18s %28s" % ("clients", "one backend direct",
                                       "HAProxy to two backends"))
            for concurrency in concurrencies:
                figures = {"direct": [], "haproxy": []}
                failures = 0
                for _ in range(options.reps):
                    for column, address, source in (
                            ("direct", ("127.0.0.1", backend_ports[0]),
                             DIRECT_SOURCE),
                            ("haproxy", ("127.0.0.1", front), None)):
                        rate, failed = measure(address, source, echo_port,
                                               concurrency, options.seconds)
                        figures[column].append(rate)
                        failures += failed
                print("%-12d %18.0f %28.0f%s" % (
                    concurrency, statistics.median(figures["direct"]),
                    statistics.median(figures["haproxy"]),
                    "  (%d failed)" % failures if failures else ""),
                    flush=True)
        finally:
            for child in children:
                child.terminate()
                child.wait(10)
            echo.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
