"""Server.reload(): a new configuration applied without dropping anyone.

Listeners are compared by kind and spec: an unchanged one keeps its very
socket, new ones open before removed ones close, and open connections keep
the settings they were accepted under.  A configuration with any problem
changes nothing.  (The SIGHUP path, the config file and workers are in
test_config.py.)
"""

import logging
import os
import socket
import struct
import threading
import time

import pytest

import torsocksd
from conftest import (TIMEOUT, FakeResolver, free_port, ipv6_loopback,
                      open_socks5_tunnel, recv_exactly, recv_until_eof,
                      socks5_request)


def open_fds():
    return set(os.listdir("/proc/self/fd"))


def listener_socks(server):
    return [listener.sock for listener in server._listeners]


def connect_to(address):
    return socket.create_connection(address[:2], timeout=TIMEOUT)


def tunnel_round_trip(sock, payload=b"still relaying"):
    sock.sendall(payload)
    assert recv_exactly(sock, len(payload)) == payload


def test_unchanged_listener_keeps_its_socket_new_ones_open(make_server):
    first, second = free_port(), free_port()
    server = make_server(listen=[("127.0.0.1", first)],
                         resolver=FakeResolver())
    kept = listener_socks(server)[0]
    report = server.reload(listen=[("127.0.0.1", first),
                                   ("127.0.0.1", second)])
    assert report.kept == ["127.0.0.1:%d" % first]
    assert report.opened == ["127.0.0.1:%d" % second]
    assert report.closed == []
    assert listener_socks(server)[0] is kept and kept.fileno() != -1
    assert server.addresses == [("127.0.0.1", first), ("127.0.0.1", second)]
    for port in (first, second):
        with connect_to(("127.0.0.1", port)) as client:
            client.sendall(b"\x05\x01\x00")
            assert recv_exactly(client, 2) == b"\x05\x00"


def test_removed_listener_closes_and_open_connections_keep_going(
        make_server, echo_server):
    first, second = free_port(), free_port()
    server = make_server(listen=[("127.0.0.1", first)],
                         resolver=FakeResolver())
    with open_socks5_tunnel(("127.0.0.1", first), "127.0.0.1",
                            echo_server.port) as tunnel:
        report = server.reload(listen=[("127.0.0.1", second)])
        assert (report.opened, report.closed, report.kept) == (
            ["127.0.0.1:%d" % second], ["127.0.0.1:%d" % first], [])
        with pytest.raises(ConnectionRefusedError):
            connect_to(("127.0.0.1", first)).close()
        tunnel_round_trip(tunnel)
        with open_socks5_tunnel(("127.0.0.1", second), "127.0.0.1",
                                echo_server.port) as other:
            tunnel_round_trip(other)
        tunnel.shutdown(socket.SHUT_WR)
        assert recv_until_eof(tunnel) == b""
    assert server.stats()["listeners"] == ["127.0.0.1:%d" % second]


def test_clients_connecting_throughout_reloads_are_never_refused(
        make_server):
    """The listener that stays is never closed, not even for a moment:
    clients that keep connecting while listeners come and go all get in."""
    port = free_port()
    server = make_server(listen=[("127.0.0.1", port)],
                         resolver=FakeResolver())
    others = [free_port() for _ in range(4)]
    outcomes, stop = [], threading.Event()

    def keep_connecting():
        while not stop.is_set() and len(outcomes) < 5000:
            try:
                with connect_to(("127.0.0.1", port)) as client:
                    client.sendall(b"\x05\x01\x00")
                    outcomes.append(recv_exactly(client, 2))
            except OSError as error:
                outcomes.append(error)
    thread = threading.Thread(target=keep_connecting)
    thread.start()
    try:
        for round_number in range(20):
            extra = [("127.0.0.1", others[round_number % len(others)])]
            server.reload(listen=[("127.0.0.1", port)] + extra)
            server.reload(listen=[("127.0.0.1", port)])
    finally:
        stop.set()
        thread.join(TIMEOUT)
    assert outcomes and set(outcomes) == {b"\x05\x00"}, set(map(repr,
                                                                outcomes))


def test_a_listener_that_cannot_open_changes_nothing(make_server, caplog):
    port = free_port()
    server = make_server(listen=[("127.0.0.1", port)], max_connections=7,
                         resolver=FakeResolver())
    before, settings, fds = listener_socks(server), server.settings, \
        len(open_fds())
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        busy = taken.getsockname()[1]
        with pytest.raises(torsocksd.ConfigError) as refused:
            server.reload(listen=[("127.0.0.1", port), ("127.0.0.1", free_port()),
                                  ("127.0.0.1", busy)], max_connections=9)
        assert len(open_fds()) == fds + 1     # taken, and nothing else
    (problem,) = refused.value.problems
    assert problem.startswith("cannot listen on 127.0.0.1:%d for socks: "
                              % busy) and "in use" in problem
    assert listener_socks(server) == before
    assert server.settings is settings and settings.max_connections == 7
    assert "reload: nothing changed; the old configuration stays" \
        in caplog.text
    assert server.addresses == [("127.0.0.1", port)]


def test_a_listener_name_idna_cannot_encode_changes_nothing(make_server):
    """A 64-letter label fails IDNA encoding inside getaddrinfo (before any
    lookup): a problem like any other, not an escaping UnicodeError."""
    port = free_port()
    server = make_server(listen=[("127.0.0.1", port)],
                         resolver=FakeResolver())
    settings = server.settings
    with pytest.raises(torsocksd.ConfigError) as refused:
        server.reload(listen=[("127.0.0.1", port), ("a" * 64 + ".invalid", 1)])
    (problem,) = refused.value.problems
    assert problem.startswith("cannot listen on %s.invalid:1 for socks: "
                              % ("a" * 64))
    assert server.settings is settings
    assert server.addresses == [("127.0.0.1", port)]


def test_every_problem_is_reported_at_once(make_server):
    port = free_port()
    server = make_server(listen=[("127.0.0.1", port)],
                         resolver=FakeResolver())
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        busy = taken.getsockname()[1]
        with pytest.raises(torsocksd.ConfigError) as refused:
            server.reload(listen=[("127.0.0.1", busy), ("0.0.0.0", 0)])
    problems = refused.value.problems
    assert len(problems) == 2, problems
    assert problems[0].startswith("cannot listen on 127.0.0.1:%d" % busy)
    assert problems[1].startswith("refusing to listen on 0.0.0.0:")
    assert server.addresses == [("127.0.0.1", port)]


def test_exposure_is_checked_on_the_new_configuration(make_server,
                                                      echo_server):
    """A reload never leaves less protection than before: dropping the
    client rules of a listener other hosts can reach is refused whole,
    and a policy that shuts this client out applies to new connections
    only."""
    server = make_server(listen=[("0.0.0.0", 0)],
                         client_policy=[(True, "127.0.0.0/8")],
                         resolver=FakeResolver())
    port = server.address[1]
    with pytest.raises(torsocksd.ConfigError) as refused:
        server.reload(client_policy=[], max_connections=3)
    assert refused.value.problems == [
        "refusing to listen on 0.0.0.0:%d without --allow/--deny or "
        "--credentials: anyone could use this proxy (give --open-proxy if "
        "that is meant)" % port]
    assert server.settings.client_policy.rules
    with open_socks5_tunnel(("127.0.0.1", port), "127.0.0.1",
                            echo_server.port) as tunnel:
        server.reload(client_policy=[(False, "127.0.0.1")])
        with connect_to(("127.0.0.1", port)) as refused_client:
            assert recv_until_eof(refused_client) == b""
        tunnel_round_trip(tunnel)


def test_a_listener_exposed_by_its_address_is_never_opened(make_server,
                                                         monkeypatch):
    server = make_server(resolver=FakeResolver())
    opened = []
    real = torsocksd.open_listener_for

    def recording(spec, kind, unix_mode):
        opened.append(spec)
        return real(spec, kind, unix_mode)
    monkeypatch.setattr(torsocksd, "open_listener_for", recording)
    port = free_port()
    with pytest.raises(torsocksd.ConfigError) as refused:
        server.reload(listen=[server.address, ("::", port),
                              ("0.0.0.0", port), ("127.0.0.2", port)])
    assert [problem.split(" without")[0] for problem
            in refused.value.problems] == [
        "refusing to listen on [::]:%d" % port,
        "refusing to listen on 0.0.0.0:%d" % port]
    assert opened == [("127.0.0.2", port)]      # and closed again
    with socket.socket() as probe:
        probe.bind(("127.0.0.2", port))


def test_settings_apply_to_new_connections_only(make_server, echo_server):
    server = make_server(resolver=FakeResolver())
    with open_socks5_tunnel(server.address, "127.0.0.1",
                            echo_server.port) as tunnel:
        server.reload(destination_policy=["reject 127.0.0.1"])
        with connect_to(server.address) as client:
            client.sendall(b"\x05\x01\x00"
                           + socks5_request(1, "127.0.0.1", echo_server.port))
            assert recv_exactly(client, 12) == \
                b"\x05\x00\x05\x02\x00\x01" + bytes(6)
        tunnel_round_trip(tunnel)
    assert len(echo_server.accepted) == 1


def test_reload_from_other_threads_and_the_loop(make_server):
    server = make_server(resolver=FakeResolver())
    results = []

    def in_thread():
        results.append(server.reload(idle_timeout=30.0))
    threads = [threading.Thread(target=in_thread) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)
    assert len(results) == 4 and server.settings.idle_timeout == 30.0
    done = threading.Event()

    def in_loop():
        results.append(server.reload(idle_timeout=40.0))
        done.set()
    server.call_soon_threadsafe(in_loop)
    assert done.wait(TIMEOUT)
    assert server.settings.idle_timeout == 40.0


def test_reload_before_start_and_with_a_config_source(tmp_path):
    users = tmp_path / "users"
    users.write_text("alice:secret\n")
    options = {"listen": [("127.0.0.1", 0)], "handshake_timeout": 3.0}
    server = torsocksd.Server(config_source=lambda: dict(options),
                              resolver=FakeResolver())
    try:
        server.reload()
        assert server.settings.handshake_timeout == 3.0
        options.update(credentials_file=str(users), handshake_timeout=4.0)
        server.start()
        assert server.reload().kept == [torsocksd.format_address(
            server.address)]
        assert server.settings.credentials.check(b"alice", b"secret")
        users.write_text("")
        with pytest.raises(torsocksd.ConfigError) as refused:
            server.reload()
        assert "no user:password line" in refused.value.problems[0]
        assert server.settings.credentials.check(b"alice", b"secret")
        options["no_such_option"] = 1
        with pytest.raises(torsocksd.ConfigError) as refused:
            server.reload()
        assert refused.value.problems == ["unknown option(s): no_such_option"]
    finally:
        server.stop()


def test_credentials_file_is_read_again(make_server, tmp_path):
    users = tmp_path / "users"
    users.write_text("alice:old\n")
    server = make_server(credentials_file=str(users), resolver=FakeResolver())
    users.write_text("alice:new\n")
    server.reload()
    assert server.settings.credentials.check(b"alice", b"new")
    assert not server.settings.credentials.check(b"alice", b"old")


def test_unix_listener_added_then_removed(make_server, tmp_path):
    path = str(tmp_path / "socks.sock")
    server = make_server(resolver=FakeResolver(), unix_mode=0o640)
    tcp = server.address
    report = server.reload(listen=[tcp, "unix:" + path], unix_mode=0o640)
    assert report.opened == ["unix:" + path]
    assert os.stat(path).st_mode & 0o777 == 0o640
    with socket.socket(socket.AF_UNIX) as client:
        client.settimeout(TIMEOUT)
        client.connect(path)
        client.sendall(b"\x05\x01\x00")
        assert recv_exactly(client, 2) == b"\x05\x00"
    server.reload(listen=[tcp, "unix:" + path], unix_mode=0o600)
    assert os.stat(path).st_mode & 0o777 == 0o600       # the kept one too
    server.reload(listen=[tcp])
    assert not os.path.exists(path)


def test_handed_in_listeners_are_not_ours_to_change(caplog):
    caplog.set_level(logging.INFO, logger="torsocksd")
    with socket.socket() as handed:
        handed.bind(("127.0.0.1", 0))
        handed.listen(8)
        server = torsocksd.Server(sockets=[handed], resolver=FakeResolver())
        with server:
            report = server.reload(listen=[("127.0.0.1", free_port())],
                                   max_connections=5)
            assert report.kept == [torsocksd.format_address(
                handed.getsockname())]
            assert report.opened == report.closed == []
            assert server.settings.max_connections == 5
            assert "listen is not used" in caplog.text
            assert "not ours to change" in caplog.text
            with connect_to(handed.getsockname()) as client:
                client.sendall(b"\x05\x01\x00")
                assert recv_exactly(client, 2) == b"\x05\x00"


def test_reload_while_shutting_down_is_refused(make_server):
    server = make_server(resolver=FakeResolver())
    server.stop()
    with pytest.raises(torsocksd.ConfigError):
        server.reload(idle_timeout=5.0)


# -- nameservers: a new resolver for new lookups ------------------------------

class SlowDns:
    """A UDP name server on loopback answering every A question with
    answer (TTL 0, so nothing is cached) once release is set, and AAAA
    with no record; it counts the questions it got."""

    def __init__(self, answer):
        self.answer = socket.inet_aton(answer)
        self.release = threading.Event()
        self.questions = 0
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        self.address = self.sock.getsockname()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.serve)
        self.thread.start()

    def serve(self):
        waiting = []
        while not self.done.is_set():
            try:
                query, peer = self.sock.recvfrom(512)
                self.questions += 1
                waiting.append((query, peer))
            except socket.timeout:
                pass
            if self.release.is_set():
                for query, peer in waiting:
                    self.sock.sendto(self.reply(query), peer)
                waiting = []

    def reply(self, query):
        end = query.index(b"\0", 12) + 5        # the question
        qtype = struct.unpack("!H", query[end - 4:end - 2])[0]
        answers = b""
        if qtype == 1:
            answers = (b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 0, 4)
                       + self.answer)
        return (query[:2] + b"\x81\x80" + struct.pack(
            "!HHHH", 1, 1 if answers else 0, 0, 0) + query[12:end] + answers)

    def close(self):
        self.done.set()
        self.thread.join(TIMEOUT)
        self.sock.close()


@pytest.fixture
def slow_dns():
    servers = []

    def make(answer):
        servers.append(SlowDns(answer))
        return servers[-1]
    yield make
    for server in servers:
        server.close()


def resolve_request(name):
    return b"\x05\x01\x00" + socks5_request(0xF0, name, 0)


def test_new_nameservers_take_new_lookups_old_ones_finish(make_server,
                                                          slow_dns):
    old_dns, new_dns = slow_dns("127.0.0.2"), slow_dns("127.0.0.3")
    new_dns.release.set()
    server = make_server(nameservers=[old_dns.address])
    first = server.resolver
    with connect_to(server.address) as waiting:
        waiting.sendall(resolve_request("a.test"))
        assert recv_exactly(waiting, 2) == b"\x05\x00"
        deadline = time.monotonic() + TIMEOUT
        while old_dns.questions < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        server.reload(nameservers=[new_dns.address])
        assert server.resolver is not first
        with connect_to(server.address) as fresh:
            fresh.sendall(resolve_request("b.test"))
            assert recv_exactly(fresh, 12) == (b"\x05\x00\x05\x00\x00\x01"
                                               + bytes((127, 0, 0, 3, 0, 0)))
        assert first.pending == 1
        old_dns.release.set()
        assert recv_exactly(waiting, 10) == (b"\x05\x00\x00\x01"
                                             + bytes((127, 0, 0, 2, 0, 0)))
    deadline = time.monotonic() + TIMEOUT
    while server._retiring_resolvers and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server._retiring_resolvers == [] and first.pending == 0
    # (Two questions each, A and AAAA; a slow machine may ask the old
    # server again.)
    assert old_dns.questions >= 2 and new_dns.questions == 2


def test_given_resolver_is_kept(make_server):
    resolver = FakeResolver({"x.test": ["127.0.0.1"]})
    server = make_server(resolver=resolver)
    server.reload(resolver_threads=8)
    assert server.resolver.resolver is resolver


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback")
def test_ipv6_listener_added(make_server):
    server = make_server(resolver=FakeResolver())
    report = server.reload(listen=[server.address, ("::1", 0)])
    (opened,) = report.opened
    assert opened.startswith("[::1]:")
    with socket.create_connection(server.addresses[1][:2],
                                  timeout=TIMEOUT) as client:
        client.sendall(b"\x05\x01\x00")
        assert recv_exactly(client, 2) == b"\x05\x00"


def test_login_failure_limit_is_reloaded_and_counts_kept(make_server):
    server = make_server(resolver=FakeResolver(), max_login_failures=5)
    throttle = server._login_throttle
    throttle.failed("client", time.monotonic())
    server.reload(max_login_failures=1)
    assert server._login_throttle is throttle and throttle.allowed == 1
    assert throttle.blocked("client", time.monotonic())
