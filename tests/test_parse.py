"""The pure parts of torsocksd, byte for byte: parsers, reply builders, policy.

No sockets, no threads, no DNS.  Every parser takes the bytes buffered so far
and returns NEED_MORE (None), Parsed(message, used) or Rejected(reply, reason);
the vectors below pin each outcome, every strict prefix of every valid message
(NEED_MORE, nothing consumed), the byte count a whole message uses when more
bytes follow it, and, over seeded random input, that no parser ever raises or
answers with anything but a well-formed reply.

Set TORSOCKSD_FUZZ_SEED to replay a failing random run.
"""

import errno
import ipaddress
import os
import random
import re
import socket

import pytest

import torsocksd
from conftest import (socks4_request, socks4a_request, socks5_reply,
                      socks5_request, userpass)
from torsocksd import (NEED_MORE, AddressType, Command, Method, Parsed,
                       Rejected, Reply, Socks4Reply, Socks4Request,
                       Socks5Greeting, Socks5Request, UsernamePassword,
                       Version)

h = bytes.fromhex


# -- reply shapes -------------------------------------------------------------

S4OK = h("005a 0000 00000000")
S4REJ = h("005b 0000 00000000")


GENERAL_FAILURE = socks5_reply(0x01)
COMMAND_NOT_SUPPORTED = socks5_reply(0x07)
ADDRESS_TYPE_NOT_SUPPORTED = socks5_reply(0x08)

# Trailing bytes after a whole message: the client's next message or early
# data, which the parser must neither consume nor look at.
TRAILER = b"\x05\x01\x00GET / HTTP/1.0\r\n\x00\xff"


def name(length, fill=b"a"):
    """A valid hostname of exactly length bytes."""
    return (fill * length)[:length]


# -- valid messages: (parser, bytes, expected message) ------------------------

IPV4 = h("c0000201")            # 192.0.2.1
IPV6 = h("20010db8000000000000000000000001")    # 2001:db8::1
NAME_255 = name(255, b"abcdefghi.")[:254] + b"z"
USERID_512 = bytes(range(1, 256)) * 2 + bytes(range(1, 3))   # no NUL

SOCKS4_VALID = [
    pytest.param(h("04 01 0050 c0000201 00"),
                 Socks4Request(Command.CONNECT, 80, "192.0.2.1", b"", False),
                 id="socks4-connect-no-userid"),
    pytest.param(h("04 01 0050 c0000201") + b"alice\0",
                 Socks4Request(Command.CONNECT, 80, "192.0.2.1", b"alice",
                               False),
                 id="socks4-connect-userid"),
    pytest.param(h("04 01 01bb 00000001 00") + b"example.com\0",
                 Socks4Request(Command.CONNECT, 443, "example.com", b"", True),
                 id="socks4a-connect-hostname"),
    pytest.param(h("04 01 01bb 000000ff") + b"user\0example.com.\0",
                 Socks4Request(Command.CONNECT, 443, "example.com.", b"user",
                               True),
                 id="socks4a-marker-255-userid-trailing-dot"),
    pytest.param(h("04 f0 0000 01020304 00"),
                 Socks4Request(Command.RESOLVE, 0, "1.2.3.4", b"", False),
                 id="socks4-resolve-port-0"),
    pytest.param(h("04 f0 0000 00000001 00") + b"example.com\0",
                 Socks4Request(Command.RESOLVE, 0, "example.com", b"", True),
                 id="socks4a-resolve-port-0"),
    pytest.param(h("04 f0 0035 00000001 00") + b"[2001:db8::1]\0",
                 Socks4Request(Command.RESOLVE, 53, "[2001:db8::1]", b"",
                               True),
                 id="socks4a-resolve-ipv6-literal"),
    pytest.param(h("04 02 0050 c0000201 00"),
                 Socks4Request(Command.BIND, 80, "192.0.2.1", b"", False),
                 id="socks4-bind-parses"),
    pytest.param(socks4_request(Command.CONNECT, IPV4, 80, USERID_512),
                 Socks4Request(Command.CONNECT, 80, "192.0.2.1", USERID_512,
                               False),
                 id="socks4-userid-512"),
    pytest.param(socks4a_request(Command.CONNECT, NAME_255, 80, USERID_512),
                 Socks4Request(Command.CONNECT, 80, NAME_255.decode(),
                               USERID_512, True),
                 id="socks4a-userid-512-hostname-255"),
    pytest.param(socks4_request(Command.CONNECT, "0.0.0.7", 65535)
                 + NAME_255 + b"\0",
                 Socks4Request(Command.CONNECT, 65535, NAME_255.decode(), b"",
                               True),
                 id="socks4a-hostname-255-port-65535"),
]

GREETING_VALID = [
    pytest.param(h("05 01 00"), Socks5Greeting(b"\x00"), id="one-method"),
    pytest.param(h("05 02 00 02"), Socks5Greeting(b"\x00\x02"),
                 id="two-methods"),
    pytest.param(h("05 03 99 21 10"), Socks5Greeting(h("992110")),
                 id="unknown-methods"),
    pytest.param(b"\x05\xff" + bytes(range(255)),
                 Socks5Greeting(bytes(range(255))), id="255-methods"),
]

USERPASS_VALID = [
    pytest.param(h("01 00 00"), UsernamePassword(b"", b""), id="both-empty"),
    pytest.param(h("01 00 03") + b"pwd", UsernamePassword(b"", b"pwd"),
                 id="empty-username"),
    pytest.param(h("01 03") + b"usr" + h("00"), UsernamePassword(b"usr", b""),
                 id="empty-password"),
    pytest.param(userpass(b"alice", b"secret"),
                 UsernamePassword(b"alice", b"secret"), id="alice"),
    pytest.param(userpass(b"\0\xff:", b"\x01\0"),
                 UsernamePassword(b"\0\xff:", b"\x01\0"), id="any-bytes"),
    pytest.param(userpass(b"u" * 255, b"p" * 255),
                 UsernamePassword(b"u" * 255, b"p" * 255), id="255-255-max"),
]

REQUEST_VALID = [
    pytest.param(h("05 01 00 01 c0000201 0050"),
                 Socks5Request(Command.CONNECT, AddressType.IPV4, "192.0.2.1",
                               80),
                 id="connect-ipv4"),
    pytest.param(h("05 01 00 04") + IPV6 + h("01bb"),
                 Socks5Request(Command.CONNECT, AddressType.IPV6,
                               "2001:db8::1", 443),
                 id="connect-ipv6"),
    pytest.param(socks5_request(Command.CONNECT, b"example.com", 80),
                 Socks5Request(Command.CONNECT, AddressType.DOMAIN,
                               "example.com", 80),
                 id="connect-hostname"),
    pytest.param(socks5_request(Command.CONNECT, NAME_255, 65535),
                 Socks5Request(Command.CONNECT, AddressType.DOMAIN,
                               NAME_255.decode(), 65535),
                 id="connect-hostname-255"),
    pytest.param(socks5_request(Command.CONNECT, b"a", 1),
                 Socks5Request(Command.CONNECT, AddressType.DOMAIN, "a", 1),
                 id="connect-hostname-1"),
    pytest.param(socks5_request(Command.CONNECT, b"Example.COM.", 80),
                 Socks5Request(Command.CONNECT, AddressType.DOMAIN,
                               "Example.COM.", 80),
                 id="connect-hostname-trailing-dot"),
    pytest.param(socks5_request(Command.CONNECT, b"[2001:db8::1]", 80),
                 Socks5Request(Command.CONNECT, AddressType.DOMAIN,
                               "[2001:db8::1]", 80),
                 id="connect-ipv6-literal-as-hostname"),
    pytest.param(socks5_request(Command.RESOLVE, b"example.com", 0),
                 Socks5Request(Command.RESOLVE, AddressType.DOMAIN,
                               "example.com", 0),
                 id="resolve-hostname"),
    pytest.param(h("05 f0 00 04") + IPV6 + h("0000"),
                 Socks5Request(Command.RESOLVE, AddressType.IPV6,
                               "2001:db8::1", 0),
                 id="resolve-ipv6"),
    pytest.param(h("05 f1 00 01 c0000201 0000"),
                 Socks5Request(Command.RESOLVE_PTR, AddressType.IPV4,
                               "192.0.2.1", 0),
                 id="resolve-ptr-ipv4"),
    pytest.param(h("05 02 00 01 c0000201 0050"),
                 Socks5Request(Command.BIND, AddressType.IPV4, "192.0.2.1",
                               80),
                 id="bind-parses"),
    pytest.param(h("05 03 00 01 00000000 0000"),
                 Socks5Request(Command.UDP_ASSOCIATE, AddressType.IPV4,
                               "0.0.0.0", 0),
                 id="udp-associate-parses"),
]

PARSERS = {
    "socks4": torsocksd.parse_socks4_request,
    "greeting": torsocksd.parse_socks5_greeting,
    "userpass": torsocksd.parse_username_password,
    "request": torsocksd.parse_socks5_request,
}


def _all_valid():
    for parser_name, table in (("socks4", SOCKS4_VALID),
                               ("greeting", GREETING_VALID),
                               ("userpass", USERPASS_VALID),
                               ("request", REQUEST_VALID)):
        for param in table:
            data, expected = param.values
            yield pytest.param(parser_name, data, expected,
                               id=parser_name + ":" + param.id)


ALL_VALID = list(_all_valid())

BUFFER_TYPES = [
    pytest.param(bytes, id="bytes"),
    pytest.param(bytearray, id="bytearray"),
    pytest.param(memoryview, id="memoryview"),
]


def _assert_parsed(result, expected, used):
    assert isinstance(result, Parsed), result
    assert result.message == expected
    assert type(result.message) is type(expected)
    assert result.used == used
    for field, value in zip(result.message, expected):
        if isinstance(value, (Command, AddressType)):
            assert type(field) is type(value), (field, value)


@pytest.mark.parametrize("wrap", BUFFER_TYPES)
@pytest.mark.parametrize("parser_name, data, expected", ALL_VALID)
def test_whole_message_parses_and_uses_its_length(parser_name, data, expected,
                                                  wrap):
    result = PARSERS[parser_name](wrap(bytearray(data)))
    _assert_parsed(result, expected, len(data))


@pytest.mark.parametrize("wrap", BUFFER_TYPES)
@pytest.mark.parametrize("parser_name, data, expected", ALL_VALID)
def test_trailing_bytes_are_not_consumed(parser_name, data, expected, wrap):
    buffer = bytearray(data + TRAILER)
    result = PARSERS[parser_name](wrap(buffer))
    _assert_parsed(result, expected, len(data))
    assert buffer == data + TRAILER      # the parser leaves its input alone


@pytest.mark.parametrize("wrap", BUFFER_TYPES)
@pytest.mark.parametrize("parser_name, data, expected", ALL_VALID)
def test_every_strict_prefix_needs_more(parser_name, data, expected, wrap):
    parser = PARSERS[parser_name]
    for length in range(len(data)):
        result = parser(wrap(bytearray(data[:length])))
        assert result is NEED_MORE, \
            "%s on the %d-byte prefix %s: %r" % (
                parser_name, length, data[:length].hex(), result)


@pytest.mark.parametrize("parser", list(PARSERS.values()),
                         ids=list(PARSERS))
def test_empty_input_needs_more(parser):
    assert parser(b"") is NEED_MORE
    assert NEED_MORE is None


def test_parse_results_are_named_tuples():
    assert Parsed(b"x", 1).message == b"x"
    assert Parsed(b"x", 1).used == 1
    assert Rejected(b"", "why").reply == b""
    assert Rejected(b"", "why").reason == "why"


# -- SOCKS4 / SOCKS4A rejections ----------------------------------------------

def _assert_rejected(result, reply):
    assert isinstance(result, Rejected), result
    assert result.reply == reply, result
    assert isinstance(result.reason, str) and result.reason


@pytest.mark.parametrize("data", [
    pytest.param(h("04 01 0050 00000000 00"), id="connect-dstip-zero"),
    pytest.param(h("04 f0 0000 00000000 00"), id="resolve-dstip-zero"),
    pytest.param(h("04 f0 0050 00000000 00"), id="resolve-dstip-zero-port"),
    pytest.param(h("04 01 0000 c0000201 00"), id="connect-port-zero"),
    pytest.param(h("04 01 0000 00000001 00") + b"example.com\0",
                 id="socks4a-connect-port-zero"),
    pytest.param(h("04 02 0000 c0000201 00"), id="bind-port-zero"),
])
def test_socks4_zero_address_or_port_is_rejected(data):
    _assert_rejected(torsocksd.parse_socks4_request(data), S4REJ)
    # Known from the 8-byte header alone: no need to wait for the userid.
    _assert_rejected(torsocksd.parse_socks4_request(data[:8]), S4REJ)


@pytest.mark.parametrize("command", [0x00, 0x03, 0x04, 0x05, 0x7F, 0xF3, 0xFF])
def test_socks4_unknown_command_is_rejected_at_the_second_byte(command):
    data = bytes((4, command))
    _assert_rejected(torsocksd.parse_socks4_request(data), S4REJ)
    whole = data + h("0050 c0000201 00")
    _assert_rejected(torsocksd.parse_socks4_request(whole), S4REJ)


def test_socks4_userid_of_513_bytes_is_rejected():
    data = socks4_request(Command.CONNECT, IPV4, 80, USERID_512 + b"x")
    _assert_rejected(torsocksd.parse_socks4_request(data), S4REJ)


def test_socks4_userid_is_rejected_once_513_bytes_without_nul_are_in():
    header = h("04 01 0050 c0000201")
    assert torsocksd.parse_socks4_request(header + USERID_512) is NEED_MORE
    too_long = header + USERID_512 + b"x"
    _assert_rejected(torsocksd.parse_socks4_request(too_long), S4REJ)


def test_socks4a_hostname_of_256_bytes_is_rejected():
    data = socks4a_request(Command.CONNECT, NAME_255 + b"z", 80)
    _assert_rejected(torsocksd.parse_socks4_request(data), S4REJ)


def test_socks4a_hostname_is_rejected_once_256_bytes_without_nul_are_in():
    start = h("04 01 0050 00000001") + b"user\0"
    assert torsocksd.parse_socks4_request(start + NAME_255) is NEED_MORE
    _assert_rejected(torsocksd.parse_socks4_request(start + NAME_255 + b"z"),
                     S4REJ)


@pytest.mark.parametrize("hostname", [
    pytest.param(b"", id="empty"),
    pytest.param(b"exa mple.com", id="space"),
    pytest.param(b"example.com\x80", id="byte-80"),
    pytest.param(b"\xc3\xa9t\xc3\xa9.fr", id="utf-8"),
    pytest.param(b"exa\tmple.com", id="tab"),
    pytest.param(b"example\x7f.com", id="del"),
])
def test_socks4a_hostname_is_left_to_the_handshake(hostname):
    """Whether a name is usable is decided after the command (Tor's order:
    test_handshake.py); the parser passes every byte on, as latin-1."""
    data = socks4a_request(Command.CONNECT, hostname, 80)
    assert torsocksd.parse_socks4_request(data) == Parsed(
        Socks4Request(Command.CONNECT, 80, hostname.decode("latin-1"), b"",
                      True), len(data))


def test_socks4_parser_rejects_another_version_with_socks4_reject():
    _assert_rejected(torsocksd.parse_socks4_request(b"\x05"), S4REJ)


# -- SOCKS5 greeting ----------------------------------------------------------

def test_greeting_with_zero_methods_is_rejected_without_a_reply():
    _assert_rejected(torsocksd.parse_socks5_greeting(h("05 00")), b"")
    _assert_rejected(torsocksd.parse_socks5_greeting(h("05 00 00 02")), b"")


@pytest.mark.parametrize("data", [h("04 01 00"), h("01"), h("00 01 00")])
def test_greeting_of_another_version_is_rejected_without_a_reply(data):
    _assert_rejected(torsocksd.parse_socks5_greeting(data), b"")


# -- RFC 1929 username/password -----------------------------------------------

@pytest.mark.parametrize("data", [
    pytest.param(h("05"), id="05-alone"),
    pytest.param(h("05 01 00 01 c0000201 0050"), id="socks5-request"),
    pytest.param(h("02 00 00"), id="version-2"),
    pytest.param(h("00 00 00"), id="version-0"),
    pytest.param(h("04 01 0050 c0000201 00"), id="socks4-request"),
])
def test_username_password_of_wrong_version_is_a_general_failure(data):
    _assert_rejected(torsocksd.parse_username_password(data), GENERAL_FAILURE)
    _assert_rejected(torsocksd.parse_username_password(data[:1]),
                     GENERAL_FAILURE)


def test_maximal_username_password_is_513_bytes():
    data = userpass(b"u" * 255, b"p" * 255)
    assert len(data) == 513
    assert torsocksd.parse_username_password(data).used == 513


# -- SOCKS5 request rejections ------------------------------------------------

@pytest.mark.parametrize("command", [0x00, 0x04, 0x09, 0x7F, 0xF3, 0xFF])
def test_request_unknown_command_is_07_at_the_second_byte(command):
    data = bytes((5, command))
    _assert_rejected(torsocksd.parse_socks5_request(data),
                     COMMAND_NOT_SUPPORTED)
    whole = data + h("00 01 c0000201 0050")
    _assert_rejected(torsocksd.parse_socks5_request(whole),
                     COMMAND_NOT_SUPPORTED)


def test_request_05_09_alone_gets_05_07():
    _assert_rejected(torsocksd.parse_socks5_request(b"\x05\x09"),
                     h("05 07 00 01 00000000 0000"))


@pytest.mark.parametrize("reserved", [0x01, 0x80, 0xFF])
def test_request_nonzero_reserved_byte_is_01_at_the_third_byte(reserved):
    data = bytes((5, 1, reserved))
    _assert_rejected(torsocksd.parse_socks5_request(data), GENERAL_FAILURE)
    _assert_rejected(torsocksd.parse_socks5_request(
        data + h("01 c0000201 0050")), GENERAL_FAILURE)


@pytest.mark.parametrize("atyp", [0x00, 0x02, 0x05, 0x23, 0xFF])
def test_request_unknown_address_type_is_08_at_the_fourth_byte(atyp):
    data = bytes((5, 1, 0, atyp))
    _assert_rejected(torsocksd.parse_socks5_request(data),
                     h("05 08 00 01 00000000 0000"))
    _assert_rejected(torsocksd.parse_socks5_request(
        data + h("c0000201 0050")), ADDRESS_TYPE_NOT_SUPPORTED)


@pytest.mark.parametrize("hostname", [
    pytest.param(b"", id="length-0"),
    pytest.param(b"exa\0mple.com", id="nul-inside"),
    pytest.param(b"8.8.8.8\0xyz", id="nul-cut-ip"),
    pytest.param(b"example.com\0", id="nul-at-end"),
    pytest.param(b"exa\x80mple.com", id="byte-80"),
    pytest.param(b"exa mple.com", id="space"),
    pytest.param(b" example.com", id="leading-space"),
    pytest.param(b"\xc3\xa9t\xc3\xa9.fr", id="utf-8"),
    pytest.param(b"exa\nmple.com", id="newline"),
    pytest.param(b"exa\x7fmple.com", id="del"),
    pytest.param(b"\xff" * 255, id="255-bytes-ff"),
])
def test_request_hostname_is_left_to_the_handshake(hostname):
    """The name, even an unusable one, is the handshake's to judge after the
    command (Tor's order: test_handshake.py); every byte is kept."""
    data = socks5_request(Command.CONNECT, hostname, 80)
    assert torsocksd.parse_socks5_request(data) == Parsed(
        Socks5Request(Command.CONNECT, AddressType.DOMAIN,
                      hostname.decode("latin-1"), 80), len(data))


@pytest.mark.parametrize("data", [
    pytest.param(h("04"), id="04-alone"),
    pytest.param(h("04 01 0050 c0000201 00"), id="socks4-connect"),
    pytest.param(h("04 01 0050 00000001 00") + b"example.com\0",
                 id="socks4a-connect"),
    pytest.param(h("01 00 00"), id="second-userpass"),
    pytest.param(h("06 01 00 01 c0000201 0050"), id="version-6"),
])
def test_request_of_another_version_is_01(data):
    _assert_rejected(torsocksd.parse_socks5_request(data), GENERAL_FAILURE)


# -- protocol detection, HTTP -------------------------------------------------

HTTP_LETTERS = b"GHPCODT"


@pytest.mark.parametrize("first_byte", range(256))
def test_detect_protocol_by_first_byte(first_byte):
    if first_byte == 0x04:
        expected = torsocksd.Protocol.SOCKS4
    elif first_byte == 0x05:
        expected = torsocksd.Protocol.SOCKS5
    elif first_byte in HTTP_LETTERS:
        expected = torsocksd.Protocol.HTTP
    elif first_byte == 0x16:
        expected = torsocksd.Protocol.TLS
    else:
        expected = torsocksd.Protocol.UNKNOWN
    assert torsocksd.detect_protocol(first_byte) is expected


@pytest.mark.parametrize("data", [
    b"GET / HTTP/1.1\r\n", b"POST /x HTTP/1.0\r\n", b"PUT ", b"CONNECT a:1 ",
    b"OPTIONS * HTTP/1.1", b"DELETE /", b"TRACE /", b"G", b"GX",
    b"HEADX", b"HEAD\t/", b"HELLO", b"HX", b"HE!", b"head / HTTP/1.0",
])
def test_http_method_other_than_head_gets_the_whole_page(data):
    for wrap in (bytes, bytearray, memoryview):
        assert torsocksd.parse_http_method(wrap(data)) == Parsed(b"", 0)


@pytest.mark.parametrize("data", [b"HEAD ", b"HEAD / HTTP/1.0\r\n\r\n"])
def test_http_head_gets_headers_only(data):
    for wrap in (bytes, bytearray, memoryview):
        assert torsocksd.parse_http_method(wrap(data)) == Parsed(b"HEAD", 0)


@pytest.mark.parametrize("data", [b"", b"H", b"HE", b"HEA", b"HEAD"])
def test_http_method_prefix_of_head_needs_more(data):
    assert torsocksd.parse_http_method(data) is NEED_MORE


# -- hostname_problem, ip_literal ---------------------------------------------

# Tor's string_is_valid_dest (address.c), with brackets only around IPv6 and
# NUL refused (the README's "hostnames" rows).
@pytest.mark.parametrize("hostname", [
    "a", "example.com", "example.com.", "EXAMPLE.com", "under_score.org",
    "a_b.c-d", "a-", "a-.b_", "0x1.example", "123", "1.2.3", "1.2.3.4.5",
    "1.2.3.4", "01.002.3.4", "255.255.255.255", "[2001:db8::1]",
    "2001:db8::1", "::", "[::ffff:1.2.3.4]", "::ffff:1.2.3.4",
    NAME_255.decode(), "x" * 255, "a" * 64 + ".com",
])
def test_hostname_without_problem(hostname):
    assert torsocksd.hostname_problem(hostname) is None


@pytest.mark.parametrize("hostname", [
    pytest.param("", id="empty"),
    pytest.param("x" * 256, id="256-bytes"),
    pytest.param("x" * 1000, id="1000-bytes"),
    pytest.param("a\0b", id="nul"),
    pytest.param("\0", id="nul-alone"),
    pytest.param("a b", id="space"),
    pytest.param(" ", id="space-alone"),
    pytest.param("a\x80", id="byte-80"),
    pytest.param("a\xff", id="byte-ff"),
    pytest.param("a\x7f", id="del"),
    pytest.param("a\x1f", id="byte-1f"),
    pytest.param("\xc3\xa9", id="utf-8-as-latin-1"),
    pytest.param("a..b", id="empty-label"),
    pytest.param(".a", id="leading-dot"),
    pytest.param("a..", id="two-trailing-dots"),
    pytest.param(".", id="dot"),
    pytest.param("user@host", id="at"),
    pytest.param("a%b", id="percent"),
    pytest.param("host:80", id="colon"),
    pytest.param("-a.com", id="leading-hyphen"),
    pytest.param("a.-b.com", id="label-leading-hyphen"),
    pytest.param("_a.com", id="leading-underscore"),
    pytest.param("a/b", id="slash"),
    pytest.param("a*", id="star"),
    pytest.param("[1.2.3.4]", id="ipv4-in-brackets"),
    pytest.param("[example.com]", id="name-in-brackets"),
    pytest.param("[::1", id="open-bracket"),
    pytest.param("::1]", id="close-bracket"),
    pytest.param("fe80::1%eth0", id="ipv6-zone"),
    pytest.param("a,b", id="comma"),
])
def test_hostname_problem(hostname):
    problem = torsocksd.hostname_problem(hostname)
    assert isinstance(problem, str) and problem


@pytest.mark.parametrize("text, expected", [
    ("192.0.2.1", ipaddress.IPv4Address("192.0.2.1")),
    ("0.0.0.0", ipaddress.IPv4Address("0.0.0.0")),
    ("2001:db8::1", ipaddress.IPv6Address("2001:db8::1")),
    ("[2001:db8::1]", ipaddress.IPv6Address("2001:db8::1")),
    ("::1", ipaddress.IPv6Address("::1")),
    ("[::ffff:127.0.0.1]", ipaddress.IPv6Address("::ffff:127.0.0.1")),
    # Leading zeros are decimal, as Tor reads them, on every Python.
    ("01.002.030.4", ipaddress.IPv4Address("1.2.30.4")),
    ("000.000.000.000", ipaddress.IPv4Address("0.0.0.0")),
])
def test_ip_literal(text, expected):
    assert torsocksd.ip_literal(text) == expected
    assert type(torsocksd.ip_literal(text)) is type(expected)


@pytest.mark.parametrize("text", [
    "", "example.com", "1.2.3", "1.2.3.4.5", "256.1.1.1", "[2001:db8::1",
    "2001:db8::1]", "[]", "[example.com]", "1.2.3.4:80", "::g",
    "example.com.", "[1.2.3.4]", "1.2.3.4.", "0001.2.3.4", "1..2.3",
    "+1.2.3.4", " 1.2.3.4", "1.2.3.4 ", "fe80::1%eth0", "[fe80::1%eth0]",
    "١.٢.٣.٤",
])
def test_not_an_ip_literal(text):
    assert torsocksd.ip_literal(text) is None


# -- seeded random input: never raise, always a well-formed outcome -----------

FUZZ_CASES = 20000
FUZZ_SEED = int(os.environ.get("TORSOCKSD_FUZZ_SEED")
                or random.SystemRandom().randrange(1 << 32))

REQUEST_REPLIES = {GENERAL_FAILURE, COMMAND_NOT_SUPPORTED,
                   ADDRESS_TYPE_NOT_SUPPORTED}
FUZZ_TARGETS = {
    # parser name: (first byte a valid message has, replies it may reject with)
    "socks4": (0x04, {S4REJ}),
    "greeting": (0x05, {b""}),
    "userpass": (0x01, {GENERAL_FAILURE}),
    "request": (0x05, REQUEST_REPLIES),
}
VALID_BY_PARSER = {}
for _param in ALL_VALID:
    VALID_BY_PARSER.setdefault(_param.values[0], []).append(_param.values[1])

INTERESTING_BYTES = bytes((0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x20, 0x7F,
                           0x80, 0xF0, 0xF1, 0xF2, 0xFF))


def random_bytes(rng, size):
    return rng.getrandbits(8 * size).to_bytes(size, "little") if size else b""


def fuzz_input(rng, first_byte, valid):
    """Random bytes, biased towards almost-valid messages."""
    kind = rng.randrange(4)
    if kind == 0:                       # noise
        return random_bytes(rng, rng.randrange(40))
    if kind == 1:                       # the right version, then noise
        data = bytearray(random_bytes(rng, rng.randrange(600)))
        data[:1] = bytes((first_byte,))
        return bytes(data)
    # a valid message, mutated, truncated or extended
    data = bytearray(rng.choice(valid))
    for _ in range(rng.randrange(1, 4)):
        if not data:
            break
        where = rng.randrange(len(data))
        if rng.randrange(2):
            data[where] = rng.choice(INTERESTING_BYTES)
        else:
            data[where] = rng.randrange(256)
    if kind == 2:
        del data[rng.randrange(len(data) + 1):]
    else:
        data += random_bytes(rng, rng.randrange(20))
    return bytes(data)


@pytest.mark.parametrize("parser_name", list(FUZZ_TARGETS))
def test_random_input_never_raises_and_answers_well_formed(parser_name):
    parser = PARSERS[parser_name]
    first_byte, replies = FUZZ_TARGETS[parser_name]
    valid = VALID_BY_PARSER[parser_name]
    rng = random.Random("%s-%d" % (parser_name, FUZZ_SEED))
    for case in range(FUZZ_CASES):
        data = fuzz_input(rng, first_byte, valid)
        where = "seed %d (TORSOCKSD_FUZZ_SEED), case %d, %s(%s)" % (
            FUZZ_SEED, case, parser_name, data.hex())
        buffer = memoryview(data) if case % 3 == 0 else data
        try:
            result = parser(buffer)
        except Exception as error:      # pragma: no cover - a failure
            pytest.fail("%s raised %r" % (where, error))
        if result is NEED_MORE:
            continue
        if isinstance(result, Parsed):
            assert 0 < result.used <= len(data), where
            # A message delimits itself: its own bytes parse the same.
            assert parser(data[:result.used]) == result, where
        else:
            assert isinstance(result, Rejected), "%s: %r" % (where, result)
            assert result.reply in replies, "%s: %r" % (where, result)
            assert isinstance(result.reason, str) and result.reason, where


def test_random_input_to_http_hostname_and_ip_helpers():
    rng = random.Random("helpers-%d" % FUZZ_SEED)
    for case in range(FUZZ_CASES):
        data = random_bytes(rng, rng.randrange(12))
        if case % 2:
            data = bytes(rng.choice(b"HEADGPOST ") for _ in data)
        where = "seed %d (TORSOCKSD_FUZZ_SEED), case %d, %s" % (
            FUZZ_SEED, case, data.hex())
        result = torsocksd.parse_http_method(data)
        assert result in (NEED_MORE, Parsed(b"", 0), Parsed(b"HEAD", 0)), where
        text = data.decode("latin-1")
        problem = torsocksd.hostname_problem(text)
        assert problem is None or isinstance(problem, str), where
        if problem is None:
            assert 1 <= len(data) <= 255 and data.isascii(), where
        address = torsocksd.ip_literal(text)
        assert address is None or isinstance(
            address, (ipaddress.IPv4Address, ipaddress.IPv6Address)), where


# -- reply builders -----------------------------------------------------------

def test_socks4_reply():
    assert torsocksd.socks4_reply(Socks4Reply.GRANTED) == S4OK
    assert torsocksd.socks4_reply(Socks4Reply.REJECTED) == S4REJ
    assert torsocksd.socks4_reply(Socks4Reply.GRANTED, h("01020304")) \
        == h("005a 0000 01020304")


@pytest.mark.parametrize("code", list(Reply))
def test_socks5_reply_for_an_ipv4_client_is_10_bytes(code):
    expected = bytes((5, code, 0, 1)) + bytes(6)
    assert torsocksd.socks5_reply(code) == expected
    assert torsocksd.socks5_reply(code, socket.AF_INET) == expected
    assert len(expected) == 10


@pytest.mark.parametrize("family", [socket.AF_INET6, socket.AF_UNIX],
                         ids=["AF_INET6", "AF_UNIX"])
@pytest.mark.parametrize("code", list(Reply))
def test_socks5_reply_for_ipv6_and_unix_clients_is_22_bytes(code, family):
    reply = torsocksd.socks5_reply(code, family)
    assert reply == bytes((5, code, 0, 4)) + bytes(16) + bytes(2)
    assert len(reply) == 22


def test_socks5_reply_bytes():
    assert torsocksd.socks5_reply(Reply.SUCCEEDED) \
        == h("05 00 00 01 00000000 0000")
    assert torsocksd.socks5_reply(Reply.CONNECTION_REFUSED, socket.AF_INET6) \
        == h("05 05 00 04 00000000000000000000000000000000 0000")


@pytest.mark.parametrize("address, expected", [
    ("192.0.2.1", h("05 00 00 01 c0000201 0000")),
    ("127.0.0.1", h("05 00 00 01 7f000001 0000")),
    ("2001:db8::1", h("05 00 00 04 20010db8000000000000000000000001 0000")),
    ("::ffff:1.2.3.4", h("05 00 00 04 00000000000000000000ffff01020304 0000")),
])
def test_socks5_address_reply(address, expected):
    reply = torsocksd.socks5_address_reply(ipaddress.ip_address(address))
    assert reply == expected
    assert reply[-2:] == b"\0\0"         # port 0


@pytest.mark.parametrize("hostname, encoded", [
    ("example.com", b"example.com"),
    ("example.com.", b"example.com"),
    ("host-1.example.org.", b"host-1.example.org"),
    ("a", b"a"),
    ("x" * 255, b"x" * 255),
    ("x" * 255 + ".", b"x" * 255),
])
def test_socks5_hostname_reply(hostname, encoded):
    assert torsocksd.socks5_hostname_reply(hostname) == \
        h("05 00 00 03") + bytes((len(encoded),)) + encoded + h("0000")


@pytest.mark.parametrize("hostname", [
    pytest.param("x" * 256, id="256-bytes"),
    pytest.param("x" * 300 + ".", id="300-bytes-dot"),
    pytest.param("", id="empty"),
    pytest.param(".", id="dot-alone"),
    pytest.param("exämple.com", id="latin-1"),
    pytest.param("例え.jp", id="cjk"),
    pytest.param("\u00e9", id="one-non-ascii-char"),
    pytest.param("bad name.example", id="space"),
    pytest.param("nul\0.example", id="nul"),
])
def test_socks5_hostname_reply_that_cannot_be_carried_is_05_04(hostname):
    assert torsocksd.socks5_hostname_reply(hostname) == \
        h("05 04 00 01 00000000 0000")


def test_socks5_method_reply():
    assert torsocksd.socks5_method_reply(Method.NO_AUTH) == h("05 00")
    assert torsocksd.socks5_method_reply(Method.USERNAME_PASSWORD) \
        == h("05 02")
    assert torsocksd.socks5_method_reply(Method.NO_ACCEPTABLE) == h("05 ff")


def test_username_password_reply():
    assert torsocksd.username_password_reply(True) == h("01 00")
    assert torsocksd.username_password_reply(False) == h("01 01")


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6,
                                    socket.AF_UNIX],
                         ids=["AF_INET", "AF_INET6", "AF_UNIX"])
@pytest.mark.parametrize("code", [c for c in Reply if c != Reply.SUCCEEDED])
def test_failure_reply(code, family):
    assert torsocksd.failure_reply(Version.SOCKS4, code, family) == S4REJ
    expected = socks5_reply(code, ipv6_client=family != socket.AF_INET)
    assert torsocksd.failure_reply(Version.SOCKS5, code, family) == expected


def test_failure_reply_defaults_to_an_ipv4_client():
    assert torsocksd.failure_reply(Version.SOCKS5, Reply.HOST_UNREACHABLE) \
        == h("05 04 00 01 00000000 0000")
    assert torsocksd.failure_reply(Version.SOCKS4, Reply.HOST_UNREACHABLE) \
        == S4REJ


@pytest.mark.parametrize("error_number, reply", [
    (errno.ECONNREFUSED, 0x05),
    (errno.ENETUNREACH, 0x03),
    (errno.EHOSTUNREACH, 0x04),
    (errno.ETIMEDOUT, 0x06),
    (errno.ECONNRESET, 0x01),
    (errno.EADDRNOTAVAIL, 0x01),
    (errno.ENOMEM, 0x01),
    (errno.EMFILE, 0x01),
    (0, 0x01),
    (99999, 0x01),
])
def test_reply_for_errno(error_number, reply):
    result = torsocksd.reply_for_errno(error_number)
    assert result == reply
    assert isinstance(result, Reply)


def _split_http(reply):
    head, separator, body = reply.partition(b"\r\n\r\n")
    assert separator, reply
    lines = head.split(b"\r\n")
    assert all(b"\n" not in line and b"\r" not in line for line in lines)
    headers = {}
    for line in lines[1:]:
        key, colon, value = line.partition(b":")
        assert colon, line
        assert key.lower() not in headers, line
        headers[key.lower()] = value.strip()
    return lines[0], headers, body


def test_http_reply_is_a_501_page():
    reply = torsocksd.http_reply(b"")
    status, headers, body = _split_http(reply)
    assert status.startswith(b"HTTP/1.0 501 ")
    assert headers[b"content-type"] == b"text/html; charset=utf-8"
    assert headers[b"content-length"] == str(len(body)).encode()
    assert headers[b"connection"].lower() == b"close"
    assert body
    assert b"\0" not in reply
    assert not reply.endswith(b"\0")
    assert b"SOCKS" in body
    body.decode("utf-8")
    reply.partition(b"\r\n\r\n")[0].decode("ascii")


def test_http_reply_to_head_is_the_headers_only():
    full = torsocksd.http_reply(b"")
    head = torsocksd.http_reply(b"HEAD")
    assert head.endswith(b"\r\n\r\n")
    assert head.count(b"\r\n\r\n") == 1
    assert full.startswith(head)
    status, headers, body = _split_http(head)
    assert body == b""
    assert status.startswith(b"HTTP/1.0 501 ")
    # Content-Length still says how long the GET body would be.
    assert headers[b"content-length"] == str(len(full) - len(head)).encode()
    assert b"\0" not in head


# -- policy -------------------------------------------------------------------

@pytest.mark.parametrize("offered, required, chosen", [
    (h("00"), False, Method.NO_AUTH),
    (h("02"), False, Method.USERNAME_PASSWORD),
    (h("00 02"), False, Method.NO_AUTH),
    (h("02 00"), False, Method.NO_AUTH),
    (h("01 02"), False, Method.USERNAME_PASSWORD),
    (h("01"), False, Method.NO_ACCEPTABLE),
    (h("03 99 21 10"), False, Method.NO_ACCEPTABLE),
    (h("ff"), False, Method.NO_ACCEPTABLE),
    (b"", False, Method.NO_ACCEPTABLE),
    (bytes(range(255)), False, Method.NO_AUTH),
    (bytes(range(1, 255)), False, Method.USERNAME_PASSWORD),
    (h("00"), True, Method.NO_ACCEPTABLE),
    (h("02"), True, Method.USERNAME_PASSWORD),
    (h("00 02"), True, Method.USERNAME_PASSWORD),
    (h("02 00"), True, Method.USERNAME_PASSWORD),
    (h("01"), True, Method.NO_ACCEPTABLE),
    (b"", True, Method.NO_ACCEPTABLE),
])
def test_choose_method(offered, required, chosen):
    assert torsocksd.choose_method(offered, required) is chosen


def test_credentials_check():
    credentials = torsocksd.Credentials([(b"alice", b"secret"),
                                         (b"bob", b"")])
    assert credentials
    assert credentials.check(b"alice", b"secret")
    assert credentials.check(b"bob", b"")
    assert not credentials.check(b"alice", b"wrong")
    assert not credentials.check(b"alice", b"")
    assert not credentials.check(b"bob", b"secret")
    assert not credentials.check(b"carol", b"secret")
    assert not credentials.check(b"", b"")
    # The boundary between the fields counts: "alic"+"esecret" is not alice.
    assert not credentials.check(b"alic", b"esecret")
    assert not credentials.check(b"alicesecret", b"")


def test_no_credentials_are_false_and_match_nothing():
    credentials = torsocksd.Credentials([])
    assert not credentials
    assert not credentials.check(b"", b"")


def test_credentials_from_file(tmp_path):
    path = tmp_path / "users"
    path.write_bytes(b"# users of this proxy\n"
                     b"\n"
                     b"alice:secret\n"
                     b"   \n"
                     b"#bob:commented-out\n"
                     b"carol:pa:ss\r\n"
                     b"erin:last-line-without-newline")
    credentials = torsocksd.Credentials.from_file(str(path))
    assert credentials.check(b"alice", b"secret")
    assert credentials.check(b"carol", b"pa:ss")
    assert credentials.check(b"erin", b"last-line-without-newline")
    assert not credentials.check(b"bob", b"commented-out")
    assert not credentials.check(b"#bob", b"commented-out")
    assert not credentials.check(b"alice", b"secret\n")
    assert not credentials.check(b"carol", b"pa:ss\r")


@pytest.mark.parametrize("line", [
    pytest.param(b"no-colon-here", id="no-colon"),
    pytest.param(b"u" * 256 + b":password", id="username-256"),
    pytest.param(b"user:" + b"p" * 256, id="password-256"),
    # RFC 1929 fields are 1 to 255 bytes: an empty one (a template's unset
    # variable) would let in whoever sends empty fields.
    pytest.param(b":", id="empty-user-and-password"),
    pytest.param(b":secret", id="empty-user"),
    pytest.param(b"dave:", id="empty-password"),
])
def test_credentials_file_with_a_malformed_line_raises(tmp_path, line):
    path = tmp_path / "users"
    path.write_bytes(b"alice:secret\n" + line + b"\n")
    with pytest.raises(ValueError):
        torsocksd.Credentials.from_file(str(path))


@pytest.mark.parametrize("contents", [
    pytest.param(b"", id="empty"),
    pytest.param(b"\n\r\n  \n", id="blank"),
    pytest.param(b"# users\n#alice:secret\n", id="commented-out"),
])
def test_credentials_file_without_a_user_raises(tmp_path, contents):
    path = tmp_path / "users"
    path.write_bytes(contents)
    with pytest.raises(ValueError, match="^%s: no user:password line"
                       % re.escape(str(path))):
        torsocksd.Credentials.from_file(str(path))


@pytest.mark.parametrize("host", [
    "abcdefghijklmnop.onion", "x.exit", "www.example.com.exit",
    "ABCDEFGHIJKLMNOP.ONION", "foo.Onion.", "x.EXIT.", "a.b.onion",
])
def test_special_names_are_refused(host):
    refusal = torsocksd.special_name_refusal(host)
    assert isinstance(refusal, str) and refusal


@pytest.mark.parametrize("host", [
    "example.com", "example.com.", "onion.example.com", "exit.example.org",
    "notonion", "myexit", "onionx", "example.onion.com", "192.0.2.1",
])
def test_plain_names_are_not_special(host):
    assert torsocksd.special_name_refusal(host) is None


LOCAL_ONLY = ["127.0.0.1", "127.1.2.3", "::1", "::ffff:127.0.0.1",
              "169.254.169.254", "169.254.0.1", "fe80::1",
              "::ffff:169.254.169.254", "0.0.0.0", "::", "::ffff:0.0.0.0",
              "0.1.2.3", "0.255.255.255", "224.0.0.1", "239.255.255.250",
              "ff02::1"]
REACHABLE = ["192.0.2.1", "2001:db8::1", "8.8.8.8", "::ffff:192.0.2.1",
             "10.0.0.1", "192.168.1.1"]


@pytest.mark.parametrize("address", LOCAL_ONLY + REACHABLE)
def test_local_client_may_reach_anything(address):
    assert torsocksd.destination_refusal(
        True, ipaddress.ip_address(address)) is None


@pytest.mark.parametrize("address", LOCAL_ONLY)
def test_remote_client_may_not_reach_local_only_addresses(address):
    refusal = torsocksd.destination_refusal(False,
                                            ipaddress.ip_address(address))
    assert isinstance(refusal, str) and refusal


@pytest.mark.parametrize("address", REACHABLE)
def test_remote_client_may_reach_other_addresses(address):
    assert torsocksd.destination_refusal(
        False, ipaddress.ip_address(address)) is None


@pytest.mark.parametrize("version, address_type, command, unsafe", [
    (Version.SOCKS4, AddressType.IPV4, Command.CONNECT, True),
    (Version.SOCKS4, AddressType.IPV4, Command.RESOLVE, True),
    (Version.SOCKS4, AddressType.DOMAIN, Command.CONNECT, False),
    (Version.SOCKS4, AddressType.DOMAIN, Command.RESOLVE, False),
    (Version.SOCKS5, AddressType.IPV4, Command.CONNECT, True),
    (Version.SOCKS5, AddressType.IPV6, Command.CONNECT, True),
    (Version.SOCKS5, AddressType.IPV4, Command.RESOLVE, True),
    (Version.SOCKS5, AddressType.IPV6, Command.RESOLVE, True),
    (Version.SOCKS5, AddressType.DOMAIN, Command.CONNECT, False),
    (Version.SOCKS5, AddressType.DOMAIN, Command.RESOLVE, False),
    (Version.SOCKS5, AddressType.IPV4, Command.RESOLVE_PTR, False),
    (Version.SOCKS5, AddressType.IPV6, Command.RESOLVE_PTR, False),
])
def test_is_unsafe_request(version, address_type, command, unsafe):
    assert torsocksd.is_unsafe_request(version, address_type, command) \
        is unsafe
