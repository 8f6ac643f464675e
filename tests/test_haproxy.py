"""torsocksd behind the real HAProxy: contrib/haproxy.cfg in front of two
torsocksd processes, PROXY protocol v2 and v1, clients on test host
addresses (tests/peers/haproxy_balancer.py, in a loopback-only namespace),
and contrib/haproxy.cfg checked by haproxy -c."""

import os
import subprocess
import sys

from conftest import TIMEOUT, require_network_namespace, require_program

HERE = os.path.dirname(os.path.abspath(__file__))
PEER_SCRIPT = os.path.join(HERE, "peers", "haproxy_balancer.py")
CONFIG = os.path.join(HERE, os.pardir, "contrib", "haproxy.cfg")


def test_contrib_config_is_valid():
    haproxy = require_program("haproxy")
    result = subprocess.run([haproxy, "-c", "-f", CONFIG],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            universal_newlines=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stdout
    assert "[WARNING]" not in result.stdout and "[ALERT]" not in \
        result.stdout, result.stdout


def test_contrib_config_says_what_the_readme_says():
    with open(CONFIG) as file:
        config = file.read()
    for text in ("mode tcp", "balance leastconn", "option tcp-check",
                 "tcp-check send-binary 050100", "tcp-check expect binary 0500",
                 "timeout tunnel 1h"):
        assert text in config, text
    servers = [line.split() for line in config.splitlines()
               if line.strip().startswith("server ")]
    assert len(servers) == 2
    assert all("send-proxy-v2" in words and "check" in words
               for words in servers)
    # An explicit connect rule would send no PROXY header on checks.
    assert "tcp-check connect" not in config.replace(
        '"tcp-check connect"', "")


def test_haproxy_in_front_of_two_torsocksd():
    require_program("haproxy")
    require_network_namespace()
    result = subprocess.run(
        ["unshare", "-n", sys.executable, PEER_SCRIPT], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, timeout=240, universal_newlines=True)
    print(result.stdout)
    print(result.stderr)
    assert result.returncode == 0
    assert result.stdout.splitlines()[-1] == "all checks passed"
    assert "FAILED" not in result.stdout
