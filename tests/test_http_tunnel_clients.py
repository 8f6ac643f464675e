"""Real HTTP proxy clients through torsocksd's --http-tunnel port: curl,
Python's requests, git and pip, against HTTPS and HTTP servers on test host
addresses whose names only torsocksd's resolver knows
(tests/peers/http_tunnel_clients.py, in a loopback-only namespace)."""

import importlib.util
import os
import subprocess
import sys

import pytest

from conftest import REQUIRE_PEERS, require_network_namespace, require_program

HERE = os.path.dirname(os.path.abspath(__file__))
PEER_SCRIPT = os.path.join(HERE, "peers", "http_tunnel_clients.py")


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
    result = subprocess.run(
        ["unshare", "-n", sys.executable, PEER_SCRIPT, "--skip",
         ",".join(skip)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        timeout=240, universal_newlines=True)
    print(result.stdout)
    print(result.stderr)
    assert result.returncode == 0
    assert result.stdout.splitlines()[-1] == "all checks passed"
    assert "FAILED" not in result.stdout
    if skip:
        pytest.skip("checked without %s (not installed)" % ", ".join(skip))
