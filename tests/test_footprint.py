"""What a start costs: modules that only some modes need are imported when
that mode first uses them.  The figures are bench/footprint.py's business;
these tests check the behaviour behind them, and time nothing."""

import ast
import os
import subprocess
import sys

import pytest

from conftest import TIMEOUT

SCRIPT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir,
                                      "torsocksd.py"))
# What loads OpenSSL (CONNECT_DIR's TLS and digests, --credentials) and
# what only --syslog needs.
ON_FIRST_USE = ("ssl", "_ssl", "hashlib", "_hashlib", "hmac",
                "logging.handlers")


def modules_loaded_after(statement):
    """Which of ON_FIRST_USE a fresh interpreter has loaded after importing
    torsocksd and running statement."""
    program = ("import sys; sys.path.insert(0, %r); import torsocksd\n%s\n"
               "print(sorted(set(sys.modules) & set(%r)))"
               % (os.path.dirname(SCRIPT), statement, ON_FIRST_USE))
    result = subprocess.run([sys.executable, "-c", program],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            universal_newlines=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr
    return ast.literal_eval(result.stdout)


def test_importing_torsocksd_loads_neither_openssl_nor_syslog():
    assert modules_loaded_after("") == []


@pytest.mark.parametrize("statement, loaded", [
    ("torsocksd.Credentials([(b'u', b'p')]).check(b'u', b'p')",
     {"hashlib", "hmac"}),
    ("torsocksd.tor_tls_context()", {"ssl"}),
    ("torsocksd.kdf_tor(bytes(20), 72)", {"hashlib"}),
    ("torsocksd.configure_logging('info', use_syslog=True)",
     {"logging.handlers"}),
])
def test_a_mode_imports_what_it_needs_when_first_used(statement, loaded):
    assert loaded <= set(modules_loaded_after(statement))
