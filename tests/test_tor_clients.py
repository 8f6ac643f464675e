"""Tor's own clients against torsocksd: tor-resolve (-4, -5, -x) and torsocks.

Names resolve through a resolver injected into the server, never the
machine's DNS.  torsocks runs inside a loopback-only network namespace with a
test host address (192.0.2.10, TEST-NET-1) on its loopback interface.
"""

import subprocess

import pytest

from conftest import FakeResolver, require_program, run_in_namespace

NAMES = {"v4.test": ["192.0.2.10"],
         "v6.test": ["2001:db8::42"],
         "both.test": ["2001:db8::43", "192.0.2.11"]}
REVERSE = {"192.0.2.10": "v4.test", "2001:db8::42": "v6.test"}


@pytest.fixture
def resolving_server(make_server):
    return make_server(resolver=FakeResolver(NAMES, REVERSE))


def tor_resolve(server, *args):
    path = require_program("tor-resolve")
    result = subprocess.run(
        [path, *args, "127.0.0.1:%d" % server.address[1]],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30,
        universal_newlines=True)
    print("$ tor-resolve %s  -> rc=%d" % (" ".join(args), result.returncode))
    print(result.stdout + result.stderr)
    return result


@pytest.mark.parametrize("flags, name, printed", [
    (["-4"], "v4.test", "192.0.2.10"),
    (["-5"], "v4.test", "192.0.2.10"),
    (["-5"], "v6.test", "2001:db8::42"),       # ATYP 4 answer
    (["-5"], "both.test", "192.0.2.11"),       # IPv4 preferred
    (["-4"], "both.test", "192.0.2.11"),
    (["-5"], "192.0.2.77", "192.0.2.77"),      # literal: no lookup
    (["-x"], "192.0.2.10", "v4.test"),
    (["-5", "-x"], "2001:db8::42", "v6.test"),
])
def test_tor_resolve_prints_the_answer(resolving_server, flags, name, printed):
    result = tor_resolve(resolving_server, *flags, name)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == printed


def test_tor_resolve_literal_is_not_looked_up(make_server):
    resolver = FakeResolver(NAMES)
    server = make_server(resolver=resolver)
    assert tor_resolve(server, "-5", "192.0.2.77").returncode == 0
    assert resolver.queries == []


@pytest.mark.parametrize("flags, name, status", [
    (["-5"], "missing.test", "'4'"),
    (["-5"], "hidden.onion", "'4'"),
    (["-4"], "missing.test", "'91'"),
    (["-4"], "v6.test", "'91'"),       # SOCKS4 cannot carry an IPv6 answer
    (["-x"], "192.0.2.99", "'4'"),
])
def test_tor_resolve_failures_are_reported(resolving_server, flags, name,
                                           status):
    result = tor_resolve(resolving_server, *flags, name)
    assert result.returncode == 1
    assert result.stdout == ""
    assert status in result.stderr


def test_torsocks_end_to_end_in_a_network_namespace():
    """torsocks runs a Python HTTP fetch of http://web.test:8000/; the name
    is known only to torsocksd, the web server listens only on 192.0.2.10
    inside the namespace, and torsocksd's log shows the RESOLVE and the
    CONNECT it relayed."""
    require_program("torsocks")
    require_program("dnsmasq")      # the peer script starts it
    lines = run_in_namespace("torsocks_e2e.py", timeout=60).splitlines()
    assert "fetched: hello from 192.0.2.10" in lines
    assert any("RESOLVE web.test" in line and "answered RESOLVE" in line
               for line in lines)
    assert any("CONNECT " in line and ":8000: relayed" in line
               for line in lines)


def test_tor_resolve_through_the_daemon_and_its_dns_client(dnsmasq):
    """The whole chain with real programs: tor-resolve -> torsocksd (the
    command, with --nameserver) -> dnsmasq on loopback."""
    from test_cli import Daemon, free_port
    daemon = Daemon("--port", str(free_port()),
                    "--nameserver", "%s:%d" % dnsmasq)
    try:
        class Listening:
            address = ("127.0.0.1", int(daemon.listening[0].rsplit(":")[1]))
        for flags, name, printed in ((["-4"], "v4.test", "192.0.2.10"),
                                     (["-5"], "v4.test", "192.0.2.10"),
                                     (["-5"], "v6.test", "2001:db8::42"),
                                     (["-x"], "192.0.2.10", "v4.test")):
            result = tor_resolve(Listening, *flags, name)
            assert result.returncode == 0, result.stderr
            assert result.stdout.strip() == printed
        missing = tor_resolve(Listening, "-5", "nowhere.test")
        assert missing.returncode == 1
        assert "'4'" in missing.stderr
    finally:
        daemon.kill()
