"""The Tor link protocol client behind CONNECT_DIR: AES-128 and CTR, KDF-TOR,
cells, the CERTS check, relay crypto, circuit and stream windows (all without
sockets), then links in a real loop, and a real tor relay on loopback inside a
network namespace.

Run from the repository: python -m pytest tests/test_torsocksd.py
"""

import base64
import calendar
import collections
import errno
import hashlib
import logging
import os
import random
import re
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time

import pytest

import torsocksd
from conftest import (REQUIRE_PEERS, closing_factory, connect, recv_exactly,
                      recv_until_eof, require_program)


TIMEOUT = 30.0


# =============================================================================
# AES-128 and AES-128-CTR
# =============================================================================

def test_sbox_values():
    # FIPS-197 §5.1.1 and Figure 7.
    assert torsocksd.AES_SBOX[0x00] == 0x63
    assert torsocksd.AES_SBOX[0x53] == 0xED
    assert torsocksd.AES_SBOX[0xFF] == 0x16
    assert sorted(torsocksd.AES_SBOX) == list(range(256))


def test_key_expansion_fips197_a1():
    round_keys = torsocksd.aes128_round_keys(
        bytes.fromhex("2b7e151628aed2a6abf7158809cf4f3c"))
    assert round_keys[0] == 0x2B7E151628AED2A6ABF7158809CF4F3C
    assert round_keys[1] == 0xA0FAFE1788542CB123A339392A6C7605
    assert round_keys[10] == 0xD014F9A8C9EE2589E13F0CC8B6630CA6


@pytest.mark.parametrize("key, plaintext, ciphertext", [
    # FIPS-197 Appendix B
    ("2b7e151628aed2a6abf7158809cf4f3c", "3243f6a8885a308d313198a2e0370734",
     "3925841d02dc09fbdc118597196a0b32"),
    # FIPS-197 Appendix C.1
    ("000102030405060708090a0b0c0d0e0f", "00112233445566778899aabbccddeeff",
     "69c4e0d86a7b0430d8cdb78070b4c55a"),
])
def test_aes128_fips197_vectors(key, plaintext, ciphertext):
    assert torsocksd.aes128_encrypt_block(
        bytes.fromhex(key), bytes.fromhex(plaintext)).hex() == ciphertext


def test_aes128_needs_16_byte_key():
    with pytest.raises(ValueError):
        torsocksd.aes128_round_keys(bytes(24))


SP800_38A_CTR_KEY = bytes.fromhex("2b7e151628aed2a6abf7158809cf4f3c")
SP800_38A_CTR_COUNTER = 0xF0F1F2F3F4F5F6F7F8F9FAFBFCFDFEFF
SP800_38A_CTR_PLAINTEXT = bytes.fromhex(
    "6bc1bee22e409f96e93d7e117393172a" "ae2d8a571e03ac9c9eb76fac45af8e51"
    "30c81c46a35ce411e5fbc1191a0a52ef" "f69f2445df4f9b17ad2b417be66c3710")
SP800_38A_CTR_CIPHERTEXT = bytes.fromhex(
    "874d6191b620e3261bef6864990db6ce" "9806f66b7970fdff8617187bb9fffdff"
    "5ae4df3edbd5d35e5b4f09020db03eab" "1e031dda2fbe03d1792170a0f3009cee")


@pytest.mark.parametrize("pieces", [[64], [16, 16, 16, 16], [1, 7, 30, 26],
                                    [0, 63, 1]])
def test_ctr_sp800_38a_f51_in_pieces(pieces):
    # SP 800-38A F.5.1 (CTR-AES128.Encrypt); one keystream across calls.
    ctr = torsocksd.Aes128Ctr(SP800_38A_CTR_KEY, SP800_38A_CTR_COUNTER)
    output, position = b"", 0
    for size in pieces:
        output += ctr.process(SP800_38A_CTR_PLAINTEXT[position:position + size])
        position += size
    assert output == SP800_38A_CTR_CIPHERTEXT


@pytest.mark.parametrize("start", [0, 0xFE, 0x1FF, (1 << 32) - 3,
                                   (1 << 128) - 5, 0x0123456789ABCDEF00112233445566F0])
def test_ctr_blocks_match_block_encryption(start):
    # The cached first two rounds must give what plain encryption gives,
    # across runs of 256 counters and across the 2**128 wrap.
    key = bytes(range(16))
    expected = b"".join(
        torsocksd.aes128_encrypt_block(key, ((start + i) % (1 << 128))
                                     .to_bytes(16, "big")) for i in range(300))
    assert torsocksd.aes128_ctr_blocks(torsocksd.aes128_round_keys(key), start,
                                     300) == expected


def test_ctr_decrypts_what_it_encrypts():
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    key = bytes(rng.randrange(256) for _ in range(16))
    data = bytes(rng.randrange(256) for _ in range(5000))
    encrypt, decrypt = torsocksd.Aes128Ctr(key), torsocksd.Aes128Ctr(key)
    sealed = b"".join(encrypt.process(data[i:i + 509])
                      for i in range(0, len(data), 509))
    assert sealed != data, seed
    assert decrypt.process(sealed) == data, seed


# =============================================================================
# KDF-TOR and CREATE_FAST keys
# =============================================================================

@pytest.mark.parametrize("seed, expected", [
    # Tor's test_crypto.c, test_crypto_kdf_TAP
    (b"", "5ba93c9db0cff93f52b521d7420e43f6eda2784fbf8b4530d8"
          "d246dd74ac53a13471bba17941dff7c4ea21bb365bbeeaf5f2"
          "c654883e56d11e43c44e9842926af7ca0a8cca12604f945414"
          "f07b01e13da42c6cf1de3abfdea9b95f34687cbbe92b9a7383"),
    (b"Tor", "776c6214fc647aaa5f683c737ee66ec44f03d0372e1cce6922"
             "7950f236ddf1e329a7ce7c227903303f525a8c6662426e8034"
             "870642a6dabbd41b5d97ec9bf2312ea729992f48f8ea2d0ba8"
             "3f45dfda1a80bdc8b80de01b23e3e0ffae099b3e4ccf28dc28"),
    (b"AN ALARMING ITEM TO FIND ON A MONTHLY AUTO-DEBIT NOTICE",
     "a340b5d126086c3ab29c2af4179196dbf95e1c72431419d331"
     "4844bf8f6afb6098db952b95581fb6c33625709d6f4400b8e7"
     "ace18a70579fad83c0982ef73f89395bcc39493ad53a685854"
     "daf2ba9b78733b805d9a6824c907ee1dba5ac27a1e466d4d10"),
])
def test_kdf_tor_vectors(seed, expected):
    assert torsocksd.kdf_tor(seed, 100).hex() == expected


def test_create_fast_keys_split_kdf_output():
    x, y = bytes(range(20)), bytes(range(20, 40))
    material = torsocksd.kdf_tor(x + y, 92)
    keys = torsocksd.create_fast_keys(x, y)
    assert b"".join(keys) == material
    assert [len(part) for part in keys] == [20, 20, 20, 16, 16]


# =============================================================================
# Cells
# =============================================================================

def test_versions_cell_bytes():
    # 2-byte circuit id 0, command 7, length 4, versions 4 and 5.
    assert torsocksd.versions_cell() == bytes.fromhex("0000070004" "00040005")


def test_fixed_cell_round_trip():
    cell = torsocksd.encode_cell(0x80000001, torsocksd.CellCommand.CREATE_FAST,
                               b"x" * 20)
    assert len(cell) == torsocksd.FIXED_CELL_LEN == 514
    assert cell[:5] == bytes.fromhex("8000000105")
    parsed = torsocksd.parse_cell(cell + b"next")
    assert parsed.used == 514
    assert parsed.message == torsocksd.Cell(0x80000001, 5,
                                          b"x" * 20 + bytes(489))


def test_variable_cell_round_trip():
    cell = torsocksd.encode_cell(0, torsocksd.CellCommand.VPADDING, b"abc")
    assert cell == bytes.fromhex("00000000" "80" "0003") + b"abc"
    assert torsocksd.parse_cell(cell) == torsocksd.Parsed(
        torsocksd.Cell(0, 128, b"abc"), 10)


@pytest.mark.parametrize("cell, circuit_id_len", [
    (torsocksd.versions_cell(), 2),
    (torsocksd.encode_cell(7, torsocksd.CellCommand.RELAY, b"r"), 4),
    (torsocksd.encode_cell(0, torsocksd.CellCommand.CERTS, b"\x00" * 40), 4),
])
def test_every_prefix_needs_more(cell, circuit_id_len):
    for size in range(len(cell)):
        assert torsocksd.parse_cell(cell[:size], circuit_id_len) \
            is torsocksd.NEED_MORE
    assert torsocksd.parse_cell(cell, circuit_id_len).used == len(cell)


def test_fixed_cell_payload_limit():
    with pytest.raises(ValueError):
        torsocksd.encode_cell(1, torsocksd.CellCommand.RELAY, bytes(510))


def test_negotiate_link_version():
    assert torsocksd.negotiate_link_version(bytes.fromhex("000300040005")) == 5
    assert torsocksd.negotiate_link_version(bytes.fromhex("00030004")) == 4
    with pytest.raises(torsocksd.TorProtocolError):
        torsocksd.negotiate_link_version(bytes.fromhex("0003"))   # nothing common
    with pytest.raises(torsocksd.TorProtocolError):
        torsocksd.negotiate_link_version(bytes.fromhex("000400"))  # odd length


def test_negotiate_link_version_bounds_the_list_and_its_message():
    many = b"".join(n.to_bytes(2, "big") for n in range(6, 6 + 64))
    with pytest.raises(torsocksd.TorProtocolError,
                       match="no common link protocol version") as refused:
        torsocksd.negotiate_link_version(many)
    assert len(str(refused.value)) <= 600
    with pytest.raises(torsocksd.TorProtocolError,
                       match="lists 65 versions, more than 64") as refused:
        torsocksd.negotiate_link_version(many + b"\x00\x04")
    with pytest.raises(torsocksd.TorProtocolError, match="lists 30000"):
        torsocksd.negotiate_link_version(bytes(60000))


def test_parse_cell_refuses_a_long_variable_cell_from_its_header():
    header = bytes.fromhex("00000000" "80" "2001")        # VPADDING, 8193
    with pytest.raises(torsocksd.TorProtocolError,
                       match="8193-byte VPADDING cell where at most 8192"):
        torsocksd.parse_cell(header, max_payload=8192)
    assert torsocksd.parse_cell(header) is torsocksd.NEED_MORE
    assert torsocksd.parse_cell(header[:6], max_payload=8192) \
        is torsocksd.NEED_MORE
    assert torsocksd.parse_cell(header + bytes(8193)).used == 8200
    unknown = bytes.fromhex("0000" "fe" "ffff")
    with pytest.raises(torsocksd.TorProtocolError, match="command 254"):
        torsocksd.parse_cell(unknown, 2, max_payload=0)


def test_netinfo_payload():
    assert torsocksd.netinfo_payload("127.0.0.1") == \
        bytes.fromhex("00000000" "04" "04" "7f000001" "00")
    assert torsocksd.netinfo_payload("::1") == \
        bytes.fromhex("00000000" "06" "10") + bytes(15) + b"\x01\x00"


# =============================================================================
# The CERTS cell: X.509, RSA, the relay's identity
# =============================================================================

# The CERTS payload a tor 0.4.9.11 relay sent (types 1, 2, 4, 5, 7), its TLS
# certificate being the type-1 link certificate; taken on 2026-11-28.
RELAY_CERTS_PAYLOAD = base64.b64decode("""
BQECRjCCAkIwggGroAMCAQICCBkMZPhYSmM3MA0GCSqGSIb3DQEBCwUAMCYxJDAiBgNVBAMMG3d3
dy4zZzZjeHY3NmFpdGJwenZ6anlwLmNvbTAeFw0yNjExMjIwMDAwMDBaFw0yNzAxMTEyMzU5NTla
MB0xGzAZBgNVBAMMEnd3dy41d3FqbGk0YnJuLm5ldDCCASIwDQYJKoZIhvcNAQEBBQADggEPADCC
AQoCggEBAPonRi5xNvvKzdX2yHFLWKHiVce1eWfBKANvfzOaCYpwZMdIo/7NTlof1kZ1ilbCDlsi
ahjt6vf4CL0iLnT8ALO5PTeSVvl8vj/tRs43nGSn6dv/+EB+bMm33eJ27YKhsjm0Ng2xFhQCAPWy
vIDx/N8FdDHthMGuXer4CRKnBNGxvSnHvfTnBMWmwuROtCvTXXHcCgrvs+ITa1+TJXzHAsZAkcP3
g1hOL2OslntexAdSjFo8rU3X5PvDody7QpY1Fl3j4sg9ghFs+kriVqTY/8t9g3qsn8TM0LNvrwvA
D2sG8cb67d/r/DTEW03XQ+KnT+QOR6wUMNm9AeXIe1J5z6UCAwEAATANBgkqhkiG9w0BAQsFAAOB
gQC9kgqRAOF/M8ZoWuT7Q+IDPzcv5003Y79UF3jGHTh47rHEkNUG0AnW/QZRl52y6g6NTlnM/d65
S2P6qeLaUcvZr/Ae163X2wMyM7JkJ5J8KxmqMhiPlMzulCJMqiPL7+oyIXl4SkB1jOxkfCjIu4tj
0ga9Q1IlO23C1BZGxR9ILQIBzDCCAcgwggExoAMCAQICCQDxu97gAHJ6sTANBgkqhkiG9w0BAQsF
ADAmMSQwIgYDVQQDDBt3d3cuM2c2Y3h2NzZhaXRicHp2emp5cC5jb20wHhcNMjYwNjEwMDAwMDAw
WhcNMjcwNjEwMDAwMDAwWjAmMSQwIgYDVQQDDBt3d3cuM2c2Y3h2NzZhaXRicHp2emp5cC5jb20w
gZ8wDQYJKoZIhvcNAQEBBQADgY0AMIGJAoGBAM93IVnGF3Y0MeP9CuB9MW0Q/g4SUSAHciwNP74v
Qv07P0nQdoRKB45szMn4rbstnRMKAdqNnUvp0aID3qmxJoqwAKJFziDq2KB1buswcWC3y2Dao3wE
eAUv5hEizyI5DkzzTzOVEzclYAJ8YwdbxmiiTKS7j7i1R4aKECLSOORVAgMBAAEwDQYJKoZIhvcN
AQELBQADgYEAtobJVM7fc1HMPaRXXxhV2y2b8aNEXqNgeZ5eRygD5luaQ3aDQZ8ZNcjFjoXTCk+q
AC0a9TjGjlAQ+rQBNAUNZZpMGKQ2AloRjpUbCc8tMrWkYOIiCxF+3zOGBNSmkvXFaCY/vd8nLItT
gIDvNRjyh+1ilcJwvxI55upQbCPlOkAEAIwBBAAHn3MBiVWn9B+9GTI4zg6S44hri4WJY7+TxYwY
wYacSl4QlqMBACAEABSDTZJGgXoHDcmmZSLfnMe2kuSoboUh2oCO/uQGtAq7si3yr6vge8jqosoE
gA3wNTmKMblgKlH0XhClr6s4R6Ii845li9+k8wh9Av2DPWNpkWlEdyZnPXpXD10m+HlYAgUAaAEF
AAec0wOYlJiyd6lfSZX/kRWwaO3ZZGpHdO3tMRdJC1zQojJoQgAJSJyoJ1DtUYeEoh+zMbOaB1NW
SZHH+RZdXmP2exXyYMuBeP8mgOARmB5Zzx0P+EWFB8AL2km8XyO7Mq+qIgUDBwClFINNkkaBegcN
yaZlIt+cx7aS5KhuhSHagI7+5Aa0CrsAB62DgA1RtCHBiFBLQ+VLHLaSu18yRnsiGIyXATljjOIE
oDjtkAXLaZqGBqSmCF+vOffYV2be/mk+tCHo45FWrzBFmPq92dovSUpy6BdblJrNlITMVmeb257D
teN8RC3mJAHVYgvszYTqjxPwPiRE2emJVkEJVnzKIndfmsuFXdTz7Mza
""")
RELAY_FINGERPRINT = "2705DE41F653522E9A8CBA65051407D2D00AF8BF"  # $DATADIR/fingerprint
RELAY_CERTS_TIME = 1795863385       # when they were taken


def relay_certs():
    return torsocksd.parse_certs_cell(RELAY_CERTS_PAYLOAD)


def test_parse_certs_cell_of_a_real_relay():
    certificates = relay_certs()
    assert sorted(certificates) == [1, 2, 4, 5, 7]
    assert [len(certificates[kind]) for kind in (1, 2)] == [582, 460]


def test_parse_certs_cell_rejects_duplicates_and_truncation():
    one = b"\x02\x00\x03abc"
    with pytest.raises(torsocksd.TorProtocolError, match="two certificates"):
        torsocksd.parse_certs_cell(b"\x02" + one + one)
    for size in range(len(RELAY_CERTS_PAYLOAD)):
        if size and size < len(RELAY_CERTS_PAYLOAD) - 168:
            with pytest.raises(torsocksd.TorProtocolError):
                torsocksd.parse_certs_cell(RELAY_CERTS_PAYLOAD[:size])
    with pytest.raises(torsocksd.TorProtocolError):
        torsocksd.parse_certs_cell(b"")
    assert torsocksd.parse_certs_cell(b"\x01" + one + b"extra") == {2: b"abc"}


def test_parse_certificate_fields():
    identity = torsocksd.parse_certificate(relay_certs()[2])
    assert identity.modulus.bit_length() == 1024
    assert identity.exponent == 65537
    assert identity.not_before == calendar.timegm((2026, 6, 10, 0, 0, 0))
    assert identity.not_after == calendar.timegm((2027, 6, 10, 0, 0, 0))
    assert identity.signature_algorithm == bytes.fromhex("2a864886f70d01010b")
    link = torsocksd.parse_certificate(relay_certs()[1])
    assert link.modulus.bit_length() == 2048
    assert link.not_after == calendar.timegm((2027, 1, 11, 23, 59, 59))


def test_real_relay_certs_verify_and_give_its_fingerprint():
    certificates = relay_certs()
    fingerprint = torsocksd.verify_relay_certs(certificates, certificates[1],
                                             RELAY_CERTS_TIME)
    assert fingerprint.hex().upper() == RELAY_FINGERPRINT


def flip(data: bytes, position: int) -> bytes:
    return data[:position] + bytes((data[position] ^ 1,)) + data[position + 1:]


@pytest.mark.parametrize("change, message", [
    (lambda c, tls: ({**c, 1: flip(c[1], len(c[1]) - 5)}, tls),
     "signature on the relay's link"),
    (lambda c, tls: ({**c, 2: flip(c[2], len(c[2]) - 5)}, tls),
     "signature on the relay's identity"),
    (lambda c, tls: ({**c, 2: flip(c[2], 20)}, tls),        # its serial number
     "signature on the relay's identity"),
    (lambda c, tls: (c, c[2]), "TLS key is not the certified link key"),
    (lambda c, tls: ({k: v for k, v in c.items() if k != 1}, tls), "lacks the LINK"),
    (lambda c, tls: ({k: v for k, v in c.items() if k != 2}, tls),
     "lacks the IDENTITY"),
    (lambda c, tls: ({**c, 2: c[1]}, tls), "not 1024-bit"),
])
def test_bad_certs_are_refused(change, message):
    certificates, tls = change(relay_certs(), relay_certs()[1])
    with pytest.raises(torsocksd.TorProtocolError, match=message):
        torsocksd.verify_relay_certs(certificates, tls, RELAY_CERTS_TIME)


def test_certificate_lifetimes_with_tor_slop():
    certificates = relay_certs()
    # The link certificate is the shorter-lived: 2026-11-22 to 2027-01-11.
    link_start = calendar.timegm((2026, 11, 22, 0, 0, 0))
    link_expiry = calendar.timegm((2027, 1, 11, 23, 59, 59))
    day = 86400
    for now in (link_expiry + 2 * day - 1, link_start - 30 * day + 1):
        torsocksd.verify_relay_certs(certificates, certificates[1], now)
    with pytest.raises(torsocksd.TorProtocolError,
                       match="link certificate has expired"):
        torsocksd.verify_relay_certs(certificates, certificates[1],
                                   link_expiry + 2 * day + 1)
    with pytest.raises(torsocksd.TorProtocolError,
                       match="link certificate is not valid yet"):
        torsocksd.verify_relay_certs(certificates, certificates[1],
                                   link_start - 30 * day - 1)


@pytest.mark.parametrize("encoded, expected", [
    (b"\x17\x0d491231235959Z", (2049, 12, 31, 23, 59, 59)),
    (b"\x17\x0d500101000000Z", (1950, 1, 1, 0, 0, 0)),
    (b"\x17\x0d000229120000Z", (2000, 2, 29, 12, 0, 0)),
    (b"\x18\x0f20500101000000Z", (2050, 1, 1, 0, 0, 0)),
    (b"\x18\x0f21000301000000Z", (2100, 3, 1, 0, 0, 0)),
])
def test_der_time(encoded, expected):
    element = torsocksd.der_element(encoded, 0, len(encoded))
    assert torsocksd.der_time(encoded, element) == calendar.timegm(expected)


@pytest.mark.parametrize("encoded", [b"\x17\x0b4912312359Z",
                                     b"\x17\x0d491231235959+",
                                     b"\x04\x0d491231235959Z"])
def test_der_time_refuses_other_forms(encoded):
    element = torsocksd.der_element(encoded, 0, len(encoded))
    with pytest.raises(torsocksd.TorProtocolError):
        torsocksd.der_time(encoded, element)


@pytest.mark.parametrize("encoded", [b"\x30", b"\x30\x05abc", b"\x30\x80",
                                     b"\x30\x85\x00\x00\x00\x00\x01",
                                     b"\x1f\x01a"])
def test_der_element_refuses_bad_encodings(encoded):
    with pytest.raises(torsocksd.TorProtocolError):
        torsocksd.der_element(encoded, 0, len(encoded))


def test_der_long_form_length():
    encoded = b"\x04\x82\x01\x00" + bytes(256)
    assert torsocksd.der_element(encoded, 0, len(encoded)) == \
        torsocksd.DerElement(4, 0, 4, 260)


def _is_probable_prime(n, rng):
    if n % 2 == 0:
        return n == 2
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for _ in range(20):
        x = pow(rng.randrange(2, n - 1), d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = pow(x, 2, n)
            if x == n - 1:
                break
        else:
            return False
    return True


class RsaKey(collections.namedtuple("RsaKey", "n e d p q")):
    """An RSA key made by the tests."""


SMALL_PRIMES = [n for n in range(3, 2000) if all(n % k for k in range(2, n))]


def make_prime(bits, rng):
    """A prime of bits bits, its top two bits set, p - 1 prime to 65537."""
    while True:
        candidate = rng.getrandbits(bits) | (3 << (bits - 2)) | 1
        if all(candidate % k for k in SMALL_PRIMES) \
                and (candidate - 1) % 65537 \
                and _is_probable_prime(candidate, rng):
            return candidate


def make_rsa_key(bits, seed):
    """A deterministic RSA key of bits bits with exponent 65537."""
    rng = random.Random(seed)
    p, q = make_prime(bits // 2, rng), make_prime(bits // 2, rng)
    return RsaKey(p * q, 65537, pow(65537, -1, (p - 1) * (q - 1)), p, q)


@pytest.fixture(scope="module")
def rsa_key():
    """A deterministic 1024-bit RSA key for signing test vectors."""
    return make_rsa_key(1024, 1)


DIGEST_INFO_PREFIXES = {   # RFC 8017 §9.2, note 1
    "sha1": "3021300906052b0e03021a05000414",
    "sha256": "3031300d060960864801650304020105000420",
    "sha384": "3041300d060960864801650304020205000430",
    "sha512": "3051300d060960864801650304020305000440",
}
SIGNATURE_OIDS = {
    "sha1": "2a864886f70d010105", "sha256": "2a864886f70d01010b",
    "sha384": "2a864886f70d01010c", "sha512": "2a864886f70d01010d",
}


def _pkcs1_sign(key, hash_name, message):
    n, _, d = key[:3]
    size = (n.bit_length() + 7) // 8
    info = bytes.fromhex(DIGEST_INFO_PREFIXES[hash_name]) \
        + hashlib.new(hash_name, message).digest()
    encoded = b"\x00\x01" + b"\xff" * (size - len(info) - 3) + b"\x00" + info
    return pow(int.from_bytes(encoded, "big"), d, n).to_bytes(size, "big")


@pytest.mark.parametrize("hash_name", sorted(SIGNATURE_OIDS))
def test_rsa_pkcs1_verify_each_algorithm(hash_name, rsa_key):
    key = rsa_key
    n, e = key.n, key.e
    message = b"to be signed"
    signature = _pkcs1_sign(key, hash_name, message)
    algorithm = bytes.fromhex(SIGNATURE_OIDS[hash_name])
    assert torsocksd.rsa_pkcs1_verify(n, e, message, signature, algorithm)
    assert not torsocksd.rsa_pkcs1_verify(n, e, message + b"!", signature,
                                        algorithm)
    assert not torsocksd.rsa_pkcs1_verify(n, e, message, flip(signature, 9),
                                        algorithm)
    assert not torsocksd.rsa_pkcs1_verify(n, e, message, signature[1:], algorithm)
    other = "sha1" if hash_name != "sha1" else "sha256"
    assert not torsocksd.rsa_pkcs1_verify(n, e, message, signature,
                                        bytes.fromhex(SIGNATURE_OIDS[other]))
    assert not torsocksd.rsa_pkcs1_verify(n, e, message, signature,
                                        bytes.fromhex("2a864886f70d010104"))  # md5


@pytest.mark.parametrize("exponent", [(1 << 480000) + 1, (1 << 32) + 1,
                                      65536, 1, 2],
                         ids=["60 kB", "2**32 + 1", "even", "1", "2"])
def test_rsa_pkcs1_verify_refuses_exponents_tor_never_uses(rsa_key, monkeypatch,
                                                          exponent):
    # pow() is what a huge exponent makes slow: it must not be reached.
    powers = []
    monkeypatch.setattr(torsocksd, "pow", lambda *args: powers.append(args)
                        or 0, raising=False)
    signature = _pkcs1_sign(rsa_key, "sha256", b"m")
    with pytest.raises(torsocksd.TorProtocolError, match="RSA exponent"):
        torsocksd.rsa_pkcs1_verify(rsa_key.n, exponent, b"m", signature,
                                   bytes.fromhex(SIGNATURE_OIDS["sha256"]))
    assert powers == []


def test_rsa_pkcs1_verify_takes_exponents_up_to_2_to_the_32(rsa_key):
    signature = _pkcs1_sign(rsa_key, "sha256", b"m")
    algorithm = bytes.fromhex(SIGNATURE_OIDS["sha256"])
    assert not torsocksd.rsa_pkcs1_verify(rsa_key.n, (1 << 32) - 1, b"m",
                                          signature, algorithm)
    assert torsocksd.rsa_pkcs1_verify(rsa_key.n, 65537, b"m", signature,
                                      algorithm)


def test_rsa_pkcs1_verify_refuses_a_modulus_over_16384_bits():
    modulus = (1 << 16384) + 1
    with pytest.raises(torsocksd.TorProtocolError, match="16385-bit RSA"):
        torsocksd.rsa_pkcs1_verify(modulus, 65537, b"m", bytes(2049),
                                   bytes.fromhex(SIGNATURE_OIDS["sha256"]))


@pytest.mark.parametrize("modulus_bits, exponent, message", [
    (1024, (1 << 480000) + 1, "exponent of more than 33 bits"),
    (16400, 65537, "modulus of more than 16384 bits"),
    (480000, 65537, "modulus of more than 16384 bits"),
], ids=["60 kB exponent", "16400-bit modulus", "60 kB modulus"])
def test_parse_certificate_refuses_huge_rsa_numbers_by_their_length(
        rsa_key, modulus_bits, exponent, message):
    modulus = (1 << (modulus_bits - 1)) + 1
    der_certificate = make_certificate(rsa_public_key(modulus, exponent),
                                       rsa_key, "www.x.net", "www.x.net")
    with pytest.raises(torsocksd.TorProtocolError, match=message):
        torsocksd.parse_certificate(der_certificate)


@pytest.mark.parametrize("bits, exponent, message", [
    (1024, 65537, None), (1024, 3, None), (1024, (1 << 32) - 1, None),
    (1023, 65537, "identity key is 1023-bit RSA, not 1024-bit"),
    (2048, 65537, "identity key is 2048-bit RSA, not 1024-bit"),
    (1024, 1 << 16, "exponent of 17 bits"),
    (1024, (1 << 32) + 1, "exponent of 33 bits"),
])
def test_check_rsa_key_for_an_identity(bits, exponent, message):
    modulus = (1 << (bits - 1)) + 1
    if message is None:
        torsocksd.check_rsa_key(modulus, exponent, "identity", 1024, 1024)
        return
    with pytest.raises(torsocksd.TorProtocolError, match=message):
        torsocksd.check_rsa_key(modulus, exponent, "identity", 1024, 1024)


def test_check_rsa_key_for_a_link():
    for bits in (1024, 2048, 16384):
        torsocksd.check_rsa_key((1 << (bits - 1)) + 1, 65537, "link", 1024)
    for bits in (512, 1023, 16385):
        with pytest.raises(torsocksd.TorProtocolError,
                           match="link key is %d-bit RSA, not 1024 to 16384"
                           % bits):
            torsocksd.check_rsa_key((1 << (bits - 1)) + 1, 65537, "link",
                                    1024)
    with pytest.raises(torsocksd.TorProtocolError, match="exponent"):
        torsocksd.check_rsa_key(65537, 65537, "link")     # not below n


def test_der_children_are_bounded():
    sequence = der(0x30, der(0x05, b"") * 16)
    top = torsocksd.der_element(sequence, 0, len(sequence))
    assert len(torsocksd.der_children(sequence, top)) == 16
    sequence = der(0x30, der(0x05, b"") * 2000)
    top = torsocksd.der_element(sequence, 0, len(sequence))
    with pytest.raises(torsocksd.TorProtocolError,
                       match="more than 16 elements"):
        torsocksd.der_children(sequence, top)


def test_der_time_error_is_short():
    encoded = der(0x17, b"\n" * 3000)
    element = torsocksd.der_element(encoded, 0, len(encoded))
    with pytest.raises(torsocksd.TorProtocolError) as refused:
        torsocksd.der_time(encoded, element)
    assert len(str(refused.value)) <= 600 and "\n" not in str(refused.value)


@pytest.mark.parametrize("payload, message", [
    (b"\x11" + b"\x05\x00\x01x" * 17, "17 certificates, more than 16"),
    (b"\x01\x02\x10\x01" + bytes(4097), "certificate of 4097 bytes"),
    (b"\x01\x02\x00\x03abc" + bytes(8186), "CERTS cell of 8193 bytes"),
], ids=["17 certificates", "a 4097-byte one", "8193 bytes"])
def test_parse_certs_cell_bounds(payload, message):
    with pytest.raises(torsocksd.TorProtocolError, match=message):
        torsocksd.parse_certs_cell(payload)


def test_parse_certs_cell_takes_what_tor_may_send():
    most = b"\x10" + b"".join(bytes((kind,)) + b"\x00\x01x"
                              for kind in range(16))
    assert len(torsocksd.parse_certs_cell(most)) == 16
    big = b"\x01\x01\x10\x00" + bytes(4096)
    assert torsocksd.parse_certs_cell(big + bytes(8192 - len(big))) \
        == {1: bytes(4096)}


def test_keys_a_relay_makes_verify(relay_keys):
    certificates = torsocksd.parse_certs_cell(relay_keys.certs())
    fingerprint = torsocksd.verify_relay_certs(
        certificates, relay_keys.link_certificate, time.time())
    assert fingerprint == hashlib.sha1(rsa_public_key(
        relay_keys.identity.n, relay_keys.identity.e)).digest()


@pytest.mark.parametrize("text", [RELAY_FINGERPRINT, "$" + RELAY_FINGERPRINT,
                                  RELAY_FINGERPRINT.lower(),
                                  "2705 DE41 F653 522E 9A8C BA65 0514 07D2 D00A F8BF"])
def test_parse_fingerprint(text):
    assert torsocksd.parse_fingerprint(text).hex().upper() == RELAY_FINGERPRINT


@pytest.mark.parametrize("text", ["", "2705", RELAY_FINGERPRINT + "00",
                                  "X" * 40])
def test_parse_fingerprint_refuses(text):
    with pytest.raises(ValueError):
        torsocksd.parse_fingerprint(text)


# =============================================================================
# Relay cells and relay crypto
# =============================================================================

def test_relay_payload_layout_and_padding():
    payload = torsocksd.relay_payload(torsocksd.RelayCommand.DATA, 0x1234, b"hello")
    assert len(payload) == 509
    assert payload[:16] == bytes.fromhex("02" "0000" "1234" "00000000" "0005") \
        + b"hello"
    assert payload[16:20] == bytes(4)           # 4 zero bytes, then random
    full = torsocksd.relay_payload(2, 1, bytes(497))
    assert full[-1:] == b"\x00"
    assert torsocksd.parse_relay_payload(payload) == torsocksd.RelayCell(2, 0x1234,
                                                                     b"hello")
    with pytest.raises(ValueError):
        torsocksd.relay_payload(2, 1, bytes(499))
    bad = bytearray(payload)
    bad[9:11] = (499).to_bytes(2, "big")
    with pytest.raises(torsocksd.TorProtocolError):
        torsocksd.parse_relay_payload(bad)


def test_relay_digest_is_running_sha1_over_whole_payload():
    keys = torsocksd.create_fast_keys(bytes(20), bytes(range(20)))
    client = torsocksd.RelayCrypto.for_client(keys)
    running = hashlib.sha1(keys.forward_digest)
    keystream = torsocksd.Aes128Ctr(keys.forward_key)
    for data in (b"first", b"second"):
        payload = torsocksd.relay_payload(torsocksd.RelayCommand.DATA, 1, data)
        plain = bytes(payload)
        sealed = client.seal(payload)
        running.update(plain)
        expected = bytearray(plain)
        expected[5:9] = running.digest()[:4]
        assert sealed == bytes(a ^ b for a, b in
                               zip(expected, keystream.keystream(509)))
    assert client.sent_digest() == running.digest()


def test_relay_crypto_both_ways_and_tampering():
    keys = torsocksd.create_fast_keys(os.urandom(20), os.urandom(20))
    client = torsocksd.RelayCrypto.for_client(keys)
    relay = torsocksd.RelayCrypto.for_relay(keys)
    for i in range(5):
        opened = relay.open(client.seal(torsocksd.relay_payload(2, 1, b"up%d" % i)))
        assert torsocksd.parse_relay_payload(opened).data == b"up%d" % i
        opened = client.open(relay.seal(torsocksd.relay_payload(2, 1, b"down")))
        assert torsocksd.parse_relay_payload(opened).data == b"down"
    assert client.sent_digest() == relay.received_digest()
    assert client.received_digest() == relay.sent_digest()
    before = client.received_digest()
    tampered = flip(relay.seal(torsocksd.relay_payload(2, 1, b"x")), 20)
    assert client.open(tampered) is None
    assert client.received_digest() == before   # a failed check changes nothing


# =============================================================================
# Circuits and streams, with a fake relay
# =============================================================================

class FakeTransport:
    """What a TorLink gives a Circuit, recorded."""

    def __init__(self):
        self.cells = []
        self.room = 1 << 30
        self.soon = collections.deque()

    def send_cell(self, command, payload):
        self.cells.append((command, payload))

    def flush(self):
        pass

    def cell_room(self):
        return self.room

    def call_soon(self, function, argument):
        self.soon.append((function, argument))

    def run_soon(self):
        while self.soon:
            function, argument = self.soon.popleft()
            function(argument)


class FakeRelay:
    """The relay's end of a CREATE_FAST circuit."""

    def __init__(self, circuit, transport):
        self.circuit = circuit
        self.transport = transport
        relay_material = os.urandom(20)
        keys = torsocksd.create_fast_keys(circuit.create_fast_payload(),
                                        relay_material)
        self.crypto = torsocksd.RelayCrypto.for_relay(keys)
        circuit.on_created_fast(relay_material + keys.key_hash)

    def send(self, command, stream_id, data=b""):
        self.circuit.on_relay_cell(
            self.crypto.seal(torsocksd.relay_payload(command, stream_id, data)))

    def received(self):
        """The relay cells the client sent since the last call."""
        cells = []
        for command, payload in self.transport.cells:
            assert command == torsocksd.CellCommand.RELAY
            opened = self.crypto.open(payload)
            assert opened is not None
            cells.append(torsocksd.parse_relay_payload(opened))
        self.transport.cells.clear()
        return cells


class Application:
    """A stream's callbacks, recorded."""

    def __init__(self):
        self.events = []
        self.data = b""

    def on_connected(self):
        self.events.append("connected")

    def on_data(self, data):
        self.data += data

    def on_end(self, reason):
        self.events.append(("end", reason))


def new_circuit():
    transport = FakeTransport()
    circuit = torsocksd.Circuit(transport)
    return circuit, transport


def open_stream(circuit, relay):
    application = Application()
    stream = circuit.open_stream(application.on_connected, application.on_data,
                                 application.on_end)
    if relay is not None:
        assert relay.received() == [torsocksd.RelayCell(
            torsocksd.RelayCommand.BEGIN_DIR, stream.stream_id, b"")]
        relay.send(torsocksd.RelayCommand.CONNECTED, stream.stream_id)
    return stream, application


R = torsocksd.RelayCommand


def test_create_fast_key_hash_must_match():
    circuit, _ = new_circuit()
    with pytest.raises(torsocksd.TorProtocolError, match="key hash"):
        circuit.on_created_fast(os.urandom(40))


def test_streams_opened_early_begin_when_the_circuit_is_created():
    circuit, transport = new_circuit()
    application = Application()
    stream = circuit.open_stream(application.on_connected, application.on_data,
                                 application.on_end)
    assert transport.cells == [] and stream.send(b"early") == 0
    relay = FakeRelay(circuit, transport)
    assert relay.received() == [torsocksd.RelayCell(R.BEGIN_DIR, stream.stream_id,
                                                  b"")]
    writable = []
    stream.on_writable = lambda: writable.append(True)
    relay.send(R.CONNECTED, stream.stream_id)
    assert application.events == ["connected"] and writable == [True]


def test_data_both_ways_then_relay_end():
    circuit, transport = new_circuit()
    relay = FakeRelay(circuit, transport)
    stream, application = open_stream(circuit, relay)
    assert stream.send(b"GET /tor/server/authority HTTP/1.0\r\n\r\n") == 38
    assert relay.received() == [torsocksd.RelayCell(
        R.DATA, stream.stream_id, b"GET /tor/server/authority HTTP/1.0\r\n\r\n")]
    relay.send(R.DATA, stream.stream_id, b"HTTP/1.0 200 OK\r\n\r\n")
    relay.send(R.DATA, stream.stream_id, b"router labrelay")
    relay.send(R.END, stream.stream_id, bytes((torsocksd.EndReason.DONE,)))
    assert application.data == b"HTTP/1.0 200 OK\r\n\r\nrouter labrelay"
    assert application.events == ["connected", ("end", torsocksd.EndReason.DONE)]
    assert stream.end_detail == "the relay ended the stream: DONE"
    assert stream.send(b"more") == 0 and not circuit.streams


def test_end_before_connected_notdirectory():
    circuit, transport = new_circuit()
    relay = FakeRelay(circuit, transport)
    stream, application = open_stream(circuit, None)
    relay.send(R.END, stream.stream_id, b"\x0e")
    assert application.events == [("end", torsocksd.EndReason.NOTDIRECTORY)]
    assert torsocksd.reply_for_end_reason(application.events[0][1]) \
        == torsocksd.Reply.GENERAL_FAILURE


def test_empty_end_is_misc():
    circuit, transport = new_circuit()
    relay = FakeRelay(circuit, transport)
    stream, application = open_stream(circuit, relay)
    relay.send(R.END, stream.stream_id)
    assert application.events[-1] == ("end", torsocksd.EndReason.MISC)


def test_close_sends_end_done_and_later_cells_still_count():
    circuit, transport = new_circuit()
    relay = FakeRelay(circuit, transport)
    stream, application = open_stream(circuit, relay)
    stream.close()
    assert relay.received() == [torsocksd.RelayCell(R.END, stream.stream_id,
                                                  b"\x06")]
    relay.send(R.DATA, stream.stream_id, b"in flight")
    assert application.data == b"" and circuit.deliver_window == 999
    stream.close()                              # twice is harmless
    assert relay.received() == []


def sendme_v1(digest):
    return b"\x01\x00\x14" + digest


def test_circuit_sendme_v1_every_100_cells_with_the_running_digest():
    circuit, transport = new_circuit()
    relay = FakeRelay(circuit, transport)
    stream, application = open_stream(circuit, relay)
    for round_number in range(11):       # more than the 1000-cell window
        for i in range(100):
            relay.send(R.DATA, stream.stream_id, b"d")
            if i == 98:
                digest_before_the_last = relay.crypto.sent_digest()
        digest = relay.crypto.sent_digest()
        cells = [cell for cell in relay.received() if cell.stream_id == 0]
        assert cells == [torsocksd.RelayCell(R.SENDME, 0, sendme_v1(digest))]
        assert digest != digest_before_the_last
    assert circuit.deliver_window == 1000
    assert len(application.data) == 1100


def test_stream_sendme_every_50_cells_and_held_while_paused():
    circuit, transport = new_circuit()
    relay = FakeRelay(circuit, transport)
    stream, application = open_stream(circuit, relay)

    def stream_sendmes():
        return [cell for cell in relay.received()
                if cell.command == R.SENDME and cell.stream_id]

    for _ in range(50):
        relay.send(R.DATA, stream.stream_id, b"a")
    assert stream_sendmes() == [torsocksd.RelayCell(R.SENDME, stream.stream_id, b"")]
    stream.pause(True)
    for _ in range(120):
        relay.send(R.DATA, stream.stream_id, b"b")
    relay.send(R.END, stream.stream_id, b"\x06")
    assert application.data == b"a" * 50            # held back
    assert stream_sendmes() == [] and application.events == ["connected"]
    assert stream.deliver_window == 380
    stream.pause(False)
    assert application.data == b"a" * 50            # not inside pause()
    transport.run_soon()
    assert application.data == b"a" * 50 + b"b" * 120
    assert application.events == ["connected", ("end", 6)]


def test_pause_during_delivery_holds_the_rest():
    circuit, transport = new_circuit()
    relay = FakeRelay(circuit, transport)
    stream, application = open_stream(circuit, relay)
    stream.pause(True)
    for chunk in (b"1", b"2", b"3"):
        relay.send(R.DATA, stream.stream_id, chunk)
    def take_one_then_pause(data):
        application.on_data(data)
        stream.pause(True)
    stream.on_data = take_one_then_pause
    stream.pause(False)
    transport.run_soon()
    assert application.data == b"1"
    stream.pause(False)
    transport.run_soon()
    assert application.data == b"12"


def test_package_windows_and_sendmes_from_the_relay():
    circuit, transport = new_circuit()
    relay = FakeRelay(circuit, transport)
    first, _ = open_stream(circuit, relay)
    second, _ = open_stream(circuit, relay)
    big = bytes(498 * 600)
    assert first.send(big) == 498 * 500             # the stream window
    assert first.send(b"x") == 0
    assert second.send(big) == 498 * 500            # then the circuit's 1000
    assert second.send(b"x") == 0 and circuit.package_window == 0
    data_cells = relay.received()
    assert len(data_cells) == 1000
    writable = []
    first.on_writable = lambda: writable.append("first")
    second.on_writable = lambda: writable.append("second")
    relay.send(R.SENDME, first.stream_id)           # stream window: no room
    assert writable == []                           # the circuit is still full
    relay.send(R.SENDME, 0, sendme_v1(circuit._sendme_digests[0]))
    assert writable == ["first"] and circuit.package_window == 100
    assert first.send(big) == 498 * 50


def test_circuit_sendme_digest_is_that_after_our_100th_cell():
    circuit, transport = new_circuit()
    relay = FakeRelay(circuit, transport)
    stream, _ = open_stream(circuit, relay)
    for _ in range(99):
        stream.send(b"z")
    relay.received()
    assert not circuit._sendme_digests
    stream.send(b"z")
    relay.received()
    assert list(circuit._sendme_digests) == [relay.crypto.received_digest()]


def test_bad_circuit_sendmes_are_protocol_errors():
    circuit, transport = new_circuit()
    relay = FakeRelay(circuit, transport)
    stream, _ = open_stream(circuit, relay)
    with pytest.raises(torsocksd.TorProtocolError, match="unexpected"):
        relay.send(R.SENDME, 0, sendme_v1(bytes(20)))     # nothing sent yet
    circuit, transport = new_circuit()
    relay = FakeRelay(circuit, transport)
    stream, _ = open_stream(circuit, relay)
    stream.send(bytes(498 * 100))
    with pytest.raises(torsocksd.TorProtocolError, match="digest"):
        relay.send(R.SENDME, 0, sendme_v1(bytes(20)))
    circuit, transport = new_circuit()
    relay = FakeRelay(circuit, transport)
    stream, _ = open_stream(circuit, relay)
    stream.send(bytes(498 * 100))
    with pytest.raises(torsocksd.TorProtocolError, match="version"):
        relay.send(R.SENDME, 0, b"\x02\x00\x14" + bytes(20))


def test_sendme_version_0_is_accepted():
    circuit, transport = new_circuit()
    relay = FakeRelay(circuit, transport)
    stream, _ = open_stream(circuit, relay)
    stream.send(bytes(498 * 100))
    relay.send(R.SENDME, 0)
    assert circuit.package_window == 1000


def test_unexpected_stream_sendme_is_a_protocol_error():
    circuit, transport = new_circuit()
    relay = FakeRelay(circuit, transport)
    stream, _ = open_stream(circuit, relay)
    with pytest.raises(torsocksd.TorProtocolError, match="stream SENDME"):
        relay.send(R.SENDME, stream.stream_id)


def test_relay_overrunning_windows_is_a_protocol_error():
    circuit, transport = new_circuit()
    relay = FakeRelay(circuit, transport)
    stream, _ = open_stream(circuit, relay)
    stream.pause(True)                      # no stream SENDMEs go out
    for _ in range(500):
        relay.send(R.DATA, stream.stream_id, b"x")
    with pytest.raises(torsocksd.TorProtocolError, match="stream window"):
        relay.send(R.DATA, stream.stream_id, b"x")


def test_unrecognized_relay_cell_and_data_before_connected():
    circuit, transport = new_circuit()
    relay = FakeRelay(circuit, transport)
    with pytest.raises(torsocksd.TorProtocolError, match="unrecognized"):
        circuit.on_relay_cell(os.urandom(509))
    circuit, transport = new_circuit()
    relay = FakeRelay(circuit, transport)
    stream, _ = open_stream(circuit, None)
    with pytest.raises(torsocksd.TorProtocolError, match="not connected"):
        relay.send(R.DATA, stream.stream_id, b"x")


def test_unknown_relay_commands_are_ignored():
    circuit, transport = new_circuit()
    relay = FakeRelay(circuit, transport)
    stream, application = open_stream(circuit, relay)
    relay.send(R.DROP, 0, b"padding")
    relay.send(99, stream.stream_id, b"future")
    assert application.events == ["connected"]


def test_circuit_failure_ends_every_stream():
    circuit, transport = new_circuit()
    relay = FakeRelay(circuit, transport)
    first, first_application = open_stream(circuit, relay)
    second, second_application = open_stream(circuit, None)
    circuit.fail(torsocksd.EndReason.DESTROY, "gone")
    assert first_application.events[-1] == ("end", torsocksd.EndReason.DESTROY)
    assert second_application.events == [("end", torsocksd.EndReason.DESTROY)]
    assert first.end_detail == "gone" and circuit.closed


def test_stream_ids_are_distinct_and_never_zero():
    circuit, _ = new_circuit()
    circuit._next_stream_id = 0xFFFE
    ids = [circuit.open_stream(None, None, None).stream_id for _ in range(4)]
    assert ids == [0xFFFE, 0xFFFF, 1, 2]


@pytest.mark.parametrize("reason, reply", [
    # Tor's reasons.c stream_end_reason_to_socks5_response
    (1, 1), (2, 4), (3, 5), (4, 2), (5, 1), (6, 5), (7, 6), (8, 4), (9, 1),
    (10, 1), (11, 1), (12, 5), (13, 1), (14, 1), (0, 1), (200, 1)])
def test_end_reason_to_socks5_reply(reason, reply):
    assert torsocksd.reply_for_end_reason(reason) == reply


def test_errno_to_end_reason():
    assert torsocksd.end_reason_for_errno(errno.ECONNREFUSED) == 3
    assert torsocksd.end_reason_for_errno(errno.ENETUNREACH) == 8
    assert torsocksd.end_reason_for_errno(errno.ETIMEDOUT) == 7
    assert torsocksd.end_reason_for_errno(errno.EMFILE) == 11
    assert torsocksd.end_reason_for_errno(errno.EIO) == 1


# =============================================================================
# Links in a real loop, without tor
# =============================================================================

class StreamWatcher:
    """Open a stream from the loop thread; wait for its end from the test."""

    def __init__(self, server, pool, address, port, request=b"",
                 fingerprint=None, pause_first=None):
        self.server = server
        self.pause_first = pause_first      # seconds paused after CONNECTED
        self.data_before_resume = None
        self.done = threading.Event()
        self.connected_event = threading.Event()
        self.connected = False
        self.data = b""
        self.reason = None
        self.detail = ""
        self.request = request
        self.sent = 0
        self.stream = None
        server.call_soon_threadsafe(self._open, pool, address, port, fingerprint)

    def _open(self, pool, address, port, fingerprint):
        self.stream = pool.open_stream(address, port, self._on_connected,
                                       self._on_data, self._on_end, fingerprint)

    def _push(self):
        while self.sent < len(self.request):
            taken = self.stream.send(self.request[self.sent:])
            if not taken:
                return
            self.sent += taken

    def _on_connected(self):
        self.connected = True
        self.connected_event.set()
        self.stream.on_writable = self._push
        if self.pause_first is not None:
            self.stream.pause(True)
            self.server._loop.call_at(time.monotonic() + self.pause_first,
                                self._resume, None)
        self._push()

    def _resume(self, _):
        self.data_before_resume = self.data
        self.stream.pause(False)

    def _on_data(self, data):
        self.data += data

    def _on_end(self, reason):
        self.reason = reason
        self.detail = self.stream.end_detail
        self.done.set()

    def wait(self, timeout=TIMEOUT):
        assert self.done.wait(timeout), "the stream never ended"
        return self


def run_in_loop(server, function, *args):
    """Run function in the loop thread and wait for it."""
    finished = threading.Event()
    box = []

    def call():
        try:
            box.append(function(*args))
        finally:
            finished.set()
    server.call_soon_threadsafe(call)
    assert finished.wait(TIMEOUT)
    return box[0] if box else None


@pytest.fixture
def pool(server):
    links = torsocksd.TorLinkPool(server._loop, timeout=1.0,
                                  scrub=server._scrub)
    yield links
    run_in_loop(server, links.close)


def test_link_to_a_closed_port_refuses(server, pool):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    watcher = StreamWatcher(server, pool, "127.0.0.1", port).wait()
    assert watcher.reason == torsocksd.EndReason.CONNECTREFUSED
    assert torsocksd.reply_for_end_reason(watcher.reason) \
        == torsocksd.Reply.CONNECTION_REFUSED
    assert "refused" in watcher.detail and not pool.links


def test_link_to_a_silent_listener_times_out(server, pool):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        started = time.monotonic()
        watcher = StreamWatcher(server, pool, "127.0.0.1",
                                listener.getsockname()[1]).wait()
    assert watcher.reason == torsocksd.EndReason.TIMEOUT
    assert torsocksd.reply_for_end_reason(watcher.reason) \
        == torsocksd.Reply.TTL_EXPIRED
    assert 0.9 <= time.monotonic() - started < 5


def test_link_to_a_non_tls_peer_fails(server, pool):
    def talk_nonsense():
        peer, _ = listener.accept()
        with peer:
            peer.recv(4096)
            peer.sendall(b"HTTP/1.0 400 Bad Request\r\n\r\n")
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        thread = threading.Thread(target=talk_nonsense)
        thread.start()
        watcher = StreamWatcher(server, pool, "127.0.0.1",
                                listener.getsockname()[1]).wait()
        thread.join(TIMEOUT)
    assert watcher.reason == torsocksd.EndReason.TORPROTOCOL
    assert "TLS" in watcher.detail


# =============================================================================
# A relay made by the tests, over TLS: honest, then hostile
# =============================================================================

C = torsocksd.CellCommand
OID_COMMON_NAME = bytes.fromhex("550403")


def der(tag, value):
    size = len(value)
    if size < 0x80:
        return bytes((tag, size)) + value
    length = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(length))) + length + value


def der_integer(number):
    return der(0x02, number.to_bytes(number.bit_length() // 8 + 1, "big"))


def der_name(common_name):
    return der(0x30, der(0x31, der(0x30, der(0x06, OID_COMMON_NAME)
                                   + der(0x0C, common_name.encode()))))


def der_utc_time(when):
    return der(0x17, time.strftime("%y%m%d%H%M%SZ",
                                   time.gmtime(when)).encode())


def rsa_public_key(n, e):
    """DER RSAPublicKey (PKCS#1)."""
    return der(0x30, der_integer(n) + der_integer(e))


SHA256_WITH_RSA = der(0x30, der(0x06, bytes.fromhex(SIGNATURE_OIDS["sha256"]))
                      + der(0x05, b""))


def make_certificate(public_key, signer, subject, issuer, now=None):
    """An X.509 v3 certificate (RFC 5280 §4.1) of public_key (a DER
    RSAPublicKey), signed by signer with sha256WithRSAEncryption, valid from
    a day before now to thirty days after."""
    now = time.time() if now is None else now
    key_info = der(0x30, der(0x30, der(0x06, torsocksd.OID_RSA_ENCRYPTION)
                             + der(0x05, b""))
                   + der(0x03, b"\0" + public_key))
    signed = der(0x30, der(0xA0, der_integer(2))
                 + der_integer(random.getrandbits(63)) + SHA256_WITH_RSA
                 + der_name(issuer)
                 + der(0x30, der_utc_time(now - 86400)
                       + der_utc_time(now + 30 * 86400))
                 + der_name(subject) + key_info)
    return der(0x30, signed + SHA256_WITH_RSA
               + der(0x03, b"\0" + _pkcs1_sign(signer, "sha256", signed)))


def private_key_pem(key):
    """key as a PEM RSAPrivateKey (RFC 8017 A.1.2), for ssl."""
    n, e, d, p, q = key
    body = base64.b64encode(der(0x30, b"".join(
        der_integer(number) for number in
        (0, n, e, d, p, q, d % (p - 1), d % (q - 1), pow(q, -1, p)))))
    lines = [body[i:i + 64].decode() for i in range(0, len(body), 64)]
    return "-----BEGIN RSA PRIVATE KEY-----\n%s\n" \
           "-----END RSA PRIVATE KEY-----\n" % "\n".join(lines)


def certs_payload(certificates):
    """A CERTS cell's payload (tor-spec §4.2) from {type: certificate}."""
    return bytes((len(certificates),)) + b"".join(
        bytes((kind,)) + len(body).to_bytes(2, "big") + body
        for kind, body in certificates.items())


class RelayKeys:
    """A relay's keys as tor makes them: a 1024-bit identity that signs
    itself and a 2048-bit link key, whose certificate TLS shows."""

    def __init__(self, directory):
        self.identity = make_rsa_key(1024, 21)
        self.link = make_rsa_key(2048, 22)
        self.identity_certificate = make_certificate(
            rsa_public_key(self.identity.n, self.identity.e), self.identity,
            "www.identity.com", "www.identity.com")
        self.link_certificate = self.certify(self.link.n, self.link.e)
        self.certificate_file = str(directory / "link.pem")
        self.key_file = str(directory / "link.key")
        with open(self.certificate_file, "w") as out:
            out.write(ssl.DER_cert_to_PEM_cert(self.link_certificate))
        with open(self.key_file, "w") as out:
            out.write(private_key_pem(self.link))

    def certify(self, n, e, subject="www.link.net"):
        """A certificate of the RSA key (n, e) signed by the identity."""
        return make_certificate(rsa_public_key(n, e), self.identity, subject,
                                "www.identity.com")

    def certs(self, **changes):
        """The CERTS payload with types 1 and 2, or with changes (link=...,
        identity=...)."""
        return certs_payload({
            torsocksd.CertType.LINK:
                changes.get("link", self.link_certificate),
            torsocksd.CertType.IDENTITY:
                changes.get("identity", self.identity_certificate)})


@pytest.fixture(scope="module")
def relay_keys(tmp_path_factory):
    return RelayKeys(tmp_path_factory.mktemp("relay"))


def read_cell(sock, circuit_id_len=4):
    header = recv_exactly(sock, circuit_id_len + 1)
    if torsocksd.is_variable_length(header[-1]):
        payload = recv_exactly(sock, int.from_bytes(recv_exactly(sock, 2),
                                                    "big"))
    else:
        payload = recv_exactly(sock, torsocksd.PAYLOAD_LEN)
    return torsocksd.Cell(int.from_bytes(header[:-1], "big"), header[-1],
                          payload)


NETINFO_FROM_RELAY = bytes(4) + b"\x04\x04\x7f\x00\x00\x01" \
    + b"\x01\x04\x04\x7f\x00\x00\x01"
ANSWER = b"HTTP/1.0 200 OK\r\n\r\nrouter testrelay 127.0.0.1\n"


class TlsRelay:
    """A relay's ORPort on 127.0.0.1, as far as CONNECT_DIR needs it, served
    by a thread: TLS with the link key; VERSIONS, then setup_cells, CERTS,
    AUTH_CHALLENGE and NETINFO; CREATED_FAST; a BEGIN_DIR answered with
    RELAY_CONNECTED, `flood` PADDING cells, ANSWER and RELAY_END.  Around
    the bulk (setup_cells, or the flood) before_bulk() and after_bulk() are
    called.  A hostile relay is one made with other versions, setup_cells or
    certs."""

    def __init__(self, keys, versions=b"\0\x03\0\x04\0\x05", setup_cells=b"",
                 certs=None, flood=0, before_bulk=None, after_bulk=None,
                 tls=None):
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(keys.certificate_file, keys.key_file)
        if tls is not None:
            tls(self.context)       # to change what the TLS server offers
        self.versions = versions
        self.setup_cells = setup_cells
        self.certs = keys.certs() if certs is None else certs
        self.flood = flood
        self.before_bulk = before_bulk or (lambda: None)
        self.after_bulk = after_bulk or (lambda: None)
        self.tls = None
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(1)
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        try:
            connection, _ = self.listener.accept()
        except OSError:
            return
        connection.settimeout(TIMEOUT)
        try:
            with self.context.wrap_socket(connection, server_side=True) as tls:
                self.tls = tls
                self._talk(tls)
        except (OSError, EOFError):
            pass        # the link went away, as it does from a hostile relay
        finally:
            connection.close()

    def _talk(self, tls):
        read_cell(tls, torsocksd.VERSIONS_CIRC_ID_LEN)
        if self.setup_cells:
            self.before_bulk()
            tls.sendall(torsocksd.encode_cell(0, C.VERSIONS, self.versions,
                                              torsocksd.VERSIONS_CIRC_ID_LEN)
                        + self.setup_cells)
            self.after_bulk()
        else:
            tls.sendall(torsocksd.encode_cell(0, C.VERSIONS, self.versions,
                                              torsocksd.VERSIONS_CIRC_ID_LEN))
        tls.sendall(
            torsocksd.encode_cell(0, C.CERTS, self.certs)
            + torsocksd.encode_cell(0, C.AUTH_CHALLENGE,
                                    os.urandom(32) + b"\0\x01\0\x01")
            + torsocksd.encode_cell(0, C.NETINFO, NETINFO_FROM_RELAY))
        crypto = None
        while True:
            cell = read_cell(tls)
            if cell.command == C.CREATE_FAST:
                material = os.urandom(20)
                keys = torsocksd.create_fast_keys(cell.payload[:20], material)
                crypto = torsocksd.RelayCrypto.for_relay(keys)
                tls.sendall(torsocksd.encode_cell(
                    cell.circuit_id, C.CREATED_FAST, material + keys.key_hash))
            elif cell.command == C.RELAY:
                request = torsocksd.parse_relay_payload(
                    crypto.open(cell.payload))
                if request.command == R.BEGIN_DIR:
                    self._answer(tls, crypto, cell.circuit_id,
                                 request.stream_id)
            elif cell.command == C.DESTROY:
                return

    def _answer(self, tls, crypto, circuit_id, stream_id):
        def relay_cell(command, data=b""):
            return torsocksd.encode_cell(circuit_id, C.RELAY, crypto.seal(
                torsocksd.relay_payload(command, stream_id, data)))
        tls.sendall(relay_cell(R.CONNECTED))
        if self.flood:
            self.before_bulk()
            tls.sendall(torsocksd.encode_cell(0, C.PADDING) * self.flood)
            self.after_bulk()
        tls.sendall(relay_cell(R.DATA, ANSWER) + relay_cell(
            R.END, bytes((torsocksd.EndReason.DONE,))))

    def close(self):
        self.listener.close()
        tls = self.tls
        if tls is not None:
            try:        # the socket's own shutdown wakes the thread's read
                socket.socket.shutdown(tls, socket.SHUT_RDWR)
            except OSError:
                pass
        self.thread.join(TIMEOUT)


@pytest.fixture
def make_relay(relay_keys):
    """make_relay(**options) -> a TlsRelay with the test keys."""
    yield from closing_factory(
        lambda **options: TlsRelay(relay_keys, **options))


def connect_dir(server, port):
    """A SOCKS5 CONNECT_DIR to 127.0.0.1:port: the reply's first two bytes,
    and what came after the reply until the close."""
    with connect(server) as client:
        client.sendall(b"\x05\x01\x00")
        assert recv_exactly(client, 2) == b"\x05\x00"
        client.sendall(b"\x05\xf2\x00\x01\x7f\x00\x00\x01"
                       + port.to_bytes(2, "big"))
        reply = recv_exactly(client, 10)
        return reply[:2], recv_until_eof(client)


@pytest.fixture
def link_log(caplog):
    """The log lines of the server's loop thread, as they are written."""
    caplog.set_level(logging.DEBUG, logger="torsocksd")
    return caplog


def test_connect_dir_to_the_test_relay(server, make_relay, link_log):
    relay = make_relay()
    assert connect_dir(server, relay.port) == (b"\x05\x00", ANSWER)


@pytest.fixture(scope="module")
def dh_parameters_file(tmp_path_factory):
    """PKCS#3 DH parameters: a 2048-bit prime of the tests' own, as a
    hostile relay would choose one (of up to 10,000 bits)."""
    prime = make_prime(2048, random.Random(31))
    body = base64.b64encode(der(0x30, der_integer(prime) + der_integer(2)))
    path = tmp_path_factory.mktemp("dh") / "dh.pem"
    path.write_text("-----BEGIN DH PARAMETERS-----\n%s\n"
                    "-----END DH PARAMETERS-----\n" % "\n".join(
                        body[i:i + 64].decode()
                        for i in range(0, len(body), 64)))
    return str(path)


def test_relay_cannot_choose_the_diffie_hellman_group(
        server, make_relay, link_log, dh_parameters_file):
    """A TLS 1.2 relay that offers DHE only (its group, its cost to us) is
    refused; TLS 1.2 with ECDHE is fine."""
    def dhe_only(context):
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        context.set_ciphers("DHE-RSA-AES256-GCM-SHA384")
        context.load_dh_params(dh_parameters_file)
    relay = make_relay(tls=dhe_only)
    assert connect_dir(server, relay.port) == (b"\x05\x01", b"")
    refusal_logged(link_log, ["TLS: "])

    def ecdhe(context):
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        context.set_ciphers("ECDHE-RSA-AES256-GCM-SHA384")
    relay = make_relay(tls=ecdhe)
    assert connect_dir(server, relay.port) == (b"\x05\x00", ANSWER)


def test_tor_tls_context_refuses_renegotiation_and_dhe():
    context = torsocksd.tor_tls_context()
    if hasattr(ssl, "OP_NO_RENEGOTIATION"):
        assert context.options & ssl.OP_NO_RENEGOTIATION
    assert {cipher["kea"] for cipher in context.get_ciphers()} \
        <= {"kx-ecdhe", "kx-any"}      # kx-any: TLS 1.3


def refusal_logged(log, words):
    """The log line that names why the link closed; every line is short."""
    messages = [record.getMessage() for record in log.records]
    assert all(len(message) <= 600 for message in messages), \
        max(messages, key=len)[:2000]
    closed = [message for message in messages if "closed:" in message
              and all(word in message for word in words)]
    assert closed, messages
    return closed[0]


@pytest.mark.parametrize("exponent, words", [
    # 60 kB: one pow() with it took 1.4 s of the loop.
    ((1 << 480000) + 1, ["-byte CERTS cell where at most 8192 bytes"]),
    ((1 << 24000) + 1, ["RSA exponent of more than 33 bits"]),
    ((1 << 32) + 1, ["identity key has an RSA exponent of 33 bits"]),
], ids=["60 kB", "3 kB", "2**32 + 1"])
def test_identity_key_with_a_huge_exponent_is_refused_before_any_pow(
        server, make_relay, relay_keys, link_log, monkeypatch, exponent,
        words):
    verified = []
    monkeypatch.setattr(torsocksd, "rsa_pkcs1_verify",
                        lambda *args: verified.append(args) or False)
    identity = make_certificate(
        rsa_public_key(relay_keys.identity.n, exponent),
        relay_keys.identity, "www.identity.com", "www.identity.com")
    relay = make_relay(certs=relay_keys.certs(identity=identity))
    assert connect_dir(server, relay.port) == (b"\x05\x01", b"")
    refusal_logged(link_log, words)
    assert verified == []


def versions_payload(versions):
    return b"".join(struct.pack(">H", version) for version in versions)


def vpadding(size):
    return torsocksd.encode_cell(0, C.VPADDING, bytes(size))


@pytest.mark.parametrize("hostile, words", [
    # 30,000 versions: the error listed them all in one 190 kB log line.
    ({"versions": versions_payload(range(6, 30006))},
     ["60000-byte VERSIONS cell"]),
    ({"versions": versions_payload(range(6, 206))},
     ["VERSIONS cell lists 200 versions, more than 64"]),
    ({"versions": versions_payload(range(6, 70))},
     ["no common link protocol version", "69]"]),
    # Only the header of a 65,535-byte cell: refused without waiting for it.
    ({"setup_cells": vpadding(65535)[:7]}, ["65535-byte VPADDING cell"]),
    ({"setup_cells": vpadding(8193)}, ["8193-byte VPADDING cell"]),
    ({"setup_cells": vpadding(1000) * 40},
     ["more than 32768 bytes", "before the circuit"]),
], ids=["30000 versions", "200 versions", "64 versions", "65535-byte header",
        "8193-byte cell", "40 kB of cells"])
def test_hostile_relay_is_refused_in_a_short_log_line(
        server, make_relay, link_log, hostile, words):
    relay = make_relay(**hostile)
    assert connect_dir(server, relay.port) == (b"\x05\x01", b"")
    refusal_logged(link_log, words)


def test_setup_within_the_bounds_is_fine(server, make_relay, link_log):
    relay = make_relay(setup_cells=vpadding(8192) + vpadding(1000) * 10)
    assert connect_dir(server, relay.port) == (b"\x05\x00", ANSWER)


@pytest.mark.parametrize("change, words", [
    (lambda keys: keys.certs(link=keys.certify(
        make_rsa_key(512, 23).n, 65537)), ["link key is 512-bit RSA"]),
    (lambda keys: keys.certs(link=keys.certify(
        keys.link.n, (1 << 32) + 1)), ["RSA exponent"]),
    (lambda keys: certs_payload({1: keys.link_certificate,
                                 2: keys.identity_certificate,
                                 4: bytes(4097)}),
     ["certificate of 4097 bytes"]),
    (lambda keys: certs_payload({
        1: keys.link_certificate, 2: keys.identity_certificate,
        **{kind: b"x" for kind in range(3, 18)}}),
     ["CERTS cell of 17 certificates, more than 16"]),
], ids=["512-bit link key", "link exponent 2**32 + 1", "4097-byte entry",
        "17 certificates"])
def test_hostile_certs_cells_are_refused(server, make_relay, relay_keys,
                                         link_log, change, words):
    relay = make_relay(certs=change(relay_keys))
    assert connect_dir(server, relay.port) == (b"\x05\x01", b"")
    refusal_logged(link_log, words)


class LoopHold:
    """Holds the server's loop from before_bulk() until after_bulk(), so
    that the relay's bulk is all there when the loop next looks."""

    def __init__(self, server):
        self.server = server
        self.held = threading.Event()
        self.sent = threading.Event()

    def _hold(self):
        self.held.set()
        assert self.sent.wait(TIMEOUT)

    def before_bulk(self):
        self.server.call_soon_threadsafe(self._hold)
        assert self.held.wait(TIMEOUT)

    def after_bulk(self):
        self.sent.set()


def test_what_waits_before_the_circuit_is_open_is_bounded(
        server, make_relay, link_log, monkeypatch):
    """98 kB of setup cells all there at once: the link reads no more than
    MAX_SETUP_BYTES ahead of the cells it has handled (and a TLS record
    OpenSSL may hold, of 16 kB and 256 bytes at most), and then fails."""
    backlogs = []
    process_cells = torsocksd.TorLink._process_cells

    def recording_process_cells(link):
        backlogs.append(len(link._received) + link._incoming.pending)
        return process_cells(link)
    monkeypatch.setattr(torsocksd.TorLink, "_process_cells",
                        recording_process_cells)
    hold = LoopHold(server)
    relay = make_relay(setup_cells=vpadding(8192) * 12,
                       before_bulk=hold.before_bulk,
                       after_bulk=hold.after_bulk)
    assert connect_dir(server, relay.port) == (b"\x05\x01", b"")
    refusal_logged(link_log, ["more than 32768 bytes"])
    assert max(backlogs) <= torsocksd.MAX_SETUP_BYTES + 16384 + 256, \
        backlogs


def test_a_flood_of_cells_is_handled_a_bounded_batch_at_a_time(
        server, make_relay, link_log, monkeypatch):
    """The loop is held while the relay sends 128 cells at once; then no
    call from the loop handles more than LINK_CELLS_PER_WAKEUP of them, and
    every one is handled (the answer behind them arrives)."""
    cells_per_call = [0]

    def counted(callback):
        if callback is None:
            return None

        def call(*args):
            cells_per_call.append(0)
            return callback(*args)
        return call

    loop = server._loop
    watch, call_at, call_soon = loop.watch, loop.call_at, loop.call_soon
    monkeypatch.setattr(loop, "watch", lambda sock, old, new, handler:
                        watch(sock, old, new, handler and (
                            counted(handler[0]), handler[1])))
    monkeypatch.setattr(loop, "call_at",
                        lambda when, function, *args, owner=None:
                        call_at(when, counted(function), *args, owner=owner))
    monkeypatch.setattr(loop, "call_soon",
                        lambda function, *args, owner=None:
                        call_soon(counted(function), *args, owner=owner))
    handle_cell = torsocksd.TorLink._handle_cell

    def counting_handle_cell(link, cell):
        cells_per_call[-1] += 1
        return handle_cell(link, cell)
    monkeypatch.setattr(torsocksd.TorLink, "_handle_cell",
                        counting_handle_cell)
    hold = LoopHold(server)
    relay = make_relay(flood=128, before_bulk=hold.before_bulk,
                       after_bulk=hold.after_bulk)
    assert connect_dir(server, relay.port) == (b"\x05\x00", ANSWER)
    assert max(cells_per_call) <= torsocksd.LINK_CELLS_PER_WAKEUP, \
        cells_per_call
    assert sum(cells_per_call) >= 128 + 8, cells_per_call


# =============================================================================
# A real tor relay on loopback, in a network namespace
# =============================================================================

def test_live_relay_in_network_namespace():
    """Run tests/peers/torlink_live.py (a real tor relay, torsocksd's link
    and CONNECT_DIR through SOCKS) in a fresh loopback-only namespace."""
    for program in ("tor", "unshare", "ip"):
        require_program(program)
    unshare = ["unshare", "-n"] if os.geteuid() == 0 else ["unshare", "-r", "-n"]
    probe = subprocess.run(unshare + ["true"], capture_output=True)
    if probe.returncode:
        message = "cannot make a network namespace: %s" \
            % probe.stderr.decode(errors="replace").strip()
        if REQUIRE_PEERS:
            pytest.fail(message)
        pytest.skip(message)
    live = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peers",
                        "torlink_live.py")
    inner = "ip link set lo up && exec %s -m pytest -q -p no:cacheprovider " \
            "-W error -s %s" % (sys.executable, live)
    environment = dict(os.environ,
                       PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    result = subprocess.run(unshare + ["sh", "-c", inner], env=environment,
                            capture_output=True, text=True, timeout=300,
                            cwd=os.path.dirname(os.path.abspath(__file__)))
    report = result.stdout + result.stderr
    assert result.returncode == 0, report
    passed = re.search(r"(\d+) passed", report)
    print(report)
    assert passed and int(passed.group(1)) >= 14, report


