"""Run inside a fresh network namespace (unshare -n), as root: real HTTP
proxy clients through torsocksd's --http-tunnel port.

Brings lo up and gives it the test host addresses 192.0.2.30 and
2001:db8::30.  There an HTTPS server (a certificate made now with the
openssl command, for www.test, git.test and pypi.test) and a plain HTTP
server serve the same tree: a 200 kB blob, a bare git repository for
git's dumb HTTP protocol, and a package index with one small wheel.  The
names are known only to the resolver given to torsocksd: neither the
clients nor the machine can look them up.

Then curl (-x with -k for https, --proxytunnel for http, an IPv6 literal,
a name that does not resolve, a login), Python's requests (a proxy for
https, with and without a login), git (http.proxy, http.sslVerify=false,
with and without a login) and pip (--proxy, --trusted-host) fetch through
torsocksd, and each result is checked byte for byte.  A second torsocksd
requires credentials.  A third listens on 0.0.0.0 for clients on other
hosts (192.0.2.31 allowed, 192.0.2.32 not): --allow at accept, and the
guard that keeps this host's loopback from them.

    unshare -n python3 http_tunnel_clients.py [--skip requests,pip]

Prints one line per check and, when all passed, "all checks passed".
"""

import argparse
import hashlib
import http.server
import io
import logging
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
import threading
import zipfile

# common first: it puts torsocksd on sys.path.
from common import (CLOSED, add_test_hosts, check, connect_from, finish,
                    read_to_end)
import torsocksd
from conftest import FakeResolver

HOST4 = "192.0.2.30"
HOST6 = "2001:db8::30"
CLIENT = "192.0.2.31"           # a client on another host, allowed in
STRANGER = "192.0.2.32"         # one that is not
NAMES = ("www.test", "git.test", "pypi.test")   # only torsocksd knows them
BLOB = os.urandom(200_000)
TIMEOUT = 60            # seconds a client program may take


def resolver():
    """The test names and nothing else; never DNS."""
    return FakeResolver({name: [HOST4] for name in NAMES})


class LogLines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


# =============================================================================
# The origin: files, a certificate, servers
# =============================================================================

def make_tree(root):
    with open(os.path.join(root, "blob"), "wb") as file:
        file.write(BLOB)
    git_repository(root)
    wheel = package_index(root)
    return wheel


def git(*args, cwd=None):
    subprocess.run(["git", "-c", "user.name=test", "-c",
                    "user.email=test@example.test", "-c", "init.defaultBranch"
                    "=main", *args], cwd=cwd, check=True,
                   stdout=subprocess.DEVNULL, env=git_environment())


def git_environment(home=None):
    environment = {key: value for key, value in os.environ.items()
                   if "proxy" not in key.lower() and not key.startswith(
                       "GIT_")}
    environment.update(GIT_CONFIG_NOSYSTEM="1", GIT_TERMINAL_PROMPT="0",
                       HOME=home or tempfile.gettempdir())
    return environment


def git_repository(root):
    work = os.path.join(root, "work")
    os.mkdir(work)
    git("init", "-q", work)
    with open(os.path.join(work, "README"), "w") as file:
        file.write("fetched through torsocksd's HTTP CONNECT port\n")
    git("add", "README", cwd=work)
    git("commit", "-q", "-m", "first", cwd=work)
    git("clone", "-q", "--bare", work, os.path.join(root, "repo.git"))
    git("update-server-info", cwd=os.path.join(root, "repo.git"))
    shutil.rmtree(work)


def package_index(root):
    """A wheel of tinypkg 1.0 under files/, and the simple index naming it;
    returns the wheel's bytes."""
    buffer = io.BytesIO()
    files = {
        "tinypkg/__init__.py": "VALUE = 1\n",
        "tinypkg-1.0.dist-info/METADATA":
            "Metadata-Version: 2.1\nName: tinypkg\nVersion: 1.0\n",
        "tinypkg-1.0.dist-info/WHEEL":
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
            "Tag: py3-none-any\n",
    }
    with zipfile.ZipFile(buffer, "w") as wheel:
        for name, text in files.items():
            wheel.writestr(name, text)
        wheel.writestr("tinypkg-1.0.dist-info/RECORD", "".join(
            "%s,,\n" % name for name in list(files)
            + ["tinypkg-1.0.dist-info/RECORD"]))
    data = buffer.getvalue()
    name = "tinypkg-1.0-py3-none-any.whl"
    os.makedirs(os.path.join(root, "files"))
    with open(os.path.join(root, "files", name), "wb") as file:
        file.write(data)
    os.makedirs(os.path.join(root, "simple", "tinypkg"))
    with open(os.path.join(root, "simple", "tinypkg", "index.html"),
              "w") as file:
        file.write('<html><body><a href="../../files/%s#sha256=%s">%s</a>'
                   '</body></html>\n' % (name, hashlib.sha256(data)
                                         .hexdigest(), name))
    return data


def certificate(directory):
    """A self-signed certificate for the test names (EC: made at once)."""
    key = os.path.join(directory, "key.pem")
    cert = os.path.join(directory, "cert.pem")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
         "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", key, "-out",
         cert, "-days", "2", "-subj", "/CN=www.test", "-addext",
         "subjectAltName=" + ",".join("DNS:" + name for name in NAMES)
         + ",IP:" + HOST4 + ",IP:" + HOST6],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return cert, key


class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class Server6(http.server.ThreadingHTTPServer):
    address_family = __import__("socket").AF_INET6


def serve(root, address, port, tls=None):
    handler = lambda *args: Quiet(*args, directory=root)   # noqa: E731
    kind = Server6 if ":" in address else http.server.ThreadingHTTPServer
    server = kind((address, port), handler)
    if tls is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*tls)
        server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server


# =============================================================================
# The clients
# =============================================================================

def clean_environment():
    return {key: value for key, value in os.environ.items()
            if "proxy" not in key.lower() and not key.startswith("PIP_")}


def run(command, **kwargs):
    return subprocess.run(command, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, timeout=TIMEOUT,
                          env=kwargs.pop("env", clean_environment()),
                          **kwargs)


def curl(*args):
    return run(["curl", "--silent", "--show-error", "--max-time", "20",
                "--noproxy", "", *args])


def curl_checks(proxy, login_proxy):
    for label, args in (
            ("curl -x to https with -k", ("-k", "-x", proxy,
                                          "https://www.test/blob")),
            ("curl --proxytunnel to http", ("--proxytunnel", "-x", proxy,
                                            "http://www.test/blob")),
            ("curl -x to https on an IPv6 literal",
             ("-k", "-x", proxy, "https://[%s]/blob" % HOST6)),
            ("curl with Basic login", ("-k", "-x", login_proxy,
                                       "https://www.test/blob"))):
        result = curl(*args)
        check(label, result.returncode == 0 and result.stdout == BLOB,
              result.stderr.decode(errors="replace").strip())
    result = curl("-k", "-x", proxy, "https://nowhere.test/blob")
    check("curl is told a name did not resolve: 503",
          result.returncode == 56 and b"CONNECT tunnel failed, response 503"
          in result.stderr, result.stderr.decode(errors="replace").strip())
    wrong = login_proxy.replace("s3cret", "wrong")
    result = curl("-k", "-x", wrong, "https://www.test/blob")
    check("curl with a wrong password gets 407",
          result.returncode == 56 and b"response 407" in result.stderr,
          result.stderr.decode(errors="replace").strip())


REQUESTS_SCRIPT = """
import hashlib, sys, warnings
import requests
warnings.simplefilter("ignore")
response = requests.get(sys.argv[1], proxies={"https": sys.argv[2]},
                        verify=False, timeout=20)
response.raise_for_status()
print(hashlib.sha256(response.content).hexdigest())
"""


def requests_checks(proxy, login_proxy):
    for label, proxy_url in (("requests with an https proxy", proxy),
                             ("requests with a proxy login", login_proxy)):
        result = run([sys.executable, "-c", REQUESTS_SCRIPT,
                      "https://www.test/blob", proxy_url])
        check(label, result.stdout.decode().strip()
              == hashlib.sha256(BLOB).hexdigest(),
              result.stderr.decode(errors="replace").strip()[-300:])
    result = run([sys.executable, "-c", REQUESTS_SCRIPT,
                  "https://www.test/blob", login_proxy.replace("s3cret", "x")])
    error = result.stderr.decode(errors="replace").strip().splitlines()
    check("requests with a wrong proxy password fails with 407",
          result.returncode != 0 and "407 Proxy Authentication Required"
          in error[-1], error[-1][-120:] if error else "")


def git_checks(proxy, login_proxy, directory):
    home = tempfile.mkdtemp(dir=directory)
    for label, proxy_url in (("git clones over https through http.proxy",
                              proxy),
                             ("git clones through a proxy with a login",
                              login_proxy)):
        target = tempfile.mkdtemp(dir=directory)
        result = run(["git", "-c", "http.proxy=" + proxy_url, "-c",
                      "http.sslVerify=false", "clone", "-q",
                      "https://git.test/repo.git", target],
                     env=git_environment(home))
        readme = os.path.join(target, "README")
        check(label, result.returncode == 0 and os.path.exists(readme)
              and open(readme).read().startswith("fetched through"),
              result.stderr.decode(errors="replace").strip()[-300:])


def tunnel_request(port, source, target):
    """What a client at source gets for CONNECT target (and a GET of /blob
    through the tunnel when it opens), until the server closes: (bytes,
    how it ended)."""
    with connect_from(source, (HOST4, port), timeout=20) as sock:
        sock.sendall(b"CONNECT %s HTTP/1.1\r\n\r\n"
                     b"GET /blob HTTP/1.0\r\n\r\n" % target)
        return read_to_end(sock)


def remote_client_checks(loop_port):
    """A client from another host: --allow decides at accept, and the
    guard keeps this host's loopback from it."""
    policy = [(True, CLIENT + "/32")]
    with torsocksd.Server(listen=[], http_tunnel=[("0.0.0.0", 0)],
                          resolver=resolver(), client_policy=policy) as server:
        port = server.address[1]
        reply, end = tunnel_request(port, CLIENT, b"www.test:80")
        check("a remote client is relayed", reply.startswith(
            b"HTTP/1.0 200 OK\r\nTor-Capabilities: \r\n\r\nHTTP/1.0 200 ")
            and reply.endswith(BLOB) and end in CLOSED, (reply[:60], end))
        reply, end = tunnel_request(port, CLIENT, b"127.0.0.1:%d" % loop_port)
        check("a remote client may not reach loopback: 403 (exit policy)",
              reply == b"HTTP/1.0 403 Forbidden (exit policy)\r\n"
              b"Tor-Capabilities: \r\nTor-Request-Failed: end/EXITPOLICY"
              b"\r\n\r\n" and end in CLOSED, (reply[:80], end))
        reply, end = tunnel_request(port, STRANGER, b"www.test:80")
        check("a client outside --allow is closed at accept",
              reply == b"" and end in CLOSED, (reply[:60], end))


def pip_checks(proxy, directory, wheel):
    target = os.path.join(directory, "downloads")
    result = run([sys.executable, "-m", "pip", "--isolated", "download",
                  "--no-deps", "--no-cache-dir", "--disable-pip-version-check",
                  "--index-url", "https://pypi.test/simple/",
                  "--trusted-host", "pypi.test", "--proxy", proxy,
                  "--dest", target, "tinypkg==1.0"])
    path = os.path.join(target, "tinypkg-1.0-py3-none-any.whl")
    check("pip downloads through --proxy",
          result.returncode == 0 and os.path.exists(path)
          and open(path, "rb").read() == wheel,
          result.stderr.decode(errors="replace").strip()[-300:])


# =============================================================================

def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--skip", default="",
                        help="comma-separated: requests, pip")
    skip = set(filter(None, parser.parse_args().skip.split(",")))
    add_test_hosts(HOST4, HOST6, CLIENT, STRANGER)
    log_lines = LogLines()
    logging.getLogger("torsocksd").addHandler(log_lines)
    logging.getLogger("torsocksd").setLevel(logging.INFO)
    directory = tempfile.mkdtemp(prefix="http-tunnel-clients-")
    servers = []
    try:
        root = os.path.join(directory, "www")
        os.mkdir(root)
        wheel = make_tree(root)
        tls = certificate(directory)
        servers = [serve(root, HOST4, 443, tls), serve(root, HOST6, 443, tls),
                   serve(root, HOST4, 80), serve(root, "127.0.0.1", 0)]
        credentials = torsocksd.Credentials([(b"alice", b"s3cret")])
        with torsocksd.Server(listen=[], http_tunnel=[("127.0.0.1", 0)],
                              resolver=resolver()) as open_server, \
                torsocksd.Server(listen=[], http_tunnel=[("127.0.0.1", 0)],
                                 resolver=resolver(),
                                 credentials=credentials) as login_server:
            proxy = "http://127.0.0.1:%d" % open_server.address[1]
            login_proxy = "http://alice:s3cret@127.0.0.1:%d" \
                % login_server.address[1]
            curl_checks(proxy, login_proxy)
            if "requests" not in skip:
                requests_checks(proxy, login_proxy)
            git_checks(proxy, login_proxy, directory)
            if "pip" not in skip:
                pip_checks(proxy, directory, wheel)
        remote_client_checks(servers[-1].server_address[1])
        relayed = [line for line in log_lines.lines
                   if "HTTP_CONNECT CONNECT [scrubbed]:443: relayed" in line]
        check("the log has the tunnels, destinations scrubbed", relayed
              and not any(name in line for line in log_lines.lines
                          for name in NAMES), "%d relayed" % len(relayed))
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()
        shutil.rmtree(directory, ignore_errors=True)
    return finish()


if __name__ == "__main__":
    sys.exit(main())
