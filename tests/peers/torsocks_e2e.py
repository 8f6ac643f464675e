"""Run inside a fresh network namespace (unshare -n): torsocks -> torsocksd.

Brings lo up, adds the test host address 192.0.2.10, serves HTTP there,
starts dnsmasq on 127.0.0.1 knowing web.test, starts torsocksd (in this
process, with its built-in DNS client pointed at that dnsmasq), and has
torsocks run a Python fetch of http://web.test:8000/.  Prints what was
fetched and torsocksd's log lines; exits non-zero on any failure.
"""

import http.server
import logging
import socket
import os
import subprocess
import sys
import tempfile
import threading

# common first: it puts torsocksd and torpeer on sys.path.
from common import add_test_hosts
import torsocksd
from torpeer import find_program

TEST_HOST = "192.0.2.10"


class WebHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = ("hello from %s" % TEST_HOST).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def free_udp_port():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def main():
    add_test_hosts(TEST_HOST)

    web = http.server.ThreadingHTTPServer((TEST_HOST, 8000), WebHandler)
    threading.Thread(target=web.serve_forever, daemon=True).start()

    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    torsocksd.log.addHandler(handler)
    torsocksd.log.setLevel(logging.INFO)

    dns_port = free_udp_port()
    dnsmasq = subprocess.Popen(
        [find_program("dnsmasq"), "--no-daemon", "--no-resolv", "--no-hosts",
         "--listen-address=127.0.0.1", "--port=%d" % dns_port,
         "--bind-interfaces", "--address=/web.test/" + TEST_HOST],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = torsocksd.Server(
        listen=[("127.0.0.1", 0)],
        resolver=torsocksd.DnsResolver([("127.0.0.1", dns_port)]),
        log_destinations=True).start()
    with tempfile.NamedTemporaryFile("w", suffix=".conf") as conf:
        conf.write("TorAddress 127.0.0.1\nTorPort %d\n" % server.address[1])
        conf.flush()
        env = dict(os.environ, TORSOCKS_CONF_FILE=conf.name)
        fetch = ("import urllib.request;"
                 "print(urllib.request.urlopen('http://web.test:8000/',"
                 " timeout=10).read().decode())")
        result = subprocess.run(["torsocks", sys.executable, "-c", fetch],
                                env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, timeout=30,
                                universal_newlines=True)
    server.stop()
    dnsmasq.terminate()
    dnsmasq.wait()
    web.shutdown()
    web.server_close()
    print("fetched: " + result.stdout.strip())
    for line in records:
        print("torsocksd: " + line)
    if result.returncode != 0:
        print(result.stderr, file=sys.stderr)
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
