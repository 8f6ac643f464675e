"""What the peer scripts in this folder share.

Each script runs as root in a fresh network namespace (`unshare -n`),
started by a test in tests/ that reads what it prints.  Importing this
module puts the repository's root and tests/ on sys.path, so that a script
can then import torsocksd, conftest's helpers and torpeer.

Checks: check() prints "ok: LABEL" or "FAILED: LABEL (detail)" and
remembers the failures; finish() prints the tally, its last line "all
checks passed" when none failed, and returns the exit status.

The network: add_test_hosts() brings lo up and gives it addresses of
other hosts (192.0.2.0/24, 2001:db8::/32), each alone, so that a socket
bound to one is, as far as torsocksd can tell, a client on another host.
"""

import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
ROOT = os.path.dirname(TESTS)
SCRIPT = os.path.join(ROOT, "torsocksd.py")
for _folder in (TESTS, ROOT):
    if _folder not in sys.path:
        sys.path.insert(0, _folder)

from torpeer import find_program  # noqa: E402

TIMEOUT = 10.0          # seconds a socket operation or a wait may take


# -- checks -------------------------------------------------------------------

FAILURES = []


def check(label, condition, detail=""):
    """Print one line for a check (detail in brackets after it); remember a
    failed one for finish()."""
    print("%s: %s%s" % ("ok" if condition else "FAILED", label,
                        (" (%s)" % detail) if detail else ""), flush=True)
    if not condition:
        FAILURES.append(label)


def finish():
    """Print how the checks went; the script's exit status (0: all
    passed)."""
    if FAILURES:
        print("%d check(s) failed" % len(FAILURES))
        return 1
    print("all checks passed")
    return 0


# -- the network --------------------------------------------------------------

def require_root():
    """Exit (status 2) unless this runs as root, as `unshare -n` does."""
    if os.geteuid() != 0:
        print("needs root (unshare -n as root)")
        sys.exit(2)


def ip(*args, check=True):
    """Run ip(8) with args; the CompletedProcess (its output as text).  With
    check, a failure ends the script with what ip said."""
    result = subprocess.run([find_program("ip"), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            universal_newlines=True)
    if check and result.returncode != 0:
        raise SystemExit("ip %s: %s" % (" ".join(args),
                                        result.stderr.strip()))
    return result


def add_test_hosts(*addresses):
    """Bring lo up and add each address to it alone (/32, or /128 without
    duplicate address detection, so that it is usable at once)."""
    require_root()
    ip("link", "set", "lo", "up")
    for address in addresses:
        if ":" in address:
            ip("-6", "addr", "add", address + "/128", "dev", "lo", "nodad")
        else:
            ip("addr", "add", address + "/32", "dev", "lo")
