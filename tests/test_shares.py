"""Fair shares: one client's lookups, logins and sockets never starve the
others.

The resolver is shared client by client (LookupScheduler), failed logins are
throttled per client (LoginThrottle), and a connection's sockets are capped
(MAX_PARALLEL_ATTEMPTS) so that the default --max-connections keeps a
socket for every new client.  A client is an address, or an IPv6 /64; the
loopback range gives the tests several clients (127.0.0.1, 127.0.0.2, ...).
"""

import collections
import ipaddress
import logging
import socket
import threading
import time

import pytest

import torsocksd
from conftest import (TIMEOUT, closing_factory, recv_exactly, recv_until_eof,
                      run_peer_checks, socks5_request, userpass)

RESOLVE = 0xF0
NO_AUTH = b"\x05\x01\x00"


class PoolResolver:
    """A resolver with capacity workers taking lookups first come, first
    served, as the system resolver's thread pool does: a name in silent
    holds its worker for good; others are answered with 192.0.2.1 as soon
    as a worker is free.  Counts what it was asked and what was cancelled."""

    def __init__(self, capacity, silent=("silent.test",)):
        self.capacity = capacity
        self.silent = set(silent)
        self.lock = threading.Lock()
        self.queue = collections.deque()
        self.busy = 0
        self.asked = []
        self.cancelled = 0

    class Handle:
        def __init__(self, resolver):
            self.resolver = resolver
            self.cancelled = False

        def cancel(self):
            with self.resolver.lock:
                if not self.cancelled:
                    self.cancelled = True
                    self.resolver.cancelled += 1

    def lookup(self, hostname, callback):
        handle = self.Handle(self)
        with self.lock:
            self.asked.append(hostname)
            self.queue.append((hostname, callback, handle))
        self._run()
        return handle

    def reverse(self, address, callback):
        return self.lookup(str(address), callback)

    def _run(self):
        answers = []
        with self.lock:
            while self.queue and self.busy < self.capacity:
                hostname, callback, handle = self.queue.popleft()
                if handle.cancelled:
                    continue
                if hostname in self.silent:
                    self.busy += 1          # never answers, never frees
                else:
                    answers.append(callback)
        for callback in answers:
            callback(torsocksd.ResolverResult(
                (ipaddress.ip_address("192.0.2.1"),)))


def resolve_request(name):
    return NO_AUTH + socks5_request(RESOLVE, name, 0)


def client_from(server, source):
    sock = socket.socket()
    sock.settimeout(TIMEOUT)
    sock.bind((source, 0))
    sock.connect(server.address)
    return sock


def wait_for(condition, seconds=TIMEOUT):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


ANSWER = b"\x05\x00" + b"\x05\x00\x00\x01" + bytes((192, 0, 2, 1)) + b"\0\0"


@pytest.fixture
def pool_server(make_server):
    """(server, resolver): a server whose resolver is a PoolResolver of 4
    workers, with time enough to wait for lookups that never end."""
    resolver = PoolResolver(capacity=4)
    return make_server(resolver=resolver, connect_timeout=30), resolver


def ask_silent_name(server):
    """A client from 127.0.0.1 that asked to RESOLVE silent.test."""
    sock = client_from(server, "127.0.0.1")
    sock.sendall(resolve_request("silent.test"))
    return sock


@pytest.fixture
def silent_askers():
    """silent_askers(server) -> ask_silent_name(server); closed at
    teardown."""
    yield from closing_factory(ask_silent_name)


# -- lookups ---------------------------------------------------------------------

def test_a_flood_of_silent_names_does_not_hold_another_clients_lookup(
        pool_server, silent_askers):
    """127.0.0.1 asks 40 names that never answer; 127.0.0.2's lookup still
    gets a worker (a first-come pool of 4 would have made it wait for good)."""
    server, resolver = pool_server
    for _ in range(40):
        silent_askers(server)
    assert wait_for(lambda: server._lookups is not None
                    and server._lookups.pending() == 40)
    with client_from(server, "127.0.0.2") as other:
        other.sendall(resolve_request("fast.test"))
        assert recv_until_eof(other) == ANSWER
    # The flood got at most its share of the resolver.
    assert resolver.asked.count("silent.test") == 2


def test_a_client_past_its_waiting_share_is_refused_alone(pool_server,
                                                          silent_askers):
    server, _ = pool_server
    share = torsocksd.MAX_WAITING_LOOKUPS_PER_CLIENT + 2   # asking + waiting
    flood = [silent_askers(server) for _ in range(share + 5)]
    assert wait_for(lambda: server.stats()["active"] == share)
    replies = [recv_until_eof(sock) for sock in flood[share:]]
    # RESOLVE's failure reply, at once, for the lookups past the share.
    assert replies == [b"\x05\x00\x05\x04\x00\x01" + bytes(6)] * 5
    with client_from(server, "127.0.0.3") as other:
        other.sendall(resolve_request("fast.test"))
        assert recv_until_eof(other) == ANSWER


def test_a_client_that_hangs_up_gives_its_lookup_back(pool_server,
                                                      silent_askers):
    server, resolver = pool_server
    socks = [silent_askers(server) for _ in range(10)]
    assert wait_for(lambda: server._lookups.pending() == 10)
    for sock in socks:
        sock.shutdown(socket.SHUT_WR)       # EOF before the answer
        assert recv_until_eof(sock) == b"\x05\x00"
        sock.close()
    assert wait_for(lambda: server._lookups.pending() == 0)
    assert wait_for(lambda: server.stats()["active"] == 0)
    # Every lookup the resolver was given was cancelled; the rest never
    # reached it.
    assert resolver.cancelled == resolver.asked.count("silent.test")


@pytest.fixture
def slow_system_lookups(monkeypatch):
    """getaddrinfo as the system resolver's threads meet it: a name ending
    in .slow blocks its thread until the test ends (as a DNS server that
    never answers does), one ending in .fast is 192.0.2.1 at once, any
    other is the real getaddrinfo's."""
    real = socket.getaddrinfo
    release = threading.Event()
    started = []

    def getaddrinfo(host, *args, **kwargs):
        if isinstance(host, str) and host.endswith(".slow"):
            started.append(host)
            release.wait(30)
            raise socket.gaierror(socket.EAI_AGAIN, "slow")
        if isinstance(host, str) and host.endswith(".fast"):
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "",
                     ("192.0.2.1", 0))]
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    yield started
    release.set()


def test_hanging_up_cannot_tie_up_every_system_resolver_thread(
        make_server, slow_system_lookups):
    """A client that asks for names whose lookups never end and hangs up
    on each frees no thread of the system resolver (getaddrinfo cannot be
    stopped): its abandoned lookups keep their places in its share, so
    another client still gets a thread."""
    server = make_server(resolver=torsocksd.SystemResolver(workers=4),
                         connect_timeout=5)
    for number in range(12):
        with client_from(server, "127.0.0.1") as sock:
            sock.sendall(resolve_request("n%d.slow" % number))
            assert wait_for(lambda: server._lookups.pending() > 0)
        assert wait_for(lambda: server.stats()["active"] == 0)
    # Its share of 4 workers is 2: the others never started.
    assert wait_for(lambda: len(slow_system_lookups) == 2)
    with client_from(server, "127.0.0.2") as other:
        other.sendall(resolve_request("b.fast"))
        assert recv_until_eof(other) == ANSWER
    assert len(slow_system_lookups) == 2


class FakeLoop:
    """Enough of EventLoop for LookupScheduler: answers run when run()."""

    def __init__(self):
        self.calls = []

    def threadsafe_callback(self, callback, owner=None):
        return lambda result: self.calls.append((callback, result))

    def run(self):
        calls, self.calls = self.calls, []
        for callback, result in calls:
            callback(result)


class ManualResolver:
    def __init__(self):
        self.pending = []

    def lookup(self, query, callback):
        handle = type("Handle", (), {"cancel": lambda self: None})()
        self.pending.append((query, callback))
        return handle

    reverse = lookup

    def answer(self, query):
        for entry in self.pending:
            if entry[0] == query:
                self.pending.remove(entry)
                entry[1](torsocksd.ResolverResult(("answer of " + query,)))
                return
        raise AssertionError("%r was not asked" % query)


def test_scheduler_turns_between_clients():
    loop, resolver = FakeLoop(), ManualResolver()
    scheduler = torsocksd.LookupScheduler(resolver, loop, capacity=4)
    assert scheduler.share == 2
    done = []
    for n in range(5):
        scheduler.lookup("a", "a%d" % n, done.append)
    for n in range(3):
        scheduler.lookup("b", "b%d" % n, done.append)
    scheduler.lookup("c", "c0", done.append)
    # Two places each for a and b; c waits for the next free one.
    assert [q for q, _ in resolver.pending] == ["a0", "a1", "b0", "b1"]
    assert scheduler.pending() == 9
    resolver.answer("a0")
    loop.run()
    assert done == [torsocksd.ResolverResult(("answer of a0",))]
    # The free place went to the client waiting longest for its turn: c.
    assert [q for q, _ in resolver.pending] == ["a1", "b0", "b1", "c0"]
    resolver.answer("b0")
    loop.run()
    assert [q for q, _ in resolver.pending][-1] == "a2"


def test_scheduler_cancel_gives_the_place_back():
    loop, resolver = FakeLoop(), ManualResolver()
    scheduler = torsocksd.LookupScheduler(resolver, loop, capacity=2)
    first = scheduler.lookup("a", "a0", lambda result: None)
    waiting = scheduler.lookup("a", "a1", lambda result: None)
    scheduler.lookup("b", "b0", lambda result: None)
    assert [q for q, _ in resolver.pending] == ["a0", "b0"]
    waiting.cancel()
    assert scheduler.pending() == 2
    first.cancel()
    assert scheduler.pending() == 1
    resolver.answer("a0")       # a late answer to a cancelled lookup
    loop.run()
    assert scheduler.pending() == 1


# -- logins ----------------------------------------------------------------------

def test_login_throttle_blocks_after_the_allowed_failures():
    throttle = torsocksd.LoginThrottle(allowed=3, window=10.0)
    assert not throttle.blocked("a", 0.0)
    assert throttle.failed("a", 0.0) is False
    assert throttle.failed("a", 1.0) is False
    assert throttle.failed("a", 2.0) is True        # this one blocks: log it
    assert throttle.blocked("a", 2.5)
    assert not throttle.blocked("b", 2.5)
    assert throttle.blocked("a", 9.9)
    assert not throttle.blocked("a", 11.5)          # two aged out
    assert throttle.failed("a", 12.0) is False      # all aged out
    assert throttle.failed("a", 12.5) is False
    assert throttle.failed("a", 13.0) is True       # a new burst


def test_login_throttle_remembers_a_bounded_number_of_clients():
    throttle = torsocksd.LoginThrottle(allowed=1, window=100.0, remembered=3)
    for n in range(10):
        throttle.failed(n, 0.0)
    assert len(throttle._failures) == 3
    assert throttle.blocked(9, 1.0) and not throttle.blocked(0, 1.0)


def login(server, source, password):
    with client_from(server, source) as sock:
        sock.sendall(b"\x05\x01\x02" + userpass(b"alice", password))
        return recv_until_eof(sock) if password != b"secret" \
            else recv_exactly(sock, 4)


def test_repeated_failed_logins_lock_that_client_out_for_a_while(
        make_server, caplog):
    server = make_server(credentials=torsocksd.Credentials(
        [(b"alice", b"secret")]), max_login_failures=3)
    with caplog.at_level(logging.WARNING, logger="torsocksd"):
        for _ in range(3):
            assert login(server, "127.0.0.1", b"guess") == b"\x05\x02\x01\x01"
        # Now even the right password is refused, without a check...
        assert login(server, "127.0.0.1", b"secret") == b"\x05\x02\x01\x01"
        # ... while another client logs in.
        assert login(server, "127.0.0.2", b"secret") == b"\x05\x02\x01\x00"
    warnings = [r for r in caplog.records if "failed logins" in r.message]
    assert len(warnings) == 1           # once per burst
    assert wait_for(lambda: server.stats()["active"] == 0)


def test_max_login_failures_0_never_locks_out(make_server):
    server = make_server(credentials=torsocksd.Credentials(
        [(b"alice", b"secret")]), max_login_failures=0)
    for _ in range(8):
        assert login(server, "127.0.0.1", b"guess") == b"\x05\x02\x01\x01"
    assert login(server, "127.0.0.1", b"secret") == b"\x05\x02\x01\x00"


# -- file descriptors ---------------------------------------------------------------

def test_default_max_connections_budgets_every_socket_a_connection_holds(
        monkeypatch):
    monkeypatch.setattr(torsocksd, "file_limit", lambda: 4096)
    spare = torsocksd.FDS_SPARE + torsocksd.MAX_TOR_LINKS
    assert torsocksd.FDS_PER_CONNECTION == 3
    assert torsocksd.Settings().max_connections == (4096 - spare - 8) // 3
    assert torsocksd.Settings(nameservers=[("127.0.0.1", 53)]) \
        .max_connections == (4096 - spare - 256) // 3
    assert torsocksd.Settings(splice=torsocksd.HAVE_SPLICE).max_connections \
        == (4096 - spare - 8) // (7 if torsocksd.HAVE_SPLICE else 3)


def test_black_hole_connects_leave_room_for_a_fresh_client():
    """In a namespace, 16 addresses that swallow SYNs (a dummy interface):
    each CONNECT holds at most 3 sockets, and a fresh client is served
    (tests/peers/fd_budget.py)."""
    run_peer_checks("fd_budget.py")
