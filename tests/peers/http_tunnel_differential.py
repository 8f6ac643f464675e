"""Run inside a fresh network namespace (unshare -n): replay the corpus of
tests/http_tunnel_corpus.py against a real tor's HTTPTunnelPort and against
torsocksd's --http-tunnel port.

    unshare -n python3 http_tunnel_differential.py [--only NAME[,NAME...]]

Brings lo up, starts an echo server on port http_tunnel_corpus.ECHO_PORT
of 127.0.0.1 and ::1, a tor client with only an HTTPTunnelPort
(tests/torpeer.py: a dummy directory authority, so it never builds a
circuit) and a torsocksd Server in this process whose resolver answers only
the corpus's names (never the machine's DNS).  Every case goes to both;
cases run in parallel.

Prints one line per case, in corpus order:

    CASE {"case": NAME, "tor": OUTCOME, "torsocksd": OUTCOME}

with OUTCOME {"received": HEX, "closed": BOOL, "reset": BOOL}, then
"DONE {"cases": N, "seconds": S, "tor": VERSION}".  Exits 0 unless the
harness itself broke; tests/test_http_tunnel_differential.py judges.
"""

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, os.pardir))
sys.path.insert(0, os.path.join(HERE, os.pardir, os.pardir))
import torsocksd  # noqa: E402
import http_tunnel_corpus as corpus  # noqa: E402
import torpeer  # noqa: E402
from conftest import EchoServer, FakeResolver  # noqa: E402
# The SOCKS comparison's way of replaying a case to both (the same pause).
from tor_differential import WORKERS, run_case  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", default="",
                        help="comma-separated case names (default: all)")
    parser.add_argument("--workers", type=int, default=WORKERS)
    options = parser.parse_args()
    cases = corpus.CASES
    if options.only:
        wanted = options.only.split(",")
        unknown = set(wanted) - set(corpus.BY_NAME)
        if unknown:
            parser.error("no such case: %s" % ", ".join(sorted(unknown)))
        cases = [corpus.BY_NAME[name] for name in wanted]

    subprocess.run([torpeer.find_program("ip"), "link", "set", "lo", "up"],
                   check=True)
    started = time.monotonic()
    peers = [EchoServer(host="127.0.0.1", port=corpus.ECHO_PORT),
             EchoServer(host="::1", port=corpus.ECHO_PORT)]
    server = tor = None
    try:
        server = torsocksd.Server(
            listen=[], http_tunnel=[("127.0.0.1", 0)],
            resolver=FakeResolver(corpus.RESOLVER_NAMES)).start()
        tor = torpeer.TorClient(socks=False, http_tunnel=True).start()
        with concurrent.futures.ThreadPoolExecutor(options.workers) as pool:
            results = list(pool.map(
                lambda case: run_case(case, tor.http_tunnel_address,
                                      server.address), cases))
        version = tor.version()
    finally:
        if tor is not None:
            tor.stop()
        if server is not None:
            server.stop()
        for peer in peers:
            peer.close()
    for result in results:
        print("CASE " + json.dumps(result))
    print("DONE " + json.dumps({
        "cases": len(results), "seconds": round(time.monotonic() - started, 1),
        "tor": version}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
