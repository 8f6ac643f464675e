"""torsocksd's --http-tunnel next to a real Tor 0.4.9 HTTPTunnelPort.

tests/peers/tor_differential.py replays the corpus of
tests/http_tunnel_corpus.py against both in one loopback-only network
namespace.  The header lines that name the software (Via, Server) are taken
out of both answers; each case is then identical, tor waits, documented,
wrong or unexplained (tests/differential.py says how).  Here "tor waits"
means: Tor accepted the request and waits for a circuit it cannot build
here, while torsocksd answered it.  A documented difference that Tor no
longer has fails too.

The test fails on any wrong or unexplained case and prints them as a table;
with -s it prints every case, Tor's answer next to torsocksd's.
"""

import pytest

from differential import Comparison, DifferentialTests, Outcome
import http_tunnel_corpus as corpus


def tor_waits(tor: Outcome, ours: Outcome) -> bool:
    """Tor has said nothing, and torsocksd answered."""
    return not tor.received and ours.received.startswith(b"HTTP/1.0 ")


HTTP_TUNNEL = Comparison(
    corpus.CORPUS, tor_waits=tor_waits, compared=corpus.without_identity,
    show_limit=60, stale_fails=True,
    # torsocksd's 405 page for another method with Host: localhost
    page_status=rb"HTTP/1\.0 405 Method Not Allowed",
    page_fields={b"allow": b"OPTIONS, CONNECT",
                 b"content-type": b"text/html; charset=utf-8",
                 b"connection": b"close", b"tor-capabilities": b""})


class TestHTTPTunnel(DifferentialTests):
    comparison = HTTP_TUNNEL
    # Tor is silent, waiting; torsocksd answered.
    tor_waiting = Outcome(b"", False)
    answered = Outcome(corpus.BAD_REQUEST, True)
    closed_unanswered = Outcome(b"", True)


def test_identity_fields_are_taken_out_of_the_head_only():
    tor = (b"HTTP/1.0 200 OK\r\nTor-Capabilities: \r\n"
           b"Via: tor/1.0 tor-network (tor 0.4.9.11)\r\n\r\nVia: data")
    assert corpus.without_identity(tor) == \
        b"HTTP/1.0 200 OK\r\nTor-Capabilities: \r\n\r\nVia: data"
    assert corpus.without_identity(b"Via: x\r\n\r\n") == b"Via: x\r\n\r\n"


@pytest.mark.parametrize("data, method, problem", [
    (b"HTTP/1.0 405 Method Not Allowed\r\nAllow: OPTIONS, CONNECT\r\n"
     b"Content-Type: text/html; charset=utf-8\r\nContent-Length: 2\r\n"
     b"Connection: close\r\nTor-Capabilities: \r\n\r\nhi", "GET", None),
    (b"HTTP/1.0 405 Method Not Allowed\r\nAllow: OPTIONS, CONNECT\r\n"
     b"Content-Type: text/html; charset=utf-8\r\nContent-Length: 2\r\n"
     b"Connection: close\r\nTor-Capabilities: \r\n\r\n", "HEAD", None),
    (b"HTTP/1.0 405 Method Not Allowed\r\n"
     b"Content-Type: text/html; charset=iso-8859-1\r\n"
     b"Tor-Capabilities: \r\n\r\n<html>", "GET", "allow: None"),
])
def test_page_check(data, method, problem):
    assert HTTP_TUNNEL.page_problem(data, method) == problem
