#!/usr/bin/env python3
"""torsocksd: a small SOCKS server that speaks Tor's SOCKS dialect.

It serves SOCKS4, SOCKS4A and SOCKS5 (RFC 1928, with RFC 1929 username and
password) plus Tor's extensions: RESOLVE (0xF0), RESOLVE_PTR (0xF1),
CONNECT_DIR (0xF2: a one-hop BEGIN_DIR stream to a Tor relay's directory
service) and the answer to a client that speaks HTTP to a SOCKS port; BIND
and UDP ASSOCIATE when enabled; with --http-tunnel, HTTP CONNECT as Tor's
HTTPTunnelPort.  Every name is looked up on the proxy side, never by the
client.

Run it:      python3 torsocksd.py --port 9050
Embed it:    with torsocksd.Server(listen=[("127.0.0.1", 0)]) as server: ...

One file, the standard library only, CPython 3.8 or newer, on POSIX
systems (the splice relay and --outbound-interface need Linux).  One
non-blocking selectors loop carries every connection; name lookups run in
the loop (--nameserver) or in a small bounded pool of worker threads that
report back to it through a socketpair.

The file reads top to bottom in the order data flows, one banner per
section:
  protocol constants, and text a peer chose made fit for a log line;
  pure parsers (bytes in, one message out) and pure reply builders;
  policy: methods, credentials, client and destination rules;
  the SOCKS handshake, a sans-I/O object: bytes in, replies and a decision;
  the HTTP CONNECT handshake, the same interface for --http-tunnel ports;
  resolvers: the system's in threads, and the built-in DNS client;
  the Tor link for CONNECT_DIR: AES, KDF-TOR, cells, X.509, relay cells,
    circuits and directory streams (sans-I/O), then TorLink on the loop;
  the event loop; Connection, its states and the relay (BIND's too); UDP
    ASSOCIATE's datagram header and association; Settings and Server;
  process integration (activation, signals, workers); the command line.
The protocol's rules, and where they differ from Tor's, are the README's
table "What torsocksd sends, and where it differs from Tor"; comments cite
its rows by their first cell.
"""

# Copyright (c) 2026 The torsocksd developers.
#
# Permission is hereby granted, free of charge, to any person obtaining a copy
# of this software and associated documentation files (the "Software"), to
# deal in the Software without restriction, including without limitation the
# rights to use, copy, modify, merge, publish, distribute, sublicense, and/or
# sell copies of the Software, and to permit persons to whom the Software is
# furnished to do so, subject to the following conditions:
#
# The above copyright notice and this permission notice shall be included in
# all copies or substantial portions of the Software.
#
# THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
# IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
# FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
# AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
# LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING
# FROM, OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS
# IN THE SOFTWARE.

# Annotations stay unevaluated: a signature may name ssl.SSLContext without
# importing ssl (see _ImportedOnFirstUse below).
from __future__ import annotations

__version__ = "0.1.0"

__all__ = [
    # protocol values
    "Version", "Command", "AddressType", "Method", "Reply", "Socks4Reply",
    "Protocol",
    # parse results and messages
    "NEED_MORE", "Parsed", "Rejected",
    "Socks4Request", "Socks5Greeting", "UsernamePassword", "Socks5Request",
    # the handshake
    "SocksHandshake", "HandshakeState", "Request", "HttpTunnelHandshake",
    # pure parsers
    "detect_protocol", "parse_http_method", "parse_socks4_request",
    "parse_socks5_greeting", "parse_username_password", "parse_socks5_request",
    "hostname_problem", "ip_literal", "parse_udp_datagram", "UdpDatagram",
    "parse_http_request_head", "split_connect_target",
    # pure reply builders
    "socks4_reply", "socks5_reply", "socks5_address", "socks5_address_reply",
    "udp_datagram_header",
    "socks5_hostname_reply", "socks5_method_reply", "username_password_reply",
    "failure_reply", "http_reply", "reply_for_errno",
    # policy
    "choose_method", "special_name_refusal", "destination_refusal",
    "Credentials", "ClientPolicy", "DestinationPolicy",
    # resolvers, the server, the command line
    "ResolverResult", "SystemResolver", "DnsResolver", "LookupScheduler",
    "LoginThrottle",
    "Server", "Settings", "main",
]

import os
import sys


# =============================================================================
# Run as a script: hand over to the bytecode cache
# =============================================================================
# "python3 torsocksd.py" compiles the whole file before its first line runs
# and keeps the parse tree, some 9 MiB, until the script ends.  So the script
# does nothing but exec a fresh interpreter that imports torsocksd as a
# module: from its bytecode cache (__pycache__ beside the file, which that
# import writes when the directory is writable), or compiled once more.  exec
# keeps the process ID, the descriptors (inetd's socket, systemd's
# LISTEN_FDS), the environment and the interpreter's options.  Where that
# cannot be done or would not be the same (Python before 3.10, no os.execv,
# -I, a file not named NAME.py, another program running this file), the
# script serves itself.

def _bytecode_is_fresh(source: str, module: str) -> bool:
    """Whether importing module from source will find bytecode it can use
    as it is (importlib's own test for a timestamp-based .pyc)."""
    tag = sys.implementation.cache_tag
    if tag is None:
        return False
    directory = os.path.dirname(source)
    name = "%s.%s%s.pyc" % (module, tag, ".opt-%d" % sys.flags.optimize
                            if sys.flags.optimize else "")
    prefix = getattr(sys, "pycache_prefix", None)
    cache = (os.path.join(prefix, directory.lstrip(os.sep), name) if prefix
             else os.path.join(directory, "__pycache__", name))
    try:
        with open(cache, "rb") as pyc:
            header = pyc.read(16)       # magic, flags, mtime, size
        status = os.stat(source)
    except OSError:
        return False
    if len(header) < 16:
        return False
    if header[4:8] != bytes(4):         # hash-based: importlib decides
        return True
    return (int.from_bytes(header[8:12], "little")
            == int(status.st_mtime) & 0xFFFFFFFF
            and int.from_bytes(header[12:16], "little")
            == status.st_size & 0xFFFFFFFF)


def _interpreter_options(command_line):
    """The options in command_line (sys.orig_argv) when it reads "python3
    [options] FILE ARGS" with sys.argv being FILE ARGS; None when it does
    not (python3 -m pdb FILE, coverage run FILE, ...)."""
    first = len(command_line) - len(sys.argv)
    if first < 1 or command_line[first:] != sys.argv:
        return None
    options = command_line[1:first]
    value_follows = False
    for option in options:
        if value_follows:
            value_follows = False
        elif option in ("-W", "-X", "--check-hash-based-pycs"):
            value_follows = True
        elif not option.startswith("-") or option in ("-", "--") or (
                not option.startswith(("--", "-W", "-X"))
                and ("c" in option or "m" in option)):
            return None
    return None if value_follows else options


def _exec_from_bytecode():
    # Only when the interpreter itself ran this file (runpy.run_path() and
    # exec() set no loader for it).
    script = globals().get("__file__")
    if not script or getattr(globals().get("__loader__"), "path",
                             None) != script:
        return
    source = os.path.realpath(script)
    directory, name = os.path.split(source)
    module = name[:-len(".py")]
    command_line = getattr(sys, "orig_argv", None)      # Python 3.10+
    options = None if not command_line else _interpreter_options(command_line)
    if (options is None or not hasattr(os, "execv") or not sys.executable
            or not name.endswith(".py") or not module.isidentifier()
            or os.path.realpath(sys.path[0]) != directory):
        return
    code = ("import sys; sys.argv.pop(0); sys.path[0] = %r; import %s; "
            "sys.exit(%s._main_after_exec(compiled=%r))"
            % (directory, module, module,
               not _bytecode_is_fresh(source, module)))
    try:
        os.execv(sys.executable,
                 [sys.executable] + options + ["-c", code] + sys.argv)
    except OSError:
        pass


if __name__ == "__main__" and globals().get("__spec__") is None:
    _exec_from_bytecode()

import argparse
import array
import base64
import collections
import enum
import errno
import fcntl
import functools
import gc
import heapq
import ipaddress
import itertools
import logging
import math
import select
import selectors
import signal
import socket
import stat
import struct
import threading
import time
from typing import NamedTuple, Optional, Union


class _ImportedOnFirstUse:
    """Stands in for a module until one of its names is first used, then
    imports it and takes its place among this module's globals.  hashlib,
    hmac and ssl serve only CONNECT_DIR and --credentials, and they load
    OpenSSL: some 5 MiB and 6 ms that every other start would pay."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attribute: str):
        module = __import__(self._name)
        globals()[self._name] = module
        return getattr(module, attribute)


hashlib = _ImportedOnFirstUse("hashlib")
hmac = _ImportedOnFirstUse("hmac")
ssl = _ImportedOnFirstUse("ssl")
# Only --workers needs these (shared metrics, configurations to workers).
mmap = _ImportedOnFirstUse("mmap")
pickle = _ImportedOnFirstUse("pickle")

log = logging.getLogger("torsocksd")

EVENT_READ = selectors.EVENT_READ       # what the loop waits for on a socket
EVENT_WRITE = selectors.EVENT_WRITE


# =============================================================================
# Protocol constants
# =============================================================================
# Enum values are the bytes on the wire.

class Version(enum.IntEnum):
    SOCKS4 = 0x04
    SOCKS5 = 0x05


class Command(enum.IntEnum):
    CONNECT = 0x01
    BIND = 0x02
    UDP_ASSOCIATE = 0x03
    RESOLVE = 0xF0          # Tor socks-extensions §2
    RESOLVE_PTR = 0xF1      # Tor socks-extensions §2
    CONNECT_DIR = 0xF2      # Tor 0.1.2: a one-hop BEGIN_DIR stream


# Commands after whose reply bytes flow: the client's early data is kept
# (for BIND, until the peer has connected).
RELAYED_COMMANDS = frozenset((Command.CONNECT, Command.CONNECT_DIR,
                              Command.BIND))
# Commands whose answer is a lookup's result, then a close.
LOOKUP_COMMANDS = frozenset((Command.RESOLVE, Command.RESOLVE_PTR))
# Commands that connect to DST.PORT, so port 0 is refused (the README's
# "port 0" row); BIND takes any port (the peer's is not known), UDP
# ASSOCIATE's is the client's own, often unknown yet (RFC 1928 §6: zeros).
DIALLED_COMMANDS = frozenset((Command.CONNECT, Command.CONNECT_DIR))

# SOCKS4 has no UDP ASSOCIATE; Tor's grammar takes CONNECT, BIND, RESOLVE and
# RESOLVE_PTR, and Tor 0.1.2 to 0.2.0 took CONNECT_DIR too.
SOCKS4_COMMANDS = frozenset((Command.CONNECT, Command.BIND, Command.RESOLVE,
                             Command.RESOLVE_PTR, Command.CONNECT_DIR))


class AddressType(enum.IntEnum):
    IPV4 = 0x01
    DOMAIN = 0x03
    IPV6 = 0x04


# Byte -> member, for the parsers (a dict lookup is much cheaper than a call
# of the enum, which raises for an unknown value).
COMMAND_BY_BYTE = {command.value: command for command in Command}
ADDRESS_TYPE_BY_BYTE = {kind.value: kind for kind in AddressType}


class Method(enum.IntEnum):
    NO_AUTH = 0x00
    GSSAPI = 0x01
    USERNAME_PASSWORD = 0x02
    NO_ACCEPTABLE = 0xFF


class Reply(enum.IntEnum):
    """SOCKS5 REP values (RFC 1928 §6)."""
    SUCCEEDED = 0x00
    GENERAL_FAILURE = 0x01
    NOT_ALLOWED = 0x02
    NETWORK_UNREACHABLE = 0x03
    HOST_UNREACHABLE = 0x04
    CONNECTION_REFUSED = 0x05
    TTL_EXPIRED = 0x06          # also "timed out", as Tor uses it
    COMMAND_NOT_SUPPORTED = 0x07
    ADDRESS_TYPE_NOT_SUPPORTED = 0x08


class Socks4Reply(enum.IntEnum):
    """SOCKS4 CD values of a reply (decimal 90 and 91 in the SOCKS4 notes)."""
    GRANTED = 0x5A
    REJECTED = 0x5B


class Protocol(enum.Enum):
    """What a client speaks: on a SOCKS port its first byte says; an
    --http-tunnel port speaks HTTP_CONNECT."""
    SOCKS4 = "SOCKS4"
    SOCKS5 = "SOCKS5"
    HTTP = "HTTP"
    TLS = "TLS"
    UNKNOWN = "unknown"
    HTTP_CONNECT = "HTTP CONNECT"


USERPASS_VERSION = 0x01            # RFC 1929 §2: the subnegotiation's version
USERPASS_SUCCESS = 0x00
USERPASS_FAILURE = 0x01            # any non-zero status is failure (RFC 1929 §2)
TLS_HANDSHAKE_RECORD = 0x16        # first byte of a TLS ClientHello record

MAX_SOCKS4_USERID = 512            # Tor's MAX_SOCKS_MESSAGE_LEN: 512 ok, 513 refused
MAX_HOSTNAME = 255                 # SOCKS5 length byte; Tor's MAX_SOCKS_ADDR_LEN - 1
MAX_HANDSHAKE_BYTES = 1024         # the whole handshake: README "handshake time limit"
SPECIAL_SUFFIXES = (".onion", ".exit")   # never looked up: README "`.onion` and `.exit` names"

ZERO_IPV4 = bytes(4)
ZERO_IPV6 = bytes(16)
ZERO_PORT = bytes(2)

# HTTP methods whose first letter sends a client the HTTP page.  Tor looks at
# G, H, P and C only; OPTIONS, DELETE and TRACE are added (the README's
# "the first byte" row).
HTTP_FIRST_BYTES = frozenset(b"GHPCODT")


# =============================================================================
# Text a peer chose, as a log line may carry it
# =============================================================================

MAX_LOGGED_PEER_TEXT = 512      # characters; a peer cannot flood the log


def clip_for_log(text, limit: int = MAX_LOGGED_PEER_TEXT) -> str:
    """text (str or bytes) fit for one log line: bytes shown as repr() shows
    them and control characters escaped the same way, so that none reaches
    the log; cut to limit characters with "…" appended when cut."""
    if isinstance(text, (bytes, bytearray, memoryview)):
        # limit + 1 bytes give more than limit characters: enough to cut.
        text = repr(bytes(text[:limit + 1]))[2:-1]
    else:
        text = str(text)[:limit + 1]
        if not text.isprintable():
            text = repr(text)[1:-1]
    if len(text) > limit:
        return text[:limit] + "…"
    return text


# =============================================================================
# Pure parsers: bytes in, one message (or "need more", or a rejection) out
# =============================================================================
# Every parser takes the bytes buffered so far and returns one of:
#   NEED_MORE                   the message is incomplete; nothing was consumed,
#   Parsed(message, used)       a whole message and the number of bytes it took,
#   Rejected(reply, reason)     the exact reply to send (b"" for none) and why.
# They never read a socket, a clock, DNS or configuration.  A bad byte is
# rejected as soon as it is buffered, without waiting for the rest.

NEED_MORE = None


class Parsed(NamedTuple):
    message: object
    used: int


class Rejected(NamedTuple):
    reply: bytes
    reason: str


ParseResult = Optional[Union[Parsed, Rejected]]


class Socks4Request(NamedTuple):
    command: Command
    port: int
    host: str           # dotted quad, or the SOCKS4A hostname
    userid: bytes
    is_4a: bool


class Socks5Greeting(NamedTuple):
    methods: bytes


class UsernamePassword(NamedTuple):
    username: bytes
    password: bytes


class Socks5Request(NamedTuple):
    command: Command
    address_type: AddressType
    host: str           # dotted quad, compressed IPv6, or the hostname
    port: int


def detect_protocol(first_byte: int) -> Protocol:
    """Tell the protocol from a client's first byte (the README's "the
    first byte" row)."""
    if first_byte == Version.SOCKS4:
        return Protocol.SOCKS4
    if first_byte == Version.SOCKS5:
        return Protocol.SOCKS5
    if first_byte in HTTP_FIRST_BYTES:
        return Protocol.HTTP
    if first_byte == TLS_HANDSHAKE_RECORD:
        return Protocol.TLS
    return Protocol.UNKNOWN


def parse_http_method(data) -> ParseResult:
    """Tell HEAD from the other HTTP methods at the start of data.

    Parsed.message is b"HEAD" (headers only) or b"" (the whole page).  The
    answer goes out as soon as it is known, never after the request line.
    """
    probe = bytes(data[:5])
    if not b"HEAD ".startswith(probe):
        return Parsed(b"", 0)
    if len(probe) < 5:
        return NEED_MORE
    return Parsed(b"HEAD", 0)


def hostname_problem(host: str) -> Optional[str]:
    """Why a destination a client named is unusable, or None.

    Tor's rule (string_is_valid_dest in its address.c): an IPv4 or IPv6
    literal, or a name whose dot-separated labels are made of ASCII letters,
    digits, "-" and "_", none empty and none starting with "-" or "_", one
    trailing dot allowed.  Unlike Tor, brackets are only valid around an
    IPv6 literal, and a NUL is refused instead of cutting the name short
    (the README's "hostnames" rows)."""
    if not host:
        return "empty hostname"
    if len(host) > MAX_HOSTNAME:
        return "hostname longer than 255 bytes"
    if not (host.isascii() and host.isprintable()) or " " in host:
        return "hostname has a byte outside printable ASCII"
    if host.startswith("["):
        if host.endswith("]") and _ipv6_literal(host[1:-1]) is not None:
            return None
        return "brackets around something that is not an IPv6 address"
    if ip_literal(host) is not None:
        return None
    labels = host.split(".")
    if not labels[-1]:
        labels.pop()            # one trailing dot: a fully qualified name
    for label in labels:
        if not label or label[0] in "-_" \
                or not label.replace("-", "").replace("_", "").isalnum():
            return "not a valid hostname"
    return None


@functools.lru_cache(maxsize=1024)
def ip_literal(host: str):
    """The IPv4Address or IPv6Address that host spells, or None.

    IPv4 is four decimal numbers of up to three digits (leading zeros as
    Tor reads them, whatever this Python's ipaddress thinks of them); IPv6
    is bare or in brackets.  Clients send IP literals as hostnames: torsocks
    does for every CONNECT.
    """
    if host.startswith("[") and host.endswith("]"):
        return _ipv6_literal(host[1:-1])
    if ":" in host:
        return _ipv6_literal(host)
    numbers = host.split(".")
    if len(numbers) != 4 or not all(
            0 < len(number) <= 3 and number.isdigit() and number.isascii()
            and int(number) <= 255 for number in numbers):
        return None
    return ipaddress.IPv4Address(".".join(str(int(n)) for n in numbers))


def _ipv6_literal(text: str):
    # A zone ("%eth0") is not a destination; newer Pythons would take one.
    if "%" in text:
        return None
    if "." in text:
        # An embedded IPv4 part is read as a literal IPv4 is (leading
        # zeros allowed, as Tor does).
        head, _, quad = text.rpartition(":")
        embedded = ip_literal(quad) if ":" not in quad else None
        if embedded is None or not head:
            return None
        text = head + ":" + str(embedded)
    try:
        return ipaddress.IPv6Address(text)
    except ValueError:
        return None


def parse_socks4_request(data) -> ParseResult:
    """SOCKS4 / SOCKS4A request (the SOCKS4 and SOCKS4A protocol notes).

    VN(04) CD DSTPORT(2) DSTIP(4) USERID NUL [HOSTNAME NUL]
    """
    if len(data) < 1:
        return NEED_MORE
    if data[0] != Version.SOCKS4:
        return _socks4_rejection("not a SOCKS4 request")
    if len(data) < 2:
        return NEED_MORE
    if data[1] not in SOCKS4_COMMANDS:
        return _socks4_rejection("unknown SOCKS4 command 0x%02x" % data[1])
    command = COMMAND_BY_BYTE[data[1]]
    if len(data) < 8:
        return NEED_MORE
    port = int.from_bytes(data[2:4], "big")
    address = bytes(data[4:8])
    if address == ZERO_IPV4:
        return _socks4_rejection("SOCKS4 destination address is zero")
    if port == 0 and command != Command.RESOLVE:
        return _socks4_rejection("SOCKS4 destination port is zero")

    userid_end = _find_nul(data, 8, MAX_SOCKS4_USERID)
    if userid_end is None:
        return NEED_MORE
    if userid_end < 0:
        return _socks4_rejection("SOCKS4 userid longer than 512 bytes")
    userid = bytes(data[8:userid_end])
    is_4a = address[:3] == b"\0\0\0"
    if not is_4a:
        host = socket.inet_ntoa(address)
        return Parsed(Socks4Request(command, port, host, userid, False),
                      userid_end + 1)

    host_end = _find_nul(data, userid_end + 1, MAX_HOSTNAME)
    if host_end is None:
        return NEED_MORE
    if host_end < 0:
        return _socks4_rejection("SOCKS4A hostname longer than 255 bytes")
    # Whether the name is usable is the handshake's to say, after the
    # command (Tor's order); latin-1 keeps every byte for that check.
    host = bytes(data[userid_end + 1:host_end]).decode("latin-1")
    return Parsed(Socks4Request(command, port, host, userid, True),
                  host_end + 1)


def _find_nul(data, start: int, limit: int):
    """Index of the NUL ending a field of at most limit bytes at data[start:].

    None: not there yet.  -1: the field is already longer than limit.
    """
    end = bytes(data[start:start + limit + 1]).find(b"\0")
    if end >= 0:
        return start + end
    return -1 if len(data) - start > limit else None


def _socks4_rejection(reason: str) -> Rejected:
    return Rejected(socks4_reply(Socks4Reply.REJECTED), reason)


def _socks5_rejection(reply: Reply, reason: str) -> Rejected:
    # Parser errors carry the 10-byte ATYP 1 form, as Tor's do: the parser
    # does not know the client's address family.
    return Rejected(socks5_reply(reply), reason)


def parse_socks5_greeting(data) -> ParseResult:
    """SOCKS5 method selection message (RFC 1928 §3): VER NMETHODS METHODS."""
    if len(data) < 1:
        return NEED_MORE
    if data[0] != Version.SOCKS5:
        return Rejected(b"", "not a SOCKS5 greeting")
    if len(data) < 2:
        return NEED_MORE
    count = data[1]
    if count == 0:
        return Rejected(b"", "SOCKS5 greeting offers no method")
    if len(data) < 2 + count:
        return NEED_MORE
    return Parsed(Socks5Greeting(bytes(data[2:2 + count])), 2 + count)


def parse_username_password(data) -> ParseResult:
    """RFC 1929 §2: VER(01) ULEN UNAME PLEN PASSWD; empty fields allowed."""
    if len(data) < 1:
        return NEED_MORE
    if data[0] != USERPASS_VERSION:
        return _socks5_rejection(Reply.GENERAL_FAILURE,
                               "username/password message of version 0x%02x"
                               % data[0])
    if len(data) < 2:
        return NEED_MORE
    username_end = 2 + data[1]
    if len(data) < username_end + 1:
        return NEED_MORE
    password_end = username_end + 1 + data[username_end]
    if len(data) < password_end:
        return NEED_MORE
    return Parsed(UsernamePassword(bytes(data[2:username_end]),
                                   bytes(data[username_end + 1:password_end])),
                  password_end)


def parse_socks5_request(data) -> ParseResult:
    """SOCKS5 request (RFC 1928 §4): VER CMD RSV ATYP DST.ADDR DST.PORT."""
    if len(data) < 1:
        return NEED_MORE
    if data[0] != Version.SOCKS5:
        return _socks5_rejection(Reply.GENERAL_FAILURE,
                               "request of version 0x%02x after a SOCKS5 "
                               "greeting" % data[0])
    if len(data) < 2:
        return NEED_MORE
    command = COMMAND_BY_BYTE.get(data[1])
    if command is None:
        return _socks5_rejection(Reply.COMMAND_NOT_SUPPORTED,
                               "unknown SOCKS5 command 0x%02x" % data[1])
    if len(data) < 3:
        return NEED_MORE
    if data[2] != 0:
        return _socks5_rejection(Reply.GENERAL_FAILURE,
                               "SOCKS5 reserved byte is not zero")
    if len(data) < 4:
        return NEED_MORE
    address_type = ADDRESS_TYPE_BY_BYTE.get(data[3])
    if address_type is None:
        return _socks5_rejection(Reply.ADDRESS_TYPE_NOT_SUPPORTED,
                               "unknown SOCKS5 address type 0x%02x" % data[3])

    if address_type == AddressType.IPV4:
        address_end = 8
    elif address_type == AddressType.IPV6:
        address_end = 20
    else:
        if len(data) < 5:
            return NEED_MORE
        address_end = 5 + data[4]
    if len(data) < address_end + 2:
        return NEED_MORE

    if address_type == AddressType.IPV4:
        host = socket.inet_ntoa(bytes(data[4:8]))
    elif address_type == AddressType.IPV6:
        host = str(ipaddress.IPv6Address(bytes(data[4:20])))
    else:
        # Checked by the handshake, after the command (Tor's order).
        host = bytes(data[5:address_end]).decode("latin-1")
    port = int.from_bytes(data[address_end:address_end + 2], "big")
    return Parsed(Socks5Request(command, address_type, host, port),
                  address_end + 2)


# =============================================================================
# Pure reply builders
# =============================================================================
# Total: every outcome gives a complete, valid reply.

def socks4_reply(code: Socks4Reply, address: bytes = ZERO_IPV4,
                 port: int = 0) -> bytes:
    """VN 0, CD, DSTPORT, DSTIP: zeros, or a RESOLVE answer, or where a
    BIND listens or who connected.  Clients such as curl and tor-resolve
    insist on VN 0 and port 0 for the others."""
    return bytes((0, code)) + port.to_bytes(2, "big") + address


def socks5_reply(reply: Reply, client_family: int = socket.AF_INET) -> bytes:
    """Reply with a zero BND.ADDR and BND.PORT (the README's "CONNECT
    reply" row).

    ATYP 1 (10 bytes) for a client on IPv4, ATYP 4 (22 bytes) for a client on
    IPv6 or a Unix socket, as Tor does; it reveals nothing of the outbound side.
    """
    if client_family == socket.AF_INET:
        return bytes((Version.SOCKS5, reply, 0, AddressType.IPV4)) \
            + ZERO_IPV4 + ZERO_PORT
    return bytes((Version.SOCKS5, reply, 0, AddressType.IPV6)) \
        + ZERO_IPV6 + ZERO_PORT


def socks5_address(address, port: int) -> bytes:
    """ATYP (1 or 4), the address and the port, as a reply's BND fields and
    a datagram's header carry them (RFC 1928 §5)."""
    address_type = AddressType.IPV4 if address.version == 4 \
        else AddressType.IPV6
    return bytes((address_type,)) + address.packed + port.to_bytes(2, "big")


def socks5_address_reply(address, port: int = 0) -> bytes:
    """Success with address in BND.ADDR: a RESOLVE answer with port 0 (the
    README's "RESOLVE (F0)" row), or BIND's and UDP ASSOCIATE's address and
    port (RFC 1928 §6)."""
    return bytes((Version.SOCKS5, Reply.SUCCEEDED, 0)) \
        + socks5_address(address, port)


def socks5_hostname_reply(name: str) -> bytes:
    """A RESOLVE_PTR answer (the README's "RESOLVE_PTR (F1)" row), or the
    failure reply when the name cannot be carried (not ASCII, or longer
    than 255 bytes)."""
    try:
        raw = name.rstrip(".").encode("ascii")
    except UnicodeEncodeError:
        raw = b""
    if not raw or len(raw) > MAX_HOSTNAME \
            or any(byte < 0x21 or byte > 0x7E for byte in raw):
        return socks5_reply(Reply.HOST_UNREACHABLE)
    return bytes((Version.SOCKS5, Reply.SUCCEEDED, 0, AddressType.DOMAIN,
                  len(raw))) + raw + ZERO_PORT


def socks5_method_reply(method: Method) -> bytes:
    return bytes((Version.SOCKS5, method))


def username_password_reply(accepted: bool) -> bytes:
    return bytes((USERPASS_VERSION,
                  USERPASS_SUCCESS if accepted else USERPASS_FAILURE))


def failure_reply(version: Version, reply: Reply,
                  client_family: int = socket.AF_INET) -> bytes:
    """The reply that refuses a request: SOCKS4 knows only "rejected"."""
    if version == Version.SOCKS4:
        return socks4_reply(Socks4Reply.REJECTED)
    return socks5_reply(reply, client_family)


# RFC 1928 §6 reply for each connect() errno (the README's "connect errors"
# row); anything not listed is a general failure.
CONNECT_ERRNO_REPLIES = {
    errno.ECONNREFUSED: Reply.CONNECTION_REFUSED,
    errno.ENETUNREACH: Reply.NETWORK_UNREACHABLE,
    errno.EHOSTUNREACH: Reply.HOST_UNREACHABLE,
    errno.ETIMEDOUT: Reply.TTL_EXPIRED,
    errno.EACCES: Reply.NOT_ALLOWED,        # a local firewall said no
    errno.EPERM: Reply.NOT_ALLOWED,
}


def reply_for_errno(error_number: int) -> Reply:
    return CONNECT_ERRNO_REPLIES.get(error_number, Reply.GENERAL_FAILURE)


# The page for a client that speaks HTTP to the SOCKS port; %(where)s is the
# address it reached, so that the examples can be pasted as they are.
HTTP_PAGE = """\
<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><title>This is a SOCKS proxy</title>
<style>code { white-space: nowrap; }</style></head>
<body>
<h1>This is a SOCKS proxy, not an HTTP proxy</h1>
<p>Your browser or tool sent an HTTP request to torsocksd, which speaks only
SOCKS (versions 4, 4a and 5).</p>
<p>To use it, set your program's proxy type to <b>SOCKS5</b> (or SOCKS4a) with
this host and port, and let the proxy resolve host names: in Firefox, tick
"Proxy DNS when using SOCKS v5"; with curl, use
<code>--socks5-hostname %(where)s</code> or <code>-x socks5h://%(where)s</code>;
elsewhere, set <code>ALL_PROXY=socks5h://%(where)s</code>.</p>
</body>
</html>
"""


def html_text(text: str) -> str:
    """text as HTML shows it literally."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def http_reply(method: bytes, where: Optional[str] = None) -> bytes:
    """HTTP/1.0 501 with our page, its examples naming where (the proxy's
    "host:port"); HEAD gets the headers only (the README's "HTTP to the
    SOCKS port" row)."""
    page = (HTTP_PAGE % {"where": html_text(where or "HOST:PORT")}
            ).encode("utf-8")
    head = ("HTTP/1.0 501 Not Implemented: this is a SOCKS proxy\r\n"
            "Content-Type: text/html; charset=utf-8\r\n"
            "Content-Length: %d\r\n"
            "Connection: close\r\n"
            "\r\n" % len(page)).encode("ascii")
    return head if method == b"HEAD" else head + page


# =============================================================================
# Policy: what the server allows and which method it picks (decisions, no I/O)
# =============================================================================

def choose_method(offered: bytes, credentials_required: bool) -> Method:
    """Pick a SOCKS5 method from those offered (RFC 1928 §3; README, "Where
    torsocksd differs from Tor").

    Without configured credentials the client gets "no authentication" when it
    offers it, else username/password with any username accepted (Tor keeps
    those bytes as an isolation key).  With credentials, only method 02 will do.
    """
    if credentials_required:
        if Method.USERNAME_PASSWORD in offered:
            return Method.USERNAME_PASSWORD
        return Method.NO_ACCEPTABLE
    if Method.NO_AUTH in offered:
        return Method.NO_AUTH
    if Method.USERNAME_PASSWORD in offered:
        return Method.USERNAME_PASSWORD
    return Method.NO_ACCEPTABLE


class Credentials:
    """Usernames and passwords a client must present (RFC 1929).

    Checked in constant time: every entry is compared, by digest, whatever
    matches, so the time taken says nothing about which user exists.
    """

    def __init__(self, pairs):
        self._digests = [self._digest(user, password) for user, password in pairs]

    @staticmethod
    def _digest(username: bytes, password: bytes) -> bytes:
        return hashlib.sha256(len(username).to_bytes(2, "big") + username
                              + password).digest()

    @classmethod
    def from_file(cls, path: str) -> "Credentials":
        """One "user:password" a line; blank lines and "#" comments skipped.

        A file without a single user is a ValueError, not "no credentials":
        an emptied file must never switch authentication off.
        """
        pairs = []
        with open(path, "rb") as lines:
            for number, line in enumerate(lines, 1):
                line = line.rstrip(b"\r\n")
                if not line.strip() or line.startswith(b"#"):
                    continue
                user, colon, password = line.partition(b":")
                # RFC 1929 fields are 1 to 255 bytes: an empty user or
                # password (a template's unset variable) would let anyone
                # in who sends empty fields.
                if not colon or not 0 < len(user) <= 255 \
                        or not 0 < len(password) <= 255:
                    raise ValueError("%s:%d: not a user:password line of 1 "
                                     "to 255 bytes each" % (path, number))
                pairs.append((user, password))
        if not pairs:
            raise ValueError("%s: no user:password line (blank lines and "
                             "# comments do not count)" % path)
        return cls(pairs)

    def __bool__(self):
        return bool(self._digests)

    def check(self, username: bytes, password: bytes) -> bool:
        offered = self._digest(username, password)
        matched = False
        for digest in self._digests:
            matched |= hmac.compare_digest(digest, offered)
        return matched


# Failed RFC 1929 logins from one client before its logins are refused
# outright: a person mistyping gets a few tries, a guesser gets few too.
LOGIN_FAILURES_ALLOWED = 5          # the default of --max-login-failures
LOGIN_FAILURE_WINDOW = 30.0         # seconds a failure counts
MAX_THROTTLED_CLIENTS = 4096        # clients remembered; the oldest go first


class LoginThrottle:
    """Failed logins per client (an address, or an IPv6 /64).

    After LOGIN_FAILURES_ALLOWED failures within LOGIN_FAILURE_WINDOW
    seconds, a client's next logins are refused without a check until its
    oldest failure ages out.  Decisions only: the caller gives the time.
    """

    def __init__(self, allowed: int = LOGIN_FAILURES_ALLOWED,
                 window: float = LOGIN_FAILURE_WINDOW,
                 remembered: int = MAX_THROTTLED_CLIENTS):
        self.allowed = allowed
        self.window = window
        self.remembered = remembered
        self._failures = collections.OrderedDict()   # client -> deque of times

    def blocked(self, client, now: float) -> bool:
        """Whether client's logins are refused without a check now."""
        times = self._recent(client, now)
        return times is not None and len(times) >= self.allowed

    def failed(self, client, now: float) -> bool:
        """Record a failed login; True when it is the one that blocks the
        client (to be logged once per burst)."""
        times = self._recent(client, now)
        if times is None:
            times = self._failures[client] = collections.deque()
            while len(self._failures) > self.remembered:
                self._failures.popitem(last=False)
        times.append(now)
        self._failures.move_to_end(client)
        return len(times) == self.allowed

    def _recent(self, client, now: float):
        times = self._failures.get(client)
        if times is None:
            return None
        while times and times[0] <= now - self.window:
            times.popleft()
        if not times:
            del self._failures[client]
            return None
        return times


def special_name_refusal(host: str) -> Optional[str]:
    """Why a name must never reach DNS (.onion, .exit), or None."""
    name = host.rstrip(".").lower()
    if name.endswith(SPECIAL_SUFFIXES) or name in ("onion", "exit"):
        return "a .onion or .exit name, which is never looked up"
    return None


def ip_of(address):
    """The plain form of an address, the one every rule and lookup key
    uses: an IPv4-mapped IPv6 address (::ffff:a.b.c.d) is the IPv4 address
    it carries.  address is an ipaddress object, or a string such as a
    socket peer's host, perhaps with a %scope."""
    if isinstance(address, str):
        address = ipaddress.ip_address(address.split("%")[0])
    mapped = getattr(address, "ipv4_mapped", None)
    return mapped if mapped is not None else address


# What a client from another host may not reach through us unless an accept
# rule names it (README, "Where torsocksd differs from Tor"): this host's
# loopback and unspecified addresses, all of 0.0.0.0/8 ("this network",
# RFC 6890: never a destination), link-local (cloud metadata at
# 169.254.169.254) and multicast.
LOCAL_ONLY_NETWORKS = tuple(ipaddress.ip_network(text) for text in (
    "0.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4",
    "::/128", "::1/128", "fe80::/10", "ff00::/8"))

# A connection to the unspecified address reaches this host's loopback
# (Linux sends 0.0.0.0 to 127.0.0.1 and :: to ::1), so such a destination
# matches every rule that the loopback address of its family matches.  Only
# 0.0.0.0 itself: Linux routes the rest of 0.0.0.0/8 as ordinary unicast
# (unreachable unless a route is added), never to loopback.
UNSPECIFIED_REACHES = {
    ipaddress.ip_address("0.0.0.0"): ipaddress.ip_address("127.0.0.1"),
    ipaddress.ip_address("::"): ipaddress.ip_address("::1"),
}


def is_local_only(address_or_network) -> bool:
    """Whether an address, or every address of a network, lies in
    LOCAL_ONLY_NETWORKS."""
    network = ipaddress.ip_network(address_or_network)
    return any(network.version == local.version and network.subnet_of(local)
               for local in LOCAL_ONLY_NETWORKS)


def destination_refusal(client_is_local: bool, destination) -> Optional[str]:
    """Why a destination address is off limits to this client, or None.

    A client on loopback (or a Unix socket) may reach anything it could reach
    itself.  A client from another host may not use the proxy to reach this
    host's loopback, link-local (cloud metadata at 169.254.169.254 among
    them), unspecified or multicast addresses (README, "Where torsocksd
    differs from Tor").
    """
    if client_is_local or not is_local_only(ip_of(destination)):
        return None
    return "a remote client may not reach a local-only address"


# One grammar for "where" on the command line and in rules: HOST:PORT,
# [IPv6]:PORT, and HOST or [IPv6] alone where a port may be left out.  An
# IPv6 address needs brackets wherever a port may follow: "::1:53" could
# be either, so a bare address with colons there is an error.

def parse_port(text: str, zero_allowed: bool = False) -> int:
    """A port number, 1 to 65535 (0 too where it means "any")."""
    if not (text.isdigit() and text.isascii()):
        raise ValueError("%r is not a port number" % text)
    port = int(text)
    if not (0 if zero_allowed else 1) <= port <= 65535:
        raise ValueError("port %d is out of range" % port)
    return port


def _is_ipv6_network(text: str) -> bool:
    try:
        return ipaddress.ip_network(text, strict=False).version == 6
    except ValueError:
        return False


def split_host_port(text: str, default_port: Optional[int] = None):
    """(host, port text or None) from "HOST:PORT", "[IPv6]:PORT", "HOST",
    "[IPv6]"; a port must be there unless default_port says what it is
    (then it is that number, as text).  The brackets are taken off."""
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket:
            raise ValueError("%r: no closing bracket" % text)
        if rest and not rest.startswith(":"):
            raise ValueError("%r: only :PORT may follow ]" % text)
        port = rest[1:] if rest else None
    elif text.count(":") > 1:
        # A bare IPv6 address (or network) is taken where no port need
        # follow and it cannot be read as address and port at once.
        head, _, tail = text.rpartition(":")
        if default_port is None or not _is_ipv6_network(text) or (
                tail.isdigit() and _is_ipv6_network(head)):
            raise ValueError("%r: write an IPv6 address in brackets, as "
                             "[::1]:9050" % text)
        host, port = text, None
    elif ":" in text:
        host, _, port = text.partition(":")
    else:
        host, port = text, None
    if port is None:
        if default_port is None:
            raise ValueError("%r: no port" % text)
        port = str(default_port)
    return host, port


def parse_network(text: str):
    """"192.0.2.0/24", "2001:db8::/32", "192.0.2.7" or "*" -> a network
    (or None for "*": any address of either family).  IPv4-mapped networks
    (::ffff:0:0/96 and longer prefixes) are the IPv4 networks they spell."""
    if text == "*":
        return None
    if text.startswith("[") and "]" in text:
        text = text[1:].replace("]", "", 1)
    network = ipaddress.ip_network(text, strict=False)
    start = ip_of(network.network_address)
    if start.version != network.version:
        network = ipaddress.ip_network((start, network.prefixlen - 96))
    return network


def network_contains(network, address) -> bool:
    """Whether network (None: any) holds address, both in plain form."""
    if network is None:
        return True
    address = ip_of(address)
    return address.version == network.version and address in network


class ClientPolicy:
    """Which client addresses may connect: --allow / --deny, in order; the
    first rule that matches decides.  When none matches, a client is let in
    only if no --allow rule was given.  Checked at accept, before any byte
    is read."""

    def __init__(self, rules=()):
        self.rules = [(verdict, parse_network(text)) for verdict, text in rules]
        self.default = not any(verdict for verdict, _ in self.rules)

    def __bool__(self):
        return bool(self.rules)

    def permits(self, address) -> bool:
        for allowed, network in self.rules:
            if network_contains(network, address):
                return allowed
        return self.default


class DestinationPolicy:
    """Where clients may go: an ordered list of "accept|reject ADDR[/MASK]
    [:PORT[-PORT]]" rules (Tor's exit policy shape), the first match
    deciding; then accept.

    For a client from another host the guard of destination_refusal comes
    before broad rules, as Tor's ExitPolicyRejectPrivate does: an accept
    lifts it only when its network lies inside LOCAL_ONLY_NETWORKS, and only
    for what it names ("accept 127.0.0.1:7001"); a broad accept ("accept
    *:80", "accept 0.0.0.0/1") is passed over for a guarded destination.
    """

    def __init__(self, rules=()):
        self.rules = [self.parse_rule(rule) for rule in rules]

    @staticmethod
    def parse_rule(text: str):
        verdict, _, target = text.strip().partition(" ")
        if verdict not in ("accept", "reject") or not target.strip():
            raise ValueError("%r: a rule is accept|reject ADDR[/MASK]"
                             "[:PORT[-PORT]]" % text)
        target = target.strip()
        mask = ""
        if target.startswith("[") and "]/" in target:
            # Tor writes an IPv6 network as [2001:db8::]/32:80.
            closing = target.index("]/")
            mask, colon, ports = target[closing + 1:].partition(":")
            target = target[:closing + 1] + (colon + ports)
        address, ports = split_host_port(target, default_port="*")
        low, high = 0, 65535        # no port given, or "*": every port
        if ports != "*":
            first, dash, last = ports.partition("-")
            low = parse_port(first, zero_allowed=True)
            high = parse_port(last, zero_allowed=True) if dash else low
            if low > high:
                raise ValueError("%r: the port range is backwards" % text)
        return (verdict == "accept", parse_network(address + mask), low,
                high)

    def refusal(self, client_is_local: bool, address, port: int):
        address = ip_of(address)
        matched_as = (address, UNSPECIFIED_REACHES.get(address, address))
        guard = destination_refusal(client_is_local, address)
        for accepted, network, low, high in self.rules:
            if not (low <= port <= high and any(
                    network_contains(network, a) for a in matched_as)):
                continue
            if not accepted:
                return "refused by --policy"
            # Only a rule that names a guarded address itself lifts the
            # guard; for 0.0.0.0 and ::, the loopback address they reach
            # (a rule for 0.0.0.0 alone would open this host's loopback).
            if guard is None or (network is not None
                                 and is_local_only(network)
                                 and network_contains(network,
                                                      matched_as[1])):
                return None
        return guard


def happy_eyeballs_order(addresses, preferred_version=None):
    """Alternate the address families (RFC 8305 §4), starting with the
    preferred version, else with the family of the first answer."""
    if len(addresses) < 2:
        return list(addresses)
    first = preferred_version or addresses[0].version
    primary = [a for a in addresses if a.version == first]
    secondary = [a for a in addresses if a.version != first]
    ordered = []
    for pair in itertools.zip_longest(primary, secondary):
        ordered.extend(a for a in pair if a is not None)
    return ordered


def is_unsafe_request(version: Version, address_type, command: Command) -> bool:
    """True when the client gave only an IP address, so it resolved the name
    itself and may be leaking DNS (Tor's SafeSocks rule)."""
    if command not in (Command.CONNECT, Command.RESOLVE):
        return False
    if version == Version.SOCKS4:
        return address_type != AddressType.DOMAIN
    return address_type in (AddressType.IPV4, AddressType.IPV6)


# =============================================================================
# The SOCKS handshake (sans-I/O): bytes in, replies and one decision out
# =============================================================================
# SocksHandshake holds the client's side of the conversation until a request
# is accepted or refused: version detection, method choice, RFC 1929, request
# parsing, and the checks on a whole request in the order Tor makes them
# (command, address type, hostname, then safe-socks).  Tor splits its code
# the same way: parse_socks*() reads a message, process_socks*() decides.
# It never touches a socket, a clock or a resolver.  It also builds the
# replies that end the conversation, whose shape depends on what the client
# spoke.

class HandshakeState(enum.Enum):
    GREETING = "greeting"               # a SOCKS4 request or a SOCKS5 greeting
    AUTHENTICATING = "authenticating"   # an RFC 1929 message is due
    REQUESTING = "requesting"           # a SOCKS5 request is due
    DONE = "done"                       # a request was accepted, or refused


class Request(NamedTuple):
    """A request the handshake accepted."""
    version: Version    # or Protocol.HTTP_CONNECT for an HTTP CONNECT
    command: Command
    host: str           # as the client wrote it: an IP literal or a name
    port: int
    address: object     # host as an IPv4Address or IPv6Address; None: a name
    userid: Optional[bytes]     # SOCKS4 userid or RFC 1929 username; the
                                # isolation key of an HTTP CONNECT
    unsafe: bool        # the client gave only an IP address (SafeSocks)


# Commands each version can carry, and those served by default (BIND and UDP
# ASSOCIATE are answered "not supported", as Tor does, unless an option turns
# them on: the README's "BIND, UDP ASSOCIATE" row).
COMMAND_VALUES = frozenset(Command)
ADDRESS_TYPE_VALUES = frozenset(AddressType)
SERVED_COMMANDS = frozenset((Command.CONNECT, Command.RESOLVE,
                             Command.RESOLVE_PTR, Command.CONNECT_DIR))
OPTIONAL_COMMANDS = {Command.BIND: "--enable-bind",
                     Command.UDP_ASSOCIATE: "--enable-udp"}


@functools.lru_cache(maxsize=None)     # four sets at most, shared by all
def served_commands(enable_bind: bool = False,
                    enable_udp: bool = False) -> frozenset:
    """The commands a server answers: SERVED_COMMANDS and those enabled."""
    served = set(SERVED_COMMANDS)
    if enable_bind:
        served.add(Command.BIND)
    if enable_udp:
        served.add(Command.UDP_ASSOCIATE)
    return frozenset(served)


def unsupported_reason(command: Command) -> str:
    """The log's word for a command that is not served."""
    option = OPTIONAL_COMMANDS.get(command)
    if option:
        return "%s is not enabled (%s)" % (command.name, option)
    return "unsupported command %s" % command.name


class ClientHandshake:
    """What a client's handshake holds, whatever it speaks: the server's
    rules for it, what its request asked for, and how it ended.

    credentials_required  only RFC 1929 will do, and SOCKS4 is refused
    authenticate          authenticate(username, password) -> bool, asked
                          when credentials are required
    safe_socks            refuse requests that give only an IP address
    client_family         the client socket's family: a SOCKS5 reply's ATYP
    local_address         local_address() -> "host:port" the client reached,
                          for the HTTP page (asked only for that page)
    served_commands       the commands answered (served_commands()); the
                          others get "command not supported"
    """
    __slots__ = ("credentials_required", "authenticate", "safe_socks",
                 "client_family", "local_address", "served_commands",
                 "state", "version", "protocol", "method", "command", "host",
                 "port", "unsafe", "buffered", "received", "request",
                 "refusal", "userid", "early_data")
    FIRST_STATE = HandshakeState.GREETING
    PROTOCOL = None             # known before the first byte, or not

    def __init__(self, credentials_required: bool = False, authenticate=None,
                 safe_socks: bool = False,
                 client_family: int = socket.AF_INET, local_address=None,
                 served_commands: frozenset = SERVED_COMMANDS):
        self.credentials_required = credentials_required
        self.authenticate = authenticate
        self.safe_socks = safe_socks
        self.client_family = client_family
        self.local_address = local_address
        self.served_commands = served_commands
        self.state = self.FIRST_STATE
        self.protocol = self.PROTOCOL   # what the first byte said
        self.version = self.PROTOCOL    # known from the first message on
        self.method = None          # the SOCKS5 method chosen
        self.command = None         # known once a request is parsed,
        self.host = ""              # with its destination
        self.port = 0
        self.unsafe = None          # whether the request gave only an IP
        self.buffered = bytearray()
        self.received = 0           # bytes taken, across all messages
        self.request = None
        self.refusal = ""           # why the client was refused
        self.userid = None
        self.early_data = b""

    def _refused(self, reply: bytes, reason: str) -> bytes:
        self.state = HandshakeState.DONE
        self.refusal = reason
        return reply


class SocksHandshake(ClientHandshake):
    """One client's SOCKS handshake, from its first byte to its request.

    receive(data) takes bytes from the client and returns the replies to send
    now, in order.  Once state is DONE, request holds the accepted Request,
    or refusal says why the client was turned away (its reply, if it gets
    one, was among the bytes returned).  The bytes the client sent after its
    request are early_data.  success_reply(), failure_reply() and the answer
    builders give the replies that end the conversation.  Its arguments
    are ClientHandshake's.
    """
    __slots__ = ()

    def room(self) -> int:
        """How many more bytes the handshake may take (MAX_HANDSHAKE_BYTES
        in all: what follows a request waits in the kernel until relayed)."""
        return MAX_HANDSHAKE_BYTES - self.received

    def receive(self, data) -> bytes:
        """Parse every whole message buffered, in order, answering each."""
        self.received += len(data)
        self.buffered += data
        replies = b""
        done = HandshakeState.DONE
        while self.state is not done and self.buffered:
            result = self._parse_next()
            if result is NEED_MORE:
                break
            if isinstance(result, Rejected):
                return replies + self._refused(result.reply, result.reason)
            del self.buffered[:result.used]
            replies += self._take(result.message)
        # Past the limit with more to come (a message cut short, or whole
        # ones that end right at it, as a PROXY header in front allows).
        if self.state is not done and self.received >= MAX_HANDSHAKE_BYTES:
            replies += self.refuse(Reply.GENERAL_FAILURE,
                                   "handshake longer than %d bytes"
                                   % MAX_HANDSHAKE_BYTES)
        return replies

    def refuse(self, reply: Reply, reason: str) -> bytes:
        """End the handshake with the version's refusal; the bytes to send
        (none while the version is unknown)."""
        return self._refused(self.failure_reply(reply), reason)

    # -- replies that end the conversation ------------------------------------

    def success_reply(self) -> bytes:
        """The request succeeded: bytes flow from now on."""
        if self.version is Version.SOCKS4:
            return socks4_reply(Socks4Reply.GRANTED)
        return socks5_reply(Reply.SUCCEEDED, self.client_family)

    def failure_reply(self, reply: Reply,
                      during_lookup: bool = False) -> bytes:
        """The request failed with reply (SOCKS4 knows only "rejected");
        SOCKS says the same whether or not a lookup failed."""
        if self.version is None:
            return b""
        family = self.client_family
        if self.command in LOOKUP_COMMANDS:
            # A lookup's failure is always the 10-byte form (the README's
            # "RESOLVE failure" row).
            family = socket.AF_INET
        return failure_reply(self.version, reply, family)

    def resolve_reply(self, address) -> bytes:
        """A RESOLVE answer carrying address (SOCKS4: IPv4 only)."""
        return self.bound_reply(address, 0)

    def bound_reply(self, address, port: int) -> bytes:
        """Success naming address:port: where a BIND listens, then who
        connected (RFC 1928 §6, the SOCKS4 note's two 5a replies), or where
        UDP ASSOCIATE's datagrams go (SOCKS4: IPv4 only)."""
        if self.version is Version.SOCKS4:
            return socks4_reply(Socks4Reply.GRANTED, address.packed, port)
        return socks5_address_reply(address, port)

    # -- the messages ---------------------------------------------------------

    def _parse_next(self) -> ParseResult:
        buffered = self.buffered
        if self.state is HandshakeState.AUTHENTICATING:
            return parse_username_password(buffered)
        if self.state is HandshakeState.REQUESTING:
            if buffered[0] == USERPASS_VERSION \
                    and self.method is Method.NO_AUTH:
                # RFC 1929 although "no authentication" was chosen: Tor
                # answers it and goes on (the README's "SOCKS5 methods").
                return parse_username_password(buffered)
            result = parse_socks5_request(buffered)
            if isinstance(result, Rejected) and len(buffered) > 3 \
                    and buffered[0] == Version.SOCKS5 and buffered[2] == 0 \
                    and buffered[3] not in ADDRESS_TYPE_VALUES \
                    and buffered[1] in COMMAND_VALUES \
                    and buffered[1] not in self.served_commands:
                # The command is judged before the address type.
                return Rejected(socks5_reply(Reply.COMMAND_NOT_SUPPORTED),
                                unsupported_reason(Command(buffered[1])))
            return result
        self.protocol = protocol = detect_protocol(buffered[0])
        if protocol is Protocol.SOCKS4:
            self.version = Version.SOCKS4
            return parse_socks4_request(buffered)
        if protocol is Protocol.SOCKS5:
            return parse_socks5_greeting(buffered)
        if protocol is Protocol.HTTP:
            method = parse_http_method(buffered)
            if method is NEED_MORE:
                return NEED_MORE
            where = self.local_address() if self.local_address else None
            return Rejected(http_reply(method.message, where),
                            "client speaks HTTP to a SOCKS port")
        if protocol is Protocol.TLS:
            return Rejected(b"", "client speaks TLS to a SOCKS port")
        return Rejected(b"", "unknown protocol, first byte 0x%02x"
                        % buffered[0])

    def _take(self, message) -> bytes:
        kind = type(message)
        if kind is Socks5Greeting:
            return self._on_greeting(message)
        if kind is UsernamePassword:
            return self._on_username_password(message)
        return self._on_request(message)

    def _on_greeting(self, greeting: Socks5Greeting) -> bytes:
        self.version = Version.SOCKS5
        self.method = method = choose_method(greeting.methods,
                                             self.credentials_required)
        reply = socks5_method_reply(method)
        if method is Method.NO_ACCEPTABLE:
            return self._refused(reply, "no acceptable authentication method")
        if method is Method.USERNAME_PASSWORD:
            self.state = HandshakeState.AUTHENTICATING
        else:
            self.state = HandshakeState.REQUESTING
        return reply

    def _on_username_password(self, message: UsernamePassword) -> bytes:
        accepted = (not self.credentials_required
                    or self.authenticate(message.username, message.password))
        reply = username_password_reply(accepted)
        if not accepted:
            return self._refused(reply, "bad username or password")
        self.userid = message.username
        self.method = Method.USERNAME_PASSWORD     # once only
        self.state = HandshakeState.REQUESTING
        return reply

    def _on_request(self, message) -> bytes:
        """Decide on a whole request: the process step after parsing.  The
        checks come in Tor's order (the README's "order of checks" row):
        command, address type, hostname, then what is allowed."""
        # Bytes after the request are the client's early data (the README's
        # "several messages in one segment" row).
        self.early_data, self.buffered = bytes(self.buffered), b""
        self.command = command = message.command
        self.host, self.port = message.host, message.port
        if isinstance(message, Socks4Request):
            address_type = (AddressType.DOMAIN if message.is_4a
                            else AddressType.IPV4)
            self.userid = message.userid
            if self.credentials_required:
                return self.refuse(Reply.NOT_ALLOWED, "SOCKS4 cannot present "
                                   "the password that credentials require")
        else:
            address_type = message.address_type
        if command not in self.served_commands:
            return self.refuse(Reply.COMMAND_NOT_SUPPORTED,
                               unsupported_reason(command))
        if command is Command.RESOLVE_PTR and self.version is Version.SOCKS4:
            return self.refuse(Reply.COMMAND_NOT_SUPPORTED,
                               "RESOLVE_PTR over SOCKS4")
        address = ip_literal(message.host)
        if command is Command.RESOLVE_PTR and address is None:
            return self.refuse(Reply.ADDRESS_TYPE_NOT_SUPPORTED,
                               "RESOLVE_PTR of something that is not an "
                               "address")
        problem = hostname_problem(message.host) \
            if address_type is AddressType.DOMAIN else None
        if problem:
            # A name with a byte outside printable ASCII is a bad request;
            # one that only Tor's hostname rule refuses is, for a lookup,
            # the lookup's failure (the README's "hostnames" rows).
            printable = message.host.isascii() and message.host.isprintable()
            return self.refuse(Reply.HOST_UNREACHABLE
                               if command in LOOKUP_COMMANDS and printable
                               else Reply.GENERAL_FAILURE, problem)
        self.unsafe = is_unsafe_request(self.version, address_type, command)
        if self.unsafe and self.safe_socks:
            return self.refuse(Reply.NOT_ALLOWED, "client gave only an IP "
                               "address (--safe-socks)")
        if address is None and command is not Command.UDP_ASSOCIATE:
            # (UDP ASSOCIATE's name only stands for the client: the README's
            # "UDP ASSOCIATE request" row.)
            refusal = special_name_refusal(message.host)
            if refusal:
                return self.refuse(Reply.HOST_UNREACHABLE, refusal)
        if message.port == 0 and command in DIALLED_COMMANDS:
            return self.refuse(Reply.GENERAL_FAILURE, "destination port 0")
        self.request = Request(self.version, command, message.host,
                               message.port, address, self.userid,
                               self.unsafe)
        self.state = HandshakeState.DONE
        return b""


# =============================================================================
# The HTTP CONNECT handshake (sans-I/O): Tor's HTTPTunnelPort
# =============================================================================
# An --http-tunnel port speaks HTTP CONNECT (RFC 9110 §9.3.6) as Tor's
# HTTPTunnelPort does (Tor's connection_ap_process_http_connect, and the Tor
# spec's "HTTP CONNECT" chapter with proposal 365): one request per
# connection; a CONNECT is served as a SOCKS CONNECT is, anything else is
# answered and closed.  HttpTunnelHandshake has SocksHandshake's interface,
# so Connection serves either.  Every answer is HTTP/1.0, as Tor's are, and
# carries Tor's headers except those that name Tor (the README's "HTTP
# CONNECT answers" row).

MAX_HTTP_HEAD_BYTES = 8191      # Tor's limit for a request head (8192 with
                                # the NUL its buffer code adds)
MAX_HTTP_FIELDS = 128           # header lines in one head (Tor takes 100)
MAX_CONNECT_HOST = 255          # Tor answers 414 from 256 (MAX_SOCKS_ADDR_LEN)

# RFC 9110 §5.6.2 token characters (methods, field names); what a request
# line and a field value may hold (RFC 9112 §3, RFC 9110 §5.5: no control
# bytes; a value may carry obs-text and HTAB).
HTTP_TOKEN_BYTES = (b"!#$%&'*+-.^_`|~0123456789"
                    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
REQUEST_LINE_BYTES = bytes(range(0x20, 0x7F))
FIELD_VALUE_BYTES = (b"\t" + bytes(range(0x20, 0x7F))
                     + bytes(range(0x80, 0x100)))

BASIC_REALM = "torsocksd"
SERVER_FIELD = "Server: torsocksd/%s\r\n" % __version__
ALLOWED_METHODS = "OPTIONS, CONNECT"

# What each failure becomes on the HTTP CONNECT port: the END reason a Tor
# exit sends for the same failure (errno_to_stream_end_reason in Tor's
# reasons.c), with Tor's status line for that reason
# (end_reason_to_http_connect_response_line, Tor 0.4.9).  The README's
# "connect errors" and "HTTP CONNECT failures" rows.
HTTP_TUNNEL_FAILURES = {
    Reply.GENERAL_FAILURE: ("500 Internal Server Error", "MISC"),
    Reply.NOT_ALLOWED: ("403 Forbidden (exit policy)", "EXITPOLICY"),
    Reply.NETWORK_UNREACHABLE: ("503 Service Unavailable (no route)",
                                "NOROUTE"),
    Reply.HOST_UNREACHABLE: ("503 Service Unavailable (no route)", "NOROUTE"),
    Reply.CONNECTION_REFUSED: ("403 Forbidden (connection refused)",
                               "CONNECTREFUSED"),
    Reply.TTL_EXPIRED: ("504 Gateway Timeout", "TIMEOUT"),
}
RESOLVE_FAILED = ("503 Service Unavailable (resolve failed)", "RESOLVEFAILED")
TOR_PROTOCOL_VIOLATION = ("502 Bad Gateway (tor protocol violation)",
                          "TORPROTOCOL")


class HttpRequestHead(NamedTuple):
    method: bytes       # as sent: Tor takes "connect" as "CONNECT"
    target: bytes
    version: bytes      # HTTP/1.0 or HTTP/1.1 (any HTTP/1.x)
    fields: tuple       # ((lower-case name, value), ...) in order


def http_tunnel_reply(status: str, failed: Optional[str] = None,
                      fields: str = "") -> bytes:
    """An answer on the HTTP CONNECT port: HTTP/1.0, the status, fields,
    an empty Tor-Capabilities (none of Tor's extensions is offered), for a
    failed CONNECT Tor-Request-Failed naming its END reason ("end/TIMEOUT"),
    then the blank line."""
    head = "HTTP/1.0 %s\r\n%sTor-Capabilities: \r\n" % (status, fields)
    if failed:
        head += "Tor-Request-Failed: %s\r\n" % failed
    return (head + "\r\n").encode("ascii")


HTTP_BAD_REQUEST = http_tunnel_reply("400 Bad Request")
HTTP_REQUEST_TIMEOUT = http_tunnel_reply("408 Request Timeout")
HTTP_URI_TOO_LONG = http_tunnel_reply("414 Request-URI Too Long")
HTTP_NO_RPC = http_tunnel_reply("501 Not implemented (No RPC Support)")
# One request per connection: a client must log in on a new one, so say so
# (curl would otherwise send its login down the closed connection).
HTTP_PROXY_AUTHENTICATION = http_tunnel_reply(
    "407 Proxy Authentication Required",
    fields='Proxy-Authenticate: Basic realm="%s"\r\nContent-Length: 0\r\n'
           'Connection: close\r\n' % BASIC_REALM)
HTTP_OPTIONS_REPLY = (
    "HTTP/1.0 200 OK\r\nAllow: %s\r\nContent-Length: 0\r\n"
    "Tor-Capabilities: \r\n%s\r\n" % (ALLOWED_METHODS, SERVER_FIELD)
).encode("ascii")


def http_tunnel_failure(status_and_reason) -> bytes:
    status, reason = status_and_reason
    return http_tunnel_reply(status, "end/" + reason)


# The page for a client that uses the HTTP CONNECT port as a plain HTTP
# proxy (or opens it in a browser); %(where)s is the address it reached.
HTTP_TUNNEL_PAGE = """\
<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><title>This is an HTTP CONNECT tunnel</title>
<style>code { white-space: nowrap; }</style></head>
<body>
<h1>This is an HTTP CONNECT tunnel, not a full HTTP proxy</h1>
<p>torsocksd's HTTP port only opens tunnels with CONNECT, as Tor's
HTTPTunnelPort does: it does not fetch plain http:// pages for you.</p>
<p>Use it for https:// addresses, which clients tunnel with CONNECT: set
<code>https_proxy=http://%(where)s</code>, or with curl use
<code>-x http://%(where)s</code> (add <code>--proxytunnel</code> for
http:// addresses).</p>
</body>
</html>
"""


def http_tunnel_page_reply(method: bytes, where: Optional[str]) -> bytes:
    """405 with our page, its examples naming where; HEAD gets the headers
    only (the README's "HTTP CONNECT answers" row)."""
    page = (HTTP_TUNNEL_PAGE % {"where": html_text(where or "HOST:PORT")}
            ).encode("utf-8")
    head = http_tunnel_reply(
        "405 Method Not Allowed",
        fields="Allow: %s\r\nContent-Type: text/html; charset=utf-8\r\n"
               "Content-Length: %d\r\nConnection: close\r\n%s"
               % (ALLOWED_METHODS, len(page), SERVER_FIELD))
    return head if method.upper() == b"HEAD" else head + page


def _only(data: bytes, allowed: bytes) -> bool:
    """Whether every byte of data is one of allowed."""
    return not data.translate(None, allowed)


def _request_line_problem(line: bytes, complete: bool) -> Optional[str]:
    """Why a request line (or the part of it that has come) cannot be
    METHOD SP TARGET SP HTTP/1.x (RFC 9112 §3), or None.  Words may be
    apart by more than one space, as Tor reads them (RFC 9112 §3 allows
    it)."""
    if line[:1] in (b"\x04", b"\x05"):
        return "a SOCKS client at the HTTP CONNECT port"
    if line[:1] == b"\x16":
        return "TLS at the HTTP CONNECT port (an https:// proxy URL?)"
    if not _only(line, REQUEST_LINE_BYTES):
        return "a byte outside printable ASCII in the request line"
    words = line.split()
    if words and not _only(words[0], HTTP_TOKEN_BYTES):
        return "the request line does not start with a method"
    if not complete:
        return None
    if len(words) != 3:
        return "the request line is not METHOD TARGET VERSION"
    version = words[2]
    if not (len(version) == 8 and version.startswith(b"HTTP/1.")
            and version[7:].isdigit()):
        return "not HTTP/1.x: %s" % clip_for_log(version)
    return None


def parse_http_request_head(data) -> ParseResult:
    """An HTTP/1.x request head (RFC 9112 §2.2-5): the request line, header
    lines, the blank line; CRLF only, at most MAX_HTTP_HEAD_BYTES.  A
    request line that cannot be one is rejected as soon as it shows."""
    data = bytes(data[:MAX_HTTP_HEAD_BYTES + 1])
    line_end = data.find(b"\r\n")
    line = data[:line_end] if line_end >= 0 else data
    if line_end < 0 and line.endswith(b"\r"):
        line = line[:-1]        # the CR of the line's CRLF has come
    problem = _request_line_problem(line, line_end >= 0)
    if problem:
        return Rejected(HTTP_BAD_REQUEST, problem)
    end = data.find(b"\r\n\r\n")
    if end < 0 or end + 4 > MAX_HTTP_HEAD_BYTES:
        if len(data) >= MAX_HTTP_HEAD_BYTES:
            return Rejected(HTTP_BAD_REQUEST, "request head longer than %d "
                            "bytes" % MAX_HTTP_HEAD_BYTES)
        return NEED_MORE
    lines = data[:end].split(b"\r\n")
    if len(lines) > MAX_HTTP_FIELDS + 1:
        return Rejected(HTTP_BAD_REQUEST, "more than %d header lines"
                        % MAX_HTTP_FIELDS)
    fields = []
    for field_line in lines[1:]:
        name, colon, value = field_line.partition(b":")
        if not colon or not name or not _only(name, HTTP_TOKEN_BYTES):
            # No name, a space before the colon, or a folded line (RFC 9112
            # §5.1-5.2: a server rejects them).
            return Rejected(HTTP_BAD_REQUEST, "malformed header line %s"
                            % clip_for_log(field_line, 64))
        value = value.strip(b" \t")
        if not _only(value, FIELD_VALUE_BYTES):
            return Rejected(HTTP_BAD_REQUEST, "a control byte in header %s"
                            % clip_for_log(name, 64))
        fields.append((name.lower(), value))
    method, target, version = lines[0].split()
    return Parsed(HttpRequestHead(method, target, version, tuple(fields)),
                  end + 4)


def field_value(fields, name: bytes) -> Optional[bytes]:
    """The first value of the header name (lower case), as Tor reads it
    (http_get_header), or None."""
    for field, value in fields:
        if field == name:
            return value
    return None


def split_connect_target(target: str):
    """(host, port) of a CONNECT's authority-form target (RFC 9110 §9.3.6:
    host:port, an IPv6 address in brackets).  port is None when there is
    none (an IPv6 address without brackets has none either, as Tor reads
    it); a port that is not a number from 1 to 65535 is a ValueError."""
    if target.startswith("["):
        close = target.find("]") + 1
        if not close or close == len(target):
            return target, None
        host, port_text = target[:close], target[close:]
        if not port_text.startswith(":"):
            raise ValueError("text after the brackets")
        port_text = port_text[1:]
    elif target.count(":") == 1:
        host, _, port_text = target.partition(":")
    else:
        return target, None
    if not (port_text.isdigit() and port_text.isascii()
            and len(port_text) <= 10 and 0 < int(port_text) <= 0xFFFF):
        raise ValueError("port %r" % port_text)
    return host, int(port_text)


def basic_credentials(value: Optional[bytes]):
    """(username, password) from a Proxy-Authorization value of the Basic
    scheme (RFC 7617), or None."""
    scheme, _, token = (value or b"").partition(b" ")
    if scheme.lower() != b"basic":
        return None
    try:
        decoded = base64.b64decode(token.strip(b" "), validate=True)
    except ValueError:
        return None
    username, colon, password = decoded.partition(b":")
    return (username, password) if colon else None


def is_localhost_field(value: Optional[bytes]) -> bool:
    """Whether a Host value is "localhost", with a port or not, in any case
    (Tor's check against cross-site probing: Tor spec, "HTTP CONNECT")."""
    name, _, port = (value or b"").partition(b":")
    return name.lower() == b"localhost" and (not port or port.isdigit())


class HttpTunnelHandshake(ClientHandshake):
    """One client's HTTP CONNECT request, from its first byte to its
    request: SocksHandshake's interface (receive, state, request, refusal,
    early_data, room(), refuse(), success_reply(), failure_reply()).

    receive(data) answers at once what is answered without a connection
    (a bad request, OPTIONS, another method, 407); a CONNECT that passes
    every check becomes the request, served as a SOCKS CONNECT is.  The
    checks come in Tor's order (bad port 400, long host 414, Tor-RPC-Target
    501, then the destination: 502), with credentials checked first.  The
    constructor takes ClientHandshake's arguments (served_commands is
    SOCKS's: HTTP has only CONNECT).
    """
    __slots__ = ()
    FIRST_STATE = HandshakeState.REQUESTING
    PROTOCOL = Protocol.HTTP_CONNECT

    def room(self) -> int:
        """How many more bytes the request head may take."""
        return MAX_HTTP_HEAD_BYTES - self.received

    def receive(self, data) -> bytes:
        """Take bytes; once the head is whole, decide.  The answer to send
        now (none while the head is incomplete, or for a CONNECT that is to
        be served)."""
        self.received += len(data)
        self.buffered += data
        if self.state is HandshakeState.DONE:
            return b""
        result = parse_http_request_head(self.buffered)
        if result is NEED_MORE:
            if self.received < MAX_HTTP_HEAD_BYTES:
                return b""
            # A PROXY header in front counts toward the limit too, so the
            # head itself may be shorter than the parser's own bound.
            return self._refused(HTTP_BAD_REQUEST, "request head longer "
                                 "than %d bytes" % MAX_HTTP_HEAD_BYTES)
        if isinstance(result, Rejected):
            return self._refused(result.reply, result.reason)
        # Bytes after the head are the tunnel's first bytes (RFC 9110
        # §9.3.6: a CONNECT has no content).
        self.early_data = bytes(self.buffered[result.used:])
        self.buffered = b""
        head = result.message
        if head.method.upper() != b"CONNECT":
            return self._on_other_method(head)
        return self._on_connect(head)

    def refuse(self, reply: Reply, reason: str) -> bytes:
        """End the handshake.  Before the head is whole the client was too
        slow (408, the README's "HTTP CONNECT limits" row); after it, the
        request failed with reply."""
        if self.state is not HandshakeState.DONE:
            return self._refused(HTTP_REQUEST_TIMEOUT, reason)
        return self._refused(self.failure_reply(reply), reason)

    # -- answers that end the conversation ------------------------------------

    def success_reply(self) -> bytes:
        """The target answered: bytes flow from now on."""
        return http_tunnel_reply("200 OK")

    def failure_reply(self, reply: Reply,
                      during_lookup: bool = False) -> bytes:
        """Tor's answer for the END reason that stands for reply; a name
        that did not resolve is "resolve failed"."""
        if during_lookup and reply is Reply.HOST_UNREACHABLE:
            return http_tunnel_failure(RESOLVE_FAILED)
        return http_tunnel_failure(HTTP_TUNNEL_FAILURES.get(
            reply, HTTP_TUNNEL_FAILURES[Reply.GENERAL_FAILURE]))

    # -- the request ----------------------------------------------------------

    def _on_other_method(self, head: HttpRequestHead) -> bytes:
        """Another method gets an answer only when Host names localhost: a
        web page's script can reach the port (DNS rebinding) with its own
        Host only, and learns nothing (Tor 0.4.9 does the same)."""
        method = clip_for_log(head.method, 32)
        if not is_localhost_field(field_value(head.fields, b"host")):
            return self._refused(b"", "HTTP %s whose Host is not localhost "
                                 "(closed unanswered)" % method)
        if self.credentials_required and not self._authenticated(head.fields):
            return self._refused(HTTP_PROXY_AUTHENTICATION,
                                 "no or bad Proxy-Authorization")
        if head.method.upper() == b"OPTIONS":
            return self._refused(HTTP_OPTIONS_REPLY,
                                 "OPTIONS, answered with what is allowed")
        where = self.local_address() if self.local_address else None
        return self._refused(http_tunnel_page_reply(head.method, where),
                             "HTTP %s instead of CONNECT" % method)

    def _on_connect(self, head: HttpRequestHead) -> bytes:
        fields = head.fields
        if self.credentials_required and not self._authenticated(fields):
            return self._refused(HTTP_PROXY_AUTHENTICATION,
                                 "no or bad Proxy-Authorization")
        try:
            host, port = split_connect_target(head.target.decode("latin-1"))
        except ValueError as error:
            return self._refused(HTTP_BAD_REQUEST, "CONNECT target %s: %s"
                                 % (clip_for_log(head.target, 64), error))
        self.command = Command.CONNECT
        self.host, self.port = host, port or 0
        if len(host) > MAX_CONNECT_HOST:
            return self._refused(HTTP_URI_TOO_LONG, "host longer than %d "
                                 "bytes" % MAX_CONNECT_HOST)
        if field_value(fields, b"tor-rpc-target") is not None:
            return self._refused(HTTP_NO_RPC, "Tor-RPC-Target (no RPC here)")
        if field_value(fields, b"transfer-encoding") is not None \
                or field_value(fields, b"content-length") not in (None, b"0"):
            return self._refused(HTTP_BAD_REQUEST, "a CONNECT with content")
        problem = (hostname_problem(host) or special_name_refusal(host)
                   or (None if port else "no port"))
        if problem:
            # What Tor answers when it refuses a destination itself.
            return self._refused(http_tunnel_failure(TOR_PROTOCOL_VIOLATION),
                                 problem)
        address = ip_literal(host)
        self.unsafe = address is not None
        if self.unsafe and self.safe_socks:
            return self._refused(self.failure_reply(Reply.NOT_ALLOWED),
                                 "client gave only an IP address "
                                 "(--safe-socks)")
        self.userid = self.userid or self._isolation_key(fields)
        self.request = Request(self.version, Command.CONNECT, host, port,
                               address, self.userid, self.unsafe)
        self.state = HandshakeState.DONE
        return b""

    def _authenticated(self, fields) -> bool:
        """Proxy-Authorization: Basic with a user:password the credentials
        hold (checked by authenticate, as a SOCKS5 login is)."""
        credentials = basic_credentials(
            field_value(fields, b"proxy-authorization"))
        if credentials is None or not self.authenticate(*credentials):
            return False
        self.userid = credentials[0]
        return True

    @staticmethod
    def _isolation_key(fields) -> Optional[bytes]:
        """What Tor isolates streams by: Proxy-Authorization and the stream
        isolation header, NUL between (neither can hold a NUL)."""
        authorization = field_value(fields, b"proxy-authorization")
        isolation = (field_value(fields, b"tor-stream-isolation")
                     or field_value(fields, b"x-tor-stream-isolation"))
        if authorization is None and isolation is None:
            return None
        return (authorization or b"") + b"\0" + (isolation or b"")


# =============================================================================
# The PROXY protocol: whom a load balancer relays (pure parser)
# =============================================================================
# A TCP balancer such as HAProxy (send-proxy, send-proxy-v2) puts a header in
# front of each stream that names the client it relays (HAProxy's
# doc/proxy-protocol.txt, "The PROXY protocol, Versions 1 & 2").  A
# connection from a source of --proxy-protocol-from must begin with one;
# from any other source a header is never parsed (it is just a bad first
# message).  The README's "PROXY protocol" row.

PROXY_V1_PREFIX = b"PROXY "
PROXY_V1_MAX = 107                  # the longest v1 line with its CRLF (§2.1)
PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
PROXY_V2_FIXED = 16                 # signature, version and command, family,
                                    # length (§2.2)
# v1 takes at most 107 bytes; v2 16, the addresses (216 for UNIX) and any
# TLVs.  The header counts toward the handshake's byte limit.
MAX_PROXY_HEADER_BYTES = 512
PROXY_V2_LOCAL, PROXY_V2_PROXY = 0x0, 0x1           # commands
PROXY_V2_UNSPEC, PROXY_V2_INET, PROXY_V2_INET6, PROXY_V2_UNIX = range(4)
PROXY_V2_STREAM, PROXY_V2_DGRAM = 0x1, 0x2          # transport protocols
PROXY_V2_ADDRESS_BYTES = {PROXY_V2_INET: 12, PROXY_V2_INET6: 36,
                          PROXY_V2_UNIX: 216}


class ProxyHeader(NamedTuple):
    """What a PROXY header says.  source and destination are (address,
    port) of the connection the balancer relays, or None when the
    connection is the balancer's own (v2 LOCAL: its health checks) or names
    no client of ours (v1 UNKNOWN, v2 UNSPEC, UNIX or UDP)."""
    version: int
    source: Optional[tuple]
    destination: Optional[tuple]


def parse_proxy_header(data, limit: int = MAX_PROXY_HEADER_BYTES
                       ) -> ParseResult:
    """A PROXY protocol header of version 1 (text) or 2 (binary), told
    apart by their first bytes (§2.2); at most limit bytes.  Rejected.reply
    is always b"": a balancer gets no answer, only a close."""
    probe = bytes(data[:len(PROXY_V2_SIGNATURE)])
    if PROXY_V2_SIGNATURE.startswith(probe):
        return _parse_proxy_v2(data, limit) if probe else NEED_MORE
    if PROXY_V1_PREFIX.startswith(probe[:len(PROXY_V1_PREFIX)]):
        return _parse_proxy_v1(data)
    return Rejected(b"", "no PROXY protocol header (first bytes %s)"
                    % clip_for_log(probe))


def _proxy_rejection(reason: str) -> Rejected:
    return Rejected(b"", "bad PROXY header: " + reason)


def _parse_proxy_v1(data) -> ParseResult:
    """PROXY TCP4|TCP6 SRC DST SPORT DPORT CRLF, or PROXY UNKNOWN ... CRLF
    (§2.1): single spaces, canonical addresses, no leading zeros."""
    head = bytes(data[:PROXY_V1_MAX])
    end = head.find(b"\r\n")
    line = head[:end]
    if end >= 0:
        lone = b"\r" in line or b"\n" in line
    else:       # the last byte may be the CR of the CRLF still to come
        lone = b"\n" in head or b"\r" in head[:-1]
    if lone:
        return _proxy_rejection("a CR or LF alone in a v1 line")
    if end < 0:
        if len(head) >= PROXY_V1_MAX:
            return _proxy_rejection("no CRLF in the first %d bytes"
                                    % PROXY_V1_MAX)
        return NEED_MORE
    fields = line.split(b" ")
    if fields[1:2] == [b"UNKNOWN"]:
        return Parsed(ProxyHeader(1, None, None), end + 2)
    if len(fields) != 6 or fields[1] not in (b"TCP4", b"TCP6"):
        return _proxy_rejection("v1 line %s" % clip_for_log(line, 120))
    version = 4 if fields[1] == b"TCP4" else 6
    addresses = [_v1_address(text, version) for text in fields[2:4]]
    ports = [_v1_port(text) for text in fields[4:6]]
    if None in addresses or None in ports:
        return _proxy_rejection("v1 line %s" % clip_for_log(line, 120))
    return Parsed(ProxyHeader(1, (addresses[0], ports[0]),
                              (addresses[1], ports[1])), end + 2)


def _v1_address(text: bytes, version: int):
    """An address as v1 writes it: a dotted quad without leading zeros, or
    hexadecimal groups with at most one "::" (no zone); a dotted tail only
    as ::ffff:a.b.c.d, which is how HAProxy (inet_ntop) writes an IPv4
    client of a dual-stack frontend, and reads it back itself."""
    try:
        text = text.decode("ascii")
    except UnicodeDecodeError:
        return None
    if version == 4:
        parts = text.split(".")
        if len(parts) != 4 or not all(
                part.isdigit() and part.isascii() and len(part) <= 3
                and (part == "0" or not part.startswith("0"))
                and int(part) <= 255 for part in parts):
            return None
        return ipaddress.IPv4Address(text)
    prefix, _, quad = text.rpartition(":")
    if "." in quad and prefix.lower() == "::ffff" \
            and _v1_address(quad.encode("ascii"), 4) is not None:
        return ipaddress.IPv6Address(text)
    if not text or text.strip("0123456789abcdefABCDEF:"):
        return None
    try:
        return ipaddress.IPv6Address(text)
    except ValueError:
        return None


def _v1_port(text: bytes) -> Optional[int]:
    if not (text.isdigit() and len(text) <= 5
            and (text == b"0" or not text.startswith(b"0"))):
        return None
    port = int(text)
    return port if port <= 0xFFFF else None


def _parse_proxy_v2(data, limit: int) -> ParseResult:
    """The 16-byte fixed part, then its length of addresses and TLVs
    (§2.2).  TLVs are skipped."""
    if len(data) > 12 and (data[12] >> 4 != 2 or data[12] & 0xF
                           not in (PROXY_V2_LOCAL, PROXY_V2_PROXY)):
        return _proxy_rejection("v2 version and command 0x%02x" % data[12])
    if len(data) > 13 and (data[13] >> 4 > PROXY_V2_UNIX
                           or data[13] & 0xF > PROXY_V2_DGRAM):
        return _proxy_rejection("v2 family and protocol 0x%02x" % data[13])
    if len(data) < PROXY_V2_FIXED:
        return NEED_MORE
    size = PROXY_V2_FIXED + int.from_bytes(data[14:16], "big")
    if size > limit:
        return _proxy_rejection("v2 header of %d bytes, more than %d"
                                % (size, limit))
    if len(data) < size:
        return NEED_MORE
    family, protocol = data[13] >> 4, data[13] & 0xF
    addresses = bytes(data[PROXY_V2_FIXED:size])
    if len(addresses) < PROXY_V2_ADDRESS_BYTES.get(family, 0):
        return _proxy_rejection("v2 addresses of %d bytes for family %d"
                                % (len(addresses), family))
    if data[12] & 0xF == PROXY_V2_LOCAL or protocol != PROXY_V2_STREAM \
            or family not in (PROXY_V2_INET, PROXY_V2_INET6):
        return Parsed(ProxyHeader(2, None, None), size)
    width = 4 if family == PROXY_V2_INET else 16
    ports = addresses[2 * width:2 * width + 4]
    source = (ipaddress.ip_address(addresses[:width]),
              int.from_bytes(ports[:2], "big"))
    destination = (ipaddress.ip_address(addresses[width:2 * width]),
                   int.from_bytes(ports[2:], "big"))
    return Parsed(ProxyHeader(2, source, destination), size)


# =============================================================================
# Resolvers: names looked up on the proxy side, never blocking the loop
# =============================================================================
# A resolver has lookup(hostname, callback) and reverse(address, callback);
# each returns a handle with cancel() (or None) and, later, calls callback once
# with a ResolverResult from any thread: the server moves the call onto its
# loop.  Optional: attach(server), called once the loop exists, for a resolver
# that runs in the loop itself; close(), called when the server stops.

class ResolverResult(NamedTuple):
    answers: tuple                  # ip_address objects, or names for reverse
    error: Optional[Reply] = None   # why there is no answer
    reason: str = ""


# A lookup past a resolver's max_pending fails at once with this.
TOO_MANY_LOOKUPS = ResolverResult((), Reply.GENERAL_FAILURE,
                                  "too many pending name lookups")


class _Lookup:
    """One SystemResolver job: waiting in its queue, running in a worker,
    or done."""
    __slots__ = ("resolver", "query", "callback", "cancelled", "running",
                 "on_released")

    def __init__(self, resolver, query, callback):
        self.resolver = resolver
        self.query = query
        self.callback = callback
        self.cancelled = False
        self.running = False
        self.on_released = None

    def cancel(self):
        self.cancel_and_release_later(None)

    def cancel_and_release_later(self, on_released) -> bool:
        """Cancel: a job still waiting leaves the queue; one a worker runs
        cannot be stopped (getaddrinfo has no way to), so its worker stays
        taken until it returns.  True then, and on_released(None) is
        called from that worker when it does."""
        resolver = self.resolver
        with resolver._lock:
            self.cancelled = True
            if self.running:
                self.on_released = on_released
                return on_released is not None
            try:
                resolver._jobs.remove(self)
            except ValueError:
                pass
        return False


class SystemResolver:
    """getaddrinfo and getnameinfo(NI_NAMEREQD) in a bounded worker pool.

    Threads start on the first lookup, so a server that only meets IP
    literals never starts one.  Past max_pending queued lookups a new one
    fails at once instead of queueing without bound; a cancelled lookup
    leaves the queue at once.
    """

    def __init__(self, workers: int = 8, max_pending: int = 512):
        self.workers = max(1, workers)
        self.capacity = self.workers    # lookups that run at once
        self.max_pending = max_pending
        self._jobs = collections.deque()
        self._threads = []
        self._lock = threading.Lock()
        self._job_ready = threading.Condition(self._lock)
        self._closed = False

    def lookup(self, hostname: str, callback) -> _Lookup:
        return self._submit(_Lookup(self, ("name", hostname), callback))

    def reverse(self, address, callback) -> _Lookup:
        return self._submit(_Lookup(self, ("address", address), callback))

    def close(self, wait: bool = True):
        """Stop the threads once the lookups queued are done; wait=False
        does not wait for them (a reload retiring this resolver)."""
        with self._lock:
            self._closed = True
            threads, self._threads = self._threads, []
            self._job_ready.notify_all()
        if not wait:
            return
        # Daemon threads: one stuck in getaddrinfo must not hold up a stop.
        deadline = time.monotonic() + 1.0
        for thread in threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))

    def _submit(self, job: _Lookup) -> _Lookup:
        with self._lock:
            refused = len(self._jobs) >= self.max_pending or self._closed
            if not refused:
                if len(self._threads) < self.workers:
                    thread = threading.Thread(target=self._work, daemon=True,
                                              name="torsocksd-resolver")
                    self._threads.append(thread)
                    thread.start()
                self._jobs.append(job)
                self._job_ready.notify()
        if refused:
            job.callback(TOO_MANY_LOOKUPS)
        return job

    def _work(self):
        while True:
            with self._lock:
                while not self._jobs and not self._closed:
                    self._job_ready.wait()
                if not self._jobs:
                    return      # closed, and every queued lookup done
                job = self._jobs.popleft()
                job.running = True
            kind, query = job.query
            try:
                if kind == "name":
                    result = self._getaddrinfo(query)
                else:
                    result = self._getnameinfo(query)
            except Exception as error:      # a worker must outlive any one
                result = ResolverResult((), Reply.GENERAL_FAILURE,
                                        "lookup failed: %r" % error)
            with self._lock:
                job.running = False
                cancelled, on_released = job.cancelled, job.on_released
            if not cancelled:
                job.callback(result)
            elif on_released is not None:
                on_released(None)

    @staticmethod
    def _getaddrinfo(hostname: str) -> ResolverResult:
        try:
            infos = socket.getaddrinfo(hostname, None, socket.AF_UNSPEC,
                                       socket.SOCK_STREAM)
        except (OSError, UnicodeError) as error:
            return ResolverResult((), Reply.HOST_UNREACHABLE,
                                  "name lookup failed: %s" % error)
        answers = []
        for family, _, _, _, sockaddr in infos:
            if family in (socket.AF_INET, socket.AF_INET6):
                address = ipaddress.ip_address(sockaddr[0].split("%")[0])
                if address not in answers:
                    answers.append(address)
        if not answers:
            return ResolverResult((), Reply.HOST_UNREACHABLE, "no address")
        return ResolverResult(tuple(answers))

    @staticmethod
    def _getnameinfo(address) -> ResolverResult:
        try:
            name, _ = socket.getnameinfo((str(address), 0), socket.NI_NAMEREQD)
        except OSError as error:
            return ResolverResult((), Reply.HOST_UNREACHABLE,
                                  "reverse lookup failed: %s" % error)
        return ResolverResult((name.rstrip("."),))


# =============================================================================
# The DNS client (--nameserver): A, AAAA and PTR over UDP and TCP, in the loop
# =============================================================================
# Pure message builders and parsers first (RFC 1035 §4), then DnsResolver,
# which asks the name servers from the server's own selectors loop: each try
# on a fresh connected UDP socket (a kernel-chosen port) with a random id,
# TCP when the answer is truncated, answers cached for their TTL.

DNS_PORT = 53
DNS_HEADER = struct.Struct("!6H")       # ID, flags, counts (RFC 1035 §4.1.1)
DNS_QUESTION = struct.Struct("!HH")     # QTYPE, QCLASS after QNAME (§4.1.2)
DNS_RECORD = struct.Struct("!HHIH")     # TYPE, CLASS, TTL, RDLENGTH (§4.1.3)
DNS_TCP_LENGTH = struct.Struct("!H")    # a TCP message's length (§4.2.2)
DNS_FLAG_RESPONSE = 0x8000          # QR
DNS_FLAG_TRUNCATED = 0x0200         # TC: ask again over TCP (§4.2.1)
DNS_FLAG_RECURSION = 0x0100         # RD: the name server resolves for us
DNS_OPCODE_MASK = 0x7800            # 0 is a standard query
DNS_RCODE_MASK = 0x000F
DNS_CLASS_IN = 1
DNS_POINTER = 0xC0                  # a compression pointer's bits (§4.1.4)
MAX_DNS_NAME = 253                  # as text; 255 bytes on the wire (§2.3.4)
MAX_DNS_WIRE_NAME = 255
MAX_DNS_LABEL = 63
MAX_DNS_MESSAGE = 65535             # the TCP length prefix's limit
MAX_CNAME_CHAIN = 8                 # CNAMEs followed within one answer
# The work one message may cost.  A name has at most 127 labels (255 bytes,
# RFC 1035 §2.3.4), and compression needs at most one pointer per label:
# more hops is a chain built to waste time.  An answer to one question holds
# a few dozen records (a 512-byte UDP answer, about 30 A records; TCP only
# follows a truncated one); the labels and pointers followed in the whole
# message are counted too, 16 per record (a real owner name is 1 pointer).
MAX_DNS_POINTER_HOPS = 128
MAX_DNS_RECORDS = 256               # answer and authority records together
MAX_KEPT_RECORDS = 16               # of them, the answers a lookup keeps
MAX_DNS_PARSE_STEPS = 16 * MAX_DNS_RECORDS
MAX_DNS_TTL = 3600                  # seconds an answer is cached (Tor's cap)
MAX_NEGATIVE_TTL = 30               # seconds "no such name" is cached
DNS_READS_PER_WAKEUP = 8            # so a flood cannot hold the loop


class DnsType(enum.IntEnum):
    A = 1
    CNAME = 5
    SOA = 6
    PTR = 12
    AAAA = 28


class DnsRcode(enum.IntEnum):
    NOERROR = 0
    FORMERR = 1
    SERVFAIL = 2
    NXDOMAIN = 3
    NOTIMP = 4
    REFUSED = 5


class DnsFormatError(ValueError):
    """A name DNS cannot carry, or a message that is not well-formed DNS."""


class DnsAnswer(NamedTuple):
    records: tuple      # ip_address objects (A, AAAA) or names (PTR)
    ttl: int            # seconds it may be cached (RFC 2308 §5 when empty)
    rcode: int
    truncated: bool     # TC: the records are to be asked for over TCP


def _dns_name(name: str) -> bytes:
    """name as its lowercase dotted bytes without the final dot."""
    if name.endswith("."):
        name = name[:-1]
    try:
        return name.encode("ascii").lower()
    except UnicodeError:
        raise DnsFormatError("name is not ASCII") from None


def encode_dns_query(query_id: int, name: str, qtype: int) -> bytes:
    """A query for (name, qtype, IN) with recursion desired (RFC 1035 §4.1);
    DnsFormatError for a name DNS cannot carry (§2.3.4)."""
    dotted = _dns_name(name)
    if len(dotted) > MAX_DNS_NAME:
        raise DnsFormatError("name longer than %d bytes" % MAX_DNS_NAME)
    wire = bytearray()
    for label in dotted.split(b"."):
        if not label:
            raise DnsFormatError("name has an empty label")
        if len(label) > MAX_DNS_LABEL:
            raise DnsFormatError("label longer than %d bytes" % MAX_DNS_LABEL)
        wire += bytes((len(label),)) + label
    return (DNS_HEADER.pack(query_id, DNS_FLAG_RECURSION, 1, 0, 0, 0)
            + bytes(wire) + b"\0" + DNS_QUESTION.pack(qtype, DNS_CLASS_IN))


class _Record(NamedTuple):
    owner: bytes        # lowercase dotted name
    rtype: int
    rclass: int
    ttl: int
    start: int          # RDATA's place in the message
    end: int


class _DnsReader:
    """Names and records read from one message within its budget of work:
    MAX_DNS_POINTER_HOPS pointers for a name, MAX_DNS_PARSE_STEPS labels and
    pointers in all, MAX_DNS_RECORDS records; DnsFormatError beyond."""

    def __init__(self, message: bytes):
        self.message = message
        self.steps_left = MAX_DNS_PARSE_STEPS
        self.records_left = MAX_DNS_RECORDS

    def _step(self):
        self.steps_left -= 1
        if self.steps_left < 0:
            raise DnsFormatError("more than %d labels and pointers in one "
                                 "message" % MAX_DNS_PARSE_STEPS)

    def name(self, offset: int):
        """The dotted name at offset and the offset after it (RFC 1035
        §4.1.4).  A pointer must point before the run of labels it ends, so
        a chain of pointers always ends; the budget ends it sooner."""
        message = self.message
        labels = []
        wire_length = 1         # the root label's zero byte
        run_start = offset
        end = None      # where the name ends in place: after its pointer
        hops = 0
        while True:
            self._step()
            if offset >= len(message):
                raise DnsFormatError("name runs past the end")
            size = message[offset]
            if size & DNS_POINTER == DNS_POINTER:
                if offset + 1 >= len(message):
                    raise DnsFormatError("pointer runs past the end")
                target = (size & ~DNS_POINTER) << 8 | message[offset + 1]
                if target >= run_start:
                    raise DnsFormatError("pointer does not point back")
                hops += 1
                if hops > MAX_DNS_POINTER_HOPS:
                    raise DnsFormatError("name takes more than %d pointers"
                                         % MAX_DNS_POINTER_HOPS)
                if end is None:
                    end = offset + 2
                offset = run_start = target
            elif size & DNS_POINTER:
                raise DnsFormatError("unknown label type")
            elif size == 0:
                return b".".join(labels), offset + 1 if end is None else end
            else:
                wire_length += 1 + size
                if wire_length > MAX_DNS_WIRE_NAME:
                    raise DnsFormatError("name longer than 255 bytes")
                if offset + 1 + size > len(message):
                    raise DnsFormatError("label runs past the end")
                labels.append(message[offset + 1:offset + 1 + size])
                offset += 1 + size

    def records(self, offset: int, count: int):
        """count resource records from offset (RFC 1035 §4.1.3), and the
        offset after them."""
        if count > self.records_left:
            raise DnsFormatError("more than %d records in one message"
                                 % MAX_DNS_RECORDS)
        self.records_left -= count
        message = self.message
        records = []
        for _ in range(count):
            owner, offset = self.name(offset)
            if offset + DNS_RECORD.size > len(message):
                raise DnsFormatError("record runs past the end")
            rtype, rclass, ttl, length = DNS_RECORD.unpack_from(message,
                                                                offset)
            start = offset + DNS_RECORD.size
            offset = start + length
            if offset > len(message):
                raise DnsFormatError("record data runs past the end")
            if ttl & 0x80000000:
                ttl = 0     # RFC 2181 §8: a TTL above 2**31 - 1 means 0
            records.append(_Record(owner.lower(), rtype, rclass, ttl, start,
                                   offset))
        return records, offset

    def data(self, record: _Record):
        """An A or AAAA record's address, a PTR or CNAME record's name."""
        data = self.message[record.start:record.end]
        if record.rtype == DnsType.A and len(data) == 4:
            return ipaddress.IPv4Address(data)
        if record.rtype == DnsType.AAAA and len(data) == 16:
            return ipaddress.IPv6Address(data)
        if record.rtype in (DnsType.PTR, DnsType.CNAME):
            name, end = self.name(record.start)
            if end <= record.end and record.rtype == DnsType.PTR:
                return name.decode("ascii", "replace")
            if end <= record.end:
                return name
        raise DnsFormatError("malformed %s record"
                             % DnsType(record.rtype).name)


def _negative_ttl(message: bytes, authority) -> int:
    """RFC 2308 §5: the smaller of the SOA's TTL and its MINIMUM, the last
    field of its data; 0 (not cached) without an SOA."""
    for record in authority:
        # At least two root names and five 32-bit numbers.
        if record.rtype == DnsType.SOA and record.end - record.start >= 22:
            minimum, = struct.unpack_from("!I", message, record.end - 4)
            return min(record.ttl, minimum)
    return 0


def parse_dns_response(message: bytes, query_id: int, name: str,
                       qtype: int) -> Optional[DnsAnswer]:
    """The answer message gives to (name, qtype, IN) asked with query_id
    (RFC 1035 §4.1), CNAMEs followed; None when message does not answer that
    question (it may be spoofed: ignore it, keep waiting); DnsFormatError
    when it is malformed or would cost more to read than a real answer
    (_DnsReader's budget; CNAMEs are looked for MAX_CNAME_CHAIN times at most
    among at most MAX_DNS_RECORDS records)."""
    if len(message) < DNS_HEADER.size:
        raise DnsFormatError("shorter than a header")
    ident, flags, questions, answers, authorities, _ = \
        DNS_HEADER.unpack_from(message)
    if (ident != query_id or not flags & DNS_FLAG_RESPONSE
            or flags & DNS_OPCODE_MASK or questions != 1):
        return None
    reader = _DnsReader(message)
    asked, offset = reader.name(DNS_HEADER.size)
    if offset + DNS_QUESTION.size > len(message):
        raise DnsFormatError("question runs past the end")
    if (asked.lower() != _dns_name(name) or DNS_QUESTION.unpack_from(
            message, offset) != (qtype, DNS_CLASS_IN)):
        return None
    rcode = flags & DNS_RCODE_MASK
    if flags & DNS_FLAG_TRUNCATED:
        return DnsAnswer((), 0, rcode, True)
    records, offset = reader.records(offset + DNS_QUESTION.size, answers)
    wanted, ttls = asked.lower(), []
    for _ in range(MAX_CNAME_CHAIN + 1):
        found = [r for r in records if r.owner == wanted
                 and r.rtype == qtype and r.rclass == DNS_CLASS_IN]
        if found and rcode != DnsRcode.NXDOMAIN:
            # Kept: as many as anything uses (a connect tries at most
            # MAX_CONNECT_ATTEMPTS), so a cached answer stays small however
            # many records pointers packed into one message.
            found = found[:MAX_KEPT_RECORDS]
            return DnsAnswer(tuple(reader.data(r) for r in found),
                             min(ttls + [r.ttl for r in found]), rcode, False)
        alias = next((r for r in records if r.owner == wanted
                      and r.rtype == DnsType.CNAME), None)
        if alias is None:
            break
        wanted = reader.data(alias).lower()
        ttls.append(alias.ttl)
    authority, _ = reader.records(offset, authorities)
    return DnsAnswer((), _negative_ttl(message, authority), rcode, False)


def parse_nameserver(text: str):
    """(IP, port) from --nameserver IP, IP:PORT, [IPv6] or [IPv6]:PORT."""
    try:
        host, port = split_host_port(text, DNS_PORT)
        address = ipaddress.ip_address(host)
        number = parse_port(port)
    except ValueError:
        raise argparse.ArgumentTypeError(
            "%r: give IP[:PORT], as 127.0.0.1:5353 or [::1]:53" % text) \
            from None
    return str(address), number


class _DnsLookup:
    """One lookup's handle: its questions, their outcomes, its callback."""
    __slots__ = ("name", "qtypes", "callback", "outcomes", "query",
                 "result", "cancelled")

    def __init__(self, name: str, qtypes, callback):
        self.name = name
        self.qtypes = qtypes
        self.callback = callback
        self.outcomes = {}      # qtype -> DnsAnswer, or why it failed
        self.query = None       # the _DnsQuery asking its questions
        self.result = None      # the ResolverResult, once there is one
        self.cancelled = False

    def cancel(self):
        self.cancelled = True
        if self.query is not None:
            self.query.stop()


class _DnsConnection:
    """A non-blocking socket connected to a name server (so that only its
    datagrams arrive), watched by the loop: on_event(connection, mask).
    owner is what the loop closes if a handler meets a bug."""

    def __init__(self, loop, nameserver, kind: int, on_event, owner):
        host, port = nameserver
        self.loop = loop
        self.on_event = on_event
        self.handler = (self._event, owner)
        self.events = 0
        self.sock = socket.socket(
            socket.AF_INET6 if ":" in host else socket.AF_INET, kind)
        try:
            self.sock.setblocking(False)
            code = self.sock.connect_ex((host, port))
            if code not in (0, errno.EINPROGRESS):
                raise OSError(code, os.strerror(code))
        except OSError:
            self.sock.close()
            raise

    def watch(self, events: int):
        if events != self.events:
            self.loop.watch(self.sock, self.events, events, self.handler)
            self.events = events

    def _event(self, mask: int):
        self.on_event(self, mask)

    def close(self):
        if self.events and not self.loop.closed:
            self.watch(0)
        self.sock.close()


class _DnsQuery:
    """A lookup's questions (A and AAAA, or PTR) asked until each has an
    outcome.  A try asks every question still open of one name server, on
    one fresh connected UDP socket (a kernel-chosen port), each question
    with a fresh random id, under one deadline; the next try asks the next
    server.  A question whose UDP answer is truncated is asked again of the
    same server over TCP, on a connection of its own.  So a lookup holds one
    socket, and one more for each question it asks over TCP.  Each question
    has attempts tries of each name server; a question that failed apart
    from the others (SERVFAIL, TCP) waits for the try out to end."""

    def __init__(self, resolver: "DnsResolver", lookup: _DnsLookup,
                 templates: dict):
        self.resolver = resolver
        self.lookup = lookup
        self.templates = templates      # qtype -> the query, id to be set
        self.waiting = list(templates)  # qtypes for the next try
        self.asked = {}                 # query id -> qtype, on this try
        self.over_tcp = {}              # qtype -> _DnsTcpQuestion
        self.tries = dict.fromkeys(templates, 0)     # qtype -> tries made
        self.rounds = 0                 # tries made, of any question
        self.nameserver = None
        self.udp = None                 # this try's _DnsConnection
        self.deadline = None
        self.failure = "no name server to ask"

    def next_try(self):
        """Ask the waiting questions of the next name server, once no
        question is out on a try; a question with no try left fails."""
        resolver = self.resolver
        most = resolver.attempts * len(resolver.nameservers)
        while self.waiting and not self.asked:
            spent = [qtype for qtype in self.waiting
                     if self.tries[qtype] >= most]
            self.waiting = [qtype for qtype in self.waiting
                            if qtype not in spent]
            for qtype in spent:
                resolver.query_done(self, qtype, self.failure)
            if not self.waiting:
                return
            self.nameserver = resolver.nameservers[
                self.rounds % len(resolver.nameservers)]
            self.rounds += 1
            for qtype in self.waiting:
                self.tries[qtype] += 1
            try:
                self.udp = _DnsConnection(resolver.loop, self.nameserver,
                                          socket.SOCK_DGRAM, self._on_udp,
                                          self)
                for qtype in self.waiting:
                    query_id = self.new_id()
                    self.asked[query_id] = qtype
                    self.udp.sock.send(self.packet(query_id, qtype))
                self.udp.watch(selectors.EVENT_READ)
            except OSError as error:
                self._failed(error)
                continue
            self.waiting = []
            self.deadline = resolver.arm_deadline(self._on_deadline)

    def stop(self):
        self._end_try()
        self.waiting = []
        for question in self.over_tcp.values():
            question.close()
        self.over_tcp = {}
        self.resolver.queries.discard(self)

    def close_after_bug(self):
        """The loop met a bug in one of this lookup's handlers: fail it."""
        self.stop()
        self.resolver.finish(self.lookup, ResolverResult(
            (), Reply.GENERAL_FAILURE, "internal error"))

    def new_id(self) -> int:
        # Unguessable, like the kernel-chosen port: a forger must hit both
        # (RFC 5452 §9.2).
        while True:
            query_id = int.from_bytes(os.urandom(2), "big")
            if query_id not in self.asked:
                return query_id

    def packet(self, query_id: int, qtype: int) -> bytes:
        return struct.pack("!H", query_id) + self.templates[qtype][2:]

    def _end_try(self):
        """Close this try's socket; its questions still out wait for the
        next try."""
        self.deadline = None
        self.waiting.extend(qtype for qtype in self.asked.values()
                            if qtype not in self.waiting)
        self.asked = {}
        if self.udp is not None:
            self.udp.close()
            self.udp = None

    def _on_deadline(self, when):
        if when == self.deadline:
            self.failure = "name server %s did not answer in time" \
                % self.nameserver[0]
            log.debug("dns: %s", self.failure)
            self._end_try()
            self.next_try()

    def _failed(self, error: OSError):
        self.failure = "name server %s: %s" % (self.nameserver[0],
                                               error.strerror or error)
        log.debug("dns: %s", self.failure)
        self._end_try()

    # -- answers --------------------------------------------------------------

    def _on_udp(self, connection: _DnsConnection, mask: int):
        if connection is not self.udp:
            return      # a try that ended earlier in this round of events
        try:
            for _ in range(DNS_READS_PER_WAKEUP):
                self._consider(connection.sock.recv(MAX_DNS_MESSAGE))
                if self.udp is not connection:
                    return
        except BlockingIOError:
            return
        except OSError as error:
            self._failed(error)
            self.next_try()

    def _consider(self, message: bytes):
        """Act on a datagram: an answer to a question of this try, or
        (maybe forged) nothing to act on."""
        query_id = int.from_bytes(message[:2], "big")
        qtype = self.asked.get(query_id)
        if qtype is None:
            return
        try:
            answer = parse_dns_response(message, query_id, self.lookup.name,
                                        qtype)
        except DnsFormatError:
            return      # over UDP it may be forged: keep waiting
        if answer is None:
            return
        del self.asked[query_id]
        if answer.truncated:
            self._ask_over_tcp(qtype)
        else:
            self._answered(qtype, answer)
        if not self.asked:
            self._end_try()
            self.next_try()

    def _answered(self, qtype: int, answer: DnsAnswer):
        rcode = answer.rcode
        if rcode in (DnsRcode.NOERROR, DnsRcode.NXDOMAIN):
            self.resolver.query_done(self, qtype, answer)
            return
        # SERVFAIL, REFUSED: the next name server is asked.
        self.failure = "name server %s answered %s" % (
            self.nameserver[0], DnsRcode(rcode).name
            if rcode <= DnsRcode.REFUSED else "rcode %d" % rcode)
        log.debug("dns: %s", self.failure)
        self.waiting.append(qtype)

    def _ask_over_tcp(self, qtype: int):
        try:
            self.over_tcp[qtype] = _DnsTcpQuestion(self, qtype,
                                                   self.nameserver)
        except OSError as error:
            self.failure = "name server %s: %s" % (self.nameserver[0],
                                                   error.strerror or error)
            self.waiting.append(qtype)

    def tcp_answered(self, question: "_DnsTcpQuestion", answer: DnsAnswer):
        question.close()
        del self.over_tcp[question.qtype]
        self._answered(question.qtype, answer)
        self.next_try()

    def tcp_failed(self, question: "_DnsTcpQuestion", reason: str):
        question.close()
        del self.over_tcp[question.qtype]
        self.failure = reason
        log.debug("dns: %s", reason)
        self.waiting.append(question.qtype)
        self.next_try()


class _DnsTcpQuestion:
    """One question asked again over TCP (RFC 1035 §4.2.2) after a truncated
    UDP answer: its own connection to the same name server, a fresh id, its
    own deadline."""

    def __init__(self, query: _DnsQuery, qtype: int, nameserver):
        self.query = query
        self.qtype = qtype
        self.nameserver = nameserver
        self.query_id = query.new_id()
        packet = query.packet(self.query_id, qtype)
        self.outgoing = DNS_TCP_LENGTH.pack(len(packet)) + packet
        self.incoming = bytearray()     # the answer so far
        self.connection = _DnsConnection(query.resolver.loop, nameserver,
                                         socket.SOCK_STREAM, self._on_event,
                                         query)
        self.connection.watch(selectors.EVENT_WRITE)
        self.deadline = query.resolver.arm_deadline(self._on_deadline)

    def close(self):
        self.deadline = None
        self.connection.close()

    def _on_deadline(self, when):
        if when == self.deadline:
            self.query.tcp_failed(self, "name server %s did not answer in "
                                  "time" % self.nameserver[0])

    def _on_event(self, connection: _DnsConnection, mask: int):
        if self.deadline is None:
            return      # closed earlier in this round of events
        try:
            answer = self._exchange()
        except OSError as error:
            self.query.tcp_failed(self, "name server %s: %s" % (
                self.nameserver[0], error.strerror or error))
            return
        if answer is not None:
            self.query.tcp_answered(self, answer)

    def _exchange(self) -> Optional[DnsAnswer]:
        """Send the question, then read the answer; the answer once whole."""
        sock = self.connection.sock
        if self.outgoing:
            sent = sock.send(self.outgoing)
            self.outgoing = self.outgoing[sent:]
            self.connection.watch(selectors.EVENT_WRITE if self.outgoing
                                  else selectors.EVENT_READ)
            return None
        data = sock.recv(DNS_TCP_LENGTH.size + MAX_DNS_MESSAGE
                         - len(self.incoming))
        if not data:
            raise OSError(errno.ECONNRESET, "closed before answering")
        self.incoming += data
        if len(self.incoming) < DNS_TCP_LENGTH.size:
            return None
        size, = DNS_TCP_LENGTH.unpack_from(self.incoming)
        end = DNS_TCP_LENGTH.size + size
        if len(self.incoming) < end:
            return None
        try:
            answer = parse_dns_response(
                bytes(self.incoming[DNS_TCP_LENGTH.size:end]), self.query_id,
                self.query.lookup.name, self.qtype)
        except DnsFormatError as error:
            # From the name server itself: say why.
            raise OSError(errno.EPROTO, "malformed answer: %s"
                          % error) from None
        if answer is None or answer.truncated:
            raise OSError(errno.EPROTO, "TCP answer does not fit the question")
        return answer


class DnsResolver:
    """A stub resolver that runs in the server's loop (--nameserver).

    DnsResolver([("192.0.2.53", 53)]) asks A and AAAA at once (PTR for
    reverse) over UDP, both from one fresh socket, each with a random id; a
    try lasts timeout seconds, then the next name server is asked, attempts
    rounds in all; a truncated answer is asked again over TCP.  Answers are
    cached for their TTL (at most MAX_DNS_TTL; "no such name" for at most
    MAX_NEGATIVE_TTL), the oldest dropped past cache_size entries.  Past
    max_pending lookups asking a name server (each holds a socket), a new
    one fails at once, as SystemResolver's do.
    lookup() and reverse() run in the loop; callbacks come from it.
    """

    def __init__(self, nameservers, timeout: float = 2.0, attempts: int = 2,
                 cache_size: int = 1024, max_pending: int = 512):
        if not nameservers:
            raise ValueError("DnsResolver needs a name server")
        self.nameservers = [(str(ipaddress.ip_address(host)), int(port))
                            for host, port in nameservers]
        self.timeout = timeout
        self.attempts = max(1, attempts)
        self.cache_size = cache_size
        self.max_pending = max_pending
        self.capacity = max_pending     # lookups that ask at once
        # (name, qtype) -> (monotonic expiry, DnsAnswer), oldest first
        self.cache = collections.OrderedDict()
        self.queries = set()        # _DnsQuery in flight, one per lookup
        self.loop = None

    def attach(self, loop):
        self.loop = loop

    def lookup(self, hostname: str, callback) -> _DnsLookup:
        address = ip_literal(hostname)
        if address is not None:     # never asked
            lookup = _DnsLookup(hostname, (), callback)
            self.finish(lookup, ResolverResult((address,)))
            return lookup
        return self._start(hostname, (DnsType.A, DnsType.AAAA), callback)

    def reverse(self, address, callback) -> _DnsLookup:
        return self._start(address.reverse_pointer, (DnsType.PTR,), callback)

    def close(self):
        for query in list(self.queries):
            query.stop()

    def _start(self, name: str, qtypes, callback) -> _DnsLookup:
        lookup = _DnsLookup(name, qtypes, callback)
        templates = {}
        for qtype in qtypes:
            try:
                template = encode_dns_query(0, name, qtype)
            except DnsFormatError as error:
                lookup.outcomes[qtype] = str(error)
                continue
            cached = self._cached(name, qtype)
            if cached is not None:
                lookup.outcomes[qtype] = cached
                continue
            templates[qtype] = template
        if not templates:
            self.finish(lookup, self._result(lookup))
            return lookup
        if len(self.queries) >= self.max_pending:
            self.finish(lookup, TOO_MANY_LOOKUPS)
            return lookup
        lookup.query = _DnsQuery(self, lookup, templates)
        self.queries.add(lookup.query)
        lookup.query.next_try()
        return lookup

    def query_done(self, query: _DnsQuery, qtype: int, outcome):
        lookup = query.lookup
        if isinstance(outcome, DnsAnswer):
            self._remember(lookup.name, qtype, outcome)
        lookup.outcomes[qtype] = outcome
        if len(lookup.outcomes) == len(lookup.qtypes):
            query.stop()
            self.finish(lookup, self._result(lookup))

    def arm_deadline(self, callback) -> float:
        """Call callback(when) at when, timeout seconds from now; when."""
        when = time.monotonic() + self.timeout
        self.loop.call_at(when, callback, when)
        return when

    def finish(self, lookup: _DnsLookup, result: ResolverResult):
        # Through the loop, so a callback never runs inside lookup().
        if lookup.result is None:
            lookup.result = result
            self.loop.call_soon(self._deliver, lookup)

    @staticmethod
    def _deliver(lookup: _DnsLookup):
        if not lookup.cancelled:
            lookup.callback(lookup.result)

    @staticmethod
    def _result(lookup: _DnsLookup) -> ResolverResult:
        records, reasons = [], []
        for qtype in lookup.qtypes:     # A before AAAA
            outcome = lookup.outcomes[qtype]
            if isinstance(outcome, str):
                reasons.append(outcome)
            elif outcome.rcode == DnsRcode.NXDOMAIN:
                reasons.append("no such name (NXDOMAIN)")
            else:
                records.extend(outcome.records)
        if records:
            return ResolverResult(tuple(records))
        reasons.append("no %s record" % "/".join(DnsType(qtype).name
                                                 for qtype in lookup.qtypes))
        return ResolverResult((), Reply.HOST_UNREACHABLE, reasons[0])

    def _cached(self, name: str, qtype: int) -> Optional[DnsAnswer]:
        key = (_dns_name(name), qtype)
        expiry, answer = self.cache.get(key, (0, None))
        if answer is not None and expiry <= time.monotonic():
            del self.cache[key]
            return None
        return answer

    def _remember(self, name: str, qtype: int, answer: DnsAnswer):
        ttl = min(answer.ttl, MAX_DNS_TTL if answer.records
                  else MAX_NEGATIVE_TTL)
        if ttl <= 0 or self.cache_size <= 0:
            return
        key = (_dns_name(name), qtype)
        self.cache.pop(key, None)
        self.cache[key] = (time.monotonic() + ttl, answer)
        while len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)


# =============================================================================
# Sharing the resolver: one client's lookups never hold another's back
# =============================================================================
# A client here is what Server calls a client key: an IPv4 address, an IPv6
# /64, or all Unix-socket clients together.  Names whose servers never
# answer are the cheap way to tie a resolver up; each client gets a share.

MAX_WAITING_LOOKUPS = 512           # lookups waiting for the resolver, in all
MAX_WAITING_LOOKUPS_PER_CLIENT = 64  # ... from one client
DEFAULT_RESOLVER_CAPACITY = 64      # lookups at once, for a resolver that
                                    # does not say (its capacity attribute)


class _ScheduledLookup:
    """One lookup as the scheduler holds it: waiting, then at the resolver."""
    __slots__ = ("scheduler", "client", "kind", "query", "callback", "owner",
                 "inner", "state")

    def __init__(self, scheduler, client, kind, query, callback, owner):
        self.scheduler = scheduler
        self.client = client
        self.kind = kind            # "name" or "address"
        self.query = query
        self.callback = callback    # runs in the loop with the result
        self.owner = owner
        self.inner = None           # the resolver's handle, once asked
        self.state = "waiting"

    def cancel(self):
        self.scheduler.cancel(self)


class LookupScheduler:
    """Hands lookups to the resolver fairly, client by client.

    The resolver gets at most capacity lookups at once, and each client at
    most half of them (share); more wait, at most
    MAX_WAITING_LOOKUPS_PER_CLIENT per client and MAX_WAITING_LOOKUPS in
    all, beyond which lookup() refuses at once (None).  A free place goes
    to the waiting client with the fewest lookups out, in turn among
    equals.  A cancelled lookup gives
    its place back at once, unless the resolver is still busy with it and
    says so (the system resolver's threads cannot stop a getaddrinfo): then
    when the resolver is done.  Runs in the loop; the resolver may answer
    from any thread.
    """

    def __init__(self, resolver, loop, capacity: Optional[int] = None):
        self.resolver = resolver
        self.loop = loop
        self.capacity = max(1, capacity or getattr(
            resolver, "capacity", DEFAULT_RESOLVER_CAPACITY))
        self.share = max(1, self.capacity // 2)
        self.asking = collections.Counter()     # client -> at the resolver
        self.asking_total = 0
        self.waiting = collections.OrderedDict()  # client -> deque, in turn
        self.waiting_total = 0

    def lookup(self, client, hostname: str, callback, owner=None):
        return self._submit(client, "name", hostname, callback, owner)

    def reverse(self, client, address, callback, owner=None):
        return self._submit(client, "address", address, callback, owner)

    def pending(self) -> int:
        return self.asking_total + self.waiting_total

    def use(self, resolver):
        """Ask resolver from now on (a reload); lookups out finish where
        they are."""
        self.resolver = resolver
        self.capacity = max(1, getattr(resolver, "capacity",
                                       DEFAULT_RESOLVER_CAPACITY))
        self.share = max(1, self.capacity // 2)
        self._next()

    def _submit(self, client, kind, query, callback, owner):
        queue = self.waiting.get(client)
        if self.waiting_total >= MAX_WAITING_LOOKUPS or (
                queue is not None
                and len(queue) >= MAX_WAITING_LOOKUPS_PER_CLIENT):
            return None
        job = _ScheduledLookup(self, client, kind, query, callback, owner)
        if queue is None and self._has_room(client):
            self._ask(job)
        else:
            self.waiting.setdefault(client, collections.deque()).append(job)
            self.waiting_total += 1
        return job

    def _has_room(self, client) -> bool:
        return (self.asking_total < self.capacity
                and self.asking[client] < self.share)

    def _ask(self, job: _ScheduledLookup):
        job.state = "asking"
        self.asking[job.client] += 1
        self.asking_total += 1
        method = self.resolver.lookup if job.kind == "name" \
            else self.resolver.reverse
        answer = self.loop.threadsafe_callback(
            functools.partial(self._answered, job), owner=job.owner)
        job.inner = method(job.query, answer)

    def _answered(self, job: _ScheduledLookup, result: ResolverResult):
        if job.state != "asking":
            return          # cancelled meanwhile
        self._release(job)
        job.state = "done"
        job.callback(result)
        self._next()

    def cancel(self, job: _ScheduledLookup):
        if job.state == "abandoned":
            return      # its place comes back when its worker is free
        if job.state == "waiting":
            queue = self.waiting[job.client]
            queue.remove(job)
            self.waiting_total -= 1
            if not queue:
                del self.waiting[job.client]
        elif job.state == "asking":
            inner = job.inner
            held = False
            if inner is not None:
                release_later = getattr(inner, "cancel_and_release_later",
                                        None)
                if release_later is None:
                    inner.cancel()
                else:
                    held = release_later(self.loop.threadsafe_callback(
                        functools.partial(self._abandoned_released, job)))
            if held:
                # Its worker cannot be stopped: the place stays the client's
                # until the worker is free, or one client could tie up every
                # worker by asking and hanging up.
                job.state = "abandoned"
                return
            self._release(job)
            self._next()
        job.state = "cancelled"

    def _abandoned_released(self, job: _ScheduledLookup, _):
        if job.state == "abandoned":
            self._release(job)
            job.state = "cancelled"
            self._next()

    def _release(self, job: _ScheduledLookup):
        self.asking_total -= 1
        self.asking[job.client] -= 1
        if not self.asking[job.client]:
            del self.asking[job.client]

    def _next(self):
        """Give free places to waiting clients, one lookup each in turn."""
        while self.asking_total < self.capacity:
            # The client with the fewest lookups out goes first; among
            # equals, the one whose turn came longest ago.
            eligible = [client for client in self.waiting
                        if self.asking[client] < self.share]
            if not eligible:
                return
            client = min(eligible, key=self.asking.__getitem__)
            queue = self.waiting[client]
            job = queue.popleft()
            self.waiting_total -= 1
            if queue:
                self.waiting.move_to_end(client)    # its turn is over
            else:
                del self.waiting[client]
            self._ask(job)


# =============================================================================
# The Tor link protocol for CONNECT_DIR: constants
# =============================================================================
# CONNECT_DIR reaches a relay's directory service the way Tor's own directory
# fetches do: TLS to the ORPort, one CREATE_FAST circuit, RELAY_BEGIN_DIR
# streams on it (tor-spec.txt §2 to §7).  Enum values are the bytes on the
# wire.

class CellCommand(enum.IntEnum):
    """Cell commands (tor-spec §3)."""
    PADDING = 0
    RELAY = 3
    DESTROY = 4
    CREATE_FAST = 5
    CREATED_FAST = 6
    VERSIONS = 7
    NETINFO = 8
    RELAY_EARLY = 9
    VPADDING = 128
    CERTS = 129
    AUTH_CHALLENGE = 130


class RelayCommand(enum.IntEnum):
    """Relay cell commands (tor-spec §6.1)."""
    DATA = 2
    END = 3
    CONNECTED = 4
    SENDME = 5
    TRUNCATED = 9
    DROP = 10
    BEGIN_DIR = 13


class EndReason(enum.IntEnum):
    """RELAY_END reasons (tor-spec §6.3)."""
    MISC = 1
    RESOLVEFAILED = 2
    CONNECTREFUSED = 3
    EXITPOLICY = 4
    DESTROY = 5
    DONE = 6
    TIMEOUT = 7
    NOROUTE = 8
    HIBERNATING = 9
    INTERNAL = 10
    RESOURCELIMIT = 11
    CONNRESET = 12
    TORPROTOCOL = 13
    NOTDIRECTORY = 14


class CertType(enum.IntEnum):
    """CERTS cell certificate types used here (tor-spec §4.2)."""
    LINK = 1                # X.509: the TLS key, signed by the RSA identity
    IDENTITY = 2            # X.509: the RSA1024 identity, self-signed


# Offered link versions (tor-spec §4.1).  4 brings 4-byte circuit ids and the
# initiator-sets-the-MSB rule; 3 is left out (2-byte ids, ids chosen by key
# comparison), as every relay since 0.2.4 speaks 4.
LINK_VERSIONS = (4, 5)
PAYLOAD_LEN = 509           # tor-spec §0.2
CIRC_ID_LEN = 4             # link protocol 4 and later
FIXED_CELL_LEN = CIRC_ID_LEN + 1 + PAYLOAD_LEN       # 514
VERSIONS_CIRC_ID_LEN = 2    # the first VERSIONS cell, whatever follows
HASH_LEN = 20               # SHA-1
KEY_LEN = 16                # AES-128
RELAY_HEADER_LEN = 11       # command, recognized, stream, digest, length
RELAY_DATA_MAX = PAYLOAD_LEN - RELAY_HEADER_LEN      # 498
RELAY_DIGEST = slice(5, 9)  # where the running digest goes in a relay header
CIRCUIT_ID_INITIATOR = 0x80000000   # tor-spec §5.1.1: the initiator's MSB
ADDRESS_TYPE_IPV4 = 4       # NETINFO address types (tor-spec §4.5)
ADDRESS_TYPE_IPV6 = 6
DESTROY_REASON_NONE = 0     # tor-spec §5.4: a client always says NONE

# Flow control (tor-spec §7.3, §7.4): fixed windows, as CREATE_FAST circuits
# negotiate no congestion control.
CIRCUIT_WINDOW = 1000
CIRCUIT_SENDME_INCREMENT = 100
STREAM_WINDOW = 500
STREAM_SENDME_INCREMENT = 50
SENDME_VERSION_AUTHENTICATED = 1    # prop 289: carries a 20-byte digest

# Certificate clock slop: Tor's TOR_X509_PAST_SLOP and TOR_X509_FUTURE_SLOP.
CERT_EXPIRED_SLOP = 2 * 24 * 3600
CERT_NOT_YET_VALID_SLOP = 30 * 24 * 3600

# RSA keys a relay may show.  Tor makes 1024-bit identity keys and 2048-bit
# link keys, all with the exponent 65537 (tor-spec §0.3, tortls.c); it takes
# a link key of 1024 bits or more (tor_tls_cert_is_valid), and OpenSSL none
# above 16384 bits.  The work of a verification, one pow(), grows with the
# exponent's size: keys outside these bounds are refused before it.
IDENTITY_KEY_BITS = 1024    # tor-spec §4.2: the ID certificate's key size
MIN_LINK_KEY_BITS = 1024
MAX_RSA_KEY_BITS = 16384    # OpenSSL's OPENSSL_RSA_MAX_MODULUS_BITS
MAX_RSA_EXPONENT = 2 ** 32

# What a relay can make the link parse and buffer, each bound far above what
# tor sends (about 3 kB before the circuit is open, a CERTS cell of 1.5 kB
# with five certificates of at most 600 bytes).
MAX_VERSIONS_LISTED = 64        # link versions 1 to 5 exist (tor-spec §4.1)
MAX_CERTS = 16                  # seven types, each at most once (§4.2)
MAX_CERTIFICATE_BYTES = 4096    # room for a 16384-bit link key
MAX_SETUP_CELL_PAYLOAD = 8192   # a variable cell before the circuit is open
MAX_SETUP_BYTES = 32 * 1024     # all cells before the circuit is open
MAX_DER_CHILDREN = 16           # a TBSCertificate has at most 10 fields

LINK_HIGH_WATER = 256 * 1024   # TLS bytes queued before streams stop sending
LINK_LOW_WATER = 64 * 1024     # ... and when they are told to resume
LINK_RECV_SIZE = 64 * 1024
# Received cells waiting to be handled: reading stops above this (more than
# the largest cell, 65,542 bytes, so that one always fits).
LINK_RECEIVED_HIGH_WATER = 128 * 1024
# Cells handled per call from the loop, the rest in the next round: 16 kB,
# one TLS record, some 6 ms of relay crypto in CPython.
LINK_CELLS_PER_WAKEUP = 32
LINK_IDLE_TIMEOUT = 60.0       # seconds an unused circuit stays open for reuse
MAX_TOR_LINKS = 64             # links (a socket each) open at once


class TorProtocolError(Exception):
    """The relay broke the link protocol, or could not prove its identity."""


# =============================================================================
# AES-128 (FIPS-197) and AES-128-CTR (SP 800-38A), encryption only
# =============================================================================
# The standard library has no AES.  This is the classic table version: the
# round function of one column is four lookups in 256-entry tables of 32-bit
# words (Te0..Te3).  To spare the shifts and masks that cost most in Python,
# each table is also kept pre-shifted into the four column positions of a
# 128-bit state, and the state is held as 16 bytes between rounds, so a round
# is 16 byte indexings, 16 lookups and 16 XORs.  CTR needs only encryption.

def _times_x(byte: int) -> int:
    """Multiply by x in GF(2^8), modulo x^8 + x^4 + x^3 + x + 1 (FIPS-197
    §4.2.1)."""
    byte <<= 1
    return byte ^ 0x11B if byte & 0x100 else byte


def _make_sbox():
    """FIPS-197 §5.1.1: the multiplicative inverse, then the affine map."""
    exponent, logarithm = [0] * 255, [0] * 256
    power = 1
    for i in range(255):            # 3 generates the multiplicative group
        exponent[i], logarithm[power] = power, i
        power ^= _times_x(power)
    sbox = []
    for value in range(256):
        inverse = exponent[-logarithm[value] % 255] if value else 0
        result = inverse
        for shift in range(1, 5):
            result ^= ((inverse << shift) | (inverse >> (8 - shift))) & 0xFF
        sbox.append(result ^ 0x63)
    return sbox


def _make_round_tables(sbox):
    """Te0..Te3 (S-box, then MixColumns' column for a byte in row 0..3), and
    each placed at the four column positions of a 128-bit state."""
    te0 = [(_times_x(s) << 24) | (s << 16) | (s << 8) | (_times_x(s) ^ s)
           for s in sbox]
    words = [[((word >> (8 * row)) | (word << (32 - 8 * row))) & 0xFFFFFFFF
              for word in te0] for row in range(4)]
    return [[[word << (96 - 32 * column) for word in table] for table in words]
            for column in range(4)]


def _make_final_tables(sbox):
    """The last round has no MixColumns: S-box values placed at each of the
    16 byte positions of the state."""
    return [[value << (120 - 8 * position) for value in sbox]
            for position in range(16)]


AES_SBOX = _make_sbox()
AES_BLOCK_LEN = 16
_MASK128 = (1 << 128) - 1


@functools.lru_cache(maxsize=None)
def _aes_tables():
    """(round tables, final tables): 8,192 ints, 0.4 MiB, made when
    CONNECT_DIR first needs them rather than at every start."""
    return _make_round_tables(AES_SBOX), _make_final_tables(AES_SBOX)


def aes128_round_keys(key: bytes):
    """The 11 round keys of AES-128 (FIPS-197 §5.2), each a 128-bit int."""
    if len(key) != 16:
        raise ValueError("AES-128 needs a 16-byte key")
    words = list(struct.unpack(">4I", key))
    round_constant = 1
    for i in range(4, 44):
        word = words[i - 1]
        if i % 4 == 0:      # RotWord, SubWord, Rcon
            word = ((AES_SBOX[(word >> 16) & 0xFF] << 24)
                    | (AES_SBOX[(word >> 8) & 0xFF] << 16)
                    | (AES_SBOX[word & 0xFF] << 8)
                    | AES_SBOX[word >> 24]) ^ (round_constant << 24)
            round_constant = _times_x(round_constant)
        words.append(words[i - 4] ^ word)
    return [(words[i] << 96) | (words[i + 1] << 64) | (words[i + 2] << 32)
            | words[i + 3] for i in range(0, 44, 4)]


def _aes_round(state: bytes, round_key: int) -> int:
    """SubBytes, ShiftRows, MixColumns and AddRoundKey: output column c takes
    row r from input column c + r, so each term is one table lookup."""
    ((a0, b0, c0, d0), (a1, b1, c1, d1), (a2, b2, c2, d2),
     (a3, b3, c3, d3)) = _aes_tables()[0]
    s = state
    return (a0[s[0]] ^ b0[s[5]] ^ c0[s[10]] ^ d0[s[15]]
            ^ a1[s[4]] ^ b1[s[9]] ^ c1[s[14]] ^ d1[s[3]]
            ^ a2[s[8]] ^ b2[s[13]] ^ c2[s[2]] ^ d2[s[7]]
            ^ a3[s[12]] ^ b3[s[1]] ^ c3[s[6]] ^ d3[s[11]] ^ round_key)


def _aes_final_round(state: bytes, round_key: int) -> int:
    """The last round: no MixColumns."""
    (f0, f1, f2, f3, f4, f5, f6, f7, f8, f9, f10, f11, f12, f13, f14,
     f15) = _aes_tables()[1]
    s = state
    return (f0[s[0]] ^ f1[s[5]] ^ f2[s[10]] ^ f3[s[15]]
            ^ f4[s[4]] ^ f5[s[9]] ^ f6[s[14]] ^ f7[s[3]]
            ^ f8[s[8]] ^ f9[s[13]] ^ f10[s[2]] ^ f11[s[7]]
            ^ f12[s[12]] ^ f13[s[1]] ^ f14[s[6]] ^ f15[s[11]] ^ round_key)


def aes128_encrypt_block(key: bytes, block: bytes) -> bytes:
    """One block (FIPS-197 §5.1); plain and unhurried, for the vectors."""
    round_keys = aes128_round_keys(key)
    state = int.from_bytes(block, "big") ^ round_keys[0]
    for round_key in round_keys[1:10]:
        state = _aes_round(state.to_bytes(16, "big"), round_key)
    return _aes_final_round(state.to_bytes(16, "big"),
                            round_keys[10]).to_bytes(16, "big")


def aes128_ctr_blocks(round_keys, start: int, count: int) -> bytes:
    """The encrypted counter blocks start, start + 1, ... (mod 2**128).

    Counter-mode caching: across 256 consecutive counters only the last
    byte changes, so the first round differs by one lookup and the second
    by four (one column); both are computed once per 256 blocks.  Rounds 3
    to 10 are _aes_round and _aes_final_round written out inline, as a
    call per round costs a fifth of the time."""
    round_tables, final_tables = _aes_tables()
    ((a0, b0, c0, d0), (a1, b1, c1, d1), (a2, b2, c2, d2),
     (a3, b3, c3, d3)) = round_tables
    (f0, f1, f2, f3, f4, f5, f6, f7, f8, f9, f10, f11, f12, f13, f14,
     f15) = final_tables
    middle, last = round_keys[3:10], round_keys[10]
    output = []
    append = output.append
    counter, end = start, start + count
    while counter < end:
        run_end = min(end, (counter | 0xFF) + 1)
        s = (((counter & ~0xFF) & _MASK128) ^ round_keys[0]).to_bytes(16, "big")
        low_key = s[15]             # the first round key's last byte
        first = _aes_round(s, round_keys[1]) ^ d0[low_key]  # all but s[15]
        r = first.to_bytes(16, "big")
        second = (_aes_round(r, round_keys[2])               # all but column 0
                  ^ a0[r[0]] ^ b3[r[1]] ^ c2[r[2]] ^ d1[r[3]])
        for low in range(counter & 0xFF, (counter & 0xFF) + run_end - counter):
            w = (first ^ d0[low ^ low_key]) >> 96       # column 0 after round 1
            s = (second ^ a0[w >> 24] ^ b3[(w >> 16) & 0xFF]
                 ^ c2[(w >> 8) & 0xFF] ^ d1[w & 0xFF]).to_bytes(16, "big")
            for round_key in middle:
                s = (a0[s[0]] ^ b0[s[5]] ^ c0[s[10]] ^ d0[s[15]]
                     ^ a1[s[4]] ^ b1[s[9]] ^ c1[s[14]] ^ d1[s[3]]
                     ^ a2[s[8]] ^ b2[s[13]] ^ c2[s[2]] ^ d2[s[7]]
                     ^ a3[s[12]] ^ b3[s[1]] ^ c3[s[6]] ^ d3[s[11]]
                     ^ round_key).to_bytes(16, "big")
            append((f0[s[0]] ^ f1[s[5]] ^ f2[s[10]] ^ f3[s[15]]
                    ^ f4[s[4]] ^ f5[s[9]] ^ f6[s[14]] ^ f7[s[3]]
                    ^ f8[s[8]] ^ f9[s[13]] ^ f10[s[2]] ^ f11[s[7]]
                    ^ f12[s[12]] ^ f13[s[1]] ^ f14[s[6]] ^ f15[s[11]]
                    ^ last).to_bytes(16, "big"))
        counter = run_end
    return b"".join(output)


class Aes128Ctr:
    """AES-128 in counter mode: the counter is the whole 16-byte block, big
    endian, starting at initial_counter (Tor uses an all-zero IV, tor-spec
    §0.3).  process() encrypts or decrypts; calls continue one keystream."""

    def __init__(self, key: bytes, initial_counter: int = 0):
        self._round_keys = aes128_round_keys(key)
        self._counter = initial_counter
        self._spare = b""       # keystream left over from the last call

    def keystream(self, size: int) -> bytes:
        spare = self._spare
        if size <= len(spare):
            self._spare = spare[size:]
            return spare[:size]
        count = -(-(size - len(spare)) // AES_BLOCK_LEN)
        start = self._counter
        self._counter = (start + count) & _MASK128
        stream = spare + aes128_ctr_blocks(self._round_keys, start, count)
        self._spare = stream[size:]
        return stream[:size]

    def process(self, data) -> bytes:
        size = len(data)
        stream = self.keystream(size)
        return (int.from_bytes(data, "big")
                ^ int.from_bytes(stream, "big")).to_bytes(size, "big")


# =============================================================================
# KDF-TOR and CREATE_FAST keys
# =============================================================================

def kdf_tor(seed: bytes, size: int) -> bytes:
    """tor-spec §5.2.1: SHA1(K0 | [00]) | SHA1(K0 | [01]) | ..., cut."""
    output = bytearray()
    counter = 0
    while len(output) < size:
        output += hashlib.sha1(seed + bytes((counter,))).digest()
        counter += 1
    return bytes(output[:size])


class CircuitKeys(NamedTuple):
    """The KDF-TOR output of a handshake, in its order (tor-spec §5.2.1)."""
    key_hash: bytes         # KH: proves the relay derived the same keys
    forward_digest: bytes   # Df: seeds the client-to-relay running digest
    backward_digest: bytes  # Db
    forward_key: bytes      # Kf: AES key, client to relay
    backward_key: bytes     # Kb


def create_fast_keys(client_material: bytes,
                     relay_material: bytes) -> CircuitKeys:
    """The circuit keys from CREATE_FAST's X and CREATED_FAST's Y (§5.1.5)."""
    material = kdf_tor(client_material + relay_material,
                       3 * HASH_LEN + 2 * KEY_LEN)
    return CircuitKeys(material[0:20], material[20:40], material[40:60],
                       material[60:76], material[76:92])


# =============================================================================
# Cells
# =============================================================================

class Cell(NamedTuple):
    circuit_id: int
    command: int
    payload: bytes


def is_variable_length(command: int) -> bool:
    """tor-spec §3: VERSIONS and commands 128 and up carry a length field."""
    return command == CellCommand.VERSIONS or command >= 128


def cell_command_name(command: int) -> str:
    try:
        return CellCommand(command).name
    except ValueError:
        return "command %d" % command


def encode_cell(circuit_id: int, command: int, payload: bytes = b"",
                circuit_id_len: int = CIRC_ID_LEN) -> bytes:
    """A fixed cell (payload padded with NULs to 509 bytes) or a variable
    one."""
    header = circuit_id.to_bytes(circuit_id_len, "big") + bytes((command,))
    if is_variable_length(command):
        return header + struct.pack(">H", len(payload)) + payload
    if len(payload) > PAYLOAD_LEN:
        raise ValueError("cell payload longer than %d bytes" % PAYLOAD_LEN)
    return header + payload + bytes(PAYLOAD_LEN - len(payload))


def parse_cell(data, circuit_id_len: int = CIRC_ID_LEN,
               max_payload: int = 0xFFFF):
    """tor-spec §3: one cell from the front of data, or NEED_MORE.  A
    variable cell longer than max_payload is a TorProtocolError as soon as
    its length is in, before its payload is waited for."""
    header_len = circuit_id_len + 1
    if len(data) < header_len:
        return NEED_MORE
    circuit_id = int.from_bytes(data[:circuit_id_len], "big")
    command = data[circuit_id_len]
    if is_variable_length(command):
        if len(data) < header_len + 2:
            return NEED_MORE
        size = int.from_bytes(data[header_len:header_len + 2], "big")
        if size > max_payload:
            raise TorProtocolError("a %d-byte %s cell where at most %d bytes "
                                   "are expected" % (size, cell_command_name(
                                       command), max_payload))
        start = header_len + 2
    else:
        size = PAYLOAD_LEN
        start = header_len
    if len(data) < start + size:
        return NEED_MORE
    return Parsed(Cell(circuit_id, command, bytes(data[start:start + size])),
                  start + size)


def versions_cell(versions=LINK_VERSIONS) -> bytes:
    """The first cell a client sends, with a 2-byte circuit id (§4.1)."""
    return encode_cell(0, CellCommand.VERSIONS,
                       b"".join(struct.pack(">H", v) for v in versions),
                       VERSIONS_CIRC_ID_LEN)


def negotiate_link_version(payload: bytes, offered=LINK_VERSIONS) -> int:
    """The highest version both sides list (tor-spec §4.1)."""
    if len(payload) % 2:
        raise TorProtocolError("VERSIONS cell of odd length")
    if len(payload) > 2 * MAX_VERSIONS_LISTED:
        raise TorProtocolError("VERSIONS cell lists %d versions, more than %d"
                               % (len(payload) // 2, MAX_VERSIONS_LISTED))
    theirs = {int.from_bytes(payload[i:i + 2], "big")
              for i in range(0, len(payload), 2)}
    common = theirs.intersection(offered)
    if not common:
        raise TorProtocolError("no common link protocol version (relay offers "
                               "%s)" % clip_for_log(str(sorted(theirs))))
    return max(common)


def netinfo_payload(relay_address) -> bytes:
    """tor-spec §4.5 as a client sends it: time 0 (clients need not tell
    their clock), the relay's address, none of our own."""
    address = ipaddress.ip_address(relay_address)
    kind = ADDRESS_TYPE_IPV4 if address.version == 4 else ADDRESS_TYPE_IPV6
    return (struct.pack(">IBB", 0, kind, len(address.packed)) + address.packed
            + b"\x00")


def parse_certs_cell(payload: bytes) -> dict:
    """tor-spec §4.2: {certificate type: certificate bytes}; each type once,
    at most MAX_CERTS of them, none over MAX_CERTIFICATE_BYTES."""
    if not payload:
        raise TorProtocolError("empty CERTS cell")
    if len(payload) > MAX_SETUP_CELL_PAYLOAD:
        raise TorProtocolError("CERTS cell of %d bytes, more than %d"
                               % (len(payload), MAX_SETUP_CELL_PAYLOAD))
    if payload[0] > MAX_CERTS:
        raise TorProtocolError("CERTS cell of %d certificates, more than %d"
                               % (payload[0], MAX_CERTS))
    certificates = {}
    position = 1
    for _ in range(payload[0]):
        if position + 3 > len(payload):
            raise TorProtocolError("truncated CERTS cell")
        kind = payload[position]
        size = int.from_bytes(payload[position + 1:position + 3], "big")
        position += 3
        if size > MAX_CERTIFICATE_BYTES:
            raise TorProtocolError("certificate of %d bytes in CERTS cell, "
                                   "more than %d" % (size,
                                                     MAX_CERTIFICATE_BYTES))
        if position + size > len(payload):
            raise TorProtocolError("truncated certificate in CERTS cell")
        if kind in certificates:
            raise TorProtocolError("two certificates of type %d" % kind)
        certificates[kind] = payload[position:position + size]
        position += size
    return certificates        # bytes after the last certificate are ignored


# =============================================================================
# X.509 and RSA: who the relay is (the CERTS cell)
# =============================================================================
# A relay proves its RSA identity with two X.509 certificates (types 1 and 2).
# What is needed of X.509 is small: a DER walker that finds the signed part,
# the signature, the validity and the RSA key, and PKCS#1 v1.5 verification,
# which is one pow().  Types 4, 5 and 7 (Ed25519) are not checked: the
# standard library has no Ed25519, and the RSA identity is what is pinned.
# The walker follows one fixed path into the certificate (no recursion, so
# nesting costs nothing), looks at MAX_DER_CHILDREN elements of a SEQUENCE at
# most, and refuses an RSA number by its length before converting it.

DER_INTEGER = 0x02
DER_BIT_STRING = 0x03
DER_OCTET_STRING = 0x04
DER_NULL = 0x05
DER_OID = 0x06
DER_UTC_TIME = 0x17
DER_GENERALIZED_TIME = 0x18
DER_SEQUENCE = 0x30
DER_EXPLICIT_0 = 0xA0       # the version field of a TBSCertificate

OID_RSA_ENCRYPTION = bytes.fromhex("2a864886f70d010101")  # 1.2.840.113549.1.1.1
# PKCS#1 signature algorithms: OID -> (hashlib name, the hash's own OID).
RSA_SIGNATURE_ALGORITHMS = {
    bytes.fromhex("2a864886f70d010105"): ("sha1", bytes.fromhex("2b0e03021a")),
    bytes.fromhex("2a864886f70d01010b"):
        ("sha256", bytes.fromhex("608648016503040201")),
    bytes.fromhex("2a864886f70d01010c"):
        ("sha384", bytes.fromhex("608648016503040202")),
    bytes.fromhex("2a864886f70d01010d"):
        ("sha512", bytes.fromhex("608648016503040203")),
}


class DerElement(NamedTuple):
    tag: int
    start: int          # where the element's tag is
    value_start: int
    end: int


def der_element(data, start: int, limit: int) -> DerElement:
    """One tag-length-value at data[start:], which must end by limit."""
    if start + 2 > limit:
        raise TorProtocolError("truncated DER")
    tag, length = data[start], data[start + 1]
    position = start + 2
    if tag & 0x1F == 0x1F:
        raise TorProtocolError("DER tag numbers above 30 are not used here")
    if length & 0x80:
        count = length & 0x7F
        if not 1 <= count <= 4 or position + count > limit:
            raise TorProtocolError("bad DER length")
        length = int.from_bytes(data[position:position + count], "big")
        position += count
    if position + length > limit:
        raise TorProtocolError("DER element runs past its container")
    return DerElement(tag, start, position, position + length)


def der_children(data, parent: DerElement, tag: int = DER_SEQUENCE):
    """The elements inside a constructed element of the given tag (at most
    MAX_DER_CHILDREN)."""
    if parent.tag != tag:
        raise TorProtocolError("expected DER tag %#x, got %#x"
                               % (tag, parent.tag))
    children = []
    position = parent.value_start
    while position < parent.end:
        if len(children) == MAX_DER_CHILDREN:
            raise TorProtocolError("more than %d elements in a DER SEQUENCE"
                                   % MAX_DER_CHILDREN)
        child = der_element(data, position, parent.end)
        children.append(child)
        position = child.end
    return children


def der_value(data, element: DerElement, tag: int) -> bytes:
    if element.tag != tag:
        raise TorProtocolError("expected DER tag %#x, got %#x"
                               % (tag, element.tag))
    return bytes(data[element.value_start:element.end])


def der_positive_integer(data, element: DerElement, max_bits: int,
                         name: str) -> int:
    """A positive INTEGER of at most max_bits bits, refused by its length
    before it is converted."""
    if element.end - element.value_start > max_bits // 8 + 1:  # + sign byte
        raise TorProtocolError("an RSA %s of more than %d bits"
                               % (name, max_bits))
    value = int.from_bytes(der_value(data, element, DER_INTEGER), "big",
                           signed=True)
    if value <= 0:
        raise TorProtocolError("RSA numbers must be positive")
    return value


def der_bit_string(data, element: DerElement) -> bytes:
    value = der_value(data, element, DER_BIT_STRING)
    if not value or value[0] != 0:
        raise TorProtocolError("BIT STRING with unused bits")
    return value[1:]


def _days_from_civil(year: int, month: int, day: int) -> int:
    """Days since 1970-01-01 in the proleptic Gregorian calendar."""
    year -= month <= 2
    era = year // 400
    year_of_era = year - era * 400
    day_of_year = (153 * (month + (-3 if month > 2 else 9)) + 2) // 5 + day - 1
    day_of_era = (year_of_era * 365 + year_of_era // 4 - year_of_era // 100
                  + day_of_year)
    return era * 146097 + day_of_era - 719468


def der_time(data, element: DerElement) -> int:
    """UTCTime or GeneralizedTime (RFC 5280 §4.1.2.5), as POSIX seconds."""
    text = bytes(data[element.value_start:element.end])
    if element.tag == DER_UTC_TIME and len(text) == 13:
        year = int(text[0:2])
        year += 1900 if year >= 50 else 2000
        rest = text[2:12]
    elif element.tag == DER_GENERALIZED_TIME and len(text) == 15:
        year = int(text[0:4])
        rest = text[4:14]
    else:
        raise TorProtocolError("unsupported certificate time %s"
                               % clip_for_log(text))
    if not text.endswith(b"Z") or not rest.isdigit():
        raise TorProtocolError("unsupported certificate time %s"
                               % clip_for_log(text))
    month, day, hour, minute, second = (int(rest[i:i + 2])
                                        for i in range(0, 10, 2))
    return (_days_from_civil(year, month, day) * 86400 + hour * 3600
            + minute * 60 + second)


class Certificate(NamedTuple):
    """What a relay certificate says, from its DER (RFC 5280 §4.1)."""
    signed_part: bytes          # the TBSCertificate, as signed
    signature_algorithm: bytes  # OID
    signature: bytes
    not_before: int             # POSIX seconds
    not_after: int
    public_key_info: bytes      # the SubjectPublicKeyInfo element
    rsa_public_key: bytes       # DER RSAPublicKey (PKCS#1): what Tor hashes
    modulus: int
    exponent: int


def parse_certificate(der: bytes) -> Certificate:
    """The parts of an X.509 certificate that the identity check needs;
    anything malformed is the relay's protocol error, never ours."""
    try:
        return _parse_certificate(der)
    except (ValueError, IndexError, TypeError) as error:
        raise TorProtocolError("malformed certificate: %s"
                               % clip_for_log(str(error))) from None


def _parse_certificate(der: bytes) -> Certificate:
    top = der_element(der, 0, len(der))
    if top.end != len(der):
        raise TorProtocolError("bytes after the certificate")
    parts = der_children(der, top)
    if len(parts) != 3:
        raise TorProtocolError("a certificate has three parts")
    signed, algorithm, signature = parts
    fields = der_children(der, signed)
    if fields and fields[0].tag == DER_EXPLICIT_0:
        fields = fields[1:]         # version
    if len(fields) < 6:
        raise TorProtocolError("short TBSCertificate")
    # serialNumber, signature, issuer, validity, subject, subjectPublicKeyInfo
    validity = der_children(der, fields[3])
    key_info = fields[5]
    key_algorithm, key_bits = der_children(der, key_info)[:2]
    if der_value(der, der_children(der, key_algorithm)[0], DER_OID) \
            != OID_RSA_ENCRYPTION:
        raise TorProtocolError("certificate key is not RSA")
    rsa_public_key = der_bit_string(der, key_bits)
    rsa_top = der_element(rsa_public_key, 0, len(rsa_public_key))
    modulus, exponent = der_children(rsa_public_key, rsa_top)[:2]
    return Certificate(
        signed_part=bytes(der[signed.start:signed.end]),
        signature_algorithm=der_value(
            der, der_children(der, algorithm)[0], DER_OID),
        signature=der_bit_string(der, signature),
        not_before=der_time(der, validity[0]),
        not_after=der_time(der, validity[1]),
        public_key_info=bytes(der[key_info.start:key_info.end]),
        rsa_public_key=rsa_public_key,
        modulus=der_positive_integer(rsa_public_key, modulus,
                                     MAX_RSA_KEY_BITS, "modulus"),
        exponent=der_positive_integer(rsa_public_key, exponent,
                                      MAX_RSA_EXPONENT.bit_length(),
                                      "exponent"))


def _der_encode(tag: int, value: bytes) -> bytes:
    size = len(value)
    if size < 0x80:
        return bytes((tag, size)) + value
    length = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(length))) + length + value


def check_rsa_key(modulus: int, exponent: int, name: str,
                  min_bits: int = 1, max_bits: int = MAX_RSA_KEY_BITS):
    """Refuse, before any pow() with it, an RSA key whose modulus is not of
    min_bits to max_bits bits, or whose exponent is even, below 3, not below
    the modulus (RFC 8017 §3.1) or above MAX_RSA_EXPONENT."""
    bits = modulus.bit_length()
    if not min_bits <= bits <= max_bits:
        allowed = ("%d" % max_bits if min_bits == max_bits
                   else "%d to %d" % (min_bits, max_bits))
        raise TorProtocolError("the relay's %s key is %d-bit RSA, not "
                               "%s-bit" % (name, bits, allowed))
    if (exponent > MAX_RSA_EXPONENT or exponent < 3 or not exponent & 1
            or exponent >= modulus):
        raise TorProtocolError("the relay's %s key has an RSA exponent of %d "
                               "bits that tor would not use (it uses 65537)"
                               % (name, exponent.bit_length()))


def rsa_pkcs1_verify(modulus: int, exponent: int, message: bytes,
                     signature: bytes, algorithm: bytes) -> bool:
    """RSASSA-PKCS1-v1_5 verification (RFC 8017 §8.2.2) for the signature
    algorithm OID a certificate names; TorProtocolError for a key that
    check_rsa_key refuses."""
    check_rsa_key(modulus, exponent, "signing")
    if algorithm not in RSA_SIGNATURE_ALGORITHMS:
        return False
    hash_name, hash_oid = RSA_SIGNATURE_ALGORITHMS[algorithm]
    size = (modulus.bit_length() + 7) // 8
    value = int.from_bytes(signature, "big")
    if len(signature) != size or value >= modulus:
        return False
    algorithm_identifier = _der_encode(
        DER_SEQUENCE,
        _der_encode(DER_OID, hash_oid) + _der_encode(DER_NULL, b""))
    digest = hashlib.new(hash_name, message).digest()
    digest_info = _der_encode(DER_SEQUENCE, algorithm_identifier
                              + _der_encode(DER_OCTET_STRING, digest))
    if size < len(digest_info) + 11:
        return False
    expected = (b"\x00\x01" + b"\xff" * (size - len(digest_info) - 3) + b"\x00"
                + digest_info)
    recovered = pow(value, exponent, modulus).to_bytes(size, "big")
    return hmac.compare_digest(recovered, expected)


def _check_lifetime(certificate: Certificate, name: str, now: float):
    if now > certificate.not_after + CERT_EXPIRED_SLOP:
        raise TorProtocolError("the relay's %s certificate has expired" % name)
    if now < certificate.not_before - CERT_NOT_YET_VALID_SLOP:
        raise TorProtocolError("the relay's %s certificate is not valid yet"
                               % name)


def _check_signature(certificate: Certificate, signer: Certificate, name: str):
    if not rsa_pkcs1_verify(signer.modulus, signer.exponent,
                            certificate.signed_part, certificate.signature,
                            certificate.signature_algorithm):
        raise TorProtocolError("bad signature on the relay's %s certificate"
                               % name)


def rsa_fingerprint(rsa_public_key: bytes) -> bytes:
    """tor-spec §0.3: SHA-1 of the DER (PKCS#1) RSA public key."""
    return hashlib.sha1(rsa_public_key).digest()


def verify_relay_certs(certificates: dict, tls_certificate: bytes,
                       now: float) -> bytes:
    """tor-spec §4.2 "to authenticate the responder as having a given RSA
    identity": the ID certificate is a self-signed 1024-bit RSA key that
    signed the link certificate, whose key is the TLS connection's; both are
    in date.  Both keys are checked (check_rsa_key) before any signature is.
    Returns the relay's fingerprint (20 bytes)."""
    missing = [kind.name for kind in (CertType.LINK, CertType.IDENTITY)
               if kind not in certificates]
    if missing:
        raise TorProtocolError("CERTS cell lacks the %s certificate"
                               % " and ".join(missing))
    identity = parse_certificate(certificates[CertType.IDENTITY])
    link = parse_certificate(certificates[CertType.LINK])
    check_rsa_key(identity.modulus, identity.exponent, "identity",
                  IDENTITY_KEY_BITS, IDENTITY_KEY_BITS)
    check_rsa_key(link.modulus, link.exponent, "link", MIN_LINK_KEY_BITS)
    _check_lifetime(identity, "identity", now)
    _check_lifetime(link, "link", now)
    _check_signature(identity, identity, "identity")
    _check_signature(link, identity, "link")
    tls_key = parse_certificate(tls_certificate).public_key_info
    if tls_key != link.public_key_info:
        raise TorProtocolError("the TLS key is not the certified link key")
    return rsa_fingerprint(identity.rsa_public_key)


def parse_fingerprint(text: str) -> bytes:
    """A relay fingerprint as users write it: 40 hex digits, maybe with a
    leading "$" and spaces between groups."""
    digits = text.strip().lstrip("$").replace(" ", "")
    if len(digits) != 2 * HASH_LEN:
        raise ValueError("a fingerprint is 40 hex digits: %r" % text)
    return bytes.fromhex(digits)


# =============================================================================
# Relay cells and their crypto
# =============================================================================

class RelayCell(NamedTuple):
    command: int
    stream_id: int
    data: bytes


def relay_payload(command: int, stream_id: int, data: bytes = b"") -> bytearray:
    """An unencrypted relay payload with a zero digest (tor-spec §6.1).  The
    padding is 4 zero bytes and then random bytes, so that the SENDME digests
    cannot be predicted (prop 289)."""
    if len(data) > RELAY_DATA_MAX:
        raise ValueError("relay data longer than %d bytes" % RELAY_DATA_MAX)
    payload = bytearray(struct.pack(">BHHIH", command, 0, stream_id, 0,
                                    len(data)))
    payload += data
    padding = PAYLOAD_LEN - len(payload)
    if padding > 4:
        payload += bytes(4) + os.urandom(padding - 4)
    else:
        payload += bytes(padding)
    return payload


def parse_relay_payload(payload) -> RelayCell:
    command, _, stream_id, _, size = struct.unpack_from(">BHHIH", payload)
    if size > RELAY_DATA_MAX:
        raise TorProtocolError("relay cell length %d" % size)
    return RelayCell(command, stream_id,
                     bytes(payload[RELAY_HEADER_LEN:RELAY_HEADER_LEN + size]))


class RelayCrypto:
    """One end of a hop's relay crypto (tor-spec §5.5, §6.1): an AES-128-CTR
    keystream and a running SHA-1 per direction.  The digest runs over every
    whole 509-byte payload sent or recognized, taken with its digest field
    zeroed; the header carries its first four bytes."""

    def __init__(self, send_key: bytes, send_seed: bytes,
                 receive_key: bytes, receive_seed: bytes):
        self._send_cipher = Aes128Ctr(send_key)
        self._send_digest = hashlib.sha1(send_seed)
        self._receive_cipher = Aes128Ctr(receive_key)
        self._receive_digest = hashlib.sha1(receive_seed)

    @classmethod
    def for_client(cls, keys: CircuitKeys) -> "RelayCrypto":
        return cls(keys.forward_key, keys.forward_digest,
                   keys.backward_key, keys.backward_digest)

    @classmethod
    def for_relay(cls, keys: CircuitKeys) -> "RelayCrypto":
        """The relay's end, for tests."""
        return cls(keys.backward_key, keys.backward_digest,
                   keys.forward_key, keys.forward_digest)

    def seal(self, payload: bytearray) -> bytes:
        """Stamp the digest into an unencrypted payload, then encrypt it."""
        self._send_digest.update(payload)
        payload[RELAY_DIGEST] = self._send_digest.digest()[:4]
        return self._send_cipher.process(payload)

    def open(self, encrypted: bytes) -> Optional[bytearray]:
        """Decrypt a payload; None unless it is recognized (recognized field
        zero and the digest right); only then does the running digest move
        on."""
        payload = bytearray(self._receive_cipher.process(encrypted))
        if payload[1] or payload[2]:
            return None
        claimed = bytes(payload[RELAY_DIGEST])
        payload[RELAY_DIGEST] = bytes(4)
        digest = self._receive_digest.copy()
        digest.update(payload)
        if not hmac.compare_digest(digest.digest()[:4], claimed):
            return None
        self._receive_digest = digest
        return payload

    def sent_digest(self) -> bytes:
        """The full running digest after the last cell sent (prop 289)."""
        return self._send_digest.digest()

    def received_digest(self) -> bytes:
        """The full running digest after the last cell recognized."""
        return self._receive_digest.digest()


# =============================================================================
# Circuits and directory streams (sans-I/O)
# =============================================================================
# A Circuit is one CREATE_FAST hop with its BEGIN_DIR streams.  It never
# touches a socket: it hands cells to its transport (the TorLink) and the
# transport feeds it the cells that arrive.  Transport interface:
#   send_cell(command, payload)   queue one cell of this circuit
#   flush()                       push queued cells towards the relay
#   cell_room() -> int            cells it takes now without overfilling
#   call_soon(function, argument) run function(argument) from the loop
# Stream callbacks run from loop events or call_soon, never inside a call the
# application made on a stream (link.close() ends the streams at once).

class StreamState(enum.Enum):
    WAITING = "waiting"         # BEGIN_DIR queued or sent, no CONNECTED yet
    OPEN = "open"
    ENDED = "ended"             # the relay or the circuit ended it
    CLOSED = "closed"           # the application closed it


class DirStream:
    """One RELAY_BEGIN_DIR stream: the application's handle.

    on_connected()     RELAY_CONNECTED arrived: send() may now take data
    on_data(bytes)     data from the relay (not while paused)
    on_end(reason)     the stream is over: an EndReason value (the relay's
                       RELAY_END, or DESTROY, TIMEOUT, TORPROTOCOL, ... when
                       the circuit failed); end_detail says more for the log
    on_writable        set it to a callable to hear when send() would take
                       more after it took less than offered
    """

    def __init__(self, circuit: "Circuit", stream_id: int, on_connected,
                 on_data, on_end):
        self.circuit = circuit
        self.stream_id = stream_id
        self.on_connected = on_connected
        self.on_data = on_data
        self.on_end = on_end
        self.on_writable = None
        self.state = StreamState.WAITING
        self.end_reason = None
        self.end_detail = ""
        self.end_errno = None       # the errno when the relay was unreachable
        self.paused = False
        self.package_window = STREAM_WINDOW
        self.deliver_window = STREAM_WINDOW
        self.wants_writable = False
        self._held = collections.deque()    # data received while paused
        self._end_pending = False           # on_end waits behind held data

    def send(self, data) -> int:
        """Queue as much of data as the windows allow; how much that was."""
        if self.state is not StreamState.OPEN:
            self.wants_writable = self.state is StreamState.WAITING
            return 0
        sent = self.circuit.send_data(self, data)
        self.wants_writable = sent < len(data)
        return sent

    def close(self):
        """End the stream from our side (RELAY_END DONE); no callback
        follows."""
        if self.state in (StreamState.WAITING, StreamState.OPEN):
            self.circuit.close_stream(self)
        self.state = StreamState.CLOSED
        self._held.clear()

    def shutdown(self, how):
        """Tor streams cannot be half-closed: the client's EOF leaves the
        stream open until the relay ends it (or the client closes)."""

    def pause(self, paused: bool):
        """Hold data back (and the stream SENDMEs with it) while the
        application cannot take more; resume delivery later from the loop."""
        self.paused = paused
        if not paused and (self._held or self._end_pending
                           or self.deliver_window <= STREAM_WINDOW
                           - STREAM_SENDME_INCREMENT):
            self.circuit.transport.call_soon(self._resume, None)

    # -- called by the circuit -------------------------------------------------

    def _deliver(self, data: bytes):
        if self.paused or self._held:
            self._held.append(data)
        else:
            self.on_data(data)

    def _resume(self, _):
        while (self._held and not self.paused
               and self.state is not StreamState.CLOSED):
            self.on_data(self._held.popleft())
        if self.state is StreamState.OPEN:
            self.circuit.consider_stream_sendme(self)
        if self._end_pending and not self._held \
                and self.state is StreamState.ENDED:
            self._end_pending = False
            self.on_end(self.end_reason)

    def _ended(self, reason: int, detail: str, error_number=None):
        if self.state in (StreamState.ENDED, StreamState.CLOSED):
            return
        self.state = StreamState.ENDED
        self.end_reason = reason
        self.end_detail = detail
        self.end_errno = error_number
        if self._held:
            self._end_pending = True    # after the held data, on resume
        else:
            self.on_end(reason)


class Circuit:
    """One CREATE_FAST hop and its directory streams (tor-spec §5.1.5, §6)."""

    def __init__(self, transport):
        self.transport = transport
        self.crypto = None                  # RelayCrypto once CREATED_FAST came
        self.closed = False
        self.streams = {}                   # stream id -> DirStream
        self._client_material = os.urandom(HASH_LEN)
        self._next_stream_id = int.from_bytes(os.urandom(2), "big") or 1
        self.package_window = CIRCUIT_WINDOW
        self.deliver_window = CIRCUIT_WINDOW
        self._data_cells_sent = 0
        self._sendme_digests = collections.deque()  # what the relay must echo

    # -- building --------------------------------------------------------------

    def create_fast_payload(self) -> bytes:
        return self._client_material

    def on_created_fast(self, payload: bytes):
        """CREATED_FAST: Y and KH; KH must match our derivation."""
        keys = create_fast_keys(self._client_material, payload[:HASH_LEN])
        if not hmac.compare_digest(keys.key_hash,
                                   payload[HASH_LEN:2 * HASH_LEN]):
            raise TorProtocolError("CREATED_FAST key hash does not match")
        self.crypto = RelayCrypto.for_client(keys)
        for stream in list(self.streams.values()):
            self._send_relay(RelayCommand.BEGIN_DIR, stream.stream_id)

    # -- streams ---------------------------------------------------------------

    def open_stream(self, on_connected, on_data, on_end) -> DirStream:
        stream = DirStream(self, self._allocate_stream_id(), on_connected,
                           on_data, on_end)
        self.streams[stream.stream_id] = stream
        if self.crypto is not None:
            self._send_relay(RelayCommand.BEGIN_DIR, stream.stream_id)
            self.transport.flush()
        return stream

    def _allocate_stream_id(self) -> int:
        if len(self.streams) >= 0xFFFF:
            raise OSError(errno.EAGAIN, "no stream ids left on the circuit")
        while True:
            stream_id = self._next_stream_id
            self._next_stream_id = stream_id % 0xFFFF + 1   # 1..65535
            if stream_id not in self.streams:
                return stream_id

    def close_stream(self, stream: DirStream):
        self.streams.pop(stream.stream_id, None)
        if self.crypto is not None and not self.closed:
            self._send_relay(RelayCommand.END, stream.stream_id,
                             bytes((EndReason.DONE,)))
            self.transport.flush()

    def end_stream(self, stream: DirStream, reason: int, detail: str):
        """End a stream from our side for a reason of our own (a deadline),
        telling the relay and then the application."""
        if stream.state not in (StreamState.WAITING, StreamState.OPEN):
            return
        self.close_stream(stream)
        stream._ended(reason, detail)

    def send_data(self, stream: DirStream, data) -> int:
        """Package data as RELAY_DATA cells within both windows and the
        transport's room; the number of bytes taken."""
        cells = min(stream.package_window, self.package_window,
                    self.transport.cell_room())
        view = memoryview(data)
        taken = 0
        while cells > 0 and taken < len(view):
            chunk = bytes(view[taken:taken + RELAY_DATA_MAX])
            self._send_relay(RelayCommand.DATA, stream.stream_id, chunk)
            taken += len(chunk)
            cells -= 1
            stream.package_window -= 1
            self.package_window -= 1
            self._data_cells_sent += 1
            if self._data_cells_sent % CIRCUIT_SENDME_INCREMENT == 0:
                # The relay's SENDME v1 will echo this digest (prop 289).
                self._sendme_digests.append(self.crypto.sent_digest())
        if taken:
            self.transport.flush()
        return taken

    def consider_stream_sendme(self, stream: DirStream):
        """tor-spec §7.4: a stream SENDME for every 50 cells the application
        took, unless it is paused."""
        sent = False
        while (not stream.paused and stream.deliver_window
               <= STREAM_WINDOW - STREAM_SENDME_INCREMENT):
            stream.deliver_window += STREAM_SENDME_INCREMENT
            self._send_relay(RelayCommand.SENDME, stream.stream_id)
            sent = True
        if sent:
            self.transport.flush()

    def notify_writable(self):
        """Room again (a SENDME, or the transport drained): tell the streams
        that took less than they were offered."""
        for stream in list(self.streams.values()):
            if (stream.wants_writable and stream.state is StreamState.OPEN
                    and stream.package_window > 0 and self.package_window > 0
                    and self.transport.cell_room() > 0):
                stream.wants_writable = False
                if stream.on_writable is not None:
                    stream.on_writable()

    # -- cells from the relay --------------------------------------------------

    def on_relay_cell(self, encrypted_payload: bytes):
        if self.crypto is None:
            raise TorProtocolError("RELAY cell before CREATED_FAST")
        payload = self.crypto.open(encrypted_payload)
        if payload is None:
            # One hop: nobody beyond the relay could have sent it.
            raise TorProtocolError("unrecognized relay cell")
        cell = parse_relay_payload(payload)
        if cell.command == RelayCommand.DATA:
            self._on_data_cell(cell)
        elif cell.command == RelayCommand.SENDME:
            self._on_sendme(cell)
        elif cell.command == RelayCommand.CONNECTED:
            self._on_connected(cell)
        elif cell.command == RelayCommand.END:
            self._on_end(cell)
        elif cell.command == RelayCommand.TRUNCATED:
            raise TorProtocolError("relay truncated the circuit")
        # Anything else (DROP, commands we do not know) is ignored, §6.1.
        self.transport.flush()

    def _on_data_cell(self, cell: RelayCell):
        self.deliver_window -= 1
        if self.deliver_window < 0:
            raise TorProtocolError("relay overran the circuit window")
        if self.deliver_window <= CIRCUIT_WINDOW - CIRCUIT_SENDME_INCREMENT:
            # This cell brought the window to a multiple of 100: echo the
            # running digest as it stands right after it (prop 289).
            self.deliver_window += CIRCUIT_SENDME_INCREMENT
            self._send_relay(RelayCommand.SENDME, 0, struct.pack(
                ">BH", SENDME_VERSION_AUTHENTICATED, HASH_LEN)
                + self.crypto.received_digest())
        stream = self.streams.get(cell.stream_id)
        if stream is None:
            return          # a stream we closed; the cell still counted above
        if stream.state is not StreamState.OPEN:
            raise TorProtocolError("data on a stream that is not connected")
        stream.deliver_window -= 1
        if stream.deliver_window < 0:
            raise TorProtocolError("relay overran a stream window")
        if cell.data:
            stream._deliver(cell.data)
        if stream.state is StreamState.OPEN:
            self.consider_stream_sendme(stream)

    def _on_sendme(self, cell: RelayCell):
        if cell.stream_id:
            stream = self.streams.get(cell.stream_id)
            if stream is None:
                return
            if stream.package_window + STREAM_SENDME_INCREMENT > STREAM_WINDOW:
                raise TorProtocolError("unexpected stream SENDME")
            stream.package_window += STREAM_SENDME_INCREMENT
        else:
            self._check_circuit_sendme(cell.data)
            self.package_window += CIRCUIT_SENDME_INCREMENT
        self.notify_writable()

    def _check_circuit_sendme(self, body: bytes):
        """tor-spec §7.3.1: version 0 (or empty) is taken as it is; version 1
        must echo the digest recorded after our 100th, 200th, ... DATA cell."""
        if not self._sendme_digests or (self.package_window
                                        + CIRCUIT_SENDME_INCREMENT
                                        > CIRCUIT_WINDOW):
            raise TorProtocolError("unexpected circuit SENDME")
        expected = self._sendme_digests.popleft()
        version = body[0] if body else 0
        if version == 0:
            return
        if version != SENDME_VERSION_AUTHENTICATED or len(body) < 3:
            raise TorProtocolError("SENDME version %d" % version)
        size = int.from_bytes(body[1:3], "big")
        if size < HASH_LEN or len(body) < 3 + HASH_LEN \
                or not hmac.compare_digest(body[3:3 + HASH_LEN], expected):
            raise TorProtocolError("SENDME digest does not match")

    def _on_connected(self, cell: RelayCell):
        stream = self.streams.get(cell.stream_id)
        if stream is None or stream.state is not StreamState.WAITING:
            return
        stream.state = StreamState.OPEN
        stream.on_connected()
        if stream.wants_writable:
            self.notify_writable()

    def _on_end(self, cell: RelayCell):
        stream = self.streams.pop(cell.stream_id, None)
        if stream is None:
            return
        reason = cell.data[0] if cell.data else EndReason.MISC
        stream._ended(reason, "the relay ended the stream: %s"
                      % end_reason_name(reason))

    # -- the whole circuit -----------------------------------------------------

    def fail(self, reason: int, detail: str, error_number=None):
        """The circuit is gone (or going): end every stream.  The transport
        sends DESTROY if it should; error_number is the connect's errno
        when the relay could not be reached at all."""
        self.closed = True
        streams, self.streams = list(self.streams.values()), {}
        for stream in streams:
            stream._ended(reason, detail, error_number)

    def _send_relay(self, command: int, stream_id: int, data: bytes = b""):
        self.transport.send_cell(
            CellCommand.RELAY,
            self.crypto.seal(relay_payload(command, stream_id, data)))


def end_reason_name(reason: int) -> str:
    try:
        return EndReason(reason).name
    except ValueError:
        return "reason %d" % reason


# Tor's stream_end_reason_to_socks5_response (reasons.c); reasons not listed
# (MISC, DESTROY, NOTDIRECTORY, TORPROTOCOL, unknown ones) are a general
# failure.  DONE before CONNECTED means the relay closed before answering.
# Tor maps 0 (no reason) to success; no reason is not success here.
END_REASON_REPLIES = {
    EndReason.RESOLVEFAILED: Reply.HOST_UNREACHABLE,
    EndReason.CONNECTREFUSED: Reply.CONNECTION_REFUSED,
    EndReason.EXITPOLICY: Reply.NOT_ALLOWED,
    EndReason.DONE: Reply.CONNECTION_REFUSED,
    EndReason.TIMEOUT: Reply.TTL_EXPIRED,
    EndReason.NOROUTE: Reply.HOST_UNREACHABLE,
    EndReason.CONNRESET: Reply.CONNECTION_REFUSED,
}


def reply_for_end_reason(reason: int) -> Reply:
    """The SOCKS5 reply for a stream that ended before RELAY_CONNECTED."""
    return END_REASON_REPLIES.get(reason, Reply.GENERAL_FAILURE)


# Tor's errno_to_stream_end_reason (reasons.c): how a failed connect to the
# relay itself ends the streams waiting for it.
ERRNO_END_REASONS = {
    errno.EPIPE: EndReason.DONE,
    errno.ENETUNREACH: EndReason.NOROUTE,
    errno.EHOSTUNREACH: EndReason.NOROUTE,
    errno.EACCES: EndReason.NOROUTE,
    errno.EPERM: EndReason.NOROUTE,
    errno.ECONNREFUSED: EndReason.CONNECTREFUSED,
    errno.ECONNRESET: EndReason.CONNRESET,
    errno.ETIMEDOUT: EndReason.TIMEOUT,
    errno.ENOBUFS: EndReason.RESOURCELIMIT,
    errno.ENOMEM: EndReason.RESOURCELIMIT,
    errno.ENFILE: EndReason.RESOURCELIMIT,
    errno.EMFILE: EndReason.RESOURCELIMIT,
    errno.EADDRINUSE: EndReason.RESOURCELIMIT,
    errno.EADDRNOTAVAIL: EndReason.RESOURCELIMIT,
}


def end_reason_for_errno(error_number) -> EndReason:
    return ERRNO_END_REASONS.get(error_number, EndReason.MISC)


# =============================================================================
# TorLink: one TLS connection to a relay's ORPort, in the loop
# =============================================================================
# TLS runs through ssl.SSLObject and two MemoryBIOs, so the socket stays
# non-blocking and the loop decides when to read and write.  The relay's
# certificate is self-signed; who the relay is comes from the CERTS cell.

class LinkState(enum.Enum):
    CONNECTING = "connecting"           # TCP connect in progress
    TLS_HANDSHAKE = "tls-handshake"
    VERSIONS = "versions"               # our VERSIONS sent, waiting for theirs
    CERTS = "certs"                     # waiting for CERTS ... NETINFO
    CREATING = "creating"               # CREATE_FAST sent
    OPEN = "open"
    CLOSED = "closed"


# TLS 1.2 suites: ECDHE only, as tor relays choose.  With DHE the relay
# picks the group, and a big prime of its own costs us a full-length
# exponent (0.2 s of the loop for 8192 bits); TLS 1.3 has named groups only.
TOR_TLS12_CIPHERS = ("ECDH+AESGCM:ECDH+CHACHA20:ECDH+AES:"
                     "!aNULL:!eNULL:!aDSS:!SHA1:!AESCCM")


def tor_tls_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TOR_TLS12_CIPHERS)
    if hasattr(ssl, "OP_NO_RENEGOTIATION"):     # OpenSSL 1.1.0h and later
        # A renegotiation is a full handshake the relay could ask for again
        # and again; the link protocol needs none (tor-spec §2).
        context.options |= ssl.OP_NO_RENEGOTIATION
    return context


class TorLink:
    """A link to one relay carrying one CREATE_FAST circuit for BEGIN_DIR
    streams.  open_stream() works at once: streams wait for the circuit.

    loop                 the EventLoop that runs the link
    address, port        the relay's ORPort (address: an IP literal)
    fingerprint          the relay's expected RSA identity (20 bytes), or None
    timeout              seconds to build the circuit, and for each stream
                         to be connected
    idle_timeout         seconds the circuit stays open without streams
    on_closed            called with the link once it has closed
    outbound_socket      outbound_socket(address) -> a non-blocking socket
                         (the Server's: --outbound-address applies)
    scrub                scrub(text) -> what the log may show of a relay
    """

    def __init__(self, loop, address: str, port: int,
                 fingerprint: Optional[bytes] = None, timeout: float = 10.0,
                 idle_timeout: float = LINK_IDLE_TIMEOUT, on_closed=None,
                 tls_context: Optional[ssl.SSLContext] = None,
                 outbound_socket=None, scrub=None):
        self.loop = loop
        self._outbound_socket = outbound_socket or open_outbound_socket
        self._scrub = scrub or scrubbed
        self.address = str(ipaddress.ip_address(address))
        self.port = port
        self.expected_fingerprint = fingerprint
        self.fingerprint = None         # learned from CERTS
        self.timeout = timeout
        self.idle_timeout = idle_timeout
        self.on_closed = on_closed
        self.state = LinkState.CONNECTING
        self.failure = ""               # why the link closed, for the log
        self.link_version = None
        self.circuit = Circuit(self)
        self.circuit_id = CIRCUIT_ID_INITIATOR | int.from_bytes(
            os.urandom(4), "big")
        self._context = tls_context or tor_tls_context()
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = None
        self._tls_certificate = None
        self._socket = None
        self._events = 0
        self._received = bytearray()    # TLS plaintext not yet parsed as cells
        self._relay_closed = False      # TLS closed: the cells received end
        self._continuing = False        # the next round handles more cells
        self._setup_bytes = 0           # cell bytes before the circuit opened
        self._cells_out = bytearray()   # cells not yet given to TLS
        self._wire_out = bytearray()    # TLS records not yet sent
        self._last_active = time.monotonic()
        self._connect()

    # -- the application's side ------------------------------------------------

    @property
    def usable(self) -> bool:
        return self.state is not LinkState.CLOSED and not self.circuit.closed

    def open_stream(self, on_connected, on_data, on_end) -> DirStream:
        """A new BEGIN_DIR stream (see DirStream)."""
        if not self.usable:
            raise OSError(errno.ENOTCONN, "the Tor link is closed")
        stream = self.circuit.open_stream(on_connected, on_data, on_end)
        self._last_active = time.monotonic()
        self.loop.call_later(self.timeout, self._stream_overdue, stream,
                             owner=self)
        return stream

    def close(self, detail: str = "closed"):
        """Destroy the circuit and close the connection; streams still open
        get on_end(DESTROY)."""
        self._fail(EndReason.DESTROY, detail, quiet=True)

    # -- transport interface for the circuit -----------------------------------

    def send_cell(self, command: int, payload: bytes):
        self._cells_out += encode_cell(self.circuit_id, command, payload)

    def cell_room(self) -> int:
        backlog = len(self._wire_out) + len(self._cells_out)
        if self.state is LinkState.CLOSED or backlog >= LINK_HIGH_WATER:
            return 0
        return (LINK_HIGH_WATER - backlog) // FIXED_CELL_LEN + 1

    def call_soon(self, function, argument):
        self.loop.call_soon(function, argument, owner=self)

    def flush(self):
        """Encrypt queued cells and send what the socket takes now."""
        if self._cells_out and self._tls is not None \
                and self.state is not LinkState.CLOSED:
            data, self._cells_out = bytes(self._cells_out), bytearray()
            try:
                self._tls.write(data)
            except ssl.SSLError as error:
                self._fail_soon(EndReason.TORPROTOCOL, "TLS: %s"
                                % clip_for_log(str(error)))
                return
        self._wire_out += self._outgoing.read()
        self._send_wire()
        self._update_interest()

    # -- connecting ------------------------------------------------------------

    def _connect(self):
        self.loop.call_later(self.timeout, self._setup_overdue, None,
                             owner=self)
        try:
            # The server's outbound socket: --outbound-address and
            # --outbound-interface apply to relays too.
            self._socket = self._outbound_socket(
                ipaddress.ip_address(self.address))
            with_nodelay(self._socket)
            error = self._socket.connect_ex((self.address, self.port))
        except OSError as failure:
            error = failure.errno
        if error not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK):
            self._fail_soon(end_reason_for_errno(error),
                            "connect: %s" % os.strerror(error), error)
            return
        self._update_interest()

    def _on_socket_event(self, mask: int):
        if self.state is LinkState.CONNECTING:
            error = self._socket.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if error:
                self._fail(end_reason_for_errno(error),
                           "connect: %s" % os.strerror(error),
                           error_number=error)
                return
            self._start_tls()
        if mask & EVENT_READ:
            try:
                self._read_socket()
            except OSError as error:
                self._fail(end_reason_for_errno(error.errno), str(error))
                return
        if self._advance(self._process_tls) and mask & EVENT_WRITE \
                and len(self._wire_out) < LINK_LOW_WATER:
            self.circuit.notify_writable()

    def _advance(self, step) -> bool:
        """Run step (TLS, cells) and send what it queued; the relay's
        protocol or TLS error closes the link.  Whether it is still open."""
        try:
            step()
        except TorProtocolError as error:
            self._fail(EndReason.TORPROTOCOL, str(error))
        except ssl.SSLError as error:
            self._fail(EndReason.TORPROTOCOL, "TLS: %s"
                       % clip_for_log(str(error)))
        if self.state is LinkState.CLOSED:
            return False
        self.flush()
        return True

    def _start_tls(self):
        self.state = LinkState.TLS_HANDSHAKE
        self._tls = self._context.wrap_bio(self._incoming, self._outgoing,
                                           server_side=False)

    def _read_socket(self):
        for _ in range(4):              # a few reads, then let others run
            size = min(LINK_RECV_SIZE, self._receive_room())
            if size <= 0:
                return
            try:
                data = self._socket.recv(size)
            except (BlockingIOError, InterruptedError):
                return
            if not data:
                self._incoming.write_eof()
                return
            self._incoming.write(data)
            if len(data) < size:
                return

    def _receive_room(self) -> int:
        """Bytes the link may still read: what waits to be handled (TLS
        records and cells) stays under LINK_RECEIVED_HIGH_WATER, and under
        MAX_SETUP_BYTES until the circuit is open (beside the part of a TLS
        record that OpenSSL may hold)."""
        if self._relay_closed:
            return 0
        limit = (LINK_RECEIVED_HIGH_WATER if self.state is LinkState.OPEN
                 else MAX_SETUP_BYTES)
        return limit - len(self._received) - self._incoming.pending

    def _process_tls(self):
        if self.state is LinkState.TLS_HANDSHAKE:
            try:
                self._tls.do_handshake()
            except ssl.SSLWantReadError:
                return
            self._tls_established()
        while not self._relay_closed:
            try:
                data = self._tls.read(LINK_RECV_SIZE)
            except ssl.SSLWantReadError:
                break
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                data = b""
            if not data:
                self._relay_closed = True
                break
            self._received += data
        self._process_cells()

    def _tls_established(self):
        self.state = LinkState.VERSIONS
        self._tls_certificate = self._tls.getpeercert(binary_form=True)
        if not self._tls_certificate:
            raise TorProtocolError("the relay sent no TLS certificate")
        self._tls.write(versions_cell())

    # -- cells -----------------------------------------------------------------

    def _process_cells(self):
        """Handle at most LINK_CELLS_PER_WAKEUP of the cells received; the
        rest wait for the next round of the loop, so that a relay's flood
        holds up nobody else.  Once all are handled, a relay's close closes
        the link (what came before the close counts too)."""
        received = self._received
        used = 0
        for _ in range(LINK_CELLS_PER_WAKEUP):
            if self.state is LinkState.CLOSED:
                break
            result = parse_cell(memoryview(received)[used:],
                                *self._cell_format())
            if result is NEED_MORE:
                if self._relay_closed:
                    self._fail(EndReason.DESTROY,
                               "the relay closed the connection")
                break
            used += result.used
            if self.state is not LinkState.OPEN:
                self._count_setup_bytes(result.used)
            self._handle_cell(result.message)
        else:
            self._continue_soon()   # the batch is full: more may wait
        del received[:used]

    def _cell_format(self):
        """(circuit id length, largest variable payload) of the next cell:
        VERSIONS has 2-byte circuit ids (tor-spec §4.1); until the circuit
        is open, no variable cell is bigger than a CERTS cell may be."""
        if self.state is LinkState.OPEN:
            return CIRC_ID_LEN, 0xFFFF
        if self.state is LinkState.VERSIONS:
            return VERSIONS_CIRC_ID_LEN, MAX_SETUP_CELL_PAYLOAD
        return CIRC_ID_LEN, MAX_SETUP_CELL_PAYLOAD

    def _count_setup_bytes(self, size: int):
        self._setup_bytes += size
        if self._setup_bytes > MAX_SETUP_BYTES:
            raise TorProtocolError("the relay sent more than %d bytes of "
                                   "cells before the circuit was open"
                                   % MAX_SETUP_BYTES)

    def _continue_soon(self):
        """Handle more cells in the next round: a timer due now runs after
        the sockets the loop found ready."""
        if not self._continuing:
            self._continuing = True
            self.loop.call_soon(self._continue_cells, None, owner=self)

    def _continue_cells(self, _):
        self._continuing = False
        if self.state is not LinkState.CLOSED:
            self._advance(self._process_cells)

    def _handle_cell(self, cell: Cell):
        command = cell.command
        if command in (CellCommand.PADDING, CellCommand.VPADDING):
            return
        if self.state is LinkState.VERSIONS:
            if command != CellCommand.VERSIONS:
                raise TorProtocolError("expected VERSIONS, got cell %d"
                                       % command)
            self.link_version = negotiate_link_version(cell.payload)
            self.state = LinkState.CERTS
        elif self.state is LinkState.CERTS:
            self._handle_handshake_cell(cell)
        elif cell.circuit_id == self.circuit_id:
            self._handle_circuit_cell(cell)
        # Cells for other circuits, late NETINFOs and the like are dropped.

    def _handle_handshake_cell(self, cell: Cell):
        if cell.command == CellCommand.CERTS:
            if self.fingerprint is not None:
                raise TorProtocolError("a second CERTS cell")
            self._check_identity(parse_certs_cell(cell.payload))
        elif cell.command == CellCommand.AUTH_CHALLENGE:
            pass        # we do not authenticate: clients need not (§4)
        elif cell.command == CellCommand.NETINFO:
            if self.fingerprint is None:
                raise TorProtocolError("NETINFO before CERTS")
            self._send_link_cell(CellCommand.NETINFO,
                                 netinfo_payload(self.address))
            self.send_cell(CellCommand.CREATE_FAST,
                           self.circuit.create_fast_payload())
            self.state = LinkState.CREATING
        else:
            raise TorProtocolError("unexpected cell %d in the handshake"
                                   % cell.command)

    def _send_link_cell(self, command: int, payload: bytes):
        """A cell for the link itself (circuit id 0)."""
        self._cells_out += encode_cell(0, command, payload)

    def _check_identity(self, certificates: dict):
        fingerprint = verify_relay_certs(certificates, self._tls_certificate,
                                         time.time())
        if self.expected_fingerprint is not None and not hmac.compare_digest(
                fingerprint, self.expected_fingerprint):
            scrub = self._scrub             # a fingerprint names the relay
            raise TorProtocolError(
                "relay identity %s is not the expected %s"
                % (scrub(fingerprint.hex().upper()),
                   scrub(self.expected_fingerprint.hex().upper())))
        self.fingerprint = fingerprint

    def _handle_circuit_cell(self, cell: Cell):
        command = cell.command
        if command == CellCommand.RELAY:
            self.circuit.on_relay_cell(cell.payload)
        elif command == CellCommand.CREATED_FAST \
                and self.state is LinkState.CREATING:
            self.circuit.on_created_fast(cell.payload)
            self.state = LinkState.OPEN
            log.debug("Tor link to %s: circuit open", self._name())
            self._arm_idle_timer()
        elif command == CellCommand.DESTROY:
            self._fail(EndReason.DESTROY, "the relay destroyed the circuit "
                       "(reason %d)" % cell.payload[0], send_destroy=False)
        elif command == CellCommand.RELAY_EARLY:
            raise TorProtocolError("inbound RELAY_EARLY")   # tor-spec §5.6

    # -- deadlines -------------------------------------------------------------

    def _setup_overdue(self, _):
        if self.state not in (LinkState.OPEN, LinkState.CLOSED):
            self._fail(EndReason.TIMEOUT, "no circuit after %.0f s (%s)"
                       % (self.timeout, self.state.value))

    def _stream_overdue(self, stream: DirStream):
        if stream.state is StreamState.WAITING and not self.circuit.closed:
            self.circuit.end_stream(stream, EndReason.TIMEOUT,
                                    "no RELAY_CONNECTED after %.0f s"
                                    % self.timeout)

    def _arm_idle_timer(self):
        self.loop.call_at(self._last_active + self.idle_timeout,
                          self._idle_overdue, None, owner=self)

    def _idle_overdue(self, _):
        if self.state is LinkState.CLOSED:
            return
        now = time.monotonic()
        if self.circuit.streams:
            self._last_active = now
        if now < self._last_active + self.idle_timeout:
            self._arm_idle_timer()      # used since: look again later
            return
        self._fail(EndReason.DONE, "idle", quiet=True)

    # -- socket output and closing ---------------------------------------------

    def _send_wire(self):
        if not self._wire_out or self.state in (LinkState.CONNECTING,
                                                LinkState.CLOSED):
            return
        try:
            sent = self._socket.send(self._wire_out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as error:
            self._fail_soon(end_reason_for_errno(error.errno), str(error))
            return
        del self._wire_out[:sent]

    def _update_interest(self):
        if self.state is LinkState.CLOSED:
            return
        events = 0
        if self.state is LinkState.CONNECTING:
            events = EVENT_READ | EVENT_WRITE
        else:
            if self._receive_room() > 0:
                events |= EVENT_READ
            if self._wire_out:
                events |= EVENT_WRITE
        if events != self._events:
            self.loop.watch(self._socket, self._events, events,
                            (self._on_socket_event, self))
            self._events = events

    def _fail_soon(self, reason: int, detail: str, error_number=None):
        """Fail from the loop, not inside the application's call."""
        self.loop.call_soon(self._fail, reason, detail, True, False,
                            error_number, owner=self)

    def _fail(self, reason: int, detail: str, send_destroy: bool = True,
              quiet: bool = False, error_number=None):
        """Close the link and end its streams with reason."""
        if self.state is LinkState.CLOSED:
            return
        if send_destroy and self.state in (LinkState.CREATING, LinkState.OPEN):
            self.send_cell(CellCommand.DESTROY, bytes((DESTROY_REASON_NONE,)))
            self.flush()            # one try; the close follows anyway
        detail = clip_for_log(detail)   # it may quote the relay
        log.log(logging.DEBUG if quiet else logging.INFO,
                "Tor link to %s closed: %s", self._name(), detail)
        self.failure = detail
        self.state = LinkState.CLOSED
        if self._events:
            self.loop.watch(self._socket, self._events, 0, None)
            self._events = 0
        if self._socket is not None:
            self._socket.close()
        self.circuit.fail(reason, detail, error_number)
        if self.on_closed is not None:
            self.on_closed(self)

    def _name(self) -> str:
        """The relay as the log may show it (scrubbed unless asked)."""
        return self._scrub(format_address((self.address, self.port)))

    def close_after_bug(self):
        """The loop met a bug in one of this link's handlers."""
        self.close("internal error")


class TorLinkPool:
    """The open links, one per relay (and pin): later BEGIN_DIR requests to
    the same relay share its circuit."""

    def __init__(self, loop, timeout: float = 10.0,
                 idle_timeout: float = LINK_IDLE_TIMEOUT,
                 outbound_socket=None, scrub=None):
        self.loop = loop
        self.timeout = timeout
        self.idle_timeout = idle_timeout
        self.outbound_socket = outbound_socket
        self.scrub = scrub
        self.links = {}     # (address, port, fingerprint or None) -> TorLink
        self._tls_context = None

    def open_stream(self, address: str, port: int, on_connected, on_data,
                    on_end, fingerprint: Optional[bytes] = None) -> DirStream:
        """A BEGIN_DIR stream to the relay at address:port, over a link that
        is open already when there is one."""
        address = str(ip_of(address))
        link = self._find_link(address, port, fingerprint)
        if link is None:
            if len(self.links) >= MAX_TOR_LINKS:
                raise OSError(errno.EAGAIN, "%d Tor links open already"
                              % MAX_TOR_LINKS)
            if self._tls_context is None:
                self._tls_context = tor_tls_context()
            link = TorLink(self.loop, address, port, fingerprint,
                           self.timeout, self.idle_timeout,
                           on_closed=self._forget,
                           tls_context=self._tls_context,
                           outbound_socket=self.outbound_socket,
                           scrub=self.scrub)
            self.links[(address, port, fingerprint)] = link
        return link.open_stream(on_connected, on_data, on_end)

    def _find_link(self, address: str, port: int,
                   fingerprint: Optional[bytes]) -> Optional[TorLink]:
        """The link made for this request, or one to the same relay that has
        already proved the identity asked for (any, when none is asked)."""
        link = self.links.get((address, port, fingerprint))
        if link is not None and link.usable:
            return link
        for (known_address, known_port, _), link in self.links.items():
            if (known_address, known_port) == (address, port) and link.usable \
                    and link.fingerprint is not None \
                    and fingerprint in (None, link.fingerprint):
                return link
        return None

    def close(self):
        for link in list(self.links.values()):
            link.close("shutting down")
        self.links.clear()

    def _forget(self, link: TorLink):
        for key, known in list(self.links.items()):
            if known is link:
                del self.links[key]


# =============================================================================
# The event loop: readiness, timers, calls from other threads
# =============================================================================
# One selectors loop per Server.  Everything that waits (connections,
# listeners, the DNS client, Tor links) registers its sockets here with an
# owner: when a handler raises, the loop logs the bug and tells the owner to
# close (owner.close_after_bug()), and everyone else is served on.

class Handle(list):
    """A call the loop will make: [when, sequence, function, args, owner].
    A list, so that the timer heap compares (when, sequence) in C."""
    __slots__ = ()

    def cancel(self):
        """Disarm it; it also lets go of what it would have called, so that
        a closed connection is not kept in memory until its deadline."""
        self[2] = None
        self[3] = self[4] = None


MAX_LOOP_WAIT = 3600.0              # seconds; the loop wakes, finds nothing due


class EventLoop:
    """A selectors loop with a timer heap and a wake-up socketpair.

    watch(sock, old, new, handler)   wait for events on sock; handler is a
                                     (callback, owner) pair, callback(mask)
    call_at(when, function, *args)   at monotonic time when; a Handle
    call_soon(function, *args)       after the current round of events
    call_soon_threadsafe(...)        the same, from any thread
    run_once(limit)                  one round; limit caps the wait (seconds)
    """

    def __init__(self):
        self.selector = selectors.DefaultSelector()
        self.recv_view = memoryview(bytearray(RECV_BUFFER_SIZE))
        self._timers = []               # heap of Handles
        self._ready = collections.deque()   # Handles due now
        self._sequence = itertools.count()
        self._wakeup_reader, self._wakeup_writer = socket.socketpair()
        self._wakeup_reader.setblocking(False)
        self._wakeup_writer.setblocking(False)
        self.watch(self._wakeup_reader, 0, EVENT_READ, (self._on_wakeup, None))
        self.closed = False
        self.bugs = 0                   # handler errors contained

    def watch(self, sock, old_events: int, new_events: int, handler):
        """Change what the loop waits for on sock (0 means nothing)."""
        if old_events == 0:
            self.selector.register(sock, new_events, handler)
        elif new_events == 0:
            self.selector.unregister(sock)
        else:
            self.selector.modify(sock, new_events, handler)

    def call_at(self, when: float, function, *args, owner=None) -> Handle:
        handle = Handle((when, next(self._sequence), function, args, owner))
        heapq.heappush(self._timers, handle)
        return handle

    def call_later(self, delay: float, function, *args, owner=None) -> Handle:
        return self.call_at(time.monotonic() + delay, function, *args,
                            owner=owner)

    def call_soon(self, function, *args, owner=None) -> Handle:
        handle = Handle((0.0, 0, function, args, owner))
        self._ready.append(handle)
        return handle

    def call_soon_threadsafe(self, function, *args, owner=None) -> Handle:
        handle = self.call_soon(function, *args, owner=owner)   # atomic
        try:
            self._wakeup_writer.send(b"\0")
        except OSError:
            pass    # full (a wake-up is pending anyway) or closed
        return handle

    def threadsafe_callback(self, callback, owner=None):
        """A callable any thread may call with one argument; callback then
        runs with it in the loop (for resolvers' answers)."""
        def post(result):
            self.call_soon_threadsafe(callback, result, owner=owner)
        return post

    def run_once(self, limit: Optional[float] = None):
        """Wait for events (no longer than the next timer, or limit), then
        run what is due: socket handlers, calls made soon, timers."""
        timers = self._timers
        while timers and timers[0][2] is None:
            heapq.heappop(timers)       # cancelled: no reason to wake up
        timeout = limit
        if self._ready:
            timeout = 0
        elif self._timers:
            until_timer = max(0.0, self._timers[0][0] - time.monotonic())
            timeout = until_timer if limit is None else min(limit, until_timer)
        if timeout is not None and timeout > MAX_LOOP_WAIT:
            # epoll takes its timeout as milliseconds in a C int: a
            # --handshake-timeout of a month would overflow it.
            timeout = MAX_LOOP_WAIT
        for key, mask in self.selector.select(timeout):
            callback, owner = key.data
            try:
                callback(mask)
            except Exception:
                self._contain_bug(owner)
        ready = self._ready
        if ready:
            for _ in range(len(ready)):     # not those that these calls add
                _, _, function, args, owner = ready.popleft()
                if function is not None:
                    try:
                        function(*args)
                    except Exception:
                        self._contain_bug(owner)
        if not timers:
            return
        now = time.monotonic()
        while timers and timers[0][0] <= now:
            _, _, function, args, owner = heapq.heappop(timers)
            if function is not None:
                try:
                    function(*args)
                except Exception:
                    self._contain_bug(owner)

    def _contain_bug(self, owner):
        """A bug met while handling one event: log it, close what it
        belongs to, and keep serving everyone else."""
        self.bugs += 1
        log.exception("internal error; closing what it concerns")
        if owner is not None:
            try:
                owner.close_after_bug()
            except Exception:
                log.exception("internal error while closing after a bug")

    def _on_wakeup(self, mask):
        try:
            while self._wakeup_reader.recv(4096):
                pass
        except OSError:
            pass

    def close(self):
        if self.closed:
            return
        self.closed = True
        self.selector.close()
        for sock in (self._wakeup_reader, self._wakeup_writer):
            sock.close()
        self._timers = []
        self._ready.clear()


# =============================================================================
# Connection: states, buffers, deadlines
# =============================================================================

RECV_BUFFER_SIZE = 256 * 1024       # one buffer for the whole loop
READS_PER_WAKEUP = 4                # fewer selects under load, still fair
READS = range(READS_PER_WAKEUP)     # made once: the relay's loop
HIGH_WATER = 256 * 1024             # stop reading a side past this backlog
MAX_CONNECT_ATTEMPTS = 16           # addresses of one name tried in turn
MAX_PARALLEL_ATTEMPTS = 2           # ... at most this many at once (fds)
BIND_BACKLOG = 8                    # BIND: strangers wait here to be refused
BIND_ACCEPTS_PER_WAKEUP = 8
BIND_LOGGED_REFUSALS = 8            # strangers logged per BIND, then counted
CLOSING_LINGER = 2.0                # seconds a last reply may take to drain
PAUSED_CHECK_INTERVAL = 1.0         # seconds between looks at a paused socket

# The splice relay (Linux, Python 3.10+): socket -> pipe -> socket in the
# kernel.  Each moving direction borrows a pipe from a small pool.
HAVE_SPLICE = hasattr(os, "splice")
SPLICE_FLAGS = (getattr(os, "SPLICE_F_MOVE", 1)
                | getattr(os, "SPLICE_F_NONBLOCK", 2))
PIPE_CAPACITY = 256 * 1024          # asked for with F_SETPIPE_SZ
F_SETPIPE_SZ = 1031                 # fcntl.h (Linux)
PIPE_POOL_SIZE = 64                 # idle pipes kept for the next transfer

# Errors that mean "the peer reset or vanished": the other side is reset too.
RESET_ERRORS = frozenset((errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED))


class State(enum.Enum):
    PROXY_HEADER = "proxy header"   # a balancer's PROXY header is due
    HANDSHAKE = "handshake"         # the SocksHandshake talks with the client
    RESOLVING = "resolving"         # waiting for the resolver
    CONNECTING = "connecting"       # outbound connect() or BEGIN_DIR pending
    BINDING = "binding"             # BIND: waiting for the peer to connect
    RELAYING = "relaying"           # bytes flow both ways
    ASSOCIATED = "associated"       # UDP ASSOCIATE: datagrams flow
    CLOSING = "closing"             # flushing a last reply, then closing
    CLOSED = "closed"

    # Members are singletons: hashing by identity is right, and unlike
    # Enum's own __hash__ it costs no Python call (PHASES[state], sets).
    __hash__ = object.__hash__


# The states as module names too: the hot paths read a global some ten
# times faster than an attribute of an Enum class.
(PROXY_HEADER, HANDSHAKE, RESOLVING, CONNECTING, BINDING, RELAYING,
 ASSOCIATED, CLOSING, CLOSED) = State


class Phase(NamedTuple):
    """What a state allows: where it may move, and its deadline."""
    moves_to: frozenset
    deadline: object            # seconds, or the Settings attribute giving
                                # them (whose None means no deadline), or
                                # KEEP_DEADLINE
    on_deadline: str            # the Connection method called when it passes


KEEP_DEADLINE = object()        # entering the state keeps the running deadline


# The state machine in one place.  _enter() checks every move against it (a
# move it does not list is a bug, and ends that connection) and sets the new
# state's deadline; the deadline handler is looked up here too.  A
# connection starts in HANDSHAKE, or in PROXY_HEADER when a balancer's header
# comes first, with the deadline set at accept (the header and the whole
# handshake share it), and close() ends any state.
PHASES = {
    PROXY_HEADER: Phase(
        frozenset((HANDSHAKE, CLOSED)),
        None, "_proxy_header_overdue"),
    HANDSHAKE: Phase(
        frozenset((RESOLVING, CONNECTING, BINDING,
                   ASSOCIATED, CLOSING, CLOSED)),
        KEEP_DEADLINE, "_handshake_overdue"),
    RESOLVING: Phase(
        frozenset((CONNECTING, BINDING, CLOSING,
                   CLOSED)),
        "connect_timeout", "_lookup_overdue"),
    CONNECTING: Phase(
        frozenset((RELAYING, CLOSING, CLOSED)),
        "connect_timeout", "_connect_overdue"),
    BINDING: Phase(
        frozenset((RELAYING, CLOSING, CLOSED)),
        "connect_timeout", "_bind_overdue"),
    RELAYING: Phase(
        frozenset((CLOSED,)), "idle_timeout", "_idle_check"),
    ASSOCIATED: Phase(
        frozenset((CLOSED,)), "idle_timeout", "_idle_check"),
    CLOSING: Phase(
        frozenset((CLOSED,)), CLOSING_LINGER, "close"),
    CLOSED: Phase(frozenset(), None, "close"),
}

class _Flow:
    """One direction of a relay: bytes read from source, written to sink.

    Each direction closes on its own (OpenSSH's input/output states): EOF
    from the source stops reading, the backlog drains, then the sink gets
    shutdown(SHUT_WR).
    """
    __slots__ = ("source", "sink", "pending", "pipe", "in_pipe", "reading",
                 "sink_shut", "count")

    def __init__(self, source, sink):
        self.source = source
        self.sink = sink            # None until the target is connected
        self.pending = bytearray()  # bytes read but not yet written
        self.pipe = None            # (read fd, write fd) while splicing
        self.in_pipe = 0            # bytes waiting in that pipe
        self.reading = True         # source not at EOF yet
        self.sink_shut = False      # sink has been shut down for writing
        self.count = 0              # bytes delivered to the sink

    def backlog(self) -> int:
        return len(self.pending) + self.in_pipe


class Connection:
    """One client and, once it asks for one, its target.

    The handshake (a SocksHandshake, or an HttpTunnelHandshake on an
    --http-tunnel port: HANDSHAKES by the listener's kind) decides what the
    client asked for; the Connection owns the sockets, the lookup, the
    connect attempts, the relay and the close.  The state moves only through
    _enter(), checked against PHASES,
    which also sets the state's deadline.  What the sockets wait for is
    derived from the state and the buffers after every event
    (_update_interest), never toggled by hand.
    """
    __slots__ = ("server", "loop", "settings", "number", "client",
                 "peer", "remote_address", "client_is_local",
                 "client_key", "login_throttled",
                 "target", "state", "handshake", "request", "candidates",
                 "attempts", "last_reply", "lookup", "deadline",
                 "deadline_at", "idle_mark",
                 "dir_stream", "upstream", "downstream", "client_events",
                 "target_events", "client_handler", "target_handler",
                 "paused_check", "outcome", "opened", "bind_listener",
                 "bind_peers", "bind_refusals", "association", "kind",
                 "balancer", "balancer_peer", "balancers_own",
                 "proxy_buffer")

    def __init__(self, server: "Server", client: socket.socket,
                 peer, remote_address, number: int,
                 client_key=None, family: int = socket.AF_INET,
                 kind: str = "socks", balancer=None):
        self.server = server
        self.loop = server._loop
        self.settings = settings = server.settings     # fixed from accept on
        self.number = number
        self.client = client
        self.peer = peer            # (host, port), or a Unix socket's name
        # The client's address unless it is on this host (loopback or Unix).
        self.remote_address = remote_address
        self.client_is_local = remote_address is None
        # Whose share of lookups and logins this is (Server._client_key).
        self.client_key = client_key
        self.login_throttled = False
        self.target = None
        self.kind = kind
        # A balancer's address (--proxy-protocol-from): its PROXY header
        # comes first and names the client (Server._admit_proxied).
        self.balancer = balancer
        self.balancer_peer = None   # the balancer's end, once it named one
        self.balancers_own = False  # its header named no client
        self.proxy_buffer = None if balancer is None else bytearray()
        self.state = HANDSHAKE if balancer is None else PROXY_HEADER
        self.handshake = self._new_handshake(family)
        self.request = None
        self.candidates = ()        # addresses still to try, in order
        self.attempts = ()          # sockets connecting at once
        self.dir_stream = None          # the BEGIN_DIR stream of a CONNECT_DIR
        self.bind_listener = None   # BIND: where the peer is to connect
        self.bind_peers = None      # BIND: who may (None: anyone allowed)
        self.bind_refusals = 0      # BIND: strangers turned away
        self.association = None     # UDP ASSOCIATE: its UdpAssociation
        self.last_reply = Reply.GENERAL_FAILURE
        self.lookup = None
        self.deadline = None        # the Handle of the timer armed for it
        self.deadline_at = None     # when the state's deadline is
        self.idle_mark = 0
        self.upstream = _Flow(client, None)     # client -> target
        self.downstream = _Flow(None, client)   # target -> client
        self.client_events = 0
        self.target_events = 0
        self.client_handler = (self, self)     # self(mask): __call__
        self.target_handler = (self.on_target_event, self)
        self.paused_check = None    # the timer of a look at an unwatched socket
        self.outcome = "closed during handshake" if balancer is None \
            else "closed before its PROXY header"
        self.opened = time.monotonic()
        self._set_deadline(settings.handshake_timeout)
        self._update_interest()

    # -- state and deadlines ------------------------------------------------

    def _enter(self, state: State):
        if state not in PHASES[self.state].moves_to:
            log.error("conn %d: internal error: no move from %s to %s",
                      self.number, self.state.value, state.value)
            self.outcome += ", then an internal error"
            self.close()
            return
        if log.isEnabledFor(logging.DEBUG):
            log.debug("conn %d: %s -> %s", self.number, self.state.value,
                      state.value)
        self.state = state
        if state is State.RELAYING or state is State.CLOSING:
            self.server._replied(self)      # the handshake's last reply
        deadline = PHASES[state].deadline
        if isinstance(deadline, str):
            deadline = getattr(self.settings, deadline)
        if deadline is not KEEP_DEADLINE:
            self._set_deadline(deadline)
        if state is CLOSING:
            # Nothing more goes to the client after the last reply: once it
            # is flushed, the client's side is shut down (_flush does it).
            self.downstream.reading = False
            self._flush(self.downstream)

    def _set_deadline(self, seconds):
        """Move the connection's one deadline (None: no deadline).  A timer
        already armed for no later is kept: when it fires early it re-arms
        for the deadline (so a state change costs no work in the heap)."""
        if seconds is None:
            self.deadline_at = None
            if self.deadline is not None:
                # Let go of the armed timer's call: an idle tunnel then
                # holds no more than the heap's slot, until it comes due.
                self.deadline.cancel()
                self.deadline = None
            return
        self.deadline_at = when = time.monotonic() + seconds
        timer = self.deadline
        if timer is None or timer[0] > when:
            if timer is not None:
                timer.cancel()
            self.deadline = self.loop.call_at(when, self._deadline_passed,
                                              owner=self)

    def _deadline_passed(self):
        self.deadline = None
        when = self.deadline_at
        if when is None:
            return
        if when > time.monotonic():     # moved since the timer was armed
            self.deadline = self.loop.call_at(when, self._deadline_passed,
                                              owner=self)
            return
        self.deadline_at = None
        self._run_guarded(getattr(self, PHASES[self.state].on_deadline))

    def _handshake_overdue(self):
        self._refuse(Reply.GENERAL_FAILURE, "handshake timed out")

    def _proxy_header_overdue(self):
        self._end_with(b"", "no whole PROXY header within the handshake "
                       "timeout")

    def _lookup_overdue(self):
        self._refuse(Reply.TTL_EXPIRED, "name lookup timed out")

    def _connect_overdue(self):
        self._refuse(Reply.TTL_EXPIRED, "connect timed out")

    def _bind_overdue(self):
        self._refuse(Reply.TTL_EXPIRED, "BIND: no connection from the peer "
                     "in time" + self._strangers_refused())

    def _idle_check(self):
        # Idle means no byte (or datagram) moved since the last check:
        # re-arming here instead of on every chunk keeps the relay path
        # free of timers.
        association = self.association
        if association is None:
            moved = self.upstream.count + self.downstream.count
        else:
            moved = association.datagrams_up + association.datagrams_down
        if moved != self.idle_mark:
            self.idle_mark = moved
            self._set_deadline(self.settings.idle_timeout)
        else:
            self.outcome += ", then idle timeout"
            self.close()

    # -- events from the loop -------------------------------------------------

    # Every way into a connection (socket events, deadlines, resolver
    # answers, connect attempts) goes through _run_guarded: a socket error
    # there ends this connection only, and the sockets' interest is derived
    # anew.

    def _run_guarded(self, work, *args):
        if self.state is CLOSED:
            return
        try:
            work(*args)
        except OSError as error:
            self._fail(error)
        self._update_interest()

    def on_client_event(self, mask: int):
        # _run_guarded spelled out, and the two hot cases first: bytes from
        # a tunnel's client, and the handshake's messages.
        state = self.state
        if state is CLOSED:
            return
        try:
            if mask == EVENT_READ and state is RELAYING \
                    and not self.settings.splice and self.upstream.reading:
                self._relay(self.upstream)
            elif mask == EVENT_READ and state is HANDSHAKE:
                self._handshake_readable()
            else:
                self._client_event(mask)
        except OSError as error:
            self._fail(error)
        self._update_interest()

    # The loop calls the connection itself for its client socket: a bound
    # method kept per connection would cost 64 bytes more each.
    __call__ = on_client_event
    def on_target_event(self, mask: int):
        if mask == EVENT_READ and self.state is RELAYING \
                and not self.settings.splice and self.downstream.reading:
            try:
                self._relay(self.downstream)
            except OSError as error:
                self._fail(error)
            self._update_interest()
            return
        self._run_guarded(self._target_event, mask)

    def close_after_bug(self):
        """The loop met a bug in one of this connection's handlers."""
        if self.state is not CLOSED:
            self.outcome += ", then an internal error"
            self.close()

    def _client_event(self, mask: int):
        if mask & EVENT_WRITE:
            self._flush(self.downstream)
        if mask & EVENT_READ and self.state is not CLOSED:
            self._client_readable()

    def _target_event(self, mask: int):
        if mask & EVENT_WRITE:
            self._flush(self.upstream)
        if mask & EVENT_READ and self.state is RELAYING:
            self._forward(self.downstream)

    def _client_readable(self):
        state = self.state
        if state is RELAYING:
            self._forward(self.upstream)
        elif state is HANDSHAKE:
            self._handshake_readable()
        elif state is PROXY_HEADER:
            self._read_proxy_header()
        elif state is RESOLVING or state is CONNECTING or state is BINDING:
            self._read_early_data()
        elif state is CLOSING or state is ASSOCIATED:
            # Discard what the client still sends, so that closing does not
            # turn into a reset that could destroy the reply in flight; an
            # association ends with its connection (RFC 1928 §6), and what
            # comes on that connection meanwhile means nothing.
            if not self.client.recv(RECV_BUFFER_SIZE):
                self.close()

    def _fail(self, error: OSError):
        if isinstance(error, (BlockingIOError, InterruptedError)):
            return
        reason = "socket error: %s" % errno.errorcode.get(error.errno, error)
        if self.state in (RELAYING, CLOSING, ASSOCIATED):
            self.outcome += ", then " + reason
        else:
            self.outcome = reason
        # Pass a reset on as a reset (resetting the side that failed is
        # harmless, and the error may have shown on either socket).
        reset = error.errno in RESET_ERRORS
        self.close(reset_client=reset, reset_target=reset)

    # -- a balancer's PROXY header ----------------------------------------------

    def _read_proxy_header(self):
        """Read the header (never past it by more than its limit); once it
        is whole, the connection is its client's, and what follows it goes
        to a handshake for that client."""
        buffer = self.proxy_buffer
        data = self.client.recv(MAX_PROXY_HEADER_BYTES - len(buffer))
        if not data:
            self.close()
            return
        buffer += data
        result = parse_proxy_header(buffer)
        if result is NEED_MORE:
            return
        if isinstance(result, Rejected):
            self._end_with(b"", "from a --proxy-protocol-from source: "
                           + result.reason)
            return
        header = result.message
        refusal = self.server._admit_proxied(self, header)
        if refusal:
            self._end_with(b"", refusal)
            return
        self.proxy_buffer = None
        self._enter(HANDSHAKE)
        self.outcome = "closed during handshake"
        family = self.client.family
        if header.source is not None:
            family = socket.AF_INET if header.source[0].version == 4 \
                else socket.AF_INET6
        self.handshake = self._new_handshake(family)
        # The header counts toward the handshake's byte limit.
        self.handshake.received = result.used
        rest = bytes(buffer[result.used:])
        if rest:
            self._on_handshake_bytes(rest)

    # -- the handshake --------------------------------------------------------

    def _handshake_readable(self):
        data = self.client.recv(self.handshake.room())
        if not data:
            self.outcome = "client closed during handshake"
            self.close()
            return
        self._on_handshake_bytes(data)

    def _new_handshake(self, client_family: int):
        """The handshake this listener's clients speak (HANDSHAKES)."""
        settings = self.settings
        credentials = settings.credentials
        return HANDSHAKES[self.kind](
            credentials_required=bool(credentials),
            authenticate=self._authenticate if credentials else None,
            safe_socks=settings.safe_socks, client_family=client_family,
            local_address=self._local_address,
            served_commands=served_commands(settings.enable_bind,
                                            settings.enable_udp))

    def _on_handshake_bytes(self, data: bytes):
        handshake = self.handshake
        replies = handshake.receive(data)
        if handshake.state is not HandshakeState.DONE:
            if replies:
                self._send_to_client(replies)
            return
        request = handshake.request
        settings = self.settings
        if handshake.unsafe and settings.safe_socks:
            self.server._warn_unsafe_socks(handshake.version,
                                           self.client_label())
        elif settings.test_socks and handshake.unsafe is not None:
            self._log_request_safety()
        if request is None:
            if self.login_throttled:
                handshake.refusal = "too many failed logins from this client"
            if handshake.protocol is Protocol.HTTP:
                # The page is what the client gets: it counts as bytes down.
                self.downstream.count += len(replies)
            self._end_with(replies, handshake.refusal)
            return
        if replies:
            self._send_to_client(replies)
        self.request = request
        handshake.local_address = None      # (the page's; kept per tunnel)
        if request.command in RELAYED_COMMANDS and handshake.early_data:
            self.upstream.pending = bytearray(handshake.early_data)
        self._start_request(request)

    def _authenticate(self, username: bytes, password: bytes) -> bool:
        """RFC 1929 against the credentials, unless this client failed too
        often lately (the README's "SOCKS5 methods with credentials")."""
        throttle = self.server._login_throttle
        now = time.monotonic()
        if throttle.allowed and throttle.blocked(self.client_key, now):
            self.login_throttled = True
            return False
        if self.settings.credentials.check(username, password):
            return True
        if throttle.allowed and throttle.failed(self.client_key, now):
            log.warning("%s: %d failed logins in %.0f s: its logins are "
                        "refused for a while", self.client_label(),
                        throttle.allowed, throttle.window)
        return False

    def client_label(self) -> str:
        """The client as the log shows it (made only when a line needs it):
        its address, and the balancer's when a PROXY header named it."""
        if not isinstance(self.peer, tuple):
            return "unix socket"
        label = format_address(self.peer)
        if self.balancers_own:
            return label + " (the balancer's own)"
        if self.balancer_peer is not None:
            return "%s via %s" % (label, format_address(self.balancer_peer))
        return label

    def _local_address(self) -> str:
        """Where the client reached us, as a proxy URL writes it."""
        where = self.client.getsockname()
        if isinstance(where, str):
            return "localhost" + where      # curl's form for a Unix socket
        return format_address(where)

    def _log_request_safety(self):
        handshake = self.handshake
        log.info("conn %d: %s %s request for %s is %s", self.number,
                 handshake.version.name, handshake.command.name,
                 self._destination_for_log(),
                 "unsafe (the client gave an IP address and may be "
                 "leaking DNS)" if handshake.unsafe
                 else "safe (torsocksd resolves the name)")

    # -- serving a request: one dispatch ---------------------------------------

    def _start_request(self, request: Request):
        """Look the destination up (or take its IP literal), then hand the
        answers to the command's handler."""
        lookups = self.server._lookups
        if request.command is Command.RESOLVE_PTR:
            self._start_lookup(lookups.reverse, request.address)
        elif request.address is not None:
            self._serve_answers((request.address,))
        elif request.command is Command.UDP_ASSOCIATE:
            # A name there stands for the client itself: never looked up
            # (the README's "UDP ASSOCIATE request" row).
            self._serve_answers(())
        else:
            self._start_lookup(lookups.lookup, request.host)

    def _serve_answers(self, answers):
        handler = COMMAND_HANDLERS.get(self.request.command)
        if handler is None:     # a command with no handler is never relayed
            self._refuse(Reply.COMMAND_NOT_SUPPORTED, "command %s has no "
                         "handler" % self.request.command.name)
            return
        handler(self, answers)

    # -- resolving ------------------------------------------------------------

    def _start_lookup(self, method, query):
        """Ask through the Server's LookupScheduler, in this client's
        share."""
        self._enter(RESOLVING)
        self.lookup = method(self.client_key, query, self._resolved,
                             owner=self)
        if self.lookup is None:
            self._refuse(Reply.GENERAL_FAILURE, "too many pending name "
                         "lookups from this client")

    def _resolved(self, result: ResolverResult):
        self._run_guarded(self._on_resolved, result)

    def _on_resolved(self, result: ResolverResult):
        if self.state is not RESOLVING:
            return      # timed out or closed meanwhile
        self.lookup = None
        if result.error is not None:
            self._refuse(result.error, result.reason or "name lookup failed")
        else:
            self._serve_answers(result.answers)

    def _answer_resolve(self, answers):
        """RESOLVE answers: the first address of the preferred family (IPv4
        unless told otherwise), else the first of the other; SOCKS4 carries
        IPv4 only (the README's "RESOLVE" rows)."""
        usable = self.server._usable_addresses(answers)
        if self.request.version is Version.SOCKS4:
            usable = [a for a in usable if a.version == 4]
        if not usable:
            self._refuse(Reply.HOST_UNREACHABLE, "no answer the client can "
                         "use (SOCKS4 or --no-ipv6 takes IPv4 only)")
            return
        preferred = self.settings.preferred_ip_version or 4
        best = next((a for a in usable if a.version == preferred), usable[0])
        self._answer(self.handshake.resolve_reply(best), "answered RESOLVE")

    def _answer_resolve_ptr(self, names):
        """The first name a reply can carry (a later one may be fine when
        the first is not ASCII, say), else the failure reply."""
        failed = reply = socks5_reply(Reply.HOST_UNREACHABLE)
        for name in names:
            reply = socks5_hostname_reply(name)
            if reply != failed:
                break
        self._answer(reply, "answered RESOLVE_PTR")

    def _answer(self, reply: bytes, outcome: str):
        self._send_to_client(reply)
        self.outcome = outcome
        self._enter(CLOSING)

    # -- connecting: Happy Eyeballs (RFC 8305) --------------------------------

    def _start_connecting(self, addresses):
        """Connect to the first of addresses that answers.  Attempts start
        one happy_eyeballs_delay apart (at once when one fails), families
        alternate, the first connected wins; the whole try has one deadline."""
        server = self.server
        addresses = server._usable_addresses(addresses)
        if not addresses:
            self._refuse(Reply.NOT_ALLOWED, "IPv6 is off (--no-ipv6)")
            return
        self.candidates = happy_eyeballs_order(
            addresses, self.settings.preferred_ip_version
        )[:MAX_CONNECT_ATTEMPTS]
        self.attempts = []
        self._enter(CONNECTING)
        self._attempt_next()

    def _attempt_next(self):
        server = self.server
        port = self.request.port
        while self.candidates:
            address = self.candidates.pop(0)
            refusal = self.settings.destination_policy.refusal(
                self.client_is_local, address, port)
            if refusal:
                self.last_reply = Reply.NOT_ALLOWED
                continue
            try:
                target = server._outbound_socket(address)
            except OSError as error:
                self.last_reply = reply_for_errno(error.errno)
                log.warning("cannot open an outbound socket: %s", error)
                continue
            try:
                error_number = target.connect_ex((str(address), port))
            except OSError as error:
                error_number = error.errno or errno.EINVAL
            if error_number not in (0, errno.EINPROGRESS):
                target.close()
                self.last_reply = reply_for_errno(error_number)
                continue
            self.attempts.append(target)
            if error_number == 0 or (address.is_loopback
                                     and is_connected(target)):
                # A loopback connect is done inside connect(): no need to
                # wait for the loop to say so.
                self._connected(target, 0)
                return
            self.loop.watch(target, 0, EVENT_WRITE, (functools.partial(
                self._run_guarded, self._attempt_ready, target), self))
            if self.candidates and len(self.attempts) < MAX_PARALLEL_ATTEMPTS:
                self.loop.call_later(
                    self.settings.happy_eyeballs_delay, self._run_guarded,
                    self._attempt_overdue, target, owner=self)
            return
        if not self.attempts:
            self._refuse(self.last_reply, "could not connect: %s" % (
                self.last_reply.name.lower().replace("_", " ")))

    def _attempt_overdue(self, target):
        """An attempt is still pending after the delay: start the next too,
        unless MAX_PARALLEL_ATTEMPTS are out (then a failure starts it)."""
        if self.state is CONNECTING and target in self.attempts \
                and len(self.attempts) < MAX_PARALLEL_ATTEMPTS:
            self._attempt_next()

    def _attempt_ready(self, target, mask):
        if self.state is not CONNECTING or target not in self.attempts:
            return
        error_number = target.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error_number:
            self.attempts.remove(target)
            self.loop.watch(target, EVENT_WRITE, 0, None)
            target.close()
            self.last_reply = reply_for_errno(error_number)
            self._attempt_next()
            return
        self._connected(target, EVENT_WRITE)

    def _connected(self, target, events: int):
        """target won: it becomes the connection's target (watched for
        reading, as it was for writing while connecting), the others go."""
        self.attempts.remove(target)
        self._abandon_attempts()
        self.candidates = ()
        self.target = target
        self.loop.watch(target, events, EVENT_READ, self.target_handler)
        self.target_events = EVENT_READ
        with_nodelay(target)
        self.upstream.sink = target
        self.downstream.source = target
        self._start_relaying()

    def _abandon_attempts(self):
        for attempt in self.attempts:
            self.loop.watch(attempt, EVENT_WRITE, 0, None)
            attempt.close()
        self.attempts = ()

    def _drop_target(self):
        if self.target_events:
            self.loop.watch(self.target, self.target_events, 0, None)
            self.target_events = 0
        self.target.close()
        self.target = None

    def _start_relaying(self, reply: Optional[bytes] = None):
        """The target answered: the success reply (or BIND's second
        reply), then the early data."""
        self._enter(RELAYING)
        self.outcome = "relayed"
        self._send_to_client(reply or self.handshake.success_reply())
        self._flush(self.upstream)

    # -- BIND: one inbound connection from the peer (RFC 1928 §6) -------------

    def _start_binding(self, addresses):
        """Listen where DST.ADDR can reach us, tell the client where (the
        first reply), then wait, for connect_timeout, for the one
        connection from DST.ADDR (the README's "BIND" rows)."""
        request, settings = self.request, self.settings
        usable = self.server._usable_addresses(ip_of(a) for a in addresses)
        if request.version is Version.SOCKS4:
            usable = [a for a in usable if a.version == 4]
        if not usable:
            self._refuse(Reply.HOST_UNREACHABLE, "BIND: no address of "
                         "DST.ADDR this client can use")
            return
        policy = settings.destination_policy
        allowed = [a for a in happy_eyeballs_order(
                       usable, settings.preferred_ip_version)
                   if not policy.refusal(self.client_is_local, a,
                                         request.port)]
        if not allowed:
            self._refuse(Reply.NOT_ALLOWED, "BIND: DST.ADDR is not allowed")
            return
        # An unspecified DST.ADDR (0.0.0.0, ::) names no peer: anyone the
        # policy allows may connect, and DST.PORT is the port wanted (an
        # unprivileged one), as Dante's client and server have it.
        wildcard = any(a.is_unspecified for a in allowed)
        wanted = request.port if wildcard and request.port >= 1024 else 0
        try:
            self.bind_listener = listener = open_bind_listener(
                allowed[0], settings.outbound_addresses,
                settings.outbound_interface, wanted)
        except OSError as error:
            self._refuse(reply_for_errno(error.errno),
                         "BIND: cannot listen: %s" % error)
            return
        if not wildcard:
            self.bind_peers = frozenset(allowed)
        self.loop.watch(listener, 0, EVENT_READ, (functools.partial(
            self._run_guarded, self._bind_accept), self))
        self._enter(BINDING)
        self.outcome = "bound, no peer came"    # until one comes
        where = listener.getsockname()
        self._send_to_client(self.handshake.bound_reply(ip_of(where[0]),
                                                        where[1]))

    def _bind_accept(self, mask):
        if self.state is not BINDING:
            return
        for _ in range(BIND_ACCEPTS_PER_WAKEUP):
            try:
                peer_socket, peer = self.bind_listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                if error.errno == errno.ECONNABORTED:
                    continue
                self._refuse(Reply.GENERAL_FAILURE,
                             "BIND: accept failed: %s" % error)
                return
            refusal = self._bind_peer_refusal(ip_of(peer[0]))
            if refusal is None:
                self._bind_accepted(peer_socket, peer)
                return
            # Others are turned away and the wait goes on (the SOCKS4 note
            # and Dante end the BIND instead).
            close_socket(peer_socket, reset=True)
            self.bind_refusals += 1
            if self.bind_refusals <= BIND_LOGGED_REFUSALS:
                log.info("conn %d: BIND: refused a connection from %s: %s",
                         self.number,
                         self.server._scrub(format_address(peer)), refusal)

    def _bind_peer_refusal(self, address) -> Optional[str]:
        if self.bind_peers is not None:
            return None if address in self.bind_peers else "not DST.ADDR"
        return self.settings.destination_policy.refusal(
            self.client_is_local, address, self.request.port)

    def _bind_accepted(self, peer_socket, peer):
        """The peer came: the second reply names it, then bytes flow as
        for CONNECT."""
        self._drop_bind_listener()
        peer_socket.setblocking(False)
        with_nodelay(peer_socket)
        self.target = peer_socket
        self.upstream.sink = peer_socket
        self.downstream.source = peer_socket
        self._start_relaying(self.handshake.bound_reply(ip_of(peer[0]),
                                                        peer[1]))
        self.outcome += self._strangers_refused()

    def _strangers_refused(self) -> str:
        """For the log line: how many others BIND turned away."""
        if not self.bind_refusals:
            return ""
        return " (%d stranger(s) refused)" % self.bind_refusals

    def _drop_bind_listener(self):
        self.loop.watch(self.bind_listener, EVENT_READ, 0, None)
        self.bind_listener.close()
        self.bind_listener = None

    # -- UDP ASSOCIATE: datagrams while this connection lives (RFC 1928 §7) ----

    def _start_association(self, addresses):
        """Open the association's UDP socket and tell the client where it
        is.  addresses holds DST.ADDR when the client gave an address (all
        zeros: not known yet), nothing when it gave a name; DST.PORT, when
        not 0, is the only port its datagrams may come from (the README's
        "UDP ASSOCIATE" rows)."""
        if self.client.family not in (socket.AF_INET, socket.AF_INET6):
            self._refuse(Reply.COMMAND_NOT_SUPPORTED,
                         "UDP ASSOCIATE needs a TCP connection")
            return
        # The peer: the client a PROXY header named, when one did (its
        # datagrams come straight to us, not through the balancer).
        client_host = ip_of(self.peer[0])
        named = ip_of(addresses[0]) if addresses else None
        if named is not None and not named.is_unspecified \
                and named != client_host:
            self._refuse(Reply.NOT_ALLOWED, "UDP ASSOCIATE for a client "
                         "on another host than the connection's")
            return
        server = self.server
        refusal = server._udp_refusal(self.client_key, self.settings)
        if refusal:
            self._refuse(Reply.GENERAL_FAILURE, refusal)
            return
        try:
            self.association = UdpAssociation(self, client_host,
                                              self.request.port)
        except OSError as error:
            self._refuse(reply_for_errno(error.errno),
                         "UDP ASSOCIATE: no socket: %s" % error)
            return
        server._udp_opened(self.association)
        self._enter(ASSOCIATED)
        self.outcome = "associated"
        where = self.association.client_side.getsockname()
        self._send_to_client(self.handshake.bound_reply(ip_of(where[0]),
                                                        where[1]))

    # -- CONNECT_DIR: a BEGIN_DIR stream on a one-hop circuit ------------------

    def _open_dir_stream(self, addresses):
        """Open a BEGIN_DIR stream to the relay whose ORPort is at the first
        allowed address; the success reply waits for RELAY_CONNECTED."""
        server = self.server
        port = self.request.port
        policy = self.settings.destination_policy
        for address in server._usable_addresses(addresses):
            if not policy.refusal(self.client_is_local, address, port):
                break
        else:
            self._refuse(Reply.NOT_ALLOWED, "no relay address allowed")
            return
        self._enter(CONNECTING)
        guarded = self._run_guarded
        try:
            self.dir_stream = server._tor_link_pool().open_stream(
                str(address), port,
                functools.partial(guarded, self._dir_stream_connected),
                functools.partial(guarded, self._dir_stream_data),
                functools.partial(guarded, self._dir_stream_ended),
                fingerprint=self.settings.router_pins.get(
                    (str(ip_of(address)), port)))
        except OSError as error:    # no socket, or no stream id left
            self._refuse(reply_for_errno(error.errno),
                         "cannot reach the relay: %s" % error)
            return
        self.dir_stream.on_writable = functools.partial(guarded, self._flush,
                                                    self.upstream)

    def _dir_stream_connected(self):
        if self.state is CONNECTING:
            self.upstream.sink = self.dir_stream
            self._start_relaying()

    def _dir_stream_data(self, data: bytes):
        self.downstream.pending += data
        self._flush(self.downstream)

    def _dir_stream_ended(self, reason: int):
        if self.state is CONNECTING:
            # The relay unreachable is a connect error like any other (the
            # README's "connect errors" row); else the relay's END reason.
            error_number = self.dir_stream.end_errno
            self._refuse(reply_for_errno(error_number) if error_number
                         else reply_for_end_reason(reason),
                         "the relay ended the stream (%s): %s"
                         % (end_reason_name(reason), self.dir_stream.end_detail))
            return
        # Tor streams have no half-close: once the relay ends the stream,
        # nothing more goes to it, and what came drains to the client.
        self.dir_stream = None
        upstream = self.upstream
        upstream.reading, upstream.sink_shut = False, True
        upstream.pending = bytearray()
        self.downstream.reading = False
        self._flush(self.downstream)

    def _read_early_data(self):
        """Client bytes that arrive while the answer is being worked out:
        kept for the target of a CONNECT, dropped after a RESOLVE (as Tor
        does).  Reading on also shows a client that resets meanwhile."""
        data = self.client.recv(HIGH_WATER)
        if not data and self.state is BINDING:
            # Nobody is left to hear of the peer: the BIND ends, as in Dante.
            self.outcome = "client closed before the peer came" \
                + self._strangers_refused()
            self.close()
        elif not data:
            if self.request.command in LOOKUP_COMMANDS:
                # Nobody will read the answer: the lookup is cancelled, as
                # Tor drops a request whose client hangs up.
                self.outcome = "client closed before the answer"
                self.close()
                return
            self.upstream.reading = False   # a CONNECT's half-close
        elif self.request.command in RELAYED_COMMANDS:
            self.upstream.pending += data

    # -- relaying ---------------------------------------------------------------

    def _forward(self, flow: _Flow):
        """Pass on what flow's source has to its sink."""
        if not flow.reading:
            return      # a stale event after the source ended
        if self.settings.splice and self.target is not None:
            self._splice(flow)
        else:
            self._relay(flow)

    def _relay(self, flow: _Flow):
        """Move what the source has to the sink: read into the loop's one
        buffer, send at once, keep only what the sink would not take."""
        view = self.loop.recv_view
        source, sink = flow.source, flow.sink
        for _ in READS:
            room = HIGH_WATER - len(flow.pending)
            if room <= 0:
                return
            try:
                size = source.recv_into(view, room if room < RECV_BUFFER_SIZE
                                        else RECV_BUFFER_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            if size == 0:
                flow.reading = False
                self._flush(flow)
                return
            if flow.pending:
                flow.pending += view[:size]
                self._flush(flow)
                continue
            try:
                sent = sink.send(view[:size])
            except (BlockingIOError, InterruptedError):
                sent = 0
            flow.count += sent
            if sent < size:
                flow.pending += view[sent:size]
                return
            if size < room and size < RECV_BUFFER_SIZE:
                return      # the source is drained for now

    def _splice(self, flow: _Flow):
        """The zero-copy relay: source -> pipe -> sink with os.splice, so
        the bytes never enter Python.  Bytes queued before (early data)
        go first."""
        if flow.pending:
            self._flush(flow)
            if flow.pending:
                return
        if flow.pipe is None:
            flow.pipe = self.server._take_pipe()
        write_end = flow.pipe[1]
        source = flow.source.fileno()
        try:
            for _ in range(READS_PER_WAKEUP):
                room = PIPE_CAPACITY - flow.in_pipe
                if room <= 0:
                    return
                try:
                    size = os.splice(source, write_end, room,
                                     flags=SPLICE_FLAGS)
                except (BlockingIOError, InterruptedError):
                    return
                if size == 0:
                    flow.reading = False
                    self._flush(flow)
                    return
                flow.in_pipe += size
                self._drain_pipe(flow)
                if flow.in_pipe:
                    return
        finally:
            self._release_pipe(flow)

    def _drain_pipe(self, flow: _Flow):
        try:
            sent = os.splice(flow.pipe[0], flow.sink.fileno(), flow.in_pipe,
                             flags=SPLICE_FLAGS)
        except (BlockingIOError, InterruptedError):
            return
        flow.in_pipe -= sent
        flow.count += sent

    def _release_pipe(self, flow: _Flow):
        # An idle connection holds no pipe: 4 fds only while data moves.
        if flow.pipe is not None and not flow.in_pipe \
                and self.state is not CLOSED:
            self.server._give_pipe(flow.pipe)
            flow.pipe = None

    def _flush(self, flow: _Flow):
        """Write what flow holds; shut the sink down once its source ended."""
        sink = flow.sink
        if sink is None:
            return
        if flow.in_pipe:
            self._drain_pipe(flow)
            if flow.in_pipe:
                return
            self._release_pipe(flow)
        pending = flow.pending
        if pending:
            try:
                sent = sink.send(pending)
            except (BlockingIOError, InterruptedError):
                return
            flow.count += sent
            if sent < len(pending):
                del pending[:sent]
                return
            flow.pending = bytearray()  # let a large backlog's memory go
        if not flow.reading and not flow.sink_shut:
            flow.sink_shut = True
            other = self.downstream if flow is self.upstream \
                else self.upstream
            if not other.sink_shut or self.state is CLOSING:
                try:
                    sink.shutdown(socket.SHUT_WR)
                except OSError:
                    pass    # the peer is gone already; reading will tell
            # else both ways are done: the close below sends the FIN
        if self.state is CLOSING:
            return
        if self.upstream.sink_shut and self.downstream.sink_shut:
            self.close()

    def _send_to_client(self, data: bytes):
        """Send a SOCKS reply, or queue what the socket does not take.  The
        byte counts are of relayed data only: a reply is not counted."""
        downstream = self.downstream
        if not downstream.pending and not downstream.in_pipe:
            try:
                sent = self.client.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            if sent == len(data):
                return          # the usual case: all of it, at once
            data = data[sent:]
        downstream.count -= len(data)
        downstream.pending += data
        self._flush(downstream)

    # -- refusing and closing -----------------------------------------------------

    def _refuse(self, reply: Reply, reason: str):
        """Send the client's refusal for reply, then close."""
        if self.state is RESOLVING and self.request is not None \
                and self.request.command in LOOKUP_COMMANDS:
            # Every failed lookup is "host unreachable" (the README's
            # "RESOLVE failure" row), whatever went wrong.
            reply = Reply.HOST_UNREACHABLE
        self._end_with(self.handshake.refuse(reply, reason)
                       if self.state is HANDSHAKE
                       else self.handshake.failure_reply(
                           reply, self.state is RESOLVING), reason)

    def _end_with(self, reply: bytes, reason: str):
        """Give up on the request: send reply (if any), then close."""
        self.outcome = "refused: " + reason
        self.candidates = ()
        if self.lookup is not None:
            self.lookup.cancel()
            self.lookup = None
        if self.attempts:
            self._abandon_attempts()
        if self.target is not None:
            self._drop_target()
        if self.dir_stream is not None:
            self.dir_stream.close()
            self.dir_stream = None
        if self.bind_listener is not None:
            self._drop_bind_listener()
        self.upstream.pending = bytearray()
        if not reply:
            self.close()
            return
        self._send_to_client(reply)
        self._enter(CLOSING)

    def close(self, reset_client=False, reset_target=False):
        """Close both sockets at once and forget the connection."""
        if self.state is CLOSED:
            return
        self.state = CLOSED   # from anywhere: no PHASES check
        self.deadline_at = None
        for timer in (self.deadline, self.paused_check):
            if timer is not None:
                timer.cancel()      # lets go of this connection at once
        self.deadline = self.paused_check = None
        loop = self.loop
        if self.client_events:
            loop.watch(self.client, self.client_events, 0, None)
        if self.target_events:
            loop.watch(self.target, self.target_events, 0, None)
        self.client_events = self.target_events = 0
        if self.lookup is not None:
            self.lookup.cancel()
        if self.attempts:
            self._abandon_attempts()
        if self.dir_stream is not None:
            self.dir_stream.close()     # RELAY_END DONE
            self.dir_stream = None
        if self.bind_listener is not None:
            self._drop_bind_listener()
        if self.association is not None:
            self.association.close()    # its sockets close at once
        close_socket(self.client, reset_client)
        if self.target is not None:
            close_socket(self.target, reset_target)
        for flow in (self.upstream, self.downstream):
            if flow.pipe is not None:
                self.server._drop_pipe(flow.pipe)
                flow.pipe = None
        self.server._connection_closed(self)

    # -- what the sockets wait for --------------------------------------------------

    def _update_interest(self):
        """Derive each socket's events from the state and the buffers."""
        state = self.state
        if state is CLOSED:
            return
        upstream, downstream = self.upstream, self.downstream
        if state is RELAYING and self.client_events == EVENT_READ \
                and self.target_events == EVENT_READ and upstream.reading \
                and downstream.reading and not upstream.pending \
                and not downstream.pending and not upstream.in_pipe \
                and not downstream.in_pipe:
            return      # a tunnel's steady state: both read, nothing waits
        client_events = target_events = 0
        if state is HANDSHAKE or state is CLOSING or state is ASSOCIATED:
            client_events = EVENT_READ      # closing: reading shows the end
        # A pipe that still holds bytes may be full whatever its count
        # says: wait for the sink before reading more into it.
        elif upstream.reading and not upstream.in_pipe \
                and len(upstream.pending) < HIGH_WATER:
            client_events = EVENT_READ
        if downstream.pending or downstream.in_pipe:
            client_events |= EVENT_WRITE
        if state is RELAYING and self.target is not None:
            if downstream.reading and not downstream.in_pipe \
                    and len(downstream.pending) < HIGH_WATER:
                target_events = EVENT_READ
            if upstream.pending or upstream.in_pipe:
                target_events |= EVENT_WRITE
        elif self.dir_stream is not None:
            # The relay's data waits in the circuit (no SENDME goes back)
            # while the client is slow to read.
            paused = downstream.backlog() >= HIGH_WATER
            if paused != self.dir_stream.paused:
                self.dir_stream.pause(paused)
        loop = self.loop
        if client_events != self.client_events:
            loop.watch(self.client, self.client_events, client_events,
                       self.client_handler)
            self.client_events = client_events
        if target_events != self.target_events:
            loop.watch(self.target, self.target_events, target_events,
                       self.target_handler)
            self.target_events = target_events
        if state is RELAYING and self.paused_check is None \
                and not (client_events and (target_events or self.dir_stream)):
            # A socket the loop does not watch cannot report a reset, so
            # look at it now and then while it is paused.
            self.paused_check = loop.call_later(
                PAUSED_CHECK_INTERVAL, self._run_guarded, self._check_paused,
                owner=self)

    def _check_paused(self):
        self.paused_check = None
        for sock, events in ((self.client, self.client_events),
                             (self.target, self.target_events)):
            if sock is not None and not events:
                error_number = sock.getsockopt(socket.SOL_SOCKET,
                                               socket.SO_ERROR)
                if error_number:
                    raise OSError(error_number, os.strerror(error_number))

    # -- the log line -------------------------------------------------------------

    def _destination_for_log(self) -> str:
        """host:port (IPv6 in brackets), or [scrubbed]:port unless
        --log-destinations; what the client wrote is clipped and escaped."""
        handshake = self.handshake
        host = self.server._scrub(clip_for_log(handshake.host))
        if ":" in host:
            host = "[%s]" % host.strip("[]")
        return "%s:%d" % (host, handshake.port)

    def log_outcome(self):
        if not log.isEnabledFor(logging.INFO):
            return
        handshake = self.handshake
        destination = ""
        if handshake.command is not None:
            destination = " %s %s" % (handshake.command.name,
                                      self._destination_for_log())
        version = handshake.version.name if handshake.version is not None \
            else "-"
        # A balancer's health check (its own connection, no request) is no
        # news: one every few seconds from each balancer.
        level = logging.DEBUG if self.balancers_own \
            and handshake.command is None else logging.INFO
        if not log.isEnabledFor(level):
            return
        log.log(level, "conn %d from %s: %s%s: %s; %d bytes up, %d down, "
                "%.3f s", self.number, self.client_label(), version,
                destination, self.outcome, self.upstream.count,
                self.downstream.count, time.monotonic() - self.opened)


# The handshake for each kind of listener: what its clients speak.
HANDSHAKES = {
    "socks": SocksHandshake,
    "http-tunnel": HttpTunnelHandshake,
}

# The one dispatch from a command to what serves it, once its destination's
# addresses (or, for RESOLVE_PTR, names) are known.  A command that is not
# here is refused, never connected.
COMMAND_HANDLERS = {
    Command.CONNECT: Connection._start_connecting,
    Command.CONNECT_DIR: Connection._open_dir_stream,
    Command.RESOLVE: Connection._answer_resolve,
    Command.RESOLVE_PTR: Connection._answer_resolve_ptr,
    Command.BIND: Connection._start_binding,
    Command.UDP_ASSOCIATE: Connection._start_association,
}


def with_nodelay(sock: socket.socket):
    """Small relayed writes go out at once: the client's own stack already
    decided when to send them."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass


def open_outbound_socket(address, sources=None,
                         interface: Optional[str] = None,
                         kind: int = socket.SOCK_STREAM) -> socket.socket:
    """A non-blocking socket (TCP, or UDP for kind SOCK_DGRAM) for traffic
    to address's family, bound to the source address of that family in
    sources ({4: "192.0.2.1", ...}) when there is one, and to interface
    (SO_BINDTODEVICE) when given."""
    family = socket.AF_INET if address.version == 4 else socket.AF_INET6
    sock = socket.socket(family, kind | SOCK_NONBLOCK)
    try:
        if not SOCK_NONBLOCK:
            sock.setblocking(False)
        source = (sources or {}).get(address.version)
        if source is not None:
            # Let connect() pick the port: bind() alone would reserve one
            # per connection and exhaust them.
            if IP_BIND_ADDRESS_NO_PORT is not None \
                    and kind == socket.SOCK_STREAM:
                sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((source, 0))
        bind_to_interface(sock, interface)
    except OSError:
        sock.close()
        raise
    return sock


# Made non-blocking at birth where the platform can (Linux): no ioctl after.
SOCK_NONBLOCK = getattr(socket, "SOCK_NONBLOCK", 0)


def is_connected(sock: socket.socket) -> bool:
    try:
        sock.getpeername()
    except OSError:
        return False
    return True


def bind_to_interface(sock: socket.socket, interface: Optional[str]):
    """Send (and, for a listener, receive) through interface only
    (--outbound-interface); nothing without one."""
    if not interface:
        return
    if SO_BINDTODEVICE is None:
        raise OSError(errno.EOPNOTSUPP, "--outbound-interface needs "
                      "SO_BINDTODEVICE (Linux)")
    sock.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, interface.encode())


def listening(sock: socket.socket, bind, backlog: int) -> socket.socket:
    """sock, once bind(sock) has bound it, listening and non-blocking; a
    step that fails closes it (and the error goes on)."""
    try:
        bind(sock)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def local_address_towards(address, interface: Optional[str] = None):
    """The source address (a sockaddr) this host would use to reach
    address: a UDP socket's connect() asks the routing table and sends
    nothing."""
    family = socket.AF_INET if address.version == 4 else socket.AF_INET6
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        bind_to_interface(probe, interface)
        probe.connect((str(address), 9))
        return probe.getsockname()


def open_bind_listener(towards, sources=None, interface: Optional[str] = None,
                       port: int = 0) -> socket.socket:
    """BIND's listening socket (the README's "BIND" rows): on the source
    address of towards's family in sources, else on the address this host
    would use to reach towards; on port when it is free, else on one the
    kernel picks."""
    source = (sources or {}).get(towards.version)
    local = (source, 0) if source is not None \
        else local_address_towards(towards, interface)
    family = socket.AF_INET if towards.version == 4 else socket.AF_INET6

    def bind(listener):
        bind_to_interface(listener, interface)
        try:
            listener.bind((local[0], port) + tuple(local[2:]))
        except OSError:
            if not port:
                raise
            listener.bind((local[0], 0) + tuple(local[2:]))
    return listening(socket.socket(family, socket.SOCK_STREAM), bind,
                     BIND_BACKLOG)


def scrubbed(destination: str) -> str:
    """What the log shows of a destination by default (Tor's SafeLogging
    habit; the README's "logging" row)."""
    return "[scrubbed]"


def close_socket(sock: socket.socket, reset: bool = False):
    if reset:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                            struct.pack("ii", 1, 0))
        except OSError:
            pass
    sock.close()


# =============================================================================
# UDP ASSOCIATE: the datagram header (RFC 1928 §7) and the association
# =============================================================================
# A client that asked UDP ASSOCIATE sends its datagrams, each behind a header
# naming the destination, to a UDP socket of ours (the reply's BND); the data
# goes on from a socket of the destination's family, and what a destination
# sends back returns to the client behind a header naming it.  The
# association lives as long as the TCP connection that asked for it.

MAX_UDP_DATAGRAM = 65507        # UDP's largest payload over IPv4: 65535 - 20 - 8
UDP_DATAGRAMS_PER_WAKEUP = 32   # read from one socket, then serve the others
UDP_QUEUE_DATAGRAMS = 64        # datagrams one association keeps waiting (a
UDP_QUEUE_BYTES = 256 * 1024    # full socket, a name being looked up); more
                                # are dropped: UDP may lose them anyway
UDP_PENDING_LOOKUPS = 8         # names one association looks up at once
UDP_MAX_DESTINATIONS = 1024     # destinations (and names) it remembers
UDP_NAME_TTL = 60.0             # seconds a looked-up name is used, then asked
UDP_FAILED_NAME_TTL = 10.0      # again; a failed one is dropped for this long
UDP_LOGGED_REFUSALS = 8         # refused destinations logged per association
UDP_FRAGMENT = "fragment (FRAG is not 00): no reassembly"
UDP_LITERAL_HEADER_ENDS = {AddressType.IPV4: 10, AddressType.IPV6: 22}


class UdpDatagram(NamedTuple):
    """A datagram header from the client: where its data goes."""
    address_type: AddressType
    host: str       # an IP literal as inet_ntop writes it, or the name
    port: int


def parse_udp_datagram(data) -> ParseResult:
    """The header of a client's datagram (RFC 1928 §7): RSV(0000) FRAG ATYP
    DST.ADDR DST.PORT, then the data; Parsed.used is where the data starts.
    FRAG other than 00 is rejected (an implementation without reassembly
    drops fragments, §7), and so is a name a CONNECT could not use.  A
    datagram is never answered: Rejected.reply is b""."""
    for index in range(min(len(data), 2)):
        if data[index] != 0:
            return Rejected(b"", "reserved bytes are not zero")
    if len(data) < 3:
        return NEED_MORE
    if data[2] != 0:
        return Rejected(b"", UDP_FRAGMENT)
    if len(data) < 4:
        return NEED_MORE
    address_type = data[3]
    if address_type == AddressType.IPV4:
        address_end = 8
    elif address_type == AddressType.IPV6:
        address_end = 20
    elif address_type == AddressType.DOMAIN:
        if len(data) < 5:
            return NEED_MORE
        address_end = 5 + data[4]
    else:
        return Rejected(b"", "unknown address type 0x%02x" % address_type)
    if len(data) < address_end + 2:
        return NEED_MORE
    if address_type == AddressType.DOMAIN:
        host = bytes(data[5:address_end]).decode("latin-1")
        problem = hostname_problem(host)
        if problem:
            return Rejected(b"", problem)
        literal = ip_literal(host)
        if literal is not None:
            # One spelling for each address, so that it is one destination.
            address = ip_of(literal)
            address_type = AddressType.IPV4 if address.version == 4 \
                else AddressType.IPV6
            host = str(address)
    else:
        family = socket.AF_INET if address_type == AddressType.IPV4 \
            else socket.AF_INET6
        host = socket.inet_ntop(family, bytes(data[4:address_end]))
    port = int.from_bytes(data[address_end:address_end + 2], "big")
    return Parsed(UdpDatagram(AddressType(address_type), host, port),
                  address_end + 2)


def udp_datagram_header(address, port: int) -> bytes:
    """The header that carries a destination's datagram back to the client:
    RSV FRAG 00, then its address (ATYP 1 or 4) and port (RFC 1928 §7)."""
    return bytes(3) + socks5_address(address, port)


class _UdpRoute(NamedTuple):
    """Where datagrams to one destination, as the client named it, go: the
    routes are keyed by a literal destination's whole header, or by (name,
    port)."""
    sock: Optional[socket.socket]   # None: they are dropped
    sockaddr: Optional[tuple]
    expires: Optional[float]        # for a name: when to look it up again
    dropped_as: str                 # the drop counter when sock is None


class UdpAssociation:
    """The datagrams of one UDP ASSOCIATE, relayed while its connection
    lives (the README's "UDP ASSOCIATE" rows).

    client_side  the UDP socket the client sends to: of the connection's
                 family, on the address the client reached, a port of the
                 kernel's
    outbound     {4: socket, 6: socket}, made on first use, from the
                 --outbound-address of the family and --outbound-interface

    The client is the connection's host: a datagram from another address,
    or from another port than DST.PORT (when not 0) or than the first
    datagram's, is dropped; so is one from a destination the client has not
    sent to.  The destination policy and the guard judge each destination
    once, when the client first names it; a name is looked up through the
    server's resolver at most once per UDP_NAME_TTL, its datagrams waiting
    meanwhile.  Every drop is counted; nothing is ever answered.
    """

    def __init__(self, connection: "Connection", client_host,
                 client_port: int):
        self.connection = connection
        self.server = connection.server
        self.loop = connection.loop
        self.settings = connection.settings
        self.client_host = client_host
        self.client_port = client_port
        self.client_address = None  # where replies go: the first datagram's
        self.routes = {}            # header bytes, or (name, port) -> route
        self.reply_headers = {}     # (host, port) as recvfrom gives it
        self.names = {}             # name -> (expires, addresses, failure)
        self.lookups = {}           # name -> resolver handle
        self.waiting = {}           # name -> deque of (port, data)
        self.send_queues = {}       # socket -> deque of (data, sockaddr)
        self.queued = self.queued_bytes = 0
        self.events = {}            # every socket -> what the loop waits for
        self.outbound = {}
        self.datagrams_up = self.datagrams_down = 0
        self.bytes_up = self.bytes_down = 0
        self.dropped = collections.Counter()    # reason -> datagrams
        self.refusals_logged = 0
        self.closed = False
        self.opened = time.monotonic()
        local = connection.client.getsockname()
        host = ip_of(local[0])
        if host.version == 4:
            sock, where = socket.socket(socket.AF_INET, socket.SOCK_DGRAM), \
                (str(host), 0)
        else:
            sock, where = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM), \
                (str(host), 0, 0, local[3])
        try:
            sock.setblocking(False)
            sock.bind(where)
        except OSError:
            sock.close()
            raise
        self.client_side = sock
        self._watch(sock, EVENT_READ)

    # -- the loop's ways in -----------------------------------------------------

    def _watch(self, sock, events: int):
        old = self.events.get(sock, 0)
        if events != old:
            self.loop.watch(sock, old, events, (functools.partial(
                self._on_event, sock), self))
            self.events[sock] = events

    def _on_event(self, sock, mask: int):
        if self.closed:
            return      # closed earlier in this round of events
        if mask & EVENT_WRITE:
            self._flush(sock)
        if mask & EVENT_READ and not self.closed:
            if sock is self.client_side:
                self._from_client()
            else:
                self._from_destinations(sock)

    def close_after_bug(self):
        self.connection.close_after_bug()

    # -- from the client ----------------------------------------------------------

    def _from_client(self):
        view = self.loop.recv_view
        receive = self.client_side.recvfrom_into
        for _ in range(UDP_DATAGRAMS_PER_WAKEUP):
            try:
                size, source = receive(view, MAX_UDP_DATAGRAM + 1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.dropped["receive error"] += 1
                continue
            if source != self.client_address and not self._is_client(source):
                self.dropped["not from the client"] += 1
            elif size > MAX_UDP_DATAGRAM:
                self.dropped["too large"] += 1
            else:
                self._relay_out(view[:size])

    def _is_client(self, source) -> bool:
        """Whether a datagram from source is the client's: its host, and
        its port once known.  The first one fixes where replies go."""
        if self.client_address is not None \
                or ip_of(source[0]) != self.client_host \
                or (self.client_port and source[1] != self.client_port):
            return False
        self.client_address = source
        return True

    def _relay_out(self, datagram):
        # An address header seen before is its own key: no parsing.  Its
        # zero RSV and FRAG are part of it, so a fragment misses.
        end = UDP_LITERAL_HEADER_ENDS.get(datagram[3]) \
            if len(datagram) > 3 else None
        if end is not None:
            route = self.routes.get(bytes(datagram[:end]))
            if route is not None:
                self._use(route, datagram[end:])
                return
        result = parse_udp_datagram(datagram)
        if not isinstance(result, Parsed):
            self.dropped["fragment" if result and result.reason
                         == UDP_FRAGMENT else "malformed"] += 1
            return
        destination, used = result.message, result.used
        key = (destination.host, destination.port) \
            if datagram[3] == AddressType.DOMAIN else bytes(datagram[:used])
        self._send_out(key, destination, datagram[used:])

    def _send_out(self, key, destination: UdpDatagram, data):
        route = self.routes.get(key)
        if route is None or (route.expires is not None
                             and route.expires <= time.monotonic()):
            route = self._new_route(key, destination)
            if route is None:       # its name is being looked up
                self._wait_for_name(destination, data)
                return
        self._use(route, data)

    def _use(self, route: "_UdpRoute", data):
        if route.sock is None:
            self.dropped[route.dropped_as] += 1
        elif self._send(route.sock, (data,), route.sockaddr):
            self.datagrams_up += 1
            self.bytes_up += len(data)

    # -- destinations -------------------------------------------------------------

    def _new_route(self, key, destination: UdpDatagram) \
            -> Optional[_UdpRoute]:
        """How to reach a destination the client names for the first time
        (or whose name is due to be looked up again), remembered under key:
        None while its name is being looked up."""
        host = destination.host
        if destination.address_type != AddressType.DOMAIN:
            return self._route_to(key, destination,
                                  (ipaddress.ip_address(host),), None)
        refusal = special_name_refusal(host)
        if refusal:
            return self._refused_route(key, destination, None, "refused",
                                       refusal)
        expires, addresses, failure = self.names.get(host, (0.0, (), None))
        if expires <= time.monotonic():
            return None
        if failure:
            return self._refused_route(key, destination, expires,
                                       "name not found", failure)
        return self._route_to(key, destination, addresses, expires)

    def _route_to(self, key, destination: UdpDatagram, addresses,
                  expires) -> _UdpRoute:
        """The first address the destination policy and the guard allow,
        in the order a CONNECT would try them."""
        settings, port = self.settings, destination.port
        refusal = "no usable address (--no-ipv6)"
        if port == 0:
            refusal, addresses = "destination port 0", ()
        for address in happy_eyeballs_order(
                self.server._usable_addresses(ip_of(a) for a in addresses),
                settings.preferred_ip_version):
            refusal = settings.destination_policy.refusal(
                self.connection.client_is_local, address, port)
            if refusal is None:
                sock = self._outbound_socket(address)
                if sock is None:
                    return self._refused_route(key, destination, expires,
                                               "send failed",
                                               "no outbound socket")
                self._expect_replies(address, port)
                return self._remember(self.routes, key, _UdpRoute(
                    sock, (str(address), port), expires, ""))
        return self._refused_route(key, destination, expires, "refused",
                                   refusal)

    def _refused_route(self, key, destination: UdpDatagram, expires,
                       dropped_as: str, reason: str) -> _UdpRoute:
        if self.refusals_logged < UDP_LOGGED_REFUSALS:
            self.refusals_logged += 1
            log.info("conn %d: UDP: dropping datagrams to %s: %s",
                     self.connection.number, self.server._scrub(
                         format_address(destination[1:])), reason)
        return self._remember(self.routes, key, _UdpRoute(
            None, None, expires, dropped_as))

    def _expect_replies(self, address, port: int):
        """Datagrams from address:port go to the client from now on, behind
        a header naming it."""
        family = socket.AF_INET if address.version == 4 else socket.AF_INET6
        # Remembered anew with each route to it, so that a destination's
        # header is forgotten only after its routes are.
        self._remember(self.reply_headers,
                       (socket.inet_ntop(family, address.packed), port),
                       udp_datagram_header(address, port))

    @staticmethod
    def _remember(table: dict, key, value):
        """table[key] = value, the oldest entry going past
        UDP_MAX_DESTINATIONS."""
        table.pop(key, None)
        if len(table) >= UDP_MAX_DESTINATIONS:
            del table[next(iter(table))]
        table[key] = value
        return value

    def _outbound_socket(self, address) -> Optional[socket.socket]:
        sock = self.outbound.get(address.version)
        if sock is None:
            settings = self.settings
            try:
                sock = open_outbound_socket(
                    address, settings.outbound_addresses,
                    settings.outbound_interface, socket.SOCK_DGRAM)
            except OSError as error:
                log.warning("conn %d: UDP: cannot open an outbound socket: "
                            "%s", self.connection.number, error)
                return None
            self.outbound[address.version] = sock
            self._watch(sock, EVENT_READ)
        return sock

    # -- names --------------------------------------------------------------------

    def _wait_for_name(self, destination: UdpDatagram, data):
        """Keep a datagram until its name is looked up: through the
        resolver every CONNECT uses, one lookup per name at a time."""
        name = destination.host
        if name not in self.lookups and \
                len(self.lookups) >= UDP_PENDING_LOOKUPS:
            self.dropped["queue full"] += 1
            return
        if not self._may_queue(len(data)):
            return
        self.waiting.setdefault(name, collections.deque()).append(
            (destination.port, bytes(data)))
        if name not in self.lookups:
            # In the client's share of the resolver, as a CONNECT's is.
            lookup = self.server._lookups.lookup(
                self.connection.client_key, name,
                functools.partial(self._resolved, name), owner=self)
            if lookup is None:
                self._on_resolved(name, TOO_MANY_LOOKUPS)
                return
            self.lookups[name] = lookup

    def _resolved(self, name: str, result: ResolverResult):
        if not self.closed:
            self._on_resolved(name, result)

    def _on_resolved(self, name: str, result: ResolverResult):
        self.lookups.pop(name, None)
        now = time.monotonic()
        if result.error is not None:
            entry = (now + UDP_FAILED_NAME_TTL, (),
                     result.reason or "name lookup failed")
        else:
            entry = (now + UDP_NAME_TTL, result.answers, None)
        self._remember(self.names, name, entry)
        for port, data in self.waiting.pop(name, ()):
            self.queued -= 1
            self.queued_bytes -= len(data)
            self._send_out((name, port), UdpDatagram(AddressType.DOMAIN,
                                                     name, port), data)

    # -- sending, and what waits for a full socket -----------------------------------

    def _may_queue(self, size: int) -> bool:
        if self.queued >= UDP_QUEUE_DATAGRAMS \
                or self.queued_bytes + size > UDP_QUEUE_BYTES:
            self.dropped["queue full"] += 1
            return False
        self.queued += 1
        self.queued_bytes += size
        return True

    def _send(self, sock, buffers, sockaddr) -> bool:
        """Send one datagram made of buffers; what a full socket cannot take
        now waits in a bounded queue.  Whether it went (or waits)."""
        if not self.send_queues.get(sock):
            try:
                sock.sendmsg(buffers, (), 0, sockaddr)
                return True
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                self.dropped["send failed"] += 1
                return False
        data = b"".join(buffers)
        if not self._may_queue(len(data)):
            return False
        self.send_queues.setdefault(sock, collections.deque()).append(
            (data, sockaddr))
        self._watch(sock, EVENT_READ | EVENT_WRITE)
        return True

    def _flush(self, sock):
        queue = self.send_queues.get(sock)
        while queue:
            data, sockaddr = queue[0]
            try:
                sock.sendto(data, sockaddr)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.dropped["send failed"] += 1
            queue.popleft()
            self.queued -= 1
            self.queued_bytes -= len(data)
        self._watch(sock, EVENT_READ)

    # -- from destinations ----------------------------------------------------------

    def _from_destinations(self, sock):
        view = self.loop.recv_view
        headers, client_side = self.reply_headers, self.client_side
        for _ in range(UDP_DATAGRAMS_PER_WAKEUP):
            try:
                size, source = sock.recvfrom_into(view, MAX_UDP_DATAGRAM + 1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:     # an ICMP error for an earlier datagram
                self.dropped["receive error"] += 1
                continue
            header = headers.get(source[:2])
            if header is None:
                self.dropped["not from a destination"] += 1
            elif size + len(header) > MAX_UDP_DATAGRAM:
                self.dropped["too large"] += 1
            elif self._send(client_side, (header, view[:size]),
                            self.client_address):
                self.datagrams_down += 1
                self.bytes_down += size

    # -- the end ----------------------------------------------------------------------

    def close(self):
        """Close every socket at once and log what the association did."""
        if self.closed:
            return
        self.closed = True
        for handle in self.lookups.values():
            if handle is not None:
                handle.cancel()
        for sock, events in self.events.items():
            if events:
                self.loop.watch(sock, events, 0, None)
            sock.close()
        self.events, self.send_queues, self.waiting = {}, {}, {}
        connection = self.connection
        connection.upstream.count += self.bytes_up
        connection.downstream.count += self.bytes_down
        self.server._udp_closed(self)
        dropped = ", ".join("%d %s" % (count, reason) for reason, count
                            in sorted(self.dropped.items())) or "none"
        log.info("conn %d: UDP association ended: %d datagrams up (%d "
                 "bytes), %d down (%d bytes); dropped: %s; %.3f s",
                 connection.number, self.datagrams_up, self.bytes_up,
                 self.datagrams_down, self.bytes_down, dropped,
                 time.monotonic() - self.opened)

    def counts(self) -> collections.Counter:
        """Datagrams and bytes each way, and drops by reason."""
        counts = collections.Counter(
            {"datagrams_up": self.datagrams_up,
             "datagrams_down": self.datagrams_down,
             "bytes_up": self.bytes_up, "bytes_down": self.bytes_down})
        # Server.stats() may ask from another thread while the loop adds a
        # reason: copy first (one step under the GIL), then read.
        for reason, count in list(self.dropped.items()):
            counts["dropped: " + reason] += count
        return counts


# =============================================================================
# Settings and the Server
# =============================================================================

ACCEPTS_PER_WAKEUP = 64             # accept in batches, then serve the others
MAX_KNOWN_PEERS = 4096              # peer addresses parsed once, then looked up
LOOP_CALL_WAIT = 30.0               # seconds reload() waits for the loop
RESOLVER_RETIRE_CHECK = 1.0         # seconds between looks at a replaced
                                    # resolver's pending lookups
ACCEPT_PAUSE = 1.0                  # seconds a listener rests after EMFILE & co
ACCEPT_PAUSE_ERRORS = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS,
                                 errno.ENOMEM))
LISTEN_BACKLOG = 1024
ON_LINUX = sys.platform.startswith("linux")
# Linux socket options, by number where an older Python lacks the name;
# None elsewhere.
SO_BINDTODEVICE = getattr(socket, "SO_BINDTODEVICE", 25 if ON_LINUX else None)
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT",
                                  24 if ON_LINUX else None)
DEFAULT_PORT = 9050
DEFAULT_ADDRESS = "127.0.0.1"       # never listen beyond this host unless told

# Every option a Server takes, and its default.  The command line's argparse
# destinations have the same names, so an option is written here, in the
# Server docstring and in build_argument_parser(), and nowhere else.
SETTING_DEFAULTS = {
    "listen": ((DEFAULT_ADDRESS, DEFAULT_PORT),),
    "handshake_timeout": 10.0,
    "connect_timeout": 10.0,
    "idle_timeout": None,
    "drain_timeout": 5.0,
    "max_connections": None,
    "max_per_client": None,
    "credentials": None,
    "credentials_file": None,
    "max_login_failures": 5,
    "client_policy": None,
    "destination_policy": None,
    "open_proxy": False,
    "safe_socks": False,
    "test_socks": False,
    "log_destinations": False,
    "happy_eyeballs_delay": 0.25,
    "preferred_ip_version": None,
    "ipv6": True,
    "outbound_addresses": (),
    "outbound_interface": None,
    "unix_mode": 0o600,
    "exit_when_idle": None,
    "splice": False,
    "router_pins": None,
    "nameservers": (),
    "resolver_threads": 8,
    "enable_bind": False,
    "enable_udp": False,
    "max_udp_associations": 256,
    "max_udp_per_client": 16,
    "http_tunnel": (),
    "proxy_protocol_from": (),
    "metrics": (),
}

# Each kind of listener, and the setting that lists where it listens (specs:
# (host, port) or "unix:/path").  A reload compares (kind, spec) pairs: a
# listener whose pair is still wanted keeps its socket.  A kind added later
# (another door into the server) adds a row here, a setting, and an accept
# handler in Server.SERVE_BY_KIND.
LISTENER_SETTINGS = {
    "socks": "listen",
    "http-tunnel": "http_tunnel",
    "metrics": "metrics",
}
# The Server method that takes a client a listener of each kind accepted
# (the SOCKS port's, _serve, unless named here).
SERVE_BY_KIND = {
    "metrics": "_serve_metrics",
}
# Kinds that show the server's state rather than serve clients: other hosts
# may reach them only as --allow says, and they keep no inetd client's
# process alive.
MONITORING_KINDS = frozenset(("metrics",))


class ConfigError(ValueError):
    """A configuration that cannot be used; problems lists every reason
    (one line each), and nothing was changed."""

    def __init__(self, problems):
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


class ReloadReport(NamedTuple):
    """What a reload did to the listeners (their describe() strings)."""
    opened: list
    closed: list
    kept: list


class _ListenerPlan(NamedTuple):
    listeners: list     # every listener once the reload is applied, in order
    opened: list        # opened for it
    removed: list       # to close once it is applied


class Settings:
    """A Server's options, checked and in the form the code uses.

    Settings(**options) takes the names of SETTING_DEFAULTS; what is not
    given keeps its default.  Policies and pins may be given as objects or
    as the command line writes them (lists of rules).  A Settings is never
    changed in place: replace() makes a new one, so a connection keeps the
    settings it was accepted under.
    """
    __slots__ = tuple(SETTING_DEFAULTS)

    def __init__(self, **options):
        unknown = set(options) - set(SETTING_DEFAULTS)
        if unknown:
            raise TypeError("unknown option(s): %s"
                            % ", ".join(sorted(unknown)))
        for name, default in SETTING_DEFAULTS.items():
            setattr(self, name, options.get(name, default))
        self._normalise()

    def replace(self, **changes) -> "Settings":
        """A copy with changes made."""
        options = {name: getattr(self, name) for name in SETTING_DEFAULTS}
        options.update(changes)
        return Settings(**options)

    def _normalise(self):
        self._check_numbers()
        if self.credentials is None and self.credentials_file:
            self.credentials = Credentials.from_file(self.credentials_file)
        if self.credentials is not None and not self.credentials:
            # Authentication never silently switches off.
            raise ValueError("credentials that name no user")
        if not isinstance(self.client_policy, ClientPolicy):
            self.client_policy = ClientPolicy(self.client_policy or ())
        if not isinstance(self.destination_policy, DestinationPolicy):
            self.destination_policy = DestinationPolicy(
                self.destination_policy or ())
        if not isinstance(self.outbound_addresses, dict):
            by_version = {}
            for source in self.outbound_addresses:
                by_version[ipaddress.ip_address(source).version] = str(source)
            self.outbound_addresses = by_version
        self.router_pins = {(str(ip_of(host)), port): fingerprint
                           for (host, port), fingerprint
                           in dict(self.router_pins or {}).items()}
        self.nameservers = tuple(self.nameservers)
        self.proxy_protocol_from = tuple(
            network if not isinstance(network, str) else parse_network(network)
            for network in self.proxy_protocol_from)
        for attribute in LISTENER_SETTINGS.values():
            setattr(self, attribute, listener_specs(getattr(self, attribute)))
        if self.max_connections is None:
            lookup_fds = dns_lookup_capacity(file_limit()) \
                if self.nameservers else self.resolver_threads
            self.max_connections = default_max_connections(lookup_fds,
                                                           self.splice)
        if self.splice and not HAVE_SPLICE:
            raise ValueError("the splice relay needs Linux and Python 3.10+")

    def _check_numbers(self):
        """Numbers a deadline, a count or a file mode can take: an infinite
        or NaN time would stop the loop's clock (inf overflows select(),
        NaN makes it spin), and a mode outside 0-777 would open a Unix
        socket to everyone (chmod(-1) sets every bit)."""
        for name in ("handshake_timeout", "connect_timeout", "idle_timeout",
                     "exit_when_idle"):
            value = getattr(self, name)
            if value is None and name in ("idle_timeout", "exit_when_idle"):
                continue        # None: never (a handshake always has one)
            if value is None or not (math.isfinite(value) and value > 0):
                raise ValueError("%s must be a number of seconds above 0, "
                                 "not %r" % (name, value))
        for name in ("drain_timeout", "happy_eyeballs_delay"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError("%s must be a number of seconds, 0 or more,"
                                 " not %r" % (name, value))
        for name in ("max_login_failures",):
            if getattr(self, name) < 0:
                raise ValueError("%s must be 0 or more" % name)
        if not 0 <= self.unix_mode <= 0o777:
            raise ValueError("unix_mode must be a mode from 0 to 0777, not %o"
                             % self.unix_mode)

    def new_resolver(self):
        """The resolver these settings ask for: the built-in DNS client with
        nameservers, else the system's resolver in a thread pool."""
        if self.nameservers:
            return DnsResolver(self.nameservers,
                               max_pending=dns_lookup_capacity(file_limit()))
        return SystemResolver(workers=self.resolver_threads)


def listener_specs(specs) -> tuple:
    """Listener specs in a form that compares and hashes: (host, port)
    tuples and "unix:/path" strings, each once, in the order given."""
    unique = []
    for spec in specs or ():
        if not isinstance(spec, str):
            host, port = spec
            spec = (str(host), int(port))
        if spec not in unique:
            unique.append(spec)
    return tuple(unique)


def wanted_listeners(settings: Settings):
    """(kind, spec) of every listener settings ask for, SOCKS first."""
    return [(kind, spec) for kind, attribute in LISTENER_SETTINGS.items()
            for spec in getattr(settings, attribute)]


def open_listener(host: str, port: int) -> socket.socket:
    """A non-blocking listening TCP socket on host:port (an IP literal or a
    name such as "localhost"; IPv6 sockets are IPv6-only, so "[::]" and
    "0.0.0.0" can listen side by side)."""
    infos = socket.getaddrinfo(host, port, socket.AF_UNSPEC, socket.SOCK_STREAM,
                               0, socket.AI_PASSIVE)
    family, kind, protocol, _, sockaddr = infos[0]

    def bind(listener):
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        listener.bind(sockaddr)
    return listening(socket.socket(family, kind, protocol), bind,
                     LISTEN_BACKLOG)


# The file descriptor budget.  A connection holds its client and up to
# MAX_PARALLEL_ATTEMPTS sockets while it connects (then one target); the
# splice relay lends a moving connection two pipes.  Lookups and Tor links
# hold their own; the rest (listeners, the loop, logs) is FDS_SPARE.  The
# default --max-connections is what the limit allows when every connection
# holds the most it can, so a new client is never left without a socket.
FDS_SPARE = 64
FDS_PER_CONNECTION = 1 + MAX_PARALLEL_ATTEMPTS
FDS_PER_SPLICED_CONNECTION = FDS_PER_CONNECTION + 4


def file_limit() -> int:
    """The soft RLIMIT_NOFILE (65536 for "unlimited")."""
    try:
        import resource
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError, ValueError):
        return 1024
    return 65536 if soft == resource.RLIM_INFINITY else soft


def dns_lookup_capacity(limit: int) -> int:
    """Lookups the built-in DNS client may have out at once (a socket
    each): a sixteenth of the fd limit, between 16 and 512."""
    return max(16, min(512, limit // 16))


def default_max_connections(lookup_fds: int = 0,
                            splice: bool = False) -> int:
    """As many connections as the fd limit allows (see FDS_SPARE)."""
    per_connection = FDS_PER_SPLICED_CONNECTION if splice \
        else FDS_PER_CONNECTION
    spare = FDS_SPARE + MAX_TOR_LINKS + lookup_fds
    return max(16, (file_limit() - spare) // per_connection)


class Listener:
    """A listening socket and what it serves: kind "socks" (the SOCKS
    port), "http-tunnel" (HTTP CONNECT), "metrics", or another door a
    feature adds (LISTENER_SETTINGS).  spec is how it was asked for ((host,
    port) or "unix:/path"; None when handed in), so that a reload can tell
    which listeners to keep."""
    __slots__ = ("sock", "kind", "spec", "unix_path", "address")

    def __init__(self, sock: socket.socket, kind: str = "socks", spec=None,
                 unix_path: Optional[str] = None):
        self.sock = sock
        self.kind = kind
        self.spec = spec
        self.unix_path = unix_path      # to unlink when it closes
        self.address = sock.getsockname()

    def close(self):
        self.sock.close()

    def describe(self) -> str:
        """Where it listens, and for what unless it is the SOCKS port."""
        where = format_address(self.address)
        return where if self.kind == "socks" else "%s (%s)" % (where,
                                                               self.kind)


# How the log names a listener of each kind (this + "listening on ADDR"; the
# address stays the line's last word, which scripts read).
# What the log says a listener of each kind does (the address comes last,
# for scripts that wait for it).
LISTENER_LABELS = {"socks": "listening on ",
                   "http-tunnel": "HTTP CONNECT listening on ",
                   "metrics": "listening for metrics on "}


def open_listener_for(spec, kind: str, unix_mode: int) -> Listener:
    """A Listener for spec: (host, port) or "unix:/path"."""
    if isinstance(spec, str) and spec.startswith("unix:"):
        path = spec[len("unix:"):]
        return Listener(open_unix_listener(path, unix_mode), kind, spec,
                        unix_path=path)
    return Listener(open_listener(*spec), kind, spec)


def literal_listener(kind: str, spec) -> list:
    """[(kind, family, address)] of a spec whose host is an IP literal, as
    exposure_problems() takes it; [] for a name or a Unix socket."""
    if isinstance(spec, str):
        return []
    address = ip_literal(spec[0])
    if address is None:
        return []
    family = socket.AF_INET if address.version == 4 else socket.AF_INET6
    return [(kind, family, (str(address), spec[1]))]


def exposure_problems(settings: Settings, listeners) -> list:
    """Why these listeners would expose more than settings allow: a proxy
    other hosts can reach needs a client policy or credentials (or
    open_proxy), and the metrics page other hosts can reach needs an
    --allow rule that lets the scraper in.  listeners: (kind, family,
    address) triples; an empty list means all is well."""
    problems = []
    for kind, family, address in listeners:
        if family not in (socket.AF_INET, socket.AF_INET6) \
                or ip_of(address[0]).is_loopback:
            continue
        if kind in MONITORING_KINDS:
            if not any(allowed for allowed, _ in settings.client_policy.rules):
                problems.append(
                    "refusing to serve metrics on %s without --allow: "
                    "anyone could read them (--allow the scraper's address)"
                    % format_address(address))
        elif not Server._guarded(settings):
            problems.append(
                "refusing to listen on %s without --allow/--deny or "
                "--credentials: anyone could use this proxy (give "
                "--open-proxy if that is meant)" % format_address(address))
    return problems


def client_key(address):
    """Whose share a client uses (per-client caps, lookups, failed logins):
    its IPv4 address, or its IPv6 /64, which one host usually has whole."""
    if address.version == 4:
        return address
    return ipaddress.IPv6Network((address, 64), strict=False)


def is_listening(sock: socket.socket) -> bool:
    """A listening socket, as opposed to one connected client (inetd
    "nowait", systemd Accept=yes)."""
    return bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))


class Server:
    """A torsocksd server: listeners, one event loop, its connections.

    Server(listen=[("127.0.0.1", 9050)], **options) binds nothing until
    bind(), start() or serve_forever().  A listen entry is (host, port) or
    "unix:/path".  start() binds and serves in a background thread,
    returning once the listeners are bound, so port 0 works: address and url
    then tell where.  stop() is safe to call twice, and the server is a
    context manager.  reload() applies a new configuration without dropping
    a connection.

    sockets               sockets to serve instead of binding: listening
                          ones are served as listeners; a connected one is
                          one client, and the server ends when it is done
                          (inetd "nowait", systemd Accept=yes); listen is
                          then not used
    resolver              an object with lookup() and reverse() (see
                          SystemResolver); default: from the options below
    config_source         a function that returns the configuration for
                          reload() without arguments: a Settings or a dict
                          of options (main() passes one that reads --config
                          and the command line again); it may raise
                          ConfigError, OSError or ValueError

    The options (keyword arguments; the command line's long options):
    listen                where to listen for SOCKS clients (as above)
    handshake_timeout     seconds from accept for the whole handshake
    connect_timeout       seconds for a name lookup, and for connecting
    idle_timeout          seconds a relayed connection may sit idle (None:
                          forever)
    drain_timeout         seconds open connections get after a shutdown
    max_connections       connections served at once; the listeners pause
    max_per_client        connections from one remote address (None: no cap;
                          never applied to loopback clients)
    credentials           a Credentials object: RFC 1929 becomes mandatory
    credentials_file      a file of user:password lines, read now and again
                          by reload()
    max_login_failures    failed logins one client (an address, an IPv6 /64)
                          may make within 30 s before its logins are
                          refused for a while (0: no limit)
    client_policy         a ClientPolicy, or [(allowed, CIDR), ...] (--allow,
                          --deny)
    destination_policy    a DestinationPolicy, or its rules (--policy)
    open_proxy            allow a non-loopback listener with neither a client
                          policy nor credentials
    safe_socks            refuse requests that give only an IP address
    test_socks            log whether each request was safe or unsafe
    log_destinations      log destinations instead of "[scrubbed]"
    happy_eyeballs_delay  seconds before the next address is tried too
    preferred_ip_version  4 or 6: which family to try and answer first
    ipv6                  False: never connect to or answer with IPv6
    outbound_addresses    source addresses for outbound connections, at
                          most one per family
    outbound_interface    a network interface to send from (SO_BINDTODEVICE)
    unix_mode             permissions of Unix listening sockets
    exit_when_idle        seconds without a connection after which
                          serve_forever() returns (inetd "wait")
    splice                relay with os.splice through pipes instead of
                          copying through Python (Linux, Python 3.10+)
    router_pins            {(relay IP, ORPort): 20-byte fingerprint}: a
                          CONNECT_DIR to that relay must prove that identity
    nameservers           [(IP, port), ...]: resolve with the built-in DNS
                          client instead of the system's resolver
    resolver_threads      threads for the system's resolver
    enable_bind           serve BIND (SOCKS4 and SOCKS5), off by default as
                          in Tor
    enable_udp            serve UDP ASSOCIATE (SOCKS5), off by default
    max_udp_associations  UDP associations open at once, in all
    max_udp_per_client    UDP associations open at once from one client
                          address (loopback clients included)
    http_tunnel           [(host, port) or "unix:/path", ...]: HTTP CONNECT
                          listeners (Tor's HTTPTunnelPort), bound with the
                          others; addresses lists them after the SOCKS ones
    proxy_protocol_from   CIDRs of load balancers whose connections begin
                          with a PROXY protocol header naming the client
    metrics               [(host, port), ...]: serve the Prometheus metrics
                          page (GET /metrics) there; one other hosts can
                          reach needs a client_policy that allows them
    """

    def __init__(self, listen=None, *, sockets=(), resolver=None,
                 config_source=None, **options):
        if listen is not None:
            options["listen"] = listen
        if sockets:
            options["listen"] = ()      # the sockets handed in are the ones
        self.settings = Settings(**options)
        self._metrics = MetricsTable()
        self._metrics_base = {}         # PUBLISHED_COUNTERS when taken
        self._closed_bytes = [0, 0]     # up, down: of connections closed
        self._metrics_exchanges = set()
        self._publish_timer = None      # with workers, while busy
        self._lookup_lock = threading.Lock()
        self._resolver_given = resolver is not None
        self.resolver = self._track(resolver if resolver is not None
                                    else self.settings.new_resolver())
        self._retiring_resolvers = []   # replaced, closed once idle
        self._config_source = config_source
        self._handed_in = list(sockets)
        self._listeners = []            # Listener records
        self._watched = set()           # those the loop waits on
        self._bound_by = None           # the process that made them
        self._loop = None
        self._thread = None             # the thread start() made
        self._loop_thread = None        # the thread in serve_forever()
        self._loop_done = threading.Event()
        self._stop_requested = False
        self._drain_deadline = None
        self._accepting = False
        self._exit_when_done = False    # serving handed-in clients only
        self._numbers = itertools.count(1)
        self._last_unsafe_warning = 0.0
        self._last_accept_error_log = 0.0
        self._per_client = collections.Counter()  # remote client key -> open
        self._peers = {}                # peer host -> (address, key, local)
        self._login_throttle = LoginThrottle(
            self.settings.max_login_failures)
        self._lookups = None            # LookupScheduler, once the loop is
        self._udp_associations = set()
        self._udp_per_client = collections.Counter()  # client -> associations
        self._udp_totals = collections.Counter()  # of closed associations
        self._pipes = []                # idle pipes for the splice relay
        self._tor_links = None          # TorLinkPool, once CONNECT_DIR is used
        self._last_busy = time.monotonic()
        self._connections = set()
        self._accepted = 0
        self._refused_at_accept = 0
        self._relayed_bytes = 0
        self._early_calls = []          # call_soon_threadsafe() before a loop
        self.addresses = []     # where the listeners listen, once bound

    # -- what an embedder uses ----------------------------------------------------

    @property
    def address(self):
        """Where the first listener listens: (host, port), or the path of a
        Unix socket."""
        first = self.addresses[0]
        return first if isinstance(first, str) else first[:2]

    @property
    def url(self) -> str:
        """The first listener as a proxy URL for clients that take one,
        names resolved by the proxy: socks5h://127.0.0.1:9050,
        socks5h://[::1]:9050, or socks5h://localhost/path for a Unix socket
        (curl's form)."""
        address = self.address
        if isinstance(address, str):
            return "socks5h://localhost" + address
        return "socks5h://" + format_address(address)

    def bind(self):
        """Create the listeners now (once): before forking workers, or
        before dropping privileges.  Refuses a listener other hosts can
        reach when there is no client policy and no credentials."""
        if self._bound_by is not None:
            return
        self._bound_by = os.getpid()
        settings = self.settings
        try:
            for sock in self._handed_in:
                if is_listening(sock):
                    self._listeners.append(Listener(sock))
            for kind, spec in wanted_listeners(settings):
                self._listeners.append(open_listener_for(
                    spec, kind, settings.unix_mode))
            problems = exposure_problems(settings, self._listener_triples(
                self._listeners))
            if problems:
                raise ConfigError(problems)
        except (OSError, ValueError):
            self._close_listeners()
            self._listeners, self._bound_by = [], None
            raise
        self.addresses = [listener.address for listener in self._listeners]
        for listener in self._listeners:
            self._log_listening(listener)

    def start(self):
        """Bind, then serve in a background thread; returns once bound."""
        self._prepare_loop()
        self._thread = threading.Thread(target=self.serve_forever,
                                        name="torsocksd", daemon=True)
        self._loop_thread = self._thread    # before stop() can ask
        self._thread.start()
        return self

    def serve_forever(self):
        """Serve until stop() (or, with only handed-in clients, until they
        are done); then close everything."""
        self._prepare_loop()
        self._loop_thread = threading.current_thread()
        try:
            while not self._finished():
                self._loop.run_once(self._wait_limit())
        finally:
            self._close_everything()
            self._loop_done.set()

    def stop(self, drain_timeout: Optional[float] = None, wait: bool = True):
        """Stop accepting at once, give open connections drain_timeout
        seconds to finish (default: the drain_timeout option), then close
        everything.  wait=False only asks, which a signal handler may do;
        else it waits for the loop to end.  Asked a second time, it ends
        the drain at once."""
        if drain_timeout is None:
            drain_timeout = self.settings.drain_timeout
        if self._stop_requested:
            drain_timeout = 0.0
        self._stop_requested = True
        self.call_soon_threadsafe(self._begin_drain, drain_timeout)
        if not wait or self._loop_thread is threading.current_thread():
            return
        if self._loop_thread is None:
            self._close_everything()    # never served
            return
        self._loop_done.wait()
        if self._thread is not None:
            self._thread.join()

    def call_soon_threadsafe(self, function, *args):
        """Run function(*args) in the server's loop, soon: the one way in
        from another thread or a signal handler.  Before the loop exists,
        the call waits for it."""
        loop = self._loop
        if loop is None:
            self._early_calls.append((function, args))
        else:
            loop.call_soon_threadsafe(function, *args)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()

    def stats(self) -> dict:
        """Counters since start: connections accepted, open now, refused at
        accept, and bytes relayed by connections that have closed; UDP
        associations open now, and their datagrams and bytes each way and
        drops by reason ("dropped: REASON"), open and closed ones alike."""
        udp = collections.Counter(self._udp_totals)
        for association in list(self._udp_associations):
            udp.update(association.counts())
        return {"accepted": self._accepted, "active": len(self._connections),
                "refused_at_accept": self._refused_at_accept,
                "relayed_bytes": self._relayed_bytes,
                "udp_associations": len(self._udp_associations),
                "udp": dict(udp),
                "listeners": [format_address(a) for a in self.addresses]}

    def reload(self, settings=None, **changes) -> "ReloadReport":
        """Apply a new configuration without dropping a connection.

        reload()                  the configuration read again: from the
                                  config_source, else the current settings
                                  with the credentials file read again
        reload(settings)          this Settings (or dict of options) whole
        reload(**changes)         the current settings with these options
                                  changed (listen=..., max_connections=...)

        Everything is checked first (the credentials file, the listeners
        it asks for, that no listener other hosts can reach lacks access
        control), and only then swapped in: new listeners open before
        removed ones close, and one whose kind and spec are unchanged keeps
        its socket.  Connections already open keep the settings they were
        accepted under; new ones get the new.  On any problem nothing
        changes, each problem is logged, and ConfigError (its problems
        attribute lists them) is raised.  Returns a ReloadReport.

        Safe from any thread and from a signal handler's posted call: the
        work is done in the server's loop, and this waits for it.
        """
        return self._run_in_loop(self._reload_now, settings, changes)

    # -- the loop -------------------------------------------------------------    # -- the loop -------------------------------------------------------------

    def _prepare_loop(self):
        """Bind, make the loop, serve the handed-in clients (once)."""
        if self._loop is not None:
            return
        self.bind()
        self._loop = loop = EventLoop()
        while self._early_calls:
            function, args = self._early_calls.pop(0)
            loop.call_soon(function, *args)
        for listener in self._listeners:
            listener.sock.setblocking(False)
        attach = getattr(self.resolver, "attach", None)
        if attach is not None:
            attach(loop)        # a resolver that runs in this loop
        self._lookups = LookupScheduler(self.resolver, loop)
        clients = [sock for sock in self._handed_in if not is_listening(sock)]
        if clients and all(listener.kind in MONITORING_KINDS
                           for listener in self._listeners):
            self._exit_when_done = True
        for client in clients:
            self._serve(client, client.getpeername(), handed_in=True)
        self._resume_accepting()
        if os.getpid() != self._bound_by:   # a forked worker: say so too
            for listener in self._listeners:
                self._log_listening(listener, "worker ")
        if self._metrics.slots > 1:
            self._publish_metrics()     # this worker's process numbers

    def _finished(self) -> bool:
        if self._exit_when_done and not self._connections:
            return True
        exit_when_idle = self.settings.exit_when_idle
        if exit_when_idle is not None and not self._connections:
            if time.monotonic() - self._last_busy >= exit_when_idle:
                log.info("idle for %.0f s: exiting", exit_when_idle)
                return True
        if self._drain_deadline is None:
            return False
        return (not self._connections
                or time.monotonic() >= self._drain_deadline)

    def _wait_limit(self) -> Optional[float]:
        """How long the loop may sleep for the server's own deadlines."""
        wake_at = self._drain_deadline
        exit_when_idle = self.settings.exit_when_idle
        if exit_when_idle is not None and not self._connections:
            wake_at = self._last_busy + exit_when_idle
        if wake_at is None:
            return None
        return max(0.0, wake_at - time.monotonic())

    # -- accepting ---------------------------------------------------------------

    def _resume_accepting(self):
        """Watch the listeners: those of clients when there is room for
        another connection, the monitoring ones always (a full server is
        worth a scrape)."""
        if self._drain_deadline is not None:
            return
        room = len(self._connections) < self.settings.max_connections
        for listener in self._listeners:
            if room or listener.kind in MONITORING_KINDS:
                self._watch_listener(listener)
        self._accepting = room

    def _watch_listener(self, listener: Listener):
        if listener not in self._watched:
            self._watched.add(listener)
            self._loop.watch(listener.sock, 0, EVENT_READ, (functools.partial(
                self._accept_from, listener), None))

    def _unwatch_listener(self, listener: Listener):
        if listener in self._watched:
            self._watched.discard(listener)
            if not self._loop.closed:
                self._loop.watch(listener.sock, EVENT_READ, 0, None)

    def _pause_accepting(self):
        for listener in self._listeners:
            if listener.kind not in MONITORING_KINDS:
                self._unwatch_listener(listener)
        self._accepting = False

    def _accept_from(self, listener: Listener, mask):
        self._keep_publishing()
        monitoring = listener.kind in MONITORING_KINDS
        serve = getattr(self, SERVE_BY_KIND.get(listener.kind, "_serve"))
        max_connections = self.settings.max_connections
        accept = listener.sock.accept
        for _ in range(ACCEPTS_PER_WAKEUP):
            if not monitoring and len(self._connections) >= max_connections:
                self._pause_accepting()
                return
            try:
                client, peer = accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                self._accept_failed(error, listener)
                return
            serve(client, peer, listener.kind)

    def _accept_failed(self, error: OSError, listener: Listener):
        self._metrics.add(("torsocksd_errors_total", "accept"))
        if error.errno in ACCEPT_PAUSE_ERRORS:
            # Out of descriptors or memory: rest instead of spinning.
            self._pause_accepting()
            self._unwatch_listener(listener)
            self._loop.call_later(ACCEPT_PAUSE, self._resume_accepting)
        now = time.monotonic()
        if now - self._last_accept_error_log >= 1.0:
            self._last_accept_error_log = now
            log.warning("accept failed: %s", error)

    def _serve(self, client: socket.socket, peer, kind: str = "socks",
               handed_in: bool = False):
        self._accepted += 1
        remote_address = None       # a Unix or loopback client is local
        key = "unix"
        balancer = None
        # socket.family is a property that builds an enum: read it once.
        family = client.family
        if family != socket.AF_UNIX:
            known = self._peers.get(peer[0])
            if known is None:
                address = ip_of(peer[0])
                known = address, client_key(address), address.is_loopback
                if len(self._peers) >= MAX_KNOWN_PEERS:
                    self._peers.clear()
                self._peers[peer[0]] = known
            address, key, local = known
            refusal = None
            if self.settings.proxy_protocol_from \
                    and self._is_balancer(address):
                # Its client is checked once its PROXY header names it.
                balancer = address
            else:
                refusal = self._client_refusal(address, key, local,
                                               handed_in)
            if refusal:
                self._refused_at_accept += 1
                self._metrics.add(("torsocksd_connections_total", "none",
                                   "none", "refused"))
                log.info("refused %s at accept: %s", format_address(peer),
                         refusal)
                client.close()
                return
            if balancer is None and not local:
                remote_address = address
            with_nodelay(client)
        client.setblocking(False)
        try:
            connection = Connection(self, client, peer, remote_address,
                                    next(self._numbers), key, family, kind,
                                    balancer)
        except OSError as error:
            log.warning("cannot serve a new connection: %s", error)
            client.close()
            return
        if remote_address is not None:
            self._per_client[key] += 1
        self._connections.add(connection)

    def _client_refusal(self, address, key, local: bool,
                        handed_in: bool) -> Optional[str]:
        settings = self.settings
        if not settings.client_policy.permits(address):
            return "not allowed by --allow/--deny"
        if local:
            return None
        if handed_in and not self._guarded(settings):
            # inetd and Accept=yes hand us a client instead of a listener:
            # the rule for an exposed listener holds for it too.
            return ("a client from another host needs --allow/--deny or "
                    "--credentials (or --open-proxy)")
        if (settings.max_per_client is not None
                and self._per_client[key] >= settings.max_per_client):
            return "more than %d connections from one %s" % (
                settings.max_per_client,
                "address" if address.version == 4 else "/64")
        return None

    def _is_balancer(self, address) -> bool:
        """Whether address is a --proxy-protocol-from source."""
        return any(network_contains(network, address)
                   for network in self.settings.proxy_protocol_from)

    def _admit_proxied(self, connection: Connection,
                       header: ProxyHeader) -> Optional[str]:
        """Make a balancer's connection its client's once the PROXY header
        names the client: the checks _serve makes at accept, then the
        client's address, locality, count and label.  A header that names
        no client (the balancer's own connection, as its health checks)
        leaves it the balancer's, and the balancer is not checked.  The
        refusal, or None."""
        balancer = connection.balancer
        connection.balancer_peer = connection.peer
        if header.source is None:
            address = balancer
            connection.balancers_own = True
        else:
            address = ip_of(header.source[0])
            connection.peer = (str(address), header.source[1])
        key = client_key(address)
        # On this host only if the balancer is, and the client is on the
        # balancer's host.
        local = address.is_loopback and balancer.is_loopback
        if header.source is not None:
            # A client the balancer hands us is another host's as one that
            # inetd hands in: it needs a client policy or credentials.
            refusal = self._client_refusal(address, key, local, True)
            if refusal:
                self._refused_at_accept += 1
                return refusal
        connection.client_key = key
        if not local:
            connection.remote_address = address
            connection.client_is_local = False
            self._per_client[key] += 1
        return None

    def _connection_closed(self, connection: Connection):
        self._connections.discard(connection)
        self._last_busy = time.monotonic()
        self._relayed_bytes += connection.upstream.count \
            + connection.downstream.count
        self._count_closed(connection)
        if connection.remote_address is not None:
            key = connection.client_key
            self._per_client[key] -= 1
            if not self._per_client[key]:
                del self._per_client[key]
        connection.log_outcome()
        if not self._accepting:
            self._resume_accepting()

    # -- UDP associations: the caps, and the counts of those that closed -------

    def _udp_refusal(self, client, settings: Settings) -> Optional[str]:
        """Why a new association for client (its client key) would be one
        too many."""
        if len(self._udp_associations) >= settings.max_udp_associations:
            return "UDP ASSOCIATE: %d associations open already" \
                % settings.max_udp_associations
        if self._udp_per_client[client] >= settings.max_udp_per_client:
            return "UDP ASSOCIATE: %d associations open from this client " \
                "already" % settings.max_udp_per_client
        return None

    def _udp_opened(self, association: "UdpAssociation"):
        self._udp_associations.add(association)
        self._udp_per_client[association.connection.client_key] += 1

    def _udp_closed(self, association: "UdpAssociation"):
        self._udp_associations.discard(association)
        client = association.connection.client_key
        self._udp_per_client[client] -= 1
        if not self._udp_per_client[client]:
            del self._udp_per_client[client]
        self._udp_totals.update(association.counts())

    # -- pipes for the splice relay -------------------------------------------

    def _take_pipe(self):
        if self._pipes:
            return self._pipes.pop()
        read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.fcntl(write_end, F_SETPIPE_SZ, PIPE_CAPACITY)
        except OSError:
            pass    # the default 64 KiB will do
        return read_end, write_end

    def _give_pipe(self, pipe):
        """Return an empty pipe to the pool."""
        if len(self._pipes) < PIPE_POOL_SIZE:
            self._pipes.append(pipe)
        else:
            self._drop_pipe(pipe)

    @staticmethod
    def _drop_pipe(pipe):
        for fd in pipe:
            os.close(fd)

    # -- outbound -----------------------------------------------------------------

    def _usable_addresses(self, addresses):
        if self.settings.ipv6:
            return list(addresses)
        return [a for a in addresses if a.version == 4]

    def _outbound_socket(self, address) -> socket.socket:
        settings = self.settings
        return open_outbound_socket(address, settings.outbound_addresses,
                                    settings.outbound_interface)

    def _tor_link_pool(self) -> "TorLinkPool":
        """The open links to Tor relays, for CONNECT_DIR (made on first use)."""
        if self._tor_links is None:
            self._tor_links = TorLinkPool(
                self._loop, timeout=self.settings.connect_timeout,
                outbound_socket=self._outbound_socket, scrub=self._scrub)
        return self._tor_links

    # -- shutting down -----------------------------------------------------------

    def _begin_drain(self, drain_timeout: float):
        if self._drain_deadline is None:
            log.info("shutting down: %d connection(s) open, %.1f s to finish",
                     len(self._connections), drain_timeout)
            sd_notify("STOPPING=1")
        self._pause_accepting()
        self._close_listeners()     # new clients get "refused", not a wait
        deadline = time.monotonic() + drain_timeout
        if self._drain_deadline is None or deadline < self._drain_deadline:
            self._drain_deadline = deadline

    def _close_listeners(self):
        for listener in self._listeners:
            self._close_listener(listener)

    def _close_listener(self, listener: Listener):
        # Only the process that made a Unix listener removes its path (a
        # forked worker leaves it to its parent).
        self._unwatch_listener(listener)
        listener.close()
        if listener.unix_path is not None and self._bound_by == os.getpid():
            try:
                os.unlink(listener.unix_path)
            except OSError:
                pass
        listener.unix_path = None

    @staticmethod
    def _guarded(settings: Settings) -> bool:
        """Whether other hosts may be served: a client policy, credentials,
        or --open-proxy said on purpose."""
        return bool(settings.open_proxy or settings.client_policy
                    or settings.credentials)

    @staticmethod
    def _listener_triples(listeners):
        return [(listener.kind, listener.sock.family, listener.address)
                for listener in listeners]

    @staticmethod
    def _log_listening(listener: Listener, who: str = ""):
        log.info("%s%s%s", who, LISTENER_LABELS.get(
            listener.kind, "listening for %s on " % listener.kind),
            format_address(listener.address))

    def _close_everything(self):
        loop = self._loop
        if loop is None:
            self._close_listeners()
            self._close_resolver()
            return
        if loop.closed:
            return
        self._pause_accepting()
        if self._drain_deadline is None:
            self._drain_deadline = time.monotonic()    # keeps listeners shut
        for connection in list(self._connections):
            connection.outcome += ", cut at shutdown"
            connection.close()
        for exchange in list(self._metrics_exchanges):
            exchange.close()
        if self._tor_links is not None:
            self._tor_links.close()     # while the loop is still open
        loop.close()
        self._close_listeners()
        while self._pipes:
            self._drop_pipe(self._pipes.pop())
        self._close_resolver()

    def _close_resolver(self):
        for resolver in [self.resolver] + self._retiring_resolvers:
            resolver.close()
        self._retiring_resolvers = []

    # -- metrics ---------------------------------------------------------------

    def metrics_text(self) -> bytes:
        """The metrics page: the Prometheus text format 0.0.4, with every
        worker's numbers when there are workers.  Call it in the loop (the
        metrics listener does) or when the server is not running."""
        self._publish_metrics()
        return render_metrics(self._metrics)

    def _share_metrics(self, slots: int):
        """Keep the metrics in memory that processes forked from now on
        share, one slot each (slot 0: this one); see _take_metrics_slot."""
        table = MetricsTable(slots)
        table.mine[:] = self._metrics.mine
        self._metrics = table

    def _take_metrics_slot(self, slot: int):
        """In a forked worker: count in slot from now on, carrying on from
        what a worker that had it before published."""
        table = self._metrics
        table.take_slot(slot)
        self._metrics_base = {key: table.get(key)
                              for key in PUBLISHED_COUNTERS}
        self._closed_bytes = [0, 0]

    def _track(self, resolver) -> "TrackedResolver":
        return TrackedResolver(resolver, self._count_lookup,
                               self._lookup_lock)

    def _count_lookup(self, result):
        """A lookup ended (result None: cancelled); under the lookup lock,
        since answers come from resolver threads."""
        if result is None:
            kind = "cancelled"
        elif result.error is None:
            kind = "answered"
        elif result.error is Reply.HOST_UNREACHABLE:
            kind = "not_found"
        else:
            kind = "failed"
        self._metrics.add(("torsocksd_lookups_total", kind))

    def _replied(self, connection: Connection):
        self._metrics.observe("torsocksd_handshake_seconds",
                              time.monotonic() - connection.opened)

    def _count_closed(self, connection: Connection):
        metrics = self._metrics
        metrics.add(("torsocksd_connections_total",)
                    + connection_labels(connection))
        for kind in connection_errors(connection.outcome):
            metrics.add(("torsocksd_errors_total", kind))
        self._closed_bytes[0] += max(0, connection.upstream.count)
        self._closed_bytes[1] += max(0, connection.downstream.count)

    def _publish_metrics(self):
        """Write the numbers that are a snapshot into this process's slot:
        gauges, bytes (of closed and of open connections: a count that
        only grows), errors contained, the process's own numbers."""
        metrics = self._metrics
        up, down = self._closed_bytes
        for connection in self._connections:
            up += max(0, connection.upstream.count)
            down += max(0, connection.downstream.count)
        bugs = self._loop.bugs if self._loop is not None else 0
        base = self._metrics_base
        for key, value in ((("torsocksd_bytes_total", "up"), up),
                           (("torsocksd_bytes_total", "down"), down),
                           (("torsocksd_errors_total", "internal"), bugs)):
            metrics.set(key, base.get(key, 0.0) + value)
        metrics.set(("torsocksd_connections_open",), len(self._connections))
        metrics.set(("torsocksd_lookups_pending",), self._lookups.pending()
                    if self._lookups is not None else 0)
        paused = self._loop is not None and not self._accepting \
            and self._drain_deadline is None
        metrics.set(("torsocksd_listener_paused",), 1.0 if paused else 0.0)
        for name, value in process_numbers().items():
            metrics.set((name,), value)

    def _keep_publishing(self):
        """With workers: publish every METRICS_PUBLISH_INTERVAL while this
        one is busy, so that the worker answering a scrape has the others'
        numbers; once idle, publish once more and sleep (idle workers wake
        for nothing)."""
        if self._metrics.slots > 1 and self._publish_timer is None:
            self._publish_timer = self._loop.call_later(
                METRICS_PUBLISH_INTERVAL, self._publish_tick)

    def _publish_tick(self):
        self._publish_timer = None
        self._publish_metrics()
        if self._connections or self._lookups.pending():
            self._keep_publishing()

    def _serve_metrics(self, client: socket.socket, peer, kind: str):
        label = "unix socket"
        if client.family != socket.AF_UNIX:
            label = format_address(peer)
            if not self.settings.client_policy.permits(ip_of(peer[0])):
                log.info("refused %s at the metrics listener: not allowed "
                         "by --allow/--deny", label)
                client.close()
                return
        if len(self._metrics_exchanges) >= MAX_METRICS_EXCHANGES:
            log.warning("refused %s at the metrics listener: %d scrapes "
                        "open already", label, MAX_METRICS_EXCHANGES)
            client.close()
            return
        client.setblocking(False)
        self._metrics_exchanges.add(MetricsExchange(self, client, label))

    # -- reload: a new configuration, nothing dropped ------------------------

    def _run_in_loop(self, function, *args):
        """function(*args) in the loop's thread, returning its result or
        raising its exception here: at once from the loop's own thread, or
        when no loop runs (not started, or a process that only binds)."""
        loop_thread = self._loop_thread
        if loop_thread is None or loop_thread is threading.current_thread() \
                or self._loop_done.is_set():
            return function(*args)
        done = threading.Event()
        outcome = []

        def run():
            try:
                outcome.append((True, function(*args)))
            except BaseException as error:      # handed to the caller
                outcome.append((False, error))
            done.set()
        self.call_soon_threadsafe(run)
        deadline = time.monotonic() + LOOP_CALL_WAIT
        while not done.wait(0.05):
            if self._loop_done.is_set():
                raise ConfigError(["the server has stopped"])
            if time.monotonic() >= deadline:
                raise TimeoutError("the server's loop did not answer within "
                                   "%.0f s" % LOOP_CALL_WAIT)
        succeeded, value = outcome[0]
        if succeeded:
            return value
        raise value

    def _reload_now(self, settings, changes) -> ReloadReport:
        try:
            if self._drain_deadline is not None:
                raise ConfigError(["the server is shutting down"])
            new = self._next_settings(settings, changes)
            plan = self._plan_listeners(new)
        except ConfigError as error:
            self._metrics.add(("torsocksd_reloads_total", "failure"))
            self._reload_failed(error.problems)
            raise
        self._metrics.add(("torsocksd_reloads_total", "success"))
        return self._apply(new, plan)

    def _next_settings(self, settings, changes) -> Settings:
        """The Settings a reload asks for, read and checked."""
        try:
            if settings is None and not changes:
                if self._config_source is not None:
                    settings = self._config_source()
                else:
                    settings = self.settings.replace(
                        credentials=None if self.settings.credentials_file
                        else self.settings.credentials)
            elif settings is None:
                if "credentials_file" in changes \
                        and "credentials" not in changes:
                    changes = dict(changes, credentials=None)
                settings = self.settings.replace(**changes)
            elif changes:
                raise TypeError("reload() takes settings or changes, not both")
            if isinstance(settings, dict):
                settings = Settings(**settings)
        except ConfigError:
            raise
        except (OSError, ValueError, TypeError) as error:
            raise ConfigError([str(error)])
        if self._handed_in and settings.listen:
            settings = settings.replace(listen=())
            log.warning("reload: the SOCKS listeners were handed in (socket "
                        "activation or inetd): listen is not used")
        return settings

    def _plan_listeners(self, settings: Settings, received=None):
        """The listeners settings ask for: those that stay, and new ones
        opened (or taken from received, {(kind, spec): Listener}, made by
        the process that binds); checked for exposure.  None before the
        first bind, which will open them."""
        if self._bound_by is None:
            return None
        current = {(listener.kind, listener.spec): listener
                   for listener in self._listeners
                   if listener.spec is not None}
        received = dict(received or {})
        listeners = [listener for listener in self._listeners
                     if listener.spec is None]      # handed in: stay
        opened, problems = [], []
        wanted = wanted_listeners(settings)
        for kind, spec in wanted:
            listener = current.pop((kind, spec), None)
            if listener is None:
                listener = received.pop((kind, spec), None)
            if listener is None:
                listener = self._bound_as(kind, spec, current, wanted)
            if listener is None:
                # One that would be exposed is not opened at all when its
                # address says so; a name is checked once it is bound.
                exposed = exposure_problems(settings, literal_listener(
                    kind, spec))
                if exposed:
                    problems += exposed
                    continue
                try:
                    listener = open_listener_for(spec, kind,
                                                 settings.unix_mode)
                except (OSError, UnicodeError) as error:
                    # UnicodeError: a name that IDNA cannot encode.
                    problems.append("cannot listen on %s for %s: %s" % (
                        spec if isinstance(spec, str)
                        else format_address(spec), kind, error))
                    continue
            if listener not in self._listeners:
                opened.append(listener)
            listeners.append(listener)
        for listener in received.values():      # not asked for after all
            self._close_listener(listener)
        problems += exposure_problems(settings,
                                      self._listener_triples(listeners))
        if problems:
            for listener in opened:
                self._close_listener(listener)
            raise ConfigError(problems)
        return _ListenerPlan(listeners, opened, list(current.values()))

    @staticmethod
    def _bound_as(kind: str, spec, current: dict, wanted):
        """A listener of kind, among current (not asked for by its own
        spec), that is bound where spec points ("localhost:9050" written
        for what "127.0.0.1:9050" opened, or the bound address of a port 0
        spec): it stays, under spec."""
        if isinstance(spec, str) or spec[1] == 0:
            return None
        try:
            infos = socket.getaddrinfo(spec[0], spec[1], socket.AF_UNSPEC,
                                       socket.SOCK_STREAM, 0,
                                       socket.AI_PASSIVE)
        except (OSError, UnicodeError):
            return None     # opening it will say what is wrong
        where = infos[0][4][:2]
        for key, listener in list(current.items()):
            if key[0] == kind and key not in wanted \
                    and not isinstance(listener.address, str) \
                    and listener.address[:2] == where:
                del current[key]
                listener.spec = spec
                return listener
        return None

    def _adopt(self, settings: Settings, received: dict):
        """A worker: apply settings its parent checked, with the listeners
        it opened (received: {(kind, spec): Listener}); listeners this
        process has for a spec keep their sockets."""
        try:
            plan = self._plan_listeners(settings, received)
        except ConfigError as error:
            self._reload_failed(error.problems)
            raise
        return self._apply(settings, plan)

    def _reload_failed(self, problems):
        for problem in problems:
            log.error("reload: %s", problem)
        log.error("reload: nothing changed; the old configuration stays")

    def _apply(self, new: Settings, plan) -> ReloadReport:
        """Swap in what a reload checked; nothing here can fail."""
        old, self.settings = self.settings, new
        report = ReloadReport([], [], [])
        if plan is not None:
            report = self._swap_listeners(plan)
        if not self._resolver_given and (new.nameservers,
                                         new.resolver_threads) \
                != (old.nameservers, old.resolver_threads):
            self._swap_resolver(new.new_resolver())
        if self._tor_links is not None:
            self._tor_links.timeout = new.connect_timeout
        # Failures counted so far stay: a reload is no way out of a block.
        self._login_throttle.allowed = new.max_login_failures
        if new.unix_mode != old.unix_mode:
            self._chmod_unix_listeners(new.unix_mode)
        if self._loop is not None:
            self._resume_accepting()    # max_connections may have grown
        if self._handed_in:
            log.info("reload: the SOCKS listeners were handed in (socket "
                     "activation or inetd): they are not ours to change")
        log.info("reload: applied; listeners: %d kept, %d opened, %d closed%s",
                 len(report.kept), len(report.opened), len(report.closed),
                 "; credentials read from %s" % new.credentials_file
                 if new.credentials_file else "")
        return report

    def _chmod_unix_listeners(self, mode: int):
        """unix_mode for the Unix listeners this process made."""
        if self._bound_by != os.getpid():
            return
        for listener in self._listeners:
            if listener.unix_path is not None:
                try:
                    os.chmod(listener.unix_path, mode)
                except OSError as error:
                    log.warning("reload: cannot change the mode of %s: %s",
                                listener.unix_path, error)

    def _swap_listeners(self, plan: _ListenerPlan) -> ReloadReport:
        """New listeners are watched before removed ones close, so that
        there is never a moment without one; kept ones are not touched."""
        serving = self._loop is not None and self._drain_deadline is None
        for listener in plan.opened:
            if serving and (self._accepting
                            or listener.kind in MONITORING_KINDS):
                self._watch_listener(listener)
            self._log_listening(listener)
        closed = []
        for listener in plan.removed:
            closed.append(listener.describe())
            self._close_listener(listener)
            log.info("stopped listening on %s", closed[-1])
        self._listeners = plan.listeners
        self.addresses = [listener.address for listener in self._listeners]
        return ReloadReport(
            [listener.describe() for listener in plan.opened], closed,
            [listener.describe() for listener in plan.listeners
             if listener not in plan.opened])

    def _swap_resolver(self, resolver):
        """New lookups go to resolver; those in flight finish on the old
        one, which is closed once it is idle."""
        retired, self.resolver = self.resolver, self._track(resolver)
        if self._loop is not None:
            attach = getattr(self.resolver, "attach", None)
            if attach is not None:
                attach(self._loop)
            self._lookups.use(self.resolver)
            self._retiring_resolvers.append(retired)
            self._close_idle_resolvers()
        else:
            retired.close()

    def _close_idle_resolvers(self):
        still_busy = []
        for resolver in self._retiring_resolvers:
            if resolver.pending:
                still_busy.append(resolver)
            else:
                resolver.close(wait=False)
        self._retiring_resolvers = still_busy
        if still_busy and self._loop is not None:
            self._loop.call_later(RESOLVER_RETIRE_CHECK,
                                  self._close_idle_resolvers)

    # -- logging helpers -----------------------------------------------------------

    def _scrub(self, destination: str) -> str:
        """A destination as the log may show it (the README's "logging"
        row)."""
        return destination if self.settings.log_destinations \
            else scrubbed(destination)

    def _warn_unsafe_socks(self, version: Version, label: str):
        now = time.monotonic()
        if now - self._last_unsafe_warning >= 5.0:     # Tor's rate limit
            self._last_unsafe_warning = now
            log.warning("a %s client (%s) gave only an IP address: the "
                        "application may be leaking DNS; refused "
                        "(--safe-socks)", version.name, label)


class _TrackedLookup:
    """A lookup TrackedResolver passes on: it ends once, answered or
    cancelled, whichever comes first."""
    __slots__ = ("tracker", "callback", "inner", "ended")

    def __init__(self, tracker, callback):
        self.tracker = tracker
        self.callback = callback
        self.inner = None           # the wrapped resolver's handle
        self.ended = False

    def deliver(self, result: ResolverResult):
        if self.tracker.end(self, result):
            self.callback(result)

    def cancel(self):
        if self.tracker.end(self, None) and self.inner is not None:
            self.inner.cancel()

    def cancel_and_release_later(self, on_released) -> bool:
        """cancel(), and what the wrapped lookup's own says (False when it
        has none: it frees its place at once)."""
        if not self.tracker.end(self, None) or self.inner is None:
            return False
        release_later = getattr(self.inner, "cancel_and_release_later", None)
        if release_later is None:
            self.inner.cancel()
            return False
        return release_later(on_released)


class TrackedResolver:
    """A resolver as the server uses it: every lookup is counted while it
    is pending (so that a resolver a reload replaced is closed once idle),
    and its result is counted for the metrics page.  Everything else
    (attach, the resolver's own attributes) is the wrapped resolver's."""

    def __init__(self, resolver, on_result=None, lock=None):
        self.resolver = resolver
        self.on_result = on_result  # on_result(result or None: cancelled)
        self.pending = 0
        # Answers come from worker threads; the server's resolvers, old
        # and new, share one lock for the counts they share.
        self._lock = lock if lock is not None else threading.Lock()

    def lookup(self, hostname: str, callback) -> _TrackedLookup:
        return self._start(self.resolver.lookup, hostname, callback)

    def reverse(self, address, callback) -> _TrackedLookup:
        return self._start(self.resolver.reverse, address, callback)

    def _start(self, method, query, callback) -> _TrackedLookup:
        lookup = _TrackedLookup(self, callback)
        with self._lock:
            self.pending += 1
        lookup.inner = method(query, lookup.deliver)
        return lookup

    def end(self, lookup: _TrackedLookup, result) -> bool:
        """Count lookup's end (result None: cancelled); False if it had
        ended already."""
        with self._lock:
            if lookup.ended:
                return False
            lookup.ended = True
            self.pending -= 1
            if self.on_result is not None:
                self.on_result(result)
        return True

    def close(self, wait: bool = True):
        if isinstance(self.resolver, SystemResolver):
            self.resolver.close(wait=wait)
            return
        close = getattr(self.resolver, "close", None)
        if close is not None:
            close()

    def __getattr__(self, name):
        return getattr(self.resolver, name)


def open_unix_listener(path: str, mode: int) -> socket.socket:
    """A listening Unix stream socket at path.  A stale socket left by a
    dead process is replaced; a live one, or any other file, is an error."""
    if os.path.lexists(path):
        if not stat_is_socket(path):
            raise OSError(errno.EEXIST, "not a socket, will not replace", path)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            # Non-blocking: a live server with a full queue must not hang us.
            # Only "refused" proves nobody is there; anything else (EAGAIN,
            # EACCES, success) leaves the path to whoever owns it.
            probe.setblocking(False)
            if probe.connect_ex(path) != errno.ECONNREFUSED:
                raise OSError(errno.EADDRINUSE, "a server listens there", path)
        os.unlink(path)

    def bind(listener):
        # bind() makes the file with the umask's permissions, and clients
        # may connect before chmod(): make those no looser than mode.
        old_umask = os.umask(~mode & 0o777)
        try:
            listener.bind(path)
        finally:
            os.umask(old_umask)
        os.chmod(path, mode)
    return listening(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM), bind,
                     LISTEN_BACKLOG)


def stat_is_socket(path: str) -> bool:
    return stat.S_ISSOCK(os.lstat(path).st_mode)


def format_address(sockaddr) -> str:
    if isinstance(sockaddr, str):
        return "unix:" + sockaddr
    host, port = sockaddr[0], sockaddr[1]
    return ("[%s]:%d" if ":" in host else "%s:%d") % (host, port)


# =============================================================================
# Metrics: what the server counts, and the page Prometheus scrapes
# =============================================================================
# Every number is a double in a MetricsTable: one slot (a row of
# METRIC_SERIES values) per process.  Counters are added to as things
# happen; gauges, the bytes of open connections and the process_* numbers
# are written when published: at each scrape, and with --workers every
# METRICS_PUBLISH_INTERVAL.  With --workers the table is an anonymous shared
# mmap made before the fork: each process writes only its own slot, and the
# worker that answers a scrape adds every slot up, so any scrape shows the
# whole server (summed, never labelled by worker: a worker that is replaced
# takes over its slot, and the sums stay monotonic).  No destination is ever
# a label value: every label takes its values from a fixed set below.

class MetricFamily(NamedTuple):
    name: str
    kind: str               # "counter", "gauge" or "histogram"
    help: str
    labels: tuple = ()      # label names
    values: tuple = ()      # for each label, every value it can take
    combine: str = "sum"    # how the slots add up: "sum", "max" or "min"
    show_zero: bool = True  # False: a series shows once it is not 0


# http: HTTP spoken to a SOCKS port (the page); http_connect: a client of
# --http-tunnel.
CONNECTION_VERSIONS = ("socks4", "socks5", "http", "http_connect", "none")
CONNECTION_COMMANDS = tuple(command.name.lower() for command in Command) \
    + ("none",)
# success: a tunnel, an answer or a UDP association; refused: a failure reply, the HTTP page,
# or a close at accept (--allow/--deny, --max-per-client); failed: it ended
# with no answer (the client left, a reset, a deadline before a version).
CONNECTION_OUTCOMES = ("success", "refused", "failed")
LOOKUP_RESULTS = ("answered", "not_found", "failed", "cancelled")
ERROR_KINDS = ("accept", "socket", "timeout", "internal")
# Seconds from accept to the reply that ends the handshake.
HANDSHAKE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                     1.0, 2.5, 5.0, 10.0)

METRIC_FAMILIES = (
    MetricFamily("torsocksd_connections_total", "counter",
                 "Client connections that ended, by SOCKS version, command "
                 "and outcome.", ("version", "command", "outcome"),
                 (CONNECTION_VERSIONS, CONNECTION_COMMANDS,
                  CONNECTION_OUTCOMES), show_zero=False),
    MetricFamily("torsocksd_connections_open", "gauge",
                 "Client connections open now."),
    MetricFamily("torsocksd_bytes_total", "counter",
                 "Bytes relayed: up is client to destination, down the "
                 "other way.", ("direction",), (("up", "down"),)),
    MetricFamily("torsocksd_handshake_seconds", "histogram",
                 "Seconds from accept to the reply that ends the SOCKS "
                 "handshake (success or refusal)."),
    MetricFamily("torsocksd_lookups_total", "counter",
                 "Name lookups that ended, by result.", ("result",),
                 (LOOKUP_RESULTS,)),
    MetricFamily("torsocksd_lookups_pending", "gauge",
                 "Name lookups waiting for an answer now."),
    MetricFamily("torsocksd_listener_paused", "gauge",
                 "1 while the SOCKS listeners wait (--max-connections "
                 "reached, or out of descriptors); with --workers, how many "
                 "workers wait."),
    MetricFamily("torsocksd_errors_total", "counter",
                 "Errors by kind: accept() failed, a connection's socket "
                 "failed, a deadline passed, an internal error was "
                 "contained.", ("kind",), (ERROR_KINDS,)),
    MetricFamily("torsocksd_reloads_total", "counter",
                 "Reloads (SIGHUP, reload()) by result.", ("result",),
                 (("success", "failure"),)),
    MetricFamily("process_cpu_seconds_total", "counter",
                 "User and system CPU time spent in seconds."),
    MetricFamily("process_resident_memory_bytes", "gauge",
                 "Resident memory size in bytes."),
    MetricFamily("process_virtual_memory_bytes", "gauge",
                 "Virtual memory size in bytes."),
    MetricFamily("process_open_fds", "gauge",
                 "Number of open file descriptors."),
    MetricFamily("process_max_fds", "gauge",
                 "Maximum number of open file descriptors.", combine="max"),
    MetricFamily("process_start_time_seconds", "gauge",
                 "Start time of the process since unix epoch in seconds.",
                 combine="min"),
)


def _metric_layout(families):
    """Where each series lives in a slot: ("name", value, ...) -> index;
    a histogram's name -> its first index (buckets, +Inf, sum, count)."""
    index, size = {}, 0
    for family in families:
        if family.kind == "histogram":
            index[family.name] = size
            size += len(HANDSHAKE_BUCKETS) + 3
            continue
        for values in itertools.product(*family.values):
            index[(family.name,) + values] = size
            size += 1
    return index, size


METRIC_INDEX, METRIC_SERIES = _metric_layout(METRIC_FAMILIES)
# Counters a process keeps itself and publishes (its slot's value when it
# took the slot, plus its own count), so that they stay monotonic.
PUBLISHED_COUNTERS = (("torsocksd_bytes_total", "up"),
                      ("torsocksd_bytes_total", "down"),
                      ("torsocksd_errors_total", "internal"))
METRICS_PUBLISH_INTERVAL = 1.0      # seconds, with --workers
NOT_AVAILABLE = float("nan")        # a number this platform cannot tell


class MetricsTable:
    """The numbers of the metrics page, slots of METRIC_SERIES doubles.

    MetricsTable() is one process's; MetricsTable(slots) with slots > 1
    lives in an anonymous shared mmap, to be made before fork(): each
    process then take_slot()s its own row, and combined() adds all rows.
    """

    def __init__(self, slots: int = 1):
        size = 8 * METRIC_SERIES * slots
        self.buffer = mmap.mmap(-1, size) if slots > 1 else bytearray(size)
        self.values = memoryview(self.buffer).cast("d")
        self.slots = slots
        self.take_slot(0)

    def take_slot(self, slot: int):
        """Write to row slot from now on; its gauges start from 0."""
        self.slot = slot
        self.mine = self.values[slot * METRIC_SERIES:
                                (slot + 1) * METRIC_SERIES]
        for family in METRIC_FAMILIES:
            if family.kind == "gauge":
                for values in itertools.product(*family.values):
                    self.mine[METRIC_INDEX[(family.name,) + values]] = 0.0

    def add(self, key, amount: float = 1.0):
        self.mine[METRIC_INDEX[key]] += amount

    def set(self, key, value: float):
        self.mine[METRIC_INDEX[key]] = value

    def get(self, key) -> float:
        return self.mine[METRIC_INDEX[key]]

    def observe(self, name: str, value: float):
        """One observation of the histogram name."""
        first = METRIC_INDEX[name]
        bucket = len(HANDSHAKE_BUCKETS)         # +Inf
        for number, bound in enumerate(HANDSHAKE_BUCKETS):
            if value <= bound:
                bucket = number
                break
        mine = self.mine
        mine[first + bucket] += 1
        mine[first + len(HANDSHAKE_BUCKETS) + 1] += value
        mine[first + len(HANDSHAKE_BUCKETS) + 2] += 1

    def combined(self, index: int, combine: str = "sum") -> float:
        """Series index over every slot."""
        values = self.values[index::METRIC_SERIES]
        if combine == "sum":
            return sum(values)
        present = [value for value in values if value]
        if not present:
            return 0.0
        return max(present) if combine == "max" else min(present)


def _metric_number(value: float) -> str:
    if value == int(value) and abs(value) < 1e15:
        return "%d" % value
    return repr(value)


def _metric_labels(names, values) -> str:
    if not names:
        return ""
    return "{%s}" % ",".join('%s="%s"' % (name, value.replace(
        "\\", "\\\\").replace('"', '\\"').replace("\n", "\\n"))
        for name, value in zip(names, values))


def render_metrics(table: MetricsTable) -> bytes:
    """The Prometheus text exposition format 0.0.4 of every slot added up
    (a number this platform cannot tell is left out)."""
    lines = []
    for family in METRIC_FAMILIES:
        name = family.name
        lines.append("# HELP %s %s" % (name, family.help))
        lines.append("# TYPE %s %s" % (name, family.kind))
        if family.kind == "histogram":
            first, total = METRIC_INDEX[name], 0.0
            for number, bound in enumerate(HANDSHAKE_BUCKETS
                                           + (float("inf"),)):
                total += table.combined(first + number)
                lines.append('%s_bucket{le="%s"} %s' % (
                    name, "+Inf" if bound == float("inf") else repr(bound),
                    _metric_number(total)))
            done = first + len(HANDSHAKE_BUCKETS) + 1
            lines.append("%s_sum %s" % (name, repr(table.combined(done))))
            lines.append("%s_count %s" % (name, _metric_number(
                table.combined(done + 1))))
            continue
        for values in itertools.product(*family.values):
            value = table.combined(METRIC_INDEX[(name,) + values],
                                   family.combine)
            if value != value or (not value and not family.show_zero):
                continue    # NaN: not available here
            lines.append("%s%s %s" % (name, _metric_labels(family.labels,
                                                           values),
                                      _metric_number(value)))
    return ("\n".join(lines) + "\n").encode("utf-8")


def process_numbers() -> dict:
    """This process's process_* numbers, as Prometheus's client libraries
    define them (from /proc on Linux; elsewhere NOT_AVAILABLE)."""
    times = os.times()
    numbers = {"process_cpu_seconds_total": times.user + times.system,
               "process_resident_memory_bytes": NOT_AVAILABLE,
               "process_virtual_memory_bytes": NOT_AVAILABLE,
               "process_open_fds": NOT_AVAILABLE,
               "process_max_fds": NOT_AVAILABLE,
               "process_start_time_seconds": NOT_AVAILABLE}
    try:
        import resource
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY:
            numbers["process_max_fds"] = float(soft)
    except (ImportError, OSError, ValueError):
        pass
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        with open("/proc/self/statm") as statm:
            size, resident = statm.read().split()[:2]
        numbers["process_virtual_memory_bytes"] = float(int(size) * page)
        numbers["process_resident_memory_bytes"] = float(int(resident) * page)
        numbers["process_open_fds"] = float(len(os.listdir("/proc/self/fd")))
        with open("/proc/self/stat") as stat:
            # Field 22, counted after the command name in parentheses.
            started = int(stat.read().rpartition(")")[2].split()[19])
        with open("/proc/stat") as boot:
            booted = next(int(line.split()[1]) for line in boot
                          if line.startswith("btime "))
        numbers["process_start_time_seconds"] = \
            booted + started / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        pass
    return numbers


def connection_labels(connection) -> tuple:
    """(version, command, outcome) of a connection that ended."""
    handshake = connection.handshake
    if handshake.version is not None:
        version = handshake.version.name.lower()
    elif handshake.protocol is Protocol.HTTP:
        version = "http"
    else:
        version = "none"
    command = handshake.command.name.lower() \
        if handshake.command is not None else "none"
    outcome = connection.outcome
    if outcome.startswith(("relayed", "answered", "associated")):
        result = "success"
    elif outcome.startswith("refused"):
        result = "refused"
    else:
        result = "failed"
    return version, command, result


def connection_errors(outcome: str):
    """The errors_total kinds a connection's outcome shows."""
    if "socket error" in outcome:
        yield "socket"
    if "timed out" in outcome or "idle timeout" in outcome:
        yield "timeout"


# -- the scrape: a small HTTP responder on the same loop --------------------------

METRICS_PATH = "/metrics"
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4"
MAX_METRICS_REQUEST = 8192          # bytes of request head read at most
METRICS_EXCHANGE_TIMEOUT = 10.0     # seconds from accept to the last byte
MAX_METRICS_EXCHANGES = 16          # scrapes at once; more are closed

HTTP_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found",
                405: "Method Not Allowed",
                431: "Request Header Fields Too Large"}


def metrics_http_reply(status: int, body: bytes = b"",
                       content_type: str = "text/plain; charset=utf-8",
                       head_only: bool = False) -> bytes:
    """An HTTP/1.1 response that closes the connection (one request per
    connection)."""
    head = ("HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
            "%sConnection: close\r\n\r\n"
            % (status, HTTP_REASONS[status], content_type, len(body),
               "Allow: GET, HEAD\r\n" if status == 405 else ""))
    return head.encode("ascii") + (b"" if head_only else body)


def parse_metrics_request(data) -> ParseResult:
    """An HTTP/1.x request head (RFC 9112 §2-3), ended by an empty line:
    Parsed((method, path), used) for GET or HEAD, else Rejected with the
    response (400, 405, or 431 past MAX_METRICS_REQUEST bytes)."""
    data = bytes(data[:MAX_METRICS_REQUEST + 4])
    end = data.find(b"\r\n\r\n")
    used = end + 4
    if end < 0:
        end = data.find(b"\n\n")
        used = end + 2
    if end < 0 or end > MAX_METRICS_REQUEST:
        if len(data) > MAX_METRICS_REQUEST:
            return Rejected(metrics_http_reply(431, b"request too long\n"),
                            "request head longer than %d bytes"
                            % MAX_METRICS_REQUEST)
        return NEED_MORE
    request_line = data[:end].split(b"\n", 1)[0].rstrip(b"\r")
    parts = request_line.split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1.") \
            or not parts[1].startswith(b"/"):
        return Rejected(metrics_http_reply(400, b"bad request\n"),
                        "not an HTTP/1 request line")
    method, target = parts[0], parts[1]
    if method not in (b"GET", b"HEAD"):
        return Rejected(metrics_http_reply(405, b"GET or HEAD only\n"),
                        "method %s" % clip_for_log(method))
    path = target.split(b"?", 1)[0].decode("ascii", "replace")
    return Parsed((method.decode("ascii"), path), used)


class MetricsExchange:
    """One scrape: a request head read within MAX_METRICS_REQUEST bytes and
    METRICS_EXCHANGE_TIMEOUT seconds, one response, then the close (what
    the client still sends is read and dropped, so that the close does not
    reset the response away)."""

    def __init__(self, server: "Server", sock: socket.socket, label: str):
        self.server = server
        self.loop = server._loop
        self.sock = sock
        self.label = label
        self.received = bytearray()
        self.outgoing = b""
        self.answered = False
        self.events = 0
        self.deadline = self.loop.call_later(METRICS_EXCHANGE_TIMEOUT,
                                             self.close, owner=self)
        self._want(EVENT_READ)

    def _want(self, events: int):
        if events != self.events:
            self.loop.watch(self.sock, self.events, events,
                            (self._on_event, self))
            self.events = events

    def _on_event(self, mask: int):
        try:
            if mask & EVENT_READ:
                self._readable()
            if self.outgoing and self.deadline is not None:
                self._send()
        except OSError:
            self.close()

    def _readable(self):
        data = self.sock.recv(MAX_METRICS_REQUEST)
        if not data:
            self.close()
            return
        if self.answered:
            return      # dropped: one request per connection
        self.received += data
        result = parse_metrics_request(self.received)
        if result is NEED_MORE:
            return
        self.answered = True
        self.received = bytearray()
        if isinstance(result, Rejected):
            log.info("metrics request from %s refused: %s", self.label,
                     result.reason)
            self.outgoing = result.reply
        else:
            method, path = result.message
            if path != METRICS_PATH:
                self.outgoing = metrics_http_reply(404, b"not found\n")
            else:
                self.outgoing = metrics_http_reply(
                    200, self.server.metrics_text(), METRICS_CONTENT_TYPE,
                    head_only=method == "HEAD")
        self._want(EVENT_READ | EVENT_WRITE)

    def _send(self):
        try:
            sent = self.sock.send(self.outgoing)
        except (BlockingIOError, InterruptedError):
            return      # a read event came first: the write event will do
        self.outgoing = self.outgoing[sent:]
        if not self.outgoing:
            self.sock.shutdown(socket.SHUT_WR)
            self._want(EVENT_READ)      # until the client closes

    def close_after_bug(self):
        self.close()

    def close(self):
        if self.deadline is None:
            return
        self.deadline.cancel()
        self.deadline = None
        if self.events and not self.loop.closed:
            self.loop.watch(self.sock, self.events, 0, None)
        self.events = 0
        self.sock.close()
        self.server._metrics_exchanges.discard(self)


# =============================================================================
# Process integration: logging and signals
# =============================================================================

LOG_FORMAT = "%(asctime)s torsocksd[%(process)d] %(levelname)s %(message)s"
SYSLOG_FORMAT = "torsocksd[%(process)d]: %(levelname)s %(message)s"


def configure_logging(level: str, log_file: Optional[str] = None,
                      use_syslog: bool = False):
    """Log to a file, to syslog, or to stderr, at level; called again on
    SIGHUP (which reopens a file that logrotate moved away).  The new
    handler is made before the old one goes: when it cannot be (OSError:
    a file that cannot be opened, after --user perhaps), the old one stays
    and the error is raised.  Returns the handler."""
    if log_file:
        handler = logging.FileHandler(log_file)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
    elif use_syslog:
        from logging.handlers import SysLogHandler     # 0.7 MiB: only here
        handler = SysLogHandler(
            address="/dev/log" if os.path.exists("/dev/log") else "/var/run/syslog",
            facility=SysLogHandler.LOG_DAEMON)
        handler.setFormatter(logging.Formatter(SYSLOG_FORMAT))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
    for old in list(log.handlers):
        log.removeHandler(old)
        old.close()
    log.addHandler(handler)
    log.setLevel(level.upper())
    log.propagate = False
    return handler


SD_LISTEN_FDS_START = 3     # sd_listen_fds(3)


def socket_activation():
    """Sockets passed by systemd (LISTEN_PID, LISTEN_FDS), without
    libsystemd: (listeners, connections).  The variables are unset and the
    descriptors made close-on-exec, as sd_listen_fds() does.  A passed
    socket that is connected, not listening, is an Accept=yes instance."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return [], []
    try:
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        count = 0
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    listeners, connections = [], []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count):
        os.set_inheritable(fd, False)
        sock = socket.socket(fileno=fd)
        if sock.type != socket.SOCK_STREAM:
            sock.close()
            raise ValueError("socket activation passed fd %d, which is not "
                             "a stream socket" % fd)
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            listeners.append(sock)
        else:
            connections.append(sock)
    return listeners, connections


def sd_notify(message: str):
    """Tell systemd (Type=notify) how we are: READY=1, RELOADING=1,
    STOPPING=1, STATUS=.  Advisory: without NOTIFY_SOCKET, or when sending
    fails, nothing happens."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address or not address.startswith(("/", "@")):
        return
    if address.startswith("@"):
        address = "\0" + address[1:]       # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(message.encode(), address)
    except OSError as error:
        log.debug("sd_notify failed: %s", error)


def sd_notify_reloading():
    """RELOADING=1 with the time it began on CLOCK_MONOTONIC, which systemd
    253 and newer want for Type=notify-reload (sd_notify(3))."""
    now = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    sd_notify("RELOADING=1\nMONOTONIC_USEC=%d" % now)


def raise_file_limit():
    """Soft RLIMIT_NOFILE up to the hard limit: each connection needs two."""
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, OSError, ValueError) as error:
        log.debug("cannot raise the file limit: %s", error)


def drop_privileges(user: str):
    """Become user (its groups, then its gid, then its uid) and check that
    there is no way back."""
    import pwd
    entry = pwd.getpwnam(user)
    os.setgroups(os.getgrouplist(entry.pw_name, entry.pw_gid))
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)
    if entry.pw_uid != 0:
        try:
            os.setuid(0)
        except OSError:
            pass
        else:
            raise OSError(errno.EPERM, "could regain root after dropping it")
    log.info("running as %s (uid %d, gid %d)", user, entry.pw_uid,
             entry.pw_gid)


def install_signal_handlers(server: Server, on_reload):
    """SIGTERM and SIGINT drain the server, a second one ends it at once;
    SIGHUP calls on_reload(); SIGUSR1 logs one line of statistics.

    The handlers only post work: the loop wakes through its socketpair and
    does it (Python runs handlers in the main thread, between bytecodes).
    """
    def on_stop(number, frame):
        server.stop(wait=False)

    def on_hangup(number, frame):
        server.call_soon_threadsafe(on_reload)

    def on_usr1(number, frame):
        server.call_soon_threadsafe(log_statistics, server)

    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, on_stop)
    signal.signal(signal.SIGHUP, on_hangup)
    signal.signal(signal.SIGUSR1, on_usr1)


WORKER_RESTART_PAUSE = 1.0      # seconds between restarts of a crashing worker
WORKER_RELOAD_WAIT = 10.0       # seconds workers get to confirm a reload
PASSED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)
MAX_PASSED_LISTENERS = 250      # sockets in one message, with the payload's
                                # file within Linux's SCM_MAX_FD (253)


class _Worker(NamedTuple):
    slot: int                   # its row of the shared metrics
    started: float
    control: socket.socket      # the parent's end of its socketpair


def run_workers(server: Server, count: int, reload_configuration,
                log_target) -> int:
    """Serve with count worker processes that share server's listeners.

    The parent binds, forks, passes TERM, INT and USR1 on to the workers and
    restarts one that dies, until it is told to stop.  SIGHUP is the
    parent's: reload_configuration() reads and checks the configuration
    once (so each problem is logged once), opens new listeners and closes
    removed ones here; then every worker gets the new settings and the
    listeners' sockets over its socketpair, applies them, and confirms;
    when nothing applies, each is told to reopen its log (after logrotate);
    then READY=1.  log_target() gives configure_logging()'s arguments.
    PASSED_SIGNALS that came while the caller had them blocked (from
    before the first "listening" line) are handled once the workers run.
    """
    server.bind()
    server._share_metrics(count + 1)     # slot 0: this process
    parent = os.getpid()
    # Only the parent holds the write end: the workers read EOF once it is
    # gone, however it ended.
    parent_alive, parent_alive_writer = os.pipe()
    workers = {}            # pid -> _Worker
    respawns = []           # (when, slot) of workers to start again
    received = collections.deque()
    wakeup_reader, wakeup_writer = socket.socketpair()
    for sock in (wakeup_reader, wakeup_writer):
        sock.setblocking(False)
    watched = PASSED_SIGNALS + (signal.SIGCHLD,)
    stopping = False

    def spawn(slot: int):
        control, child_end = control_socketpair()
        # Signals wait until the child has its own handlers in place.
        signal.pthread_sigmask(signal.SIG_BLOCK, watched)
        # Everything loaded so far leaves the collector's generations, so
        # that a worker's collections do not write to (and so copy) the
        # pages it shares with the parent.
        gc.freeze()
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                signal.set_wakeup_fd(-1)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                os.close(parent_alive_writer)
                for sock in [wakeup_reader, wakeup_writer, control] + [
                        worker.control for worker in workers.values()]:
                    sock.close()
                server._take_metrics_slot(slot)
                install_signal_handlers(server, lambda: log.info(
                    "SIGHUP to a worker: the main process, %d, reloads",
                    parent))
                signal.pthread_sigmask(signal.SIG_UNBLOCK, watched)
                watch_parent(server, parent_alive)
                follow_parent(server, child_end)
                server.serve_forever()
                status = 0
            except BaseException:
                log.exception("worker %d failed", os.getpid())
            finally:
                logging.shutdown()
                os._exit(status)
        child_end.close()
        control.settimeout(WORKER_RELOAD_WAIT)
        workers[pid] = _Worker(slot, time.monotonic(), control)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, watched)

    def reap():
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = workers.pop(pid, None)
            if worker is None:
                continue
            worker.control.close()
            if stopping:
                continue
            log.warning("worker %d ended (wait status %d); starting another",
                        pid, status)
            now = time.monotonic()
            quick = now - worker.started < WORKER_RESTART_PAUSE
            respawns.append((now + WORKER_RESTART_PAUSE if quick else now,
                             worker.slot))      # no fork storm

    def pass_on(number: int):
        for pid in workers:
            try:
                os.kill(pid, number)
            except ProcessLookupError:
                pass

    def reload():
        sd_notify_reloading()
        # An error nobody foresaw fails this reload, not the parent (which
        # would leave the workers unsupervised).
        try:
            applied = reload_configuration()
        except Exception as error:
            server._metrics.add(("torsocksd_reloads_total", "failure"))
            log.error("reload: failed (%s: %s); the old configuration stays",
                      type(error).__name__, error)
            log.debug("reload: where it failed", exc_info=True)
            applied = False
        try:
            if applied:
                send_configuration()
            else:   # the workers' logs are reopened all the same
                tell_workers(REOPEN_LOG, log_target(), [])
        except Exception as error:
            log.error("reload: cannot tell the workers (%s: %s); they go on "
                      "as they were", type(error).__name__, error)
        server._publish_metrics()
        sd_notify("READY=1\nSTATUS=%d workers" % count)

    def send_configuration():
        listeners = [listener for listener in server._listeners
                     if listener.spec is not None][:MAX_PASSED_LISTENERS]
        tell_workers(APPLY_CONFIGURATION, (server.settings, [
            (listener.kind, listener.spec) for listener in listeners],
            log_target()), [listener.sock.fileno() for listener in listeners])

    def tell_workers(what: bytes, payload, fds):
        """Send every worker what, with payload and the sockets fds, and
        wait (bounded) for each to confirm."""
        payload_fd = payload_file(payload)
        rights = array.array("i", [payload_fd] + fds)
        waiting = {}
        try:
            for pid, worker in workers.items():
                drain_confirmations(worker.control)
                try:
                    worker.control.sendmsg([what], [(
                        socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)])
                    waiting[worker.control] = pid
                except OSError as error:
                    log.error("worker %d cannot take the new configuration "
                              "(%s): stopping it; another starts", pid, error)
                    os.kill(pid, signal.SIGTERM)
        finally:
            os.close(payload_fd)    # the workers have their own copies
        deadline = time.monotonic() + WORKER_RELOAD_WAIT
        while waiting and time.monotonic() < deadline:
            ready, _, _ = select.select(list(waiting), [], [], max(
                0.0, deadline - time.monotonic()))
            for control in ready:
                pid = waiting.pop(control)
                try:
                    control.recv(16)
                except OSError:
                    pass    # it ended: it is restarted with the new one
        for pid in waiting.values():
            log.warning("worker %d did not confirm the reload within %.0f s",
                        pid, WORKER_RELOAD_WAIT)

    def note(number, frame):
        received.append(number)

    signal.set_wakeup_fd(wakeup_writer.fileno())
    for number in watched:
        signal.signal(number, note)
    # main() blocked them before the first "listening" line: those that
    # came since are noted now, and handled once the workers run.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, watched)
    for slot in range(1, count + 1):
        spawn(slot)
    log.info("%d workers started", count)
    server._publish_metrics()
    sd_notify("READY=1\nSTATUS=%d workers" % count)
    try:
        while workers or (respawns and not stopping):
            reap()
            while received:
                number = received.popleft()
                if number in (signal.SIGTERM, signal.SIGINT):
                    if not stopping:
                        stopping = True
                        sd_notify("STOPPING=1")
                    pass_on(number)     # a second one ends them at once
                elif number == signal.SIGUSR1:
                    pass_on(number)
                elif number == signal.SIGHUP and not stopping:
                    reload()
            now = time.monotonic()
            for when, slot in list(respawns):
                if stopping:
                    respawns.remove((when, slot))
                elif when <= now:
                    respawns.remove((when, slot))
                    spawn(slot)
            timeout = None
            if respawns and not stopping:
                timeout = max(0.0, min(when for when, _ in respawns) - now)
            if workers or respawns:
                select.select([wakeup_reader], [], [], timeout)
            try:
                while wakeup_reader.recv(4096):
                    pass
            except OSError:
                pass
    finally:
        signal.set_wakeup_fd(-1)
        wakeup_reader.close()
        wakeup_writer.close()
    server.stop()
    return 0


def control_socketpair():
    """A socketpair that keeps messages whole and tells either end when the
    other is gone (SOCK_SEQPACKET; SOCK_DGRAM where there is none)."""
    try:
        return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    except (AttributeError, OSError):
        return socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)


# What the parent tells a worker over its control socket: one short message
# naming what to do, with descriptors (SCM_RIGHTS): first an unlinked file
# that holds the pickled payload (a configuration with thousands of users
# or rules is far larger than one message the socket takes), then the
# listeners' sockets.  The worker confirms with a short message.
APPLY_CONFIGURATION = b"apply"  # (settings, [(kind, spec)], logging target)
REOPEN_LOG = b"reopen-log"      # logging target (after a refused reload)
MAX_PAYLOAD_BYTES = 256 << 20   # the most a worker reads of one payload


def payload_file(payload) -> int:
    """A descriptor of an unlinked file that holds payload, pickled."""
    data = pickle.dumps(payload, pickle.HIGHEST_PROTOCOL)
    try:
        fd = os.memfd_create("torsocksd-payload", os.MFD_CLOEXEC)
    except (AttributeError, OSError):       # not Linux, or an old kernel
        import tempfile
        fd, path = tempfile.mkstemp(prefix="torsocksd-")
        os.unlink(path)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_payload(fd: int):
    """What payload_file() wrote to fd, at most MAX_PAYLOAD_BYTES of it.
    The offset is shared with every process that has the file: pread."""
    size = os.fstat(fd).st_size
    if size > MAX_PAYLOAD_BYTES:
        raise ValueError("%d bytes, more than the %d a worker takes"
                         % (size, MAX_PAYLOAD_BYTES))
    chunks, offset = [], 0
    while offset < size:
        chunk = os.pread(fd, min(size - offset, 1 << 20), offset)
        if not chunk:
            raise ValueError("the file ends at %d of %d bytes"
                             % (offset, size))
        chunks.append(chunk)
        offset += len(chunk)
    return pickle.loads(b"".join(chunks))


def drain_confirmations(control: socket.socket):
    """Drop confirmations that came too late to be waited for, so that
    they are not taken for the next one's."""
    try:
        # select, not MSG_DONTWAIT: a socket with a timeout waits anyway.
        while select.select([control], [], [], 0)[0] and control.recv(16):
            pass
    except OSError:     # the worker is gone
        pass


def follow_parent(server: Server, control: socket.socket):
    """A worker: do what the parent sends over control (apply a
    configuration: settings, the listeners' specs with their sockets, the
    logging; or reopen the log), and confirm it."""
    def on_message(mask):
        try:
            message, ancillary, _, _ = control.recvmsg(
                64, socket.CMSG_LEN((MAX_PASSED_LISTENERS + 1) * 4))
        except (BlockingIOError, InterruptedError):
            return
        fds = array.array("i")
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
        if not message:     # the parent is gone: watch_parent drains
            for fd in fds:
                os.close(fd)
            server._loop.watch(control, EVENT_READ, 0, None)
            control.close()
            return
        payload_fd, fds = (fds[0], fds[1:]) if fds else (None, fds)
        try:
            if message not in (APPLY_CONFIGURATION, REOPEN_LOG) \
                    or payload_fd is None:
                raise ValueError("an unknown message, %r" % message[:16])
            payload = read_payload(payload_fd)
        except Exception as error:      # pickle raises many kinds
            log.error("worker: cannot read what the main process sent (%s);"
                      " nothing changed", error)
            for fd in fds:
                os.close(fd)
            control.send(b"failed")
            return
        finally:
            if payload_fd is not None:
                os.close(payload_fd)
        if message == REOPEN_LOG:
            for fd in fds:
                os.close(fd)
            reopen_log(*payload)
            control.send(b"reopened")
            return
        settings, specs, logging_target = payload
        reopen_log(*logging_target)     # first: the lines below go there
        received = {}
        for (kind, spec), fd in zip(specs, fds):
            unix_path = spec[len("unix:"):] if isinstance(spec, str) else None
            received[(kind, spec)] = Listener(socket.socket(fileno=fd), kind,
                                              spec, unix_path)
        for fd in fds[len(specs):]:
            os.close(fd)
        try:
            server._adopt(settings, received)
        except ConfigError:
            pass        # logged; this worker keeps what it had
        control.send(b"applied")

    def start(_):
        control.setblocking(False)
        server._loop.watch(control, 0, EVENT_READ, (on_message, None))
    server.call_soon_threadsafe(start, None)


def watch_parent(server: Server, parent_alive: int):
    """A worker whose parent died (SIGKILL, a crash) drains and exits
    instead of serving on as an orphan nobody supervises.  parent_alive is
    the read end of a pipe whose write end only the parent holds: it reads
    EOF once the parent is gone.  A thread waits on it, so nothing wakes
    while the parent lives."""
    def wait():
        while True:
            try:
                if not os.read(parent_alive, 1):
                    break
            except InterruptedError:
                continue
            except OSError:
                break
        os.close(parent_alive)
        log.warning("the parent process is gone: draining")
        server.stop(wait=False)
    threading.Thread(target=wait, name="torsocksd-parent", daemon=True) \
        .start()


def log_statistics(server: Server):
    stats = server.stats()
    udp = stats["udp"]
    log.info("statistics: %d accepted, %d open, %d refused at accept, "
             "%d bytes relayed by closed connections; %d UDP associations "
             "open, %d datagrams relayed, %d dropped", stats["accepted"],
             stats["active"], stats["refused_at_accept"],
             stats["relayed_bytes"], stats["udp_associations"],
             sum(count for name, count in udp.items()
                 if name.startswith("datagrams")),
             sum(count for name, count in udp.items()
                 if name.startswith("dropped")))


# =============================================================================
# Command line
# =============================================================================

EX_USAGE = 64           # sysexits.h
EX_UNAVAILABLE = 69

EPILOG = """\
examples:
  torsocksd                          listen on 127.0.0.1:9050
  torsocksd --port 1080              listen on 127.0.0.1:1080
  torsocksd --listen [::1]:9050 --listen 127.0.0.1:9050
  torsocksd --http-tunnel 127.0.0.1:9080    also an HTTP CONNECT port
  curl --socks5-hostname 127.0.0.1:9050 http://example.com/
  https_proxy=http://127.0.0.1:9080 curl https://example.com/

Names are always resolved by torsocksd.  Destinations are written to the
log as [scrubbed] unless --log-destinations is given.  SIGTERM or SIGINT
stops accepting and lets open connections finish for --drain-timeout
seconds; a second signal ends them at once.
"""


class OrderedRule(argparse.Action):
    """--allow and --deny into one list, in command-line order."""

    def __init__(self, *args, verdict=True, **kwargs):
        super().__init__(*args, **kwargs)
        self.verdict = verdict

    def __call__(self, parser, namespace, value, option_string=None):
        try:
            parse_network(value)
        except ValueError as error:
            raise argparse.ArgumentError(self, str(error))
        rules = list(getattr(namespace, self.dest) or [])
        rules.append((self.verdict, value))
        setattr(namespace, self.dest, rules)


def network_argument(text: str) -> str:
    """A CIDR (or one address, or *), checked; kept as written."""
    try:
        parse_network(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error))
    return text


def policy_rule(text: str) -> str:
    try:
        DestinationPolicy.parse_rule(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error))
    return text


def router_pin(text: str):
    """"ADDR:PORT=FINGERPRINT" -> ((ADDR, PORT), 20-byte fingerprint)."""
    where, equals, fingerprint = text.partition("=")
    if not equals:
        raise argparse.ArgumentTypeError("%r: write ADDR:PORT=FINGERPRINT"
                                         % text)
    try:
        host, port = split_host_port(where)
        return ((str(ip_of(host)), parse_port(port)),
                parse_fingerprint(fingerprint))
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def ip_argument(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error))


def parse_listen(spec: str):
    """"ADDR:PORT", "[IPv6]:PORT", "PORT" -> (host, port); "unix:/path"
    stays as it is."""
    if spec.startswith("unix:"):
        if len(spec) == len("unix:"):
            raise argparse.ArgumentTypeError("%r: no path" % spec)
        return spec
    if spec.isdigit():
        spec = ":" + spec
    try:
        host, port = split_host_port(spec)
        return (host or DEFAULT_ADDRESS, parse_port(port, zero_allowed=True))
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def port_number(text: str) -> int:
    """--port: 1 to 65535, or 0 for one the system picks."""
    try:
        return parse_port(text, zero_allowed=True)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def metrics_address(text: str):
    """--metrics: "ADDR:PORT", "[IPv6]:PORT" or "PORT" (on 127.0.0.1)."""
    spec = parse_listen(text)
    if isinstance(spec, str):
        raise argparse.ArgumentTypeError("%r: the metrics page is served "
                                         "over TCP only" % text)
    return spec


def whole_number(least: int):
    """An argparse type: a whole number, least or more."""
    def whole_number_argument(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError("%r is not a whole number"
                                             % text)
        if value < least:
            raise argparse.ArgumentTypeError("must be %d or more" % least)
        return value
    return whole_number_argument


positive_int = whole_number(1)
non_negative_int = whole_number(0)


def positive_seconds(text: str) -> float:
    value = finite_seconds(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("must be more than 0 seconds")
    return value


def seconds(text: str) -> float:
    """A number of seconds, 0 or more."""
    value = finite_seconds(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 seconds or more")
    return value


def finite_seconds(text: str) -> float:
    """inf and nan are not times: one would overflow the loop's select(),
    the other make it spin."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("%r is not a number" % text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError("must be a finite number of seconds")
    return value


def file_mode(text: str) -> int:
    """An octal permission mode, 0 to 777."""
    try:
        value = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError("%r is not an octal mode" % text)
    if not 0 <= value <= 0o777:
        raise argparse.ArgumentTypeError("must be an octal mode from 0 to "
                                         "777")
    return value


class OptionParser(argparse.ArgumentParser):
    """argparse, but a problem in a config file's line is raised as
    ConfigError (while errors_raise is set) instead of ending the process."""
    errors_raise = False

    def error(self, message):
        if self.errors_raise:
            raise ConfigError([message])
        super().error(message)


def build_argument_parser() -> argparse.ArgumentParser:
    """The command line.  Every option that is a Server setting has the
    setting's name as its destination (see SETTING_DEFAULTS); the others
    (how the process runs, logging) are main()'s own.  A config file's
    lines go through this same parser (read_config_file)."""
    parser = OptionParser(
        prog="torsocksd",
        description="A SOCKS4/4A/5 server that speaks Tor's SOCKS dialect "
                    "(RESOLVE, RESOLVE_PTR, CONNECT_DIR), and with "
                    "--http-tunnel an HTTP CONNECT proxy as Tor's "
                    "HTTPTunnelPort; it resolves every name itself.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    default = SETTING_DEFAULTS.get

    config = parser.add_argument_group("configuration")
    config.add_argument("--config", metavar="FILE",
                        help="read options from FILE: one per line, the long "
                             "option's name without dashes, then its value "
                             "(listen 127.0.0.1:9050, policy accept *:443, "
                             "a flag alone); whole-line # comments; read "
                             "again on SIGHUP.  The command line comes on "
                             "top: its options override the file's, except "
                             "repeatable ones (--listen, --allow, --policy, "
                             "...), which add to it")
    config.add_argument("--check-config", action="store_true",
                        help="check the options, the --config file, the "
                             "credentials file and that the listeners can "
                             "be opened, then exit: 0 when all is well, "
                             "else 64 after one line per problem")

    listen = parser.add_argument_group("where to listen")
    listen.add_argument("--port", type=port_number, default=DEFAULT_PORT,
                        help="port for --address (default %(default)s)")
    listen.add_argument("--address", default=DEFAULT_ADDRESS,
                        help="address to listen on (default %(default)s; "
                             "0.0.0.0 or :: for every interface)")
    listen.add_argument("--listen", metavar="ADDR:PORT", action="append",
                        type=parse_listen, default=[],
                        help="listen here instead; repeatable "
                             "([::1]:9050 for IPv6, unix:/path for a Unix "
                             "socket)")
    listen.add_argument("--http-tunnel", metavar="ADDR:PORT", action="append",
                        type=parse_listen, default=[],
                        help="also answer HTTP CONNECT there, as Tor's "
                             "HTTPTunnelPort (for https_proxy=http://ADDR:PORT"
                             "); repeatable, the same forms as --listen")
    listen.add_argument("--metrics", metavar="ADDR:PORT", action="append",
                        type=metrics_address, default=[],
                        help="serve Prometheus metrics (GET /metrics) "
                             "there; PORT alone is on 127.0.0.1; another "
                             "host's scraper needs --allow; repeatable")
    listen.add_argument("--unix-mode", type=file_mode,
                        default=default("unix_mode"), metavar="MODE",
                        help="permissions of unix: listeners (default 600)")

    access = parser.add_argument_group("access")
    access.add_argument("--allow", metavar="CIDR", dest="client_policy",
                        action=OrderedRule, verdict=True, default=[],
                        help="let clients from CIDR in (repeatable; --allow "
                             "and --deny are checked in the order given, the "
                             "first match wins; with any --allow, others are "
                             "refused)")
    access.add_argument("--deny", metavar="CIDR", dest="client_policy",
                        action=OrderedRule, verdict=False,
                        help="refuse clients from CIDR (repeatable)")
    access.add_argument("--policy", metavar="RULE", action="append",
                        dest="destination_policy", default=[],
                        type=policy_rule,
                        help='destination rule "accept|reject ADDR[/MASK]'
                             '[:PORT[-PORT]]" (repeatable, first match '
                             'wins; ADDR may be *; ::ffff:a.b.c.d is '
                             'a.b.c.d; a rule that matches 127.0.0.1 or ::1 '
                             'also matches 0.0.0.0 or ::); remote clients '
                             'never reach loopback, link-local, unspecified '
                             'or multicast addresses unless an accept rule '
                             'names them itself ("accept 127.0.0.1:7001" '
                             'does, "accept *:80" never does)')
    access.add_argument("--pin-relay", metavar="ADDR:PORT=FINGERPRINT",
                        action="append", dest="router_pins", default=[],
                        type=router_pin,
                        help="CONNECT_DIR to the relay at ADDR:PORT (its "
                             "ORPort) must prove this identity (40 hex "
                             "digits); repeatable")
    access.add_argument("--proxy-protocol-from", metavar="CIDR",
                        action="append", default=[], type=network_argument,
                        help="connections from CIDR (a load balancer with "
                             "send-proxy or send-proxy-v2) must begin with a "
                             "PROXY protocol header, whose client address is "
                             "then the client for --allow/--deny, "
                             "--max-per-client, the guard and the log "
                             "(repeatable)")
    access.add_argument("--open-proxy", action="store_true",
                        help="allow a non-loopback listener without --allow, "
                             "--deny or --credentials")
    access.add_argument("--credentials", metavar="FILE",
                        dest="credentials_file",
                        help="file of user:password lines; SOCKS5 clients "
                             "must then present one (RFC 1929), and SOCKS4 "
                             "is refused")
    access.add_argument("--safe-socks", action="store_true",
                        help="refuse requests that give only an IP address "
                             "(the client resolved the name itself)")
    access.add_argument("--test-socks", action="store_true",
                        help="log for every request whether it was safe "
                             "(a name) or unsafe (an IP address)")

    limits = parser.add_argument_group("limits")
    limits.add_argument("--handshake-timeout", type=positive_seconds,
                        default=default("handshake_timeout"),
                        metavar="SECONDS",
                        help="time from accept for the whole SOCKS handshake "
                             "(default %(default)s)")
    limits.add_argument("--connect-timeout", type=positive_seconds,
                        default=default("connect_timeout"), metavar="SECONDS",
                        help="time for a name lookup, and for connecting "
                             "(default %(default)s)")
    limits.add_argument("--idle-timeout", type=positive_seconds,
                        metavar="SECONDS",
                        help="close relayed connections idle at least this "
                             "long (checked every SECONDS, so within twice "
                             "that; default: never)")
    limits.add_argument("--max-login-failures", type=non_negative_int,
                        metavar="N",
                        default=default("max_login_failures"),
                        help="failed logins one client (address, or IPv6 "
                             "/64) may make in 30 s before its logins are "
                             "refused for a while; 0: no limit (default "
                             "%(default)s)")
    limits.add_argument("--max-per-client", type=positive_int, metavar="N",
                        help="connections from one remote client: an "
                             "address, or an IPv6 /64 (default: no cap; "
                             "loopback clients are never capped)")
    limits.add_argument("--drain-timeout", type=seconds,
                        default=default("drain_timeout"), metavar="SECONDS",
                        help="time open connections get at shutdown "
                             "(default %(default)s)")
    limits.add_argument("--max-connections", type=positive_int, metavar="N",
                        help="connections served at once (default: what the "
                             "file descriptor limit allows when each holds "
                             "its client and two connect attempts)")
    limits.add_argument("--nameserver", metavar="IP[:PORT]", action="append",
                        dest="nameservers", default=[], type=parse_nameserver,
                        help="ask this DNS server directly, from the event "
                             "loop, instead of the system resolver "
                             "(repeatable; [IPv6]:PORT)")
    limits.add_argument("--resolver-threads", type=positive_int,
                        default=default("resolver_threads"), metavar="N",
                        help="threads for name lookups (default "
                             "%(default)s); each client gets half of them at "
                             "most")

    optional = parser.add_argument_group(
        "BIND and UDP ASSOCIATE (off by default, as in Tor)")
    optional.add_argument("--enable-bind", action="store_true",
                          help="serve BIND (SOCKS4 and SOCKS5): listen for "
                               "one inbound connection from the address the "
                               "client names, then relay it")
    optional.add_argument("--enable-udp", action="store_true",
                          help="serve UDP ASSOCIATE (SOCKS5): relay the "
                               "client's datagrams while its TCP connection "
                               "stays open")
    optional.add_argument("--max-udp-associations", type=positive_int,
                          default=default("max_udp_associations"),
                          metavar="N",
                          help="UDP associations open at once (default "
                               "%(default)s)")
    optional.add_argument("--max-udp-per-client", type=positive_int,
                          default=default("max_udp_per_client"), metavar="N",
                          help="UDP associations open at once from one "
                               "client address, loopback included (default "
                               "%(default)s)")

    outbound = parser.add_argument_group("outbound connections")
    outbound.add_argument("--outbound-address", metavar="ADDR",
                          action="append", dest="outbound_addresses",
                          default=[], type=ip_argument,
                          help="source address for outbound connections, one "
                               "per family (repeatable)")
    outbound.add_argument("--outbound-interface", metavar="NAME",
                          help="send outbound connections through this "
                               "interface (SO_BINDTODEVICE; needs privilege)")
    family = outbound.add_mutually_exclusive_group()
    family.add_argument("--prefer-ipv6", dest="preferred_ip_version",
                        action="store_const", const=6,
                        help="try IPv6 addresses first and answer RESOLVE "
                             "with IPv6 when there is one")
    family.add_argument("--prefer-ipv4", dest="preferred_ip_version",
                        action="store_const", const=4,
                        help="try IPv4 addresses first (the default for "
                             "RESOLVE; connects follow the resolver's order)")
    family.add_argument("--no-ipv6", dest="ipv6", action="store_false",
                        help="never connect to or answer with IPv6")
    outbound.add_argument("--happy-eyeballs-delay", type=seconds,
                          default=default("happy_eyeballs_delay"),
                          metavar="SECONDS",
                          help="wait this long for an address before trying "
                               "the next one as well (default %(default)s)")

    process = parser.add_argument_group("process")
    process.add_argument("--inetd", action="store_true",
                         help='inetd "nowait": fd 0 is one connected client; '
                              "serve it and exit (logs go to syslog unless "
                              "--log-file)")
    process.add_argument("--inetd-wait", action="store_true",
                         help='inetd "wait": fd 0 is the listening socket; '
                              "exit after --idle-exit seconds without a "
                              "connection")
    process.add_argument("--idle-exit", type=positive_seconds, default=60.0,
                         metavar="SECONDS",
                         help="with --inetd-wait (default %(default)s)")
    process.add_argument("--workers", type=positive_int, default=1,
                         metavar="N",
                         help="worker processes sharing the listeners "
                              "(default %(default)s); per-client limits "
                              "are counted by each")
    process.add_argument("--splice", action="store_true",
                         help="relay with zero-copy os.splice (Linux, Python "
                              "3.10+): less CPU per byte, 4 fds per moving "
                              "connection")
    process.add_argument("--user", metavar="NAME",
                         help="drop privileges to this user after binding")

    logs = parser.add_argument_group("logging")
    logs.add_argument("--log-level", default="info",
                      choices=["debug", "info", "warning", "error"],
                      help="default %(default)s: one line per connection")
    logs.add_argument("--log-file", metavar="PATH",
                      help="log to this file (reopened on SIGHUP)")
    logs.add_argument("--syslog", action="store_true",
                      help="log to syslog (facility daemon)")
    logs.add_argument("--log-destinations", action="store_true",
                      help="write destinations to the log instead of "
                           "[scrubbed]")
    parser.add_argument("--version", action="version",
                        version="%(prog)s " + __version__)
    return parser


# =============================================================================
# Configuration: the config file, the command line on top, its checks
# =============================================================================
# A config file is the command line written one option a line: "listen
# 127.0.0.1:9050" is read as --listen=127.0.0.1:9050 by the same parser, so
# every option means and checks the same in both places, and a problem is
# reported with its file and line.  The command line is parsed on top of
# the file's options: a scalar given there overrides the file's, a
# repeatable option (append actions, --allow/--deny) adds to the file's.

# Options that say how to run this one command, not how to serve.
COMMAND_LINE_ONLY = frozenset(("help", "version", "config", "check_config"))
# Options a running process cannot change: a reload that changes them says
# that they wait for a restart.
RESTART_ONLY = ("workers", "user", "inetd", "inetd_wait", "idle_exit")


def config_file_options(parser: argparse.ArgumentParser) -> dict:
    """The names a config file may use (long options without dashes), each
    with its argparse action."""
    return {text[2:]: action
            for text, action in parser._option_string_actions.items()
            if text.startswith("--") and action.dest not in COMMAND_LINE_ONLY}


def read_config_file(parser: OptionParser, path: str,
                     namespace: argparse.Namespace) -> list:
    """Parse the config file at path into namespace, line by line through
    the command line's parser; every problem as "path:line: what"."""
    try:
        with open(path, encoding="utf-8") as file:
            lines = file.read().splitlines()
    except (OSError, UnicodeError) as error:
        return ["cannot read the config file: %s" % error]
    known = config_file_options(parser)
    problems = []
    for number, line in enumerate(lines, 1):
        words = line.split(None, 1)
        if not words or words[0].startswith("#"):
            continue
        name, value = words[0], words[1].strip() if len(words) > 1 else None
        if name not in known:
            problems.append("%s:%d: unknown option %r" % (path, number,
                                                          clip_for_log(name)))
            continue
        token = "--" + name if value is None else "--%s=%s" % (name, value)
        parser.errors_raise = True
        try:
            parser.parse_args([token], namespace)
        except ConfigError as error:
            problems.append("%s:%d: %s" % (path, number, error))
        finally:
            parser.errors_raise = False
    return problems


def load_options(parser: OptionParser, argv):
    """The options argv asks for: its --config file's, then argv's own on
    top.  (options, problems); argv itself was checked already."""
    command_line = parser.parse_args(argv)
    if not command_line.config:
        return command_line, []
    options = argparse.Namespace()
    problems = read_config_file(parser, command_line.config, options)
    return parser.parse_args(argv, options), problems


def combination_problems(options, handed_in: bool) -> list:
    """Options that exclude each other (the file's lines are parsed one by
    one, so argparse cannot tell), or that do not fit handed-in sockets."""
    problems = []
    if handed_in and (options.listen or options.inetd or options.inetd_wait):
        problems.append("sockets came from systemd (LISTEN_FDS); --listen, "
                        "--inetd and --inetd-wait cannot be added to them")
    if options.inetd and options.inetd_wait:
        problems.append("--inetd and --inetd-wait exclude each other")
    if (options.inetd or options.inetd_wait) and options.http_tunnel:
        problems.append("--http-tunnel needs listeners of its own; under "
                        "inetd, give the HTTP port its own inetd line instead")
    if options.preferred_ip_version is not None and not options.ipv6:
        problems.append("--prefer-ipv%d and --no-ipv6 exclude each other"
                        % options.preferred_ip_version)
    if options.splice and not HAVE_SPLICE:
        problems.append("--splice needs Linux and Python 3.10 or newer")
    return problems


def settings_from_options(options, handed_in: bool = False) -> dict:
    """The Server options that the parsed options give; the credentials
    file is read (ConfigError when it cannot be)."""
    settings = {name: value for name, value in vars(options).items()
                if name in SETTING_DEFAULTS}
    settings["listen"] = () if handed_in else (
        options.listen or [(options.address, options.port)])
    if options.inetd_wait:
        settings["exit_when_idle"] = options.idle_exit
    if options.credentials_file:
        try:
            settings["credentials"] = Credentials.from_file(
                options.credentials_file)
        except (OSError, ValueError) as error:
            raise ConfigError(["cannot read credentials: %s" % error])
    return settings


def probe_listener(spec):
    """Whether spec could be listened on, found without keeping anything
    open: (problem or None, note or None, (family, address) or None).  A
    port in use is a note: the running torsocksd may hold it."""
    if isinstance(spec, str):
        path = spec[len("unix:"):]
        folder = os.path.dirname(path) or "."
        if not os.path.isdir(folder):
            return "%s: no such directory" % spec, None, None
        if not os.access(folder, os.W_OK | os.X_OK):
            return "%s: cannot make a socket in %s" % (spec, folder), None, \
                None
        if os.path.lexists(path) and not stat_is_socket(path):
            return "%s: exists and is not a socket" % spec, None, None
        return None, None, (socket.AF_UNIX, path)
    where = format_address(spec)
    try:
        infos = socket.getaddrinfo(spec[0], spec[1], socket.AF_UNSPEC,
                                   socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    except (OSError, UnicodeError) as error:
        return "%s: %s" % (where, error), None, None
    family, kind, protocol, _, sockaddr = infos[0]
    with socket.socket(family, kind, protocol) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            probe.bind(sockaddr)
        except OSError as error:
            if error.errno != errno.EADDRINUSE:
                return "%s: %s" % (where, error.strerror), None, None
            return None, "%s is in use now (by this torsocksd, when it " \
                "runs)" % where, (family, sockaddr)
    return None, None, (family, sockaddr)


def check_configuration(options, problems) -> int:
    """--check-config: every problem on stderr, one a line; the status."""
    problems = list(problems)
    problems += combination_problems(options, handed_in=False)
    notes, settings = [], None
    try:
        settings = Settings(**settings_from_options(options))
    except ConfigError as error:
        problems += error.problems
    except (OSError, ValueError, TypeError) as error:
        problems.append(str(error))
    if settings is not None:
        listeners = []
        for kind, spec in wanted_listeners(settings):
            problem, note, bound = probe_listener(spec)
            problems += [problem] if problem else []
            notes += [note] if note else []
            if bound is not None:
                listeners.append((kind,) + bound)
        problems += exposure_problems(settings, listeners)
    if options.user:
        import pwd
        try:
            pwd.getpwnam(options.user)
        except KeyError:
            problems.append("--user %s: no such user" % options.user)
    if options.log_file:
        target = options.log_file if os.path.exists(options.log_file) \
            else os.path.dirname(os.path.abspath(options.log_file))
        if not os.access(target, os.W_OK):
            problems.append("--log-file %s: cannot write there"
                            % options.log_file)
    for line in notes:
        print("torsocksd: note: %s" % line, file=sys.stderr)
    for problem in problems:
        print("torsocksd: %s" % problem, file=sys.stderr)
    if problems:
        return EX_USAGE
    print("torsocksd: the configuration is valid", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    """Run torsocksd with the command line argv (default sys.argv[1:]);
    return the exit status."""
    parser = build_argument_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    parser.parse_args(argv)     # a bad command line ends here, status 2
    options, problems = load_options(parser, argv)
    if options.check_config:
        return check_configuration(options, problems)
    inetd = options.inetd or options.inetd_wait
    # Under inetd, stdout and stderr may be the client's socket.
    try:
        configure_logging(*logging_target(options, inetd))
    except OSError as error:
        print("torsocksd: cannot log there: %s" % error, file=sys.stderr)
        return EX_UNAVAILABLE
    if problems:
        for problem in problems:
            log.error("%s", problem)
        return EX_USAGE
    raise_file_limit()
    try:
        listeners, connections = socket_activation()
    except (OSError, ValueError) as error:
        log.error("socket activation: %s", error)
        return EX_USAGE
    passed = listeners + connections
    problems = combination_problems(options, handed_in=bool(passed))
    if problems:
        parser.error(problems[0])
    if options.inetd:
        passed = [socket.socket(fileno=0)]
    elif options.inetd_wait:
        passed = [socket.socket(fileno=0)]
    if inetd:
        # stdout and stderr may be the client's socket: nothing may reach
        # it, not even logging's own complaint about an absent syslog.
        logging.raiseExceptions = False
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
            os.dup2(null.fileno(), 2)
    handed_in = bool(passed)
    try:
        settings = settings_from_options(options, handed_in)
    except ConfigError as error:
        log.error("%s", error)
        return EX_USAGE
    current = [options]     # the options in force (logging is main's)
    read = []               # the options a reload read, once it applies

    def read_again() -> dict:
        """What a reload applies: the config file and argv, read again."""
        new, problems = load_options(parser, argv)
        problems += combination_problems(new, handed_in)
        if problems:
            raise ConfigError(problems)
        for name in RESTART_ONLY:
            if getattr(new, name) != getattr(current[0], name):
                log.warning("reload: --%s changes only at a restart",
                            name.replace("_", "-"))
        settings = settings_from_options(new, handed_in)
        read[:] = [new]
        return settings

    server = Server(sockets=passed, config_source=read_again, **settings)

    def log_target():
        return logging_target(current[0], inetd)

    def reload_configuration() -> bool:
        """SIGHUP's work: the log reopened first (logrotate may have moved
        it: what the reload says goes to the new file), then the
        configuration read again and applied (True), or not at all."""
        before = log_target()
        reopen_log(*before)
        del read[:]
        try:
            server.reload()
        except ConfigError:
            return False        # each problem is logged; the old one stays
        current[:] = read
        if log_target() != before:
            reopen_log(*log_target())
        return True

    def reload():
        sd_notify_reloading()
        reload_configuration()
        sd_notify("READY=1\nSTATUS=accepting on %s"
                  % ", ".join(server.stats()["listeners"]))

    workers = options.workers > 1 and not connections and not options.inetd
    # Before the first "listening" line: a signal from then on drains (or
    # reloads).  With workers the signals wait, blocked, until run_workers
    # has its handlers.
    if workers:
        signal.pthread_sigmask(signal.SIG_BLOCK, PASSED_SIGNALS)
    else:
        install_signal_handlers(server, reload)
    try:
        server.bind()
        if options.user:
            drop_privileges(options.user)
    except ValueError as error:
        log.error("%s", error)
        return EX_USAGE
    except (OSError, KeyError) as error:
        log.error("cannot start: %s", error)
        return EX_UNAVAILABLE
    if workers:
        return run_workers(server, options.workers, reload_configuration,
                           log_target)
    if not connections and not options.inetd:
        sd_notify("READY=1\nSTATUS=accepting on %s"
                  % ", ".join(server.stats()["listeners"]))
    server.serve_forever()
    log.info("stopped")
    return 0


def logging_target(options, inetd: bool) -> tuple:
    """configure_logging()'s arguments for options.  Under inetd, stdout
    and stderr may be the client's socket: syslog unless --log-file."""
    return (options.log_level, options.log_file,
            options.syslog or (inetd and not options.log_file))


def reopen_log(level: str, log_file: Optional[str], use_syslog: bool):
    """Logging as asked, the file reopened (after logrotate); when the new
    handler cannot be made, the old one stays, and says why."""
    try:
        configure_logging(level, log_file, use_syslog)
    except OSError as error:
        log.error("reload: cannot reopen the log (%s); logging goes on as "
                  "before", error)


def _main_after_exec(compiled: bool) -> int:
    """main() in the interpreter the script handed over to (see "Run as a
    script" at the top).  compiled: the import found no fresh bytecode and
    compiled this file, and glibc keeps what that freed (some 8 MiB) until
    asked to give it back."""
    if compiled:
        try:
            import ctypes
            ctypes.CDLL(None).malloc_trim(0)
        except (ImportError, OSError, AttributeError):
            pass            # not glibc: the memory stays with the process
    return main()


if __name__ == "__main__":
    sys.exit(main())
