#!/usr/bin/env python3
"""Datagrams per second and MB/s through one torsocksd UDP association,
next to the same UDP echo reached directly.

    python3 bench/udp.py [--quick] [--sizes 64,1400,8192] [--json FILE]

A UDP echo service runs in a process of its own and the load in this one,
both pinned to CPU 0; torsocksd (--enable-udp) runs on CPU 1.  For each
datagram size the load keeps WINDOW datagrams in flight to the echo, either
directly or through one association (each datagram behind the RFC 1928 §7
header), for SECONDS, and counts the echoes that come back: datagrams/s is
echoes per second, MB/s (10^6 bytes) their payload per second, one way.  A
datagram that does not come back within LOSS_WAIT counts as lost and the
window is refilled.  Every echo is checked: its header (through the proxy),
size and sequence number.  Figures are medians of --reps runs; "proxy CPU"
is the CPU time torsocksd spent per echo (two datagrams through it, one each
way), which a busy machine disturbs less than the rates.

Exit status 0, or 1 when an echo was wrong or torsocksd did not start.
Standard library only; Linux; loopback only; not collected by pytest.
"""

import argparse
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import time
import multiprocessing

from common import TORSOCKSD, cpu_seconds, receive_exactly, stop_process

WINDOW = 64             # datagrams in flight
LOSS_WAIT = 0.2         # seconds without an echo: the window counts as lost
BUFFER = 4 * 1024 * 1024
SEQUENCE = struct.Struct("!Q")


def pin(cpus):
    if hasattr(os, "sched_setaffinity") and os.cpu_count() > 1:
        os.sched_setaffinity(0, cpus)


def echo_main(port_pipe):
    """The echo service: every datagram back to where it came from."""
    pin({0})
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        sock.setsockopt(socket.SOL_SOCKET, option, BUFFER)
    sock.bind(("127.0.0.1", 0))
    port_pipe.send(sock.getsockname()[1])
    buffer = bytearray(65536)
    view = memoryview(buffer)
    while True:
        size, source = sock.recvfrom_into(buffer)
        sock.sendto(view[:size], source)


class Torsocksd:
    """torsocksd.py --enable-udp on CPU 1, on a port it picks."""

    def __init__(self):
        self.process = subprocess.Popen(
            [sys.executable, TORSOCKSD, "--enable-udp", "--listen",
             "127.0.0.1:0"],
            stderr=subprocess.PIPE, universal_newlines=True,
            preexec_fn=lambda: pin({1}))
        deadline = time.monotonic() + 10
        for line in self.process.stderr:
            if " listening on " in line:
                self.port = int(line.rsplit(":", 1)[1])
                break
            if time.monotonic() > deadline:
                break
        else:
            raise SystemExit("torsocksd did not start")

    def cpu_seconds(self):
        """User and system CPU time the process has used."""
        return cpu_seconds([self.process.pid])

    def close(self):
        stop_process(self.process)
        self.process.stderr.close()


def associate(proxy_port):
    """A UDP ASSOCIATE for 0.0.0.0:0: (control socket, relay address)."""
    control = socket.create_connection(("127.0.0.1", proxy_port), timeout=10)
    control.sendall(b"\x05\x01\x00" + b"\x05\x03\x00\x01" + bytes(6))
    try:
        reply = receive_exactly(control, 12)
    except ConnectionError as error:
        raise SystemExit("torsocksd ended the association: %s" % error)
    if reply[:4] != b"\x05\x00\x05\x00" or reply[5] != 1:
        raise SystemExit("unexpected reply %s" % reply.hex())
    return control, (socket.inet_ntoa(reply[6:10]),
                     int.from_bytes(reply[10:12], "big"))


def client_socket():
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        sock.setsockopt(socket.SOL_SOCKET, option, BUFFER)
    sock.bind(("127.0.0.1", 0))
    return sock


def drain(sock):
    """Read what a run before left (late echoes)."""
    sock.settimeout(LOSS_WAIT)
    try:
        while True:
            sock.recv(65536)
    except socket.timeout:
        pass


def run(sock, size, seconds, echo_port, relay=None):
    """Echo datagrams of size payload bytes for seconds from sock (always
    the same one through the proxy: the association takes no other port):
    (echoes, lost, wrong, elapsed)."""
    header = b""
    target = ("127.0.0.1", echo_port)
    if relay is not None:
        header = b"\0\0\0\x01" + socket.inet_aton("127.0.0.1") \
            + echo_port.to_bytes(2, "big")
        target = relay
    drain(sock)
    payload = bytearray(header + bytes(size))
    offset = len(header)
    expected = len(header) + size
    buffer = bytearray(65536)
    echoes = lost = wrong = outstanding = sequence = 0
    started = time.monotonic()
    deadline = started + seconds
    try:
        while True:
            now = time.monotonic()
            if now >= deadline:
                break
            while outstanding < WINDOW:
                SEQUENCE.pack_into(payload, offset, sequence)
                sequence += 1
                sock.sendto(payload, target)
                outstanding += 1
            try:
                got = sock.recv_into(buffer)
            except socket.timeout:
                lost += outstanding
                outstanding = 0
                continue
            outstanding -= 1
            if got != expected or buffer[:offset] != header \
                    or SEQUENCE.unpack_from(buffer, offset)[0] >= sequence:
                wrong += 1
            else:
                echoes += 1
    finally:
        elapsed = time.monotonic() - started
    return echoes, lost, wrong, elapsed


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="1 s per figure, one run (default 3 s, 3 runs)")
    parser.add_argument("--sizes", default="64,512,1400,8192,32768",
                        help="payload sizes in bytes (default %(default)s)")
    parser.add_argument("--reps", type=int, help="runs per figure")
    parser.add_argument("--json", metavar="FILE", help="write the figures")
    options = parser.parse_args(argv)
    seconds = 1.0 if options.quick else 3.0
    reps = options.reps or (1 if options.quick else 3)
    sizes = [int(size) for size in options.sizes.split(",")]
    pin({0})
    receiver, sender = multiprocessing.Pipe(duplex=False)
    echo = multiprocessing.Process(target=echo_main, args=(sender,),
                                   daemon=True)
    echo.start()
    echo_port = receiver.recv()
    proxy = Torsocksd()
    control, relay = associate(proxy.port)
    sockets = {"direct": client_socket(), "torsocksd": client_socket()}
    figures, failed = [], False
    try:
        print("UDP echo, %d in flight, %.0f s x %d, median (torsocksd on "
              "CPU 1, load and echo on CPU 0)" % (WINDOW, seconds, reps))
        print("%8s  %12s %9s  %12s %9s  %6s  %10s  %s" % (
            "bytes", "direct dg/s", "MB/s", "torsocksd", "MB/s", "ratio",
            "proxy CPU", "lost (direct / proxied)"))
        for size in sizes:
            row = {"size": size}
            for column, where in (("direct", None), ("torsocksd", relay)):
                runs, cpu = [], []
                for _ in range(reps):
                    before = proxy.cpu_seconds()
                    runs.append(run(sockets[column], size, seconds,
                                    echo_port, where))
                    cpu.append((proxy.cpu_seconds() - before)
                               / max(runs[-1][0], 1))
                rates = [echoes / elapsed for echoes, _, _, elapsed in runs]
                row[column] = {
                    "datagrams_per_s": statistics.median(rates),
                    "mb_per_s": statistics.median(rates) * size / 1e6,
                    "proxy_cpu_us_per_echo": statistics.median(cpu) * 1e6,
                    "lost": sum(r[1] for r in runs),
                    "wrong": sum(r[2] for r in runs)}
                failed |= row[column]["wrong"] > 0
            direct, proxied = row["direct"], row["torsocksd"]
            print("%8d  %12.0f %9.1f  %12.0f %9.1f  %5.0f%%  %7.1f us  "
                  "%d / %d%s" % (
                size, direct["datagrams_per_s"], direct["mb_per_s"],
                proxied["datagrams_per_s"], proxied["mb_per_s"],
                100 * proxied["datagrams_per_s"]
                / max(direct["datagrams_per_s"], 1),
                proxied["proxy_cpu_us_per_echo"],
                direct["lost"], proxied["lost"],
                "  WRONG ECHOES" if direct["wrong"] or proxied["wrong"]
                else ""))
            figures.append(row)
    finally:
        for sock in sockets.values():
            sock.close()
        control.close()
        proxy.close()
        echo.terminate()
        echo.join(5)
    if options.json:
        with open(options.json, "w") as file:
            json.dump(figures, file, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
