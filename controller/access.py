"""Who may call the controller, checked before any handler runs.

Three kinds of caller (docs/security.md):

* **admin**: a request carrying the admin token (header X-Testbed-Token), or a request
  without one from this machine's loopback whose socket belongs to root or to the user
  who started the controller with sudo (SUDO_UID): EdgeTB's `curl localhost:3333/...`
  keeps working for them, and for no other local user. The owner is the kernel's answer
  (NETLINK_SOCK_DIAG) for that very connection: the client's socket with exactly the
  accepted socket's 4-tuple, ESTABLISHED, with an inode; never anything the client says.
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
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from dml_app import net
from testbed_core import credentials

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

# NETLINK_SOCK_DIAG (linux/sock_diag.h, linux/inet_diag.h): the kernel answers for one
# socket named by its exact 4-tuple, with its state, owner and inode.
NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 1
TCP_ESTABLISHED = 1
INET_DIAG_NOCOOKIE = 0xFFFFFFFF
_NLMSG = struct.Struct("=IHHII")                  # nlmsghdr
_REQ = struct.Struct("=BBBBI")                    # inet_diag_req_v2 up to its sockid
_SOCKID = struct.Struct("!HH16s16s")              # sport, dport, src, dst (network order)
_SOCKID_TAIL = struct.Struct("=III")              # if, cookie[2]
_MSG = struct.Struct("=BBBB")                     # inet_diag_msg up to its sockid
_MSG_TAIL = struct.Struct("=IIIII")               # expires, rqueue, wqueue, uid, inode
_SOCKID_LEN = _SOCKID.size + _SOCKID_TAIL.size


@dataclass(frozen=True)
class DiagSocket:
    """What the kernel says of one TCP socket."""
    state: int
    uid: int
    inode: int


def _addr(ip: str | bytes) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An address (text, or 4 or 16 bytes) as the kernel keys it: IPv4-mapped IPv6
    addresses as IPv4; None if it is none."""
    try:
        addr = ipaddress.ip_address(ip.partition("%")[0] if isinstance(ip, str) else ip)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        return addr.ipv4_mapped
    return addr


def _packed(addr) -> bytes:
    return addr.packed.ljust(16, b"\0")


def diag_socket(local: tuple[str, int], remote: tuple[str, int]) -> DiagSocket | None:
    """The TCP socket of this network namespace whose local end is `local` and remote end
    `remote` (ip, port), asked of the kernel by that exact 4-tuple (no table is scanned);
    None when there is none, the two ends are not of one family, or anything goes wrong."""
    try:
        src, dst = _addr(local[0]), _addr(remote[0])
        sport, dport = int(local[1]), int(remote[1])
    except (TypeError, ValueError, IndexError, AttributeError):
        return None
    if src is None or dst is None or src.version != dst.version:
        return None
    if not (0 < sport < 65536 and 0 < dport < 65536):
        return None
    family = socket.AF_INET if src.version == 4 else socket.AF_INET6
    sockid = (_SOCKID.pack(sport, dport, _packed(src), _packed(dst))
              + _SOCKID_TAIL.pack(0, INET_DIAG_NOCOOKIE, INET_DIAG_NOCOOKIE))
    # One socket, asked for by its id (no NLM_F_DUMP): the kernel looks it up as an
    # incoming packet would be, established sockets (TIME_WAIT ones too) first, then
    # listeners; `idiag_states` is not applied to such a lookup, the answer's state is
    # checked by the caller.
    body = _REQ.pack(family, socket.IPPROTO_TCP, 0, 0, 1 << TCP_ESTABLISHED) + sockid
    seq = 1
    request = _NLMSG.pack(_NLMSG.size + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, seq, 0) + body
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as nl:
            nl.settimeout(1.0)
            nl.sendall(request)
            answer = nl.recv(8192)
    except OSError:
        return None
    found = None
    at = 0
    while at + _NLMSG.size <= len(answer):
        length, kind, _, aseq, _ = _NLMSG.unpack_from(answer, at)
        if length < _NLMSG.size or at + length > len(answer):
            return None
        if aseq == seq:
            if kind != SOCK_DIAG_BY_FAMILY:
                return None                    # NLMSG_ERROR (ENOENT: no such socket), or else
            if found is not None or length < _NLMSG.size + _MSG.size + _SOCKID_LEN + _MSG_TAIL.size:
                return None                    # more than one answer, or a short one
            p = at + _NLMSG.size
            afamily, state, _, _ = _MSG.unpack_from(answer, p)
            p += _MSG.size
            asport, adport, asrc, adst = _SOCKID.unpack_from(answer, p)
            p += _SOCKID_LEN
            _, _, _, uid, inode = _MSG_TAIL.unpack_from(answer, p)
            width = 4 if afamily == socket.AF_INET else 16
            if (asport, adport, _addr(asrc[:width]), _addr(adst[:width])) != (sport, dport, src, dst):
                return None                    # not the socket asked for
            found = DiagSocket(state, uid, inode)
        at += (length + 3) & ~3
    return found


def socket_owner(client: tuple[str, int], server: tuple[str, int]) -> int | None:
    """The uid owning the client end of the TCP connection client -> server (ip, port)
    on this machine: the kernel's socket with exactly that 4-tuple, ESTABLISHED, with
    an inode (an open socket, not a closed one's TIME_WAIT or orphaned FIN_WAIT, which
    the kernel reports as uid 0); None otherwise."""
    found = diag_socket(client, server)
    if found is None or found.state != TCP_ESTABLISHED or found.inode == 0:
        return None
    return found.uid


def connection_owner(sock: socket.socket, peer: str | None = None) -> int | None:
    """The uid owning the other end of `sock`, a connection this process accepted from
    this machine: `sock` must be the kernel's ESTABLISHED socket of its 4-tuple (its
    inode is ours), and the client's end, the same 4-tuple reversed, is asked for its
    owner (socket_owner). `peer`: the client address the request was taken from, which
    must be the socket's. None when any of this is not so, or `sock` is gone."""
    try:
        fd = sock.fileno()
        if fd < 0:
            return None
        local, remote = sock.getsockname()[:2], sock.getpeername()[:2]
        ours = os.fstat(fd).st_ino
    except (OSError, TypeError, ValueError):
        return None
    if peer is not None and (_addr(peer) is None or _addr(peer) != _addr(remote[0])):
        return None
    mine = diag_socket(local, remote)
    if mine is None or mine.state != TCP_ESTABLISHED or mine.inode == 0 or mine.inode != ours:
        return None
    return socket_owner(remote, local)


def accepted_socket(environ) -> socket.socket | None:
    """The connection a WSGI request came over: waitress's channel (reached through the
    `waitress.client_disconnected` method it puts in the environ), or werkzeug's
    `werkzeug.socket`; None for any other server."""
    sock = environ.get("werkzeug.socket")
    if sock is None:
        channel = getattr(environ.get("waitress.client_disconnected"), "__self__", None)
        sock = getattr(channel, "socket", None)
    return sock if isinstance(sock, socket.socket) else None


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
        return f"{body}.{credentials.mac(self.admin_token, 'session:' + body)}"

    def session_ok(self, value: str | None, now: float | None = None) -> bool:
        if not value or len(value) > 200 or value.count(".") != 2:
            return False
        expiry, nonce, mac = value.split(".")
        if not expiry.isdigit() or int(expiry) < (now or time.time()):
            return False
        return net.same_token(mac, credentials.mac(self.admin_token, f"session:{expiry}.{nonce}"))

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
            node = credentials.token_node(self.admin_token, given)
            if node is not None:
                return Caller("node", node)
            return f"wrong credential (header {net.TOKEN_HEADER})\n", 401
        addr = environ.get("REMOTE_ADDR")
        try:
            loop = addr is not None and ipaddress.ip_address(addr).is_loopback
        except ValueError:
            loop = False
        if loop:
            # The owner of this very connection: the accepted socket's 4-tuple, asked of
            # the kernel (no accepted socket reachable: no loopback trust).
            sock = accepted_socket(environ)
            uid = connection_owner(sock, addr) if sock is not None else None
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
