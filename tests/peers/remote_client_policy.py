"""Run inside a fresh network namespace (unshare -n), as root: a client from
another host may not use torsocksd to reach this host's loopback.

Brings lo up and adds the test host address 192.0.2.1/32 (TEST-NET-1) to it.
Echo servers listen on 127.0.0.1 and on 192.0.2.1.  torsocksd listens on
0.0.0.0, once with open_proxy=True and once with a client policy that lets
192.0.2.0/24 in; a client whose socket is bound to 192.0.2.1 before it
connects is, as far as torsocksd can tell, on another host.  That client
must get 02 (SOCKS4: 5b) for every way of naming a loopback, unspecified,
link-local or multicast destination, and a working tunnel to 192.0.2.1; the
echo server on 127.0.0.1 must never see a connection of its.  A client on
127.0.0.1 (the control) reaches 127.0.0.1.  A third server, whose policy
lets only 127.0.0.0/8 in, closes the remote client at accept without a byte.

Then destination rules (--policy): a broad accept ("accept *:PORT") never
opens loopback, 0.0.0.0 or :: to the remote client, while an accept that
names a loopback address itself does, for that address and port only.  A
client rule written as an IPv4-mapped address (::ffff:192.0.2.2) refuses
the IPv4 client 192.0.2.2, and a destination rule written that way refuses
192.0.2.1 to remote and local clients alike.

Prints one line per check and exits non-zero if any fails.
"""

import socket
import sys

# common first: it puts torsocksd and conftest on sys.path.
from common import (CLOSED, add_test_hosts, check, connect_from, finish,
                    read_to_end, wait_until)
import torsocksd
from conftest import (EchoServer, FakeResolver, recv_up_to,
                      socks4_request, socks4a_request, socks5_target)

HOST = "192.0.2.1"
OTHER_HOST = "192.0.2.2"     # a second remote client
# What the servers' resolver knows (FakeResolver: never DNS).
NAMES = {"loop.test": ["127.0.0.1"], "localhost": ["127.0.0.1"],
         "loop6.test": ["::1"], "host.test": [HOST],
         "meta.test": ["169.254.169.254"]}


def client(server_port, source):
    """A connection from source to the server's port on HOST (on 127.0.0.1
    from 127.0.0.1)."""
    return connect_from(source, (HOST if source != "127.0.0.1"
                                 else "127.0.0.1", server_port))


def ping_through(sock, reply):
    """After a success reply: one echo through the tunnel, then the end."""
    sock.sendall(b"ping")
    echoed = recv_up_to(sock, 4)
    sock.shutdown(socket.SHUT_WR)
    data, end = read_to_end(sock)
    return reply, (echoed + data, end)


def socks5_connect(server_port, source, target):
    """(reply, what followed and how it ended) for a SOCKS5 CONNECT."""
    with client(server_port, source) as sock:
        sock.sendall(b"\x05\x01\x00")
        method = recv_up_to(sock, 2)
        if method != b"\x05\x00":
            return method, read_to_end(sock)
        sock.sendall(b"\x05\x01\x00" + target)
        reply = recv_up_to(sock, 10)
        if reply[:2] == b"\x05\x00":
            return ping_through(sock, reply)
        return reply, read_to_end(sock)


def socks4_connect(server_port, source, address, port, name=None):
    with client(server_port, source) as sock:
        if name is None:
            sock.sendall(socks4_request(1, address, port))
        else:
            sock.sendall(socks4a_request(1, name, port))
        reply = recv_up_to(sock, 8)
        if reply[:2] == b"\x00\x5a":
            return ping_through(sock, reply)
        return reply, read_to_end(sock)


NOT_ALLOWED = b"\x05\x02\x00\x01" + bytes(6)
SUCCEEDED = b"\x05\x00\x00\x01" + bytes(6)
S4_REJECTED = b"\x00\x5b" + bytes(6)
S4_GRANTED = b"\x00\x5a" + bytes(6)


def run_checks(label, server, loop_echo, host_echo):
    port = server.address[1]
    before = len(loop_echo.accepted)
    lport, hport = loop_echo.port, host_echo.port
    refused = [
        ("127.0.0.1", socks5_target("127.0.0.1", lport)),
        ("127.0.0.2", socks5_target("127.0.0.2", lport)),
        ("::1", socks5_target("::1", lport)),
        ("::ffff:127.0.0.1", socks5_target("::ffff:127.0.0.1", lport)),
        ("0.0.0.0", socks5_target("0.0.0.0", lport)),
        ("::", socks5_target("::", lport)),
        ("169.254.169.254", socks5_target("169.254.169.254", 80)),
        ("fe80::1", socks5_target("fe80::1", 80)),
        ("224.0.0.1", socks5_target("224.0.0.1", 80)),
        ("ff02::1", socks5_target("ff02::1", 80)),
        ("name loop.test", socks5_target("loop.test", lport)),
        ("name localhost", socks5_target("localhost", lport)),
        ("name loop6.test", socks5_target("loop6.test", lport)),
        ("name meta.test", socks5_target("meta.test", 80)),
        ("literal name 127.0.0.1",
         b"\x03\x09127.0.0.1" + lport.to_bytes(2, "big")),
        ("literal name [::1]", b"\x03\x05[::1]" + lport.to_bytes(2, "big")),
        ("literal name ::ffff:127.0.0.1",
         b"\x03\x10::ffff:127.0.0.1" + lport.to_bytes(2, "big")),
    ]
    for what, target in refused:
        reply, (rest, end) = socks5_connect(port, HOST, target)
        check("%s: remote client, SOCKS5 CONNECT %s -> 05 02 and close"
              % (label, what), reply == NOT_ALLOWED and rest == b""
              and end == "eof", "got %s, then %r, %s" % (reply.hex(), rest,
                                                         end))
    for what, address, name in (("127.0.0.1", "127.0.0.1", None),
                                ("SOCKS4A loop.test", None, "loop.test"),
                                ("SOCKS4A localhost", None, "localhost")):
        reply, (rest, end) = socks4_connect(port, HOST, address, lport, name)
        check("%s: remote client, SOCKS4 CONNECT %s -> 5b and close"
              % (label, what), reply == S4_REJECTED and rest == b""
              and end == "eof", "got %s, then %r, %s" % (reply.hex(), rest,
                                                         end))
    check("%s: the loopback echo server saw no connection from those"
          % label, len(loop_echo.accepted) == before,
          "peers %r" % loop_echo.accepted[before:])

    for what, target in (("192.0.2.1", socks5_target(HOST, hport)),
                         ("name host.test", socks5_target("host.test",
                                                          hport))):
        reply, (rest, end) = socks5_connect(port, HOST, target)
        check("%s: remote client, SOCKS5 CONNECT %s (this host, not "
              "loopback) works" % (label, what),
              reply == SUCCEEDED and rest == b"ping" and end == "eof",
              "got %s, then %r, %s" % (reply.hex(), rest, end))
    reply, (rest, end) = socks4_connect(port, HOST, HOST, hport)
    check("%s: remote client, SOCKS4 CONNECT 192.0.2.1 works" % label,
          reply == S4_GRANTED and rest == b"ping" and end == "eof",
          "got %s, then %r, %s" % (reply.hex(), rest, end))

    reply, (rest, end) = socks5_connect(port, "127.0.0.1",
                                        socks5_target("127.0.0.1", lport))
    check("%s: loopback client (control), SOCKS5 CONNECT 127.0.0.1 works"
          % label, reply == SUCCEEDED and rest == b"ping" and end == "eof",
          "got %s, then %r, %s" % (reply.hex(), rest, end))
    peers = loop_echo.accepted[before:]
    check("%s: the loopback echo server's only client was the control's "
          "tunnel, from 127.0.0.1" % label,
          len(peers) == 1 and peers[0][0] == "127.0.0.1", "peers %r" % peers)


def main():
    add_test_hosts(HOST, OTHER_HOST)
    loop_echo = EchoServer(host="127.0.0.1")
    host_echo = EchoServer(host=HOST)

    try:
        torsocksd.Server([("0.0.0.0", 0)], resolver=FakeResolver(NAMES)).bind()
    except ValueError as error:
        check("0.0.0.0 without open_proxy, policy or credentials is refused",
              True, str(error)[:60])
    else:
        check("0.0.0.0 without open_proxy, policy or credentials is refused",
              False, "it started")

    with torsocksd.Server([("0.0.0.0", 0)], resolver=FakeResolver(NAMES),
                          open_proxy=True) as server:
        run_checks("open_proxy", server, loop_echo, host_echo)
        check("open_proxy: no connection left open",
              wait_idle(server), "active %d" % server.stats()["active"])

    policy = torsocksd.ClientPolicy([(True, "192.0.2.0/24"),
                                     (True, "127.0.0.0/8")])
    with torsocksd.Server([("0.0.0.0", 0)], resolver=FakeResolver(NAMES),
                          client_policy=policy) as server:
        run_checks("client policy 192.0.2.0/24", server, loop_echo,
                   host_echo)
        check("client policy: no connection left open", wait_idle(server),
              "active %d" % server.stats()["active"])

    policy = torsocksd.ClientPolicy([(True, "127.0.0.0/8")])
    with torsocksd.Server([("0.0.0.0", 0)], resolver=FakeResolver(NAMES),
                          client_policy=policy) as server:
        with client(server.address[1], HOST) as sock:
            sock.sendall(b"\x05\x01\x00")
            data, end = read_to_end(sock)
        check("client policy 127.0.0.0/8 only: a remote client gets no "
              "byte and a closed socket", data == b"" and end in CLOSED,
              "got %r, %s" % (data, end))
        check("client policy 127.0.0.0/8 only: counted as refused at accept",
              server.stats()["refused_at_accept"] == 1,
              repr(server.stats()))

    run_destination_rule_checks(loop_echo, host_echo)
    run_mapped_rule_checks(loop_echo, host_echo)
    run_handed_in_checks(host_echo)
    run_ipv6_prefix_checks()

    return finish()


REMOTE_CLIENTS = torsocksd.ClientPolicy([(True, "192.0.2.0/24"),
                                         (True, "127.0.0.0/8")])


def server_for_remote_clients(destination_rules, clients=REMOTE_CLIENTS):
    """A server on every interface for these clients (by default
    192.0.2.0/24 and loopback) with these destination rules."""
    return torsocksd.Server(
        [("0.0.0.0", 0)], resolver=FakeResolver(NAMES), client_policy=clients,
        destination_policy=torsocksd.DestinationPolicy(destination_rules))


def expect_socks5(label, port, source, what, target, expected):
    """A SOCKS5 CONNECT from source: expected is the reply (a success must
    then carry one echo through the tunnel)."""
    reply, (rest, end) = socks5_connect(port, source, target)
    if expected == SUCCEEDED:
        ok = reply == SUCCEEDED and rest == b"ping" and end == "eof"
    else:
        ok = reply == expected and rest == b"" and end == "eof"
    check("%s: %s client, SOCKS5 CONNECT %s -> %s"
          % (label, "local" if source == "127.0.0.1" else "remote", what,
             expected[:2].hex()), ok,
          "got %s, then %r, %s" % (reply.hex(), rest, end))


def run_destination_rule_checks(loop_echo, host_echo):
    lport, hport = loop_echo.port, host_echo.port
    before = len(loop_echo.accepted)
    label = "accept *:%d, reject *:*" % lport
    with server_for_remote_clients(["accept *:%d" % lport,
                                    "accept *:%d" % hport,
                                    "reject *:*"]) as server:
        port = server.address[1]
        for what, host in (("127.0.0.1", "127.0.0.1"),
                           ("name localhost", "localhost"),
                           ("name loop.test", "loop.test"),
                           ("::1", "::1"), ("0.0.0.0", "0.0.0.0"),
                           ("::", "::"),
                           ("::ffff:127.0.0.1", "::ffff:127.0.0.1")):
            expect_socks5(label, port, HOST, what,
                          socks5_target(host, lport), NOT_ALLOWED)
        reply, (rest, end) = socks4_connect(port, HOST, "127.0.0.1", lport)
        check("%s: remote client, SOCKS4 CONNECT 127.0.0.1 -> 5b" % label,
              reply == S4_REJECTED and rest == b"" and end == "eof",
              "got %s, then %r, %s" % (reply.hex(), rest, end))
        check("%s: the loopback echo server saw no connection from those"
              % label, len(loop_echo.accepted) == before,
              "peers %r" % loop_echo.accepted[before:])
        expect_socks5(label, port, HOST, "192.0.2.1 (accepted port)",
                      socks5_target(HOST, hport), SUCCEEDED)
        expect_socks5(label, port, HOST, "192.0.2.1 (another port)",
                      socks5_target(HOST, lport + 1 if lport + 1 != hport
                                    else lport + 2), NOT_ALLOWED)
        expect_socks5(label, port, "127.0.0.1", "127.0.0.1 (control)",
                      socks5_target("127.0.0.1", lport), SUCCEEDED)
        check("%s: no connection left open" % label, wait_idle(server),
              "active %d" % server.stats()["active"])

    label = "accept 127.0.0.1:%d, reject *:*" % lport
    with server_for_remote_clients(["accept 127.0.0.1:%d" % lport,
                                    "reject *:*"]) as server:
        port = server.address[1]
        for what, host in (("127.0.0.1", "127.0.0.1"),
                           ("name loop.test", "loop.test"),
                           ("::ffff:127.0.0.1", "::ffff:127.0.0.1"),
                           ("0.0.0.0 (reaches 127.0.0.1)", "0.0.0.0")):
            expect_socks5(label, port, HOST, what,
                          socks5_target(host, lport), SUCCEEDED)
        for what, target in (
                ("127.0.0.1, another port",
                 socks5_target("127.0.0.1", hport)),
                ("127.0.0.2", socks5_target("127.0.0.2", lport)),
                ("::1", socks5_target("::1", lport)),
                ("::", socks5_target("::", lport)),
                ("192.0.2.1", socks5_target(HOST, hport))):
            expect_socks5(label, port, HOST, what, target, NOT_ALLOWED)
        check("%s: no connection left open" % label, wait_idle(server),
              "active %d" % server.stats()["active"])

    label = "reject 127.0.0.0/8, reject [::1], accept *:*"
    before = len(loop_echo.accepted)
    with server_for_remote_clients(["reject 127.0.0.0/8", "reject [::1]",
                                    "accept *:*"]) as server:
        port = server.address[1]
        for source in (HOST, "127.0.0.1"):
            for host in ("0.0.0.0", "::", "::ffff:0.0.0.0"):
                expect_socks5(label, port, source, host,
                              socks5_target(host, lport), NOT_ALLOWED)
        expect_socks5(label, port, "127.0.0.1", "192.0.2.1",
                      socks5_target(HOST, hport), SUCCEEDED)
        check("%s: the loopback echo server saw no connection" % label,
              len(loop_echo.accepted) == before,
              "peers %r" % loop_echo.accepted[before:])


def run_mapped_rule_checks(loop_echo, host_echo):
    hport = host_echo.port
    label = "--deny ::ffff:192.0.2.2"
    clients = torsocksd.ClientPolicy([(False, "::ffff:192.0.2.2"),
                                      (True, "192.0.2.0/24")])
    with server_for_remote_clients([], clients) as server:
        port = server.address[1]
        with client(port, OTHER_HOST) as sock:
            sock.sendall(b"\x05\x01\x00")
            data, end = read_to_end(sock)
        check("%s: client 192.0.2.2 gets no byte and a closed socket"
              % label, data == b"" and end in CLOSED,
              "got %r, %s" % (data, end))
        check("%s: counted as refused at accept" % label,
              server.stats()["refused_at_accept"] == 1,
              repr(server.stats()))
        expect_socks5(label, port, HOST, "192.0.2.1 from 192.0.2.1",
                      socks5_target(HOST, hport), SUCCEEDED)

    label = "reject [::ffff:192.0.2.1]:%d, accept *:*" % hport
    before = len(host_echo.accepted)
    with server_for_remote_clients(["reject [::ffff:192.0.2.1]:%d" % hport,
                                    "accept *:*"]) as server:
        port = server.address[1]
        for source in (HOST, "127.0.0.1"):
            for what, host in (("192.0.2.1", HOST),
                               ("::ffff:192.0.2.1", "::ffff:" + HOST),
                               ("name host.test", "host.test")):
                expect_socks5(label, port, source, what,
                              socks5_target(host, hport), NOT_ALLOWED)
        check("%s: the echo server on 192.0.2.1 saw no connection" % label,
              len(host_echo.accepted) == before,
              "peers %r" % host_echo.accepted[before:])


def handed_in_pair(source):
    """(the server's end, the client's end) of a TCP connection from
    source to HOST, as inetd or systemd Accept=yes would hand it over."""
    with socket.socket() as listener:
        listener.bind((HOST, 0))
        listener.listen(1)
        client_end = connect_from(source, listener.getsockname())
        server_end, _ = listener.accept()
    return server_end, client_end


def run_handed_in_checks(host_echo):
    """inetd and Accept=yes hand in a connected socket: a client from
    another host needs a client policy or credentials there too."""
    server_end, client_end = handed_in_pair(OTHER_HOST)
    server = torsocksd.Server(sockets=[server_end],
                              resolver=FakeResolver(NAMES))
    server.start()
    with client_end:
        client_end.sendall(b"\x05\x01\x00")
        data, end = read_to_end(client_end)
    server.stop()
    check("handed-in client from another host, no policy: no byte, closed",
          data == b"" and end in CLOSED, "got %r, %s" % (data, end))
    check("handed-in client from another host, no policy: refused at accept",
          server.stats()["refused_at_accept"] == 1, repr(server.stats()))

    server_end, client_end = handed_in_pair(OTHER_HOST)
    server = torsocksd.Server(sockets=[server_end],
                              resolver=FakeResolver(NAMES),
                              client_policy=REMOTE_CLIENTS)
    server.start()
    with client_end:
        client_end.sendall(b"\x05\x01\x00\x05\x01\x00"
                           + socks5_target(HOST, host_echo.port))
        reply = recv_up_to(client_end, 12)
        outcome = ping_through(client_end, reply)
    server.stop()
    check("handed-in client from another host, --allow covers it: relayed",
          outcome == (b"\x05\x00" + SUCCEEDED, (b"ping", "eof")),
          repr(outcome))


def run_ipv6_prefix_checks():
    """--max-per-client counts an IPv6 /64: one host usually has all of
    it, so two addresses of one /64 are one client."""
    first, second, elsewhere = "2001:db8:0:1::1", "2001:db8:0:1::2", \
        "2001:db8:0:2::1"
    add_test_hosts(first, second, elsewhere)
    policy = torsocksd.ClientPolicy([(True, "2001:db8::/32")])
    with torsocksd.Server([("2001:db8:0:1::1", 0)],
                          resolver=FakeResolver(NAMES),
                          client_policy=policy, max_per_client=1) as server:
        port = server.address[1]

        def from_(source):
            return connect_from(source, (first, port))

        with from_(first) as held:
            held.sendall(b"\x05\x01\x00")
            check("IPv6 /64: the first client is served",
                  recv_up_to(held, 2) == b"\x05\x00")
            with from_(second) as same_prefix:
                same_prefix.sendall(b"\x05\x01\x00")
                data, end = read_to_end(same_prefix)
            check("IPv6 /64: a second address of the same /64 is over the "
                  "cap", data == b"" and end in CLOSED,
                  "got %r, %s" % (data, end))
            with from_(elsewhere) as other_prefix:
                other_prefix.sendall(b"\x05\x01\x00")
                check("IPv6 /64: another /64 is another client",
                      recv_up_to(other_prefix, 2) == b"\x05\x00")


def wait_idle(server, seconds=5.0):
    return wait_until(lambda: server.stats()["active"] == 0, seconds)


if __name__ == "__main__":
    sys.exit(main())
