"""Run inside a fresh network namespace (unshare -n), as root: a real
Prometheus server scrapes torsocksd's metrics page and reports, through its
HTTP API, exactly the connections and lookups this script made.

Brings lo up and adds the test host address 192.0.2.1/32 to it.  torsocksd
(a child process) listens for SOCKS on 127.0.0.1 and serves its metrics on
192.0.2.1, which other hosts could reach: it must refuse that without
--allow, and start with --allow 192.0.2.1 (the scraper's address: a
connection to a local address comes from that address).  Names go to a
small name server of the script's own on 127.0.0.1 (--nameserver), which
knows echo.test and nothing else.  Prometheus scrapes every 100 ms.  The
script makes 3 CONNECTs to an echo server by name (3 lookups), 2 by IP
literal, and 1 RESOLVE of a name that does not exist; then it asks
Prometheus, until the numbers settle, for
sum(torsocksd_connections_total), the lookups by result, the bytes, and
up{job="torsocksd"}.

Prints one line per check and exits non-zero if any fails.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import struct
import tempfile
import threading
import time
import urllib.parse
import urllib.request

# common first: it puts conftest on sys.path.
from common import (SCRIPT, TIMEOUT, Daemon, add_test_hosts, check,
                    finish)
from conftest import (EchoServer, free_port, open_socks5_tunnel,
                      recv_exactly, recv_until_eof, socks5_request)

HOST = "192.0.2.1"


class NameServer:
    """UDP on 127.0.0.1: echo.test A is 127.0.0.1 (TTL 0), every other
    name is NXDOMAIN, AAAA has no record."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.address = self.sock.getsockname()
        self.done = False
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        while not self.done:
            try:
                query, peer = self.sock.recvfrom(512)
            except socket.timeout:
                continue
            end = query.index(b"\0", 12) + 5
            name = query[12:end - 5]
            qtype = struct.unpack("!H", query[end - 4:end - 2])[0]
            known = name == b"\x04echo\x04test"
            answer = b""
            if known and qtype == 1:
                answer = (b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 0, 4)
                          + socket.inet_aton("127.0.0.1"))
            flags = 0x8180 if known else 0x8183     # NOERROR / NXDOMAIN
            self.sock.sendto(query[:2] + struct.pack(
                "!HHHHH", flags, 1, 1 if answer else 0, 0, 0)
                + query[12:end] + answer, peer)

    def close(self):
        self.done = True
        self.thread.join(TIMEOUT)
        self.sock.close()


def query(port, expression):
    """The value of expression now, from Prometheus's HTTP API (None while
    it has no sample)."""
    url = "http://127.0.0.1:%d/api/v1/query?%s" % (
        port, urllib.parse.urlencode({"query": expression}))
    with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
        answer = json.load(response)
    assert answer["status"] == "success", answer
    result = answer["data"]["result"]
    return float(result[0]["value"][1]) if result else None


def wait_for_value(port, expression, expected, seconds=30.0):
    deadline = time.monotonic() + seconds
    value = None
    while time.monotonic() < deadline:
        value = query(port, expression)
        if value == expected:
            break
        time.sleep(0.1)
    check("%s == %s" % (expression, expected), value == expected,
          "Prometheus says %r" % value)


def main():
    add_test_hosts(HOST)
    socks_port, metrics_port = free_port(), free_port()
    names = NameServer()
    arguments = ["--listen", "127.0.0.1:%d" % socks_port,
                 "--metrics", "%s:%d" % (HOST, metrics_port),
                 "--nameserver", "127.0.0.1:%d" % names.address[1]]
    refused = subprocess.run([sys.executable, SCRIPT, *arguments],
                             stderr=subprocess.PIPE,
                             universal_newlines=True, timeout=TIMEOUT)
    check("a metrics page other hosts can reach needs --allow",
          refused.returncode == 64
          and "refusing to serve metrics on %s:%d without --allow"
          % (HOST, metrics_port) in refused.stderr, refused.stderr)
    daemon = Daemon(*arguments, "--allow", HOST, "--allow", "127.0.0.1",
                    ready="listening for metrics on")
    folder = tempfile.mkdtemp(prefix="torsocksd-prometheus-")
    prometheus = None
    echo = EchoServer()
    try:
        api_port = free_port()
        config = os.path.join(folder, "prometheus.yml")
        with open(config, "w") as file:
            file.write(
                "global:\n"
                "  scrape_interval: 100ms\n"
                "  scrape_timeout: 100ms\n"
                "scrape_configs:\n"
                "  - job_name: torsocksd\n"
                "    static_configs:\n"
                "      - targets: ['%s:%d']\n" % (HOST, metrics_port))
        prometheus = subprocess.Popen(
            ["prometheus", "--config.file=" + config,
             "--storage.tsdb.path=" + os.path.join(folder, "data"),
             "--web.listen-address=127.0.0.1:%d" % api_port,
             "--log.level=error"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(
                        "http://127.0.0.1:%d/-/ready" % api_port,
                        timeout=TIMEOUT) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.1)
        wait_for_value(api_port, 'up{job="torsocksd"}', 1.0)
        wait_for_value(api_port, "sum(torsocksd_connections_total)", None)

        socks = ("127.0.0.1", socks_port)
        payload = b"scraped"
        for host in ("echo.test", "echo.test", "echo.test", "127.0.0.1",
                     "127.0.0.1"):
            with open_socks5_tunnel(socks, host, echo.port) as tunnel:
                tunnel.sendall(payload)
                assert recv_exactly(tunnel, len(payload)) == payload
        with socket.create_connection(socks, timeout=TIMEOUT) as client:
            client.sendall(b"\x05\x01\x00"
                           + socks5_request(0xF0, "nowhere.invalid", 0))
            assert recv_until_eof(client)[:4] == b"\x05\x00\x05\x04"

        wait_for_value(api_port, "sum(torsocksd_connections_total)", 6.0)
        wait_for_value(api_port, 'torsocksd_connections_total{version='
                       '"socks5",command="connect",outcome="success"}', 5.0)
        wait_for_value(api_port, 'torsocksd_connections_total{version='
                       '"socks5",command="resolve",outcome="refused"}', 1.0)
        wait_for_value(api_port, 'torsocksd_lookups_total{result='
                       '"answered"}', 3.0)
        wait_for_value(api_port, 'torsocksd_lookups_total{result='
                       '"not_found"}', 1.0)
        wait_for_value(api_port, 'torsocksd_bytes_total{direction="up"}',
                       5.0 * len(payload))
        wait_for_value(api_port, 'torsocksd_handshake_seconds_count', 6.0)
        wait_for_value(api_port, "torsocksd_connections_open", 0.0)
        resident = query(api_port, "process_resident_memory_bytes")
        check("process_resident_memory_bytes is there",
              resident is not None and resident > 1e6, repr(resident))
    finally:
        echo.close()
        names.close()
        if prometheus is not None:
            prometheus.terminate()
            prometheus.wait(TIMEOUT)
        daemon.stop()
        shutil.rmtree(folder)
    return finish()


if __name__ == "__main__":
    sys.exit(main())
