"""A fixed corpus of SOCKS corner cases for the differential test against Tor.

tests/peers/tor_differential.py replays every Case against a real Tor 0.4.9
SocksPort and against torsocksd, in one loopback-only network namespace;
tests/test_tor_differential.py compares the two outcomes.  This module is
data only: the cases, and the documented differences (Rule) with the bytes
torsocksd must send instead of Tor's; its shapes (Case, Expect, Rule,
Corpus) are those of tests/differential.py.

A Case is a list of byte chunks sent in turn (0.1 s apart unless pauses say
otherwise).  An outcome is what the server sent back and whether it closed.
Tor here has no network, so it never builds a circuit: a request that needs
one (a CONNECT to a public address, a RESOLVE of a name) just waits.  Such
cases are marked `complete`; for them only what Tor sent before it started
waiting is compared (torsocksd goes on to answer from its test resolver, or
to fail its connect in the namespace).

Tor's hostname rule, which the hostname cases below probe clause by clause
(tor `src/lib/net/address.c` string_is_valid_dest, at the commit the GitHub
mirror stops at, 3cb6a690be, L2155, and string_is_valid_nonrfc_hostname
L2188; IP parsing in `src/lib/net/inaddr.c` tor_inet_aton L40 and
tor_inet_pton L187):

  D1  empty -> invalid
  D2  "[" ... "]" around the whole string is removed first, whatever is
      inside (so "[1.2.3.4]" and "[name]" pass this stage)
  D3  an IPv4 literal: exactly four dot-separated decimal numbers of at most
      three digits, each <= 255, no leading zero, nothing after
  D4  an IPv6 literal by tor's own parser: "::" at most once, at most four
      hex digits per group, an embedded dotted quad at the end (leading
      zeros allowed there), no needless trailing ":", no "%scope"
  H1  otherwise a hostname: split at "."; one trailing empty label (a
      trailing dot) is dropped, any other empty label is invalid
  H2  each label starts with neither "-" nor "_"
  H3  each label is ASCII letters, digits, "-" and "_" only (no length
      limit per label, digits-only labels allowed)
  Before all this the SOCKS5 parser cuts an ATYP 3 name at its first NUL
  (strlcpy in parse_socks5_client_request), and a SOCKS4A name ends at its
  NUL anyway.  Later, at the attach stage, tor refuses "[...]" around
  anything but IPv6 (address_is_invalid_destination), ".exit" names, bad
  ".onion" names, port 0 and private addresses
  (connection_ap_handshake_rewrite_and_attach in src/core/or/
  connection_edge.c).

Documented differences cite the rows of the README's table "Where
torsocksd differs from Tor" by their "case" text (Rule.readme).
"""

import ipaddress
from typing import Optional

from differential import ECHO_PORT, Corpus, Expect, Rule

BYTEWISE_PAUSE = 0.02   # seconds between the bytes of a message sent bytewise


# =============================================================================
# Documented differences
# =============================================================================

RULES = {rule.name: rule for rule in (
    Rule("method-choice", ("SOCKS5 method choice without credentials",),
         "offered 00 and 02 without configured credentials, torsocksd picks "
         "00 (Tor 02); an RFC 1929 message after 00 still gets 01 00"),
    Rule("rfc1928-codes", ("unknown SOCKS5 command / address type",),
         "an unknown SOCKS5 command gets 07 and an unknown address type 08 "
         "(Tor 01); the command is checked first, so BIND or an unknown "
         "command with a bad address type gets 07"),
    Rule("resolve-failure", ("RESOLVE failure (SOCKS5)",),
         "a failed RESOLVE or RESOLVE_PTR is answered 05 04 00 01 and six "
         "zero bytes (Tor: ATYP 00)"),
    Rule("every-reply", ("several messages in one segment",),
         "every message in one segment gets its reply, in order (Tor keeps "
         "only the last reply)"),
    Rule("socks4-after-greeting", ("SOCKS4 request after a SOCKS5 greeting",),
         "a SOCKS4 request after a SOCKS5 greeting gets 01 (Tor answers "
         "it as SOCKS4)"),
    Rule("not-socks5-after-greeting",
         ("anything but the next SOCKS5 message after a greeting",),
         "HTTP, TLS or garbage after a SOCKS5 greeting gets 01 (Tor sends "
         "its HTTP page for G, H, P, C there)"),
    Rule("nul-in-name", ("NUL inside a hostname",),
         "a hostname with a NUL is refused with 01 (Tor cuts the name at "
         "the NUL and goes on); RESOLVE_PTR and BIND check their command "
         "first and answer 08 and 07 as for any bad name"),
    Rule("http-page", ("HTTP to the SOCKS port",),
         "HTTP gets torsocksd's own 501 page (Content-Length, Connection: "
         "close, no trailing NUL, HEAD: headers only), also for O, D, T; "
         "to tell HEAD from the rest it waits for up to five bytes"),
    Rule("local-destinations", ("private destinations",),
         "a client on loopback may connect to private and local addresses "
         "(Tor refuses them with 01): the connect's own error comes back"),
    Rule("connect-dir", ("CONNECT_DIR (0xF2)",),
         "F2 is CONNECT_DIR, a one-hop tunnel to a relay's ORPort (Tor: "
         "unknown command, 01); in the namespace the connect to the relay "
         "fails and that error comes back"),
    Rule("fail-fast", ("a byte that cannot start or continue a message",),
         "a byte that cannot start or continue a valid message is answered "
         "and closed at once (Tor waits for a second byte, SOCKS4 for "
         "eight)"),
    Rule("special-names", ("`.onion` and `.exit` names",),
         "names ending in .onion or .exit are refused with 04 without a "
         "lookup (Tor: 01 for .exit and bad .onion names, a circuit for "
         "good ones)"),
    Rule("refused-name-resolve",
         ("RESOLVE of a name Tor's hostname check refuses",),
         "RESOLVE of a name that Tor's hostname check refuses gets the "
         "RESOLVE failure reply 05 04 00 01 + zeros (Tor: 05 01)"),
    Rule("resolve-ip-literal", ("RESOLVE of an IP literal",),
         "RESOLVE of an IP literal is answered with the literal whatever "
         "its scope (Tor refuses its virtual address ranges, "
         "127.192.0.0/10 and fe80::/10 by default)"),
    Rule("incomplete-at-512", ("an incomplete request of 512 bytes",),
         "an incomplete SOCKS4 request keeps waiting past 512 bytes, up to "
         "the 1024 bytes a whole handshake may take (Tor refuses it once "
         "512 bytes are buffered, however the client split them)"),
    Rule("socks4a-ip-literal", ("SOCKS4A with an IP literal as the name",),
         "a SOCKS4A name that is an IP literal, IPv6 included, is used as "
         "the address (Tor refuses IPv6 there)"),
)}


# =============================================================================
# Wire helpers
# =============================================================================

def r5(code: int) -> bytes:
    """A SOCKS5 reply with a zero IPv4 BND.ADDR and port (10 bytes)."""
    return bytes((5, code, 0, 1)) + bytes(6)


S4_REJECTED = b"\x00\x5b" + bytes(6)
RESOLVE_FAILED = r5(4)          # torsocksd's RESOLVE failure reply

NOAUTH = b"\x05\x01\x00"         # greeting: no authentication
USERPASS = b"\x05\x01\x02"       # greeting: username/password
BOTH = b"\x05\x02\x00\x02"       # greeting: both
AUTH = b"\x01\x04user\x04pass"  # RFC 1929 message

CONNECT, BIND, UDP, RESOLVE, RESOLVE_PTR, CONNECT_DIR = \
    0x01, 0x02, 0x03, 0xF0, 0xF1, 0xF2


def ipv4(text: str) -> bytes:
    return bytes(int(part) for part in text.split("."))


def ipv6(text: str) -> bytes:
    return ipaddress.IPv6Address(text).packed


def port(number: int) -> bytes:
    return number.to_bytes(2, "big")


def s5(command: int, atyp: int, address: bytes, dport: int = 80,
       reserved: int = 0) -> bytes:
    """A SOCKS5 request; for ATYP 3, address is the name (length added)."""
    if atyp == 3:
        address = bytes((len(address),)) + address
    return bytes((5, command, reserved, atyp)) + address + port(dport)


def s5_name(command: int, name: bytes, dport: int = 80) -> bytes:
    return s5(command, 3, name, dport)


def s4(command: int, dport: int, address: bytes, userid: bytes = b"",
       name: Optional[bytes] = None) -> bytes:
    """A SOCKS4 request; with a name, a SOCKS4A one (address 0.0.0.x)."""
    message = bytes((4, command)) + port(dport) + address + userid + b"\0"
    if name is not None:
        message += name + b"\0"
    return message


def s4a(command: int, name: bytes, dport: int = 80,
        userid: bytes = b"") -> bytes:
    return s4(command, dport, b"\0\0\0\x01", userid, name)


def resolved4(address: str) -> bytes:
    return b"\x05\x00\x00\x01" + ipv4(address) + b"\0\0"


# The one request whose answer Tor gives without a circuit: a RESOLVE of an
# IP literal.  Cases that test an earlier step end with it.
PROBE = s5(RESOLVE, 1, ipv4("1.2.3.4"), 0)
PROBE_ANSWER = resolved4("1.2.3.4")
PROBE4 = s4(RESOLVE, 0, ipv4("1.2.3.4"))

# A valid v3 onion address (the Tor Project's; it is never reached here) and
# the same with one character changed, so its checksum fails.
ONION = b"2gzyxa5ihm7nsggfxnu52rck2vv4rvmdlkiu3zzui5du4xyclen53wid.onion"
BAD_CHECKSUM_ONION = b"3" + ONION[1:]

LONG_NAME = b".".join([b"a" * 63] * 3 + [b"b" * 58]) + b".test"   # 255
TOO_LONG_NAME = b"c" + LONG_NAME                                   # 256
assert len(LONG_NAME) == 255 and len(TOO_LONG_NAME) == 256

CLOSED_PORT = 1     # nothing listens on it in the namespace

# Names the test resolver answers (tests/peers/tor_differential.py gives it
# to torsocksd); everything else fails with "not found".
TEST_ADDRESS = "192.0.2.10"
RESOLVER_NAMES = {"localhost": ["127.0.0.1"]}
RESOLVER_REVERSE = {TEST_ADDRESS: "v4.test"}


def _test_name(name: bytes):
    """Register a .test name with the test resolver, as torsocksd may ask
    for it (lower case, without a trailing dot, or as sent)."""
    text = name.decode("ascii", "replace")
    for form in (text, text.rstrip(".")):
        RESOLVER_NAMES[form] = RESOLVER_NAMES[form.lower()] = [TEST_ADDRESS]


# =============================================================================
# The corpus
# =============================================================================

CORPUS = Corpus(__name__, "socks", RULES.values(), RESOLVER_NAMES,
                RESOLVER_REVERSE)
case = CORPUS.add


def bytewise(name, message, rules=(), expect=None, complete=False):
    """message sent one byte at a time."""
    chunks = [message[i:i + 1] for i in range(len(message))]
    case(name, *chunks, pauses=[BYTEWISE_PAUSE] * (len(chunks) - 1),
         rules=rules, expect=expect, complete=complete)


# --- First byte: version detection -------------------------------------------
# Each class alone (Tor waits for a second byte) and followed by seven more.

HTTP_LETTERS = b"GHPC"          # Tor's
MORE_HTTP_LETTERS = b"ODT"      # torsocksd's too
TAIL = b" / HTTP/1.0\r\n\r\n"[:7]

for first in (0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x0A, 0x0D, 0x16,
              0x20, 0x41, 0x43, 0x44, 0x47, 0x48, 0x4F, 0x50, 0x54, 0x5A,
              0x63, 0x67, 0x68, 0x6F, 0x70, 0x7F, 0x80, 0xC0, 0xFE, 0xFF):
    lone = bytes((first,))
    label = "%02x" % first
    if first in HTTP_LETTERS + MORE_HTTP_LETTERS:
        label = chr(first)
        if first == ord("H"):
            # "H" may start HEAD: both wait for more.
            case("first-byte-H-alone", lone)
        else:
            case("first-byte-%s-alone" % label, lone,
                 rules=("fail-fast", "http-page"), expect=Expect(
                     b"", page="GET"))
        case("first-byte-%s-then-7" % label, lone + TAIL,
             rules=("http-page",), expect=Expect(b"", page="GET"))
    elif first in (0x04, 0x05):
        case("first-byte-%s-alone" % label, lone)     # both wait
        case("first-byte-%s-then-7" % label, lone + TAIL)
    elif first == 0x01:
        # An RFC 1929 message before any greeting: Tor waits for all of it
        # before refusing it silently.
        case("first-byte-01-alone", lone, rules=("fail-fast",),
             expect=Expect(b""))
        case("first-byte-01-then-7", lone + TAIL, rules=("fail-fast",),
             expect=Expect(b""))
    else:
        case("first-byte-%s-alone" % label, lone, rules=("fail-fast",),
             expect=Expect(b""))
        case("first-byte-%s-then-7" % label, lone + TAIL)

# --- HTTP requests -----------------------------------------------------------

HTTP_REQUESTS = {
    "get": b"GET / HTTP/1.1\r\nHost: example.test\r\n\r\n",
    "get-absolute": b"GET http://example.test/ HTTP/1.1\r\n"
                    b"Host: example.test\r\n\r\n",
    "head": b"HEAD / HTTP/1.0\r\n\r\n",
    "post": b"POST / HTTP/1.0\r\nContent-Length: 0\r\n\r\n",
    "put": b"PUT /x HTTP/1.0\r\nContent-Length: 0\r\n\r\n",
    "patch": b"PATCH /x HTTP/1.0\r\n\r\n",
    "connect": b"CONNECT example.test:443 HTTP/1.1\r\n"
               b"Host: example.test:443\r\n\r\n",
    "options": b"OPTIONS * HTTP/1.1\r\nHost: example.test\r\n\r\n",
    "delete": b"DELETE / HTTP/1.1\r\nHost: example.test\r\n\r\n",
    "trace": b"TRACE / HTTP/1.1\r\nHost: example.test\r\n\r\n",
}
for label, request in HTTP_REQUESTS.items():
    method = "HEAD" if label == "head" else "GET"
    case("http-" + label, request, rules=("http-page",),
         expect=Expect(b"", page=method))
case("http-lowercase-get", b"get / HTTP/1.0\r\n\r\n")     # both: close
case("http-GX", b"GX", rules=("http-page",),
     expect=Expect(b"", page="GET"))
# Two bytes of HEAD: Tor sends its page; torsocksd waits to see "HEAD ".
case("http-HE", b"HE", rules=("http-page",), expect=Expect(b"", False))
case("http-HEAD-space", b"HEAD ", rules=("http-page",),
     expect=Expect(b"", page="HEAD"))
case("http-HEADX", b"HEADX", rules=("http-page",),
     expect=Expect(b"", page="GET"))
bytewise("http-get-bytewise", b"GET / HTTP/1.0\r\n\r\n", rules=("http-page",),
         expect=Expect(b"", page="GET"))

# --- TLS ---------------------------------------------------------------------

CLIENT_HELLO_START = bytes.fromhex("16030100c8010000c40303") + bytes(range(32))
case("tls-client-hello", CLIENT_HELLO_START)
case("tls-two-bytes", b"\x16\x03")

# --- SOCKS4 and SOCKS4A ------------------------------------------------------

PUBLIC4 = ipv4("1.2.3.4")
SOCKS4_COMMANDS = {"connect": CONNECT, "bind": BIND, "udp": UDP,
                   "resolve": RESOLVE, "resolve-ptr": RESOLVE_PTR,
                   "connect-dir": CONNECT_DIR, "cmd00": 0x00, "cmd04": 0x04,
                   "cmd05": 0x05, "cmd7f": 0x7F, "cmdff": 0xFF}

for label, command in SOCKS4_COMMANDS.items():
    kwargs = {}
    if command == CONNECT:
        kwargs["complete"] = True       # Tor wants a circuit
    case("s4-%s-ipv4" % label, s4(command, 80, PUBLIC4), **kwargs)
    case("s4-%s-port0" % label, s4(command, 0, PUBLIC4))
    case("s4-%s-dstip0" % label, s4(command, 80, bytes(4)))
    case("s4a-%s-name" % label,
         s4a(command, b"www.example.test"), complete=command in (
             CONNECT, RESOLVE))
    # The 8-byte header only: Tor waits for all eight before it looks.
    if command == CONNECT_DIR:
        # Tor refuses F2; for torsocksd the userid may still come.
        case("s4-connect-dir-header-only", s4(command, 80, PUBLIC4)[:8],
             rules=("connect-dir",), expect=Expect(b"", False))
    else:
        case("s4-%s-header-only" % label, s4(command, 80, PUBLIC4)[:8])
_test_name(b"www.example.test")

# A SOCKS4 command byte that can never be valid, alone with its version
# byte: Tor waits for the whole header, torsocksd refuses at once.
for label, command in (("udp", UDP), ("cmd00", 0x00), ("cmd7f", 0x7F)):
    case("s4-%s-two-bytes" % label, bytes((4, command)),
         rules=("fail-fast",), expect=Expect(S4_REJECTED))
case("s4-connect-two-bytes", b"\x04\x01")             # both wait

# userid lengths (RESOLVE of an IP literal: Tor answers without a circuit)
for length in (0, 1, 255, 511, 512):
    case("s4-userid-%d" % length, s4(RESOLVE, 0, PUBLIC4, b"u" * length))
case("s4-userid-513", s4(RESOLVE, 0, PUBLIC4, b"u" * 513))
case("s4-userid-513-connect", s4(CONNECT, 80, PUBLIC4, b"u" * 513))
case("s4-userid-binary", s4(RESOLVE, 0, PUBLIC4, bytes(range(1, 256))))
# Unterminated userids: 503 bytes of it wait; at 504 (512 bytes in all) Tor
# gives up on the message (MAX_SOCKS_MESSAGE_LEN in proto_socks.c).
case("s4-userid-unterminated-503", s4(RESOLVE, 0, PUBLIC4)[:8] + b"u" * 503)
case("s4-userid-unterminated-504", s4(RESOLVE, 0, PUBLIC4)[:8] + b"u" * 504,
     rules=("incomplete-at-512",), expect=Expect(b"", closed=False))
case("s4-userid-split-512",
     s4(RESOLVE, 0, PUBLIC4)[:8] + b"u" * 300, b"u" * 212 + b"\0")

# SOCKS4A markers: 0.0.0.1 and 0.0.0.255 are 4A; 0.0.1.0 is a plain address.
case("s4a-marker-1", s4(RESOLVE, 0, b"\0\0\0\x01", b"", b"1.2.3.4"))
case("s4a-marker-255", s4(RESOLVE, 0, b"\0\0\0\xff", b"", b"1.2.3.4"))
case("s4-address-0.0.1.0", s4(RESOLVE, 0, b"\0\0\x01\0", b"", b"1.2.3.4"))
case("s4a-userid-and-name", s4a(RESOLVE, b"1.2.3.4", 0, b"someone"))
case("s4a-name-255", s4a(RESOLVE, LONG_NAME), complete=True)
case("s4a-name-256", s4a(RESOLVE, TOO_LONG_NAME))
case("s4a-connect-name-256", s4a(CONNECT, TOO_LONG_NAME))
case("s4a-name-unterminated", s4a(RESOLVE, b"www.example.test")[:-1])
case("s4a-name-empty-unterminated", s4(RESOLVE, 80, b"\0\0\0\x01"))
_test_name(LONG_NAME)

# Early data after a complete request.
case("s4a-connect-early-data",
     s4a(CONNECT, b"www.example.test") + b"GET / HTTP/1.0\r\n\r\n",
     complete=True)
case("s4-resolve-early-data", PROBE4 + b"extra bytes")
case("s4a-resolve-literal-early-data",
     s4a(RESOLVE, b"1.2.3.4", 0) + b"x" * 600)

# Private destinations over SOCKS4: both refuse (Tor by policy, torsocksd
# because the connect fails), SOCKS4 has one failure code.
for label, address in (("loopback", "127.0.0.1"), ("any", "0.0.0.0"),
                       ("ten", "10.0.0.1")):
    case("s4-connect-private-" + label,
         s4(CONNECT, CLOSED_PORT, ipv4(address)))
case("s4a-connect-localhost", s4a(CONNECT, b"localhost", CLOSED_PORT))

# --- SOCKS5 greetings --------------------------------------------------------

case("s5-greeting-zero-methods", b"\x05\x00")
case("s5-greeting-noauth", NOAUTH, PROBE)
case("s5-greeting-userpass", USERPASS, AUTH, PROBE)
case("s5-greeting-both", BOTH, AUTH, PROBE, rules=("method-choice",),
     expect=Expect(b"\x05\x00\x01\x00" + PROBE_ANSWER))
case("s5-greeting-both-reversed", b"\x05\x02\x02\x00", AUTH, PROBE,
     rules=("method-choice",),
     expect=Expect(b"\x05\x00\x01\x00" + PROBE_ANSWER))
# Offered both, then no RFC 1929 message: Tor, having chosen 02, reads the
# request as one and fails it.
case("s5-greeting-both-no-auth", BOTH, PROBE, rules=("method-choice",),
     expect=Expect(b"\x05\x00" + PROBE_ANSWER))
case("s5-greeting-gssapi-only", b"\x05\x01\x01")
case("s5-greeting-ff-only", b"\x05\x01\xff")
case("s5-greeting-unknown-methods", b"\x05\x03\x03\x80\xfe")
case("s5-greeting-duplicate-00", b"\x05\x03\x00\x00\x00", PROBE)
case("s5-greeting-255-methods", b"\x05\xff" + bytes(range(255)), AUTH, PROBE,
     rules=("method-choice",),
     expect=Expect(b"\x05\x00\x01\x00" + PROBE_ANSWER))
case("s5-greeting-255-methods-without-00", b"\x05\xff" + bytes(range(1, 256)),
     AUTH, PROBE)
case("s5-greeting-255-unknown-methods", b"\x05\xff" + b"\x80" * 255)
case("s5-greeting-truncated", b"\x05\x03\x00\x02")
case("s5-greeting-then-greeting", NOAUTH, NOAUTH)          # both wait

# --- RFC 1929 ----------------------------------------------------------------

case("auth-after-02", USERPASS, AUTH, PROBE)
case("auth-empty-fields", USERPASS, b"\x01\x00\x00", PROBE)
case("auth-empty-username", USERPASS, b"\x01\x00\x04pass", PROBE)
case("auth-255-255", USERPASS,
     b"\x01\xff" + b"u" * 255 + b"\xff" + b"p" * 255, PROBE)
case("auth-binary-fields", USERPASS,
     b"\x01\x03\x00\xff\x80\x02\xc3\xa9", PROBE)
case("auth-after-00", NOAUTH, AUTH, PROBE)     # Tor: 01 00 and goes on
case("auth-before-greeting", AUTH)
case("auth-before-greeting-truncated", b"\x01\x04us",
     rules=("fail-fast",), expect=Expect(b""))
case("auth-twice", USERPASS, AUTH, AUTH)
case("auth-truncated", USERPASS, b"\x01\x04us")
case("auth-password-truncated", USERPASS, b"\x01\x04user\x04pa")
# Wrong versions where the RFC 1929 message belongs.
case("auth-version-00", USERPASS, b"\x00\x04user\x04pass")
case("auth-version-02", USERPASS, b"\x02\x04user\x04pass")
case("auth-version-05", USERPASS, b"\x05\x04user\x04pass")
case("auth-version-05-request", USERPASS, PROBE)
case("auth-version-ff", USERPASS, b"\xff\x04user\x04pass")
case("auth-socks4-instead", USERPASS, PROBE4,
     rules=("socks4-after-greeting",), expect=Expect(b"\x05\x02" + r5(1)))
case("auth-http-instead", USERPASS, b"GET / HTTP/1.0\r\n\r\n",
     rules=("not-socks5-after-greeting",),
     expect=Expect(b"\x05\x02" + r5(1)))
case("auth-then-socks4", USERPASS, AUTH, PROBE4,
     rules=("socks4-after-greeting",),
     expect=Expect(b"\x05\x02\x01\x00" + r5(1)))

# --- SOCKS5 requests: every command x address type ---------------------------

SOCKS5_COMMANDS = {"connect": CONNECT, "bind": BIND, "udp": UDP,
                   "resolve": RESOLVE, "resolve-ptr": RESOLVE_PTR,
                   "connect-dir": CONNECT_DIR, "cmd00": 0x00, "cmd04": 0x04,
                   "cmd7f": 0x7F, "cmdff": 0xFF}
UNKNOWN_COMMANDS = (0x00, 0x04, 0x7F, 0xFF)
TARGETS = {"atyp1": (1, PUBLIC4), "atyp3": (3, b"www.example.test"),
           "atyp4": (4, ipv6("2001:db8::1"))}
UNKNOWN_ATYPS = (0x00, 0x02, 0x05, 0xFF)


def _after_greeting(received, closed=True):
    return Expect(b"\x05\x00" + received, closed)


for command_label, command in SOCKS5_COMMANDS.items():
    for target_label, (atyp, address) in TARGETS.items():
        name = "s5-%s-%s" % (command_label, target_label)
        request = s5(command, atyp, address)
        if command in UNKNOWN_COMMANDS:
            case(name, NOAUTH, request, rules=("rfc1928-codes",),
                 expect=_after_greeting(r5(7)))
        elif command == CONNECT_DIR:
            # The relay's address is unreachable in the namespace.
            case(name, NOAUTH, request, rules=("connect-dir",),
                 expect=_after_greeting(r5(3)))
        else:
            case(name, NOAUTH, request,
                 complete=command in (CONNECT, RESOLVE, RESOLVE_PTR))
    for atyp in UNKNOWN_ATYPS:
        name = "s5-%s-atyp%02x" % (command_label, atyp)
        request = bytes((5, command, 0, atyp)) + PUBLIC4 + port(80)
        known = command in (CONNECT, RESOLVE, RESOLVE_PTR, CONNECT_DIR)
        case(name, NOAUTH, request, rules=("rfc1928-codes",),
             expect=_after_greeting(r5(8 if known else 7)))

# A bad byte is refused as soon as it arrives (Tor: by its grammar).
case("s5-cmd04-two-bytes", NOAUTH, b"\x05\x04", rules=("rfc1928-codes",),
     expect=_after_greeting(r5(7)))
case("s5-connect-atyp05-four-bytes", NOAUTH, b"\x05\x01\x00\x05",
     rules=("rfc1928-codes",), expect=_after_greeting(r5(8)))
case("s5-connect-rsv-three-bytes", NOAUTH, b"\x05\x01\x01")
# Reserved byte not zero.
for reserved in (0x01, 0x80, 0xFF):
    case("s5-connect-rsv%02x" % reserved, NOAUTH,
         s5(CONNECT, 1, PUBLIC4, reserved=reserved))
case("s5-resolve-rsv01", NOAUTH, s5(RESOLVE, 1, PUBLIC4, 0, reserved=1))
case("s5-bind-rsv01", NOAUTH, s5(BIND, 1, PUBLIC4, reserved=1))
case("s5-cmd04-rsv01", NOAUTH, s5(0x04, 1, PUBLIC4, reserved=1),
     rules=("rfc1928-codes",), expect=_after_greeting(r5(7)))
# Wrong version in the request.
# A SOCKS4 request (Tor answers it as one, and waits for a circuit).
case("s5-request-version-04", NOAUTH, b"\x04" + s5(CONNECT, 1, PUBLIC4)[1:],
     rules=("socks4-after-greeting",), expect=_after_greeting(r5(1)))
case("s5-request-version-00", NOAUTH, b"\x00" + s5(CONNECT, 1, PUBLIC4)[1:])

# --- Port 0 ------------------------------------------------------------------

for target_label, (atyp, address) in TARGETS.items():
    case("s5-connect-%s-port0" % target_label, NOAUTH,
         s5(CONNECT, atyp, address, 0))
    case("s5-connect-dir-%s-port0" % target_label, NOAUTH,
         s5(CONNECT_DIR, atyp, address, 0))
    case("s5-bind-%s-port0" % target_label, NOAUTH, s5(BIND, atyp, address, 0))
    case("s5-udp-%s-port0" % target_label, NOAUTH, s5(UDP, atyp, address, 0))
case("s5-resolve-atyp3-port0", NOAUTH,
     s5_name(RESOLVE, b"www.example.test", 0), complete=True)
case("s5-resolve-ptr-atyp1-port0", NOAUTH, s5(RESOLVE_PTR, 1, PUBLIC4, 0),
     complete=True)
case("s5-connect-private-port0", NOAUTH, s5(CONNECT, 1, ipv4("127.0.0.1"), 0))
case("s5-connect-bad-name-port0", NOAUTH, s5_name(CONNECT, b"a..b", 0))
case("s5-connect-onion-port0", NOAUTH, s5_name(CONNECT, ONION, 0),
     rules=("special-names",), expect=_after_greeting(r5(4)))
case("s4a-connect-port0", s4a(CONNECT, b"www.example.test", 0))
case("s4a-connect-dir-port0", s4a(CONNECT_DIR, b"www.example.test", 0))

# --- Private and local destinations ------------------------------------------
# Tor refuses them (ClientRejectInternalAddresses); torsocksd lets a client on
# loopback reach them, so its answer is the connect's own error.

LOCAL_CONNECTS = (
    ("loopback", 1, ipv4("127.0.0.1"), 5),
    ("loopback-other", 1, ipv4("127.1.2.3"), 5),
    ("any", 1, ipv4("0.0.0.0"), 5),
    ("ten", 1, ipv4("10.0.0.1"), 3),
    ("link-local", 1, ipv4("169.254.169.254"), 3),
    ("private-192", 1, ipv4("192.168.1.1"), 3),
    ("ipv6-loopback", 4, ipv6("::1"), 5),
    ("ipv6-unique-local", 4, ipv6("fc00::1"), 3),
    ("loopback-tor-virtual", 1, ipv4("127.192.0.1"), 5),
    ("localhost", 3, b"localhost", 5),
    ("name-literal-loopback", 3, b"127.0.0.1", 5),
    ("name-literal-ipv6-loopback", 3, b"[::1]", 5),
)
for label, atyp, address, errno_reply in LOCAL_CONNECTS:
    case("s5-connect-local-" + label, NOAUTH,
         s5(CONNECT, atyp, address, CLOSED_PORT),
         rules=("local-destinations",),
         expect=_after_greeting(r5(errno_reply)))
# fe80::1 without a scope: Tor refuses it (its virtual address range), the
# kernel too (EINVAL, a general failure).
case("s5-connect-ipv6-link-local", NOAUTH, s5(CONNECT, 4, ipv6("fe80::1"), 80))
case("s5-connect-dir-local-loopback", NOAUTH,
     s5(CONNECT_DIR, 1, ipv4("127.0.0.1"), CLOSED_PORT),
     rules=("connect-dir",), expect=_after_greeting(r5(5)))
# CONNECTs that succeed: an echo server listens on ECHO_PORT of 127.0.0.1
# and ::1 in the namespace (tests/peers/tor_differential.py starts it).
for label, request in (
        ("ipv4", s5(CONNECT, 1, ipv4("127.0.0.1"), ECHO_PORT)),
        ("ipv6", s5(CONNECT, 4, ipv6("::1"), ECHO_PORT)),
        ("localhost", s5_name(CONNECT, b"localhost", ECHO_PORT)),
        ("name-literal", s5_name(CONNECT, b"127.0.0.1", ECHO_PORT))):
    case("s5-connect-echo-" + label, NOAUTH, request, b"ping",
         rules=("local-destinations",),
         expect=_after_greeting(r5(0) + b"ping", False))
case("pipe-greeting-connect-echo",
     NOAUTH + s5(CONNECT, 1, ipv4("127.0.0.1"), ECHO_PORT) + b"ping",
     rules=("local-destinations",),
     expect=_after_greeting(r5(0) + b"ping", False))
S4_GRANTED = b"\x00\x5a" + bytes(6)
case("s4-connect-echo", s4(CONNECT, ECHO_PORT, ipv4("127.0.0.1")), b"ping",
     rules=("local-destinations",), expect=Expect(S4_GRANTED + b"ping", False))
case("s4a-connect-echo-localhost", s4a(CONNECT, b"localhost", ECHO_PORT),
     b"ping", rules=("local-destinations",),
     expect=Expect(S4_GRANTED + b"ping", False))
case("s4a-connect-echo-ipv4-literal", s4a(CONNECT, b"127.0.0.1", ECHO_PORT),
     b"ping", rules=("local-destinations",),
     expect=Expect(S4_GRANTED + b"ping", False))
case("s4a-connect-echo-ipv6-literal", s4a(CONNECT, b"::1", ECHO_PORT),
     b"ping", rules=("socks4a-ip-literal", "local-destinations"),
     expect=Expect(S4_GRANTED + b"ping", False))
case("s4a-connect-echo-ipv6-bracketed", s4a(CONNECT, b"[::1]", ECHO_PORT),
     b"ping", rules=("socks4a-ip-literal", "local-destinations"),
     expect=Expect(S4_GRANTED + b"ping", False))
# Multicast is not "internal" to Tor: it waits for a circuit.
case("s5-connect-multicast", NOAUTH, s5(CONNECT, 1, ipv4("224.0.0.1")),
     complete=True)

# --- RESOLVE and RESOLVE_PTR of IP literals ----------------------------------

for address in ("1.2.3.4", "127.0.0.1", "0.0.0.0", "10.0.0.1",
                "255.255.255.255", "224.0.0.1"):
    case("s5-resolve-ipv4-" + address, NOAUTH, s5(RESOLVE, 1, ipv4(address)))
for address in ("2001:db8::1", "::1", "::", "::ffff:1.2.3.4"):
    case("s5-resolve-ipv6-" + address, NOAUTH, s5(RESOLVE, 4, ipv6(address)))
# Tor keeps 127.192.0.0/10 and fe80::/10 for its automapped addresses and
# refuses a RESOLVE of one it did not hand out (VirtualAddrNetworkIPv4/6).
case("s5-resolve-ipv6-fe80::1", NOAUTH, s5(RESOLVE, 4, ipv6("fe80::1")),
     rules=("resolve-ip-literal",), expect=_after_greeting(
         b"\x05\x00\x00\x04" + ipv6("fe80::1") + b"\0\0"))
case("s5-resolve-ipv4-127.192.0.1", NOAUTH,
     s5(RESOLVE, 1, ipv4("127.192.0.1")), rules=("resolve-ip-literal",),
     expect=_after_greeting(resolved4("127.192.0.1")))
case("s5-resolve-name-127.192.0.1", NOAUTH,
     s5_name(RESOLVE, b"127.192.0.1"), rules=("resolve-ip-literal",),
     expect=_after_greeting(resolved4("127.192.0.1")))
case("s4-resolve-127.192.0.1", s4(RESOLVE, 0, ipv4("127.192.0.1")),
     rules=("resolve-ip-literal",),
     expect=Expect(b"\x00\x5a\x00\x00" + ipv4("127.192.0.1")))
case("s5-resolve-port-42", NOAUTH, s5(RESOLVE, 1, PUBLIC4, 42))
case("s4-resolve-private", s4(RESOLVE, 0, ipv4("127.0.0.1")))

for address in ("1.2.3.4", TEST_ADDRESS):
    case("s5-resolve-ptr-ipv4-" + address, NOAUTH,
         s5(RESOLVE_PTR, 1, ipv4(address)), complete=True)
case("s5-resolve-ptr-ipv6-2001:db8::1", NOAUTH,
     s5(RESOLVE_PTR, 4, ipv6("2001:db8::1")), complete=True)
# Private addresses: Tor fails them at once (ClientDNSRejectInternalAddresses)
# with its ATYP 0 failure; the test resolver fails them too.
for label, atyp, address in (("ipv4-127.0.0.1", 1, ipv4("127.0.0.1")),
                             ("ipv4-10.0.0.1", 1, ipv4("10.0.0.1")),
                             ("ipv4-192.168.0.1", 1, ipv4("192.168.0.1")),
                             ("ipv6-::1", 4, ipv6("::1")),
                             ("name-127.0.0.1", 3, b"127.0.0.1")):
    case("s5-resolve-ptr-" + label, NOAUTH, s5(RESOLVE_PTR, atyp, address),
         rules=("resolve-failure",), expect=_after_greeting(RESOLVE_FAILED))
for label, name in (("name-1.2.3.4", b"1.2.3.4"),
                    ("name-bracketed-ipv6", b"[2001:db8::1]"),
                    ("name-ipv6", b"2001:db8::1")):
    case("s5-resolve-ptr-" + label, NOAUTH, s5_name(RESOLVE_PTR, name),
         complete=True)
# Not an IP: 08 before any hostname check (the order of checks).
for label, name in (("name", b"www.example.test"),
                    ("arpa", b"4.3.2.1.in-addr.arpa"),
                    ("empty", b""), ("space", b"a b"), ("double-dot", b"a..b"),
                    ("onion", ONION), ("utf8", "é".encode())):
    case("s5-resolve-ptr-" + label, NOAUTH, s5_name(RESOLVE_PTR, name))
case("s5-resolve-ptr-nul", NOAUTH, s5_name(RESOLVE_PTR, b"a\0b"))
# Tor cuts at the NUL and sees an IP; torsocksd sees a name that is no IP.
case("s5-resolve-ptr-nul-after-ip", NOAUTH,
     s5_name(RESOLVE_PTR, b"1.2.3.4\0xyz"), rules=("nul-in-name",),
     expect=_after_greeting(r5(8)))
# Bad names with commands that fail earlier: the command decides.
for command_label, command in (("bind", BIND), ("udp", UDP)):
    for label, name in (("space", b"a b"), ("empty", b""),
                        ("double-dot", b"a..b"), ("nul", b"a\0b")):
        case("s5-%s-name-%s" % (command_label, label), NOAUTH,
             s5_name(command, name))
case("s5-resolve-ptr-malformed-in-one", b"\x05\x01\x00",
     bytes.fromhex("05f10003036120620000"))
bytewise("s5-resolve-ptr-malformed-bytewise",
         bytes.fromhex("05f10003036120620000"))

# --- Hostnames, probing each clause of Tor's rule ----------------------------
# label -> (name bytes, rule torsocksd follows instead of Tor, or None).
# Tor's clause (module docstring) in the comment; "attach" = refused later.

HOSTNAMES = {
    # valid
    "plain": b"www.example.test",                         # H1-H3
    "single-label": b"a",
    "upper": b"WWW.EXAMPLE.TEST",
    "label-ends-hyphen": b"a-.example.test",              # H2 is first only
    "inner-underscore": b"a_b.example.test",
    "inner-hyphen": b"a-b.example.test",
    "digit-labels": b"1.2.3",                             # not D3, H3 ok
    "leading-zero-quad": b"01.2.3.4",                     # D3 no; H ok
    "octet-256": b"1.2.3.256",
    "five-numbers": b"1.2.3.4.5",
    "quad-trailing-dot": b"1.2.3.4.",                     # H1
    "hex-quad": b"0x7f.0.0.1",
    "label-64": b"a" * 64 + b".test",                     # no label limit
    "trailing-dot": b"www.example.test.",                 # H1
    "len-255": LONG_NAME,
    "localhost": b"localhost",                            # attach: local
    "dot-local": b"printer.local",                        # attach: local
    "onion": ONION,                                       # attach: onion
    "onion-subdomain": b"www." + ONION,
    "onion-upper": ONION.upper(),
    "bare-onion": b"onion",
    "bare-exit": b"exit",
    # invalid
    "empty": b"",                                         # D1
    "dot": b".",                                          # H1
    "two-dots": b"..",
    "double-dot": b"a..b",
    "leading-dot": b".a",
    "double-trailing-dot": b"a..",
    "leading-hyphen": b"-a",                              # H2
    "leading-underscore": b"_a",
    "label-leading-hyphen": b"a.-b",
    "label-leading-underscore": b"a._b",
    "at": b"user@host.test",                              # H3
    "percent": b"a%b.test",
    "host-port": b"host.test:80",
    "space": b"a b",
    "tab": b"a\tb",
    "slash": b"a/b",
    "star": b"*.test",
    "utf8": "é.test".encode(),
    "high-byte": b"\x80.test",
    "del": b"a\x7fb",
    "leading-space-quad": b" 1.2.3.4",
    # IP literals
    "ipv4": b"1.2.3.4",                                   # D3
    "ipv4-loopback": b"127.0.0.1",
    "ipv4-bracketed": b"[1.2.3.4]",                       # D2+D3, attach no
    "bracketed-name": b"[www.example.test]",              # D2+H, attach no
    "ipv6": b"2001:db8::1",                               # D4
    "ipv6-bracketed": b"[2001:db8::1]",                   # D2+D4
    "ipv6-loopback": b"::1",
    "ipv6-loopback-bracketed": b"[::1]",
    "ipv6-mapped": b"::ffff:1.2.3.4",
    "ipv6-embedded-leading-zero": b"::ffff:01.2.3.4",     # D4 allows it
    "ipv6-scope": b"fe80::1%lo",                          # D4 no
    "ipv6-trailing-colon": b"1:2:3:4:5:6:7:",
    "ipv6-two-gaps": b"1::2::3",
    "ipv6-group-5-digits": b"12345::1",
    "ipv6-open-bracket": b"[::1",                         # D2 needs both
    "ipv6-close-bracket": b"::1]",
    "empty-brackets": b"[]",
    "double-brackets": b"[[::1]]",
    # .exit and bad .onion: attach stage
    "exit": b"www.example.test.exit",
    "onion-bad-checksum": BAD_CHECKSUM_ONION,
    "onion-short": b"x.onion",
    # NUL (the SOCKS5 parser cuts at it; SOCKS4A names end at it anyway)
    "nul-inside": b"a\0b.test",
    "nul-first": b"\0abc",
    "nul-after-ip": b"1.2.3.4\0xyz",
}
for _name in HOSTNAMES.values():
    if _name.endswith(b".test") or _name.endswith(b".test."):
        _test_name(_name)

GOOD_ONIONS = ("onion", "onion-subdomain", "onion-upper")
SPECIAL = GOOD_ONIONS + ("exit", "onion-bad-checksum", "onion-short")
BRACKETED_NON_IPV6 = ("ipv4-bracketed", "bracketed-name")
# Refused by Tor's parser (05 01 to a RESOLVE too, where torsocksd sends its
# RESOLVE failure reply).  Bytes outside printable ASCII are not here:
# torsocksd refuses those with 01 whatever the command, as Tor does.
PARSER_REFUSED = ("empty", "dot", "two-dots", "double-dot", "leading-dot",
                  "double-trailing-dot", "leading-hyphen",
                  "leading-underscore", "label-leading-hyphen",
                  "label-leading-underscore", "at", "percent", "host-port",
                  "space", "slash", "star", "leading-space-quad",
                  "ipv6-scope", "ipv6-trailing-colon", "ipv6-two-gaps",
                  "ipv6-group-5-digits", "ipv6-open-bracket",
                  "ipv6-close-bracket", "empty-brackets", "double-brackets")
LOOPBACK_NAMES = ("localhost", "ipv4-loopback", "ipv6-loopback",
                  "ipv6-loopback-bracketed")


def hostname_difference(label, request):
    """(rules, Expect) where torsocksd differs from Tor on purpose for a
    hostname case, else None.  request: connect5, resolve5 (ATYP 3),
    connect4a, resolve4a."""
    if request == "connect5":
        if label in SPECIAL:
            # Tor: 01 for .exit and bad .onion names, a circuit for good ones.
            return ("special-names",), _after_greeting(r5(4))
        if label in ("nul-inside", "nul-after-ip"):
            return ("nul-in-name",), _after_greeting(r5(1))
        if label in LOOPBACK_NAMES:
            return ("local-destinations",), _after_greeting(r5(5))
        if label == "dot-local":
            # Tor refuses *.local; the test resolver does not know it.
            return ("local-destinations",), _after_greeting(r5(4))
    if request == "resolve5":
        if label in PARSER_REFUSED:
            return ("refused-name-resolve",), _after_greeting(RESOLVE_FAILED)
        if label in SPECIAL + BRACKETED_NON_IPV6:
            # Tor refuses these after its parser, with its ATYP 0 failure.
            return ("resolve-failure",), _after_greeting(RESOLVE_FAILED)
        if label in ("nul-inside", "nul-after-ip"):
            return ("nul-in-name",), _after_greeting(r5(1))
    if request == "connect4a" and label in GOOD_ONIONS:
        return ("special-names",), Expect(S4_REJECTED)
    return None


# Every hostname case is a whole request: where Tor accepts the name it
# waits for a circuit.  A SOCKS4A name ends at its NUL: what follows it is
# early data.
for label, name in HOSTNAMES.items():
    dport = CLOSED_PORT if label in LOOPBACK_NAMES else 80
    requests = {"connect4a": s4a(CONNECT, name, dport),
                "resolve4a": s4a(RESOLVE, name)}
    if len(name) <= 255:
        requests["connect5"] = NOAUTH, s5_name(CONNECT, name, dport)
        requests["resolve5"] = NOAUTH, s5_name(RESOLVE, name)
    for request, chunks in sorted(requests.items()):
        if isinstance(chunks, bytes):
            chunks = (chunks,)
        difference = hostname_difference(label, request)
        rules, expect = difference or ((), None)
        case("name-%s-%s" % (request, label), *chunks, complete=True,
             rules=rules, expect=expect)

# --- Pipelining: several messages in one chunk -------------------------------

case("pipe-greeting-resolve", NOAUTH + PROBE)
case("pipe-greeting-resolve-extra", NOAUTH + PROBE + b"extra bytes")
case("pipe-greeting-connect-data",
     NOAUTH + s5(CONNECT, 1, PUBLIC4) + b"GET / HTTP/1.0\r\n\r\n",
     complete=True)
case("pipe-greeting-connect-name-data",
     NOAUTH + s5_name(CONNECT, b"www.example.test") + b"x" * 900,
     complete=True)
case("pipe-greeting-bind", NOAUTH + s5(BIND, 1, PUBLIC4),
     rules=("every-reply",), expect=_after_greeting(r5(7)))
case("pipe-greeting-udp", NOAUTH + s5(UDP, 1, PUBLIC4),
     rules=("every-reply",), expect=_after_greeting(r5(7)))
case("pipe-greeting-cmd04", NOAUTH + s5(0x04, 1, PUBLIC4),
     rules=("every-reply", "rfc1928-codes"), expect=_after_greeting(r5(7)))
case("pipe-greeting-bad-name", NOAUTH + s5_name(CONNECT, b"a..b"),
     rules=("every-reply",), expect=_after_greeting(r5(1)))
case("pipe-greeting-ptr-name", NOAUTH + s5_name(RESOLVE_PTR, b"a b"),
     rules=("every-reply",), expect=_after_greeting(r5(8)))
case("pipe-greeting-rsv01", NOAUTH + s5(CONNECT, 1, PUBLIC4, reserved=1),
     rules=("every-reply",), expect=_after_greeting(r5(1)))
case("pipe-greeting-port0", NOAUTH + s5(CONNECT, 1, PUBLIC4, 0))
case("pipe-userpass-auth-resolve", USERPASS + AUTH + PROBE,
     rules=("every-reply",),
     expect=Expect(b"\x05\x02\x01\x00" + PROBE_ANSWER))
case("pipe-both-auth-resolve", BOTH + AUTH + PROBE,
     rules=("every-reply", "method-choice"),
     expect=Expect(b"\x05\x00\x01\x00" + PROBE_ANSWER))
case("pipe-noauth-auth-resolve", NOAUTH + AUTH + PROBE,
     rules=("every-reply",),
     expect=Expect(b"\x05\x00\x01\x00" + PROBE_ANSWER))
case("pipe-auth-resolve-after-greeting", USERPASS, AUTH + PROBE)
case("pipe-greeting-http", NOAUTH + b"GET / HTTP/1.0\r\n\r\n",
     rules=("every-reply", "not-socks5-after-greeting"),
     expect=_after_greeting(r5(1)))
case("pipe-greeting-socks4", NOAUTH + PROBE4,
     rules=("every-reply", "socks4-after-greeting"),
     expect=_after_greeting(r5(1)))
case("pipe-greeting-garbage", NOAUTH + b"\x06\x07\x08",
     rules=("every-reply", "not-socks5-after-greeting"),
     expect=_after_greeting(r5(1)))
case("pipe-greeting-tls", NOAUTH + CLIENT_HELLO_START,
     rules=("every-reply", "not-socks5-after-greeting"),
     expect=_after_greeting(r5(1)))
case("pipe-two-greetings", NOAUTH + NOAUTH)
case("pipe-greeting-zero-methods-then-request", b"\x05\x00" + PROBE)
case("pipe-s4-resolve-twice", PROBE4 + PROBE4)
case("pipe-s4a-connect-greeting", s4a(CONNECT, b"www.example.test") + NOAUTH,
     complete=True)

# Separate chunks: a greeting, then a message of the wrong kind.
case("after-greeting-http", NOAUTH, b"GET / HTTP/1.0\r\n\r\n",
     rules=("not-socks5-after-greeting",), expect=_after_greeting(r5(1)))
case("after-greeting-connect-method", NOAUTH, b"CONNECT x:1 HTTP/1.0\r\n\r\n",
     rules=("not-socks5-after-greeting",), expect=_after_greeting(r5(1)))
case("after-greeting-socks4", NOAUTH, PROBE4,
     rules=("socks4-after-greeting",), expect=_after_greeting(r5(1)))
case("after-greeting-garbage", NOAUTH, b"\x06\x07\x08")
case("after-greeting-tls", NOAUTH, CLIENT_HELLO_START)
case("after-greeting-auth-version-01-request", NOAUTH, b"\x01\x01\x00\x01")

# --- Byte by byte ------------------------------------------------------------

bytewise("bytewise-greeting-resolve", NOAUTH + PROBE)
bytewise("bytewise-socks4-resolve", PROBE4)
bytewise("bytewise-socks4a-resolve-literal",
         s4a(RESOLVE, b"1.2.3.4", 0, b"id"))
bytewise("bytewise-userpass-auth-resolve", USERPASS + AUTH + PROBE)
bytewise("bytewise-resolve-name-literal",
         NOAUTH + s5_name(RESOLVE, b"1.2.3.4", 0))
bytewise("bytewise-resolve-ipv6",
         NOAUTH + s5(RESOLVE, 4, ipv6("2001:db8::1"), 0))
bytewise("bytewise-bind", NOAUTH + s5(BIND, 1, PUBLIC4))
bytewise("bytewise-cmd04", NOAUTH + s5(0x04, 1, PUBLIC4),
         rules=("rfc1928-codes",), expect=_after_greeting(r5(7)))
bytewise("bytewise-connect-port0", NOAUTH + s5(CONNECT, 1, PUBLIC4, 0))
bytewise("bytewise-connect", NOAUTH + s5(CONNECT, 1, PUBLIC4), complete=True)

# --- Truncations: every strict prefix waits ----------------------------------

for length in range(1, len(BOTH)):
    case("truncated-greeting-%d" % length, BOTH[:length])
for length in range(1, len(PROBE)):
    case("truncated-resolve-ipv4-%d" % length, NOAUTH, PROBE[:length])
NAME_REQUEST = s5_name(RESOLVE, b"www.example.test", 0)
for length in (1, 4, 5, 6, 12, len(NAME_REQUEST) - 2, len(NAME_REQUEST) - 1):
    case("truncated-resolve-name-%d" % length, NOAUTH, NAME_REQUEST[:length])
IPV6_REQUEST = s5(RESOLVE, 4, ipv6("2001:db8::1"), 0)
for length in (4, 5, 12, 20, 21):
    case("truncated-resolve-ipv6-%d" % length, NOAUTH, IPV6_REQUEST[:length])
for length in range(1, len(PROBE4)):
    case("truncated-socks4-%d" % length, PROBE4[:length])
SOCKS4A_REQUEST = s4a(RESOLVE, b"www.example.test", 0, b"id")
for length in (8, 9, 10, 11, 15, len(SOCKS4A_REQUEST) - 1):
    case("truncated-socks4a-%d" % length, SOCKS4A_REQUEST[:length])
for length in range(1, len(AUTH)):
    case("truncated-auth-%d" % length, USERPASS, AUTH[:length])
