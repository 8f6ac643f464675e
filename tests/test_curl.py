"""End to end: real curl through torsocksd to a local HTTP server.

curl speaks every SOCKS flavour a user picks from its command line; each
must fetch the same bytes as a direct fetch.  Only 127.0.0.1 and localhost.
"""

import hashlib
import http.server
import os
import subprocess
import threading

import pytest

from conftest import each_relay_mode, require_program

# A fetch runs over both relays (@each_relay_mode); a refusal and the HTTP
# page never reach the relay and run once.

BODY = os.urandom(300_000)


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def http_origin():
    origin = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=origin.serve_forever, daemon=True)
    thread.start()
    yield origin.server_address[1]
    origin.shutdown()
    origin.server_close()
    thread.join()


def curl(*args):
    path = require_program("curl")
    return subprocess.run([path, "--silent", "--show-error", "--max-time", "20",
                           "--noproxy", "", *args],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          timeout=30)


@each_relay_mode
@pytest.mark.parametrize("proxy_option, host", [
    ("--socks4", "127.0.0.1"),
    ("--socks4", "localhost"),          # curl resolves locally for SOCKS4
    ("--socks4a", "localhost"),         # torsocksd resolves
    ("--socks5", "127.0.0.1"),
    ("--socks5-hostname", "localhost"),
])
def test_curl_fetches_through_each_socks_flavour(server, http_origin,
                                                 proxy_option, host):
    proxy = "127.0.0.1:%d" % server.address[1]
    result = curl(proxy_option, proxy, "http://%s:%d/" % (host, http_origin))
    assert result.returncode == 0, result.stderr
    assert hashlib.sha256(result.stdout).digest() == \
        hashlib.sha256(BODY).digest()


@each_relay_mode
def test_curl_socks5h_with_username_and_password(server, http_origin):
    # curl offers methods 00 and 02 here; either way the fetch works.
    proxy = "socks5h://user:secret@127.0.0.1:%d" % server.address[1]
    result = curl("-x", proxy, "http://localhost:%d/" % http_origin)
    assert result.returncode == 0, result.stderr
    assert result.stdout == BODY


@each_relay_mode
def test_curl_with_required_credentials(make_server, http_origin):
    import torsocksd
    server = make_server(credentials=torsocksd.Credentials([(b"alice",
                                                              b"s3cret")]))
    port = server.address[1]
    url = "http://localhost:%d/" % http_origin
    good = curl("-x", "socks5h://alice:s3cret@127.0.0.1:%d" % port, url)
    assert good.returncode == 0, good.stderr
    assert good.stdout == BODY
    bad = curl("-x", "socks5h://alice:wrong@127.0.0.1:%d" % port, url)
    assert bad.returncode == 97     # curl: CURLE_PROXY, authentication failed
    assert bad.stdout == b""
    none = curl("--socks5-hostname", "127.0.0.1:%d" % port, url)
    assert none.returncode == 97    # no acceptable method: 05 FF
    assert none.stdout == b""


def test_curl_refused_target_is_reported(server):
    from conftest import free_port
    result = curl("--socks5", "127.0.0.1:%d" % server.address[1],
                  "http://127.0.0.1:%d/" % free_port())
    assert result.returncode == 97
    assert result.stderr.rstrip().endswith(b"(5)")   # REP 05: refused


def test_curl_http_proxy_gets_the_socks_page(server):
    proxy = "http://127.0.0.1:%d" % server.address[1]
    result = curl("-i", "-x", proxy, "http://example.test/")
    head, _, body = result.stdout.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 501 ")
    assert b"Content-Type: text/html; charset=utf-8" in head
    assert b"SOCKS" in body
    assert b"Content-Length: %d" % len(body) in head

    head_only = curl("-I", "-x", proxy, "http://example.test/")
    assert head_only.stdout.startswith(b"HTTP/1.0 501 ")
    assert head_only.stdout.endswith(b"\r\n\r\n")
