"""Real HTTP proxy clients through torsocksd's --http-tunnel port: curl,
Python's requests, git and pip, against HTTPS and HTTP servers on test host
addresses whose names only torsocksd's resolver knows
(tests/peers/http_tunnel_clients.py, in a loopback-only namespace)."""

import importlib.util

import pytest

from conftest import (REQUIRE_PEERS, require_network_namespace,
                      require_program, run_peer_checks)


def missing_modules():
    """Client modules this Python lacks (CI's venv has them all)."""
    missing = []
    if importlib.util.find_spec("requests") is None:
        missing.append("requests")
    if importlib.util.find_spec("pip") is None:
        missing.append("pip")
    if missing and REQUIRE_PEERS:
        pytest.fail("Python modules %s are not installed "
                    "(TORSOCKSD_REQUIRE_PEERS=1)" % ", ".join(missing))
    return missing


def test_real_clients_through_the_http_tunnel():
    for program in ("curl", "git", "openssl"):
        require_program(program)
    require_network_namespace()
    skip = missing_modules()
    run_peer_checks("http_tunnel_clients.py", "--skip", ",".join(skip),
                    timeout=240)
    if skip:
        pytest.skip("checked without %s (not installed)" % ", ".join(skip))
