"""A fixed corpus of HTTP CONNECT corner cases for the differential test
against a real Tor's HTTPTunnelPort.

tests/peers/tor_differential.py replays every Case against Tor 0.4.9
(HTTPTunnelPort) and against torsocksd (--http-tunnel) in one loopback-only
network namespace; tests/test_http_tunnel_differential.py compares the two.
This module is data only; its shapes (Case, Expect, Rule, Corpus) are those
of tests/differential.py.

Tor names itself in two headers, "Via: tor/1.0 tor-network (tor VERSION)" on
answers to CONNECT and "Server: tor/1.0 (tor VERSION)" on the others;
torsocksd sends no Via (its tunnels do not cross the Tor network) and
"Server: torsocksd/VERSION".  Both are taken out of both sides before any
comparison (IDENTITY_FIELDS; the README's "HTTP CONNECT answers" row).

Tor has no network here, so a CONNECT it accepts waits for a circuit; such
cases are `complete`, and torsocksd goes on to answer from its test
resolver or to fail its connect in the namespace.

Where Tor's answers come from (tor commit 3cb6a690be, 0.4.8-dev, which the
stored mirror has; 0.4.9 adds the Tor-Capabilities, Via, Server and
Tor-Request-Failed headers, the Host check and OPTIONS of proposal 365):
src/core/or/connection_edge.c connection_ap_process_http_connect (L3017:
a 400 for a port that does not parse, L3054; 414 for a host of 256 bytes
or more, L3060; the 405 page, L2985), its attach step (port 0, .exit, bad
.onion and bad names: END reason TORPROTOCOL, 502; private addresses:
c-tor/PRIVATE_ADDR, which reasons.c has no status for, so "500 ... (weird
end reason)"), and src/core/or/reasons.c
end_reason_to_http_connect_response_line (L461).
"""

from differential import ECHO_PORT, Corpus, Expect, Rule

IDENTITY_FIELDS = (b"Via:", b"Server:")


def without_identity(data: bytes) -> bytes:
    """data with the header lines that name the software taken out of its
    head (the body, if any, is left alone)."""
    head, separator, body = data.partition(b"\r\n\r\n")
    if not separator or not head.startswith(b"HTTP/"):
        return data
    lines = [line for line in head.split(b"\r\n")
             if not line.startswith(IDENTITY_FIELDS)]
    return b"\r\n".join(lines) + separator + body


def answer(status: bytes, failed: bytes = b"") -> bytes:
    """An answer to a CONNECT as both send it, identity fields taken out."""
    head = b"HTTP/1.0 " + status + b"\r\nTor-Capabilities: \r\n"
    if failed:
        head += b"Tor-Request-Failed: " + failed + b"\r\n"
    return head + b"\r\n"


BAD_REQUEST = answer(b"400 Bad Request")
TOR_PROTOCOL = answer(b"502 Bad Gateway (tor protocol violation)",
                      b"end/TORPROTOCOL")
REFUSED = answer(b"403 Forbidden (connection refused)", b"end/CONNECTREFUSED")
OK = answer(b"200 OK")

# =============================================================================
# Documented differences
# =============================================================================

RULES = (
    Rule("tunnel-page", ("HTTP CONNECT answers",),
         "another method with Host: localhost gets torsocksd's 405 page "
         "(Allow, Content-Length, Connection: close; HEAD: headers only); "
         "Tor's page has no Allow and no length"),
    Rule("options-length", ("HTTP CONNECT answers",),
         "OPTIONS gets Content-Length: 0, as RFC 9110 §9.3.7 requires "
         "(Tor sends none)"),
    Rule("malformed-request", ("HTTP CONNECT: a malformed request",),
         "a request that is not HTTP/1.x (no version, HTTP/2.0, garbage, a "
         "bad header line, a head of 8192 bytes or more) gets 400 and a "
         "close; "
         "Tor closes without a word, or ignores a bad header line"),
    Rule("fail-fast", ("HTTP CONNECT: a malformed request",),
         "bytes that cannot start a request line (SOCKS, TLS) get 400 at "
         "once; Tor waits for the blank line"),
    Rule("connect-content", ("HTTP CONNECT with content",),
         "a CONNECT with a non-zero Content-Length or a Transfer-Encoding "
         "gets 400 (Tor reads that many bytes and drops them)"),
    Rule("port-digits", ("HTTP CONNECT destinations",),
         "the port is digits only: +80 gets 400 (Tor reads it as 80)"),
    Rule("hostname-rule", ("HTTP CONNECT destinations",),
         "the SOCKS hostname rule holds: an empty host or an empty label "
         "gets 502 (tor protocol violation) at once; Tor tries them"),
    Rule("special-names", ("HTTP CONNECT destinations",),
         "every .onion name gets 502 without a lookup (Tor builds a circuit "
         "for a good one)"),
    Rule("local-destinations", ("HTTP CONNECT failures",),
         "a client on loopback may reach local and private addresses: the "
         "connect's own "
         "answer comes back (403 connection refused, or 200 and the "
         "tunnel); Tor refuses them with 500 (weird end reason) and "
         "c-tor/PRIVATE_ADDR"),
)


# =============================================================================
# Names and addresses
# =============================================================================

CLOSED_PORT = 1         # nothing listens here
ECHO_NAME = "echo.test"
# Names torsocksd's test resolver answers; everything else is "not found".
RESOLVER_NAMES = {"localhost": ["127.0.0.1"], ECHO_NAME: ["127.0.0.1"]}

# A valid v3 onion address (the Tor Project's; never reached here).
ONION = b"2gzyxa5ihm7nsggfxnu52rck2vv4rvmdlkiu3zzui5du4xyclen53wid.onion"
HOST_255 = b"a" * 251 + b".com"
HOST_256 = b"b" + HOST_255
assert len(HOST_255) == 255 and len(HOST_256) == 256


def connect(target: bytes, version: bytes = b"HTTP/1.1",
            fields: bytes = b"") -> bytes:
    return b"CONNECT " + target + b" " + version + b"\r\n" + fields + b"\r\n"


def request(method: bytes, target: bytes = b"/", host: bytes = None,
            fields: bytes = b"") -> bytes:
    head = method + b" " + target + b" HTTP/1.1\r\n"
    if host is not None:
        head += b"Host: " + host + b"\r\n"
    return head + fields + b"\r\n"


# =============================================================================
# The corpus
# =============================================================================

CORPUS = Corpus(__name__, "http_tunnel", RULES, RESOLVER_NAMES)
table = CORPUS.add_table

# --- Other methods: only with Host: localhost is there an answer -------------

PAGE = Expect(page="GET")       # torsocksd's 405 page
LENGTH_0 = b"Content-Length: 0\r\n"
OPTIONS_ANSWER = (b"HTTP/1.0 200 OK\r\nAllow: OPTIONS, CONNECT\r\n"
                  b"Content-Length: 0\r\nTor-Capabilities: \r\n\r\n")
table(rules="tunnel-page", rows=(
    ("get-foreign-host", request(b"GET", host=b"example.com")),
    ("get-absolute-foreign-host",
     request(b"GET", b"http://example.com/", b"example.com")),
    ("get-no-host", b"GET / HTTP/1.0\r\n\r\n"),
    ("get-host-127", request(b"GET", host=b"127.0.0.1")),
    ("get-host-ipv6", request(b"GET", host=b"[::1]")),
    ("get-foreign-then-localhost",
     request(b"GET", host=b"example.com", fields=b"Host: localhost\r\n")),
    ("options-foreign-host", request(b"OPTIONS", b"*", b"example.com")),
    ("post-foreign-host",
     request(b"POST", host=b"example.com", fields=LENGTH_0)),
    ("get-localhost", request(b"GET", b"/", b"localhost", LENGTH_0), PAGE),
    ("get-absolute-localhost",
     request(b"GET", b"http://example.com/", b"localhost", LENGTH_0), PAGE),
    ("post-localhost", request(b"POST", b"/", b"localhost", LENGTH_0), PAGE),
    ("lowercase-get-localhost",
     request(b"get", b"/", b"localhost", LENGTH_0), PAGE),
    ("get-localhost-port", request(b"GET", host=b"LOCALHOST:9080"), PAGE),
    ("get-localhost-then-foreign",
     request(b"GET", host=b"localhost", fields=b"Host: example.com\r\n"),
     PAGE),
    ("head-localhost", request(b"HEAD", host=b"localhost"),
     Expect(page="HEAD")),
    ("options-star-localhost", request(b"OPTIONS", b"*", b"localhost"),
     "options-length", OPTIONS_ANSWER),
    ("options-slash-localhost", request(b"OPTIONS", b"/", b"localhost"),
     "options-length", OPTIONS_ANSWER)))

# --- Request lines that are not HTTP/1.x -------------------------------------

table(rules="malformed-request", expect=BAD_REQUEST, rows=(
    ("garbage", b"garbage\r\n\r\n"),
    ("connect-alone", b"CONNECT\r\n\r\n"),
    ("no-version", b"CONNECT example.com:80\r\n\r\n"),
    ("http-2", connect(b"example.com:80", b"HTTP/2.0")),
    ("http-lowercase", connect(b"example.com:80", b"http/1.0")),
    ("empty-line-first", b"\r\n" + connect(b"example.com:80")),
    ("four-words", b"CONNECT a b HTTP/1.1\r\n\r\n"),
    ("socks5-greeting", b"\x05\x01\x00", "fail-fast", BAD_REQUEST),
    ("socks4-header", b"\x04\x01\x00\x50\x01\x02\x03\x04", "fail-fast",
     BAD_REQUEST),
    ("tls-hello", bytes.fromhex("16030100c8010000c40303"), "fail-fast",
     BAD_REQUEST),
    ("field-no-colon", connect(b"example.com:80",
                               fields=b"bad header line\r\n")),
    ("field-space-before-colon", connect(b"example.com:80",
                                         fields=b"Host : x\r\n")),
    ("field-folded", connect(b"example.com:80",
                             fields=b"X-A: 1\r\n folded\r\n"))))

# --- Accepted heads: Tor waits for a circuit ---------------------------------


def padded_head(size: int) -> bytes:
    """A CONNECT head of size bytes."""
    head = connect(b"example.com:443")
    return connect(b"example.com:443", fields=b"X-Pad: " + b"p" * (
        size - len(head) - 9) + b"\r\n")


HEAD_8191 = padded_head(8191)       # the most Tor takes, and torsocksd
assert len(HEAD_8191) == 8191
HEAD_8193 = padded_head(8193)

table(prefix="connect-", complete=True, rows=(
    ("http-1.0", connect(b"example.com:443", b"HTTP/1.0")),
    ("http-1.1", connect(b"example.com:443")),
    ("http-1.9", connect(b"example.com:443", b"HTTP/1.9")),
    ("lowercase-connect", b"connect example.com:443 HTTP/1.1\r\n\r\n"),
    ("double-spaces", b"CONNECT  example.com:443  HTTP/1.1\r\n\r\n"),
    ("port-leading-zero", connect(b"example.com:0443")),
    ("trailing-dot", connect(b"example.com.:443")),
    ("100-fields", connect(b"example.com:443", fields=b"".join(
        b"X-F%d: v\r\n" % i for i in range(100)))),
    ("head-8191", HEAD_8191),
    ("content-length-0", connect(b"example.com:443", fields=LENGTH_0)),
    ("proxy-authorization", connect(
        b"example.com:443", fields=b"Proxy-Authorization: Basic eDp5\r\n")),
    ("stream-isolation", connect(
        b"example.com:443", fields=b"X-Tor-Stream-Isolation: a\r\n")),
    ("host-field", connect(b"example.com:443",
                           fields=b"Host: example.com:443\r\n")),
    ("public-ipv4", connect(b"1.2.3.4:443")),
    ("public-ipv6", connect(b"[2001:db8::1]:443")),
    ("host-255", connect(HOST_255 + b":443")),
    ("split", (b"CONN", b"ECT example.com", b":443 HTTP/1.1\r\n", b"\r\n")),
    ("early-data",
     connect(b"%s:%d" % (ECHO_NAME.encode(), ECHO_PORT)) + b"ping")))
table(rules="malformed-request", expect=BAD_REQUEST, rows=(
    ("head-8192", padded_head(8192)),
    ("head-8193-in-two", (HEAD_8193[:8000], HEAD_8193[8000:]))))

# --- CONNECT targets Tor refuses ---------------------------------------------

RPC_TARGET = b"Tor-RPC-Target: x\r\n"
table(prefix="connect-", rows=(
    ("no-port", connect(b"example.com")),
    ("ipv6-bare", connect(b"::1")),
    ("ipv6-bare-with-port", connect(b"2001:db8::1:80")),
    ("ipv6-brackets-no-port", connect(b"[2001:db8::1]")),
    ("onion-bad", connect(b"x.onion:80")),
    ("exit", connect(b"example.com.exit:80")),
    ("userinfo", connect(b"user@example.com:80")),
    ("percent", connect(b"a%20b:80")),
    ("brackets-name", connect(b"[example.com]:80")),
    ("brackets-ipv4", connect(b"[1.2.3.4]:80")),
    ("port-0", connect(b"example.com:0")),
    ("port-65536", connect(b"example.com:65536")),
    ("port-abc", connect(b"example.com:abc")),
    ("port-empty", connect(b"example.com:")),
    ("ipv4-port-0", connect(b"1.2.3.4:0")),
    ("host-256-port-0", connect(HOST_256 + b":0")),
    ("port-plus", connect(b"example.com:+80"), "port-digits", BAD_REQUEST),
    ("host-256", connect(HOST_256 + b":80")),
    ("host-256-no-port", connect(HOST_256)),
    ("rpc-target", connect(b"example.com:80", fields=RPC_TARGET)),
    ("rpc-target-no-port", connect(b"example.com", fields=RPC_TARGET)),
    ("rpc-target-port-0", connect(b"example.com:0", fields=RPC_TARGET)),
    ("empty-host", connect(b":80"), "hostname-rule", TOR_PROTOCOL),
    ("empty-label", connect(b"a..b:80"), "hostname-rule", TOR_PROTOCOL),
    ("onion-v3", connect(ONION + b":80"), "special-names", TOR_PROTOCOL),
    ("content-length", connect(b"example.com:443",
                               fields=b"Content-Length: 5\r\n") + b"hello",
     "connect-content", BAD_REQUEST),
    ("chunked", connect(b"example.com:443",
                        fields=b"Transfer-Encoding: chunked\r\n"),
     "connect-content", BAD_REQUEST)))

# --- Local destinations: Tor refuses them, torsocksd's loopback client may ---

table(prefix="connect-", rules="local-destinations", rows=(
    ("loopback-closed", connect(b"127.0.0.1:%d" % CLOSED_PORT, b"HTTP/1.0"),
     REFUSED),
    ("ipv6-loopback-closed", connect(b"[::1]:%d" % CLOSED_PORT, b"HTTP/1.0"),
     REFUSED),
    ("localhost-closed", connect(b"localhost:%d" % CLOSED_PORT, b"HTTP/1.0"),
     REFUSED),
    ("loopback-echo", connect(b"127.0.0.1:%d" % ECHO_PORT) + b"ping",
     Expect(OK + b"ping", False)),
    ("private-10", connect(b"10.0.0.1:80", b"HTTP/1.0"),
     answer(b"503 Service Unavailable (no route)", b"end/NOROUTE"))))
