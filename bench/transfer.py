#!/usr/bin/env python3
"""Bulk transfer through torsocksd, checked by hash, next to a direct one.

    python3 bench/transfer.py [--mib 256] [--runs 1]

Starts a loopback target in its own process and torsocksd in another, then
moves MiB mebibytes client->target ("up"), target->client ("down") and both
at once ("both"), each side half-closing (shutdown SHUT_WR) when done, and
checks that every byte arrived in order (SHA-256 of what was sent against
what was received).  Prints MB/s for the direct path and through the proxy.
Standard library only; loopback only; not collected by pytest.
"""

import argparse
import hashlib
import multiprocessing
import os
import socket
import subprocess
import sys
import threading
import time

from common import (TORSOCKSD, connect_request, free_port, receive_exactly,
                    wait_for_port)

# An odd-sized block, so a chunk that is lost, doubled or moved changes the
# hash even though the pattern repeats.
BLOCK = os.urandom(1024 * 1024 + 7)
CHUNK = 256 * 1024


def send_stream(sock, total):
    """Send total bytes of the repeating pattern; return its SHA-256."""
    digest = hashlib.sha256()
    view = memoryview(BLOCK)
    offset = 0
    left = total
    while left:
        size = min(CHUNK, left, len(BLOCK) - offset)
        piece = view[offset:offset + size]
        sock.sendall(piece)
        digest.update(piece)
        offset = (offset + size) % len(BLOCK)
        left -= size
    sock.shutdown(socket.SHUT_WR)
    return digest.hexdigest()


def receive_stream(sock):
    """Read to EOF; return (byte count, SHA-256)."""
    digest = hashlib.sha256()
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    count = 0
    while True:
        size = sock.recv_into(buffer)
        if not size:
            return count, digest.hexdigest()
        digest.update(view[:size])
        count += size


def exchange(sock, send_bytes):
    """Send send_bytes (then SHUT_WR) while reading to EOF."""
    result = {}
    sender = threading.Thread(
        target=lambda: result.update(sent=send_stream(sock, send_bytes)))
    sender.start()
    result["received"] = receive_stream(sock)
    sender.join()
    return result


def target_main(listener, reports):
    """The target: per connection, read a 9-byte header (mode, size), then
    exchange bytes as the header says and report what it received."""
    while True:
        sock, _ = listener.accept()
        header = b""
        while len(header) < 9:
            header += sock.recv(9 - len(header))
        mode, size = header[:1], int.from_bytes(header[1:], "big")
        send_bytes = size if mode in (b"d", b"b") else 0
        reports.put(exchange(sock, send_bytes))
        sock.close()


def socks5_connect(proxy_port, target_port):
    sock = socket.create_connection(("127.0.0.1", proxy_port))
    sock.sendall(b"\x05\x01\x00" + connect_request(target_port))
    reply = receive_exactly(sock, 12)
    if reply != b"\x05\x00" + b"\x05\x00\x00\x01" + bytes(6):
        raise RuntimeError("unexpected SOCKS reply %r" % reply)
    return sock


def run(mode, size, connect, reports):
    sock = connect()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    started = time.perf_counter()
    sock.sendall(mode + size.to_bytes(8, "big"))
    send_bytes = size if mode in (b"u", b"b") else 0
    mine = exchange(sock, send_bytes - 0)
    theirs = reports.get(timeout=600)
    elapsed = time.perf_counter() - started
    sock.close()
    moved = 0
    ok = True
    if mode in (b"u", b"b"):
        # what the target got must be what we sent (after the 9-byte header)
        moved += size
        ok &= theirs["received"][0] == size and \
            theirs["received"][1] == mine["sent"]
    if mode in (b"d", b"b"):
        moved += size
        ok &= mine["received"][0] == size and \
            mine["received"][1] == theirs["sent"]
    return moved / elapsed / 1e6, ok


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--proxy-args", default="",
                        help='extra torsocksd options, e.g. "--splice"')
    options = parser.parse_args()
    size = options.mib * 1024 * 1024

    listener = socket.create_server(("127.0.0.1", 0))
    target_port = listener.getsockname()[1]
    reports = multiprocessing.Queue()
    target = multiprocessing.Process(target=target_main,
                                     args=(listener, reports), daemon=True)
    target.start()

    proxy_port = free_port()
    proxy = subprocess.Popen([sys.executable, TORSOCKSD, "--port",
                              str(proxy_port), "--log-level", "warning",
                              *options.proxy_args.split()])
    try:
        wait_for_port(proxy_port)
        paths = {
            "direct": lambda: socket.create_connection(("127.0.0.1",
                                                        target_port)),
            "torsocksd": lambda: socks5_connect(proxy_port, target_port),
        }
        print("%d MiB per direction, %d run(s), python %s, %d cores"
              % (options.mib, options.runs, sys.version.split()[0],
                 os.cpu_count()))
        print("%-10s %-6s %10s  %s" % ("path", "mode", "MB/s", "hashes"))
        failed = False
        for name, connect in paths.items():
            for mode, label in ((b"u", "up"), (b"d", "down"), (b"b", "both")):
                rates = []
                for _ in range(options.runs):
                    rate, ok = run(mode, size, connect, reports)
                    failed |= not ok
                    rates.append(rate)
                rates.sort()
                print("%-10s %-6s %10.0f  %s" % (name, label,
                                                 rates[len(rates) // 2],
                                                 "match" if ok else "MISMATCH"))
        return 1 if failed else 0
    finally:
        proxy.terminate()
        proxy.wait(10)
        target.terminate()


if __name__ == "__main__":
    sys.exit(main())
