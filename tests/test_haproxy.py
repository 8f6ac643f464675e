"""torsocksd behind the real HAProxy: contrib/haproxy.cfg in front of two
torsocksd processes, PROXY protocol v2 and v1, clients on test host
addresses (tests/peers/haproxy_balancer.py, in a loopback-only namespace),
and contrib/haproxy.cfg checked by haproxy -c."""

import os
import subprocess

from conftest import TIMEOUT, require_program, run_peer_checks

HERE = os.path.dirname(os.path.abspath(__file__))
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
    run_peer_checks("haproxy_balancer.py", timeout=240)


def test_readme_scaling_out_matches_contrib_and_man_page():
    """The README's "Scaling out" commands are the man page's, and the
    torsocksd command line is the one contrib/haproxy.cfg gives."""
    root = os.path.join(HERE, os.pardir)
    with open(os.path.join(root, "README.md")) as file:
        section = file.read().split("## Scaling out", 1)[1].split("\n## ")[0]
    commands = [line[6:] for line in section.splitlines()
                if line.startswith(("    $ ", "    # "))]
    assert len(commands) == 3, commands
    with open(os.path.join(root, "man", "torsocksd.8")) as file:
        examples = file.read().split(".Sh EXAMPLES", 1)[1].split(".Sh ")[0]
    examples = examples.replace("\\-", "-")
    with open(CONFIG) as file:
        config = file.read()
    for command in commands:
        assert command in examples, command
    assert "#   " + commands[0] + "\n" in config
    for server in ("192.0.2.11:9050", "192.0.2.12:9050"):
        assert server in config and server in section
