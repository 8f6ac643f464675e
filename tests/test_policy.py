"""Policy: which clients may connect, where they may go, what they must
present.  First the decisions alone (no sockets), then over real loopback
sockets with a Server in a thread or the command line, for clients on this
host.  Clients from another host need addresses of their own: those cases
run in a network namespace (peers/remote_client_policy.py, from
test_hostile.py).

Only loopback addresses; names go through FakeResolver.
"""

import logging
import socket

import torsocksd
from conftest import FakeResolver


# =============================================================================
# Credentials
# =============================================================================

def test_reload_that_would_leave_an_open_proxy_keeps_the_old_credentials(
        tmp_path, monkeypatch, caplog):
    """Whatever a reload reads, the exposure check runs on the result: a
    listener on every interface with no client rules keeps its credentials
    even if a credentials file somehow gave none.  (The socket is bound but
    never listens, so nobody can reach it.)"""
    users = tmp_path / "users"
    users.write_text("alice:secret\n")
    with socket.socket() as unlistened:
        unlistened.bind(("0.0.0.0", 0))
        old = torsocksd.Credentials.from_file(str(users))
        server = torsocksd.Server(sockets=[unlistened], credentials=old,
                                  resolver=FakeResolver())
        server.open_listeners()
        monkeypatch.setattr(torsocksd.Credentials, "from_file",
                            classmethod(lambda cls, path: cls([])))
        with caplog.at_level(logging.ERROR, logger="torsocksd"):
            server.reload(str(users))
        assert server.credentials is old
        assert "keeping the old credentials" in caplog.text
        assert "--open-proxy" in caplog.text
