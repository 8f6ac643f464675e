#!/usr/bin/env python3
"""Reloads under load: one tunnel carries data both ways while the
configuration file changes and SIGHUP arrives, again and again; then the
metrics page is scraped.

    python3 bench/reload.py [--seconds S] [--interval S]

Starts `torsocksd.py --config FILE` (a SOCKS listener and --metrics on
loopback) and an echo target, opens one SOCKS5 tunnel to it and streams
random bytes through it for S seconds while, every --interval seconds, the
file is rewritten (a second listener comes and goes, log-destinations, the
client lists, the destination policy and --max-connections change) and
the daemon gets SIGHUP; every fifth file has an invalid line, and that
reload must change nothing.  Prints how many reloads the log confirmed, how
many bytes went each way and whether the SHA-256 of what came back equals
that of what was sent, then the page's reload, byte and connection
counters.  Standard library only; loopback only; not collected by pytest.
"""

import hashlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

from common import (TORSOCKSD, argument_parser, connect_request, free_port,
                    receive_exactly, stop_process)

CHUNK = 64 * 1024
START_TIMEOUT = 10.0
INVALID_EVERY = 5       # every fifth file is invalid: it must change nothing


def echo_target():
    """A loopback echo server for one connection at a time; its port."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)

    def serve():
        while True:
            peer, _ = listener.accept()
            with peer:
                while True:
                    data = peer.recv(CHUNK)
                    if not data:
                        break
                    peer.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    return listener.getsockname()[1]


def open_tunnel(socks_port, target_port):
    sock = socket.create_connection(("127.0.0.1", socks_port),
                                    timeout=START_TIMEOUT)
    sock.sendall(b"\x05\x01\x00" + connect_request(target_port))
    reply = receive_exactly(sock, 12)
    if reply[:4] != b"\x05\x00\x05\x00":
        raise RuntimeError("tunnel refused: %s" % reply.hex())
    return sock


def configuration(step, socks_port, spare_port, metrics_port):
    """The file's text for reload number step: every other step adds a
    listener, and the rules and limits change each time."""
    lines = ["listen 127.0.0.1:%d" % socks_port,
             "metrics 127.0.0.1:%d" % metrics_port,
             "log-level info",
             "max-connections %d" % (500 + step % 7),
             "allow 127.0.0.0/8",
             "deny 127.0.0.%d" % (2 + step % 200),
             "policy reject 192.0.2.%d:*" % (step % 250)]
    if step % 2:
        lines += ["listen 127.0.0.1:%d" % spare_port, "log-destinations"]
    if step and step % INVALID_EVERY == 0:
        lines.append("policy accept nowhere:*")     # the reload must fail
    return "\n".join(lines) + "\n"


def main():
    parser = argument_parser(__doc__)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--interval", type=float, default=0.25)
    options = parser.parse_args()

    socks_port, spare_port, metrics_port = free_port(), free_port(), \
        free_port()
    target_port = echo_target()
    workdir = tempfile.mkdtemp(prefix="torsocksd-reload-")
    config = os.path.join(workdir, "torsocksd.conf")
    log_path = os.path.join(workdir, "log")
    with open(config, "w") as file:
        file.write(configuration(0, socks_port, spare_port, metrics_port))
    log = open(log_path, "wb")
    daemon = subprocess.Popen([sys.executable, TORSOCKSD, "--config", config],
                              stderr=log, stdin=subprocess.DEVNULL)
    try:
        return measure(options, daemon, config, log_path, socks_port,
                       spare_port, metrics_port, target_port)
    finally:
        stop_process(daemon)
        log.close()


def measure(options, daemon, config, log_path, socks_port, spare_port,
            metrics_port, target_port):
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            tunnel = open_tunnel(socks_port, target_port)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    tunnel.settimeout(START_TIMEOUT)
    sent, received = hashlib.sha256(), hashlib.sha256()
    counts = {"sent": 0, "received": 0}
    stop = threading.Event()

    def send():
        while not stop.is_set():
            block = os.urandom(CHUNK)
            tunnel.sendall(block)
            sent.update(block)
            counts["sent"] += len(block)
        tunnel.shutdown(socket.SHUT_WR)

    def receive():
        while True:
            data = tunnel.recv(1 << 20)
            if not data:
                return
            received.update(data)
            counts["received"] += len(data)

    threads = [threading.Thread(target=send), threading.Thread(
        target=receive)]
    for thread in threads:
        thread.start()
    started = time.monotonic()
    reloads = 0
    while time.monotonic() - started < options.seconds:
        time.sleep(options.interval)
        reloads += 1
        with open(config + ".new", "w") as file:
            file.write(configuration(reloads, socks_port, spare_port,
                                     metrics_port))
        os.replace(config + ".new", config)
        daemon.send_signal(signal.SIGHUP)
    stop.set()
    for thread in threads:
        thread.join(START_TIMEOUT * 3)
    elapsed = time.monotonic() - started
    tunnel.close()
    time.sleep(0.5)         # the last reload's line
    with open(log_path, errors="replace") as file:
        log_text = file.read()
    applied = log_text.count("reload: applied")
    invalid = reloads // INVALID_EVERY
    print("SIGHUPs: %d (%d with an invalid file); applied (log): %d"
          % (reloads, invalid, applied))
    print("tunnel: %d bytes sent, %d echoed back in %.1f s (%.0f MB/s "
          "each way)" % (counts["sent"], counts["received"], elapsed,
                         counts["received"] / elapsed / 1e6))
    same = sent.digest() == received.digest() \
        and counts["sent"] == counts["received"]
    print("SHA-256 of what came back %s what was sent"
          % ("equals" if same else "DIFFERS FROM"))
    with urllib.request.urlopen("http://127.0.0.1:%d/metrics"
                                % metrics_port, timeout=START_TIMEOUT) as page:
        body = page.read().decode()
    print("scrape (%d bytes), its reload, byte and connection lines:"
          % len(body))
    for line in body.splitlines():
        if line.startswith(("torsocksd_reloads_total",
                            "torsocksd_bytes_total",
                            "torsocksd_connections_")):
            print("  " + line)
    return 0 if same and applied == reloads - invalid else 1


if __name__ == "__main__":
    sys.exit(main())
