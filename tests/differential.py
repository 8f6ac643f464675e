"""What the differential tests against a real Tor share.

A comparison replays a corpus of corner cases against a real tor and against
torsocksd inside one loopback-only network namespace, and judges each case
by what came back:

  identical      the same bytes, and both closed or both still open;
  tor waits      Tor accepted a complete request and waits for a circuit it
                 cannot build here, where torsocksd went on to answer (how
                 that shows is the comparison's tor_waits);
  documented     a difference named in the corpus (a Rule citing the
                 README's table "Where torsocksd differs from Tor"), and
                 torsocksd sent exactly what the case expects;
  wrong          a documented difference, but not the expected outcome;
  unexplained    any other difference.

Two comparisons use it: SOCKS (tests/tor_corpus.py, judged by
tests/test_tor_differential.py) and HTTP CONNECT (tests/http_tunnel_corpus.py,
judged by tests/test_http_tunnel_differential.py); the peer script
tests/peers/tor_differential.py replays either.  Here are, in that order:
the shapes a corpus is built of (Case, Expect, Rule, Corpus), the peer side
that runs in the namespace (peer_main), and the test side that judges
(Comparison, and the tests every comparison runs: DifferentialTests).
"""

import argparse
import concurrent.futures
import importlib
import json
import os
import re
import subprocess
import sys
import time
from typing import Callable, Dict, NamedTuple, Optional, Tuple

import pytest

# conftest puts the repository on sys.path, for torsocksd.
from conftest import (EchoServer, FakeResolver, require_network_namespace,
                      require_program)
import torpeer
import torsocksd

HERE = os.path.dirname(os.path.abspath(__file__))
README = os.path.join(HERE, os.pardir, "README.md")
PEER_SCRIPT = os.path.join(HERE, "peers", "tor_differential.py")

DEFAULT_PAUSE = 0.1     # seconds between chunks: the server reads them apart
ECHO_PORT = 7           # an echo server listens here on 127.0.0.1 and ::1
WORKERS = 24            # cases replayed at once


# =============================================================================
# Corpus shapes
# =============================================================================

class Expect(NamedTuple):
    """torsocksd's outcome in a documented difference.

    received    the bytes torsocksd must send (with page: only what comes
                before its page)
    closed      whether torsocksd has closed the connection after them
    page        "GET" or "HEAD": after `received`, torsocksd's own HTTP page
                (for HEAD its headers only), checked by its shape
                (Comparison.page_problem)
    """
    received: bytes = b""
    closed: bool = True
    page: Optional[str] = None


class Case(NamedTuple):
    name: str
    chunks: Tuple[bytes, ...]
    pauses: Tuple[float, ...] = ()  # before chunk 2, 3, ...; DEFAULT_PAUSE
    complete: bool = False          # ends in a request Tor may hold
    rules: Tuple[str, ...] = ()     # documented differences (Rule names)
    expect: Optional[Expect] = None  # torsocksd's outcome when rules is set


class Rule(NamedTuple):
    name: str
    readme: Tuple[str, ...]   # "case" cells of the README's table
    says: str                 # what torsocksd does instead of Tor


# The kinds of port a corpus can be replayed against: the options of tor
# (torpeer.TorClient, whose address for it is KIND_address) and torsocksd's
# listeners (torsocksd.Server options).
PORTS = {
    "socks": ({"socks": True}, {"listen": [("127.0.0.1", 0)]}),
    "http_tunnel": ({"socks": False, "http_tunnel": True},
                    {"listen": [], "http_tunnel": [("127.0.0.1", 0)]}),
}


class Corpus:
    """The cases of one comparison in the order they are reported, the
    documented differences (Rule) they may cite, the kind of port they go
    to (PORTS) and the names torsocksd's test resolver answers for them
    (never the machine's DNS).  module names the module that builds it, for
    the peer script to import."""

    def __init__(self, module, port, rules, resolver_names,
                 resolver_reverse=None):
        assert port in PORTS, port
        self.module, self.port = module, port
        self.rules = {rule.name: rule for rule in rules}
        self.resolver_names = resolver_names
        self.resolver_reverse = resolver_reverse or {}
        self.cases = []
        self.by_name = {}

    def add(self, name, *chunks, pauses=(), complete=False, differs=None):
        """A case sending chunks in turn.  differs, for a documented
        difference, is (rules, expect): the names of the rules (or just
        one), and torsocksd's outcome, an Expect or just the bytes it sends
        before it closes."""
        rules, expect = differs or ((), None)
        if isinstance(rules, str):
            rules = (rules,)
        if isinstance(expect, bytes):
            expect = Expect(expect)
        assert name not in self.by_name, "case names must be unique: " + name
        assert all(isinstance(chunk, bytes) and chunk for chunk in chunks), \
            name
        assert all(rule in self.rules for rule in rules), name
        assert bool(rules) == (expect is not None), name
        case = Case(name, tuple(chunks), tuple(pauses), complete,
                    tuple(rules), expect)
        self.cases.append(case)
        self.by_name[name] = case

    def add_table(self, rows, prefix="", rules=(), expect=None, **options):
        """A case for each row, named prefix + label:

            (label, chunks)                 compared with Tor as it is, or
                                            if the table has an expect, a
                                            documented difference: rules
            (label, chunks, expect)         a documented difference: rules
            (label, chunks, rules, expect)  one under its own rules

        chunks is one chunk or a tuple of them; the options (complete,
        pauses) hold for every row."""
        for label, chunks, *differs in rows:
            if isinstance(chunks, bytes):
                chunks = (chunks,)
            if len(differs) < 2:
                differs = (rules, differs[0] if differs else expect)
            if differs[1] is None:
                differs = None
            self.add(prefix + label, *chunks, differs=differs, **options)


# =============================================================================
# The peer side: replaying a corpus in the namespace
# =============================================================================

def replay_case(case, tor_address, torsocksd_address):
    """One CASE record: what each server did with the case's chunks."""
    record = {"case": case.name}
    for label, address in (("tor", tor_address),
                           ("torsocksd", torsocksd_address)):
        outcome = torpeer.replay(address, case.chunks, case.pauses,
                                 pause=DEFAULT_PAUSE)
        record[label] = {"received": outcome.received.hex(),
                         "closed": outcome.closed, "reset": outcome.reset}
    return record


def echo_servers():
    servers = [EchoServer(host="127.0.0.1", port=ECHO_PORT)]
    try:
        servers.append(EchoServer(host="::1", port=ECHO_PORT))
    except OSError as error:
        print("no echo server on ::1: %s" % error, file=sys.stderr)
    return servers


def peer_main(argv=None):
    """The peer script, tests/peers/tor_differential.py (run it inside
    `unshare -n`):

        tor_differential.py CORPUS_MODULE [--only NAME,...] [--workers N]

    replays the Corpus CORPUS_MODULE.CORPUS against a real tor and against
    torsocksd, each on a port of the corpus's kind.  Brings lo up, starts an
    echo server on ECHO_PORT of 127.0.0.1 and ::1, a tor client
    (tests/torpeer.py: a dummy directory authority, so it never builds a
    circuit) and a torsocksd Server in this process whose resolver answers
    only the corpus's names.  Every case goes to both; cases run in
    parallel.  Prints one line per case, in corpus order:

        CASE {"case": NAME, "tor": OUTCOME, "torsocksd": OUTCOME}

    with OUTCOME {"received": HEX, "closed": BOOL, "reset": BOOL}, then
    "DONE {"cases": N, "seconds": S, "tor": VERSION}".  Returns 0 unless the
    harness itself broke (an exception); the test judges the outcomes.
    """
    parser = argparse.ArgumentParser()
    parser.add_argument("corpus", help="the module that builds the corpus")
    parser.add_argument("--only", default="",
                        help="comma-separated case names (default: all)")
    parser.add_argument("--workers", type=int, default=WORKERS)
    options = parser.parse_args(argv)
    corpus = importlib.import_module(options.corpus).CORPUS
    tor_options, listeners = PORTS[corpus.port]
    cases = corpus.cases
    if options.only:
        wanted = options.only.split(",")
        unknown = set(wanted) - set(corpus.by_name)
        if unknown:
            parser.error("no such case: %s" % ", ".join(sorted(unknown)))
        cases = [corpus.by_name[name] for name in wanted]

    subprocess.run([torpeer.find_program("ip"), "link", "set", "lo", "up"],
                   check=True)
    started = time.monotonic()
    peers = echo_servers()
    server = tor = None
    try:
        server = torsocksd.Server(
            resolver=FakeResolver(corpus.resolver_names,
                                  corpus.resolver_reverse),
            **listeners).start()
        tor = torpeer.TorClient(**tor_options).start()
        tor_address = getattr(tor, corpus.port + "_address")
        with concurrent.futures.ThreadPoolExecutor(options.workers) as pool:
            records = list(pool.map(
                lambda case: replay_case(case, tor_address, server.address),
                cases))
        version = tor.version()
    finally:
        if tor is not None:
            tor.stop()
        if server is not None:
            server.stop()
        for peer in peers:
            peer.close()
    for record in records:
        print("CASE " + json.dumps(record))
    print("DONE " + json.dumps({
        "cases": len(records), "seconds": round(time.monotonic() - started, 1),
        "tor": version}))
    return 0


# =============================================================================
# The test side: judging
# =============================================================================

IDENTICAL, TOR_WAITS, DOCUMENTED = "identical", "tor waits", "documented"
WRONG, UNEXPLAINED = "wrong", "unexplained"
VERDICTS = (IDENTICAL, TOR_WAITS, DOCUMENTED, WRONG, UNEXPLAINED)


class Outcome(NamedTuple):
    """What came back and whether the server closed.  A reset counts as a
    close: whether a close goes out as FIN or RST depends on bytes the
    server left unread, not on the protocol."""
    received: bytes
    closed: bool


class Comparison(NamedTuple):
    """One differential test: its corpus, and what is particular to its
    protocol."""
    corpus: Corpus
    # torsocksd's page (Expect.page): a pattern its status line matches and
    # the header fields it has, {lower-case name: value}
    page_status: bytes
    page_fields: Dict[bytes, bytes]
    # (tor, ours) -> whether Tor, still open after a complete request, is
    # waiting for a circuit where torsocksd went on to answer.
    tor_waits: Callable[[Outcome, Outcome], bool]
    # The part of what a server sent that is compared (default: all).
    compared: Callable[[bytes], bytes] = bytes
    show_limit: int = 36        # bytes of an outcome in a table
    # Whether a documented difference that Tor no longer has fails the test
    # (else it is only printed).
    stale_fails: bool = False

    def run_peer(self):
        """The peer script's outcomes, {case name: (tor, torsocksd)}, and its
        closing summary."""
        require_program("tor")
        require_network_namespace()
        result = subprocess.run(
            ["unshare", "-n", sys.executable, PEER_SCRIPT,
             self.corpus.module],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=300,
            universal_newlines=True)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr
        outcomes, summary = {}, None
        for line in result.stdout.splitlines():
            kind, _, text = line.partition(" ")
            if kind == "CASE":
                record = json.loads(text)
                outcomes[record["case"]] = tuple(
                    Outcome(self.compared(
                        bytes.fromhex(record[side]["received"])),
                        record[side]["closed"])
                    for side in ("tor", "torsocksd"))
            elif kind == "DONE":
                summary = json.loads(text)
        assert summary is not None, result.stdout[-2000:] + result.stderr
        return outcomes, summary

    def page_problem(self, data: bytes, method: str):
        """Why data is not torsocksd's page for method (HEAD: its headers
        only), or None."""
        head, separator, body = data.partition(b"\r\n\r\n")
        if not separator:
            return "no end of headers"
        lines = head.split(b"\r\n")
        if not re.fullmatch(self.page_status, lines[0]):
            return "status line %r" % lines[0]
        headers = {}
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon:
                return "header line %r" % line
            headers[name.strip().lower()] = value.strip()
        for name, value in self.page_fields.items():
            if headers.get(name) != value:
                return "%s: %r" % (name.decode(), headers.get(name))
        length = headers.get(b"content-length", b"")
        if not length.isdigit():
            return "Content-Length %r" % length
        if method == "HEAD":
            return "a body after HEAD" if body else None
        if int(length) != len(body):
            return "Content-Length %s for %d bytes" % (length.decode(),
                                                       len(body))
        if not body or body.endswith(b"\0"):
            return "empty body or a trailing NUL"
        return None

    def expectation_problem(self, expect: Expect, ours: Outcome):
        """Why torsocksd's outcome is not the one a rule expects, or None."""
        if ours.closed != expect.closed:
            return "expected the connection %s" % (
                "closed" if expect.closed else "open")
        if expect.page is None:
            return None if ours.received == expect.received else \
                "expected %s" % show(expect.received)
        if not ours.received.startswith(expect.received):
            return "expected %s before the page" % show(expect.received)
        return self.page_problem(ours.received[len(expect.received):],
                                 expect.page)

    def judge(self, case: Case, tor: Outcome, ours: Outcome):
        """(verdict, detail) for one case."""
        if case.rules:
            problem = self.expectation_problem(case.expect, ours)
            return (WRONG, problem) if problem else (DOCUMENTED, "")
        if tor == ours:
            return IDENTICAL, ""
        if case.complete and not tor.closed and self.tor_waits(tor, ours):
            return TOR_WAITS, ""
        return UNEXPLAINED, ""

    def show_outcome(self, outcome: Outcome) -> str:
        return show(outcome.received, self.show_limit) + (
            " |closed" if outcome.closed else " |open")

    def assert_agrees(self, outcomes):
        """Judge every case: print a row per case (pytest -s shows them)
        and the count of each verdict; fail on any wrong or unexplained
        case, printing them as a table."""
        counts = dict.fromkeys(VERDICTS, 0)
        rows, failures, stale = [], [], []
        for case in self.corpus.cases:
            tor, ours = outcomes[case.name]
            verdict, detail = self.judge(case, tor, ours)
            counts[verdict] += 1
            if verdict == WRONG:
                detail = "[%s] %s" % (", ".join(case.rules), detail)
            rows.append((case.name, verdict, self.show_outcome(tor),
                         self.show_outcome(ours), detail))
            if verdict in (WRONG, UNEXPLAINED):
                failures.append(rows[-1])
            elif verdict == DOCUMENTED and tor == ours:
                stale.append(case.name)
        print(table(rows))
        print(", ".join("%s %d" % item for item in counts.items()))
        if stale:
            message = ("documented as different, yet the same as Tor (rule "
                       "no longer needed?): " + ", ".join(stale))
            assert not self.stale_fails, message
            print(message)
        assert not failures, "%d of %d cases fail:\n%s" % (
            len(failures), len(self.corpus.cases), table(failures))

    def assert_rules_cite_the_readme(self):
        """Each rule the corpus names cites rows that the README's table
        has, and each rule is used by some case."""
        rows = set(readme_difference_cases())
        rules = self.corpus.rules
        missing = sorted({(row, rule.name) for rule in rules.values()
                          for row in rule.readme if row not in rows})
        used = {rule for case in self.corpus.cases for rule in case.rules}
        assert used == set(rules), set(rules) - used
        assert not missing, "rules cite rows the README's table lacks:\n" + \
            "\n".join("  %r (rule %s: %s)" % (row, name, rules[name].says)
                      for row, name in missing)


class DifferentialTests:
    """The tests every comparison runs: a test module subclasses this with
    its Comparison as `comparison`, and for test_judge what Tor sends before
    it waits (tor_waiting, still open), what torsocksd sends instead
    (answered) and a close of torsocksd's after no more than Tor sent
    (closed_unanswered)."""
    comparison: Comparison
    tor_waiting: Outcome
    answered: Outcome
    closed_unanswered: Outcome

    @pytest.fixture(scope="class")
    @classmethod
    def outcomes(cls):
        """The peer script run once: {case name: (tor, torsocksd)} for every
        case of the corpus (a class method: pytest runs a class-scoped
        fixture once, not once per test instance)."""
        outcomes, summary = cls.comparison.run_peer()
        print("peer: %(cases)d cases against tor %(tor)s and torsocksd in "
              "%(seconds).1f s" % summary)
        assert set(outcomes) == set(cls.comparison.corpus.by_name)
        return outcomes

    def test_torsocksd_agrees_with_tor_or_differs_as_documented(
            self, outcomes):
        self.comparison.assert_agrees(outcomes)

    def test_every_rule_cites_the_readme_and_is_used(self):
        self.comparison.assert_rules_cite_the_readme()

    def test_judge(self):
        judge = self.comparison.judge
        tor, answered = self.tor_waiting, self.answered
        waits = Case("x", (b"",), complete=True)
        assert judge(waits, tor, answered)[0] == TOR_WAITS
        assert judge(waits._replace(complete=False), tor, answered)[0] \
            == UNEXPLAINED
        # Closing without a reply is not an answer.
        assert judge(waits, tor, self.closed_unanswered)[0] == UNEXPLAINED
        assert judge(waits, answered, answered)[0] == IDENTICAL
        ruled = Case("y", (b"",), rules=("fail-fast",),
                     expect=Expect(answered.received, answered.closed))
        assert judge(ruled, tor, answered)[0] == DOCUMENTED
        assert judge(ruled, tor, answered._replace(
            closed=not answered.closed))[0] == WRONG


def show(data: bytes, limit: int = 36) -> str:
    """Bytes for a table cell: hex, or text when it is mostly text."""
    if not data:
        return "-"
    printable = sum(32 <= byte < 127 or byte in b"\r\n" for byte in data)
    if len(data) > 8 and printable > 0.9 * len(data):
        text = repr(data[:limit])[1:]
    else:
        text = data[:limit].hex()
    return text + ("...(%d bytes)" % len(data) if len(data) > limit else "")


def table(rows) -> str:
    """Rows of (case, verdict, Tor, torsocksd, why) as aligned columns."""
    rows = [("case", "verdict", "Tor", "torsocksd", "why")] + list(rows)
    widths = [max(len(row[column]) for row in rows) for column in range(4)]
    return "\n".join(
        ("  ".join(cell.ljust(width) for cell, width in zip(row, widths))
         + "  " + row[4]).rstrip() for row in rows)


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
