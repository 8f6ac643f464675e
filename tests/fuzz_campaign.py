#!/usr/bin/env python3
"""A hostile-input campaign against torsocksd: the parsers, then a live server.

    python3 tests/fuzz_campaign.py [--cases N] [--connections N] [--seed S]

Needs torsocksd and the tests' conftest (its receive helpers and SOCKS
message builders, hence pytest); tests/test_hostile.py imports this module
and runs the same campaign with the CI sizes (FUZZ_CASES, FUZZ_CONNECTIONS).

Inputs are seeded: valid messages of every kind (SOCKS4/4A requests, SOCKS5
greetings, RFC 1929 messages, SOCKS5 requests with every ATYP and command
including F0/F1/F2, HTTP request lines, TLS ClientHello bytes, random bytes),
alone, repeated, interleaved, and mutated (bit flips, byte replacements,
truncations, extensions, insertions, deletions, duplicated ranges, splices).

Parser campaign: every input goes to every parser, which must return
NEED_MORE, Parsed with 0 < used <= len (whose message re-encodes to exactly
the bytes it used) or Rejected with a reply of that parser's valid shapes;
a prefix of the input may not contradict the whole input; bytes, bytearray
and memoryview give the same answer.

Live campaign: connections over loopback (IPv4 and IPv6 clients), many at
once from one non-blocking loop, each sending one input in random chunks
with small random pauses, then half-closing, holding the connection open,
or aborting it (close or RST).  A reference model of the handshake (which
reuses the pure parsers to find message boundaries and decides everything
else itself) gives the exact bytes each client must receive: only protocol
replies, then, for a CONNECT to the campaign's echo target, the echo of what
followed the request; and how it must end (EOF; a reset only where no reply
was due).  Destinations are the campaign's loopback echo ports and a free
port; a destination policy refuses everything else (02), so nothing leaves
this host, and names come from an in-memory resolver, never DNS.  Afterwards:
no error or traceback logged by torsocksd, no exception in any thread, the
server's loop alive, stats()["active"] back to 0, the process's socket and
pipe descriptors back to what they were, and a normal client still served.
"""

import argparse
import collections
import errno
import heapq
import ipaddress
import logging
import os
import random
import selectors
import socket
import struct
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, os.pardir))

import torsocksd  # noqa: E402
from conftest import (recv_up_to, socks4_request,  # noqa: E402
                      socks4a_request, socks5_greeting, socks5_reply,
                      socks5_request, socks5_target, userpass)
from torsocksd import (NEED_MORE, AddressType, Command, Parsed,  # noqa: E402
                       Rejected, Socks4Request, Socks5Greeting, Socks5Request,
                       UsernamePassword)

# Sizes of one CI run (tests/test_hostile.py).
FUZZ_CASES = 200_000
FUZZ_CONNECTIONS = 20_000

MAX_HANDSHAKE = torsocksd.MAX_HANDSHAKE_BYTES
# The live servers' handshake deadline: a client held open with an
# incomplete handshake waits this long for its refusal.
HANDSHAKE_TIMEOUT = 3.0

# -- names the live campaign's resolver knows --------------------------------

NAMES = {
    "echo.test": ["127.0.0.1"],
    "echo6.test": ["::1"],
    "both.test": ["::1", "127.0.0.1"],
    "mapped.test": ["::ffff:127.0.0.1"],
    "far.test": ["192.0.2.99"],                 # refused by policy
    "many.test": ["127.0.0.%d" % i for i in range(2, 22)],
    "v6only.test": ["2001:db8::7"],
}
REVERSE = {
    "127.0.0.1": "localhost.test",
    "::1": "ip6-localhost.test.",
    "192.0.2.7": "x" * 300,                     # cannot be carried: 04
    "192.0.2.8": "bad name",                    # space: 04
    "2001:db8::7": "v6only.test",
}
CREDENTIALS = [(b"alice", b"secret"), (b"", b"")]


class CampaignResolver:
    """The resolver of the standalone run: NAMES and REVERSE, answered from a
    thread (as the system resolver does) or at once, alternately."""

    def __init__(self, names=NAMES, reverse_names=REVERSE):
        self.names = names
        self.reverse_names = reverse_names
        self._flip = 0

    def _answer(self, callback, result):
        self._flip ^= 1
        if self._flip:
            threading.Thread(target=callback, args=(result,)).start()
        else:
            callback(result)

    def lookup(self, hostname, callback):
        answers = self.names.get(hostname)
        if answers is None:
            result = torsocksd.ResolverResult(
                (), torsocksd.Reply.HOST_UNREACHABLE, "no such test name")
        else:
            result = torsocksd.ResolverResult(
                tuple(ipaddress.ip_address(a) for a in answers))
        self._answer(callback, result)

    def reverse(self, address, callback):
        name = self.reverse_names.get(str(address))
        if name is None:
            result = torsocksd.ResolverResult(
                (), torsocksd.Reply.HOST_UNREACHABLE, "no such test address")
        else:
            result = torsocksd.ResolverResult((name,))
        self._answer(callback, result)


# =============================================================================
# Input generation
# =============================================================================

class Aim:
    """Where generated requests point: ports and names worth hitting."""

    def __init__(self, echo4=None, echo6=None, refused=None, names=NAMES,
                 credentials=CREDENTIALS, required=False):
        self.ports = [p for p in (echo4, echo6, refused) if p]
        self.echo4, self.echo6, self.refused = echo4, echo6, refused
        self.names = [n.encode() for n in names]
        self.credentials = list(credentials)
        self.required = required        # the server insists on RFC 1929


COMMANDS5 = (0x01, 0x02, 0x03, 0xF0, 0xF1, 0xF2)
COMMANDS4 = (0x01, 0x02, 0xF0, 0xF1, 0xF2, 0x03)
INTERESTING = (0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x07, 0x08, 0x16, 0x5A,
               0x5B, 0x7F, 0x80, 0xF0, 0xF1, 0xF2, 0xFE, 0xFF, 0x2E, 0x3A)
HTTP_LINES = (b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n",
              b"HEAD / HTTP/1.0\r\n\r\n", b"HEAD /x HTTP/1.1\r\n",
              b"POST /form HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc",
              b"PUT /x HTTP/1.1\r\n\r\n",
              b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com\r\n\r\n",
              b"OPTIONS * HTTP/1.1\r\n\r\n", b"DELETE /x HTTP/1.1\r\n\r\n",
              b"TRACE / HTTP/1.1\r\n\r\n", b"HEA", b"HEAD", b"HEAD ", b"H",
              b"HEADER", b"get / HTTP/1.0\r\n\r\n", b"GET")


def random_bytes(rng, size):
    return rng.getrandbits(8 * size).to_bytes(size, "little") if size else b""


def gen_port(rng, aim):
    c = rng.random()
    if aim.ports and c < 0.55:
        return rng.choice(aim.ports)
    if c < 0.62:
        return 0
    if c < 0.67:
        return 65535
    if c < 0.72:
        return rng.choice((80, 443, 9050, 1))
    return rng.randrange(65536)


def gen_ipv4(rng):
    c = rng.random()
    if c < 0.45:
        return bytes((127, 0, 0, 1))
    if c < 0.55:
        return bytes((127, 0, 0, rng.randrange(256)))
    if c < 0.60:
        return bytes(4)
    if c < 0.70:
        return bytes((0, 0, 0, rng.randrange(256)))      # SOCKS4A marker
    if c < 0.80:
        return rng.choice((bytes((192, 0, 2, 7)), bytes((192, 0, 2, 8)),
                           bytes((169, 254, 169, 254)), bytes((224, 0, 0, 1)),
                           bytes((255,) * 4), bytes((10, 0, 0, 1))))
    return random_bytes(rng, 4)


IPV6_CHOICES = tuple(ipaddress.ip_address(a).packed for a in (
    "::1", "::", "::ffff:127.0.0.1", "::ffff:192.0.2.7", "fe80::1",
    "2001:db8::7", "ff02::1", "::127.0.0.1", "64:ff9b::7f00:1"))


def gen_ipv6(rng):
    if rng.random() < 0.7:
        return rng.choice(IPV6_CHOICES[:4] if rng.random() < 0.6
                          else IPV6_CHOICES)
    return random_bytes(rng, 16)


NAME_CHOICES = (b"localhost", b"127.0.0.1", b"::1", b"[::1]",
                b"::ffff:127.0.0.1", b"[::ffff:127.0.0.1]", b"127.1",
                b"0x7f.0.0.1", b"fe80::1%lo", b"fe80::1%25lo", b"1.2.3.4.",
                b"hidden.onion", b"x.exit", b"onion", b"EXIT", b"a.onion.",
                b"ECHO.TEST", b"echo.test.", b"192.0.2.7", b"2001:db8::7",
                b"192.0.2.8", b"\xc3\xa9.test", b"a\x00b", b"a b", b"-", b".",
                b"[", b"]", b"%", b"missing.test", b"::", b"0.0.0.0")


def gen_hostname(rng, aim):
    c = rng.random()
    if c < 0.35 and aim.names:
        return rng.choice(aim.names)
    if c < 0.65:
        return rng.choice(NAME_CHOICES)
    if c < 0.75:
        size = rng.choice((1, 63, 254, 255, 256))
        return bytes(rng.randrange(0x21, 0x7F) for _ in range(size))
    if c < 0.90:
        return bytes(rng.randrange(0x21, 0x7F)
                     for _ in range(rng.randrange(1, 40)))
    return random_bytes(rng, rng.randrange(0, 30))


def gen_userid(rng, aim):
    c = rng.random()
    if c < 0.5:
        return b""
    if c < 0.7:
        return rng.choice((b"user", b"alice", b"x" * 511, b"x" * 512,
                           b"x" * 513, b"\xff\xfe"))
    return bytes(rng.randrange(1, 256) for _ in range(rng.randrange(1, 64)))


def gen_socks4(rng, aim):
    command = rng.choice(COMMANDS4) if rng.random() < 0.92 \
        else rng.randrange(256)
    port = gen_port(rng, aim)
    message = bytes((4, command)) + port.to_bytes(2, "big")
    if rng.random() < 0.45:         # SOCKS4A
        marker = rng.randrange(1, 256) if rng.random() < 0.9 else 0
        name = gen_hostname(rng, aim)
        return (message + bytes((0, 0, 0, marker)) + gen_userid(rng, aim)
                + b"\0" + name.replace(b"\0", b"") + b"\0")
    return message + gen_ipv4(rng) + gen_userid(rng, aim) + b"\0"


def gen_greeting(rng, aim):
    c = rng.random()
    if c < 0.3:
        methods = b"\x00"
    elif c < 0.5:
        methods = b"\x02"
    elif c < 0.65:
        methods = rng.choice((b"\x00\x02", b"\x02\x00", b"\x01", b"\xff",
                              b"\x01\x03\x80", b"\x02\x02"))
    elif c < 0.7:
        methods = b""
    else:
        methods = random_bytes(rng, rng.randrange(1, 256))
    return bytes((5, len(methods))) + methods


def gen_auth(rng, aim):
    c = rng.random()
    if c < 0.5 and aim.credentials:
        user, password = rng.choice(aim.credentials)
    elif c < 0.75:
        user, password = rng.choice(((b"alice", b"wrong"), (b"bob", b"secret"),
                                     (b"alice", b""), (b"x" * 255, b"y" * 255),
                                     (b"alice", b"secret\x00")))
    else:
        user = random_bytes(rng, rng.randrange(0, 256))
        password = random_bytes(rng, rng.randrange(0, 256))
    version = 1 if rng.random() < 0.93 else rng.randrange(256)
    return (bytes((version, len(user))) + user + bytes((len(password),))
            + password)


def gen_request5(rng, aim):
    command = rng.choice(COMMANDS5) if rng.random() < 0.92 \
        else rng.randrange(256)
    reserved = 0 if rng.random() < 0.95 else rng.randrange(1, 256)
    c = rng.random()
    if c < 0.35:
        address = b"\x01" + gen_ipv4(rng)
    elif c < 0.55:
        address = b"\x04" + gen_ipv6(rng)
    elif c < 0.95:
        name = gen_hostname(rng, aim)[:255]
        address = b"\x03" + bytes((len(name),)) + name
    else:
        address = bytes((rng.choice((0, 2, 5, 0xFF, rng.randrange(256))),)) \
            + random_bytes(rng, rng.randrange(0, 20))
    return bytes((5, command, reserved)) + address \
        + gen_port(rng, aim).to_bytes(2, "big")


def gen_http(rng, aim):
    line = rng.choice(HTTP_LINES)
    if rng.random() < 0.2:
        line += random_bytes(rng, rng.randrange(1, 100))
    return line


def gen_tls(rng, aim):
    body = random_bytes(rng, rng.randrange(0, 200))
    hello = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + len(hello).to_bytes(2, "big") + hello


def gen_random(rng, aim):
    data = bytearray(random_bytes(rng, rng.randrange(0, 64)))
    if data and rng.random() < 0.5:
        data[0] = rng.choice(INTERESTING)
    return bytes(data)


MESSAGE_KINDS = (gen_socks4, gen_greeting, gen_auth, gen_request5, gen_http,
                 gen_tls, gen_random)


def gen_early_data(rng):
    c = rng.random()
    if c < 0.35:
        return b""
    if c < 0.75:
        return random_bytes(rng, rng.randrange(1, 200))
    if c < 0.9:
        # Looks like more protocol: it is data for the target.
        return b"".join(rng.choice(MESSAGE_KINDS)(rng, Aim())
                        for _ in range(rng.randrange(1, 4)))
    return random_bytes(rng, rng.randrange(200, 3000))


def gen_connect(rng, aim):
    """A well-formed CONNECT (SOCKS5 over any ATYP, SOCKS4, SOCKS4A) to an
    echo target, as a working client sends it, with early data."""
    port = aim.echo4 or 1
    c = rng.random()
    if c < 0.3:
        target = socks5_target("127.0.0.1", port)
    elif c < 0.45 and aim.echo6:
        target = socks5_target("::1", aim.echo6)
    elif c < 0.55:
        target = socks5_target("::ffff:127.0.0.1", port)
    elif c < 0.7:
        name = rng.choice((b"echo.test", b"both.test", b"127.0.0.1",
                           b"mapped.test"))
        target = socks5_target(name, port)
    elif c < 0.85:
        userid = gen_userid(rng, aim).replace(b"\0", b"")[:512]
        return (socks4_request(Command.CONNECT, "127.0.0.1", port, userid)
                + gen_early_data(rng))
    else:
        name = rng.choice((b"echo.test", b"127.0.0.1"))
        return (socks4a_request(Command.CONNECT, name, port)
                + gen_early_data(rng))
    if aim.required and rng.random() < 0.8:
        greeting = rng.choice((b"\x05\x02\x00\x02", b"\x05\x01\x02"))
        if rng.random() < 0.7:
            auth = userpass(*rng.choice(aim.credentials))
        else:
            auth = gen_auth(rng, aim)
    else:
        greeting = rng.choice((b"\x05\x01\x00", b"\x05\x02\x00\x02",
                               b"\x05\x01\x02"))
        auth = gen_auth(rng, aim) if greeting == b"\x05\x01\x02" else b""
    return (greeting + auth + b"\x05\x01\x00" + target
            + gen_early_data(rng))


def gen_session(rng, aim):
    """One client's whole byte stream, before mutation."""
    if aim.echo4 and rng.random() < 0.15:
        return gen_connect(rng, aim)
    c = rng.random()
    if c < 0.33:
        greeting = gen_greeting(rng, aim)
        parts = [greeting]
        if b"\x02" in greeting[2:] or rng.random() < 0.2:
            parts.append(gen_auth(rng, aim))
        parts.append(gen_request5(rng, aim))
        parts.append(gen_early_data(rng))
        return b"".join(parts)
    if c < 0.52:
        return gen_socks4(rng, aim) + gen_early_data(rng)
    if c < 0.58:
        return gen_http(rng, aim)
    if c < 0.61:
        return gen_tls(rng, aim)
    if c < 0.64:
        return gen_random(rng, aim)
    if c < 0.76:
        return rng.choice(MESSAGE_KINDS)(rng, aim)
    if c < 0.90:        # interleaved messages of every version
        return b"".join(rng.choice(MESSAGE_KINDS)(rng, aim)
                        for _ in range(rng.randrange(2, 5)))
    message = rng.choice(MESSAGE_KINDS[:4])(rng, aim)       # repeated
    return message * rng.randrange(2, 6)


def mutate(rng, data, aim):
    data = bytearray(data)
    for _ in range(rng.randrange(1, 4)):
        op = rng.randrange(10)
        size = len(data)
        if op == 0 and size:                        # bit flip
            i = rng.randrange(size)
            data[i] ^= 1 << rng.randrange(8)
        elif op == 1 and size:                      # byte replacement
            i = rng.randrange(min(size, 12)) if rng.random() < 0.6 \
                else rng.randrange(size)
            data[i] = rng.choice(INTERESTING) if rng.random() < 0.6 \
                else rng.randrange(256)
        elif op == 2:                               # truncation
            del data[rng.randrange(size + 1):]
        elif op == 3:                               # extension
            data += random_bytes(rng, rng.randrange(1, 40))
        elif op == 4:                               # insertion
            i = rng.randrange(size + 1)
            data[i:i] = random_bytes(rng, rng.randrange(1, 8))
        elif op == 5 and size:                      # deletion
            i = rng.randrange(size)
            del data[i:i + rng.randrange(1, 8)]
        elif op == 6 and size:                      # duplicated range
            i = rng.randrange(size)
            j = min(size, i + rng.randrange(1, 16))
            data[j:j] = data[i:j]
        elif op == 7:                               # another message after
            data += rng.choice(MESSAGE_KINDS)(rng, aim)
        elif op == 8 and size:                      # splice with another
            other = rng.choice(MESSAGE_KINDS)(rng, aim)
            data = data[:rng.randrange(size + 1)] \
                + other[rng.randrange(len(other) + 1):]
        else:                                       # a length field
            if size > 1:
                data[1] = rng.choice((0, 1, 2, 3, 255, rng.randrange(256)))
    return bytes(data)


def gen_case(rng, aim):
    data = gen_session(rng, aim)
    if rng.random() < 0.5:
        data = mutate(rng, data, aim)
    return data


# =============================================================================
# Parser campaign
# =============================================================================

S4_REJECTED = bytes((0, 0x5B)) + bytes(6)


PARSER_REPLIES = {
    "parse_socks4_request": {S4_REJECTED},
    "parse_socks5_greeting": {b""},
    # RFC 1929 answers 01 01; the parser answers with the SOCKS5 10-byte
    # general failure.  Both are valid reply shapes.
    "parse_username_password": {b"", bytes((1, 1)),
                                socks5_reply(0x01)},
    "parse_socks5_request": {socks5_reply(c) for c in (1, 7, 8)},
}


def encode_parsed(message) -> bytes:
    """The wire bytes of a parsed message (each parser's message carries all
    its fields), to compare with the bytes the parser said it used."""
    if isinstance(message, Socks5Greeting):
        return socks5_greeting(*message.methods)
    if isinstance(message, UsernamePassword):
        return userpass(message.username, message.password)
    if isinstance(message, Socks5Request):
        host = message.host
        if message.address_type == AddressType.DOMAIN:
            host = host.encode("latin-1")     # ATYP 3 even for an IP literal
        return socks5_request(message.command, host, message.port)
    if isinstance(message, Socks4Request):
        if message.is_4a:
            raise ValueError("the SOCKS4A marker byte is not in the message")
        return socks4_request(message.command, message.host, message.port,
                              message.userid)
    raise TypeError("unknown message %r" % (message,))


MESSAGE_TYPES = {
    "parse_socks4_request": Socks4Request,
    "parse_socks5_greeting": Socks5Greeting,
    "parse_username_password": UsernamePassword,
    "parse_socks5_request": Socks5Request,
}
PARSERS = [(name, getattr(torsocksd, name)) for name in MESSAGE_TYPES]


class CampaignFailure(AssertionError):
    pass


def check_parse(name, parser, data, result):
    """Problems with one parser's answer to data, as a string, or None."""
    if result is NEED_MORE:
        return None
    if type(result) is Parsed:
        used, message = result.used, result.message
        if not (type(used) is int and 0 < used <= len(data)):
            return "used=%r outside 0 < used <= %d" % (used, len(data))
        if type(message) is not MESSAGE_TYPES[name]:
            return "message of type %s" % type(message).__name__
        if type(message) is Socks4Request and message.is_4a:
            # VN CD PORT 0.0.0.x USERID NUL HOST NUL: all but x re-encoded.
            raw = bytes(data[:used])
            head = bytes((4, message.command)) \
                + message.port.to_bytes(2, "big")
            tail = message.userid + b"\0" + message.host.encode("latin-1") \
                + b"\0"
            if not (raw[:4] == head and raw[4:7] == b"\0\0\0" and raw[7]
                    and raw[8:] == tail):
                return "SOCKS4A message %r does not re-encode" % (message,)
        else:
            try:
                encoded = encode_parsed(message)
            except (ValueError, UnicodeError) as error:
                return "message %r does not re-encode: %r" % (message, error)
            if encoded != bytes(data[:used]):
                return "message %r re-encodes to %s, used %s" % (
                    message, encoded.hex(), bytes(data[:used]).hex())
        if type(message) in (Socks5Request, Socks4Request):
            if not 0 <= message.port <= 65535:
                return "port %r" % message.port
            if message.command not in torsocksd.Command:
                return "command %r" % message.command
            # A name of at most 255 bytes is passed on for the handshake to
            # judge (after the command, as Tor does).
            if (getattr(message, "is_4a", False) or getattr(
                    message, "address_type", None) == AddressType.DOMAIN):
                if len(message.host) > 255:
                    return "hostname of %d bytes" % len(message.host)
        if type(message) is Socks4Request and len(message.userid) > 512:
            return "userid of %d bytes accepted" % len(message.userid)
        return None
    if type(result) is Rejected:
        if type(result.reply) is not bytes:
            return "reply of type %s" % type(result.reply).__name__
        if result.reply not in PARSER_REPLIES[name]:
            return "reply %s is not a valid shape" % result.reply.hex()
        if not (isinstance(result.reason, str) and result.reason):
            return "empty reason"
        return None
    return "returned %r" % (result,)


def check_http(data):
    result = torsocksd.parse_http_method(data)
    probe = bytes(data[:5])
    if b"HEAD ".startswith(probe) and len(probe) < 5:
        expected = NEED_MORE
    elif probe == b"HEAD ":
        expected = Parsed(b"HEAD", 0)
    else:
        expected = Parsed(b"", 0)
    if result != expected:
        return "parse_http_method -> %r, expected %r" % (result, expected)
    first = data[0] if data else None
    if first is not None:
        protocol = torsocksd.detect_protocol(first)
        want = {4: "SOCKS4", 5: "SOCKS5", 0x16: "TLS"}.get(first)
        if want is None:
            want = "HTTP" if first in b"GHPCODT" else "unknown"
        if protocol.value != want:
            return "detect_protocol(0x%02x) -> %s" % (first, protocol)
    return None


def check_hostname_reply(name):
    reply = torsocksd.socks5_hostname_reply(name)
    try:
        raw = name.rstrip(".").encode("ascii")
    except UnicodeEncodeError:
        raw = b""
    if raw and len(raw) <= 255 and all(0x21 <= b <= 0x7E for b in raw):
        expected = bytes((5, 0, 0, 3, len(raw))) + raw + b"\0\0"
    else:
        expected = socks5_reply(0x04)
    if reply != expected:
        return "socks5_hostname_reply(%r) -> %s" % (name, reply.hex())
    return None


def fuzz_parsers(cases, seed, report_every=None, out=print):
    """Run the parser campaign; returns a dict of figures; raises
    CampaignFailure naming the seed and the input on the first problem."""
    rng = random.Random("parsers-%d" % seed)
    aim = Aim(echo4=9, echo6=10, refused=11)
    outcomes = collections.Counter()
    started = time.monotonic()
    calls = 0

    def fail(case, data, problem):
        raise CampaignFailure(
            "parser campaign seed %d case %d: %s\n  input (%d bytes): %s"
            % (seed, case, problem, len(data), bytes(data).hex()))

    for case in range(cases):
        data = gen_case(rng, aim)
        variant = case % 4
        # Every parser reads the input; the RFC 1929 and request parsers
        # also read what follows a greeting (and an RFC 1929 message) the
        # greeting parser (and theirs) accepted, as the server feeds them.
        inputs = [(name, parser, data) for name, parser in PARSERS]
        greeting = torsocksd.parse_socks5_greeting(data)
        if type(greeting) is Parsed:
            rest = data[greeting.used:]
            inputs.append(("parse_socks5_request",
                           torsocksd.parse_socks5_request, rest))
            inputs.append(("parse_username_password",
                           torsocksd.parse_username_password, rest))
            auth = torsocksd.parse_username_password(rest)
            if type(auth) is Parsed:
                inputs.append(("parse_socks5_request",
                               torsocksd.parse_socks5_request,
                               rest[auth.used:]))
        for name, parser, given in inputs:
            cut = rng.randrange(len(given) + 1)
            try:
                result = parser(given)
                prefix = parser(given[:cut])
                if variant == 1:
                    other = parser(bytearray(given))
                elif variant == 2:
                    other = parser(memoryview(given))
                else:
                    other = result
            except Exception as error:
                fail(case, given, "%s raised %r" % (name, error))
            calls += 3 if variant in (1, 2) else 2
            problem = check_parse(name, parser, given, result)
            if problem is None:
                problem = check_parse(name, parser, given[:cut], prefix)
            if problem is None and other != result:
                problem = "bytearray/memoryview answer %r differs from %r" % (
                    other, result)
            if problem is None:
                # A prefix may wait for more, but never contradict the whole.
                if result is NEED_MORE and prefix is not NEED_MORE:
                    problem = "prefix of %d bytes -> %r, whole -> NEED_MORE" \
                        % (cut, prefix)
                elif type(prefix) is Parsed and prefix != result:
                    problem = "prefix of %d bytes -> %r, whole -> %r" % (
                        cut, prefix, result)
                elif type(prefix) is Rejected and (
                        type(result) is not Rejected
                        or result.reply != prefix.reply):
                    problem = "prefix of %d bytes -> %r, whole -> %r" % (
                        cut, prefix, result)
            if problem is not None:
                fail(case, given, "%s: %s" % (name, problem))
            outcomes["%s %s" % (name, "NEED_MORE" if result is NEED_MORE
                                else type(result).__name__)] += 1
        try:
            problem = check_http(data)
            if problem is None and case % 8 == 0:
                text = bytes(data[:rng.randrange(1, 300)]).decode("latin-1")
                problem = check_hostname_reply(text)
                address = torsocksd.ip_literal(text)
                if address is not None and not isinstance(
                        address, (ipaddress.IPv4Address,
                                  ipaddress.IPv6Address)):
                    problem = "ip_literal(%r) -> %r" % (text, address)
                reason = torsocksd.hostname_problem(text)
                if reason is not None and not isinstance(reason, str):
                    problem = "hostname_problem -> %r" % (reason,)
        except Exception as error:
            fail(case, data, "helper raised %r" % (error,))
        calls += 1
        if problem is not None:
            fail(case, data, problem)
        if report_every and case and case % report_every == 0:
            out("  parsers: %d cases, %.1f s" % (case,
                                                 time.monotonic() - started))
    elapsed = time.monotonic() - started
    return {"cases": cases, "parser_calls": calls, "seconds": elapsed,
            "outcomes": dict(sorted(outcomes.items()))}


# =============================================================================
# The reference model of a connection
# =============================================================================

LOOPBACK4 = ipaddress.ip_address("127.0.0.1")
LOOPBACK6 = ipaddress.ip_address("::1")
# A connection to the unspecified address lands on loopback (Linux).
LANDS_ON = {ipaddress.ip_address("0.0.0.0"): LOOPBACK4,
            ipaddress.ip_address("::"): LOOPBACK6}
HTTP_FIRST = frozenset(b"GHPCODT")


class Expectation:
    """What a client that sent data must get.

    replies   the bytes the server sends before anything relayed
    outcome   "close": the server closes after the replies;
              "relay": CONNECT succeeded, then the echo of payload;
              "wait":  the handshake is incomplete: on the client's EOF the
                       server closes silently; held open, the deadline
                       refusal (timeout_reply) follows
    unsafe    a connect attempt that would leave this host (the generator
              throws such inputs away)
    """
    __slots__ = ("replies", "outcome", "payload", "timeout_reply", "unsafe",
                 "label")

    def __init__(self, replies, outcome, payload=b"", timeout_reply=b"",
                 unsafe=False, label=""):
        self.replies = bytes(replies)
        self.outcome = outcome
        self.payload = payload
        self.timeout_reply = timeout_reply
        self.unsafe = unsafe
        self.label = label


def landing(address):
    """Where a connection to address arrives: IPv4-mapped IPv6 is IPv4, and
    the unspecified address is loopback."""
    plain = getattr(address, "ipv4_mapped", None) or address
    return LANDS_ON.get(plain, plain)


class Model:
    def __init__(self, echo4, echo6, refused, names=NAMES, reverse=REVERSE,
                 credentials=None, policy=None):
        self.echo4, self.echo6, self.refused = echo4, echo6, refused
        self.names = {n: [ipaddress.ip_address(a) for a in v]
                      for n, v in names.items()}
        self.reverse = reverse
        self.credentials = credentials
        self.policy = policy
        self.where = {}     # family -> "host:port" the HTTP page names

    # replies of the server's own making (not the parsers')
    @staticmethod
    def refusal(version, code, family):
        if version is None:
            return b""
        if version == 4:
            return S4_REJECTED
        return socks5_reply(code, ipv6_client=family != socket.AF_INET)

    def is_echo(self, address, port) -> bool:
        """Whether a connection to address:port reaches an echo target."""
        landed = landing(address)
        return (landed == LOOPBACK4 and port == self.echo4) or (
            landed == LOOPBACK6 and port == self.echo6)

    def expect(self, data, family) -> Expectation:
        budget = data[:MAX_HANDSHAKE]
        position, state, version, method = 0, "greeting", None, None
        out = bytearray()
        while True:
            buffered = budget[position:]
            if not buffered:
                result = NEED_MORE
            elif state == "greeting":
                first = buffered[0]
                if first == 4:
                    version = 4
                    result = torsocksd.parse_socks4_request(buffered)
                elif first == 5:
                    result = torsocksd.parse_socks5_greeting(buffered)
                elif first in HTTP_FIRST:
                    method = torsocksd.parse_http_method(buffered)
                    result = NEED_MORE if method is NEED_MORE else Rejected(
                        torsocksd.http_reply(method.message,
                                             self.where.get(family)), "http")
                else:
                    result = Rejected(b"", "not SOCKS")
            elif state == "auth" or (state == "request" and buffered[0] == 1
                                     and method == 0):
                # RFC 1929 after "no authentication": answered once, as Tor.
                result = torsocksd.parse_username_password(buffered)
            else:
                result = torsocksd.parse_socks5_request(buffered)
            if result is NEED_MORE:
                refusal = self.refusal(version, 1, family)
                if len(budget) >= MAX_HANDSHAKE:
                    return Expectation(out + refusal, "close",
                                       label="over %d bytes" % MAX_HANDSHAKE)
                return Expectation(out, "wait", timeout_reply=refusal,
                                   label="incomplete " + state)
            if type(result) is Rejected:
                reply = result.reply
                if (state == "request" and buffered[0] == 5
                        and len(buffered) > 3 and buffered[2] == 0
                        and buffered[3] not in (1, 3, 4)
                        and buffered[1] in (Command.BIND,
                                            Command.UDP_ASSOCIATE)):
                    # The command is judged before the address type.
                    reply = self.refusal(5, 7, socket.AF_INET)
                return Expectation(out + reply, "close",
                                   label="rejected in " + state)
            position += result.used
            message = result.message
            if state == "greeting" and type(message) is Socks5Greeting:
                version = 5
                methods = message.methods
                if self.credentials:
                    method = 2 if 2 in methods else 0xFF
                else:
                    method = 0 if 0 in methods else 2 if 2 in methods \
                        else 0xFF
                out += bytes((5, method))
                if method == 0xFF:
                    return Expectation(out, "close", label="no method")
                state = "auth" if method == 2 else "request"
            elif type(message) is UsernamePassword:
                accepted = not self.credentials or (
                    (message.username, message.password) in self.credentials)
                out += bytes((1, 0 if accepted else 1))
                if not accepted:
                    return Expectation(out, "close", label="bad password")
                state, method = "request", 2
            else:
                return self.decide(message, version, family, out,
                                   data[position:])

    def decide(self, request, version, family, out, after):
        command = request.command
        host, port = request.host, request.port
        if command in (Command.RESOLVE, Command.RESOLVE_PTR):
            family = socket.AF_INET     # lookup failures: always 10 bytes

        def refuse(code, label):
            return Expectation(out + self.refusal(version, code, family),
                               "close", label=label)

        if type(request) is Socks4Request and self.credentials:
            return refuse(2, "SOCKS4 with credentials")
        if command in (Command.BIND, Command.UDP_ASSOCIATE):
            return refuse(7, "unsupported command")
        if command == Command.RESOLVE_PTR and version == 4:
            return refuse(7, "SOCKS4 PTR")
        address = torsocksd.ip_literal(host)
        if command == Command.RESOLVE_PTR and address is None:
            return refuse(8, "PTR of a name")
        if torsocksd.hostname_problem(host):
            # Bytes outside printable ASCII: 01 for every command; a name
            # only Tor's rule refuses: a lookup's failure for RESOLVE.
            lookup = command in (Command.RESOLVE, Command.RESOLVE_PTR)
            printable = host.isascii() and host.isprintable()
            return refuse(4 if lookup and printable else 1, "malformed name")
        if command == Command.RESOLVE_PTR:
            name = self.reverse.get(str(address))
            if name is None:
                return refuse(4, "PTR unknown")
            raw = name.rstrip(".").encode("ascii", "replace")
            if 1 <= len(raw) <= 255 and all(0x21 <= b <= 0x7E for b in raw):
                reply = bytes((5, 0, 0, 3, len(raw))) + raw + b"\0\0"
            else:
                # socks5_hostname_reply's failure is always the 10-byte form.
                reply = bytes((5, 4, 0, 1)) + bytes(6)
            return Expectation(out + reply, "close", label="PTR answered")
        if address is not None:
            answers = [address]
        else:
            lowered = host.rstrip(".").lower()
            if lowered.endswith((".onion", ".exit")) or lowered in (
                    "onion", "exit"):
                return refuse(4, "special name")
        if port == 0 and command in (Command.CONNECT, Command.CONNECT_DIR):
            return refuse(1, "port 0")
        if address is None:
            answers = self.names.get(host)
            if answers is None:
                return refuse(4, "unknown name")
        if command == Command.RESOLVE:
            usable = [a for a in answers if version == 5 or a.version == 4]
            if not usable:
                return refuse(4, "RESOLVE without usable answer")
            best = next((a for a in usable if a.version == 4), usable[0])
            if version == 4:
                reply = bytes((0, 0x5A, 0, 0)) + best.packed
            else:
                reply = bytes((5, 0, 0, 1 if best.version == 4 else 4)) \
                    + best.packed + b"\0\0"
            return Expectation(out + reply, "close", label="RESOLVE answered")
        if command == Command.CONNECT_DIR:
            # The first address the policy allows is taken as a relay's
            # ORPort.  The campaign's targets are echo servers (TLS fails:
            # 01) or a refused port (05); none is a Tor relay.
            for candidate in answers:
                if not self.policy.refusal(True, candidate, port):
                    break
            else:
                return refuse(2, "CONNECT_DIR refused by policy")
            echo = self.is_echo(candidate, port)
            return refuse(1 if echo else 5, "CONNECT_DIR to a non-relay")
        # CONNECT
        last, unsafe = 1, False
        for candidate in torsocksd.happy_eyeballs_order(answers)[:16]:
            if self.policy.refusal(True, candidate, port):
                last = 2
                continue
            if not landing(candidate).is_loopback:
                unsafe = True
            if self.is_echo(candidate, port):
                if version == 4:
                    reply = bytes((0, 0x5A)) + bytes(6)
                else:
                    reply = self.refusal(5, 0, family)
                return Expectation(out + reply, "relay", payload=after,
                                   unsafe=unsafe, label="relayed")
            last = 5
        expectation = refuse(last, "connect failed")
        expectation.unsafe = unsafe
        return expectation


# =============================================================================
# The live campaign
# =============================================================================

def socket_and_pipe_fds():
    """(sockets, pipes, all) open in this process."""
    sockets = pipes = total = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink("/proc/self/fd/" + fd)
        except OSError:
            continue
        total += 1
        if target.startswith("socket:"):
            sockets += 1
        elif target.startswith("pipe:"):
            pipes += 1
    return sockets, pipes, total


class ProblemLog(logging.Handler):
    """Records torsocksd's log records that carry a traceback or are errors;
    counts warnings."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.problems = []
        self.warnings = collections.Counter()

    def emit(self, record):
        if record.exc_info or record.levelno >= logging.ERROR:
            try:
                self.problems.append(self.format(record))
            except Exception:
                self.problems.append(repr(record.__dict__))
        elif record.levelno >= logging.WARNING:
            self.warnings[record.getMessage()[:80]] += 1

    def __enter__(self):
        self.saved_level = torsocksd.log.level
        if not torsocksd.log.isEnabledFor(logging.WARNING):
            torsocksd.log.setLevel(logging.WARNING)
        torsocksd.log.addHandler(self)
        return self

    def __exit__(self, *exc_info):
        torsocksd.log.removeHandler(self)
        torsocksd.log.setLevel(self.saved_level)


class ThreadErrors:
    """Exceptions that end any thread while the campaign runs."""

    def __init__(self):
        self.errors = []

    def __enter__(self):
        self.saved = threading.excepthook

        def hook(args):
            import traceback
            frames = traceback.extract_tb(args.exc_traceback)[-6:]
            self.errors.append("%s in thread %s: %r, raised at %s" % (
                args.exc_type.__name__,
                args.thread.name if args.thread else "?", args.exc_value,
                " <- ".join("%s:%d %s" % (os.path.basename(f.filename),
                                          f.lineno, f.name)
                            for f in reversed(frames))))
            self.saved(args)
        threading.excepthook = hook
        return self

    def __exit__(self, *exc_info):
        threading.excepthook = self.saved


class _Client:
    __slots__ = ("index", "sock", "data", "chunks", "mode", "family",
                 "expect", "received", "sent", "end", "started", "deadline",
                 "events", "abort_reset", "done", "waiting", "send_error")


class _EchoConn:
    __slots__ = ("sock", "pending", "eof", "events")


class LiveCampaign:
    """Echo targets and a refused port on loopback, and a non-blocking client
    loop that runs connections against a server.  Build the server with
    policy() and NAMES/REVERSE (and CREDENTIALS if credentials are on)."""

    CLIENT_DEADLINE = 15.0       # seconds any one connection may take

    def __init__(self, seed):
        self.seed = seed
        self.selector = selectors.DefaultSelector()
        self.listeners = []
        self.echo4 = self._listen(socket.AF_INET, "127.0.0.1")
        try:
            self.echo6 = self._listen(socket.AF_INET6, "::1")
        except OSError:
            self.echo6 = None
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.refused = probe.getsockname()[1]
        self.echo_conns = {}

    def _listen(self, family, host):
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, 0))
        listener.listen(1024)
        listener.setblocking(False)
        self.listeners.append(listener)
        self.selector.register(listener, selectors.EVENT_READ,
                               ("listener", listener))
        return listener.getsockname()[1]

    def policy_rules(self):
        rules = ["accept 127.0.0.1:%d" % self.echo4,
                 "accept 127.0.0.1:%d" % self.refused]
        if self.echo6:
            rules += ["accept [::1]:%d" % self.echo6,
                      "accept [::1]:%d" % self.refused]
        return rules + ["reject *"]

    def policy(self):
        return torsocksd.DestinationPolicy(self.policy_rules())

    def close(self):
        for conn in list(self.echo_conns.values()):
            self._echo_close(conn)
        for listener in self.listeners:
            self.selector.unregister(listener)
            listener.close()
        self.listeners = []
        self.selector.close()

    # -- the echo target ------------------------------------------------------

    def _echo_accept(self, listener):
        for _ in range(64):
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            sock.setblocking(False)
            conn = _EchoConn()
            conn.sock, conn.pending, conn.eof = sock, bytearray(), False
            conn.events = selectors.EVENT_READ
            self.echo_conns[sock.fileno()] = conn
            self.selector.register(sock, conn.events, ("echo", conn))

    def _echo_close(self, conn):
        fd = conn.sock.fileno()
        if fd >= 0:
            self.selector.unregister(conn.sock)
            self.echo_conns.pop(fd, None)
        conn.sock.close()

    def _echo_event(self, conn, mask):
        try:
            if mask & selectors.EVENT_READ:
                data = conn.sock.recv(65536)
                if data:
                    conn.pending += data
                else:
                    conn.eof = True
            if conn.pending:
                sent = conn.sock.send(conn.pending)
                del conn.pending[:sent]
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self._echo_close(conn)
            return
        if conn.eof and not conn.pending:
            self._echo_close(conn)
            return
        events = selectors.EVENT_WRITE if conn.pending \
            else selectors.EVENT_READ
        if events != conn.events:
            conn.events = events
            self.selector.modify(conn.sock, events, ("echo", conn))

    def _pump(self, stop):
        while not stop.is_set():
            for key, mask in self.selector.select(0.02):
                kind, obj = key.data
                if kind == "echo":
                    self._echo_event(obj, mask)
                elif kind == "listener":
                    self._echo_accept(obj)

    def check_normal_client(self, server, credentials=None):
        """None when a normal SOCKS5 client is served (CONNECT to the echo
        target, a round trip), else what went wrong."""
        stop = threading.Event()
        pump = threading.Thread(target=self._pump, args=(stop,),
                                name="campaign-echo", daemon=True)
        pump.start()
        try:
            return normal_client_works(server.address, self.echo4,
                                       credentials)
        except OSError as error:
            return "normal client: %r" % (error,)
        finally:
            stop.set()
            pump.join()

    # -- the clients -------------------------------------------------------

    def plan(self, rng, aim, model, families, index):
        """One client: its input, chunks, mode and expectation."""
        family = rng.choice(families)
        for _ in range(20):
            data = gen_case(rng, aim)
            expectation = model.expect(data, family)
            if not expectation.unsafe:
                break
        else:
            data = b"\x05\x01\x00"
            expectation = model.expect(data, family)
        c = rng.random()
        if c < 0.82:
            mode = "halfclose"
        elif c < 0.92:
            mode = "abort"
        else:
            mode = "hold"
        if mode == "hold" and expectation.outcome == "wait" \
                and rng.random() < 0.7:
            mode = "halfclose"      # a few deadline waits suffice
        chunks = []
        position = 0
        split = rng.random()
        # At most ~40 chunks: the whole handshake must arrive well within
        # the server's handshake deadline even with many clients at once.
        smallest = len(data) // 40 + 1
        while position < len(data):
            if split < 0.5:
                size = len(data)
            elif split < 0.8:
                size = max(smallest, rng.randrange(1, 64))
            else:
                size = max(smallest, rng.randrange(1, 4))
            pause = 0.0
            if rng.random() < 0.1:
                pause = rng.random() * 0.003
            chunks.append((data[position:position + size], pause))
            position += size
        if mode == "abort":
            chunks = chunks[:rng.randrange(len(chunks) + 1)]
        client = _Client()
        client.index = index
        client.data = data
        client.chunks = collections.deque(chunks)
        client.mode = mode
        client.family = family
        client.expect = expectation
        client.received = bytearray()
        client.sent = 0
        client.end = None
        client.abort_reset = rng.random() < 0.5
        client.done = False
        client.waiting = False
        client.send_error = None
        return client

    def run(self, server, connections, concurrency=64, credentials=None,
            progress=None, max_failures=20):
        """Run connections against server; returns a dict of figures with
        "failures" (a list of strings)."""
        rng = random.Random("live-%d-%d" % (self.seed, bool(credentials)))
        model = Model(self.echo4, self.echo6, self.refused,
                      credentials=credentials, policy=self.policy())
        aim = Aim(self.echo4, self.echo6, self.refused,
                  credentials=credentials or CREDENTIALS,
                  required=bool(credentials))
        addresses = {}
        for sockaddr in server.addresses:
            family = socket.AF_INET6 if ":" in sockaddr[0] else socket.AF_INET
            addresses.setdefault(family, sockaddr[:2])
        families = sorted(addresses)
        model.where = {family: torsocksd.format_address(address)
                       for family, address in addresses.items()}
        failures = []
        figures = collections.Counter()
        before = socket_and_pipe_fds()
        pipes_before = len(getattr(server, "_pipes", ()))
        timers = []
        sequence = 0
        clients = {}
        started = time.monotonic()
        next_index = 0
        finished = 0
        selector = self.selector

        def fail(client, problem):
            figures["failed"] += 1
            if len(failures) < max_failures:
                failures.append(
                    "live seed %d case %d (%s, %s client, %s): %s\n"
                    "  sent %d bytes: %s\n  expected %s (%s): %s\n"
                    "  got %d bytes, %s: %s" % (
                        self.seed, client.index, client.mode,
                        "IPv6" if client.family == socket.AF_INET6
                        else "IPv4", client.expect.label, problem,
                        len(client.data), client.data[:600].hex(),
                        client.expect.outcome,
                        "+%d payload" % len(client.expect.payload),
                        client.expect.replies.hex(), len(client.received),
                        client.end, bytes(client.received[:600]).hex()))

        def schedule(when, client, what):
            nonlocal sequence
            sequence += 1
            heapq.heappush(timers, (when, sequence, client, what))

        def open_client():
            nonlocal next_index, finished
            client = self.plan(rng, aim, model, families, next_index)
            next_index += 1
            sock = socket.socket(client.family, socket.SOCK_STREAM)
            sock.setblocking(False)
            client.sock = sock
            client.started = time.monotonic()
            client.deadline = client.started + self.CLIENT_DEADLINE
            error = sock.connect_ex(addresses[client.family])
            if error not in (0, errno.EINPROGRESS):
                client.end = "connect: %s" % errno.errorcode.get(error, error)
                client.done = True
                finished += 1
                fail(client, "could not connect to the server")
                sock.close()
                return
            client.events = selectors.EVENT_READ | selectors.EVENT_WRITE
            selector.register(sock, client.events, ("client", client))
            clients[sock.fileno()] = client
            schedule(client.deadline, client, "deadline")

        def set_events(client, events):
            if events != client.events:
                client.events = events
                selector.modify(client.sock, events, ("client", client))

        def finish(client):
            nonlocal finished
            if client.done:
                return
            client.done = True
            finished += 1
            selector.unregister(client.sock)
            clients.pop(client.sock.fileno(), None)
            client.sock.close()
            if client.mode != "abort":
                verify(client)
            figures["mode " + client.mode] += 1
            figures["outcome " + client.expect.outcome] += 1

        def verify(client):
            expect = client.expect
            got = bytes(client.received)
            if client.mode == "halfclose":
                want = expect.replies + (expect.payload if expect.outcome
                                         == "relay" else b"")
            elif expect.outcome == "wait":
                want = expect.replies + expect.timeout_reply
            else:
                want = expect.replies + (expect.payload if expect.outcome
                                         == "relay" else b"")
            if got != want:
                fail(client, "bytes differ from the model (first difference "
                     "at %d)" % next((i for i, (a, b) in enumerate(
                         zip(got, want)) if a != b), min(len(got),
                                                         len(want))))
                return
            if client.end == "held-complete":
                return
            if client.end == "eof":
                return
            if client.end == "reset" and not want:
                figures["reset with nothing due"] += 1
                return
            fail(client, "ended with %s" % client.end)

        def send_some(client):
            while client.chunks:
                chunk, pause = client.chunks[0]
                try:
                    sent = client.sock.send(chunk)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError as error:
                    client.send_error = errno.errorcode.get(error.errno,
                                                            error)
                    client.chunks.clear()
                    break
                client.sent += sent
                if sent < len(chunk):
                    client.chunks[0] = (chunk[sent:], pause)
                    return
                client.chunks.popleft()
                if pause and client.chunks:
                    client.waiting = True
                    set_events(client, selectors.EVENT_READ)
                    schedule(time.monotonic() + pause, client, "resume")
                    return
            # everything sent
            set_events(client, selectors.EVENT_READ)
            if client.mode == "halfclose":
                try:
                    client.sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
            elif client.mode == "abort":
                schedule(time.monotonic() + rng.random() * 0.01, client,
                         "abort")

        def on_client(client, mask):
            if client.done:
                return
            if mask & selectors.EVENT_READ:
                try:
                    data = client.sock.recv(65536)
                except (BlockingIOError, InterruptedError):
                    data = None
                except OSError as error:
                    client.end = "reset" if error.errno == errno.ECONNRESET \
                        else "error %s" % errno.errorcode.get(error.errno)
                    finish(client)
                    return
                if data == b"":
                    client.end = "eof"
                    finish(client)
                    return
                if data:
                    client.received += data
                    expect = client.expect
                    if (client.mode == "hold" and expect.outcome == "relay"
                            and len(client.received) >= len(expect.replies)
                            + len(expect.payload)):
                        client.end = "held-complete"
                        finish(client)
                        return
            if mask & selectors.EVENT_WRITE and not client.waiting:
                send_some(client)

        def on_timer(client, what):
            if client.done:
                return
            if what == "deadline":
                client.end = "no end within %.0f s" % self.CLIENT_DEADLINE
                if client.mode == "abort":
                    fail(client, client.end)
                finish(client)
            elif what == "resume":
                client.waiting = False
                set_events(client, selectors.EVENT_READ
                           | selectors.EVENT_WRITE)
            elif what == "abort":
                if client.abort_reset:
                    client.sock.setsockopt(socket.SOL_SOCKET,
                                           socket.SO_LINGER,
                                           struct.pack("ii", 1, 0))
                client.end = "aborted"
                finish(client)

        report_at = started + 5.0
        loop_thread = getattr(server, "_thread", None)
        while finished < connections:
            while len(clients) < concurrency and next_index < connections:
                open_client()
                if next_index >= connections:
                    break
            timeout = 0.05
            if timers:
                timeout = max(0.0, min(timeout, timers[0][0]
                                       - time.monotonic()))
            for key, mask in selector.select(timeout):
                kind, obj = key.data
                if kind == "client":
                    on_client(obj, mask)
                elif kind == "echo":
                    self._echo_event(obj, mask)
                else:
                    self._echo_accept(obj)
            now = time.monotonic()
            while timers and timers[0][0] <= now:
                _, _, client, what = heapq.heappop(timers)
                on_timer(client, what)
            if progress and now >= report_at:
                report_at = now + 5.0
                progress("  live: %d/%d connections, %.1f s" % (
                    finished, connections, now - started))
            if next_index >= connections and not clients:
                break
            if loop_thread is not None and not loop_thread.is_alive():
                failures.insert(0, "live seed %d: the server's loop thread "
                                "died after %d connections; stopped there "
                                "(the failures below are its consequences)"
                                % (self.seed, finished))
                for client in list(clients.values()):
                    client.end = "server died"
                    client.mode = "abort"
                    finish(client)
                break
        elapsed = time.monotonic() - started

        # Let the server finish: aborted connections and echo targets close.
        settle = time.monotonic() + 10.0
        while time.monotonic() < settle:
            for key, mask in selector.select(0.02):
                kind, obj = key.data
                if kind == "echo":
                    self._echo_event(obj, mask)
                elif kind == "listener":
                    self._echo_accept(obj)
            if server.stats()["active"] == 0 and not self.echo_conns:
                break
        active = server.stats()["active"]
        if active:
            failures.append("live seed %d: stats()['active'] is %d, not 0, "
                            "10 s after the last client closed"
                            % (self.seed, active))
        if self.echo_conns:
            failures.append("live seed %d: %d target connections still open"
                            % (self.seed, len(self.echo_conns)))
        after = socket_and_pipe_fds()
        pipes_after = len(getattr(server, "_pipes", ()))
        pooled = 2 * (pipes_after - pipes_before)
        if after[0] != before[0] or after[1] - pooled != before[1]:
            failures.append(
                "live seed %d: descriptors before (sockets, pipes, all) %r, "
                "after %r (%d pipe fds pooled by the server)"
                % (self.seed, before, after, pooled))
        result = {"connections": finished, "seconds": elapsed,
                  "failures": failures, "fds_before": before,
                  "fds_after": after}
        result.update(figures)
        return result


def normal_client_works(address, echo_port, credentials=None):
    """A plain SOCKS5 CONNECT to 127.0.0.1:echo_port and back, blocking;
    None when it worked, else what went wrong."""
    with socket.create_connection(address, timeout=10) as sock:
        if credentials:
            sock.sendall(socks5_greeting(2))
            if recv_up_to(sock, 2) != b"\x05\x02":
                return "no 05 02 method reply"
            sock.sendall(userpass(*credentials[0]))
            if recv_up_to(sock, 2) != b"\x01\x00":
                return "credentials refused"
        else:
            sock.sendall(socks5_greeting(0))
            if recv_up_to(sock, 2) != b"\x05\x00":
                return "no 05 00 method reply"
        sock.sendall(socks5_request(Command.CONNECT, "127.0.0.1", echo_port))
        reply = recv_up_to(sock, 10)
        if reply[:2] != b"\x05\x00":
            return "CONNECT reply %s" % reply.hex()
        sock.sendall(b"still served")
        echoed = recv_up_to(sock, 12)
        if echoed != b"still served":
            return "echo %r" % echoed
    return None


def live_campaign(server, campaign, connections, concurrency=64,
                  credentials=None, progress=None):
    """Run the live campaign on a started server, with the checks that need
    the server: log, threads, loop alive, a normal client afterwards."""
    with ProblemLog() as problems, ThreadErrors() as thread_errors:
        figures = campaign.run(server, connections, concurrency=concurrency,
                               credentials=credentials, progress=progress)
    failures = figures["failures"]
    first = []
    thread = getattr(server, "_thread", None)
    if thread is not None and not thread.is_alive():
        first.append("the server's loop thread has died")
    if thread_errors.errors:
        first.append("exceptions in threads: %s" % thread_errors.errors[:3])
    if problems.problems:
        first.append("torsocksd logged %d error(s)/traceback(s); first: %s"
                     % (len(problems.problems), problems.problems[0]))
    failures[:0] = first
    figures["warnings"] = dict(problems.warnings)
    return figures


# =============================================================================
# Command line
# =============================================================================

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=FUZZ_CASES,
                        help="parser cases (default %(default)s)")
    parser.add_argument("--connections", type=int, default=FUZZ_CONNECTIONS,
                        help="live connections (default %(default)s)")
    parser.add_argument("--seed", type=int,
                        default=random.SystemRandom().randrange(1 << 32))
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--credentials-share", type=float, default=0.2,
                        help="share of the connections run against a server "
                             "with credentials and the splice relay")
    options = parser.parse_args(argv)
    print("fuzz campaign seed %d (replay with --seed %d)"
          % (options.seed, options.seed))
    status = 0

    started = time.monotonic()
    try:
        figures = fuzz_parsers(options.cases, options.seed,
                               report_every=100_000)
    except CampaignFailure as failure:
        print("FAILED: %s" % failure)
        status = 1
    else:
        print("parsers: %d cases, %d parser calls in %.1f s (%.0f cases/s)"
              % (figures["cases"], figures["parser_calls"],
                 figures["seconds"], figures["cases"]
                 / max(figures["seconds"], 1e-9)))
        for outcome, count in figures["outcomes"].items():
            print("  %-40s %d" % (outcome, count))

    phases = []
    with_credentials = int(options.connections * options.credentials_share)
    if options.connections - with_credentials:
        phases.append(("plain, copy relay", None, False,
                       options.connections - with_credentials))
    if with_credentials:
        phases.append(("credentials, %s relay" % (
            "splice" if torsocksd.HAVE_SPLICE else "copy"), CREDENTIALS,
            torsocksd.HAVE_SPLICE, with_credentials))
    for label, credentials, splice, count in phases:
        campaign = LiveCampaign(options.seed)
        listen = [("127.0.0.1", 0)]
        if campaign.echo6:
            listen.append(("::1", 0))
        server = torsocksd.Server(
            listen, resolver=CampaignResolver(),
            handshake_timeout=HANDSHAKE_TIMEOUT,
            destination_policy=campaign.policy(), splice=splice,
            credentials=torsocksd.Credentials(credentials)
            if credentials else None).start()
        try:
            figures = live_campaign(server, campaign, count,
                                    concurrency=options.concurrency,
                                    credentials=credentials, progress=print)
            problem = campaign.check_normal_client(server, credentials)
            if problem:
                figures["failures"].append("a normal client was not served "
                                           "after the campaign: " + problem)
        finally:
            server.stop()
            campaign.close()
        print("live (%s): %d connections in %.1f s (%.0f/s); %s" % (
            label, figures["connections"], figures["seconds"],
            figures["connections"] / max(figures["seconds"], 1e-9),
            ", ".join("%s %s" % (k, v) for k, v in sorted(figures.items())
                      if k.startswith(("mode", "outcome", "reset")))))
        if figures["warnings"]:
            print("  torsocksd warnings: %r" % figures["warnings"])
        for failure in figures["failures"]:
            print("FAILED: %s" % failure)
            status = 1
    print("total %.1f s, seed %d: %s" % (time.monotonic() - started,
                                         options.seed,
                                         "FAILED" if status else "ok"))
    return status


if __name__ == "__main__":
    sys.exit(main())
