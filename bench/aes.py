#!/usr/bin/env python3
"""Throughput of torsocksd's pure-Python AES-128-CTR, as relay cells use it.

    python3 bench/aes.py [--mib 4] [--runs 3]

Encrypts MiB mebibytes in 509-byte relay payloads (one keystream, as a
circuit direction does) and prints MB/s per run, by the wall clock and by the
process's CPU time (steadier on a busy machine).  Standard library only; not
collected by pytest.
"""

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, os.pardir))

import torsocksd as aes_module  # noqa: E402

PAYLOAD_LEN = 509


def run(mebibytes: float):
    """(wall-clock MB/s, CPU-time MB/s)"""
    cipher = aes_module.Aes128Ctr(os.urandom(16))
    payload = os.urandom(PAYLOAD_LEN)
    cells = int(mebibytes * 1024 * 1024) // PAYLOAD_LEN
    started, started_cpu = time.perf_counter(), time.process_time()
    for _ in range(cells):
        cipher.process(payload)
    wall = time.perf_counter() - started
    cpu = time.process_time() - started_cpu
    size = cells * PAYLOAD_LEN / 1e6
    return size / wall, size / cpu


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=float, default=4.0)
    parser.add_argument("--runs", type=int, default=3)
    options = parser.parse_args()
    print("Python %s" % sys.version.split()[0])
    for number in range(1, options.runs + 1):
        print("run %d: AES-128-CTR %.2f MB/s (%.2f MB/s of CPU time)"
              % ((number,) + run(options.mib)))


if __name__ == "__main__":
    main()
