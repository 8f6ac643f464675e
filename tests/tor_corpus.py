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

RULES = (
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
)


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

PUBLIC4 = ipv4("1.2.3.4")
LOOPBACK4 = ipv4("127.0.0.1")
CLIENT_HELLO_START = bytes.fromhex("16030100c8010000c40303") + bytes(range(32))

# Parts of torsocksd's outcomes in documented differences.
S4_GRANTED = b"\x00\x5a" + bytes(6)
NOAUTH_THEN_AUTH = b"\x05\x00\x01\x00"     # 00 chosen, RFC 1929 accepted
PAGE = Expect(page="GET")       # its HTTP page, where Tor sends its own


def after_greeting(received: bytes, closed: bool = True) -> Expect:
    """torsocksd's outcome: 00 chosen for a greeting, then received."""
    return Expect(b"\x05\x00" + received, closed)


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
# Where a section lists cases one by one it is a table (Corpus.add_table): a
# row (label, chunks) is compared with Tor as it is; (label, chunks, expect)
# is a documented difference under the table's rules, and (label, chunks,
# rules, expect) one under its own.

CORPUS = Corpus(__name__, "socks", RULES, RESOLVER_NAMES,
                RESOLVER_REVERSE)
case, table = CORPUS.add, CORPUS.add_table


def bytewise(name, message, **options):
    """A case sending message one byte at a time."""
    chunks = [message[i:i + 1] for i in range(len(message))]
    case(name, *chunks, pauses=[BYTEWISE_PAUSE] * (len(chunks) - 1),
         **options)


# --- First byte: version detection -------------------------------------------
# Each class alone (Tor waits for a second byte) and followed by seven more.

HTTP_LETTERS = b"GHPC"          # Tor's
MORE_HTTP_LETTERS = b"ODT"      # torsocksd's too
TAIL = b" / HTTP/1.0\r\n\r\n"[:7]
FAIL_FAST = ("fail-fast", b"")   # refused at once: closed without a word


def first_byte_differences(first: int):
    """Where torsocksd differs from Tor on purpose for the byte alone, and
    for it followed by seven more: (rules, expect) each, or None."""
    if first == ord("H"):
        # "H" may start HEAD: both wait for more.
        return None, ("http-page", PAGE)
    if first in HTTP_LETTERS + MORE_HTTP_LETTERS:
        return (("fail-fast", "http-page"), PAGE), ("http-page", PAGE)
    if first in (0x04, 0x05):
        return None, None                       # both wait
    if first == 0x01:
        # An RFC 1929 message before any greeting: Tor waits for all of it
        # before refusing it silently.
        return FAIL_FAST, FAIL_FAST
    return FAIL_FAST, None


for first in (0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x0A, 0x0D, 0x16,
              0x20, 0x41, 0x43, 0x44, 0x47, 0x48, 0x4F, 0x50, 0x54, 0x5A,
              0x63, 0x67, 0x68, 0x6F, 0x70, 0x7F, 0x80, 0xC0, 0xFE, 0xFF):
    label = "%02x" % first
    if first in HTTP_LETTERS + MORE_HTTP_LETTERS:
        label = chr(first)
    alone, followed = first_byte_differences(first)
    case("first-byte-%s-alone" % label, bytes((first,)), differs=alone)
    case("first-byte-%s-then-7" % label, bytes((first,)) + TAIL,
         differs=followed)

# --- HTTP requests: torsocksd's page where Tor sends its own -----------------

table(prefix="http-", rules="http-page", rows=(
    ("get", b"GET / HTTP/1.1\r\nHost: example.test\r\n\r\n", PAGE),
    ("get-absolute", b"GET http://example.test/ HTTP/1.1\r\n"
                     b"Host: example.test\r\n\r\n", PAGE),
    ("head", b"HEAD / HTTP/1.0\r\n\r\n", Expect(page="HEAD")),
    ("post", b"POST / HTTP/1.0\r\nContent-Length: 0\r\n\r\n", PAGE),
    ("put", b"PUT /x HTTP/1.0\r\nContent-Length: 0\r\n\r\n", PAGE),
    ("patch", b"PATCH /x HTTP/1.0\r\n\r\n", PAGE),
    ("connect", b"CONNECT example.test:443 HTTP/1.1\r\n"
                b"Host: example.test:443\r\n\r\n", PAGE),
    ("options", b"OPTIONS * HTTP/1.1\r\nHost: example.test\r\n\r\n", PAGE),
    ("delete", b"DELETE / HTTP/1.1\r\nHost: example.test\r\n\r\n", PAGE),
    ("trace", b"TRACE / HTTP/1.1\r\nHost: example.test\r\n\r\n", PAGE),
    ("lowercase-get", b"get / HTTP/1.0\r\n\r\n"),      # both: close
    ("GX", b"GX", PAGE),
    # Two bytes of HEAD: Tor sends its page; torsocksd waits to see "HEAD ".
    ("HE", b"HE", Expect(closed=False)),
    ("HEAD-space", b"HEAD ", Expect(page="HEAD")),
    ("HEADX", b"HEADX", PAGE)))
bytewise("http-get-bytewise", b"GET / HTTP/1.0\r\n\r\n",
         differs=("http-page", PAGE))

# --- TLS ---------------------------------------------------------------------

case("tls-client-hello", CLIENT_HELLO_START)
case("tls-two-bytes", b"\x16\x03")

# --- SOCKS4 and SOCKS4A ------------------------------------------------------

SOCKS4_COMMANDS = {"connect": CONNECT, "bind": BIND, "udp": UDP,
                   "resolve": RESOLVE, "resolve-ptr": RESOLVE_PTR,
                   "connect-dir": CONNECT_DIR, "cmd00": 0x00, "cmd04": 0x04,
                   "cmd05": 0x05, "cmd7f": 0x7F, "cmdff": 0xFF}

for label, command in SOCKS4_COMMANDS.items():
    case("s4-%s-ipv4" % label, s4(command, 80, PUBLIC4),
         complete=command == CONNECT)           # Tor wants a circuit
    case("s4-%s-port0" % label, s4(command, 0, PUBLIC4))
    case("s4-%s-dstip0" % label, s4(command, 80, bytes(4)))
    case("s4a-%s-name" % label, s4a(command, b"www.example.test"),
         complete=command in (CONNECT, RESOLVE))
    # The 8-byte header only: Tor waits for all eight before it looks.  It
    # refuses F2 then, where for torsocksd the userid may still come.
    case("s4-%s-header-only" % label, s4(command, 80, PUBLIC4)[:8],
         differs=("connect-dir", Expect(closed=False))
         if command == CONNECT_DIR else None)
_test_name(b"www.example.test")

# A SOCKS4 command byte that can never be valid, alone with its version
# byte: Tor waits for the whole header, torsocksd refuses at once.
table(prefix="s4-", rules="fail-fast", rows=(
    ("udp-two-bytes", bytes((4, UDP)), S4_REJECTED),
    ("cmd00-two-bytes", bytes((4, 0x00)), S4_REJECTED),
    ("cmd7f-two-bytes", bytes((4, 0x7F)), S4_REJECTED),
    ("connect-two-bytes", bytes((4, CONNECT)))))        # both wait

# userid lengths (RESOLVE of an IP literal: Tor answers without a circuit)
for length in (0, 1, 255, 511, 512, 513):
    case("s4-userid-%d" % length, s4(RESOLVE, 0, PUBLIC4, b"u" * length))
S4_HEADER = s4(RESOLVE, 0, PUBLIC4)[:8]
table(prefix="s4-userid-", rules="incomplete-at-512", rows=(
    ("513-connect", s4(CONNECT, 80, PUBLIC4, b"u" * 513)),
    ("binary", s4(RESOLVE, 0, PUBLIC4, bytes(range(1, 256)))),
    # Unterminated userids: 503 bytes of it wait; at 504 (512 bytes in all)
    # Tor gives up on the message (MAX_SOCKS_MESSAGE_LEN in proto_socks.c).
    ("unterminated-503", S4_HEADER + b"u" * 503),
    ("unterminated-504", S4_HEADER + b"u" * 504, Expect(closed=False)),
    ("split-512", (S4_HEADER + b"u" * 300, b"u" * 212 + b"\0"))))

# SOCKS4A markers: 0.0.0.1 and 0.0.0.255 are 4A; 0.0.1.0 is a plain address.
table(rows=(
    ("s4a-marker-1", s4(RESOLVE, 0, b"\0\0\0\x01", b"", b"1.2.3.4")),
    ("s4a-marker-255", s4(RESOLVE, 0, b"\0\0\0\xff", b"", b"1.2.3.4")),
    ("s4-address-0.0.1.0", s4(RESOLVE, 0, b"\0\0\x01\0", b"", b"1.2.3.4")),
    ("s4a-userid-and-name", s4a(RESOLVE, b"1.2.3.4", 0, b"someone"))))
case("s4a-name-255", s4a(RESOLVE, LONG_NAME), complete=True)
table(prefix="s4a-", rows=(
    ("name-256", s4a(RESOLVE, TOO_LONG_NAME)),
    ("connect-name-256", s4a(CONNECT, TOO_LONG_NAME)),
    ("name-unterminated", s4a(RESOLVE, b"www.example.test")[:-1]),
    ("name-empty-unterminated", s4(RESOLVE, 80, b"\0\0\0\x01"))))
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
# Offered 00 and 02, torsocksd picks 00 (method-choice).

table(prefix="s5-greeting-", rules="method-choice", rows=(
    ("zero-methods", b"\x05\x00"),
    ("noauth", (NOAUTH, PROBE)),
    ("userpass", (USERPASS, AUTH, PROBE)),
    ("both", (BOTH, AUTH, PROBE), NOAUTH_THEN_AUTH + PROBE_ANSWER),
    ("both-reversed", (b"\x05\x02\x02\x00", AUTH, PROBE),
     NOAUTH_THEN_AUTH + PROBE_ANSWER),
    # Offered both, then no RFC 1929 message: Tor, having chosen 02, reads
    # the request as one and fails it.
    ("both-no-auth", (BOTH, PROBE), b"\x05\x00" + PROBE_ANSWER),
    ("gssapi-only", b"\x05\x01\x01"),
    ("ff-only", b"\x05\x01\xff"),
    ("unknown-methods", b"\x05\x03\x03\x80\xfe"),
    ("duplicate-00", (b"\x05\x03\x00\x00\x00", PROBE)),
    ("255-methods", (b"\x05\xff" + bytes(range(255)), AUTH, PROBE),
     NOAUTH_THEN_AUTH + PROBE_ANSWER),
    ("255-methods-without-00",
     (b"\x05\xff" + bytes(range(1, 256)), AUTH, PROBE)),
    ("255-unknown-methods", b"\x05\xff" + b"\x80" * 255),
    ("truncated", b"\x05\x03\x00\x02"),
    ("then-greeting", (NOAUTH, NOAUTH))))               # both wait

# --- RFC 1929 ----------------------------------------------------------------

table(prefix="auth-", rows=(
    ("after-02", (USERPASS, AUTH, PROBE)),
    ("empty-fields", (USERPASS, b"\x01\x00\x00", PROBE)),
    ("empty-username", (USERPASS, b"\x01\x00\x04pass", PROBE)),
    ("255-255",
     (USERPASS, b"\x01\xff" + b"u" * 255 + b"\xff" + b"p" * 255, PROBE)),
    ("binary-fields", (USERPASS, b"\x01\x03\x00\xff\x80\x02\xc3\xa9", PROBE)),
    ("after-00", (NOAUTH, AUTH, PROBE)),        # Tor: 01 00 and goes on
    ("before-greeting", AUTH),
    ("before-greeting-truncated", b"\x01\x04us") + FAIL_FAST,
    ("twice", (USERPASS, AUTH, AUTH)),
    ("truncated", (USERPASS, b"\x01\x04us")),
    ("password-truncated", (USERPASS, b"\x01\x04user\x04pa")),
    # Wrong versions where the RFC 1929 message belongs.
    ("version-00", (USERPASS, b"\x00\x04user\x04pass")),
    ("version-02", (USERPASS, b"\x02\x04user\x04pass")),
    ("version-05", (USERPASS, b"\x05\x04user\x04pass")),
    ("version-05-request", (USERPASS, PROBE)),
    ("version-ff", (USERPASS, b"\xff\x04user\x04pass")),
    ("socks4-instead", (USERPASS, PROBE4), "socks4-after-greeting",
     b"\x05\x02" + r5(1)),
    ("http-instead", (USERPASS, b"GET / HTTP/1.0\r\n\r\n"),
     "not-socks5-after-greeting", b"\x05\x02" + r5(1)),
    ("then-socks4", (USERPASS, AUTH, PROBE4), "socks4-after-greeting",
     b"\x05\x02\x01\x00" + r5(1))))

# --- SOCKS5 requests: every command x address type ---------------------------

SOCKS5_COMMANDS = {"connect": CONNECT, "bind": BIND, "udp": UDP,
                   "resolve": RESOLVE, "resolve-ptr": RESOLVE_PTR,
                   "connect-dir": CONNECT_DIR, "cmd00": 0x00, "cmd04": 0x04,
                   "cmd7f": 0x7F, "cmdff": 0xFF}
UNKNOWN_COMMANDS = (0x00, 0x04, 0x7F, 0xFF)
TARGETS = {"atyp1": (1, PUBLIC4), "atyp3": (3, b"www.example.test"),
           "atyp4": (4, ipv6("2001:db8::1"))}
UNKNOWN_ATYPS = (0x00, 0x02, 0x05, 0xFF)


def request_difference(command: int):
    """(rules, expect) where torsocksd differs from Tor on purpose for a
    SOCKS5 request with a known address type, else None."""
    if command in UNKNOWN_COMMANDS:
        return "rfc1928-codes", after_greeting(r5(7))
    if command == CONNECT_DIR:
        # The relay's address is unreachable in the namespace.
        return "connect-dir", after_greeting(r5(3))
    return None


for command_label, command in SOCKS5_COMMANDS.items():
    for target_label, (atyp, address) in TARGETS.items():
        case("s5-%s-%s" % (command_label, target_label),
             NOAUTH, s5(command, atyp, address),
             complete=command in (CONNECT, RESOLVE, RESOLVE_PTR),
             differs=request_difference(command))
    known = command in (CONNECT, RESOLVE, RESOLVE_PTR, CONNECT_DIR)
    for atyp in UNKNOWN_ATYPS:
        case("s5-%s-atyp%02x" % (command_label, atyp),
             NOAUTH, bytes((5, command, 0, atyp)) + PUBLIC4 + port(80),
             differs=("rfc1928-codes", after_greeting(r5(8 if known else 7))))

# A bad byte is refused as soon as it arrives (Tor: by its grammar).
table(prefix="s5-", rules="rfc1928-codes", rows=(
    ("cmd04-two-bytes", (NOAUTH, b"\x05\x04"), after_greeting(r5(7))),
    ("connect-atyp05-four-bytes", (NOAUTH, b"\x05\x01\x00\x05"),
     after_greeting(r5(8))),
    ("connect-rsv-three-bytes", (NOAUTH, b"\x05\x01\x01"))))
# Reserved byte not zero.
for reserved in (0x01, 0x80, 0xFF):
    case("s5-connect-rsv%02x" % reserved, NOAUTH,
         s5(CONNECT, 1, PUBLIC4, reserved=reserved))
table(prefix="s5-", rows=(
    ("resolve-rsv01", (NOAUTH, s5(RESOLVE, 1, PUBLIC4, 0, reserved=1))),
    ("bind-rsv01", (NOAUTH, s5(BIND, 1, PUBLIC4, reserved=1))),
    ("cmd04-rsv01", (NOAUTH, s5(0x04, 1, PUBLIC4, reserved=1)),
     "rfc1928-codes", after_greeting(r5(7))),
    # Wrong version in the request.  A SOCKS4 request (Tor answers it as
    # one, and waits for a circuit).
    ("request-version-04", (NOAUTH, b"\x04" + s5(CONNECT, 1, PUBLIC4)[1:]),
     "socks4-after-greeting", after_greeting(r5(1))),
    ("request-version-00",
     (NOAUTH, b"\x00" + s5(CONNECT, 1, PUBLIC4)[1:]))))

# --- Port 0 ------------------------------------------------------------------

for target_label, (atyp, address) in TARGETS.items():
    for command_label, command in (("connect", CONNECT),
                                   ("connect-dir", CONNECT_DIR),
                                   ("bind", BIND), ("udp", UDP)):
        case("s5-%s-%s-port0" % (command_label, target_label),
             NOAUTH, s5(command, atyp, address, 0))
case("s5-resolve-atyp3-port0", NOAUTH,
     s5_name(RESOLVE, b"www.example.test", 0), complete=True)
case("s5-resolve-ptr-atyp1-port0", NOAUTH, s5(RESOLVE_PTR, 1, PUBLIC4, 0),
     complete=True)
table(rows=(
    ("s5-connect-private-port0", (NOAUTH, s5(CONNECT, 1, LOOPBACK4, 0))),
    ("s5-connect-bad-name-port0", (NOAUTH, s5_name(CONNECT, b"a..b", 0))),
    ("s5-connect-onion-port0", (NOAUTH, s5_name(CONNECT, ONION, 0)),
     "special-names", after_greeting(r5(4))),
    ("s4a-connect-port0", s4a(CONNECT, b"www.example.test", 0)),
    ("s4a-connect-dir-port0", s4a(CONNECT_DIR, b"www.example.test", 0))))

# --- Private and local destinations ------------------------------------------
# Tor refuses them (ClientRejectInternalAddresses); torsocksd lets a client on
# loopback reach them, so its answer is the connect's own error.

LOCAL_CONNECTS = (
    ("loopback", 1, LOOPBACK4, 5),
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
         differs=("local-destinations", after_greeting(r5(errno_reply))))
# fe80::1 without a scope: Tor refuses it (its virtual address range), the
# kernel too (EINVAL, a general failure).
case("s5-connect-ipv6-link-local", NOAUTH, s5(CONNECT, 4, ipv6("fe80::1")))
case("s5-connect-dir-local-loopback", NOAUTH,
     s5(CONNECT_DIR, 1, LOOPBACK4, CLOSED_PORT),
     differs=("connect-dir", after_greeting(r5(5))))

# CONNECTs that succeed: an echo server listens on ECHO_PORT of 127.0.0.1
# and ::1 in the namespace (tests/differential.py starts it).
ECHOED = after_greeting(r5(0) + b"ping", False)
for label, request in (
        ("ipv4", s5(CONNECT, 1, LOOPBACK4, ECHO_PORT)),
        ("ipv6", s5(CONNECT, 4, ipv6("::1"), ECHO_PORT)),
        ("localhost", s5_name(CONNECT, b"localhost", ECHO_PORT)),
        ("name-literal", s5_name(CONNECT, b"127.0.0.1", ECHO_PORT))):
    case("s5-connect-echo-" + label, NOAUTH, request, b"ping",
         differs=("local-destinations", ECHOED))
case("pipe-greeting-connect-echo",
     NOAUTH + s5(CONNECT, 1, LOOPBACK4, ECHO_PORT) + b"ping",
     differs=("local-destinations", ECHOED))
for name, request, literal in (
        ("s4-connect-echo", s4(CONNECT, ECHO_PORT, LOOPBACK4), ()),
        ("s4a-connect-echo-localhost",
         s4a(CONNECT, b"localhost", ECHO_PORT), ()),
        ("s4a-connect-echo-ipv4-literal",
         s4a(CONNECT, b"127.0.0.1", ECHO_PORT), ()),
        ("s4a-connect-echo-ipv6-literal",
         s4a(CONNECT, b"::1", ECHO_PORT), ("socks4a-ip-literal",)),
        ("s4a-connect-echo-ipv6-bracketed",
         s4a(CONNECT, b"[::1]", ECHO_PORT), ("socks4a-ip-literal",))):
    case(name, request, b"ping", differs=(
        literal + ("local-destinations",), Expect(S4_GRANTED + b"ping",
                                                  False)))
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
TOR_VIRTUAL4 = ipv4("127.192.0.1")
table(rules="resolve-ip-literal", rows=(
    ("s5-resolve-ipv6-fe80::1", (NOAUTH, s5(RESOLVE, 4, ipv6("fe80::1"))),
     after_greeting(b"\x05\x00\x00\x04" + ipv6("fe80::1") + b"\0\0")),
    ("s5-resolve-ipv4-127.192.0.1", (NOAUTH, s5(RESOLVE, 1, TOR_VIRTUAL4)),
     after_greeting(resolved4("127.192.0.1"))),
    ("s5-resolve-name-127.192.0.1",
     (NOAUTH, s5_name(RESOLVE, b"127.192.0.1")),
     after_greeting(resolved4("127.192.0.1"))),
    ("s4-resolve-127.192.0.1", s4(RESOLVE, 0, TOR_VIRTUAL4),
     b"\x00\x5a\x00\x00" + TOR_VIRTUAL4),
    ("s5-resolve-port-42", (NOAUTH, s5(RESOLVE, 1, PUBLIC4, 42))),
    ("s4-resolve-private", s4(RESOLVE, 0, LOOPBACK4))))

for address in ("1.2.3.4", TEST_ADDRESS):
    case("s5-resolve-ptr-ipv4-" + address, NOAUTH,
         s5(RESOLVE_PTR, 1, ipv4(address)), complete=True)
case("s5-resolve-ptr-ipv6-2001:db8::1", NOAUTH,
     s5(RESOLVE_PTR, 4, ipv6("2001:db8::1")), complete=True)
# Private addresses: Tor fails them at once (ClientDNSRejectInternalAddresses)
# with its ATYP 0 failure; the test resolver fails them too.
for label, atyp, address in (("ipv4-127.0.0.1", 1, LOOPBACK4),
                             ("ipv4-10.0.0.1", 1, ipv4("10.0.0.1")),
                             ("ipv4-192.168.0.1", 1, ipv4("192.168.0.1")),
                             ("ipv6-::1", 4, ipv6("::1")),
                             ("name-127.0.0.1", 3, b"127.0.0.1")):
    case("s5-resolve-ptr-" + label, NOAUTH, s5(RESOLVE_PTR, atyp, address),
         differs=("resolve-failure", after_greeting(RESOLVE_FAILED)))
for label, name in (("name-1.2.3.4", b"1.2.3.4"),
                    ("name-bracketed-ipv6", b"[2001:db8::1]"),
                    ("name-ipv6", b"2001:db8::1")):
    case("s5-resolve-ptr-" + label, NOAUTH, s5_name(RESOLVE_PTR, name),
         complete=True)
# Not an IP: 08 before any hostname check (the order of checks).
for label, name in (("name", b"www.example.test"),
                    ("arpa", b"4.3.2.1.in-addr.arpa"),
                    ("empty", b""), ("space", b"a b"), ("double-dot", b"a..b"),
                    ("onion", ONION), ("utf8", "é".encode()),
                    ("nul", b"a\0b")):
    case("s5-resolve-ptr-" + label, NOAUTH, s5_name(RESOLVE_PTR, name))
# Tor cuts at the NUL and sees an IP; torsocksd sees a name that is no IP.
case("s5-resolve-ptr-nul-after-ip", NOAUTH,
     s5_name(RESOLVE_PTR, b"1.2.3.4\0xyz"),
     differs=("nul-in-name", after_greeting(r5(8))))
# Bad names with commands that fail earlier: the command decides.
for command_label, command in (("bind", BIND), ("udp", UDP)):
    for label, name in (("space", b"a b"), ("empty", b""),
                        ("double-dot", b"a..b"), ("nul", b"a\0b")):
        case("s5-%s-name-%s" % (command_label, label), NOAUTH,
             s5_name(command, name))
MALFORMED_PTR = bytes.fromhex("05f10003036120620000")
case("s5-resolve-ptr-malformed-in-one", NOAUTH, MALFORMED_PTR)
bytewise("s5-resolve-ptr-malformed-bytewise", MALFORMED_PTR)

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
    """(rules, expect) where torsocksd differs from Tor on purpose for a
    hostname case, else None.  request: connect5, resolve5 (ATYP 3),
    connect4a, resolve4a."""
    if request == "connect5":
        if label in SPECIAL:
            # Tor: 01 for .exit and bad .onion names, a circuit for good ones.
            return "special-names", after_greeting(r5(4))
        if label in ("nul-inside", "nul-after-ip"):
            return "nul-in-name", after_greeting(r5(1))
        if label in LOOPBACK_NAMES:
            return "local-destinations", after_greeting(r5(5))
        if label == "dot-local":
            # Tor refuses *.local; the test resolver does not know it.
            return "local-destinations", after_greeting(r5(4))
    if request == "resolve5":
        if label in PARSER_REFUSED:
            return "refused-name-resolve", after_greeting(RESOLVE_FAILED)
        if label in SPECIAL + BRACKETED_NON_IPV6:
            # Tor refuses these after its parser, with its ATYP 0 failure.
            return "resolve-failure", after_greeting(RESOLVE_FAILED)
        if label in ("nul-inside", "nul-after-ip"):
            return "nul-in-name", after_greeting(r5(1))
    if request == "connect4a" and label in GOOD_ONIONS:
        return "special-names", S4_REJECTED
    return None


# Every hostname case is a whole request: where Tor accepts the name it
# waits for a circuit.  A SOCKS4A name ends at its NUL: what follows it is
# early data.
for label, name in HOSTNAMES.items():
    dport = CLOSED_PORT if label in LOOPBACK_NAMES else 80
    requests = {"connect4a": (s4a(CONNECT, name, dport),),
                "resolve4a": (s4a(RESOLVE, name),)}
    if len(name) <= 255:
        requests["connect5"] = NOAUTH, s5_name(CONNECT, name, dport)
        requests["resolve5"] = NOAUTH, s5_name(RESOLVE, name)
    for request, chunks in sorted(requests.items()):
        case("name-%s-%s" % (request, label), *chunks, complete=True,
             differs=hostname_difference(label, request))

# --- Pipelining: several messages in one chunk -------------------------------
# torsocksd answers every one of them (every-reply).

table(prefix="pipe-", rules="every-reply", rows=(
    ("greeting-resolve", NOAUTH + PROBE),
    ("greeting-resolve-extra", NOAUTH + PROBE + b"extra bytes"),
    ("greeting-bind", NOAUTH + s5(BIND, 1, PUBLIC4), after_greeting(r5(7))),
    ("greeting-udp", NOAUTH + s5(UDP, 1, PUBLIC4), after_greeting(r5(7))),
    ("greeting-cmd04", NOAUTH + s5(0x04, 1, PUBLIC4),
     ("every-reply", "rfc1928-codes"), after_greeting(r5(7))),
    ("greeting-bad-name", NOAUTH + s5_name(CONNECT, b"a..b"),
     after_greeting(r5(1))),
    ("greeting-ptr-name", NOAUTH + s5_name(RESOLVE_PTR, b"a b"),
     after_greeting(r5(8))),
    ("greeting-rsv01", NOAUTH + s5(CONNECT, 1, PUBLIC4, reserved=1),
     after_greeting(r5(1))),
    ("greeting-port0", NOAUTH + s5(CONNECT, 1, PUBLIC4, 0)),
    ("userpass-auth-resolve", USERPASS + AUTH + PROBE,
     b"\x05\x02\x01\x00" + PROBE_ANSWER),
    ("both-auth-resolve", BOTH + AUTH + PROBE,
     ("every-reply", "method-choice"), NOAUTH_THEN_AUTH + PROBE_ANSWER),
    ("noauth-auth-resolve", NOAUTH + AUTH + PROBE,
     NOAUTH_THEN_AUTH + PROBE_ANSWER),
    ("auth-resolve-after-greeting", (USERPASS, AUTH + PROBE)),
    ("greeting-http", NOAUTH + b"GET / HTTP/1.0\r\n\r\n",
     ("every-reply", "not-socks5-after-greeting"), after_greeting(r5(1))),
    ("greeting-socks4", NOAUTH + PROBE4,
     ("every-reply", "socks4-after-greeting"), after_greeting(r5(1))),
    ("greeting-garbage", NOAUTH + b"\x06\x07\x08",
     ("every-reply", "not-socks5-after-greeting"), after_greeting(r5(1))),
    ("greeting-tls", NOAUTH + CLIENT_HELLO_START,
     ("every-reply", "not-socks5-after-greeting"), after_greeting(r5(1))),
    ("two-greetings", NOAUTH + NOAUTH),
    ("greeting-zero-methods-then-request", b"\x05\x00" + PROBE),
    ("s4-resolve-twice", PROBE4 + PROBE4)))
table(prefix="pipe-", complete=True, rows=(
    ("greeting-connect-data",
     NOAUTH + s5(CONNECT, 1, PUBLIC4) + b"GET / HTTP/1.0\r\n\r\n"),
    ("greeting-connect-name-data",
     NOAUTH + s5_name(CONNECT, b"www.example.test") + b"x" * 900),
    ("s4a-connect-greeting", s4a(CONNECT, b"www.example.test") + NOAUTH)))

# Separate chunks: a greeting, then a message of the wrong kind.
table(prefix="after-greeting-", rules="not-socks5-after-greeting", rows=(
    ("http", (NOAUTH, b"GET / HTTP/1.0\r\n\r\n"), after_greeting(r5(1))),
    ("connect-method", (NOAUTH, b"CONNECT x:1 HTTP/1.0\r\n\r\n"),
     after_greeting(r5(1))),
    ("socks4", (NOAUTH, PROBE4), "socks4-after-greeting",
     after_greeting(r5(1))),
    ("garbage", (NOAUTH, b"\x06\x07\x08")),
    ("tls", (NOAUTH, CLIENT_HELLO_START)),
    ("auth-version-01-request", (NOAUTH, b"\x01\x01\x00\x01"))))

# --- Byte by byte ------------------------------------------------------------

for label, message in (
        ("greeting-resolve", NOAUTH + PROBE),
        ("socks4-resolve", PROBE4),
        ("socks4a-resolve-literal", s4a(RESOLVE, b"1.2.3.4", 0, b"id")),
        ("userpass-auth-resolve", USERPASS + AUTH + PROBE),
        ("resolve-name-literal", NOAUTH + s5_name(RESOLVE, b"1.2.3.4", 0)),
        ("resolve-ipv6", NOAUTH + s5(RESOLVE, 4, ipv6("2001:db8::1"), 0)),
        ("bind", NOAUTH + s5(BIND, 1, PUBLIC4)),
        ("connect-port0", NOAUTH + s5(CONNECT, 1, PUBLIC4, 0))):
    bytewise("bytewise-" + label, message)
bytewise("bytewise-cmd04", NOAUTH + s5(0x04, 1, PUBLIC4),
         differs=("rfc1928-codes", after_greeting(r5(7))))
bytewise("bytewise-connect", NOAUTH + s5(CONNECT, 1, PUBLIC4), complete=True)

# --- Truncations: every strict prefix waits ----------------------------------

NAME_REQUEST = s5_name(RESOLVE, b"www.example.test", 0)
IPV6_REQUEST = s5(RESOLVE, 4, ipv6("2001:db8::1"), 0)
SOCKS4A_REQUEST = s4a(RESOLVE, b"www.example.test", 0, b"id")
# label, the chunks sent before the message, the message, its lengths
for label, before, message, lengths in (
        ("greeting", (), BOTH, range(1, len(BOTH))),
        ("resolve-ipv4", (NOAUTH,), PROBE, range(1, len(PROBE))),
        ("resolve-name", (NOAUTH,), NAME_REQUEST,
         (1, 4, 5, 6, 12, len(NAME_REQUEST) - 2, len(NAME_REQUEST) - 1)),
        ("resolve-ipv6", (NOAUTH,), IPV6_REQUEST, (4, 5, 12, 20, 21)),
        ("socks4", (), PROBE4, range(1, len(PROBE4))),
        ("socks4a", (), SOCKS4A_REQUEST,
         (8, 9, 10, 11, 15, len(SOCKS4A_REQUEST) - 1)),
        ("auth", (USERPASS,), AUTH, range(1, len(AUTH)))):
    for length in lengths:
        case("truncated-%s-%d" % (label, length), *before, message[:length])
