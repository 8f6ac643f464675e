"""The SOCKS handshake as a sans-I/O object, byte for byte: what it answers,
what it decides, and the order in which it checks a request (Tor's:
command, address type, hostname, then what is allowed).

No sockets: bytes go into SocksHandshake.receive() and its replies and its
decision come out.
"""

import ipaddress
import socket

import pytest

import torsocksd
from torsocksd import (Command, HandshakeState, Reply, SocksHandshake,
                       Version)

h = bytes.fromhex


def r5(code):
    """05 REP 00 01 00000000 0000: the 10-byte reply."""
    return bytes((5, code, 0, 1)) + bytes(6)


S4REJ = h("005b 0000 00000000")
NO_AUTH = h("050100")


def request5(command, name, port=80):
    """A SOCKS5 request naming a host (ATYP 3)."""
    if isinstance(name, str):
        name = name.encode("latin-1")
    return bytes((5, command, 0, 3, len(name))) + name + port.to_bytes(2, "big")


def request4a(command, name, port=80, userid=b""):
    return (bytes((4, command)) + port.to_bytes(2, "big") + h("00000001")
            + userid + b"\0" + name.encode("latin-1") + b"\0")


def run(*messages, **options):
    """A handshake fed messages one at a time: (all replies, handshake)."""
    handshake = SocksHandshake(**options)
    replies = b""
    for message in messages:
        replies += handshake.receive(message)
    return replies, handshake


def accepted(*messages, **options):
    replies, handshake = run(*messages, **options)
    assert handshake.state is HandshakeState.DONE
    assert handshake.request is not None, handshake.refusal
    return replies, handshake.request


def refused(*messages, **options):
    replies, handshake = run(*messages, **options)
    assert handshake.state is HandshakeState.DONE
    assert handshake.request is None
    assert handshake.refusal
    return replies


# -- RFC 1929 after "no authentication" ---------------------------------------

def test_userpass_after_no_auth_is_answered_and_the_handshake_goes_on():
    """Tor answers 01 00 and goes on (the README: "SOCKS5 methods")."""
    replies, request = accepted(NO_AUTH, h("0101610162"),
                                request5(Command.CONNECT, "example.com"))
    assert replies == h("0500") + h("0100")
    assert request.command is Command.CONNECT
    assert request.userid == b"a"


def test_userpass_after_no_auth_in_one_segment():
    replies, request = accepted(NO_AUTH + h("0101610162")
                                + request5(Command.RESOLVE, "example.com"))
    assert replies == h("0500 0100")
    assert request.command is Command.RESOLVE


def test_a_second_userpass_after_no_auth_is_a_bad_request():
    """Only one: after it the next message must be a request (Tor: 01)."""
    replies = refused(NO_AUTH, h("0101610162"), h("0101610162"))
    assert replies == h("0500 0100") + r5(1)


def test_userpass_after_chosen_userpass_is_not_repeated():
    replies = refused(h("050102"), h("0101610162"), h("0101610162"))
    assert replies == h("0502 0100") + r5(1)


# -- port 0 ---------------------------------------------------------------------

@pytest.mark.parametrize("command", [Command.CONNECT, Command.CONNECT_DIR])
def test_socks5_connect_to_port_0_is_refused_with_01(command):
    assert refused(NO_AUTH, h("05") + bytes((command,)) + h("00 01 08080808 0000"))\
        == h("0500") + r5(1)
    assert refused(NO_AUTH, request5(command, "example.com", 0)) \
        == h("0500") + r5(1)


@pytest.mark.parametrize("command", [Command.CONNECT, Command.CONNECT_DIR])
def test_socks4_connect_to_port_0_is_refused(command):
    assert refused(bytes((4, command)) + h("0000 08080808 00")) == S4REJ
    assert refused(request4a(command, "example.com", 0)) == S4REJ


def test_lookups_ignore_the_port():
    _, request = accepted(NO_AUTH, request5(Command.RESOLVE, "example.com", 0))
    assert request.port == 0
    _, request = accepted(NO_AUTH, h("05f10001 08080808 0000"))
    assert request.command is Command.RESOLVE_PTR


# -- the order of checks --------------------------------------------------------

def test_resolve_ptr_of_a_malformed_name_is_08():
    """05 f1 00 03 03 "a b" 0000: the address type comes before the name."""
    assert refused(NO_AUTH, h("05f10003036120620000")) == h("0500") + r5(8)


@pytest.mark.parametrize("command", [Command.BIND, Command.UDP_ASSOCIATE])
def test_unsupported_command_with_a_malformed_name_is_07(command):
    assert refused(NO_AUTH, request5(command, "a b")) == h("0500") + r5(7)
    assert refused(NO_AUTH, request5(command, "")) == h("0500") + r5(7)


def test_socks4_resolve_ptr_with_a_malformed_name_is_rejected():
    assert refused(request4a(Command.RESOLVE_PTR, "a b")) == S4REJ


@pytest.mark.parametrize("name", [
    "a..b", "user@host", "a%b", "host:80", "-a.com", "_a.com", "a b", "",
    "a\0b", "[1.2.3.4]", "[example.com]", "caf\xe9.fr",
])
def test_malformed_names_are_refused_without_a_lookup(name):
    # CONNECT: 01; RESOLVE: the lookup failure reply; SOCKS4A: 5b.
    assert refused(NO_AUTH, request5(Command.CONNECT, name)) \
        == h("0500") + r5(1)
    assert refused(NO_AUTH, request5(Command.CONNECT_DIR, name, 9001)) \
        == h("0500") + r5(1)
    # A byte outside printable ASCII is a bad request whatever the
    # command; a name only Tor's rule refuses is, for RESOLVE, its failure.
    printable = name.isascii() and name.isprintable()
    assert refused(NO_AUTH, request5(Command.RESOLVE, name, 0)) \
        == h("0500") + r5(4 if printable else 1)
    if "\0" not in name:       # SOCKS4A's NUL ends the name
        assert refused(request4a(Command.CONNECT, name)) == S4REJ
        assert refused(request4a(Command.RESOLVE, name, 0)) == S4REJ


def test_the_hostname_comes_before_safe_socks():
    """A malformed name is 01 even where safe-socks would say 02."""
    assert refused(NO_AUTH, request5(Command.CONNECT, "a..b"),
                   safe_socks=True) == h("0500") + r5(1)


def test_safe_socks_comes_before_port_0():
    assert refused(NO_AUTH, h("05010001 08080808 0000"), safe_socks=True) \
        == h("0500") + r5(2)


@pytest.mark.parametrize("name", [
    "example.com", "example.com.", "EXAMPLE.COM", "a_b.example", "a-.b",
    "xn--bcher-kva.example", "1.2.3", "[2001:db8::1]", "2001:db8::1",
])
def test_valid_names_are_accepted(name):
    _, request = accepted(NO_AUTH, request5(Command.CONNECT, name))
    assert request.host == name


# -- where torsocksd stays as it is (pinned) --------------------------------------

def test_socks4a_with_an_ipv6_literal_is_that_address():
    """The README: "SOCKS4A with an IP literal" (Tor refuses IPv6 there)."""
    replies, request = accepted(request4a(Command.CONNECT, "2001:db8::7"))
    assert replies == b""
    assert request.address == ipaddress.ip_address("2001:db8::7")
    _, request = accepted(request4a(Command.CONNECT, "[2001:db8::7]"))
    assert request.address == ipaddress.ip_address("2001:db8::7")


@pytest.mark.parametrize("literal", ["127.0.0.1", "169.254.169.254",
                                     "fe80::1", "::1", "0.0.0.0"])
def test_resolve_of_any_ip_literal_is_taken_as_it_is(literal):
    """The README: "RESOLVE of an IP literal" (no scope check)."""
    _, request = accepted(NO_AUTH, request5(Command.RESOLVE, literal, 0))
    assert request.address == ipaddress.ip_address(literal)


def test_a_byte_that_cannot_start_a_message_is_answered_at_once():
    """The README: "fail fast"; Tor waits for a second byte."""
    replies, handshake = run(h("06"))
    assert handshake.state is HandshakeState.DONE and replies == b""
    assert refused(h("0403")) == S4REJ


# -- replies that end the conversation --------------------------------------------

def test_failure_replies_follow_the_client_family_except_for_lookups():
    _, handshake = run(NO_AUTH, request5(Command.CONNECT, "example.com"),
                       client_family=socket.AF_INET6)
    assert handshake.failure_reply(Reply.CONNECTION_REFUSED) \
        == h("05050004") + bytes(18)
    assert handshake.success_reply() == h("05000004") + bytes(18)
    _, handshake = run(NO_AUTH, request5(Command.RESOLVE, "example.com"),
                       client_family=socket.AF_INET6)
    assert handshake.failure_reply(Reply.HOST_UNREACHABLE) == r5(4)
    assert handshake.resolve_reply(ipaddress.ip_address("192.0.2.1")) \
        == h("05000001 c0000201 0000")


def test_socks4_replies():
    _, handshake = run(request4a(Command.RESOLVE, "example.com", 0))
    assert handshake.version is Version.SOCKS4
    assert handshake.resolve_reply(ipaddress.ip_address("192.0.2.1")) \
        == h("005a 0000 c0000201")
    assert handshake.failure_reply(Reply.HOST_UNREACHABLE) == S4REJ


def test_http_page_names_the_address_the_client_reached():
    replies = refused(b"GET / HTTP/1.1\r\n\r\n",
                      local_address=lambda: "[::1]:9050")
    head, _, page = replies.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 501 ")
    assert b"Content-Length: %d" % len(page) in head
    assert b"<code>--socks5-hostname [::1]:9050</code>" in page
    assert b"socks5h://[::1]:9050" in page
    assert b"HOST:PORT" not in page
    assert b"white-space: nowrap" in page


def test_http_reply_escapes_what_it_names():
    page = torsocksd.http_reply(b"", "localhost/tmp/a<b>&c")
    assert b"localhost/tmp/a&lt;b&gt;&amp;c" in page
    assert b"<b>&c" not in page
