"""The built-in DNS client: its pure encoder and parser on hand-built bytes
and seeded random input, then DnsResolver in a real Server against a DNS
server this file starts on 127.0.0.1 (UDP and TCP on one port), and against
dnsmasq when it is installed.  Never the machine's own resolver.
"""

import argparse
import ipaddress
import logging
import os
import queue
import random
import selectors
import socket
import struct
import threading
import time

import pytest

from conftest import (TIMEOUT, connect, recv_exactly, recv_until_eof,
                      socks5_request)
from torsocksd import (DnsAnswer, DnsFormatError, DnsResolver, DnsType,
                       MAX_CNAME_CHAIN, MAX_DNS_PARSE_STEPS,
                       MAX_DNS_POINTER_HOPS, MAX_DNS_RECORDS, Reply,
                       ResolverResult, encode_dns_query, parse_dns_response,
                       parse_nameserver)

A, AAAA, CNAME, SOA, PTR = (DnsType.A, DnsType.AAAA, DnsType.CNAME,
                            DnsType.SOA, DnsType.PTR)
NOERROR, SERVFAIL, NXDOMAIN = 0, 2, 3
RESPONSE_FLAGS = 0x8180         # QR, RD, RA
TRUNCATED_FLAGS = 0x8380        # and TC
QNAME = b"\xc0\x0c"             # a pointer to the question's name


# -- building messages --------------------------------------------------------

def wire_name(name):
    return b"".join(bytes((len(label),)) + label.encode()
                    for label in name.split(".")) + b"\0"


def question(name, qtype):
    return wire_name(name) + struct.pack("!HH", qtype, 1)


def record(owner, rtype, ttl, rdata, rclass=1):
    return owner + struct.pack("!HHIH", rtype, rclass, ttl, len(rdata)) + rdata


def soa(ttl=60, minimum=60):
    data = wire_name("ns.test") + wire_name("admin.test") \
        + struct.pack("!5I", 1, 3600, 600, 86400, minimum)
    return record(wire_name("test"), SOA, ttl, data)


def message(query_id, asked, answers=(), authority=(), rcode=NOERROR,
            flags=RESPONSE_FLAGS):
    return (struct.pack("!6H", query_id, flags | rcode, 1, len(answers),
                        len(authority), 0)
            + asked + b"".join(answers) + b"".join(authority))


def a_record(owner, address, ttl=300):
    return record(owner, A, ttl, ipaddress.ip_address(address).packed)


# -- encoding queries ---------------------------------------------------------

def test_query_bytes():
    assert encode_dns_query(0x1234, "example.com", A) == bytes.fromhex(
        "1234 0100 0001 0000 0000 0000"
        "07 6578616d706c65 03 636f6d 00 0001 0001")
    assert encode_dns_query(0xBEEF, "example.com.", AAAA) == bytes.fromhex(
        "beef 0100 0001 0000 0000 0000"
        "07 6578616d706c65 03 636f6d 00 001c 0001")


@pytest.mark.parametrize("name", [
    "", ".", "a..b", ".a", "a" * 64 + ".test", ("a" * 63 + ".") * 4,
    "caf\u00e9.test",
])
def test_names_dns_cannot_carry(name):
    with pytest.raises(DnsFormatError):
        encode_dns_query(1, name, A)


def test_longest_names_dns_can_carry():
    name = ".".join(["a" * 63] * 3 + ["a" * 61])       # 253 bytes
    assert len(encode_dns_query(1, name, A)) == 12 + 255 + 4
    assert len(encode_dns_query(1, name + ".", A)) == 12 + 255 + 4
    with pytest.raises(DnsFormatError):
        encode_dns_query(1, name + "a", A)


def test_reverse_pointer_names():
    assert ipaddress.ip_address("192.0.2.10").reverse_pointer \
        == "10.2.0.192.in-addr.arpa"
    assert ipaddress.ip_address("2001:db8::1").reverse_pointer == (
        "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2"
        ".ip6.arpa")


@pytest.mark.parametrize("text, expected", [
    ("192.0.2.53", ("192.0.2.53", 53)),
    ("127.0.0.1:5353", ("127.0.0.1", 5353)),
    ("2001:db8::53", ("2001:db8::53", 53)),
    ("[2001:db8::53]", ("2001:db8::53", 53)),
    ("[::1]:5353", ("::1", 5353)),
])
def test_nameserver_option(text, expected):
    assert parse_nameserver(text) == expected


@pytest.mark.parametrize("text", ["", "ns.example", "192.0.2.1:0",
                                  "192.0.2.1:65536", "192.0.2.1:x",
                                  "[::1]x", "[::1]:", "::1]:53"])
def test_nameserver_option_refused(text):
    with pytest.raises(argparse.ArgumentTypeError):
        parse_nameserver(text)


# -- parsing answers ----------------------------------------------------------

# Hand-built: an answer for example.com A, owner compressed to the question.
EXAMPLE_A = bytes.fromhex(
    "1234 8180 0001 0001 0000 0000"
    "07 6578616d706c65 03 636f6d 00 0001 0001"
    "c00c 0001 0001 00000e10 0004 c0000201")

# alias.test CNAME mid.test, mid.test CNAME both.test, both.test A; each
# name after the first a label and a pointer back, each owner a pointer.
ALIAS_CHAIN = bytes.fromhex(
    "abcd 8180 0001 0003 0000 0000"
    "05 616c696173 04 74657374 00 0001 0001"        # 12: alias.test, 18: test
    "c00c 0005 0001 00000258 0006 03 6d6964 c012"  # 40: mid.test
    "c028 0005 0001 0000003c 0007 04 626f7468 c012"    # 58: both.test
    "c03a 0001 0001 0000012c 0004 c0000201")


def test_parse_compressed_answer():
    assert parse_dns_response(EXAMPLE_A, 0x1234, "example.com", A) == \
        DnsAnswer((ipaddress.ip_address("192.0.2.1"),), 3600, NOERROR, False)


def test_parse_follows_cname_chain_with_smallest_ttl():
    assert parse_dns_response(ALIAS_CHAIN, 0xABCD, "alias.test", A) == \
        DnsAnswer((ipaddress.ip_address("192.0.2.1"),), 60, NOERROR, False)


def test_question_is_matched_without_regard_to_case():
    answer = parse_dns_response(EXAMPLE_A, 0x1234, "ExAmPlE.CoM.", A)
    assert answer.records == (ipaddress.ip_address("192.0.2.1"),)


@pytest.mark.parametrize("query_id, name, qtype", [
    (0x1235, "example.com", A),         # another id
    (0x1234, "example.org", A),         # another name
    (0x1234, "www.example.com", A),
    (0x1234, "example.com", AAAA),      # another type
])
def test_answer_to_another_question_is_ignored(query_id, name, qtype):
    assert parse_dns_response(EXAMPLE_A, query_id, name, qtype) is None


@pytest.mark.parametrize("offset, value", [
    (2, 0x01),          # QR clear: a query, not an answer
    (2, 0x88),          # opcode 1
    (5, 0x02),          # two questions
    (28, 0x03),         # class CH
])
def test_answer_not_to_our_query_is_ignored(offset, value):
    changed = bytearray(EXAMPLE_A)
    changed[offset] = value
    assert parse_dns_response(bytes(changed), 0x1234, "example.com", A) is None


def test_truncated_flag():
    data = message(7, question("big.test", A), flags=TRUNCATED_FLAGS)
    assert parse_dns_response(data, 7, "big.test", A) == \
        DnsAnswer((), 0, NOERROR, True)


def test_negative_answer_ttl_comes_from_soa():
    asked = question("nowhere.test", A)
    data = message(9, asked, authority=[soa(ttl=120, minimum=45)],
                   rcode=NXDOMAIN)
    assert parse_dns_response(data, 9, "nowhere.test", A) == \
        DnsAnswer((), 45, NXDOMAIN, False)
    data = message(9, asked, rcode=NXDOMAIN)
    assert parse_dns_response(data, 9, "nowhere.test", A).ttl == 0


def test_records_of_other_names_types_and_classes_are_left_out():
    asked = question("v4.test", A)
    data = message(5, asked, [
        a_record(wire_name("other.test"), "198.51.100.1"),
        record(QNAME, AAAA, 300, bytes(16)),
        record(QNAME, A, 300, bytes(4), rclass=3),
        a_record(QNAME, "192.0.2.10"),
        a_record(QNAME, "192.0.2.11", ttl=0x80000001)])    # RFC 2181 §8
    assert parse_dns_response(data, 5, "v4.test", A) == DnsAnswer(
        (ipaddress.ip_address("192.0.2.10"),
         ipaddress.ip_address("192.0.2.11")), 0, NOERROR, False)


def test_ptr_answer():
    asked = question("10.2.0.192.in-addr.arpa", PTR)
    data = message(3, asked, [record(QNAME, PTR, 300, wire_name("v4.test"))])
    assert parse_dns_response(data, 3, "10.2.0.192.in-addr.arpa", PTR) == \
        DnsAnswer(("v4.test",), 300, NOERROR, False)


def cname_chain(length):
    """a0.test CNAME a1.test ... CNAME a<length>.test, which has an A."""
    answers = [record(QNAME if n == 0 else wire_name("a%d.test" % n), CNAME,
                      300, wire_name("a%d.test" % (n + 1)))
               for n in range(length)]
    answers.append(a_record(wire_name("a%d.test" % length), "192.0.2.1"))
    return message(4, question("a0.test", A), answers)


def test_cname_chain_is_followed_up_to_a_bound():
    answer = parse_dns_response(cname_chain(MAX_CNAME_CHAIN), 4, "a0.test", A)
    assert answer.records == (ipaddress.ip_address("192.0.2.1"),)
    answer = parse_dns_response(cname_chain(MAX_CNAME_CHAIN + 1), 4,
                                "a0.test", A)
    assert answer == DnsAnswer((), 0, NOERROR, False)


def test_cname_loop_ends():
    data = message(4, question("a.test", A), [
        record(QNAME, CNAME, 300, wire_name("b.test")),
        record(wire_name("b.test"), CNAME, 300, wire_name("a.test"))])
    assert parse_dns_response(data, 4, "a.test", A).records == ()


HEADER_ONE_QUESTION = bytes.fromhex("0001 8180 0001 0001 0000 0000")


@pytest.mark.parametrize("data", [
    b"",
    EXAMPLE_A[:11],
    HEADER_ONE_QUESTION + b"\xc0\x0c\x00\x01\x00\x01",      # points at itself
    HEADER_ONE_QUESTION + b"\xc0\x20\x00\x01\x00\x01",      # points ahead
    HEADER_ONE_QUESTION + b"\xc0",                           # cut pointer
    HEADER_ONE_QUESTION + b"\x40abc\x00\x00\x01\x00\x01",   # label type 01
    HEADER_ONE_QUESTION + b"\x80abc\x00\x00\x01\x00\x01",   # label type 10
    HEADER_ONE_QUESTION + b"\x05ab",                         # cut label
    HEADER_ONE_QUESTION + (b"\x3f" + b"a" * 63) * 4 + b"\x00\x00\x01\x00\x01",
    # a two-step loop: "x" then a pointer to 20, which points back to 12
    HEADER_ONE_QUESTION + b"\x01x\xc0\x14\x00\x01\x00\x01" + b"\xc0\x0c",
])
def test_malformed_messages(data):
    with pytest.raises(DnsFormatError):
        parse_dns_response(data, 1, "x", A)


@pytest.mark.parametrize("qtype, answer", [
    (A, record(QNAME, A, 300, bytes(5))),               # 5-byte address
    (AAAA, record(QNAME, AAAA, 300, bytes(4))),
    (PTR, record(QNAME, PTR, 300, b"\x03abc")),          # name without end
    (A, record(QNAME, CNAME, 300, b"\xc0\x7f")),        # alias points ahead
    (A, a_record(QNAME, "192.0.2.1")[:-1]),             # data cut short
    (A, a_record(QNAME, "192.0.2.1")[:11]),             # fields cut short
])
def test_malformed_records(qtype, answer):
    data = message(5, question("v4.test", qtype), [answer])
    with pytest.raises(DnsFormatError):
        parse_dns_response(data, 5, "v4.test", qtype)


def test_ptr_name_must_end_within_its_record():
    asked = question("p.test", PTR)
    data = message(6, asked, [record(QNAME, PTR, 300, b"\x01a"),
                              record(QNAME, A, 300, b"\x00\x00\x00\x00")])
    with pytest.raises(DnsFormatError):
        parse_dns_response(data, 6, "p.test", PTR)


VALID = [(EXAMPLE_A, 0x1234, "example.com", A),
         (ALIAS_CHAIN, 0xABCD, "alias.test", A),
         (message(9, question("nowhere.test", A), authority=[soa()],
                  rcode=NXDOMAIN), 9, "nowhere.test", A)]


@pytest.mark.parametrize("data, query_id, name, qtype", VALID)
def test_every_prefix_is_rejected(data, query_id, name, qtype):
    for end in range(len(data)):
        with pytest.raises(DnsFormatError):
            parse_dns_response(data[:end], query_id, name, qtype)


def pointer_chain_message(query_id, asked, hops, owners):
    """An answer to asked whose first record holds as its data a chain of
    hops pointers, each to the one before it and the first to the question's
    name, and then `owners` A records owned by the chain's last pointer:
    reading each owner follows hops + 1 pointers."""
    start = 12 + len(asked) + 12     # the first record's data
    chain, last = b"", 12
    for position in range(start, start + 2 * hops, 2):
        chain += struct.pack("!H", 0xC000 | last)
        last = position
    owner = struct.pack("!H", 0xC000 | last)
    return message(query_id, asked, [record(QNAME, 99, 300, chain)]
                   + [a_record(owner, "192.0.2.1")] * owners)


def test_pointer_hops_per_name_are_bounded():
    asked = question("chain.test", A)
    longest = pointer_chain_message(7, asked, MAX_DNS_POINTER_HOPS - 1, 1)
    assert parse_dns_response(longest, 7, "chain.test", A).records == \
        (ipaddress.ip_address("192.0.2.1"),)
    longer = pointer_chain_message(7, asked, MAX_DNS_POINTER_HOPS, 1)
    with pytest.raises(DnsFormatError, match="more than 128 pointers"):
        parse_dns_response(longer, 7, "chain.test", A)


def test_labels_and_pointers_per_message_are_bounded():
    # Each owner takes 101 pointers and 3 labels: 39 of them fit in 4096.
    asked = question("chain.test", A)
    data = pointer_chain_message(7, asked, 100, 39)
    # Read in full (no error); MAX_KEPT_RECORDS of the 39 kept.
    assert len(parse_dns_response(data, 7, "chain.test", A).records) == 16
    data = pointer_chain_message(7, asked, 100, 40)
    with pytest.raises(DnsFormatError, match="more than %d labels and "
                       "pointers" % MAX_DNS_PARSE_STEPS):
        parse_dns_response(data, 7, "chain.test", A)


def test_records_per_message_are_bounded():
    asked = question("many.test", A)
    most = message(8, asked, [a_record(QNAME, "192.0.2.1")] * MAX_DNS_RECORDS)
    # Read, and 16 kept: a cached answer stays small.
    assert len(parse_dns_response(most, 8, "many.test", A).records) == 16
    more = message(8, asked, [a_record(QNAME, "192.0.2.1")] * 257)
    with pytest.raises(DnsFormatError, match="more than 256 records"):
        parse_dns_response(more, 8, "many.test", A)
    # Answer and authority records count together.
    data = message(8, asked, [record(QNAME, AAAA, 300, bytes(16))] * 200,
                   [soa()] * 57, rcode=NXDOMAIN)
    with pytest.raises(DnsFormatError, match="more than 256 records"):
        parse_dns_response(data, 8, "many.test", A)
    # A header's counts alone cost nothing.
    header = struct.pack("!6H", 8, RESPONSE_FLAGS, 1, 65535, 65535, 0)
    with pytest.raises(DnsFormatError, match="more than 256 records"):
        parse_dns_response(header + asked, 8, "many.test", A)


def test_an_nxdomain_answer_is_negative_whatever_records_it_carries():
    """Cached as "no such name" (for at most MAX_NEGATIVE_TTL), not as the
    records, for an hour."""
    data = message(9, question("gone.test", A),
                   [a_record(QNAME, "192.0.2.1", ttl=3600)], [soa(60, 60)],
                   rcode=NXDOMAIN)
    answer = parse_dns_response(data, 9, "gone.test", A)
    assert (answer.records, answer.rcode) == ((), NXDOMAIN)
    assert answer.ttl <= 60


def test_cname_targets_count_against_the_message():
    # alias.test CNAME alias.test, 25 times, each name 121 pointers and 3
    # labels: the owners take 3,100 steps, following the loop 9 * 124 more.
    asked = question("alias.test", A)
    start = 12 + len(asked) + 12
    chain, last = b"", 12
    for position in range(start, start + 2 * 120, 2):
        chain += struct.pack("!H", 0xC000 | last)
        last = position
    alias = struct.pack("!H", 0xC000 | last)
    answers = [record(QNAME, 99, 300, chain)] + [
        record(alias, CNAME, 300, alias)] * 25
    with pytest.raises(DnsFormatError, match="labels and pointers"):
        parse_dns_response(message(9, asked, answers), 9, "alias.test", A)
    # The same without the loop is read in full (16 of the 25 kept).
    answers[1:] = [record(alias, A, 300, bytes(4))] * 25
    assert len(parse_dns_response(message(9, asked, answers), 9,
                                  "alias.test", A).records) == 16


def random_bytes(generator, most):
    return bytes(generator.randrange(256)
                 for _ in range(generator.randrange(most)))


def test_random_input_never_raises_anything_else():
    seed = int(os.environ.get("DNS_FUZZ_SEED", random.randrange(1 << 32)))
    print("DNS_FUZZ_SEED=%d" % seed)
    generator = random.Random(seed)
    for case in range(30000):
        data, query_id, name, qtype = VALID[case % len(VALID)]
        data = bytearray(data)
        if case % 3 == 0:       # a right header and question, random records
            data = data[:12 + len(name) + 6] \
                + random_bytes(generator, 64)
        elif case % 3 == 1:     # a few bytes changed
            for _ in range(generator.randrange(1, 5)):
                data[generator.randrange(len(data))] = generator.randrange(256)
        else:                   # random bytes after the id
            data = data[:2] + random_bytes(generator, 80)
        try:
            answer = parse_dns_response(bytes(data), query_id, name, qtype)
        except DnsFormatError:
            continue
        except Exception as error:
            pytest.fail("DNS_FUZZ_SEED=%d case %d %s: %r"
                        % (seed, case, bytes(data).hex(), error))
        assert answer is None or isinstance(answer, DnsAnswer), seed


# -- a DNS server on 127.0.0.1 ------------------------------------------------

ZONE = {    # name -> [(type, ttl, data)]
    "v4.test": [(A, 300, "192.0.2.10")],
    "v6.test": [(AAAA, 300, "2001:db8::42")],
    "both.test": [(A, 300, "192.0.2.1"), (AAAA, 300, "2001:db8::1")],
    "alias.test": [(CNAME, 600, "mid.test")],
    "mid.test": [(CNAME, 60, "both.test")],
    "local.test": [(A, 300, "127.0.0.1")],
    "short.test": [(A, 1, "192.0.2.5")],
    "big.test": [(A, 300, "192.0.2.%d" % n) for n in range(100, 140)],
    "spoofed.test": [(A, 300, "192.0.2.77")],
    "servfail-aaaa.test": [(A, 300, "192.0.2.33")],
    "silent.test": [],
    "99.2.0.192.in-addr.arpa": [],
    "10.2.0.192.in-addr.arpa": [(PTR, 300, "v4.test")],
    ipaddress.ip_address("2001:db8::1").reverse_pointer:
        [(PTR, 300, "both.test.")],
}


def record_data(rtype, data):
    if rtype in (A, AAAA):
        return ipaddress.ip_address(data).packed
    return wire_name(data.rstrip("."))


def read_query(data):
    """(id, name, type, the question's bytes) of a query (no compression)."""
    query_id, = struct.unpack_from("!H", data)
    labels, offset = [], 12
    while data[offset]:
        labels.append(data[offset + 1:offset + 1 + data[offset]].decode())
        offset += 1 + data[offset]
    qtype, = struct.unpack_from("!H", data, offset + 1)
    return query_id, ".".join(labels), qtype, data[12:offset + 5]


def answers_for(query_id, name, qtype, asked, transport, rcode):
    """The messages the test server sends back for a query, in order."""
    if rcode:
        return [message(query_id, asked, rcode=rcode)]
    key = name.lower()
    if key in ("silent.test", "99.2.0.192.in-addr.arpa"):
        return []
    if key == "servfail-aaaa.test" and qtype == AAAA:
        return [message(query_id, asked, rcode=SERVFAIL)]
    if key in ("big.test", "chain.test") and transport == "udp":
        return [message(query_id, asked, flags=TRUNCATED_FLAGS)]
    if key == "chain.test":
        # Every owner a chain of 6,000 pointers: 1,500,000 to follow.
        return [pointer_chain_message(query_id, asked, 6000, 250)]
    answers, owner = [], QNAME
    while ZONE.get(key) and ZONE[key][0][0] == CNAME:
        _, ttl, target = ZONE[key][0]
        answers.append(record(owner, CNAME, ttl, wire_name(target)))
        owner, key = wire_name(target), target
    if key not in ZONE:
        return [message(query_id, asked, answers, [soa()], rcode=NXDOMAIN)]
    answers += [record(owner, rtype, ttl, record_data(rtype, data))
                for rtype, ttl, data in ZONE[key] if rtype == qtype]
    reply = message(query_id, asked, answers,
                    [] if len(answers) else [soa(ttl=1 if key == "short.test"
                                                 else 60)])
    if key == "spoofed.test":
        forged = message(query_id ^ 0x5555, asked,
                         [a_record(QNAME, "198.51.100.66")])
        return [forged, reply]
    return [reply]


class DnsTestServer:
    """UDP and TCP on one 127.0.0.1 port, served from ZONE by one thread (or
    every query answered with rcode).  .queries lists (transport, source
    port, id, name, type) in the order asked."""

    def __init__(self, rcode=NOERROR):
        self.rcode = rcode
        self.queries = []
        self.tcp = socket.socket()
        self.tcp.bind(("127.0.0.1", 0))
        self.tcp.listen(8)
        self.port = self.tcp.getsockname()[1]
        self.address = ("127.0.0.1", self.port)
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(self.address)
        self.stop_reader, self.stop_writer = socket.socketpair()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _answer(self, data, peer, transport):
        query_id, name, qtype, asked = read_query(data)
        self.queries.append((transport, peer[1], query_id, name, qtype))
        return answers_for(query_id, name, qtype, asked, transport, self.rcode)

    def _serve(self):
        with selectors.DefaultSelector() as selector:
            for sock in (self.udp, self.tcp, self.stop_reader):
                selector.register(sock, selectors.EVENT_READ)
            while True:
                for key, _ in selector.select():
                    if key.fileobj is self.stop_reader:
                        return
                    if key.fileobj is self.udp:
                        data, peer = self.udp.recvfrom(4096)
                        for reply in self._answer(data, peer, "udp"):
                            self.udp.sendto(reply, peer)
                    else:
                        self._serve_tcp()

    def _serve_tcp(self):
        client, peer = self.tcp.accept()
        with client:
            client.settimeout(TIMEOUT)
            size, = struct.unpack("!H", recv_exactly(client, 2))
            for reply in self._answer(recv_exactly(client, size), peer, "tcp"):
                client.sendall(struct.pack("!H", len(reply)) + reply)

    def asked(self, name, transport="udp"):
        """The types asked for name over transport, in order."""
        return [qtype for how, _, _, asked, qtype in self.queries
                if asked == name and how == transport]

    def close(self):
        self.stop_writer.send(b"x")
        self.thread.join(TIMEOUT)
        for sock in (self.udp, self.tcp, self.stop_reader, self.stop_writer):
            sock.close()


@pytest.fixture
def dns_server():
    server = DnsTestServer()
    yield server
    server.close()


@pytest.fixture
def proxy(make_server, dns_server):
    return make_server(resolver=DnsResolver([dns_server.address]))


# -- SOCKS through the resolver -----------------------------------------------

def socks5(server, request):
    """The server's whole answer to a SOCKS5 request (after no-auth)."""
    with connect(server) as client:
        client.sendall(b"\x05\x01\x00")
        assert recv_exactly(client, 2) == b"\x05\x00"
        client.sendall(request)
        return recv_until_eof(client)


def resolve(server, name):
    return socks5(server, socks5_request(0xF0, name.encode(), 0))


def resolve_ptr(server, address):
    return socks5(server, socks5_request(0xF1, address, 0))


def address_reply(address):
    address = ipaddress.ip_address(address)
    kind = b"\x01" if address.version == 4 else b"\x04"
    return b"\x05\x00\x00" + kind + address.packed + b"\0\0"


def name_reply(name):
    return b"\x05\x00\x00\x03" + bytes((len(name),)) + name.encode() + b"\0\0"


HOST_UNREACHABLE = b"\x05\x04\x00\x01" + bytes(6)


def in_loop(server, function):
    """function() run in the server's loop thread; what it returned."""
    done, returned = threading.Event(), []
    server.call_soon_threadsafe(lambda: (returned.append(function()),
                                         done.set()))
    assert done.wait(TIMEOUT)
    return returned[0]


def resolver_answer(server, method, query):
    """What the server's resolver answers, asked from its loop thread."""
    results = queue.Queue()
    in_loop(server, lambda: method(query, results.put))
    return results.get(timeout=TIMEOUT)


def test_resolve_answers_ipv4(proxy, dns_server):
    assert resolve(proxy, "both.test") == address_reply("192.0.2.1")
    assert resolve(proxy, "v4.test") == address_reply("192.0.2.10")
    assert sorted(dns_server.asked("both.test")) == [A, AAAA]


def test_resolve_answers_ipv6_when_there_is_no_ipv4(proxy):
    assert resolve(proxy, "v6.test") == address_reply("2001:db8::42")


def test_answers_put_ipv4_first(proxy, dns_server):
    assert resolver_answer(proxy, proxy.resolver.lookup, "both.test") == \
        ResolverResult((ipaddress.ip_address("192.0.2.1"),
                        ipaddress.ip_address("2001:db8::1")))


def test_resolve_follows_cname_chain(proxy, dns_server):
    assert resolve(proxy, "alias.test") == address_reply("192.0.2.1")
    assert dns_server.asked("mid.test") == dns_server.asked("both.test") == []


def test_no_such_name_is_host_unreachable(proxy, dns_server):
    assert resolve(proxy, "nowhere.test") == HOST_UNREACHABLE
    result = resolver_answer(proxy, proxy.resolver.lookup, "nowhere.test")
    assert result.error is Reply.HOST_UNREACHABLE
    assert "NXDOMAIN" in result.reason
    assert len(dns_server.queries) == 2     # the second came from the cache


def test_name_without_addresses(proxy):
    result = resolver_answer(proxy, proxy.resolver.lookup,
                             "10.2.0.192.in-addr.arpa")
    assert result == ResolverResult((), Reply.HOST_UNREACHABLE,
                                    "no A/AAAA record")


def test_resolve_ptr(proxy):
    assert resolve_ptr(proxy, "192.0.2.10") == name_reply("v4.test")
    assert resolve_ptr(proxy, "2001:db8::1") == name_reply("both.test")
    assert resolve_ptr(proxy, "192.0.2.98") == HOST_UNREACHABLE


def test_connect_by_name(proxy, echo_server):
    with connect(proxy) as client:
        client.sendall(b"\x05\x01\x00")
        assert recv_exactly(client, 2) == b"\x05\x00"
        client.sendall(b"\x05\x01\x00\x03\x0alocal.test"
                       + struct.pack("!H", echo_server.port))
        assert recv_exactly(client, 10) == b"\x05\x00\x00\x01" + bytes(6)
        client.sendall(b"ping")
        assert recv_exactly(client, 4) == b"ping"


def test_truncated_answer_is_asked_again_over_tcp(proxy, dns_server):
    assert resolve(proxy, "big.test") == address_reply("192.0.2.100")
    assert sorted(dns_server.asked("big.test", "tcp")) == [A, AAAA]
    result = resolver_answer(proxy, proxy.resolver.lookup, "big.test")
    # 40 came over TCP, more than UDP's 512 bytes hold; 16 are kept.
    assert result.answers == tuple(ipaddress.ip_address("192.0.2.%d" % n)
                                   for n in range(100, 116))


def test_pointer_chains_over_tcp_are_refused(proxy, dns_server, caplog):
    caplog.set_level(logging.DEBUG, logger="torsocksd")
    assert resolve(proxy, "chain.test") == HOST_UNREACHABLE
    assert sorted(dns_server.asked("chain.test", "tcp")) == [A, A, AAAA, AAAA]
    result = resolver_answer(proxy, proxy.resolver.lookup, "chain.test")
    assert result == ResolverResult(
        (), Reply.HOST_UNREACHABLE, "name server 127.0.0.1: malformed "
        "answer: name takes more than 128 pointers")
    assert any("more than 128 pointers" in record.getMessage()
               for record in caplog.records)


def test_forged_answer_with_wrong_id_is_ignored(proxy):
    assert resolve(proxy, "spoofed.test") == address_reply("192.0.2.77")


def test_silent_server_is_asked_again_then_given_up(make_server, dns_server):
    proxy = make_server(resolver=DnsResolver([dns_server.address],
                                             timeout=0.2, attempts=2))
    started = time.monotonic()
    assert resolve(proxy, "silent.test") == HOST_UNREACHABLE
    assert 0.4 <= time.monotonic() - started < 2.0
    assert sorted(dns_server.asked("silent.test")) == [A, A, AAAA, AAAA]
    result = resolver_answer(proxy, proxy.resolver.lookup, "silent.test")
    assert result.reason == "name server 127.0.0.1 did not answer in time"
    # Every try on a fresh socket (the lookup's A and AAAA on the same one),
    # every question with a fresh id.
    first_lookup = dns_server.queries[:4]
    ports = [port for _, port, _, _, _ in first_lookup]
    ids = {query_id for _, _, query_id, _, _ in first_lookup}
    assert ports[0] == ports[1] != ports[2] == ports[3] and len(ids) == 4


def test_next_name_server_after_silence(make_server, dns_server):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        proxy = make_server(resolver=DnsResolver(
            [silent.getsockname(), dns_server.address], timeout=0.2))
        started = time.monotonic()
        assert resolve(proxy, "v4.test") == address_reply("192.0.2.10")
        assert time.monotonic() - started >= 0.2


def test_next_name_server_at_once_after_port_unreachable(make_server,
                                                         dns_server):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as closed:
        closed.bind(("127.0.0.1", 0))
        nobody = closed.getsockname()
    proxy = make_server(resolver=DnsResolver([nobody, dns_server.address],
                                             timeout=5.0))
    started = time.monotonic()
    assert resolve(proxy, "v6.test") == address_reply("2001:db8::42")
    assert time.monotonic() - started < 2.0     # ICMP said so at once


def test_servfail_moves_on_to_the_next_server(make_server, dns_server):
    failing = DnsTestServer(rcode=SERVFAIL)
    try:
        proxy = make_server(resolver=DnsResolver(
            [failing.address, dns_server.address]))
        assert resolve(proxy, "v4.test") == address_reply("192.0.2.10")
        result = resolver_answer(proxy, proxy.resolver.lookup, "bad.test")
        assert result.error is Reply.HOST_UNREACHABLE
    finally:
        failing.close()
    assert sorted(failing.asked("v4.test")) == [A, AAAA]


def test_a_question_that_fails_alone_is_asked_again_after_the_try(
        proxy, dns_server):
    # AAAA gets SERVFAIL while A is still out on the same socket: AAAA is
    # asked again, on a fresh socket, once A's answer has ended the try.
    assert resolver_answer(proxy, proxy.resolver.lookup,
                           "servfail-aaaa.test") == \
        ResolverResult((ipaddress.ip_address("192.0.2.33"),))
    assert dns_server.asked("servfail-aaaa.test") in ([A, AAAA, AAAA],
                                                      [AAAA, A, AAAA])
    ports = [port for _, port, _, name, _ in dns_server.queries
             if name == "servfail-aaaa.test"]
    assert ports[0] == ports[1] != ports[2]
    assert proxy.resolver.queries == set()


def test_answers_are_cached_for_their_ttl(proxy, dns_server):
    assert resolve(proxy, "both.test") == address_reply("192.0.2.1")
    assert resolve(proxy, "Both.Test.") == address_reply("192.0.2.1")
    assert len(dns_server.queries) == 2
    assert resolve(proxy, "short.test") == address_reply("192.0.2.5")
    assert dns_server.asked("short.test") in ([A, AAAA], [AAAA, A])
    time.sleep(1.1)     # the A record's TTL is 1 s; its "no AAAA" 1 s too
    assert resolve(proxy, "short.test") == address_reply("192.0.2.5")
    assert sorted(dns_server.asked("short.test")) == [A, A, AAAA, AAAA]


def test_cache_is_bounded(make_server, dns_server):
    proxy = make_server(resolver=DnsResolver([dns_server.address],
                                             cache_size=3))
    for name in ("v4.test", "v6.test", "both.test"):
        resolve(proxy, name)
    assert len(proxy.resolver.cache) == 3
    assert resolve(proxy, "v4.test") == address_reply("192.0.2.10")
    assert len(dns_server.asked("v4.test")) == 4    # evicted, asked again


def test_ip_literals_and_bad_names_are_never_asked(proxy, dns_server):
    assert resolver_answer(proxy, proxy.resolver.lookup, "192.0.2.7") == \
        ResolverResult((ipaddress.ip_address("192.0.2.7"),))
    assert resolve(proxy, "a" * 64 + ".test") == HOST_UNREACHABLE
    assert resolve(proxy, "a..test") == HOST_UNREACHABLE
    assert dns_server.queries == []


def held_sockets(resolver):
    """The sockets the resolver's lookups hold now."""
    sockets = []
    for query in resolver.queries:
        if query.udp is not None:
            sockets.append(query.udp.sock)
        sockets += [tcp.connection.sock for tcp in query.over_tcp.values()]
    return sockets


def test_cancel_and_close_release_every_socket(make_server, dns_server):
    resolver = DnsResolver([dns_server.address])
    proxy = make_server(resolver=resolver)
    answers = queue.Queue()
    handle = in_loop(proxy, lambda: resolver.lookup("silent.test",
                                                    answers.put))
    sockets = in_loop(proxy, lambda: held_sockets(resolver))
    assert len(sockets) == 1        # A and AAAA share one
    in_loop(proxy, handle.cancel)
    assert resolver.queries == set()
    assert all(sock.fileno() == -1 for sock in sockets)
    in_loop(proxy, lambda: resolver.reverse(
        ipaddress.ip_address("192.0.2.99"), answers.put))
    sockets = in_loop(proxy, lambda: held_sockets(resolver))
    proxy.stop()
    assert all(sock.fileno() == -1 for sock in sockets)
    assert answers.empty()


def test_lookups_in_flight_are_bounded(make_server, dns_server):
    assert DnsResolver([dns_server.address]).max_pending == 512
    resolver = DnsResolver([dns_server.address], max_pending=3)
    proxy = make_server(resolver=resolver)
    answers = queue.Queue()
    handles = in_loop(proxy, lambda: [
        resolver.lookup("silent.test", answers.put) for _ in range(3)])
    assert len(in_loop(proxy, lambda: held_sockets(resolver))) == 3
    # The fourth fails at once, as SystemResolver's fourth would.
    assert resolver_answer(proxy, resolver.lookup, "silent.test") == \
        ResolverResult((), Reply.GENERAL_FAILURE,
                       "too many pending name lookups")
    assert resolve(proxy, "v4.test") == HOST_UNREACHABLE
    assert resolver_answer(proxy, resolver.reverse,
                           ipaddress.ip_address("192.0.2.10")).error \
        is Reply.GENERAL_FAILURE
    # What needs no name server is still answered.
    assert resolver_answer(proxy, resolver.lookup, "192.0.2.7") == \
        ResolverResult((ipaddress.ip_address("192.0.2.7"),))
    assert len(in_loop(proxy, lambda: held_sockets(resolver))) == 3
    assert dns_server.asked("v4.test") == []
    # Room again once one is cancelled.
    in_loop(proxy, handles[0].cancel)
    assert resolve(proxy, "v4.test") == address_reply("192.0.2.10")
    assert answers.empty()


# -- dnsmasq ------------------------------------------------------------------

def test_dnsmasq(make_server, dnsmasq):
    proxy = make_server(resolver=DnsResolver([dnsmasq]))
    assert resolve(proxy, "v4.test") == address_reply("192.0.2.10")
    assert resolve(proxy, "v6.test") == address_reply("2001:db8::42")
    assert resolve_ptr(proxy, "192.0.2.10") == name_reply("v4.test")
    # With no upstream, dnsmasq refuses what it has no record for.
    assert resolve(proxy, "nowhere.test") == HOST_UNREACHABLE
