"""Who may call the controller, checked before any handler runs.

Three kinds of caller (docs/security.md):

* **admin**: a request carrying the admin token (header X-Testbed-Token), or a request
  without one from this machine's loopback whose socket belongs to root or to the user
  who started the controller with sudo (SUDO_UID): EdgeTB's `curl localhost:3333/...`
  keeps working for them, and for no other local user. The socket's owner is read from
  the kernel's socket tables (/proc/net/tcp, tcp6), never from anything the client says.
* **node**: a request carrying a node credential (dml_app/net.py node_token). It opens
  only NODE_ROUTES, and only for that node: the routes check `who().node` against the
  node the request names; and GET /data/<sha256>, the data bundles any node may read.
* **dashboard session**: a browser that signed in with the admin token (POST /login,
  form field `token`) holds an HttpOnly, SameSite=Strict cookie `edgetb_<port>`: an
  expiry, a nonce and their HMAC under the admin token (nothing stored, valid until it
  expires or the controller's token changes). It opens only DASHBOARD_ROUTES, which
  are read-only (the page, its files, /api/*, /runs/*): never a route that deploys,
  starts, changes or resets anything.
* anyone else: 401, with where the admin token is (for GET / a small sign-in page).

Before that, the request must be meant for this controller: a `Host` that is not one of
its names or addresses (DNS rebinding) and a browser request from another site (its
`Origin` or `Sec-Fetch-Site`) get 403, whatever credential they carry.
"""
from __future__ import annotations

import ipaddress
import os
import re
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from dml_app import net

# What a node credential opens; each route checks the node it speaks for.
NODE_ROUTES = frozenset({"/heartbeat", "/log", "/finish", "/print"})
# ... and the data bundles (controller/share.py DataStore): any node may read any bundle,
# named by its sha256 alone: "/data/" + 64 lowercase hex digits, nothing else under it.
NODE_DATA_RE = re.compile(r"/data/[0-9a-f]{64}")


def node_route(path: str) -> bool:
    """Whether a node credential opens `path` (the routes then check the node itself)."""
    return path in NODE_ROUTES or NODE_DATA_RE.fullmatch(path) is not None
# What a dashboard session cookie opens: the page and the read-only data it shows.
DASHBOARD_EXACT = frozenset({"/", "/api/state", "/api/metrics", "/api/events", "/api/fidelity",
                             "/api/runs", "/api/stream"})
DASHBOARD_PREFIXES = ("/static/", "/runs/")
LOGIN_ROUTE = "/login"
SESSION_S = 12 * 3600         # a dashboard session lasts this long


def dashboard_route(path: str) -> bool:
    return path in DASHBOARD_EXACT or path.startswith(DASHBOARD_PREFIXES)
LOCAL_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})


@dataclass(frozen=True)
class Caller:
    kind: str                  # "admin" | "node"
    node: str | None = None    # the node a node credential speaks for
    how: str = "token"         # "token" | "loopback"


def token_path(port: int) -> Path:
    """Where the controller on `port` keeps its admin token (a 0600 file)."""
    if os.geteuid() == 0:
        return Path("/run/edgetb") / f"controller-{port}.token"
    base = os.environ.get("XDG_RUNTIME_DIR") or str(Path.home() / ".edgetb")
    return Path(base) / f"edgetb-controller-{port}.token"


def write_token(path: Path, token: str) -> None:
    """A file only its owner can read, never written through a symlink someone planted."""
    if os.geteuid() == 0:
        from worker import secure

        secure.write_private(path, token + "\n", 0o755)
        return
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(token + "\n")


def remove_token(path: Path, token: str) -> None:
    """Remove the file if it still holds our token (another controller may have replaced it)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            held = os.read(fd, 4096).decode(errors="replace").strip()
        finally:
            os.close(fd)
        if net.same_token(held, token):
            path.unlink()
            if os.geteuid() == 0:
                path.parent.rmdir()    # /run/edgetb too, once no agent or controller uses it
    except OSError:
        pass


# ----------------------------------------------------------------------------- socket owners

def _hex_addr(h: str):
    raw = bytes.fromhex(h)
    if len(raw) == 4:
        return ipaddress.IPv4Address(raw[::-1])
    # /proc/net/tcp6: four 32-bit words, each in host (little-endian) order.
    return ipaddress.IPv6Address(b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))


def socket_owner(client_ip: str, client_port: int, server_port: int) -> int | None:
    """The uid owning the client end of a TCP connection to this machine, from the
    kernel's tables; None when no such socket is found."""
    try:
        want = ipaddress.ip_address(client_ip)
    except ValueError:
        return None
    if isinstance(want, ipaddress.IPv6Address) and want.ipv4_mapped:
        want = want.ipv4_mapped
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table, encoding="ascii") as f:
                next(f, None)
                for line in f:
                    parts = line.split()
                    if len(parts) < 8:
                        continue
                    lip, _, lport = parts[1].partition(":")
                    _, _, rport = parts[2].partition(":")
                    if int(lport, 16) != client_port or int(rport, 16) != server_port:
                        continue
                    addr = _hex_addr(lip)
                    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
                        addr = addr.ipv4_mapped
                    if addr == want:
                        return int(parts[7])
        except (OSError, ValueError):
            continue
    return None


def trusted_uids() -> frozenset[int]:
    """Root, the controller's own user, and the user who ran it through sudo."""
    uids = {0, os.geteuid()}
    sudo = os.environ.get("SUDO_UID", "")
    if sudo.isdigit():
        uids.add(int(sudo))
    return frozenset(uids)


# ----------------------------------------------------------------------------- host names

class LocalAddresses:
    """This machine's addresses (every interface of its network namespace), re-read at
    most every few seconds when a Host is not among them (bridges come and go)."""

    def __init__(self, ttl_s: float = 3.0):
        self.ttl_s = ttl_s
        self._at = 0.0
        self._addrs: frozenset[str] = frozenset()
        self._lock = threading.Lock()

    def _read(self) -> frozenset[str]:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            return frozenset(str(ipaddress.ip_address(a.get_attr("IFA_ADDRESS")))
                             for a in ipr.get_addr() if a.get_attr("IFA_ADDRESS"))

    def __contains__(self, addr: str) -> bool:
        with self._lock:
            if addr in self._addrs:
                return True
            if time.monotonic() - self._at > self.ttl_s:
                self._at = time.monotonic()
                try:
                    self._addrs = self._read()
                except Exception:  # noqa: BLE001 - no netlink: only the static names count
                    self._addrs = frozenset()
            return addr in self._addrs


def host_of(value: str) -> str | None:
    """'localhost:3333' -> 'localhost', '[::1]:3333' -> '::1'; None if malformed."""
    try:
        parts = urlsplit("//" + value.strip())
        host = parts.hostname
        parts.port   # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        return None
    return host.lower() if host else None


class Access:
    """The controller's guard: `install(app)` adds it before every handler."""

    def __init__(self, admin_token: str, *, names, port, token_file: Path):
        self.admin_token = admin_token
        self._names = names          # () -> extra names/addresses this controller answers to
        self._port = port            # () -> the port it serves on
        self.token_file = token_file
        self.uids = trusted_uids()
        self.local = LocalAddresses()

    # ---------------------------------------------------------------- checks
    def host_ok(self, host: str | None) -> bool:
        if host is None:
            return False
        if host in LOCAL_NAMES or host in {h.lower() for h in self._names()}:
            return True
        try:
            addr = ipaddress.ip_address(host)
        except ValueError:
            return host in {socket.gethostname().lower(), socket.getfqdn().lower()}
        return addr.is_loopback or str(addr) in self.local

    def refuse_site(self, headers) -> str | None:
        """Why a request is not meant for this controller, or None."""
        host = headers.get("Host")
        if host is not None and not self.host_ok(host_of(host)):
            return f"Host {host[:100]!r} does not name this controller"
        site = headers.get("Sec-Fetch-Site")
        if site is not None and site not in ("same-origin", "none"):
            return f"cross-site browser request (Sec-Fetch-Site: {site[:30]}) refused"
        origin = headers.get("Origin")
        if origin is not None:
            parts = urlsplit(origin)
            try:
                port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
            except ValueError:
                port = None
            if not (parts.hostname and self.host_ok(parts.hostname.lower()) and port == self._port()):
                return f"cross-site browser request (Origin {origin[:100]!r}) refused"
        return None

    # ---------------------------------------------------------------- sessions
    @property
    def cookie_name(self) -> str:
        """One cookie per controller port (browsers send a host's cookies to every port)."""
        return f"edgetb_{self._port()}"

    def new_session(self, now: float | None = None) -> str:
        """A cookie value: '<expiry>.<nonce>.<HMAC(admin, "session:<expiry>.<nonce>")>'."""
        expiry = int((now or time.time()) + SESSION_S)
        body = f"{expiry}.{os.urandom(12).hex()}"
        return f"{body}.{net._mac(self.admin_token, 'session:' + body)}"

    def session_ok(self, value: str | None, now: float | None = None) -> bool:
        if not value or len(value) > 200 or value.count(".") != 2:
            return False
        expiry, nonce, mac = value.split(".")
        if not expiry.isdigit() or int(expiry) < (now or time.time()):
            return False
        return net.same_token(mac, net._mac(self.admin_token, f"session:{expiry}.{nonce}"))

    def caller(self, environ, headers, cookies=None) -> Caller | tuple[str, int]:
        """The Caller, or (message, HTTP status) when refused. `cookies`: the request's
        (a dashboard session, see the module's docstring)."""
        why = self.refuse_site(headers)
        if why:
            return why + "\n", 403
        given = headers.get(net.TOKEN_HEADER, "")
        if given:
            if net.same_token(given, self.admin_token):
                return Caller("admin")
            node = net.token_node(self.admin_token, given)
            if node is not None:
                return Caller("node", node)
            return f"wrong credential (header {net.TOKEN_HEADER})\n", 401
        addr = environ.get("REMOTE_ADDR")
        try:
            loop = addr is not None and ipaddress.ip_address(addr).is_loopback
        except ValueError:
            loop = False
        if loop:
            try:
                uid = socket_owner(addr, int(environ.get("REMOTE_PORT") or 0), int(self._port()))
            except (TypeError, ValueError):
                uid = None
            if uid is not None and uid in self.uids:
                return Caller("admin", how="loopback")
        if cookies and self.session_ok(cookies.get(self.cookie_name)):
            return Caller("admin", how="session")
        who = ", ".join(sorted(_user(u) for u in self.uids))
        return (f"no credential: from this machine without a token only {who} may call the controller; "
                f"others send the admin token in header {net.TOKEN_HEADER} "
                f"(it is in {self.token_file}, readable by {_user(os.geteuid())} only)\n", 401)

    def install(self, app) -> None:
        from flask import g, request

        @app.before_request
        def _guard():
            if request.path == LOGIN_ROUTE:
                # Signing in needs no credential but the one in its body; the site rules hold.
                why = self.refuse_site(request.headers)
                return (why + "\n", 403) if why else None
            got = self.caller(request.environ, request.headers, request.cookies)
            if isinstance(got, tuple):
                if got[1] == 401 and request.path == "/" and request.method == "GET":
                    return self.login_page(), 401, {"Content-Type": "text/html; charset=utf-8"}
                return got
            if got.kind == "node" and not node_route(request.path):
                return (f"a node credential opens only {', '.join(sorted(NODE_ROUTES))} and "
                        f"/data/<sha256> on the controller, not {request.path[:100]}\n", 403)
            if got.how == "session" and not dashboard_route(request.path):
                return (f"a dashboard session opens only the dashboard's read-only routes, not "
                        f"{request.path[:100]}: send the admin token in header {net.TOKEN_HEADER}\n", 403)
            g.caller = got
            return None


    def login_page(self) -> str:
        import html

        from controller.dashboard import LOGIN_PAGE

        return LOGIN_PAGE.replace("{token_file}", html.escape(str(self.token_file)))


def who():
    """The Caller of the current request (set by Access.install)."""
    from flask import g

    return g.caller


def _user(uid: int) -> str:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"
