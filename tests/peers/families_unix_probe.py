"""A live Unix socket that torsocksd's liveness probe cannot connect to at
once, and what torsocksd does when asked to listen at its path.

    python3 families_unix_probe.py full-backlog DIR
        A server listens at DIR/live.sock with its accept queue full (it
        never accepts); torsocksd.Server(listen=["unix:DIR/live.sock"])
        .start() is tried.  The calling test runs this with a timeout: a
        blocking probe connect() waits for room in that queue forever.

    python3 families_unix_probe.py no-permission DIR
        (as root) A root-owned server listens at DIR/live.sock, mode 0600,
        in a directory owned by nobody; a child that has become nobody
        tries torsocksd.Server(...).start() there.  Its probe connect()
        fails with EACCES although the server is alive.

Prints "RESULT " + JSON: outcome ("error" or "started"), errno and message
of the error, and whether the live server's socket file is still its own
(same inode) and still reaches it.
"""

import json
import os
import socket
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, os.pardir, os.pardir))
import torsocksd  # noqa: E402

NOBODY = 65534


class NoResolver:
    """No name is looked up here."""


def try_to_listen(path):
    server = torsocksd.Server(listen=["unix:" + path], resolver=NoResolver())
    try:
        server.start()
    except OSError as error:
        return {"outcome": "error", "errno": error.errno,
                "message": str(error)}
    server.stop()
    return {"outcome": "started"}


def still_live(path, inode):
    """Is the live server's socket file still at path (not unlinked and
    replaced)?"""
    return os.path.lexists(path) and os.lstat(path).st_ino == inode


def full_backlog(directory):
    path = os.path.join(directory, "live.sock")
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(path)
    live.listen(0)
    inode = os.lstat(path).st_ino
    queued = []
    while True:         # fill the accept queue
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.setblocking(False)
        try:
            client.connect(path)
        except BlockingIOError:
            client.close()
            break
        queued.append(client)
    print("queued %d connection(s); the queue is full" % len(queued),
          flush=True)
    result = try_to_listen(path)
    result["live_intact"] = still_live(path, inode)
    return result


def no_permission(directory):
    os.chown(directory, NOBODY, NOBODY)
    path = os.path.join(directory, "live.sock")
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(path)
    os.chmod(path, 0o600)
    live.listen(8)
    inode = os.lstat(path).st_ino
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            child = {"probe_errno": probe.connect_ex(path)}
            probe.close()
            child.update(try_to_listen(path))
            os.write(write_end, json.dumps(child).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        result = json.loads(pipe.read() or "{}")
    os.waitpid(pid, 0)
    result["live_intact"] = still_live(path, inode)
    if result["live_intact"]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(5)
            client.connect(path)
        live.accept()[0].close()
    return result


def main():
    case, directory = sys.argv[1], sys.argv[2]
    result = {"full-backlog": full_backlog,
              "no-permission": no_permission}[case](directory)
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
