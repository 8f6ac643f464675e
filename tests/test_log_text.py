"""clip_for_log: text a peer chose, made fit for one log line (bounded, and
with no control character), whatever the peer sent."""

import pytest

import torsocksd
from torsocksd import MAX_LOGGED_PEER_TEXT, clip_for_log


@pytest.mark.parametrize("text, expected", [
    ("relay offers [4, 5]", "relay offers [4, 5]"),
    ("", ""),
    ("x" * MAX_LOGGED_PEER_TEXT, "x" * MAX_LOGGED_PEER_TEXT),
    ("x" * (MAX_LOGGED_PEER_TEXT + 1), "x" * MAX_LOGGED_PEER_TEXT + "…"),
    ("caf\u00e9", "caf\u00e9"),                 # printable: as it is
    ("two\nlines\r\x1b[31m", "two\\nlines\\r\\x1b[31m"),
    ("line\u2028separator", "line\\u2028separator"),
    (b"491231235959Z", "491231235959Z"),
    (b"\x00\xff\\\n", "\\x00\\xff\\\\\\n"),
    (bytearray(b"ab\x07"), "ab\\x07"),
    (memoryview(b"abc"), "abc"),
])
def test_clip_for_log(text, expected):
    assert clip_for_log(text) == expected


@pytest.mark.parametrize("text", [
    "v" * 300000, b"\x00" * 300000, "\n" * 300000, b"A" * 300000,
    ", ".join(str(n) for n in range(30000)),
])
def test_long_text_is_cut_to_the_limit(text):
    clipped = clip_for_log(text)
    assert len(clipped) == MAX_LOGGED_PEER_TEXT + 1 and clipped.endswith("…")
    assert clipped.isprintable()


def test_cut_at_another_limit():
    assert clip_for_log(b"\x01\x02\x03", limit=6) == "\\x01\\x…"
    assert clip_for_log("abcdef", limit=6) == "abcdef"
    assert clip_for_log("abcdefg", limit=6) == "abcdef…"
    assert torsocksd.MAX_LOGGED_PEER_TEXT == 512
