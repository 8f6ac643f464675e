"""Run inside a fresh network namespace (unshare -n): replay a corpus of
corner cases against a real tor and against torsocksd.

    unshare -n python3 tor_differential.py tor_corpus [--only NAME,...]
    unshare -n python3 tor_differential.py http_tunnel_corpus

tor_corpus (SOCKS) goes to a tor SocksPort and a torsocksd SOCKS port,
http_tunnel_corpus (HTTP CONNECT) to a tor HTTPTunnelPort and a torsocksd
--http-tunnel port.  What it starts and what it prints:
tests/differential.py, peer_main; tests/test_tor_differential.py and
tests/test_http_tunnel_differential.py judge the outcomes.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                os.pardir))
import differential  # noqa: E402

if __name__ == "__main__":
    sys.exit(differential.peer_main())
