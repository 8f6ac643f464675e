"""torsocksd's --http-tunnel next to a real Tor 0.4.9 HTTPTunnelPort.

tests/peers/http_tunnel_differential.py replays the corpus of
tests/http_tunnel_corpus.py against both in one loopback-only network
namespace.  The header lines that name the software (Via, Server) are taken
out of both answers; each case is then

  identical      the same bytes back, and both closed or both still open;
  tor waits      Tor accepted the request and waits for a circuit it
                 cannot build here, while torsocksd answered it;
  documented     a difference named in the corpus (a Rule citing the
                 README's table), and torsocksd sent exactly what it says;
  wrong          a documented difference, but not torsocksd's bytes;
  unexplained    any other difference.

The test fails on any wrong or unexplained case and prints them as a table;
with -s it prints every case, Tor's answer next to torsocksd's.
"""

import json
import os
import subprocess
import sys
from typing import NamedTuple

import pytest

from conftest import require_network_namespace, require_program
import http_tunnel_corpus as corpus
from test_tor_differential import readme_difference_cases, show

HERE = os.path.dirname(os.path.abspath(__file__))
PEER_SCRIPT = os.path.join(HERE, "peers", "http_tunnel_differential.py")

IDENTICAL, TOR_WAITS, DOCUMENTED = "identical", "tor waits", "documented"
WRONG, UNEXPLAINED = "wrong", "unexplained"


class Outcome(NamedTuple):
    """What came back (identity fields taken out) and whether the server
    closed (a reset counts as a close)."""
    received: bytes
    closed: bool


def run_peer():
    require_program("tor")
    require_network_namespace()
    result = subprocess.run(
        ["unshare", "-n", sys.executable, PEER_SCRIPT],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=300,
        universal_newlines=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr
    outcomes, summary = {}, None
    for line in result.stdout.splitlines():
        kind, _, text = line.partition(" ")
        if kind == "CASE":
            record = json.loads(text)
            outcomes[record["case"]] = tuple(
                Outcome(corpus.without_identity(
                    bytes.fromhex(record[side]["received"])),
                    record[side]["closed"])
                for side in ("tor", "torsocksd"))
        elif kind == "DONE":
            summary = json.loads(text)
    assert summary is not None, result.stdout[-2000:] + result.stderr
    return outcomes, summary


@pytest.fixture(scope="module")
def outcomes():
    outcomes, summary = run_peer()
    print("peer: %(cases)d cases against tor %(tor)s and torsocksd in "
          "%(seconds).1f s" % summary)
    assert set(outcomes) == set(corpus.CASE_NAMES)
    return outcomes


# =============================================================================
# Judging one case
# =============================================================================

def page_problem(data: bytes, method: str):
    """Why data is not torsocksd's 405 page for method, or None."""
    head, separator, body = data.partition(b"\r\n\r\n")
    if not separator:
        return "no end of headers"
    lines = head.split(b"\r\n")
    if lines[0] != b"HTTP/1.0 405 Method Not Allowed":
        return "status line %r" % lines[0]
    headers = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon:
            return "header line %r" % line
        headers[name.strip().lower()] = value.strip()
    for name, value in ((b"allow", b"OPTIONS, CONNECT"),
                        (b"content-type", b"text/html; charset=utf-8"),
                        (b"connection", b"close"),
                        (b"tor-capabilities", b"")):
        if headers.get(name) != value:
            return "%s: %r" % (name.decode(), headers.get(name))
    length = headers.get(b"content-length", b"")
    if not length.isdigit():
        return "Content-Length %r" % length
    if method == "HEAD":
        return "a body after HEAD" if body else None
    if int(length) != len(body) or not body:
        return "Content-Length %s for %d bytes" % (length.decode(), len(body))
    return None


def expectation_problem(expect, ours: Outcome):
    """Why torsocksd's outcome is not the one a rule expects, or None."""
    if ours.closed != expect.closed:
        return "expected the connection %s" % (
            "closed" if expect.closed else "open")
    if expect.page is not None:
        return page_problem(ours.received, expect.page)
    if ours.received != expect.received:
        return "expected %s" % show(expect.received)
    return None


def judge(case, tor: Outcome, ours: Outcome):
    """(verdict, detail) for one case."""
    if case.rules:
        problem = expectation_problem(case.expect, ours)
        return (WRONG, problem) if problem else (DOCUMENTED, "")
    if tor == ours:
        return IDENTICAL, ""
    if case.complete and not tor.closed and not tor.received \
            and ours.received.startswith(b"HTTP/1.0 "):
        return TOR_WAITS, ""
    return UNEXPLAINED, ""


def show_outcome(outcome: Outcome, limit: int = 60) -> str:
    return show(outcome.received, limit) + (" |closed" if outcome.closed
                                            else " |open")


# =============================================================================
# Tests
# =============================================================================

def test_torsocksd_answers_as_tor_or_as_documented(outcomes):
    counts = dict.fromkeys((IDENTICAL, TOR_WAITS, DOCUMENTED, WRONG,
                            UNEXPLAINED), 0)
    rows, failures, stale = [], [], []
    for case in corpus.CASES:
        tor, ours = outcomes[case.name]
        verdict, detail = judge(case, tor, ours)
        counts[verdict] += 1
        rows.append("%-30s %-11s %-66s %s" % (
            case.name, verdict, show_outcome(tor), show_outcome(ours)))
        if verdict in (WRONG, UNEXPLAINED):
            failures.append(rows[-1] + " " + detail)
        elif verdict == DOCUMENTED and tor == ours:
            stale.append(case.name)
    print("\n".join(rows))
    print("identical %(identical)d, tor waits %(tor waits)d, documented "
          "%(documented)d, wrong %(wrong)d, unexplained %(unexplained)d"
          % counts)
    assert not stale, "documented as different, yet the same as Tor: " + \
        ", ".join(stale)
    assert not failures, "%d of %d cases fail:\n%s" % (
        len(failures), len(corpus.CASES), "\n".join(failures))


def test_every_rule_cites_the_readme_and_is_used():
    rows = set(readme_difference_cases())
    missing = sorted({(row, rule.name) for rule in corpus.RULES.values()
                      for row in rule.readme if row not in rows})
    used = {rule for case in corpus.CASES for rule in case.rules}
    assert used == set(corpus.RULES), set(corpus.RULES) - used
    assert not missing, missing


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
    assert page_problem(data, method) == problem


def test_judge():
    waits = corpus.Case("x", (b"",), complete=True)
    silent = Outcome(b"", False)
    answered = Outcome(corpus.BAD_REQUEST, True)
    assert judge(waits, silent, answered)[0] == TOR_WAITS
    assert judge(waits._replace(complete=False), silent, answered)[0] \
        == UNEXPLAINED
    assert judge(waits, silent, Outcome(b"", True))[0] == UNEXPLAINED
    assert judge(waits, answered, answered)[0] == IDENTICAL
    ruled = corpus.Case("y", (b"",), rules=("fail-fast",),
                        expect=corpus.Expect(corpus.BAD_REQUEST))
    assert judge(ruled, silent, answered)[0] == DOCUMENTED
    assert judge(ruled, silent, Outcome(corpus.BAD_REQUEST, False))[0] \
        == WRONG
