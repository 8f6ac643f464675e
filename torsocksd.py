#!/usr/bin/env python3
"""torsocksd: a small SOCKS server that speaks Tor's SOCKS dialect.

It serves SOCKS4, SOCKS4A and SOCKS5 (RFC 1928, with RFC 1929 username and
password) plus Tor's extensions: RESOLVE (0xF0), RESOLVE_PTR (0xF1),
CONNECT_DIR (0xF2: a one-hop BEGIN_DIR stream to a Tor relay's directory
service) and the answer to a client that speaks HTTP to a SOCKS port.  Every
name is looked up on the proxy side, never by the client.

Run it:      python3 torsocksd.py --port 9050
Embed it:    with torsocksd.Server(listen=[("127.0.0.1", 0)]) as server: ...

One file, the standard library only, CPython 3.8 or newer.  One non-blocking
selectors loop carries every connection; name lookups run in a small bounded
pool of worker threads that report back to the loop through a socketpair.

The file reads top to bottom in the order data flows: protocol constants,
pure parsers and reply builders, policy, resolvers, the connection state
machine, the loop and Server, process integration, and the command line.
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
    # pure parsers
    "detect_protocol", "parse_http_method", "parse_socks4_request",
    "parse_socks5_greeting", "parse_username_password", "parse_socks5_request",
    "hostname_problem", "ip_literal",
    # pure reply builders
    "socks4_reply", "socks5_reply", "socks5_address_reply",
    "socks5_hostname_reply", "socks5_method_reply", "username_password_reply",
    "failure_reply", "http_reply", "reply_for_errno",
    # policy
    "choose_method", "special_name_refusal", "destination_refusal",
    "Credentials", "ClientPolicy", "DestinationPolicy",
    # resolvers, the server, the command line
    "ResolverResult", "SystemResolver", "DnsResolver", "DnsAnswer",
    "DnsFormatError", "DnsType", "DnsRcode", "encode_dns_query",
    "parse_dns_response", "parse_nameserver",
    "State", "Server", "main",
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
import queue
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
    CONNECT_DIR = 0xF2      # the seed-era spec: a one-hop BEGIN_DIR tunnel


# Commands after whose reply bytes flow: the client's early data is kept.
RELAYED_COMMANDS = frozenset((Command.CONNECT, Command.CONNECT_DIR))
# Commands whose answer is a lookup's result, then a close.
LOOKUP_COMMANDS = frozenset((Command.RESOLVE, Command.RESOLVE_PTR))

# SOCKS4 has no UDP ASSOCIATE; Tor's grammar takes CONNECT, BIND, RESOLVE and
# RESOLVE_PTR, and the seed era added CONNECT_DIR.
SOCKS4_COMMANDS = frozenset((Command.CONNECT, Command.BIND, Command.RESOLVE,
                             Command.RESOLVE_PTR, Command.CONNECT_DIR))


class AddressType(enum.IntEnum):
    IPV4 = 0x01
    DOMAIN = 0x03
    IPV6 = 0x04


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
    """What the first byte a client sends says it speaks."""
    SOCKS4 = "SOCKS4"
    SOCKS5 = "SOCKS5"
    HTTP = "HTTP"
    TLS = "TLS"
    UNKNOWN = "unknown"


USERPASS_VERSION = 0x01            # RFC 1929 §2: the subnegotiation's version
USERPASS_SUCCESS = 0x00
USERPASS_FAILURE = 0x01            # any non-zero status is failure (RFC 1929 §2)
TLS_HANDSHAKE_RECORD = 0x16        # first byte of a TLS ClientHello record

MAX_SOCKS4_USERID = 512            # Tor's MAX_SOCKS_MESSAGE_LEN: 512 ok, 513 refused
MAX_HOSTNAME = 255                 # SOCKS5 length byte; Tor's MAX_SOCKS_ADDR_LEN - 1
MAX_HANDSHAKE_BYTES = 1024         # DECISIONS row 17: bytes buffered before a request
SPECIAL_SUFFIXES = (".onion", ".exit")   # never sent to DNS (DECISIONS row 16)

ZERO_IPV4 = bytes(4)
ZERO_IPV6 = bytes(16)
ZERO_PORT = bytes(2)

# HTTP methods whose first letter sends a client the HTTP page.  Tor looks at
# G, H, P and C only; OPTIONS, DELETE and TRACE are added (DECISIONS row 1).
HTTP_FIRST_BYTES = frozenset(b"GHPCODT")


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
    """Tell the protocol from a client's first byte (DECISIONS row 1)."""
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


def hostname_problem(name: bytes) -> Optional[str]:
    """Why a hostname from the wire is unusable, or None (DECISIONS row 16)."""
    if not name:
        return "empty hostname"
    if len(name) > MAX_HOSTNAME:
        return "hostname longer than 255 bytes"
    # Printable ASCII without the space: rejects NUL (Tor silently cuts a name
    # at a NUL), control bytes and UTF-8.
    if any(byte < 0x21 or byte > 0x7E for byte in name):
        return "hostname has a byte outside printable ASCII"
    return None


def ip_literal(host: str):
    """The IPv4Address or IPv6Address that host spells, or None.

    Accepts "192.0.2.1", "2001:db8::1" and "[2001:db8::1]" (clients send IP
    literals as hostnames: torsocks does for every CONNECT).
    """
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        return ipaddress.ip_address(host)
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
    command = Command(data[1])
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
    raw_host = bytes(data[userid_end + 1:host_end])
    problem = hostname_problem(raw_host)
    if problem:
        return _socks4_rejection("SOCKS4A " + problem)
    return Parsed(Socks4Request(command, port, raw_host.decode("ascii"),
                                userid, True), host_end + 1)


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
    try:
        command = Command(data[1])
    except ValueError:
        return _socks5_rejection(Reply.COMMAND_NOT_SUPPORTED,
                               "unknown SOCKS5 command 0x%02x" % data[1])
    if len(data) < 3:
        return NEED_MORE
    if data[2] != 0:
        return _socks5_rejection(Reply.GENERAL_FAILURE,
                               "SOCKS5 reserved byte is not zero")
    if len(data) < 4:
        return NEED_MORE
    try:
        address_type = AddressType(data[3])
    except ValueError:
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
        raw_host = bytes(data[5:address_end])
        problem = hostname_problem(raw_host)
        if problem:
            return _socks5_rejection(Reply.GENERAL_FAILURE, problem)
        host = raw_host.decode("ascii")
    port = int.from_bytes(data[address_end:address_end + 2], "big")
    return Parsed(Socks5Request(command, address_type, host, port),
                  address_end + 2)


# =============================================================================
# Pure reply builders
# =============================================================================
# Total: every outcome gives a complete, valid reply.

def socks4_reply(code: Socks4Reply, address: bytes = ZERO_IPV4) -> bytes:
    """VN 0, CD, port 0, DSTIP (zero, or a RESOLVE answer).  Clients such as
    curl and tor-resolve insist on VN 0 and port 0."""
    return bytes((0, code)) + ZERO_PORT + address


def socks5_reply(reply: Reply, client_family: int = socket.AF_INET) -> bytes:
    """Reply with a zero BND.ADDR and BND.PORT (DECISIONS row 9).

    ATYP 1 (10 bytes) for a client on IPv4, ATYP 4 (22 bytes) for a client on
    IPv6 or a Unix socket, as Tor does; it reveals nothing of the outbound side.
    """
    if client_family == socket.AF_INET:
        return bytes((Version.SOCKS5, reply, 0, AddressType.IPV4)) \
            + ZERO_IPV4 + ZERO_PORT
    return bytes((Version.SOCKS5, reply, 0, AddressType.IPV6)) \
        + ZERO_IPV6 + ZERO_PORT


def socks5_address_reply(address) -> bytes:
    """A RESOLVE answer: the address in BND.ADDR, port 0 (DECISIONS row 11)."""
    if address.version == 4:
        return bytes((Version.SOCKS5, Reply.SUCCEEDED, 0, AddressType.IPV4)) \
            + address.packed + ZERO_PORT
    return bytes((Version.SOCKS5, Reply.SUCCEEDED, 0, AddressType.IPV6)) \
        + address.packed + ZERO_PORT


def socks5_hostname_reply(name: str) -> bytes:
    """A RESOLVE_PTR answer (DECISIONS row 12), or the failure reply when the
    name cannot be carried (not ASCII, or longer than 255 bytes)."""
    try:
        raw = name.rstrip(".").encode("ascii")
    except UnicodeEncodeError:
        raw = b""
    if hostname_problem(raw):
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


# RFC 1928 §6 reply for each connect() errno (DECISIONS row 10); anything not
# listed is a general failure.
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


HTTP_PAGE = """\
<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><title>This is a SOCKS proxy</title></head>
<body>
<h1>This is a SOCKS proxy, not an HTTP proxy</h1>
<p>Your browser or tool sent an HTTP request to torsocksd, which speaks only
SOCKS (versions 4, 4a and 5).</p>
<p>To use it, set your program's proxy type to <b>SOCKS5</b> (or SOCKS4a) with
this host and port, and let the proxy resolve host names: in Firefox, tick
"Proxy DNS when using SOCKS v5"; with curl, use
<code>--socks5-hostname HOST:PORT</code> or <code>-x socks5h://HOST:PORT</code>;
elsewhere, set <code>ALL_PROXY=socks5h://HOST:PORT</code>.</p>
</body>
</html>
""".encode("utf-8")


def http_reply(method: bytes) -> bytes:
    """HTTP/1.0 501 with our page; HEAD gets the headers only (DECISIONS row 2)."""
    head = ("HTTP/1.0 501 Not Implemented: this is a SOCKS proxy\r\n"
            "Content-Type: text/html; charset=utf-8\r\n"
            "Content-Length: %d\r\n"
            "Connection: close\r\n"
            "\r\n" % len(HTTP_PAGE)).encode("ascii")
    return head if method == b"HEAD" else head + HTTP_PAGE


# =============================================================================
# Policy: what the server allows and which method it picks (decisions, no I/O)
# =============================================================================

def choose_method(offered: bytes, credentials_required: bool) -> Method:
    """Pick a SOCKS5 method from those offered (DECISIONS row 3).

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
        """One "user:password" a line; blank lines and "#" comments skipped."""
        pairs = []
        with open(path, "rb") as lines:
            for number, line in enumerate(lines, 1):
                line = line.rstrip(b"\r\n")
                if not line.strip() or line.startswith(b"#"):
                    continue
                user, colon, password = line.partition(b":")
                if not colon or len(user) > 255 or len(password) > 255:
                    raise ValueError("%s:%d: not a user:password line of at "
                                     "most 255 bytes each" % (path, number))
                pairs.append((user, password))
        return cls(pairs)

    def __bool__(self):
        return bool(self._digests)

    def check(self, username: bytes, password: bytes) -> bool:
        offered = self._digest(username, password)
        matched = False
        for digest in self._digests:
            matched |= hmac.compare_digest(digest, offered)
        return matched


def special_name_refusal(host: str) -> Optional[str]:
    """Why a name must never reach DNS (.onion, .exit), or None."""
    name = host.rstrip(".").lower()
    if name.endswith(SPECIAL_SUFFIXES) or name in ("onion", "exit"):
        return "a .onion or .exit name, which is never looked up"
    return None


def destination_refusal(client_is_local: bool, destination) -> Optional[str]:
    """Why a destination address is off limits to this client, or None.

    A client on loopback (or a Unix socket) may reach anything it could reach
    itself.  A client from another host may not use the proxy to reach this
    host's loopback, link-local (cloud metadata at 169.254.169.254 among
    them), unspecified or multicast addresses (DECISIONS row 19).
    """
    if client_is_local:
        return None
    if getattr(destination, "ipv4_mapped", None) is not None:
        destination = destination.ipv4_mapped
    if (destination.is_loopback or destination.is_link_local
            or destination.is_unspecified or destination.is_multicast):
        return "a remote client may not reach a local-only address"
    return None


def parse_network(text: str):
    """"192.0.2.0/24", "2001:db8::/32", "192.0.2.7" or "*" -> a network
    (or None for "*": any address of either family)."""
    if text == "*":
        return None
    if text.startswith("[") and "]" in text:
        text = text[1:].replace("]", "", 1)
    return ipaddress.ip_network(text, strict=False)


def network_contains(network, address) -> bool:
    if network is None:
        return True
    if getattr(address, "ipv4_mapped", None) is not None:
        address = address.ipv4_mapped
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
    deciding; then the built-in rule for remote clients (DECISIONS row 19);
    then accept."""

    def __init__(self, rules=()):
        self.rules = [self.parse_rule(rule) for rule in rules]

    @staticmethod
    def parse_rule(text: str):
        verdict, _, target = text.strip().partition(" ")
        if verdict not in ("accept", "reject") or not target.strip():
            raise ValueError("%r: a rule is accept|reject ADDR[/MASK]"
                             "[:PORT[-PORT]]" % text)
        target = target.strip()
        low, high = 0, 65535        # no port given, or "*": every port
        if target.startswith("["):
            address, _, ports = target[1:].partition("]")
            ports = ports[1:] if ports.startswith(":") else ports
        elif target.count(":") == 1:
            address, _, ports = target.partition(":")
        else:
            address, ports = target, ""
        if ports and ports != "*":
            first, _, last = ports.partition("-")
            low, high = int(first), int(last or first)
        return verdict == "accept", parse_network(address), low, high

    def refusal(self, client_is_local: bool, address, port: int):
        for accepted, network, low, high in self.rules:
            if low <= port <= high and network_contains(network, address):
                return None if accepted else "refused by --policy"
        return destination_refusal(client_is_local, address)


def happy_eyeballs_order(addresses, preferred_version=None):
    """Alternate the address families (RFC 8305 §4), starting with the
    preferred version, else with the family of the first answer."""
    if not addresses:
        return []
    first = preferred_version or addresses[0].version
    primary = [a for a in addresses if a.version == first]
    secondary = [a for a in addresses if a.version != first]
    ordered = []
    for pair in itertools.zip_longest(primary, secondary):
        ordered.extend(a for a in pair if a is not None)
    return ordered


def is_unsafe_request(version: Version, address_type, command: Command) -> bool:
    """True when the client gave only an IP address, so it resolved the name
    itself and may be leaking DNS (Tor's SafeSocks rule, DECISIONS row 18)."""
    if command not in (Command.CONNECT, Command.RESOLVE):
        return False
    if version == Version.SOCKS4:
        return address_type != AddressType.DOMAIN
    return address_type in (AddressType.IPV4, AddressType.IPV6)


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


class _Lookup:
    __slots__ = ("query", "callback", "cancelled")

    def __init__(self, query, callback):
        self.query = query
        self.callback = callback
        self.cancelled = False

    def cancel(self):
        self.cancelled = True


class SystemResolver:
    """getaddrinfo and getnameinfo(NI_NAMEREQD) in a bounded worker pool.

    Threads start on the first lookup, so a server that only meets IP
    literals never starts one.  Past max_pending queued lookups a new one
    fails at once instead of queueing without bound.
    """

    def __init__(self, workers: int = 4, max_pending: int = 512):
        self.workers = max(1, workers)
        self.max_pending = max_pending
        self._jobs = queue.Queue()
        self._threads = []
        self._lock = threading.Lock()
        self._closed = False

    def lookup(self, hostname: str, callback) -> _Lookup:
        return self._submit(_Lookup(("name", hostname), callback))

    def reverse(self, address, callback) -> _Lookup:
        return self._submit(_Lookup(("address", address), callback))

    def close(self):
        with self._lock:
            self._closed = True
            threads, self._threads = self._threads, []
        for _ in threads:
            self._jobs.put(None)
        # Daemon threads: one stuck in getaddrinfo must not hold up a stop.
        deadline = time.monotonic() + 1.0
        for thread in threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))

    def _submit(self, job: _Lookup) -> _Lookup:
        if self._jobs.qsize() >= self.max_pending or self._closed:
            job.callback(ResolverResult((), Reply.GENERAL_FAILURE,
                                        "too many pending name lookups"))
            return job
        with self._lock:
            if len(self._threads) < self.workers:
                thread = threading.Thread(target=self._work, daemon=True,
                                          name="torsocksd-resolver")
                self._threads.append(thread)
                thread.start()
        self._jobs.put(job)
        return job

    def _work(self):
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if job.cancelled:
                continue
            kind, query = job.query
            try:
                if kind == "name":
                    result = self._getaddrinfo(query)
                else:
                    result = self._getnameinfo(query)
            except Exception as error:      # a worker must outlive any one
                result = ResolverResult((), Reply.GENERAL_FAILURE,
                                        "lookup failed: %r" % error)
            if not job.cancelled:
                job.callback(result)

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


def _read_name(message: bytes, offset: int):
    """The dotted name at offset and the offset after it (RFC 1035 §4.1.4).
    A pointer must point before the run of labels it ends, so a chain of
    pointers always ends."""
    labels = []
    wire_length = 1         # the root label's zero byte
    run_start = offset
    end = None              # where the name ends in place: after its pointer
    while True:
        if offset >= len(message):
            raise DnsFormatError("name runs past the end")
        size = message[offset]
        if size & DNS_POINTER == DNS_POINTER:
            if offset + 1 >= len(message):
                raise DnsFormatError("pointer runs past the end")
            target = (size & ~DNS_POINTER) << 8 | message[offset + 1]
            if target >= run_start:
                raise DnsFormatError("pointer does not point back")
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


class _Record(NamedTuple):
    owner: bytes        # lowercase dotted name
    rtype: int
    rclass: int
    ttl: int
    start: int          # RDATA's place in the message
    end: int


def _read_records(message: bytes, offset: int, count: int):
    """count resource records from offset (RFC 1035 §4.1.3), and the offset
    after them."""
    records = []
    for _ in range(count):
        owner, offset = _read_name(message, offset)
        if offset + DNS_RECORD.size > len(message):
            raise DnsFormatError("record runs past the end")
        rtype, rclass, ttl, length = DNS_RECORD.unpack_from(message, offset)
        start = offset + DNS_RECORD.size
        offset = start + length
        if offset > len(message):
            raise DnsFormatError("record data runs past the end")
        if ttl & 0x80000000:
            ttl = 0         # RFC 2181 §8: a TTL above 2**31 - 1 means 0
        records.append(_Record(owner.lower(), rtype, rclass, ttl, start,
                               offset))
    return records, offset


def _record_data(message: bytes, record: _Record):
    """An A or AAAA record's address, a PTR or CNAME record's name."""
    data = message[record.start:record.end]
    if record.rtype == DnsType.A and len(data) == 4:
        return ipaddress.IPv4Address(data)
    if record.rtype == DnsType.AAAA and len(data) == 16:
        return ipaddress.IPv6Address(data)
    if record.rtype in (DnsType.PTR, DnsType.CNAME):
        name, end = _read_name(message, record.start)
        if end <= record.end and record.rtype == DnsType.PTR:
            return name.decode("ascii", "replace")
        if end <= record.end:
            return name
    raise DnsFormatError("malformed %s record" % DnsType(record.rtype).name)


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
    when it is malformed."""
    if len(message) < DNS_HEADER.size:
        raise DnsFormatError("shorter than a header")
    ident, flags, questions, answers, authorities, _ = \
        DNS_HEADER.unpack_from(message)
    if (ident != query_id or not flags & DNS_FLAG_RESPONSE
            or flags & DNS_OPCODE_MASK or questions != 1):
        return None
    asked, offset = _read_name(message, DNS_HEADER.size)
    if offset + DNS_QUESTION.size > len(message):
        raise DnsFormatError("question runs past the end")
    if (asked.lower() != _dns_name(name) or DNS_QUESTION.unpack_from(
            message, offset) != (qtype, DNS_CLASS_IN)):
        return None
    rcode = flags & DNS_RCODE_MASK
    if flags & DNS_FLAG_TRUNCATED:
        return DnsAnswer((), 0, rcode, True)
    records, offset = _read_records(message, offset + DNS_QUESTION.size,
                                    answers)
    wanted, ttls = asked.lower(), []
    for _ in range(MAX_CNAME_CHAIN + 1):
        found = [r for r in records if r.owner == wanted
                 and r.rtype == qtype and r.rclass == DNS_CLASS_IN]
        if found:
            return DnsAnswer(tuple(_record_data(message, r) for r in found),
                             min(ttls + [r.ttl for r in found]), rcode, False)
        alias = next((r for r in records if r.owner == wanted
                      and r.rtype == DnsType.CNAME), None)
        if alias is None:
            break
        wanted = _record_data(message, alias).lower()
        ttls.append(alias.ttl)
    authority, _ = _read_records(message, offset, authorities)
    return DnsAnswer((), _negative_ttl(message, authority), rcode, False)


def parse_nameserver(text: str):
    """(IP, port) from --nameserver IP, IP:PORT, [IPv6] or [IPv6]:PORT."""
    host, port = text, str(DNS_PORT)
    if text.startswith("["):
        host, _, port = text[1:].partition("]")
        port = port[1:] if port.startswith(":") else port or str(DNS_PORT)
    elif text.count(":") == 1:      # more colons: a bare IPv6 address
        host, _, port = text.partition(":")
    try:
        address = ipaddress.ip_address(host)
        number = int(port)
        if not 0 < number < 65536:
            raise ValueError(port)
    except ValueError:
        raise argparse.ArgumentTypeError(
            "%r: give IP[:PORT], as 127.0.0.1:5353 or [::1]:53" % text) \
            from None
    return str(address), number


class _DnsLookup:
    """One lookup's handle: its questions, their outcomes, its callback."""
    __slots__ = ("name", "qtypes", "callback", "outcomes", "queries",
                 "result", "cancelled")

    def __init__(self, name: str, qtypes, callback):
        self.name = name
        self.qtypes = qtypes
        self.callback = callback
        self.outcomes = {}      # qtype -> DnsAnswer, or why it failed
        self.queries = []
        self.result = None      # the ResolverResult, once there is one
        self.cancelled = False

    def cancel(self):
        self.cancelled = True
        for query in self.queries:
            query.stop()


class _DnsQuery:
    """One question asked until answered: a try per name server in turn, each
    on a fresh UDP socket with a fresh id and its own deadline; the same
    server over TCP when the UDP answer is truncated."""

    def __init__(self, resolver: "DnsResolver", lookup: _DnsLookup,
                 qtype: int, template: bytes):
        self.resolver = resolver
        self.lookup = lookup
        self.qtype = qtype
        self.template = template    # the query, its id to be replaced
        self.tries = 0
        self.nameserver = None
        self.query_id = None
        self.sock = None
        self.events = 0
        self.over_tcp = False
        self.outgoing = b""         # TCP: what is left to send
        self.incoming = bytearray()     # TCP: the answer so far
        self.deadline = None
        self.failure = "no name server to ask"

    def next_try(self):
        resolver = self.resolver
        self._close_socket()
        self.over_tcp = False
        while self.tries < resolver.attempts * len(resolver.nameservers):
            self.nameserver = resolver.nameservers[
                self.tries % len(resolver.nameservers)]
            self.tries += 1
            # Unguessable, like the kernel-chosen port: a forger must
            # hit both (RFC 5452 §9.2).
            self.query_id = int.from_bytes(os.urandom(2), "big")
            try:
                self._open(socket.SOCK_DGRAM)
                self.sock.send(self._packet())
                self._watch(selectors.EVENT_READ)
            except OSError as error:
                self._failed(error)
                continue
            self._set_deadline()
            return
        self.stop()
        resolver.query_done(self, self.failure)

    def stop(self):
        self.deadline = None
        self._close_socket()
        self.resolver.queries.discard(self)

    def _packet(self) -> bytes:
        return struct.pack("!H", self.query_id) + self.template[2:]

    def _open(self, kind: int):
        host, port = self.nameserver
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, kind)
        self.sock.setblocking(False)
        # Connected, so only the name server's datagrams arrive.
        code = self.sock.connect_ex((host, port))
        if code not in (0, errno.EINPROGRESS):
            raise OSError(code, os.strerror(code))

    def _watch(self, events: int):
        if events != self.events:
            self.resolver.server.watch(self.sock, self.events, events,
                                       self.on_event)
            self.events = events

    def _close_socket(self):
        if self.sock is None:
            return
        if self.events and self.resolver.server.selector is not None:
            self._watch(0)
        self.sock.close()
        self.sock, self.events = None, 0
        self.outgoing, self.incoming = b"", bytearray()

    def _set_deadline(self):
        self.deadline = time.monotonic() + self.resolver.timeout
        self.resolver.server.call_at(self.deadline, self._on_deadline,
                                     self.deadline)

    def _on_deadline(self, when):
        if when == self.deadline:
            self.failure = "name server %s did not answer in time" \
                % self.nameserver[0]
            log.debug("dns: %s", self.failure)
            self.next_try()

    def _failed(self, error: OSError):
        self.failure = "name server %s: %s" % (self.nameserver[0],
                                               error.strerror or error)
        log.debug("dns: %s", self.failure)
        self._close_socket()

    # -- events from the loop -------------------------------------------------

    def on_event(self, mask: int):
        if self.sock is None:
            return      # stopped earlier in this round of events
        try:
            if self.over_tcp:
                self._tcp_ready()
            else:
                self._udp_readable()
        except OSError as error:
            self._failed(error)
            self.next_try()

    def _udp_readable(self):
        for _ in range(DNS_READS_PER_WAKEUP):
            try:
                message = self.sock.recv(MAX_DNS_MESSAGE)
            except BlockingIOError:
                return
            if self._consider(message):
                return

    def _tcp_ready(self):
        if self.outgoing:
            sent = self.sock.send(self.outgoing)
            self.outgoing = self.outgoing[sent:]
            self._watch(selectors.EVENT_WRITE if self.outgoing
                        else selectors.EVENT_READ)
            return
        data = self.sock.recv(DNS_TCP_LENGTH.size + MAX_DNS_MESSAGE
                              - len(self.incoming))
        if not data:
            raise OSError(errno.ECONNRESET, "closed before answering")
        self.incoming += data
        if len(self.incoming) < DNS_TCP_LENGTH.size:
            return
        size, = DNS_TCP_LENGTH.unpack_from(self.incoming)
        if len(self.incoming) < DNS_TCP_LENGTH.size + size:
            return
        if not self._consider(bytes(self.incoming[DNS_TCP_LENGTH.size:])):
            raise OSError(errno.EPROTO, "TCP answer does not fit the question")

    def _consider(self, message: bytes) -> bool:
        """Act on a message; False when it is not an answer to this try."""
        try:
            answer = parse_dns_response(message, self.query_id,
                                        self.lookup.name, self.qtype)
        except DnsFormatError:
            answer = None
        if answer is None or (answer.truncated and self.over_tcp):
            return False
        if answer.truncated:
            self._close_socket()
            self.over_tcp = True
            self._open(socket.SOCK_STREAM)
            packet = self._packet()
            self.outgoing = DNS_TCP_LENGTH.pack(len(packet)) + packet
            self._watch(selectors.EVENT_WRITE)
            self._set_deadline()
        elif answer.rcode in (DnsRcode.NOERROR, DnsRcode.NXDOMAIN):
            self.stop()
            self.resolver.query_done(self, answer)
        else:
            rcode = answer.rcode    # SERVFAIL, REFUSED: ask the next one
            self.failure = "name server %s answered %s" % (
                self.nameserver[0], DnsRcode(rcode).name
                if rcode <= DnsRcode.REFUSED else "rcode %d" % rcode)
            self.next_try()
        return True


class DnsResolver:
    """A stub resolver that runs in the server's loop (--nameserver).

    DnsResolver([("192.0.2.53", 53)]) asks A and AAAA at once (PTR for
    reverse), each over UDP from a fresh socket with a random id; a try
    lasts timeout seconds, then the next name server is asked, attempts
    rounds in all; a truncated answer is asked again over TCP.  Answers are
    cached for their TTL (at most MAX_DNS_TTL; "no such name" for at most
    MAX_NEGATIVE_TTL), the oldest dropped past cache_size entries.
    lookup() and reverse() run in the loop; callbacks come from it.
    """

    def __init__(self, nameservers, timeout: float = 2.0, attempts: int = 2,
                 cache_size: int = 1024):
        if not nameservers:
            raise ValueError("DnsResolver needs a name server")
        self.nameservers = [(str(ipaddress.ip_address(host)), int(port))
                            for host, port in nameservers]
        self.timeout = timeout
        self.attempts = max(1, attempts)
        self.cache_size = cache_size
        # (name, qtype) -> (monotonic expiry, DnsAnswer), oldest first
        self.cache = collections.OrderedDict()
        self.queries = set()        # in flight
        self.server = None

    def attach(self, server):
        self.server = server

    def lookup(self, hostname: str, callback) -> _DnsLookup:
        address = ip_literal(hostname)
        if address is not None:     # never asked
            lookup = _DnsLookup(hostname, (), callback)
            self._finish(lookup, ResolverResult((address,)))
            return lookup
        return self._start(hostname, (DnsType.A, DnsType.AAAA), callback)

    def reverse(self, address, callback) -> _DnsLookup:
        return self._start(address.reverse_pointer, (DnsType.PTR,), callback)

    def close(self):
        for query in list(self.queries):
            query.stop()

    def _start(self, name: str, qtypes, callback) -> _DnsLookup:
        lookup = _DnsLookup(name, qtypes, callback)
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
            query = _DnsQuery(self, lookup, qtype, template)
            lookup.queries.append(query)
            self.queries.add(query)
        for query in list(lookup.queries):
            query.next_try()
        if not lookup.queries:
            self._finish(lookup, self._result(lookup))
        return lookup

    def query_done(self, query: _DnsQuery, outcome):
        if isinstance(outcome, DnsAnswer):
            self._remember(query.lookup.name, query.qtype, outcome)
        lookup = query.lookup
        lookup.outcomes[query.qtype] = outcome
        if len(lookup.outcomes) == len(lookup.qtypes):
            self._finish(lookup, self._result(lookup))

    def _finish(self, lookup: _DnsLookup, result: ResolverResult):
        # Through the timer heap, so a callback never runs inside lookup().
        lookup.result = result
        self.server.call_at(time.monotonic(), self._deliver, lookup)

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
IDENTITY_KEY_BITS = 1024    # tor-spec §4.2: the ID certificate's key size

LINK_HIGH_WATER = 256 * 1024   # TLS bytes queued before streams stop sending
LINK_LOW_WATER = 64 * 1024     # ... and when they are told to resume
LINK_RECV_SIZE = 64 * 1024
LINK_IDLE_TIMEOUT = 60.0       # seconds an unused circuit stays open for reuse


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


def parse_cell(data, circuit_id_len: int = CIRC_ID_LEN):
    """tor-spec §3: one cell from the front of data, or NEED_MORE."""
    header_len = circuit_id_len + 1
    if len(data) < header_len:
        return NEED_MORE
    circuit_id = int.from_bytes(data[:circuit_id_len], "big")
    command = data[circuit_id_len]
    if is_variable_length(command):
        if len(data) < header_len + 2:
            return NEED_MORE
        size = int.from_bytes(data[header_len:header_len + 2], "big")
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
    theirs = {int.from_bytes(payload[i:i + 2], "big")
              for i in range(0, len(payload), 2)}
    common = theirs.intersection(offered)
    if not common:
        raise TorProtocolError("no common link protocol version (relay offers "
                               "%s)" % sorted(theirs))
    return max(common)


def netinfo_payload(relay_address) -> bytes:
    """tor-spec §4.5 as a client sends it: time 0 (clients need not tell
    their clock), the relay's address, none of our own."""
    address = ipaddress.ip_address(relay_address)
    kind = ADDRESS_TYPE_IPV4 if address.version == 4 else ADDRESS_TYPE_IPV6
    return (struct.pack(">IBB", 0, kind, len(address.packed)) + address.packed
            + b"\x00")


def parse_certs_cell(payload: bytes) -> dict:
    """tor-spec §4.2: {certificate type: certificate bytes}; each type once."""
    if not payload:
        raise TorProtocolError("empty CERTS cell")
    certificates = {}
    position = 1
    for _ in range(payload[0]):
        if position + 3 > len(payload):
            raise TorProtocolError("truncated CERTS cell")
        kind = payload[position]
        size = int.from_bytes(payload[position + 1:position + 3], "big")
        position += 3
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
    """The elements inside a constructed element of the given tag."""
    if parent.tag != tag:
        raise TorProtocolError("expected DER tag %#x, got %#x"
                               % (tag, parent.tag))
    children = []
    position = parent.value_start
    while position < parent.end:
        child = der_element(data, position, parent.end)
        children.append(child)
        position = child.end
    return children


def der_value(data, element: DerElement, tag: int) -> bytes:
    if element.tag != tag:
        raise TorProtocolError("expected DER tag %#x, got %#x"
                               % (tag, element.tag))
    return bytes(data[element.value_start:element.end])


def der_positive_integer(data, element: DerElement) -> int:
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
        raise TorProtocolError("unsupported certificate time %r" % text)
    if not text.endswith(b"Z") or not rest.isdigit():
        raise TorProtocolError("unsupported certificate time %r" % text)
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
        raise TorProtocolError("malformed certificate: %s" % error) from None


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
        modulus=der_positive_integer(rsa_public_key, modulus),
        exponent=der_positive_integer(rsa_public_key, exponent))


def _der_encode(tag: int, value: bytes) -> bytes:
    size = len(value)
    if size < 0x80:
        return bytes((tag, size)) + value
    length = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(length))) + length + value


def rsa_pkcs1_verify(modulus: int, exponent: int, message: bytes,
                     signature: bytes, algorithm: bytes) -> bool:
    """RSASSA-PKCS1-v1_5 verification (RFC 8017 §8.2.2) for the signature
    algorithm OID a certificate names."""
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
    in date.  Returns the relay's fingerprint (20 bytes)."""
    missing = [kind.name for kind in (CertType.LINK, CertType.IDENTITY)
               if kind not in certificates]
    if missing:
        raise TorProtocolError("CERTS cell lacks the %s certificate"
                               % " and ".join(missing))
    identity = parse_certificate(certificates[CertType.IDENTITY])
    link = parse_certificate(certificates[CertType.LINK])
    if identity.modulus.bit_length() != IDENTITY_KEY_BITS:
        raise TorProtocolError("identity key is not 1024-bit RSA")
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

    def _ended(self, reason: int, detail: str):
        if self.state in (StreamState.ENDED, StreamState.CLOSED):
            return
        self.state = StreamState.ENDED
        self.end_reason = reason
        self.end_detail = detail
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

    def fail(self, reason: int, detail: str):
        """The circuit is gone (or going): end every stream.  The transport
        sends DESTROY if it should."""
        self.closed = True
        streams, self.streams = list(self.streams.values()), {}
        for stream in streams:
            stream._ended(reason, detail)

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


def tor_tls_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


class TorLink:
    """A link to one relay carrying one CREATE_FAST circuit for BEGIN_DIR
    streams.  open_stream() works at once: streams wait for the circuit.

    server               the torsocksd Server whose loop runs the link
    address, port        the relay's ORPort (address: an IP literal)
    fingerprint          the relay's expected RSA identity (20 bytes), or None
    timeout              seconds to build the circuit, and for each stream
                         to be connected
    idle_timeout         seconds the circuit stays open without streams
    on_closed            called with the link once it has closed
    """

    def __init__(self, server, address: str, port: int,
                 fingerprint: Optional[bytes] = None, timeout: float = 10.0,
                 idle_timeout: float = LINK_IDLE_TIMEOUT, on_closed=None,
                 tls_context: Optional[ssl.SSLContext] = None):
        self.server = server
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
        self.server.call_at(time.monotonic() + self.timeout,
                            self._stream_overdue, stream)
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
        self.server.call_at(0.0, function, argument)    # 0: due at once

    def flush(self):
        """Encrypt queued cells and send what the socket takes now."""
        if self._cells_out and self._tls is not None \
                and self.state is not LinkState.CLOSED:
            data, self._cells_out = bytes(self._cells_out), bytearray()
            try:
                self._tls.write(data)
            except ssl.SSLError as error:
                self._fail_soon(EndReason.TORPROTOCOL, "TLS: %s" % error)
                return
        self._wire_out += self._outgoing.read()
        self._send_wire()
        self._update_interest()

    # -- connecting ------------------------------------------------------------

    def _connect(self):
        self.server.call_at(time.monotonic() + self.timeout,
                            self._setup_overdue, None)
        try:
            # The server's outbound socket: --outbound-address and
            # --outbound-interface apply to relays too.
            self._socket = self.server.outbound_socket(
                ipaddress.ip_address(self.address))
            with_nodelay(self._socket)
            error = self._socket.connect_ex((self.address, self.port))
        except OSError as failure:
            error = failure.errno
        if error not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK):
            self._fail_soon(end_reason_for_errno(error),
                            "connect: %s" % os.strerror(error))
            return
        self._update_interest()

    def _on_socket_event(self, mask: int):
        if self.state is LinkState.CONNECTING:
            error = self._socket.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if error:
                self._fail(end_reason_for_errno(error),
                           "connect: %s" % os.strerror(error))
                return
            self._start_tls()
        if mask & EVENT_READ:
            try:
                self._read_socket()
            except OSError as error:
                self._fail(end_reason_for_errno(error.errno), str(error))
                return
        try:
            self._process_tls()
        except TorProtocolError as error:
            self._fail(EndReason.TORPROTOCOL, str(error))
            return
        except ssl.SSLError as error:
            self._fail(EndReason.TORPROTOCOL, "TLS: %s" % error)
            return
        if self.state is not LinkState.CLOSED:
            self.flush()
            if mask & EVENT_WRITE and len(self._wire_out) < LINK_LOW_WATER:
                self.circuit.notify_writable()

    def _start_tls(self):
        self.state = LinkState.TLS_HANDSHAKE
        self._tls = self._context.wrap_bio(self._incoming, self._outgoing,
                                           server_side=False)

    def _read_socket(self):
        for _ in range(4):              # a few reads, then let others run
            try:
                data = self._socket.recv(LINK_RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            if not data:
                self._incoming.write_eof()
                return
            self._incoming.write(data)
            if len(data) < LINK_RECV_SIZE:
                return

    def _process_tls(self):
        if self.state is LinkState.TLS_HANDSHAKE:
            try:
                self._tls.do_handshake()
            except ssl.SSLWantReadError:
                return
            self._tls_established()
        closed_by_relay = False
        while True:
            try:
                data = self._tls.read(LINK_RECV_SIZE)
            except ssl.SSLWantReadError:
                break
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                data = b""
            if not data:
                closed_by_relay = True
                break
            self._received += data
        self._process_cells()       # what came before the close counts too
        if closed_by_relay:
            self._fail(EndReason.DESTROY, "the relay closed the connection")

    def _tls_established(self):
        self.state = LinkState.VERSIONS
        self._tls_certificate = self._tls.getpeercert(binary_form=True)
        if not self._tls_certificate:
            raise TorProtocolError("the relay sent no TLS certificate")
        self._tls.write(versions_cell())

    # -- cells -----------------------------------------------------------------

    def _process_cells(self):
        used = 0
        received = self._received
        while self.state is not LinkState.CLOSED:
            circuit_id_len = CIRC_ID_LEN
            if self.state is LinkState.VERSIONS:
                circuit_id_len = VERSIONS_CIRC_ID_LEN
            result = parse_cell(memoryview(received)[used:], circuit_id_len)
            if result is NEED_MORE:
                break
            used += result.used
            self._handle_cell(result.message)
        del received[:used]

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
            scrub = self.server.scrub       # a fingerprint names the relay
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
        self.server.call_at(self._last_active + self.idle_timeout,
                            self._idle_overdue, None)

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
        events = EVENT_READ
        if self.state is LinkState.CONNECTING or self._wire_out:
            events = EVENT_READ | EVENT_WRITE
        if events != self._events:
            self.server.watch(self._socket, self._events, events,
                              self._on_socket_event)
            self._events = events

    def _fail_soon(self, reason: int, detail: str):
        """Fail from the loop, not inside the application's call."""
        self.server.call_at(0.0, lambda _: self._fail(reason, detail), None)

    def _fail(self, reason: int, detail: str, send_destroy: bool = True,
              quiet: bool = False):
        """Close the link and end its streams with reason."""
        if self.state is LinkState.CLOSED:
            return
        if send_destroy and self.state in (LinkState.CREATING, LinkState.OPEN):
            self.send_cell(CellCommand.DESTROY, bytes((DESTROY_REASON_NONE,)))
            self.flush()            # one try; the close follows anyway
        log.log(logging.DEBUG if quiet else logging.INFO,
                "Tor link to %s closed: %s", self._name(), detail)
        self.failure = detail
        self.state = LinkState.CLOSED
        if self._events:
            self.server.watch(self._socket, self._events, 0, None)
            self._events = 0
        if self._socket is not None:
            self._socket.close()
        self.circuit.fail(reason, detail)
        if self.on_closed is not None:
            self.on_closed(self)

    def _name(self) -> str:
        """The relay as the log may show it (scrubbed unless asked)."""
        return self.server.scrub(format_address((self.address, self.port)))


class TorLinkPool:
    """The open links, one per relay (and pin): later BEGIN_DIR requests to
    the same relay share its circuit."""

    def __init__(self, server, timeout: float = 10.0,
                 idle_timeout: float = LINK_IDLE_TIMEOUT):
        self.server = server
        self.timeout = timeout
        self.idle_timeout = idle_timeout
        self.links = {}     # (address, port, fingerprint or None) -> TorLink
        self._tls_context = None

    def open_stream(self, address: str, port: int, on_connected, on_data,
                    on_end, fingerprint: Optional[bytes] = None) -> DirStream:
        """A BEGIN_DIR stream to the relay at address:port, over a link that
        is open already when there is one."""
        address = str(ipaddress.ip_address(address))
        link = self._find_link(address, port, fingerprint)
        if link is None:
            if self._tls_context is None:
                self._tls_context = tor_tls_context()
            link = TorLink(self.server, address, port, fingerprint,
                           self.timeout, self.idle_timeout,
                           on_closed=self._forget,
                           tls_context=self._tls_context)
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
# Connection: states, buffers, deadlines
# =============================================================================

class State(enum.Enum):
    GREETING = "greeting"           # first message: SOCKS4 request, SOCKS5 greeting
    AUTHENTICATING = "authenticating"   # RFC 1929 username/password expected
    REQUESTING = "requesting"       # SOCKS5 request expected
    RESOLVING = "resolving"         # waiting for the resolver
    CONNECTING = "connecting"       # outbound connect() in progress
    RELAYING = "relaying"           # bytes flow both ways
    CLOSING = "closing"             # flushing a last reply, then closing
    CLOSED = "closed"


HANDSHAKE_STATES = frozenset((State.GREETING, State.AUTHENTICATING,
                              State.REQUESTING))
SETUP_STATES = frozenset((State.RESOLVING, State.CONNECTING))


RECV_BUFFER_SIZE = 256 * 1024       # one buffer for the whole loop
READS_PER_WAKEUP = 4                # fewer selects under load, still fair
HIGH_WATER = 256 * 1024             # stop reading a side past this backlog
MAX_CONNECT_ATTEMPTS = 16           # addresses of one name tried in turn
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


class _Flow:
    """One direction of a relay: bytes read from source, written to sink.

    Each direction closes on its own (OpenSSH's input/output states): EOF
    from the source stops reading, the backlog drains, then the sink gets
    shutdown(SHUT_WR).
    """
    __slots__ = ("source", "sink", "pending", "pipe", "in_pipe", "reading",
                 "shut", "count")

    def __init__(self, source, sink):
        self.source = source
        self.sink = sink            # None until the target is connected
        self.pending = bytearray()  # bytes read but not yet written
        self.pipe = None            # (read fd, write fd) while splicing
        self.in_pipe = 0            # bytes waiting in that pipe
        self.reading = True         # source not at EOF yet
        self.shut = False           # sink has been shut down for writing
        self.count = 0              # bytes delivered to the sink

    def backlog(self) -> int:
        return len(self.pending) + self.in_pipe


class Connection:
    """One client and, once it asks for one, its target.

    The state moves only through _enter(), which also sets the deadline that
    belongs to the new state.  What the sockets wait for is derived from the
    state and the buffers after every event (_update_interest), never toggled
    by hand.
    """
    __slots__ = ("server", "number", "client", "client_family",
                 "client_label", "client_is_local", "remote", "target",
                 "state", "version", "handshake", "handshake_received",
                 "command", "host", "port", "userid", "candidates",
                 "attempts", "last_reply", "lookup", "deadline", "idle_mark",
                 "tunnel", "upstream", "downstream", "client_events",
                 "target_events", "paused_check", "outcome", "opened")

    def __init__(self, server: "Server", client: socket.socket,
                 client_label: str, remote, number: int):
        self.server = server
        self.number = number
        self.client = client
        self.client_family = client.family
        self.client_label = client_label
        self.remote = remote        # the client's address unless it is local
        self.client_is_local = remote is None
        self.target = None
        self.state = State.GREETING
        self.version = None
        self.handshake = bytearray()
        self.handshake_received = 0
        self.command = None
        self.host = ""
        self.port = 0
        self.candidates = []
        self.attempts = ()          # sockets connecting at once
        self.tunnel = None          # the BEGIN_DIR stream of a CONNECT_DIR
        self.last_reply = Reply.GENERAL_FAILURE
        self.lookup = None
        self.deadline = None        # the timer of the state's deadline
        self.idle_mark = 0
        self.upstream = _Flow(client, None)     # client -> target
        self.downstream = _Flow(None, client)   # target -> client
        self.client_events = 0
        self.target_events = 0
        self.paused_check = False   # a look at an unwatched socket is due
        self.outcome = "closed during handshake"
        self.opened = time.monotonic()
        self.userid = None
        self._set_deadline(server.handshake_timeout)
        self._update_interest()

    # -- state and deadlines ------------------------------------------------

    def _enter(self, state: State):
        if log.isEnabledFor(logging.DEBUG):
            log.debug("conn %d: %s -> %s", self.number, self.state.value,
                      state.value)
        self.state = state
        if state is State.RELAYING:
            self._set_deadline(self.server.idle_timeout)
        elif state is State.RESOLVING or state is State.CONNECTING:
            self._set_deadline(self.server.connect_timeout)
        elif state is State.CLOSING:
            self._set_deadline(CLOSING_LINGER)
            # Nothing more goes to the client after the last reply: once it
            # is flushed, the client's side is shut down (_flush does it).
            self.downstream.reading = False
            self._flush(self.downstream)
        elif state is State.CLOSED:
            self._set_deadline(None)
        # The handshake states share the deadline set at accept.

    def _set_deadline(self, seconds):
        """Replace the connection's one deadline (None: no deadline)."""
        if self.deadline is not None:
            self.server.cancel_timer(self.deadline)
            self.deadline = None
        if seconds is not None:
            self.deadline = self.server.call_at(time.monotonic() + seconds,
                                                self._deadline_passed, None)

    def _deadline_passed(self, _):
        self.deadline = None
        self._handle(self._on_deadline)

    def _on_deadline(self):
        if self.state in HANDSHAKE_STATES:
            self._refuse(Reply.GENERAL_FAILURE, "handshake timed out")
        elif self.state is State.RESOLVING:
            self._refuse(Reply.TTL_EXPIRED, "name lookup timed out")
        elif self.state is State.CONNECTING:
            self._refuse(Reply.TTL_EXPIRED, "connect timed out")
        elif self.state is State.RELAYING:
            # Idle means no byte moved since the last check: re-arming here
            # instead of on every chunk keeps the relay path free of timers.
            moved = self.upstream.count + self.downstream.count
            if moved != self.idle_mark:
                self.idle_mark = moved
                self._set_deadline(self.server.idle_timeout)
            else:
                self.outcome += ", then idle timeout"
                self.close()
        else:
            self.close()

    # -- events from the loop -------------------------------------------------

    # Every way into a connection (socket events, deadlines, resolver
    # answers, connect attempts) goes through _handle: a socket error there
    # ends this connection only, and the sockets' interest is derived anew.

    def _handle(self, work, *args):
        if self.state is State.CLOSED:
            return
        try:
            work(*args)
        except OSError as error:
            self._fail(error)
        self._update_interest()

    def on_client_event(self, mask: int):
        self._handle(self._client_event, mask)

    def on_target_event(self, mask: int):
        self._handle(self._target_event, mask)

    def _client_event(self, mask: int):
        if mask & EVENT_WRITE:
            self._flush(self.downstream)
        if mask & EVENT_READ and self.state is not State.CLOSED:
            self._client_readable()

    def _target_event(self, mask: int):
        if mask & EVENT_WRITE:
            self._flush(self.upstream)
        if mask & EVENT_READ and self.state is State.RELAYING:
            self._move(self.downstream)

    def _client_readable(self):
        state = self.state
        if state is State.RELAYING:
            self._move(self.upstream)
        elif state in HANDSHAKE_STATES:
            # The whole handshake gets MAX_HANDSHAKE_BYTES; what follows a
            # request stays in the kernel until the relay reads it.
            room = MAX_HANDSHAKE_BYTES - self.handshake_received
            data = self.client.recv(room)
            if not data:
                self.outcome = "client closed during handshake"
                self.close()
                return
            self.handshake_received += len(data)
            self.handshake += data
            self._process_handshake()
        elif state in SETUP_STATES:
            self._read_early_data()
        elif state is State.CLOSING:
            # Discard what the client still sends, so that closing does not
            # turn into a reset that could destroy the reply in flight.
            if not self.client.recv(RECV_BUFFER_SIZE):
                self.close()

    def _fail(self, error: OSError):
        if isinstance(error, (BlockingIOError, InterruptedError)):
            return
        reason = "socket error: %s" % errno.errorcode.get(error.errno, error)
        if self.state in (State.RELAYING, State.CLOSING):
            self.outcome += ", then " + reason
        else:
            self.outcome = reason
        # Pass a reset on as a reset (resetting the side that failed is
        # harmless, and the error may have shown on either socket).
        reset = error.errno in RESET_ERRORS
        self.close(reset_client=reset, reset_target=reset)

    # -- the handshake --------------------------------------------------------

    def _process_handshake(self):
        """Parse every whole message buffered, in order, answering each."""
        while self.state in HANDSHAKE_STATES and self.handshake:
            result = self._parse_next()
            if result is NEED_MORE:
                if self.handshake_received >= MAX_HANDSHAKE_BYTES:
                    self._refuse(Reply.GENERAL_FAILURE,
                                 "handshake longer than %d bytes"
                                 % MAX_HANDSHAKE_BYTES)
                return
            if isinstance(result, Rejected):
                self._reject(result.reply, result.reason)
                return
            message = result.message
            del self.handshake[:result.used]
            if isinstance(message, Socks5Greeting):
                self._on_greeting(message)
            elif isinstance(message, UsernamePassword):
                self._on_username_password(message)
            else:
                self._on_request(message)

    def _parse_next(self) -> ParseResult:
        buffered = self.handshake
        if self.state is State.AUTHENTICATING:
            return parse_username_password(buffered)
        if self.state is State.REQUESTING:
            return parse_socks5_request(buffered)
        protocol = detect_protocol(buffered[0])
        if protocol is Protocol.SOCKS4:
            self.version = Version.SOCKS4
            return parse_socks4_request(buffered)
        if protocol is Protocol.SOCKS5:
            return parse_socks5_greeting(buffered)
        if protocol is Protocol.HTTP:
            method = parse_http_method(buffered)
            if method is NEED_MORE:
                return NEED_MORE
            return Rejected(http_reply(method.message),
                            "client speaks HTTP to a SOCKS port")
        if protocol is Protocol.TLS:
            return Rejected(b"", "client speaks TLS to a SOCKS port")
        return Rejected(b"", "unknown protocol, first byte 0x%02x"
                        % buffered[0])

    def _on_greeting(self, greeting: Socks5Greeting):
        self.version = Version.SOCKS5
        method = choose_method(greeting.methods,
                               bool(self.server.credentials))
        self._send_to_client(socks5_method_reply(method))
        if method is Method.NO_ACCEPTABLE:
            self.outcome = "refused: no acceptable authentication method"
            self._enter(State.CLOSING)
        elif method is Method.USERNAME_PASSWORD:
            self._enter(State.AUTHENTICATING)
        else:
            self._enter(State.REQUESTING)

    def _on_username_password(self, message: UsernamePassword):
        credentials = self.server.credentials
        accepted = (not credentials
                    or credentials.check(message.username, message.password))
        self._send_to_client(username_password_reply(accepted))
        if not accepted:
            self.outcome = "refused: bad username or password"
            self._enter(State.CLOSING)
            return
        self.userid = message.username
        self._enter(State.REQUESTING)

    def _on_request(self, request):
        # Bytes after the request are the client's early data, forwarded once
        # the target is connected (DECISIONS row 14).
        early_data, self.handshake = self.handshake, None
        self.command = request.command
        self.host = request.host
        self.port = request.port
        if isinstance(request, Socks4Request):
            address_type = (AddressType.DOMAIN if request.is_4a
                            else AddressType.IPV4)
            self.userid = request.userid
            if self.server.credentials:
                self._refuse(Reply.NOT_ALLOWED, "SOCKS4 cannot present the "
                             "password that credentials require")
                return
        else:
            address_type = request.address_type
        if self.command in RELAYED_COMMANDS:
            self.upstream.pending = early_data
        self._decide(address_type)

    def _decide(self, address_type):
        """What to do with a whole request: the process step after parsing."""
        command = self.command
        server = self.server
        if command in (Command.BIND, Command.UDP_ASSOCIATE):
            self._refuse(Reply.COMMAND_NOT_SUPPORTED,
                         "unsupported command %s" % command.name)
            return
        if command is Command.RESOLVE_PTR and self.version is Version.SOCKS4:
            self._refuse(Reply.COMMAND_NOT_SUPPORTED,
                         "RESOLVE_PTR over SOCKS4")
            return
        unsafe = is_unsafe_request(self.version, address_type, command)
        if unsafe and server.safe_socks:
            server.warn_unsafe_socks(self.version)
            self._refuse(Reply.NOT_ALLOWED, "client gave only an IP address "
                         "(--safe-socks)")
            return
        if server.test_socks:
            log.info("conn %d: %s %s request for %s:%d is %s", self.number,
                     self.version.name, command.name,
                     server.scrub(self.host), self.port,
                     "unsafe (the client gave an IP address and may be "
                     "leaking DNS)" if unsafe
                     else "safe (torsocksd resolves the name)")

        address = ip_literal(self.host)
        if command is Command.RESOLVE_PTR:
            if address is None:
                self._refuse(Reply.ADDRESS_TYPE_NOT_SUPPORTED,
                             "RESOLVE_PTR of something that is not an address")
                return
            self._start_lookup(server.resolver.reverse, address)
        elif address is not None:
            if command is Command.RESOLVE:
                self._answer_resolve((address,))
            elif command is Command.CONNECT_DIR:
                self._start_tunnel((address,))
            else:
                self._start_connecting((address,))
        else:
            refusal = special_name_refusal(self.host)
            if refusal:
                self._refuse(Reply.HOST_UNREACHABLE, refusal)
                return
            self._start_lookup(server.resolver.lookup, self.host)

    # -- resolving ------------------------------------------------------------

    def _start_lookup(self, method, query):
        self._enter(State.RESOLVING)
        self.lookup = method(query, self.server.deliver(self._resolved))

    def _resolved(self, result: ResolverResult):
        self._handle(self._on_resolved, result)

    def _on_resolved(self, result: ResolverResult):
        if self.state is not State.RESOLVING:
            return      # timed out or closed meanwhile
        self.lookup = None
        if result.error is not None:
            self._refuse(result.error, result.reason or "name lookup failed")
        elif self.command is Command.RESOLVE_PTR:
            self._answer(socks5_hostname_reply(result.answers[0]),
                         "answered RESOLVE_PTR")
        elif self.command is Command.RESOLVE:
            self._answer_resolve(result.answers)
        elif self.command is Command.CONNECT_DIR:
            self._start_tunnel(result.answers)
        else:
            self._start_connecting(result.answers)

    def _answer_resolve(self, answers):
        """RESOLVE answers: the first address of the preferred family (IPv4
        unless told otherwise), else the first of the other; SOCKS4 carries
        IPv4 only (DECISIONS row 11)."""
        usable = self.server.usable_addresses(answers)
        if self.version is Version.SOCKS4:
            usable = [a for a in usable if a.version == 4]
        if not usable:
            self._refuse(Reply.HOST_UNREACHABLE, "no answer the client can "
                         "use (SOCKS4 or --no-ipv6 takes IPv4 only)")
            return
        preferred = self.server.preferred_ip_version or 4
        best = next((a for a in usable if a.version == preferred), usable[0])
        if self.version is Version.SOCKS4:
            self._answer(socks4_reply(Socks4Reply.GRANTED, best.packed),
                         "answered RESOLVE")
        else:
            self._answer(socks5_address_reply(best), "answered RESOLVE")

    def _answer(self, reply: bytes, outcome: str):
        self._send_to_client(reply)
        self.outcome = outcome
        self._enter(State.CLOSING)

    # -- connecting: Happy Eyeballs (RFC 8305) --------------------------------

    def _start_connecting(self, addresses):
        """Connect to the first of addresses that answers.  Attempts start
        one happy_eyeballs_delay apart (at once when one fails), families
        alternate, the first connected wins; the whole try has one deadline."""
        server = self.server
        addresses = server.usable_addresses(addresses)
        if not addresses:
            self._refuse(Reply.NOT_ALLOWED, "IPv6 is off (--no-ipv6)")
            return
        self.candidates = happy_eyeballs_order(
            addresses, server.preferred_ip_version)[:MAX_CONNECT_ATTEMPTS]
        self.attempts = []
        self._enter(State.CONNECTING)
        self._attempt_next()

    def _attempt_next(self):
        server = self.server
        while self.candidates:
            address = self.candidates.pop(0)
            refusal = server.destination_refusal(self.client_is_local,
                                                 address, self.port)
            if refusal:
                self.last_reply = Reply.NOT_ALLOWED
                continue
            try:
                target = server.outbound_socket(address)
            except OSError as error:
                self.last_reply = reply_for_errno(error.errno)
                log.warning("cannot open an outbound socket: %s", error)
                continue
            try:
                error_number = target.connect_ex((str(address), self.port))
            except OSError as error:
                error_number = error.errno or errno.EINVAL
            if error_number not in (0, errno.EINPROGRESS):
                target.close()
                self.last_reply = reply_for_errno(error_number)
                continue
            self.attempts.append(target)
            server.selector.register(
                target, EVENT_WRITE,
                functools.partial(self._handle, self._attempt_ready, target))
            if self.candidates:
                server.call_at(time.monotonic() + server.happy_eyeballs_delay,
                               functools.partial(self._handle,
                                                 self._attempt_overdue),
                               target)
            return
        if not self.attempts:
            self._refuse(self.last_reply, "could not connect: %s" % (
                self.last_reply.name.lower().replace("_", " ")))

    def _attempt_overdue(self, target):
        """An attempt is still pending after the delay: start the next too."""
        if self.state is State.CONNECTING and target in self.attempts:
            self._attempt_next()

    def _attempt_ready(self, target, mask):
        if self.state is not State.CONNECTING or target not in self.attempts:
            return
        error_number = target.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error_number:
            self.attempts.remove(target)
            self.server.selector.unregister(target)
            target.close()
            self.last_reply = reply_for_errno(error_number)
            self._attempt_next()
        else:
            self.attempts.remove(target)
            self._abandon_attempts()
            self.target = target
            # The winner stays registered; from now on it is the target.
            self.server.selector.modify(target, EVENT_READ,
                                        self.on_target_event)
            self.target_events = EVENT_READ
            self._connected()

    def _abandon_attempts(self):
        for attempt in self.attempts:
            self.server.selector.unregister(attempt)
            attempt.close()
        self.attempts = ()

    def _drop_target(self):
        if self.target_events:
            self.server.selector.unregister(self.target)
            self.target_events = 0
        self.target.close()
        self.target = None

    def _connected(self):
        target = self.target
        with_nodelay(target)
        self.upstream.sink = target
        self.downstream.source = target
        self._start_relaying()

    def _start_relaying(self):
        """The target answered: the success reply, then the early data."""
        self._enter(State.RELAYING)
        self.outcome = "relayed"
        if self.version is Version.SOCKS4:
            self._send_to_client(socks4_reply(Socks4Reply.GRANTED))
        else:
            self._send_to_client(socks5_reply(Reply.SUCCEEDED,
                                              self.client_family))
        self._flush(self.upstream)

    # -- CONNECT_DIR: a BEGIN_DIR stream on a one-hop circuit ------------------

    def _start_tunnel(self, addresses):
        """Open a BEGIN_DIR stream to the relay whose ORPort is at the first
        allowed address; the success reply waits for RELAY_CONNECTED."""
        server = self.server
        for address in server.usable_addresses(addresses):
            if not server.destination_refusal(self.client_is_local, address,
                                              self.port):
                break
        else:
            self._refuse(Reply.NOT_ALLOWED, "no relay address allowed")
            return
        self._enter(State.CONNECTING)
        handle = self._handle
        try:
            self.tunnel = server.tor_links().open_stream(
                str(address), self.port,
                functools.partial(handle, self._tunnel_connected),
                functools.partial(handle, self._tunnel_data),
                functools.partial(handle, self._tunnel_ended),
                fingerprint=server.relay_pins.get((str(address), self.port)))
        except OSError as error:    # no socket, or no stream id left
            self._refuse(reply_for_errno(error.errno),
                         "cannot reach the relay: %s" % error)
            return
        self.tunnel.on_writable = functools.partial(handle, self._flush,
                                                    self.upstream)

    def _tunnel_connected(self):
        if self.state is State.CONNECTING:
            self.upstream.sink = self.tunnel
            self._start_relaying()

    def _tunnel_data(self, data: bytes):
        self.downstream.pending += data
        self._flush(self.downstream)

    def _tunnel_ended(self, reason: int):
        if self.state is State.CONNECTING:
            self._refuse(reply_for_end_reason(reason),
                         "the relay ended the stream (%s): %s"
                         % (end_reason_name(reason), self.tunnel.end_detail))
            return
        # Tor streams have no half-close: once the relay ends the stream,
        # nothing more goes to it, and what came drains to the client.
        self.tunnel = None
        upstream = self.upstream
        upstream.reading, upstream.shut = False, True
        upstream.pending = bytearray()
        self.downstream.reading = False
        self._flush(self.downstream)

    def _read_early_data(self):
        """Client bytes that arrive while the answer is being worked out:
        kept for the target of a CONNECT, dropped after a RESOLVE (as Tor
        does).  Reading on also shows a client that resets meanwhile."""
        data = self.client.recv(HIGH_WATER)
        if not data:
            self.upstream.reading = False
        elif self.command in RELAYED_COMMANDS:
            self.upstream.pending += data

    # -- relaying ---------------------------------------------------------------

    def _move(self, flow: _Flow):
        if not flow.reading:
            return      # a stale event after the source ended
        if self.server.splice and self.target is not None:
            self._splice(flow)
        else:
            self._relay(flow)

    def _relay(self, flow: _Flow):
        """Move what the source has to the sink: read into the loop's one
        buffer, send at once, keep only what the sink would not take."""
        view = self.server.recv_view
        source, sink = flow.source, flow.sink
        for _ in range(READS_PER_WAKEUP):
            room = HIGH_WATER - len(flow.pending)
            if room <= 0:
                return
            try:
                size = source.recv_into(view, min(room, RECV_BUFFER_SIZE))
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
            flow.pipe = self.server.take_pipe()
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
                and self.state is not State.CLOSED:
            self.server.give_pipe(flow.pipe)
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
        if not flow.reading and not flow.shut:
            flow.shut = True
            try:
                sink.shutdown(socket.SHUT_WR)
            except OSError:
                pass    # the peer is gone already; reading will tell
        if self.state is State.CLOSING:
            return
        if self.upstream.shut and self.downstream.shut:
            self.close()

    def _send_to_client(self, data: bytes):
        """Queue a SOCKS reply.  The byte counts are of relayed data only,
        so the reply is taken off the count that _flush will add it to."""
        self.downstream.count -= len(data)
        self.downstream.pending += data
        self._flush(self.downstream)

    # -- refusing and closing -----------------------------------------------------

    def _refuse(self, reply: Reply, reason: str):
        """Send the version's refusal for reply, then close."""
        if self.version is None:
            self._reject(b"", reason)
            return
        family = self.client_family
        if self.command in LOOKUP_COMMANDS:
            # Every failed lookup is "host unreachable", in the 10-byte
            # form, whatever went wrong (DECISIONS row 11).
            family = socket.AF_INET
            if self.state is State.RESOLVING:
                reply = Reply.HOST_UNREACHABLE
        self._reject(failure_reply(self.version, reply, family), reason)

    def _reject(self, reply: bytes, reason: str):
        self.outcome = "refused: " + reason
        self.candidates = []
        if self.lookup is not None:
            self.lookup.cancel()
            self.lookup = None
        if self.attempts:
            self._abandon_attempts()
        if self.target is not None:
            self._drop_target()
        if self.tunnel is not None:
            self.tunnel.close()
            self.tunnel = None
        self.upstream.pending = bytearray()
        if not reply:
            self.close()
            return
        self._send_to_client(reply)
        self._enter(State.CLOSING)

    def close(self, reset_client=False, reset_target=False):
        """Close both sockets at once and forget the connection."""
        if self.state is State.CLOSED:
            return
        self._enter(State.CLOSED)
        selector = self.server.selector
        if self.client_events:
            selector.unregister(self.client)
        if self.target_events:
            selector.unregister(self.target)
        self.client_events = self.target_events = 0
        if self.lookup is not None:
            self.lookup.cancel()
        if self.attempts:
            self._abandon_attempts()
        if self.tunnel is not None:
            self.tunnel.close()     # RELAY_END DONE
            self.tunnel = None
        close_socket(self.client, reset_client)
        if self.target is not None:
            close_socket(self.target, reset_target)
        for flow in (self.upstream, self.downstream):
            if flow.pipe is not None:
                self.server.drop_pipe(flow.pipe)
                flow.pipe = None
        self.server.connection_closed(self)

    # -- what the sockets wait for --------------------------------------------------

    def _update_interest(self):
        """Derive each socket's events from the state and the buffers."""
        state = self.state
        if state is State.CLOSED:
            return
        upstream, downstream = self.upstream, self.downstream
        client_events = target_events = 0
        if state is State.RELAYING or state in SETUP_STATES:
            # A pipe that still holds bytes may be full whatever its count
            # says: wait for the sink before reading more into it.
            if upstream.reading and upstream.backlog() < HIGH_WATER \
                    and not upstream.in_pipe:
                client_events = EVENT_READ
        elif state in HANDSHAKE_STATES:
            client_events = EVENT_READ
        elif state is State.CLOSING:
            client_events = EVENT_READ
        if downstream.pending or downstream.in_pipe:
            client_events |= EVENT_WRITE
        if state is State.RELAYING and self.target is not None:
            if downstream.reading and downstream.backlog() < HIGH_WATER \
                    and not downstream.in_pipe:
                target_events = EVENT_READ
            if upstream.pending or upstream.in_pipe:
                target_events |= EVENT_WRITE
        elif self.tunnel is not None:
            # The relay's data waits in the circuit (no SENDME goes back)
            # while the client is slow to read.
            paused = downstream.backlog() >= HIGH_WATER
            if paused != self.tunnel.paused:
                self.tunnel.pause(paused)
        server = self.server
        if client_events != self.client_events:
            server.watch(self.client, self.client_events, client_events,
                         self.on_client_event)
            self.client_events = client_events
        if target_events != self.target_events:
            server.watch(self.target, self.target_events, target_events,
                         self.on_target_event)
            self.target_events = target_events
        if state is State.RELAYING and not self.paused_check \
                and not (client_events and (target_events or self.tunnel)):
            # A socket the loop does not watch cannot report a reset, so
            # look at it now and then while it is paused.
            self.paused_check = True
            server.call_at(time.monotonic() + PAUSED_CHECK_INTERVAL,
                           functools.partial(self._handle,
                                             self._check_paused), None)

    def _check_paused(self, _):
        self.paused_check = False
        for sock, events in ((self.client, self.client_events),
                             (self.target, self.target_events)):
            if sock is not None and not events:
                error_number = sock.getsockopt(socket.SOL_SOCKET,
                                               socket.SO_ERROR)
                if error_number:
                    raise OSError(error_number, os.strerror(error_number))

    def log_outcome(self):
        destination = ""
        if self.command is not None:
            destination = " %s %s:%d" % (self.command.name,
                                         self.server.scrub(self.host),
                                         self.port)
        version = self.version.name if self.version is not None else "-"
        log.info("conn %d from %s: %s%s: %s; %d bytes up, %d down, %.3f s",
                 self.number, self.client_label, version, destination,
                 self.outcome, self.upstream.count, self.downstream.count,
                 time.monotonic() - self.opened)


def with_nodelay(sock: socket.socket):
    """Small relayed writes go out at once: the client's own stack already
    decided when to send them."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass


def close_socket(sock: socket.socket, reset: bool = False):
    if reset:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                            struct.pack("ii", 1, 0))
        except OSError:
            pass
    sock.close()


# =============================================================================
# The loop and the Server
# =============================================================================

ACCEPTS_PER_WAKEUP = 64             # accept in batches, then serve the others
ACCEPT_PAUSE = 1.0                  # seconds a listener rests after EMFILE & co
ACCEPT_PAUSE_ERRORS = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS,
                                 errno.ENOMEM))
LISTEN_BACKLOG = 1024
# Linux socket options, by number where an older Python lacks the name;
# None elsewhere.
ON_LINUX = sys.platform.startswith("linux")
SO_BINDTODEVICE = getattr(socket, "SO_BINDTODEVICE", 25 if ON_LINUX else None)
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT",
                                  24 if ON_LINUX else None)
DEFAULT_PORT = 9050
DEFAULT_ADDRESS = "127.0.0.1"       # never listen beyond this host unless told


def open_listener(host: str, port: int) -> socket.socket:
    """A non-blocking listening TCP socket on host:port (an IP literal or a
    name such as "localhost"; IPv6 sockets are IPv6-only, so "[::]" and
    "0.0.0.0" can listen side by side)."""
    infos = socket.getaddrinfo(host, port, socket.AF_UNSPEC, socket.SOCK_STREAM,
                               0, socket.AI_PASSIVE)
    family, kind, protocol, _, sockaddr = infos[0]
    listener = socket.socket(family, kind, protocol)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        listener.bind(sockaddr)
        listener.listen(LISTEN_BACKLOG)
        listener.setblocking(False)
    except OSError:
        listener.close()
        raise
    return listener


def default_max_connections() -> int:
    """As many connections as the fd limit allows: two fds each, and some
    spare for listeners, the wakeup pair and lookups."""
    try:
        import resource
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError, ValueError):
        return 512
    if soft == resource.RLIM_INFINITY:
        soft = 65536
    return max(16, (soft - 64) // 2)


class Server:
    """A torsocksd server: listeners, one selectors loop, its connections.

    Server(listen=[("127.0.0.1", 9050)], **options) binds nothing until
    bind(), start() or serve_forever().  A listen entry is (host, port) or
    "unix:/path".  start() binds and serves in a background thread,
    returning once the listeners are bound, so port 0 works: .address then
    tells the port.  stop() is safe to call twice, and the server is a
    context manager.  Options mirror the command line:

    sockets               listening sockets to adopt instead of binding
    resolver              an object with lookup() and reverse() (see
                          SystemResolver); default SystemResolver()
    handshake_timeout     seconds from accept for the whole handshake
    connect_timeout       seconds for a name lookup, and for connecting
    idle_timeout          seconds a relayed connection may sit idle (None:
                          forever)
    drain_timeout         seconds open connections get after a shutdown
    max_connections       connections served at once; the listeners pause
    max_per_client        connections from one remote address (None: no cap;
                          never applied to loopback clients)
    credentials           a Credentials object: RFC 1929 becomes mandatory
    client_policy         a ClientPolicy (--allow / --deny)
    destination_policy    a DestinationPolicy (--policy)
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
    relay_pins            {(relay IP, ORPort): 20-byte fingerprint}: a
                          CONNECT_DIR to that relay must prove that identity
    """

    def __init__(self, listen=((DEFAULT_ADDRESS, DEFAULT_PORT),), *,
                 sockets=(), resolver=None, handshake_timeout: float = 10.0,
                 connect_timeout: float = 10.0,
                 idle_timeout: Optional[float] = None,
                 drain_timeout: float = 5.0,
                 max_connections: Optional[int] = None,
                 max_per_client: Optional[int] = None, credentials=None,
                 client_policy=None, destination_policy=None,
                 open_proxy: bool = False, safe_socks: bool = False,
                 test_socks: bool = False, log_destinations: bool = False,
                 happy_eyeballs_delay: float = 0.25,
                 preferred_ip_version: Optional[int] = None, ipv6: bool = True,
                 outbound_addresses=(), outbound_interface: Optional[str] = None,
                 unix_mode: int = 0o600,
                 exit_when_idle: Optional[float] = None,
                 splice: bool = False, relay_pins=None):
        self.listen = [] if sockets else list(listen)
        self.listeners = list(sockets)
        self.addresses = []     # where the listeners listen, once bound
        self.resolver = resolver if resolver is not None else SystemResolver()
        self.handshake_timeout = handshake_timeout
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.drain_timeout = drain_timeout
        self.max_connections = max_connections or default_max_connections()
        self.max_per_client = max_per_client
        self.credentials = credentials
        self.client_policy = client_policy or ClientPolicy()
        self.destination_policy = destination_policy or DestinationPolicy()
        self.open_proxy = open_proxy
        self.safe_socks = safe_socks
        self.test_socks = test_socks
        self.log_destinations = log_destinations
        self.happy_eyeballs_delay = happy_eyeballs_delay
        self.preferred_ip_version = preferred_ip_version
        self.ipv6 = ipv6
        self.outbound_addresses = {}
        for source in outbound_addresses:
            self.outbound_addresses[ipaddress.ip_address(source).version] = \
                str(source)
        self.outbound_interface = outbound_interface
        self.unix_mode = unix_mode
        self.exit_when_idle = exit_when_idle
        if splice and not HAVE_SPLICE:
            raise ValueError("the splice relay needs Linux and Python 3.10+")
        self.splice = splice
        self.relay_pins = dict(relay_pins or {})

        self.selector = None
        self.recv_view = None
        self._timers = []               # heap of [when, sequence, fn, arg]
        self._sequence = itertools.count()
        self._ready = collections.deque()   # calls posted from other threads
        self._wakeup_reader = self._wakeup_writer = None
        self._thread = None             # the thread start() made
        self._loop_thread = None        # the thread in serve_forever()
        self._loop_done = threading.Event()
        self._stop_requested = False
        self._drain_deadline = None
        self._accepting = False
        self._numbers = itertools.count(1)
        self._last_unsafe_warning = 0.0
        self._last_accept_error_log = 0.0
        self._unix_paths = []           # Unix listeners to unlink at the end
        self.per_client = collections.Counter()   # remote address -> open
        self._exit_when_done = False
        self._pipes = []                # idle pipes for the splice relay
        self._tor_links = None          # TorLinkPool, once CONNECT_DIR is used
        self._last_busy = time.monotonic()
        self.connections = set()
        self.accepted = 0
        self.refused_at_accept = 0
        self.relayed_bytes = 0

    # -- life cycle -------------------------------------------------------------

    @property
    def address(self):
        """The (host, port) of the first listener."""
        return self.addresses[0][:2]

    def open_listeners(self):
        """Create the listeners given by listen (once); refuse an exposed
        listener, made here or handed in, that has no client policy or
        credentials."""
        if not self.listen:
            self._check_exposure()
            return
        try:
            for spec in self.listen:
                if isinstance(spec, str) and spec.startswith("unix:"):
                    path = spec[len("unix:"):]
                    self.listeners.append(open_unix_listener(path,
                                                             self.unix_mode))
                    self._unix_paths.append(path)
                else:
                    self.listeners.append(open_listener(*spec))
            self._check_exposure()
        except (OSError, ValueError):
            self._close_listeners()
            self.listeners = []
            raise
        self.listen = []

    def bind(self):
        """Create the listeners and the loop's resources (once)."""
        if self.selector is not None:
            return
        self.open_listeners()
        self.addresses = [listener.getsockname() for listener in self.listeners]
        self.selector = selectors.DefaultSelector()
        self.recv_view = memoryview(bytearray(RECV_BUFFER_SIZE))
        self._wakeup_reader, self._wakeup_writer = socket.socketpair()
        self._wakeup_reader.setblocking(False)
        self._wakeup_writer.setblocking(False)
        self.selector.register(self._wakeup_reader, EVENT_READ, self._on_wakeup)
        for listener in self.listeners:
            listener.setblocking(False)
        attach = getattr(self.resolver, "attach", None)
        if attach is not None:
            attach(self)        # a resolver that runs in this loop
        self._resume_accepting()
        for name in self.addresses:
            log.info("listening on %s", format_address(name))

    def start(self):
        """Bind, then serve in a background thread; returns once bound."""
        self.bind()
        self._thread = threading.Thread(target=self.serve_forever,
                                        name="torsocksd", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self):
        """Serve until stop() or a shutdown request; then close everything."""
        self.bind()
        self._loop_thread = threading.current_thread()
        try:
            while not self._finished():
                self._run_once()
        finally:
            self._close_everything()
            self._loop_done.set()

    def stop(self, drain_timeout: float = 0.0):
        """Stop accepting, give open connections drain_timeout seconds, close
        everything and wait for the loop to end.  Safe to call twice."""
        self.request_shutdown(drain_timeout)
        loop_thread = self._loop_thread
        if loop_thread is None:
            self._close_everything()    # bound, but never served
        elif loop_thread is not threading.current_thread():
            self._loop_done.wait()
            if self._thread is not None:
                self._thread.join()

    def request_shutdown(self, drain_timeout: Optional[float] = None):
        """Ask the loop to shut down (from any thread or a signal handler);
        a second request ends the drain at once."""
        if drain_timeout is None:
            drain_timeout = self.drain_timeout
        if self._stop_requested:
            drain_timeout = 0.0
        self._stop_requested = True
        self.call_soon_threadsafe(self._begin_drain, drain_timeout)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()

    def stats(self) -> dict:
        """Counters since start: connections accepted, open now, refused at
        accept, and bytes relayed by connections that have closed."""
        return {"accepted": self.accepted, "active": len(self.connections),
                "refused_at_accept": self.refused_at_accept,
                "relayed_bytes": self.relayed_bytes,
                "listeners": [format_address(a) for a in self.addresses]}

    def reload(self, credentials_path: Optional[str] = None):
        """Re-read what can change without dropping a connection (SIGHUP):
        the credentials file.  A file that does not parse keeps the old."""
        if credentials_path:
            try:
                self.credentials = Credentials.from_file(credentials_path)
            except (OSError, ValueError) as error:
                log.error("reload: keeping the old credentials: %s", error)
            else:
                log.info("reload: credentials re-read from %s",
                         credentials_path)

    # -- the loop ---------------------------------------------------------------

    def serve_connection(self, client: socket.socket):
        """Serve one connected client (inetd "nowait", systemd Accept=yes)
        until it is done, then close everything."""
        self.bind()
        self._exit_when_done = True
        peer = client.getpeername()
        self._serve(client, peer)
        self.serve_forever()

    def _finished(self) -> bool:
        if self._exit_when_done and not self.connections:
            return True
        if self.exit_when_idle is not None and not self.connections:
            if time.monotonic() - self._last_busy >= self.exit_when_idle:
                log.info("idle for %.0f s: exiting", self.exit_when_idle)
                return True
        if self._drain_deadline is None:
            return False
        return (not self.connections
                or time.monotonic() >= self._drain_deadline)

    def _run_once(self):
        timers = self._timers
        while timers and timers[0][2] is None:
            heapq.heappop(timers)       # cancelled: no reason to wake up
        timeout = None
        if self._ready:
            timeout = 0
        elif self._timers:
            timeout = max(0.0, self._timers[0][0] - time.monotonic())
        wake_at = self._drain_deadline
        if self.exit_when_idle is not None and not self.connections:
            wake_at = self._last_busy + self.exit_when_idle
        if wake_at is not None:
            remaining = max(0.0, wake_at - time.monotonic())
            timeout = remaining if timeout is None else min(timeout, remaining)
        for key, mask in self.selector.select(timeout):
            try:
                key.data(mask)
            except Exception:
                self._contain_bug(key.data)
        ready = self._ready
        while ready:
            function, args = ready.popleft()
            try:
                function(*args)
            except Exception:
                self._contain_bug(function)
        timers = self._timers
        now = time.monotonic()
        while timers and timers[0][0] <= now:
            _, _, function, argument = heapq.heappop(timers)
            if function is None:
                continue        # cancelled
            try:
                function(argument)
            except Exception:
                self._contain_bug(function)

    def _contain_bug(self, handler):
        """A bug met while handling one event: log it, close the connection
        it belongs to, and keep serving everyone else."""
        log.exception("internal error; closing the connection concerned")
        # A bound method of the connection, or a partial of one.
        owner = getattr(getattr(handler, "func", handler), "__self__", None)
        if isinstance(owner, Connection) and owner.state is not State.CLOSED:
            owner.outcome += ", then an internal error"
            owner.close()
        elif isinstance(owner, TorLink):
            owner.close("internal error")

    def call_at(self, when: float, function, argument):
        """Run function(argument) in the loop at monotonic time when.
        Returns the timer, for cancel_timer()."""
        timer = [when, next(self._sequence), function, argument]
        heapq.heappush(self._timers, timer)
        return timer

    @staticmethod
    def cancel_timer(timer):
        """Disarm a timer; it also lets go of what it would have called, so
        a closed connection is not kept in memory until its deadline."""
        timer[2] = timer[3] = None

    def call_soon_threadsafe(self, function, *args):
        self._ready.append((function, args))
        writer = self._wakeup_writer
        if writer is not None:
            try:
                writer.send(b"\0")
            except OSError:
                pass    # full (a wakeup is pending anyway) or closed

    def deliver(self, callback):
        """A callable any thread may call with one argument; callback then
        runs with it in the loop (for resolvers)."""
        def post(result):
            self.call_soon_threadsafe(callback, result)
        return post

    def _on_wakeup(self, mask):
        try:
            while self._wakeup_reader.recv(4096):
                pass
        except OSError:
            pass

    def watch(self, sock, old_events: int, new_events: int, callback):
        """Change what the loop waits for on sock (0 means nothing)."""
        if old_events == 0:
            self.selector.register(sock, new_events, callback)
        elif new_events == 0:
            self.selector.unregister(sock)
        else:
            self.selector.modify(sock, new_events, callback)

    # -- accepting ---------------------------------------------------------------

    def _resume_accepting(self, _=None):
        if self._accepting or self._drain_deadline is not None:
            return
        if len(self.connections) >= self.max_connections:
            return
        for listener in self.listeners:
            self.selector.register(listener, EVENT_READ, self._accept_from)
        self._accepting = True

    def _pause_accepting(self):
        if not self._accepting:
            return
        for listener in self.listeners:
            self.selector.unregister(listener)
        self._accepting = False

    def _accept_from(self, mask):
        for listener in self.listeners:
            for _ in range(ACCEPTS_PER_WAKEUP):
                if len(self.connections) >= self.max_connections:
                    self._pause_accepting()
                    return
                try:
                    client, peer = listener.accept()
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as error:
                    self._accept_failed(error)
                    return
                self._serve(client, peer)

    def _accept_failed(self, error: OSError):
        if error.errno in ACCEPT_PAUSE_ERRORS:
            # Out of descriptors or memory: rest instead of spinning.
            self._pause_accepting()
            self.call_at(time.monotonic() + ACCEPT_PAUSE,
                         self._resume_accepting, None)
        now = time.monotonic()
        if now - self._last_accept_error_log >= 1.0:
            self._last_accept_error_log = now
            log.warning("accept failed: %s", error)

    def _serve(self, client: socket.socket, peer):
        self.accepted += 1
        remote = None               # a Unix or loopback client is local
        label = "unix socket"
        if client.family != socket.AF_UNIX:
            label = format_address(peer)
            address = ip_of(peer[0])
            refusal = self._client_refusal(address)
            if refusal:
                self.refused_at_accept += 1
                log.info("refused %s at accept: %s", label, refusal)
                client.close()
                return
            if not address.is_loopback:
                remote = address
            with_nodelay(client)
        client.setblocking(False)
        try:
            connection = Connection(self, client, label, remote,
                                    next(self._numbers))
        except OSError as error:
            log.warning("cannot serve a new connection: %s", error)
            client.close()
            return
        if remote is not None:
            self.per_client[remote] += 1
        self.connections.add(connection)

    def _client_refusal(self, address) -> Optional[str]:
        if not self.client_policy.permits(address):
            return "not allowed by --allow/--deny"
        if (self.max_per_client is not None and not address.is_loopback
                and self.per_client[address] >= self.max_per_client):
            return "more than %d connections from one address" \
                % self.max_per_client
        return None

    def connection_closed(self, connection: Connection):
        self.connections.discard(connection)
        self._last_busy = time.monotonic()
        self.relayed_bytes += connection.upstream.count \
            + connection.downstream.count
        remote = connection.remote
        if remote is not None:
            self.per_client[remote] -= 1
            if not self.per_client[remote]:
                del self.per_client[remote]
        connection.log_outcome()
        if not self._accepting:
            self._resume_accepting()

    # -- pipes for the splice relay -------------------------------------------

    def take_pipe(self):
        if self._pipes:
            return self._pipes.pop()
        read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.fcntl(write_end, F_SETPIPE_SZ, PIPE_CAPACITY)
        except OSError:
            pass    # the default 64 KiB will do
        return read_end, write_end

    def give_pipe(self, pipe):
        """Return an empty pipe to the pool."""
        if len(self._pipes) < PIPE_POOL_SIZE:
            self._pipes.append(pipe)
        else:
            self.drop_pipe(pipe)

    @staticmethod
    def drop_pipe(pipe):
        for fd in pipe:
            os.close(fd)

    # -- outbound -----------------------------------------------------------------

    def usable_addresses(self, addresses):
        if self.ipv6:
            return list(addresses)
        return [a for a in addresses if a.version == 4]

    def destination_refusal(self, client_is_local: bool, address, port: int):
        return self.destination_policy.refusal(client_is_local, address, port)

    def outbound_socket(self, address) -> socket.socket:
        """A non-blocking socket for a connection to address, bound to the
        outbound address of its family when one is set."""
        family = socket.AF_INET if address.version == 4 else socket.AF_INET6
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            source = self.outbound_addresses.get(address.version)
            if source is not None:
                # Let connect() pick the port: bind() alone would reserve one
                # per connection and exhaust them.
                if IP_BIND_ADDRESS_NO_PORT is not None:
                    sock.setsockopt(socket.IPPROTO_IP,
                                    IP_BIND_ADDRESS_NO_PORT, 1)
                sock.bind((source, 0))
            if self.outbound_interface:
                if SO_BINDTODEVICE is None:
                    raise OSError(errno.EOPNOTSUPP, "--outbound-interface "
                                  "needs SO_BINDTODEVICE (Linux)")
                sock.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE,
                                self.outbound_interface.encode())
        except OSError:
            sock.close()
            raise
        return sock

    # -- shutting down -----------------------------------------------------------

    def _begin_drain(self, drain_timeout: float):
        if self._drain_deadline is None:
            log.info("shutting down: %d connection(s) open, %.1f s to finish",
                     len(self.connections), drain_timeout)
            sd_notify("STOPPING=1")
        self._pause_accepting()
        self._close_listeners()     # new clients get "refused", not a wait
        deadline = time.monotonic() + drain_timeout
        if self._drain_deadline is None or deadline < self._drain_deadline:
            self._drain_deadline = deadline

    def tor_links(self) -> "TorLinkPool":
        """The open links to Tor relays, for CONNECT_DIR (made on first use)."""
        if self._tor_links is None:
            self._tor_links = TorLinkPool(self, timeout=self.connect_timeout)
        return self._tor_links

    def _close_listeners(self):
        for listener in self.listeners:
            listener.close()
        for path in self._unix_paths:
            try:
                os.unlink(path)
            except OSError:
                pass
        self._unix_paths = []

    def _check_exposure(self):
        """Refuse to be an open proxy by accident."""
        if self.open_proxy or self.client_policy or self.credentials:
            return
        for listener in self.listeners:
            if listener.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            host = listener.getsockname()[0]
            if not ipaddress.ip_address(host.split("%")[0]).is_loopback:
                raise ValueError(
                    "refusing to listen on %s without --allow/--deny or "
                    "--credentials: anyone could use this proxy (give "
                    "--open-proxy if that is meant)"
                    % format_address(listener.getsockname()))

    def _close_everything(self):
        selector = self.selector
        if selector is None:
            return
        self._pause_accepting()
        if self._drain_deadline is None:
            self._drain_deadline = time.monotonic()    # keeps listeners shut
        for connection in list(self.connections):
            connection.outcome += ", cut at shutdown"
            connection.close()
        if self._tor_links is not None:
            self._tor_links.close()     # while the selector is still open
        self.selector = None
        selector.close()
        self._close_listeners()
        for sock in (self._wakeup_reader, self._wakeup_writer):
            sock.close()
        self._wakeup_writer = None
        while self._pipes:
            self.drop_pipe(self._pipes.pop())
        close = getattr(self.resolver, "close", None)
        if close is not None:
            close()

    # -- logging helpers -----------------------------------------------------------

    def scrub(self, destination: str) -> str:
        """A destination as the log may show it (DECISIONS row 20)."""
        return destination if self.log_destinations else "[scrubbed]"

    def warn_unsafe_socks(self, version: Version):
        now = time.monotonic()
        if now - self._last_unsafe_warning >= 5.0:     # Tor's rate limit
            self._last_unsafe_warning = now
            log.warning("a %s client gave only an IP address: the application "
                        "may be leaking DNS; refused (--safe-socks)",
                        version.name)


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
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(path)
        os.chmod(path, mode)
        listener.listen(LISTEN_BACKLOG)
        listener.setblocking(False)
    except OSError:
        listener.close()
        raise
    return listener


def stat_is_socket(path: str) -> bool:
    return stat.S_ISSOCK(os.lstat(path).st_mode)


def ip_of(host: str):
    """The address of a socket peer, IPv4-mapped IPv6 made plain IPv4."""
    address = ipaddress.ip_address(host.split("%")[0])
    mapped = getattr(address, "ipv4_mapped", None)
    return mapped if mapped is not None else address


def format_address(sockaddr) -> str:
    if isinstance(sockaddr, str):
        return "unix:" + sockaddr
    host, port = sockaddr[0], sockaddr[1]
    return ("[%s]:%d" if ":" in host else "%s:%d") % (host, port)


# =============================================================================
# Process integration: logging and signals
# =============================================================================

LOG_FORMAT = "%(asctime)s torsocksd[%(process)d] %(levelname)s %(message)s"
SYSLOG_FORMAT = "torsocksd[%(process)d]: %(levelname)s %(message)s"


def configure_logging(level: str, log_file: Optional[str] = None,
                      use_syslog: bool = False):
    """Log to a file, to syslog, or to stderr.  Returns the handler so that
    SIGHUP can reopen a file that logrotate moved away."""
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
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
    """Tell systemd (Type=notify) how we are: READY=1, STOPPING=1, STATUS=.
    Advisory: without NOTIFY_SOCKET, or when sending fails, nothing happens."""
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
        server.request_shutdown()

    def on_hangup(number, frame):
        server.call_soon_threadsafe(on_reload)

    def on_usr1(number, frame):
        server.call_soon_threadsafe(log_statistics, server)

    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, on_stop)
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, on_hangup)
    if hasattr(signal, "SIGUSR1"):
        signal.signal(signal.SIGUSR1, on_usr1)


WORKER_RESTART_PAUSE = 1.0      # seconds between restarts of a crashing worker
PASSED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)


def run_workers(server: Server, count: int, on_reload) -> int:
    """Serve with count worker processes that share server's listeners.

    The parent binds, forks, passes TERM, INT, HUP and USR1 on to the
    workers and restarts one that dies, until it is told to stop.
    """
    server.open_listeners()
    workers = {}            # pid -> when it started
    stopping = False
    # Only the parent holds the write end: the workers read EOF once it is
    # gone, however it ended.
    parent_alive, parent_alive_writer = os.pipe()

    def spawn():
        # Signals wait until the child has its own handlers in place.
        signal.pthread_sigmask(signal.SIG_BLOCK, PASSED_SIGNALS)
        # Everything loaded so far leaves the collector's generations, so
        # that a worker's collections do not write to (and so copy) the
        # pages it shares with the parent.
        gc.freeze()
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                os.close(parent_alive_writer)
                server._unix_paths = []     # the parent removes them
                install_signal_handlers(server, on_reload)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, PASSED_SIGNALS)
                server.bind()               # this worker's own loop
                watch_parent(server, parent_alive)
                server.serve_forever()
                status = 0
            except BaseException:
                log.exception("worker %d failed", os.getpid())
            finally:
                logging.shutdown()
                os._exit(status)
        workers[pid] = time.monotonic()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, PASSED_SIGNALS)

    def pass_on(number, frame):
        nonlocal stopping
        if number in (signal.SIGTERM, signal.SIGINT):
            stopping = True
            sd_notify("STOPPING=1")
        for pid in workers:
            try:
                os.kill(pid, number)
            except ProcessLookupError:
                pass

    for number in PASSED_SIGNALS:
        signal.signal(number, pass_on)
    for _ in range(count):
        spawn()
    log.info("%d workers started", count)
    sd_notify("READY=1\nSTATUS=%d workers" % count)
    while workers:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        started = workers.pop(pid, None)
        if started is None or stopping:
            continue
        log.warning("worker %d ended (wait status %d); starting another",
                    pid, status)
        if time.monotonic() - started < WORKER_RESTART_PAUSE:
            time.sleep(WORKER_RESTART_PAUSE)    # no fork storm
        if not stopping:
            spawn()
    server._close_listeners()
    return 0


def watch_parent(server: Server, parent_alive: int):
    """A worker whose parent died (SIGKILL, a crash) drains and exits
    instead of serving on as an orphan nobody supervises.  parent_alive is
    the read end of a pipe whose write end only the parent holds: it reads
    EOF once the parent is gone, and until then the loop sleeps.  server
    must be bound (its loop exists)."""
    def gone(mask):
        server.watch(parent_alive, EVENT_READ, 0, None)
        os.close(parent_alive)
        log.warning("the parent process is gone: draining")
        server.request_shutdown()
    server.watch(parent_alive, 0, EVENT_READ, gone)


def log_statistics(server: Server):
    stats = server.stats()
    log.info("statistics: %d accepted, %d open, %d refused at accept, "
             "%d bytes relayed by closed connections", stats["accepted"],
             stats["active"], stats["refused_at_accept"],
             stats["relayed_bytes"])


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
  curl --socks5-hostname 127.0.0.1:9050 http://example.com/

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


def policy_rule(text: str) -> str:
    try:
        DestinationPolicy.parse_rule(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error))
    return text


def relay_pin(text: str):
    """"ADDR:PORT=FINGERPRINT" -> ((ADDR, PORT), 20-byte fingerprint)."""
    where, equals, fingerprint = text.partition("=")
    if not equals:
        raise argparse.ArgumentTypeError("%r: write ADDR:PORT=FINGERPRINT"
                                         % text)
    host, port = parse_listen(where)
    try:
        return (str(ipaddress.ip_address(host)), port), \
            parse_fingerprint(fingerprint)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error))


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
    host, _, port = spec.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise argparse.ArgumentTypeError(
            "%r: write an IPv6 address in brackets, as [::1]:9050" % spec)
    try:
        number = int(port)
    except ValueError:
        raise argparse.ArgumentTypeError("%r: the port is not a number" % spec)
    if not 0 <= number <= 65535:
        raise argparse.ArgumentTypeError("%r: port out of range" % spec)
    return (host or DEFAULT_ADDRESS, number)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("%r is not a whole number" % text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return value


def positive_seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("must be more than 0 seconds")
    return value


def build_argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="torsocksd",
        description="A SOCKS4/4A/5 server that speaks Tor's SOCKS dialect "
                    "(RESOLVE, RESOLVE_PTR, CONNECT_DIR) and resolves every "
                    "name itself.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    listen = parser.add_argument_group("where to listen")
    listen.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help="port for --address (default %(default)s)")
    listen.add_argument("--address", default=DEFAULT_ADDRESS,
                        help="address to listen on (default %(default)s; "
                             "0.0.0.0 or :: for every interface)")
    listen.add_argument("--listen", metavar="ADDR:PORT", action="append",
                        type=parse_listen, default=[],
                        help="listen here instead; repeatable "
                             "([::1]:9050 for IPv6, unix:/path for a Unix "
                             "socket)")
    access = parser.add_argument_group("access")
    access.add_argument("--allow", metavar="CIDR", dest="client_rules",
                        action=OrderedRule, verdict=True, default=[],
                        help="let clients from CIDR in (repeatable; --allow "
                             "and --deny are checked in the order given, the "
                             "first match wins; with any --allow, others are "
                             "refused)")
    access.add_argument("--deny", metavar="CIDR", dest="client_rules",
                        action=OrderedRule, verdict=False,
                        help="refuse clients from CIDR (repeatable)")
    access.add_argument("--policy", metavar="RULE", action="append",
                        default=[], type=policy_rule,
                        help='destination rule "accept|reject ADDR[/MASK]'
                             '[:PORT[-PORT]]" (repeatable, first match '
                             'wins; ADDR may be *); remote clients may '
                             'never reach loopback, link-local, unspecified '
                             'or multicast addresses unless a rule accepts '
                             'them')
    access.add_argument("--pin-relay", metavar="ADDR:PORT=FINGERPRINT",
                        action="append", default=[], type=relay_pin,
                        help="CONNECT_DIR to the relay at ADDR:PORT (its "
                             "ORPort) must prove this identity (40 hex "
                             "digits); repeatable")
    access.add_argument("--open-proxy", action="store_true",
                        help="allow a non-loopback listener without --allow, "
                             "--deny or --credentials")
    access.add_argument("--credentials", metavar="FILE",
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
                        default=10.0, metavar="SECONDS",
                        help="time from accept for the whole SOCKS handshake "
                             "(default %(default)s)")
    limits.add_argument("--connect-timeout", type=positive_seconds,
                        default=10.0, metavar="SECONDS",
                        help="time for a name lookup, and for connecting "
                             "(default %(default)s)")
    limits.add_argument("--idle-timeout", type=positive_seconds,
                        metavar="SECONDS",
                        help="close relayed connections idle at least this "
                             "long (checked every SECONDS, so within twice "
                             "that; default: never)")
    limits.add_argument("--max-per-client", type=positive_int, metavar="N",
                        help="connections from one remote address (default: "
                             "no cap; loopback clients are never capped)")
    limits.add_argument("--drain-timeout", type=float, default=5.0,
                        metavar="SECONDS",
                        help="time open connections get at shutdown "
                             "(default %(default)s)")
    limits.add_argument("--max-connections", type=positive_int, metavar="N",
                        help="connections served at once (default: what the "
                             "file descriptor limit allows)")
    limits.add_argument("--nameserver", metavar="IP[:PORT]", action="append",
                        default=[], type=parse_nameserver,
                        help="ask this DNS server directly, from the event "
                             "loop, instead of the system resolver "
                             "(repeatable; [IPv6]:PORT)")
    limits.add_argument("--resolver-threads", type=int, default=4,
                        metavar="N",
                        help="threads for name lookups (default %(default)s)")
    outbound = parser.add_argument_group("outbound connections")
    outbound.add_argument("--outbound-address", metavar="ADDR",
                          action="append", default=[], type=ip_argument,
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
    family.add_argument("--no-ipv6", action="store_true",
                        help="never connect to or answer with IPv6")
    outbound.add_argument("--happy-eyeballs-delay", type=float, default=0.25,
                          metavar="SECONDS",
                          help="wait this long for an address before trying "
                               "the next one as well (default %(default)s)")
    listen.add_argument("--unix-mode", type=lambda text: int(text, 8),
                        default=0o600, metavar="MODE",
                        help="permissions of unix: listeners (default 600)")
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
                              "(default %(default)s)")
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


def main(argv=None) -> int:
    """Run torsocksd with the command line argv (default sys.argv[1:]);
    return the exit status."""
    parser = build_argument_parser()
    options = parser.parse_args(argv)
    inetd = options.inetd or options.inetd_wait
    # Under inetd, stdout and stderr may be the client's socket.
    configure_logging(options.log_level, options.log_file,
                      options.syslog or (inetd and not options.log_file))
    raise_file_limit()
    try:
        listeners, connections = socket_activation()
    except (OSError, ValueError) as error:
        log.error("socket activation: %s", error)
        return EX_USAGE
    passed = listeners or connections
    if passed and (options.listen or inetd):
        parser.error("sockets came from systemd (LISTEN_FDS); --listen, "
                     "--inetd and --inetd-wait cannot be added to them")
    if options.splice and not HAVE_SPLICE:
        parser.error("--splice needs Linux and Python 3.10 or newer")
    if options.inetd and options.inetd_wait:
        parser.error("--inetd and --inetd-wait exclude each other")
    if options.inetd:
        connections = [socket.socket(fileno=0)]
    elif options.inetd_wait:
        listeners = [socket.socket(fileno=0)]
    if inetd:
        # stdout and stderr may be the client's socket: nothing may reach
        # it, not even logging's own complaint about an absent syslog.
        logging.raiseExceptions = False
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
            os.dup2(null.fileno(), 2)
    credentials = None
    if options.credentials:
        try:
            credentials = Credentials.from_file(options.credentials)
        except (OSError, ValueError) as error:
            log.error("cannot read credentials: %s", error)
            return EX_USAGE
    server = Server(
        options.listen or [(options.address, options.port)],
        sockets=listeners,
        resolver=(DnsResolver(options.nameserver) if options.nameserver
                  else SystemResolver(workers=options.resolver_threads)),
        handshake_timeout=options.handshake_timeout,
        connect_timeout=options.connect_timeout,
        idle_timeout=options.idle_timeout,
        drain_timeout=options.drain_timeout,
        max_connections=options.max_connections,
        max_per_client=options.max_per_client,
        credentials=credentials,
        client_policy=ClientPolicy(options.client_rules),
        destination_policy=DestinationPolicy(options.policy),
        open_proxy=options.open_proxy or bool(connections),
        safe_socks=options.safe_socks,
        test_socks=options.test_socks,
        log_destinations=options.log_destinations,
        happy_eyeballs_delay=options.happy_eyeballs_delay,
        preferred_ip_version=options.preferred_ip_version,
        ipv6=not options.no_ipv6,
        outbound_addresses=options.outbound_address,
        outbound_interface=options.outbound_interface,
        unix_mode=options.unix_mode,
        exit_when_idle=options.idle_exit if options.inetd_wait else None,
        splice=options.splice,
        relay_pins=dict(options.pin_relay))
    if connections:
        server.listen = []      # one client, no listener of our own
    def reload():
        if options.log_file:
            configure_logging(options.log_level, options.log_file)
        server.reload(options.credentials)

    workers = options.workers > 1 and not connections
    if not workers:
        # Before the first "listening" line: a signal from then on drains.
        install_signal_handlers(server, reload)
    try:
        if workers:
            server.open_listeners()
        else:
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
        return run_workers(server, options.workers, reload)
    if connections:
        for extra in connections[1:]:
            extra.close()
        server.serve_connection(connections[0])
        return 0
    sd_notify("READY=1\nSTATUS=accepting on %s"
              % ", ".join(server.stats()["listeners"]))
    server.serve_forever()
    log.info("stopped")
    return 0


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
