"""torsocksd next to a real Tor 0.4.9: the same corner cases, compared.

tests/peers/tor_differential.py replays the corpus of tests/tor_corpus.py
against a tor SocksPort and against torsocksd, both inside one loopback-only
network namespace.  Each case is then

  identical      same bytes back, and both closed or both still open;
  tor waits      Tor answered part and then waits for a circuit it cannot
                 build here; torsocksd sent the same bytes first and then
                 its own answer;
  documented     a difference named in the corpus (a Rule citing the
                 README's table "Where torsocksd differs from Tor"), and
                 torsocksd sent exactly the bytes the rule says;
  wrong          a documented difference, but torsocksd's bytes are not the
                 ones the rule says;
  unexplained    any other difference.

The test fails on any wrong or unexplained case and prints them as a table.
"""

import json
import os
import re
import subprocess
import sys
from typing import NamedTuple

import pytest

from conftest import require_network_namespace, require_program
import tor_corpus

HERE = os.path.dirname(os.path.abspath(__file__))
PEER_SCRIPT = os.path.join(HERE, "peers", "tor_differential.py")
README = os.path.join(HERE, os.pardir, "README.md")

IDENTICAL, TOR_WAITS, DOCUMENTED = "identical", "tor waits", "documented"
WRONG, UNEXPLAINED = "wrong", "unexplained"


class Outcome(NamedTuple):
    """What came back and whether the server closed.  A reset counts as a
    close: whether a close goes out as FIN or RST depends on bytes the
    server left unread, not on the protocol."""
    received: bytes
    closed: bool


def run_peer():
    """The peer script's outcomes: {case name: (tor, torsocksd)}, and its
    closing summary."""
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
                Outcome(bytes.fromhex(record[side]["received"]),
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
    assert set(outcomes) == set(tor_corpus.CASE_NAMES)
    return outcomes


# =============================================================================
# Judging one case
# =============================================================================

def http_page_problem(data: bytes, method: str):
    """Why data is not torsocksd's HTTP page for method, or None."""
    head, separator, body = data.partition(b"\r\n\r\n")
    if not separator:
        return "no end of headers"
    lines = head.split(b"\r\n")
    if not lines[0].startswith(b"HTTP/1.0 501 "):
        return "status line %r" % lines[0]
    headers = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon:
            return "header line %r" % line
        headers[name.strip().lower()] = value.strip()
    if headers.get(b"content-type") != b"text/html; charset=utf-8":
        return "Content-Type %r" % headers.get(b"content-type")
    if headers.get(b"connection", b"").lower() != b"close":
        return "no Connection: close"
    length = headers.get(b"content-length", b"")
    if not length.isdigit():
        return "Content-Length %r" % length
    if method == "HEAD":
        return "a body after HEAD" if body else None
    if int(length) != len(body):
        return "Content-Length %s for %d bytes" % (length.decode(), len(body))
    if not body or body.endswith(b"\0"):
        return "empty body or a trailing NUL"
    return None


def expectation_problem(expect, ours: Outcome):
    """Why torsocksd's outcome is not the one a rule expects, or None."""
    if ours.closed != expect.closed:
        return "expected the connection %s" % (
            "closed" if expect.closed else "open")
    if expect.http_page is None:
        return None if ours.received == expect.received else \
            "expected %s" % show(expect.received)
    if not ours.received.startswith(expect.received):
        return "expected %s before the page" % show(expect.received)
    return http_page_problem(ours.received[len(expect.received):],
                             expect.http_page)


def judge(case, tor: Outcome, ours: Outcome):
    """(verdict, detail) for one case."""
    if case.rules:
        problem = expectation_problem(case.expect, ours)
        return (WRONG, problem) if problem else (DOCUMENTED, "")
    if tor == ours:
        return IDENTICAL, ""
    answered_more = not ours.closed or len(ours.received) > len(tor.received)
    if (case.complete and not tor.closed
            and ours.received.startswith(tor.received) and answered_more):
        return TOR_WAITS, ""
    return UNEXPLAINED, ""


def show(data: bytes, limit: int = 36) -> str:
    """Bytes for a table cell: hex, or text when it is mostly text."""
    if not data:
        return "-"
    printable = sum(32 <= byte < 127 or byte in b"\r\n" for byte in data)
    if len(data) > 8 and printable > 0.9 * len(data):
        text = repr(data[:limit])[1:]
        return text + ("...(%d bytes)" % len(data) if len(data) > limit
                       else "")
    text = data[:limit].hex()
    return text + ("...(%d bytes)" % len(data) if len(data) > limit else "")


def show_outcome(outcome: Outcome) -> str:
    return show(outcome.received) + (" |closed" if outcome.closed
                                     else " |open")


def failure_table(rows) -> str:
    lines = ["%-44s %-11s %-46s %-46s %s" % (
        "case", "verdict", "Tor", "torsocksd", "why")]
    for name, verdict, tor, ours, detail in rows:
        lines.append("%-44s %-11s %-46s %-46s %s" % (
            name, verdict, show_outcome(tor), show_outcome(ours), detail))
    return "\n".join(lines)


# =============================================================================
# Tests
# =============================================================================

def test_torsocksd_agrees_with_tor_or_differs_as_documented(outcomes):
    counts = dict.fromkeys((IDENTICAL, TOR_WAITS, DOCUMENTED, WRONG,
                            UNEXPLAINED), 0)
    failures, stale = [], []
    for case in tor_corpus.CASES:
        tor, ours = outcomes[case.name]
        verdict, detail = judge(case, tor, ours)
        counts[verdict] += 1
        if verdict in (WRONG, UNEXPLAINED):
            if case.rules:
                detail = "[%s] %s" % (", ".join(case.rules), detail)
            failures.append((case.name, verdict, tor, ours, detail))
        elif verdict == DOCUMENTED and tor == ours:
            stale.append(case.name)
    print("identical %(identical)d, tor waits %(tor waits)d, documented "
          "%(documented)d, wrong %(wrong)d, unexplained %(unexplained)d"
          % counts)
    if stale:
        print("documented as different, yet the same as Tor (rule no longer "
              "needed?): " + ", ".join(stale))
    assert not failures, "%d of %d cases fail:\n%s" % (
        len(failures), len(tor_corpus.CASES), failure_table(failures))


def readme_difference_cases():
    """The "case" cells of the README's table "Where torsocksd differs from
    Tor"."""
    with open(README, encoding="utf-8") as file:
        text = file.read()
    heading = re.search(r"^#+ .*differs from Tor.*$", text, re.MULTILINE)
    assert heading, "README.md has no 'differs from Tor' section"
    cells = []
    for line in text[heading.end():].splitlines():
        if line.startswith("#"):
            break
        if line.startswith("|"):
            cells.append(line.strip("|").split("|")[0].strip())
    # The header row and its underline are not cases.
    return [cell for cell in cells[2:] if cell]


def test_every_documented_difference_is_in_the_readme():
    """Each rule the corpus names cites rows that the README's table has,
    and each rule is used by some case."""
    rows = set(readme_difference_cases())
    missing = sorted({(row, rule.name) for rule in tor_corpus.RULES.values()
                      for row in rule.readme if row not in rows})
    used = {rule for case in tor_corpus.CASES for rule in case.rules}
    assert used == set(tor_corpus.RULES), set(tor_corpus.RULES) - used
    assert not missing, "rules cite rows the README's table lacks:\n" + \
        "\n".join("  %r (rule %s: %s)" % (row, name,
                                          tor_corpus.RULES[name].says)
                  for row, name in missing)


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
     "Content-Type b'text/html; charset=iso-8859-1'"),
])
def test_http_page_check(data, method, problem):
    assert http_page_problem(data, method) == problem


def test_judge():
    waits = tor_corpus.Case("x", (b"",), complete=True)
    tor = Outcome(b"\x05\x00", False)
    assert judge(waits, tor, Outcome(b"\x05\x00\x05\x03", True))[0] \
        == TOR_WAITS
    # Closing without a reply is not an answer.
    assert judge(waits, tor, Outcome(b"\x05\x00", True))[0] == UNEXPLAINED
    assert judge(waits._replace(complete=False), tor,
                 Outcome(b"\x05\x00\x05\x03", True))[0] == UNEXPLAINED
    assert judge(waits, tor, tor)[0] == IDENTICAL
    ruled = tor_corpus.Case("y", (b"",), rules=("fail-fast",),
                            expect=tor_corpus.Expect(b""))
    assert judge(ruled, tor, Outcome(b"", True))[0] == DOCUMENTED
    assert judge(ruled, tor, Outcome(b"", False))[0] == WRONG
