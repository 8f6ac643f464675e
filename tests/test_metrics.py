"""The metrics page (--metrics): its HTTP door, its numbers, and the tools
that read it (promtool; a real Prometheus server in
peers/prometheus_scrape.py).

The counters must move by exactly what a test does: each connection, each
lookup, each byte.  No destination ever appears on the page.
"""

import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

import torsocksd
from conftest import (TIMEOUT, FakeResolver, free_port, open_socks5_tunnel,
                      recv_exactly, recv_until_eof, require_network_namespace,
                      require_program, run_peer_checks, socks4_request,
                      socks5_request)
from test_deploy import SCRIPT, Child, notify  # noqa: F401

SECRET = "secret-destination.test"     # must never reach the page


# -- the request parser (sans-I/O) --------------------------------------------

GET = b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n"


def test_every_prefix_of_a_request_needs_more():
    for size in range(len(GET)):
        assert torsocksd.parse_metrics_request(GET[:size]) \
            is torsocksd.NEED_MORE, size
    assert torsocksd.parse_metrics_request(GET + b"GET /x HTTP/1.1") == \
        torsocksd.Parsed(("GET", "/metrics"), len(GET))


@pytest.mark.parametrize("request_bytes, parsed", [
    (b"HEAD /metrics HTTP/1.0\n\n", ("HEAD", "/metrics")),
    (b"GET /metrics?name[]=x HTTP/1.1\r\n\r\n", ("GET", "/metrics")),
    (b"GET / HTTP/1.1\r\n\r\n", ("GET", "/")),
])
def test_requests_that_parse(request_bytes, parsed):
    assert torsocksd.parse_metrics_request(request_bytes) == \
        torsocksd.Parsed(parsed, len(request_bytes))


@pytest.mark.parametrize("request_bytes, status", [
    (b"GET /metrics\r\n\r\n", 400),
    (b"GET metrics HTTP/1.1\r\n\r\n", 400),
    (b"\x16\x03\x01\x02\x00\r\n\r\n", 400),
    (b"GET /metrics SPDY/3\r\n\r\n", 400),
    (b"POST /metrics HTTP/1.1\r\n\r\n", 405),
    (b"GET /" + b"a" * 9000, 431),
    (b"GET /metrics HTTP/1.1\r\n" + b"X: y\r\n" * 2000 + b"\r\n", 431),
])
def test_requests_that_are_refused(request_bytes, status):
    result = torsocksd.parse_metrics_request(request_bytes)
    assert isinstance(result, torsocksd.Rejected)
    assert result.reply.startswith(b"HTTP/1.1 %d " % status)
    assert b"\r\nConnection: close\r\n\r\n" in result.reply
    if status == 405:
        assert b"\r\nAllow: GET, HEAD\r\n" in result.reply


# -- scraping a server in this process ------------------------------------------

def http(address, request):
    """The whole response to request (bytes), read until the close."""
    with socket.create_connection(address[:2], timeout=TIMEOUT) as client:
        client.sendall(request)
        return recv_until_eof(client)


def scrape(server):
    """(headers, body) of GET /metrics on the server's metrics listener."""
    response = http(metrics_address(server), GET)
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.decode("ascii").split("\r\n")
    assert lines[0] == "HTTP/1.1 200 OK"
    headers = dict(line.split(": ", 1) for line in lines[1:])
    assert int(headers["Content-Length"]) == len(body)
    return headers, body.decode("utf-8")


def samples(body):
    """{"name{labels}": value} of every sample line."""
    found = {}
    for line in body.splitlines():
        if line and not line.startswith("#"):
            series, _, value = line.rpartition(" ")
            found[series] = float(value)
    return found


def metrics_address(server):
    (address,) = [listener.address for listener in server._listeners
                  if listener.kind == "metrics"]
    return address


def wait_until_idle(server):
    deadline = time.monotonic() + TIMEOUT
    while server.stats()["active"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.stats()["active"] == 0


def connections(labels):
    return "torsocksd_connections_total{version=\"%s\",command=\"%s\"," \
           "outcome=\"%s\"}" % labels


def test_counters_move_by_exactly_what_clients_do(make_server, echo_server):
    resolver = FakeResolver({SECRET: ["127.0.0.1"]})
    server = make_server(metrics=[("127.0.0.1", 0)], resolver=resolver)
    before = samples(scrape(server)[1])
    socks = server.address
    # A: a name looked up, a tunnel; B: an IP literal, a tunnel.
    with open_socks5_tunnel(socks, SECRET, echo_server.port) as tunnel:
        tunnel.sendall(b"ping")
        assert recv_exactly(tunnel, 4) == b"ping"
    with open_socks5_tunnel(socks, "127.0.0.1", echo_server.port) as tunnel:
        tunnel.sendall(b"hello")
        assert recv_exactly(tunnel, 5) == b"hello"
    with socket.create_connection(socks, timeout=TIMEOUT) as client:
        # C: SOCKS4 to a closed port: refused.
        client.sendall(socks4_request(1, "127.0.0.1", free_port()))
        assert recv_exactly(client, 8) == b"\x00\x5b" + bytes(6)
    for name, reply in (("missing.test", b"\x04\x00\x01" + bytes(6)),
                        (SECRET, b"\x00\x00\x01\x7f\x00\x00\x01\x00\x00")):
        # D, E: RESOLVE of an unknown name, and of a known one.
        with socket.create_connection(socks, timeout=TIMEOUT) as client:
            client.sendall(b"\x05\x01\x00" + socks5_request(0xF0, name, 0))
            assert recv_until_eof(client) == b"\x05\x00\x05" + reply
    page = http(socks, b"GET / HTTP/1.0\r\n\r\n")      # F: HTTP to SOCKS
    assert page.startswith(b"HTTP/1.0 501")
    socket.create_connection(socks, timeout=TIMEOUT).close()   # G
    with socket.create_connection(socks, timeout=TIMEOUT) as client:
        client.sendall(b"\x05\x01\x00")                 # H: then gone
        assert recv_exactly(client, 2) == b"\x05\x00"
    wait_until_idle(server)
    after = samples(scrape(server)[1])
    changed = {series: after[series] - before.get(series, 0.0)
               for series in after if after[series] != before.get(series)}
    for series in list(changed):
        if series.startswith(("process_", "torsocksd_handshake_seconds")):
            del changed[series]
    assert changed == {
        connections(("socks5", "connect", "success")): 2,
        connections(("socks4", "connect", "refused")): 1,
        connections(("socks5", "resolve", "refused")): 1,
        connections(("socks5", "resolve", "success")): 1,
        connections(("http", "none", "refused")): 1,
        connections(("none", "none", "failed")): 1,
        connections(("socks5", "none", "failed")): 1,
        'torsocksd_bytes_total{direction="up"}': 9,
        'torsocksd_bytes_total{direction="down"}': 9 + len(page),
        'torsocksd_lookups_total{result="answered"}': 2,
        'torsocksd_lookups_total{result="not_found"}': 1,
    }
    # Six of them got a reply that ended the handshake.
    assert after["torsocksd_handshake_seconds_count"] \
        - before["torsocksd_handshake_seconds_count"] == 6
    assert after['torsocksd_handshake_seconds_bucket{le="+Inf"}'] == \
        after["torsocksd_handshake_seconds_count"]
    assert after["torsocksd_connections_open"] == 0
    assert after["torsocksd_lookups_pending"] == 0
    body = scrape(server)[1]
    assert SECRET not in body and "missing" not in body


def test_open_tunnels_bytes_and_gauges(make_server, echo_server):
    server = make_server(metrics=[("127.0.0.1", 0)], max_connections=1,
                         resolver=FakeResolver())
    with open_socks5_tunnel(server.address, "127.0.0.1",
                            echo_server.port) as tunnel:
        tunnel.sendall(b"x" * 1000)
        assert recv_exactly(tunnel, 1000) == b"x" * 1000
        with socket.create_connection(server.address, timeout=TIMEOUT) \
                as waiting:
            waiting.sendall(b"\x05\x01\x00")
            # The full server pauses its SOCKS listener, not the scrape.
            deadline = time.monotonic() + TIMEOUT
            while time.monotonic() < deadline:
                now = samples(scrape(server)[1])
                if now["torsocksd_listener_paused"]:
                    break
                time.sleep(0.01)
            assert now["torsocksd_listener_paused"] == 1
            assert now["torsocksd_connections_open"] == 1
            assert now['torsocksd_bytes_total{direction="up"}'] == 1000
            assert now['torsocksd_bytes_total{direction="down"}'] == 1000
        tunnel.shutdown(socket.SHUT_WR)
        assert recv_until_eof(tunnel) == b""
    wait_until_idle(server)
    now = samples(scrape(server)[1])
    assert now["torsocksd_listener_paused"] == 0
    assert now['torsocksd_bytes_total{direction="up"}'] == 1000


def test_reloads_and_errors_are_counted(make_server):
    server = make_server(metrics=[("127.0.0.1", 0)], resolver=FakeResolver(),
                         handshake_timeout=0.2)
    server.reload(idle_timeout=5.0)
    with pytest.raises(torsocksd.ConfigError):
        server.reload(listen=[("0.0.0.0", 0)])
    with socket.create_connection(server.address, timeout=TIMEOUT) as client:
        client.sendall(b"\x05\x01\x00")     # then silence: the deadline
        assert recv_exactly(client, 2) == b"\x05\x00"
        assert recv_until_eof(client) == b"\x05\x01\x00\x01" + bytes(6)
    wait_until_idle(server)
    now = samples(scrape(server)[1])
    assert now['torsocksd_reloads_total{result="success"}'] == 1
    assert now['torsocksd_reloads_total{result="failure"}'] == 1
    assert now['torsocksd_errors_total{kind="timeout"}'] == 1
    assert now[connections(("socks5", "none", "refused"))] == 1


def test_http_answers(make_server):
    server = make_server(metrics=[("127.0.0.1", 0)], resolver=FakeResolver())
    headers, body = scrape(server)
    assert headers["Content-Type"] == "text/plain; version=0.0.4"
    assert headers["Connection"] == "close"
    where = metrics_address(server)
    head = http(where, b"HEAD /metrics HTTP/1.1\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert head.endswith(b"\r\n\r\n")
    assert int(re.search(rb"Content-Length: (\d+)", head).group(1)) > 1000
    assert http(where, b"GET /other HTTP/1.1\r\n\r\n").startswith(
        b"HTTP/1.1 404 Not Found\r\n")
    assert http(where, b"DELETE /metrics HTTP/1.1\r\n\r\n").startswith(
        b"HTTP/1.1 405 Method Not Allowed\r\n")
    assert http(where, b"x" * 9000).startswith(
        b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
    # One request per connection: a second one is never answered.
    twice = http(where, GET + b"GET /other HTTP/1.1\r\n\r\n")
    assert twice.count(b"HTTP/1.1 ") == 1 and b"200 OK" in twice


def test_slow_or_too_many_scrapers_are_cut(make_server, monkeypatch):
    monkeypatch.setattr(torsocksd, "METRICS_EXCHANGE_TIMEOUT", 0.2)
    monkeypatch.setattr(torsocksd, "MAX_METRICS_EXCHANGES", 2)
    server = make_server(metrics=[("127.0.0.1", 0)], resolver=FakeResolver())
    where = metrics_address(server)
    slow = [socket.create_connection(where, timeout=TIMEOUT)
            for _ in range(2)]
    try:
        slow[0].sendall(b"GET /metr")
        deadline = time.monotonic() + TIMEOUT
        while len(server._metrics_exchanges) < 2 \
                and time.monotonic() < deadline:
            time.sleep(0.01)
        with socket.create_connection(where, timeout=TIMEOUT) as third:
            assert recv_until_eof(third) == b""     # closed at accept
        for sock in slow:
            assert recv_until_eof(sock) == b""      # cut at the deadline
    finally:
        for sock in slow:
            sock.close()
    assert samples(scrape(server)[1])  # and the next scrape is served


def test_metrics_listener_needs_allow_beyond_loopback(make_server):
    with pytest.raises(torsocksd.ConfigError) as refused:
        make_server(metrics=[("0.0.0.0", 0)], resolver=FakeResolver())
    assert "refusing to serve metrics on 0.0.0.0:" in str(refused.value)
    with pytest.raises(torsocksd.ConfigError):     # --deny is not enough
        make_server(metrics=[("0.0.0.0", 0)], resolver=FakeResolver(),
                    client_policy=[(False, "192.0.2.0/24")])
    server = make_server(metrics=[("0.0.0.0", 0)], resolver=FakeResolver(),
                         client_policy=[(True, "127.0.0.0/8")])
    port = metrics_address(server)[1]
    assert http(("127.0.0.1", port), GET).startswith(b"HTTP/1.1 200 OK")
    server.reload(client_policy=[(True, "127.0.0.1"),
                                 (False, "127.0.0.0/8")])
    # The client rules apply to scrapers too: 127.0.0.2 is not let in (a
    # close, or a reset for the request it sent).
    with socket.socket() as client:
        client.settimeout(TIMEOUT)
        client.bind(("127.0.0.2", 0))
        client.connect(("127.0.0.1", port))
        client.sendall(GET)
        try:
            assert recv_until_eof(client) == b""
        except ConnectionResetError:
            pass


def test_metrics_listener_is_reloaded_like_the_others(make_server):
    first, second = free_port(), free_port()
    server = make_server(metrics=[("127.0.0.1", first)],
                         resolver=FakeResolver())
    report = server.reload(metrics=[("127.0.0.1", second)])
    assert report.opened == ["127.0.0.1:%d (metrics)" % second]
    assert report.closed == ["127.0.0.1:%d (metrics)" % first]
    assert http(("127.0.0.1", second), GET).startswith(b"HTTP/1.1 200 OK")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", first), timeout=TIMEOUT)


def test_metrics_option_takes_tcp_only():
    result = subprocess.run([sys.executable, SCRIPT, "--metrics",
                             "unix:/tmp/m.sock"], stderr=subprocess.PIPE,
                            universal_newlines=True, timeout=TIMEOUT)
    assert result.returncode == 2
    assert "served over TCP only" in result.stderr


# -- promtool, and a real Prometheus ---------------------------------------------

def test_promtool_accepts_the_page(make_server, echo_server, tmp_path):
    promtool = require_program("promtool")
    server = make_server(metrics=[("127.0.0.1", 0)],
                         resolver=FakeResolver({"x.test": ["127.0.0.1"]}))
    with open_socks5_tunnel(server.address, "x.test", echo_server.port) \
            as tunnel:
        tunnel.sendall(b"data")
        assert recv_exactly(tunnel, 4) == b"data"
    wait_until_idle(server)
    _, body = scrape(server)
    assert 'outcome="success"} 1' in body
    page = tmp_path / "metrics.txt"
    page.write_text(body)
    with open(str(page)) as stdin:
        result = subprocess.run([promtool, "check", "metrics"], stdin=stdin,
                                stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT,
                                universal_newlines=True, timeout=TIMEOUT)
    assert (result.returncode, result.stdout) == (0, "")


def test_a_real_prometheus_scrapes_it_in_a_network_namespace():
    """Prometheus scrapes torsocksd --metrics on a non-loopback test
    address (192.0.2.1, let in by --allow) in a loopback-only network
    namespace, and its HTTP API reports exactly the connections and
    lookups made (tests/peers/prometheus_scrape.py)."""
    require_network_namespace()
    require_program("prometheus")
    run_peer_checks("prometheus_scrape.py", timeout=180)


# -- with --workers: one page for all of them --------------------------------------

def scrape_daemon(port):
    with socket.create_connection(("127.0.0.1", port),
                                  timeout=TIMEOUT) as client:
        client.sendall(GET)
        response = recv_until_eof(client)
    assert response.startswith(b"HTTP/1.1 200 OK\r\n")
    return samples(response.partition(b"\r\n\r\n")[2].decode())


def refused_connects(port, count):
    for _ in range(count):
        with socket.create_connection(("127.0.0.1", port),
                                      timeout=TIMEOUT) as client:
            client.sendall(b"\x05\x01\x00" + socks5_request(
                1, "127.0.0.1", free_port()))
            assert recv_exactly(client, 12) == b"\x05\x00\x05\x05\x00\x01" \
                + bytes(6)
            assert recv_until_eof(client) == b""


REFUSED = 'torsocksd_connections_total{version="socks5",command="connect",' \
          'outcome="refused"}'


def wait_for_sample(port, series, expected):
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        value = scrape_daemon(port).get(series)
        if value == expected:
            return
        assert value is None or value < expected, value
        time.sleep(0.02)
    raise AssertionError("%s stayed at %r, not %r" % (series, value,
                                                      expected))


def test_workers_numbers_add_up_across_a_worker_restart(notify):
    """Every scrape shows every worker's numbers (summed); a worker that
    dies and is replaced leaves its counts behind, so no counter drops."""
    socks, metrics = free_port(), free_port()
    ready = notify()
    daemon = Child([sys.executable, SCRIPT, "--listen", "127.0.0.1:%d" % socks,
                    "--metrics", "127.0.0.1:%d" % metrics, "--workers", "2"],
                   env=ready.env())
    ready.wait_ready()
    refused_connects(socks, 8)
    wait_for_sample(metrics, REFUSED, 8)
    victim = int(re.search(r"torsocksd\[(\d+)\] INFO conn ",
                           daemon.wait_for(" INFO conn ")).group(1))
    os.kill(victim, signal.SIGKILL)
    daemon.wait_for("worker %d ended" % victim)
    daemon.wait_for("worker listening for metrics on 127.0.0.1:%d" % metrics)
    for _ in range(20):     # whichever worker answers
        assert scrape_daemon(metrics)[REFUSED] == 8
    refused_connects(socks, 2)
    wait_for_sample(metrics, REFUSED, 10)
    page = scrape_daemon(metrics)
    assert page["process_open_fds"] > 10     # three processes' worth
    daemon.process.send_signal(signal.SIGINT)
    assert daemon.finish() == 0


def test_http_tunnel_and_udp_clients_have_their_own_labels(make_server,
                                                           echo_server):
    """A --http-tunnel client counts as version http_connect (apart from
    HTTP spoken to the SOCKS port); a UDP association as udp_associate."""
    server = make_server(metrics=[("127.0.0.1", 0)],
                         http_tunnel=[("127.0.0.1", 0)], enable_udp=True,
                         resolver=FakeResolver({SECRET: ["127.0.0.1"]}))
    socks, tunnel_port = server.addresses[:2]
    before = samples(scrape(server)[1])
    head = b"CONNECT %s:%d HTTP/1.1\r\n\r\n" % (SECRET.encode(),
                                                echo_server.port)
    with socket.create_connection(tunnel_port, timeout=TIMEOUT) as client:
        client.sendall(head + b"x")
        client.shutdown(socket.SHUT_WR)
        assert recv_until_eof(client).endswith(b"\r\n\r\nx")
    refused = http(tunnel_port,
                   b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert refused.startswith(b"HTTP/1.0 405 ")
    with socket.create_connection(socks, timeout=TIMEOUT) as client:
        client.sendall(b"\x05\x01\x00" + b"\x05\x03\x00\x01" + bytes(6))
        reply = recv_exactly(client, 12)
        assert reply[:6] == b"\x05\x00\x05\x00\x00\x01"
    wait_until_idle(server)
    after = samples(scrape(server)[1])
    for labels in (("http_connect", "connect", "success"),
                   ("http_connect", "none", "refused"),
                   ("socks5", "udp_associate", "success")):
        series = connections(labels)
        assert after.get(series, 0) - before.get(series, 0) == 1, series
    assert SECRET not in scrape(server)[1]
