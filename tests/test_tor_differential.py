"""torsocksd next to a real Tor 0.4.9: the same SOCKS corner cases, compared.

tests/peers/tor_differential.py replays the corpus of tests/tor_corpus.py
against a tor SocksPort and against torsocksd, both inside one loopback-only
network namespace; each case is then identical, tor waits, documented, wrong
or unexplained (tests/differential.py says how).  Here "tor waits" means:
Tor answered part and then waits for a circuit it cannot build here, and
torsocksd sent the same bytes first and then its own answer.

The test fails on any wrong or unexplained case and prints them as a table;
with -s it prints every case, Tor's outcome next to torsocksd's.
"""

import pytest

from differential import Comparison, DifferentialTests, Outcome
import tor_corpus


def tor_waits(tor: Outcome, ours: Outcome) -> bool:
    """torsocksd sent what Tor sent so far, and then answered (more bytes,
    or it is still open: a tunnel)."""
    answered_more = not ours.closed or len(ours.received) > len(tor.received)
    return ours.received.startswith(tor.received) and answered_more


SOCKS = Comparison(
    tor_corpus.CORPUS, tor_waits=tor_waits,
    # torsocksd's 501 page for HTTP to the SOCKS port
    page_status=rb"HTTP/1\.0 501 .*",
    page_fields={b"content-type": b"text/html; charset=utf-8",
                 b"connection": b"close"})


class TestSocks(DifferentialTests):
    comparison = SOCKS
    # Tor answered a greeting and waits; torsocksd answered the request.
    tor_waiting = Outcome(b"\x05\x00", False)
    answered = Outcome(b"\x05\x00\x05\x03", True)
    closed_unanswered = Outcome(b"\x05\x00", True)


@pytest.mark.parametrize("data, method, problem", [
    (b"HTTP/1.0 501 x\r\nContent-Type: text/html; charset=utf-8\r\n"
     b"Content-Length: 2\r\nConnection: close\r\n\r\nhi", "GET", None),
    (b"HTTP/1.0 501 x\r\nContent-Type: text/html; charset=utf-8\r\n"
     b"Content-Length: 2\r\nConnection: close\r\n\r\n", "HEAD", None),
    (b"HTTP/1.0 501 x\r\nContent-Type: text/html; charset=utf-8\r\n"
     b"Content-Length: 3\r\nConnection: close\r\n\r\nhi", "GET",
     "Content-Length 3 for 2 bytes"),
    (b"HTTP/1.0 501 Tor is not an HTTP Proxy\r\nContent-Type: text/html; "
     b"charset=iso-8859-1\r\n\r\n<html></html>\n\0", "GET",
     "content-type: b'text/html; charset=iso-8859-1'"),
])
def test_http_page_check(data, method, problem):
    assert SOCKS.page_problem(data, method) == problem
