"""The one traffic-control module: shapes a node's egress per destination ip:port.

Tree on the node's egress device (inside its network namespace, or the host NIC for a
physical node):

    htb root 1: (default 1:1)
      class 1:1     unshaped (100gbit): traffic to destinations without a link
      class 1:M     one per link, rate = ceil = bandwidth, burst sized to the rate
        tbf M:      leaf that only cuts GSO/TSO super-packets into frames (see below)
        [netem M:]  instead: delay/jitter/loss leaf, only where a link asks for it
        [pfifo M: limit 0]  instead, while the link is down (set_down): drops every packet
      u32 filter    ip dst B/32 + tcp/udp dport PB -> 1:M   (requests: to B's app port)
      u32 filter    ip dst B/32 + tcp/udp sport PA -> 1:M   (answers: from this node's own
                    app port PA, the table's own_port, to whichever port B asked from)

A link A->B is B's ip + B's app (DML) port: what A sends to that port, and, with the
second filter, what A's own app answers B (an HTTP response from A's app port to B's
ephemeral port: a GET of model weights from A's server is shaped by A->B). Traffic
between other ports stays unshaped. Both filters feed the same class and leaf, so a
link taken down drops A's answers to B too, and a rate change shapes both. The answers
include A's TCP handshake replies and ACKs to B's connections to A's port: with A->B
down, B's connections to A's port get nothing back (B->A carries no TCP either), and a
very slow A->B slows B's uploads to A, as on a real asymmetric link (ACKs are ~2% of the
data they acknowledge). When several links go to one ip (nodes of one host, told apart
by port), answers cannot tell them apart: the first link to that ip gets the answers'
filter. own_port None: no answers' filter (only what goes to B's port is shaped).

A link taken down keeps its class and filters; its leaf becomes a pfifo of limit 0, which
drops every packet enqueued (this kernel has no act_gact, so no `action drop`, and no
netem). HTB counts a class's bytes when it dequeues, so a down link's class counters stay
still. The table remembers which links are down: a rate change (/update/tc) changes the
class and leaves the link down; up puts back the leaf its link has now.

A whole table is installed with ONE `tc -batch` process per namespace (a process per
rule costs ~3 ms each; 100 full-mesh nodes are 39,600 rules: a class, a leaf and two
filters per link). Live changes touch only the classes that change (`class change`), so
traffic being measured is not disturbed.
Read-back goes through netlink so "links in place" is checked, not assumed.

Why the tbf leaf: HTB dequeues a GSO packet (up to 64 KB, one skb) whole and pays for it
afterwards, so without the leaf a 1 Mbit/s link sends 64 KB at line rate and then stays
silent for half a second, and a small message queued behind waits that long. A tbf whose
rate is unlimited and whose burst is two frames segments every larger packet on enqueue,
so HTB meters out single frames; it shapes nothing itself.
"""
from __future__ import annotations

import subprocess
import threading
from dataclasses import dataclass, field

from dml_app import bounded_input
from worker import units

ROOT_HANDLE = "1:"
DEFAULT_MINOR = 1
FIRST_LINK_MINOR = 0x10
UNSHAPED_RATE = "100gbit"
MTU_FRAME = 1514
SEGMENT_LIMIT_BYTES = 1000 * MTU_FRAME   # the leaf's queue: pfifo's default 1000 frames
MAX_DELAY_US = 60 * 10**6                # netem delay and jitter: at most a minute


class TcError(RuntimeError):
    pass


@dataclass(frozen=True)
class Link:
    """One shaped direction: traffic from a node to dest (ip, port)."""
    dest: str
    ip: str
    port: int
    rate_bps: int
    delay_us: int = 0
    jitter_us: int = 0
    loss_pct: float = 0.0

    @property
    def key(self) -> tuple[str, int]:
        return (self.ip, self.port)

    @property
    def needs_netem(self) -> bool:
        return bool(self.delay_us or self.jitter_us or self.loss_pct)

    @classmethod
    def from_dict(cls, d: dict) -> "Link":
        dest = str(d.get("dest", d.get("ip")))[:64]
        try:
            ip = units.ipv4(d["ip"])
        except (KeyError, ValueError, TypeError) as e:
            raise TcError(f"bad link to {dest}: ip: {e}") from None
        try:
            # Numbers through bounded_input.number: no bools, strings, NaN, infinities; in range.
            port = bounded_input.number(d.get("port"), "port", 1, 65535, integer=True)
            rate = bounded_input.number(d.get("rate_bps"), "rate_bps (bit/s)", units.MIN_RATE_BPS,
                              units.MAX_RATE_BPS, integer=True)
            delay = bounded_input.number(d.get("delay_us", 0), "delay_us", 0, MAX_DELAY_US, integer=True)
            jitter = bounded_input.number(d.get("jitter_us", 0), "jitter_us", 0, MAX_DELAY_US, integer=True)
            loss = bounded_input.number(d.get("loss_pct", 0.0), "loss_pct", 0, 100)
        except ValueError as e:
            raise TcError(f"bad link to {dest}: {e}") from None
        return cls(dest=str(d.get("dest", ip)), ip=ip, port=port, rate_bps=rate,
                   delay_us=delay, jitter_us=jitter, loss_pct=loss)

    def to_dict(self) -> dict:
        return {"dest": self.dest, "ip": self.ip, "port": self.port, "rate_bps": self.rate_bps,
                "delay_us": self.delay_us, "jitter_us": self.jitter_us, "loss_pct": self.loss_pct}


def burst_bytes(rate_bps: int) -> int:
    """HTB burst: about 1 ms of traffic, at least two full frames.

    A fixed burst (EdgeTB used 15k) lets low rates overshoot at the start and starves
    high rates between timer ticks; one millisecond keeps both within ~1%.
    """
    return max(2 * MTU_FRAME, rate_bps // 8 // 1000)


def _quantum(rate_bps: int) -> int:
    # HTB warns and misbehaves when rate/r2q leaves [MTU, 200000]; set it ourselves.
    return min(max(rate_bps // 8 // 10, MTU_FRAME + 86), 200_000)


def _class_line(verb: str, dev: str, minor: int, rate_bps: int) -> str:
    b = burst_bytes(rate_bps)
    return (f"class {verb} dev {dev} parent {ROOT_HANDLE} classid 1:{minor:x} htb "
            f"rate {rate_bps}bit ceil {rate_bps}bit burst {b} cburst {b} quantum {_quantum(rate_bps)}")


def _netem_line(verb: str, dev: str, minor: int, link: Link) -> str:
    parts = [f"qdisc {verb} dev {dev} parent 1:{minor:x} handle {minor:x}: netem"]
    if link.delay_us or link.jitter_us:
        parts.append(f"delay {link.delay_us}us")
        if link.jitter_us:
            parts.append(f"{link.jitter_us}us")
    if link.loss_pct:
        parts.append(f"loss {link.loss_pct}%")
    return " ".join(parts)


def _segment_line(dev: str, minor: int) -> str:
    return (f"qdisc add dev {dev} parent 1:{minor:x} handle {minor:x}: tbf rate {UNSHAPED_RATE} "
            f"burst {2 * MTU_FRAME} limit {SEGMENT_LIMIT_BYTES}")


def _leaf_line(dev: str, minor: int, link: Link) -> str:
    return _netem_line("add", dev, minor, link) if link.needs_netem else _segment_line(dev, minor)


def _del_leaf_line(dev: str, minor: int) -> str:
    return f"qdisc del dev {dev} parent 1:{minor:x} handle {minor:x}:"


def _filter_line(dev: str, minor: int, link: Link) -> str:
    # u32 at IP header + 20 for the port assumes no IP options, as every tc tutorial does.
    return (f"filter add dev {dev} parent {ROOT_HANDLE} protocol ip prio 1 u32 "
            f"match ip dst {link.ip}/32 match ip dport {link.port} 0xffff flowid 1:{minor:x}")


def _answer_line(dev: str, minor: int, ip: str, own_port: int) -> str:
    return (f"filter add dev {dev} parent {ROOT_HANDLE} protocol ip prio 1 u32 "
            f"match ip dst {ip}/32 match ip sport {own_port} 0xffff flowid 1:{minor:x}")


def _filter_lines(table: "LinkTable", minor: int, link: Link) -> list[str]:
    """A new link's filters: to dest's port, and (once per dest ip, when the table knows
    its node's own port) this node's answers to dest's ip."""
    lines = [_filter_line(table.dev, minor, link)]
    if table.own_port is not None and link.ip not in table.answers:
        table.answers[link.ip] = minor
        lines.append(_answer_line(table.dev, minor, link.ip, table.own_port))
    return lines


@dataclass
class LinkTable:
    """What is installed on one device: destination -> (class minor, link)."""
    dev: str
    netns: str | None
    own_port: int | None = None     # the node's app port: its answers are shaped too (None: not)
    minors: dict[tuple[str, int], int] = field(default_factory=dict)
    links: dict[tuple[str, int], Link] = field(default_factory=dict)
    down: set[tuple[str, int]] = field(default_factory=set)   # links taken down (set_down)
    answers: dict[str, int] = field(default_factory=dict)     # dest ip -> minor of its answers' filter

    def __post_init__(self):
        if self.own_port is not None:
            self.own_port = bounded_input.number(self.own_port, "own port", 1, 65535, integer=True)

    def key_of(self, dest: str) -> tuple[str, int] | None:
        """The installed link whose dest (node name) is dest, or None."""
        return next((k for k, l in self.links.items() if l.dest == dest), None)

    def next_minor(self) -> int:
        return max(self.minors.values(), default=FIRST_LINK_MINOR - 1) + 1


def install_lines(table: LinkTable, links: list[Link]) -> list[str]:
    """The tc batch that builds the whole tree on a device with no root qdisc yet."""
    dev = table.dev
    lines = [f"qdisc add dev {dev} root handle {ROOT_HANDLE} htb default {DEFAULT_MINOR:x}",
             f"class add dev {dev} parent {ROOT_HANDLE} classid 1:{DEFAULT_MINOR:x} htb "
             f"rate {UNSHAPED_RATE} ceil {UNSHAPED_RATE} quantum 200000"]
    table.minors.clear()
    table.links.clear()
    table.down.clear()
    table.answers.clear()
    for link in links:
        if link.key in table.minors:
            raise TcError(f"two links from one node to {link.dest} ({link.ip}:{link.port})")
        minor = table.next_minor()
        table.minors[link.key] = minor
        table.links[link.key] = link
        lines.append(_class_line("add", dev, minor, link.rate_bps))
        lines.append(_leaf_line(dev, minor, link))
        lines.extend(_filter_lines(table, minor, link))
    return lines


def change_lines(table: LinkTable, links: list[Link]) -> list[str]:
    """The tc batch that turns the installed table into `links` in place.

    Changed rates become `class change` (no qdisc rebuilt, no packet dropped); new
    destinations get a class, a leaf and their filters; a destination no longer listed
    keeps its filters but loses its leaf and its class goes back to unshaped, which is
    what "no link" means (for its answers too). A leaf changes kind (segmenting tbf <->
    netem) by del + add, as the kernel cannot replace a qdisc by one of another kind under
    the same handle.
    """
    dev = table.dev
    lines: list[str] = []
    wanted = {}
    for link in links:
        if link.key in wanted:
            raise TcError(f"two links from one node to {link.dest} ({link.ip}:{link.port})")
        wanted[link.key] = link
    for key, link in wanted.items():
        old = table.links.get(key)
        if key in table.minors:
            minor = table.minors[key]
            if old is None or old.rate_bps != link.rate_bps:
                lines.append(_class_line("change", dev, minor, link.rate_bps))
            if key in table.down:                # its drop leaf stays; up puts this link's leaf
                pass
            elif old is None:                    # unshaped since a change: no leaf
                lines.append(_leaf_line(dev, minor, link))
            elif old.needs_netem and link.needs_netem:
                if (old.delay_us, old.jitter_us, old.loss_pct) != (link.delay_us, link.jitter_us, link.loss_pct):
                    lines.append(_netem_line("change", dev, minor, link))
            elif old.needs_netem != link.needs_netem:
                lines.append(_del_leaf_line(dev, minor))
                lines.append(_leaf_line(dev, minor, link))
        else:
            minor = table.next_minor()
            table.minors[key] = minor
            lines.append(_class_line("add", dev, minor, link.rate_bps))
            lines.append(_leaf_line(dev, minor, link))
            lines.extend(_filter_lines(table, minor, link))
        table.links[key] = link
    for key in list(table.links):
        if key not in wanted:
            table.links.pop(key)
            table.down.discard(key)              # no link, nothing to be down
            minor = table.minors[key]
            lines.append(_del_leaf_line(dev, minor))
            lines.append(f"class change dev {dev} parent {ROOT_HANDLE} classid 1:{minor:x} htb "
                         f"rate {UNSHAPED_RATE} ceil {UNSHAPED_RATE} quantum 200000")
    return lines


def _drop_line(dev: str, minor: int) -> str:
    return f"qdisc add dev {dev} parent 1:{minor:x} handle {minor:x}: pfifo limit 0"


def down_lines(table: LinkTable, dest: str, down: bool) -> list[str]:
    """The batch that takes the link to dest (a node name) down (its leaf becomes a
    pfifo of limit 0) or up again (the leaf of the link as it is now); nothing when it is
    so already. TcError when the table has no link to dest."""
    key = table.key_of(dest)
    if key is None:
        raise TcError(f"no link to {dest[:64]} on {table.netns or 'host'}/{table.dev}")
    if (key in table.down) == down:
        return []
    minor = table.minors[key]
    lines = [_del_leaf_line(table.dev, minor),
             _drop_line(table.dev, minor) if down else _leaf_line(table.dev, minor, table.links[key])]
    if down:
        table.down.add(key)
    else:
        table.down.discard(key)
    return lines


def set_down(table: LinkTable, dest: str, down: bool) -> bool:
    """Take the link to dest down or up; -> whether anything changed. On failure the
    table's record is put back as it was."""
    was = set(table.down)
    lines = down_lines(table, dest, down)
    if lines and not down:
        _refuse_netem_if_missing([table.links[table.key_of(dest)]])
    try:
        run_batch(table.netns, lines)
    except Exception:
        table.down = was
        raise
    return bool(lines)


def class_bytes(netns: str | None, dev: str) -> dict[int, int]:
    """Bytes sent so far by each HTB class on dev, by class minor (netlink stats)."""
    return {minor: b for minor, (b, _) in class_stats(netns, dev).items()}


def class_stats(netns: str | None, dev: str) -> dict[int, tuple[int, int]]:
    """(bytes, packets) sent so far by each HTB class on dev, by class minor, in one
    netlink dump (gnet_stats_basic: bytes u64, packets u32, which wraps at 2^32)."""
    import os
    import struct

    fd, idx = _netlink_fd_in(netns, dev)
    try:
        if not idx:
            raise TcError(f"no device {dev} in {netns or 'host'}")
        out = {}
        for handle, at, buf in _dump(fd, _RTM_GETTCLASS, idx, 0):
            if _TCA_STATS2 in at:
                st = _attrs(buf, *at[_TCA_STATS2])
                if _TCA_STATS_BASIC in st:
                    out[handle & 0xFFFF] = struct.unpack_from("QI", buf, st[_TCA_STATS_BASIC][0])
    finally:
        os.close(fd)
    return out


def run_batch(netns: str | None, lines: list[str]) -> None:
    """Feed lines to one `tc -batch -` process, in `netns` (None: this namespace)."""
    if not lines:
        return
    argv = ["tc"] + (["-n", netns] if netns else []) + ["-batch", "-"]
    p = subprocess.run(argv, input="\n".join(lines) + "\n", capture_output=True, text=True)
    if p.returncode != 0:
        err = p.stderr.strip().replace("\n", "; ")
        if "netem" in err.lower() or "Unknown qdisc \"netem\"" in err:
            raise TcError(f"netem not available: this kernel lacks sch_netem ({err})")
        raise TcError(f"tc in {netns or 'host'} failed: {err}")


def install(table: LinkTable, links: list[Link]) -> None:
    _refuse_netem_if_missing(links)
    run_batch(table.netns, install_lines(table, links))


def change(table: LinkTable, links: list[Link]) -> None:
    _refuse_netem_if_missing(links)
    run_batch(table.netns, change_lines(table, links))


_CLONE_NEWNET = 0x40000000


def _netlink_fd_in(netns: str | None, dev: str | None = None) -> tuple[int, int | None]:
    """A NETLINK_ROUTE socket opened inside the named namespace (None: this one), without
    forking, and the index of `dev` there (None if it has no such device).

    pyroute2's `IPRoute(netns=...)` forks a child to enter the namespace; forked from the
    agent (a process with many threads) that child can deadlock on a lock another thread
    held at fork time. setns(2) moves only the calling thread, so a short-lived thread
    joins the namespace, opens the socket (which stays in that namespace) and ends.
    """
    import ctypes
    import os
    import socket

    def open_here(out: dict) -> None:
        out["fd"] = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, socket.NETLINK_ROUTE).detach()
        if dev is not None:
            try:
                out["index"] = socket.if_nametoindex(dev)
            except OSError:
                out["index"] = None

    out: dict = {}
    if netns is None:
        open_here(out)
        return out["fd"], out.get("index")

    def run() -> None:
        try:
            fd = os.open(f"/run/netns/{netns}", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            out["err"] = TcError(f"no namespace {netns}: {e.strerror}")
            return
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.setns(fd, _CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                out["err"] = TcError(f"cannot enter namespace {netns}: {os.strerror(err)}")
                return
            open_here(out)
        except Exception as e:  # noqa: BLE001 - handed to the caller
            out["err"] = e
        finally:
            os.close(fd)

    t = threading.Thread(target=run, name=f"netns:{netns}", daemon=True)
    t.start()
    t.join()
    if "err" in out:
        if "fd" in out:
            os.close(out["fd"])
        raise out["err"]
    return out["fd"], out.get("index")


def _ipr(netns: str | None):
    from pyroute2 import IPRoute

    return IPRoute(fileno=_netlink_fd_in(netns)[0]) if netns else IPRoute()


def clear(netns: str | None, dev: str) -> None:
    """Remove the root qdisc (and so every class and filter); fine if there is none."""
    from pyroute2.netlink.exceptions import NetlinkError

    with _ipr(netns) as ipr:
        idx = ipr.link_lookup(ifname=dev)
        if not idx:
            return
        try:
            ipr.tc("del", index=idx[0], root=True)
        except NetlinkError as e:
            if e.code not in (2, 22):  # ENOENT/EINVAL: nothing there to delete
                raise


# Read-back speaks rtnetlink itself: pyroute2 decodes every attribute of every message
# (stats included) in Python, ~3 ms per link, which made the read-back of a 100-node full
# mesh cost more than installing it. Here a dump is parsed only as far as needed.
_RTM_GETTCLASS, _RTM_GETTFILTER = 42, 46
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_NLM_F_REQUEST, _NLM_F_DUMP = 0x1, 0x300
_TCA_KIND, _TCA_OPTIONS = 1, 2
_TCA_STATS2, _TCA_STATS_BASIC = 7, 1        # struct gnet_stats_basic: u64 bytes, u32 packets
_TCA_HTB_PARMS, _TCA_HTB_RATE64 = 1, 6
_TCA_U32_CLASSID, _TCA_U32_SEL = 1, 5
_SPORT_KEY = (b"\xff\xff\x00\x00", 20)   # u32 key `match ip sport P`: mask (network order), offset


def _attrs(buf: bytes, start: int, end: int) -> dict[int, tuple[int, int]]:
    """rtattr type -> (payload start, payload end) in buf[start:end]."""
    import struct

    out = {}
    while start + 4 <= end:
        length, kind = struct.unpack_from("HH", buf, start)
        if length < 4:
            break
        out[kind & 0x3FFF] = (start + 4, start + length)
        start += (length + 3) & ~3
    return out


def _dump(fd: int, msg_type: int, ifindex: int, parent: int) -> list[tuple[int, dict, bytes]]:
    """One RTM_GET* dump for a device: [(tcm_handle, attrs, buffer)]."""
    import os
    import socket
    import struct

    sock = socket.socket(fileno=os.dup(fd))
    try:
        seq = 1
        req = struct.pack("IHHII", 16 + 20, msg_type, _NLM_F_REQUEST | _NLM_F_DUMP, seq, 0) + \
            struct.pack("BxxxiIII", socket.AF_UNSPEC, ifindex, 0, parent, 0)
        sock.sendto(req, (0, 0))
        out = []
        while True:
            buf = sock.recv(1 << 20)
            pos = 0
            while pos + 16 <= len(buf):
                length, kind, _flags, mseq, _pid = struct.unpack_from("IHHII", buf, pos)
                if length < 16:
                    raise TcError("malformed netlink answer")
                if mseq == seq:
                    if kind == _NLMSG_DONE:
                        return out
                    if kind == _NLMSG_ERROR:
                        (err,) = struct.unpack_from("i", buf, pos + 16)
                        if err:
                            raise TcError(f"netlink dump failed: {os.strerror(-err)}")
                        return out
                    _fam, tcm_ifindex, handle, _parent, _info = struct.unpack_from("BxxxiIII", buf, pos + 16)
                    if tcm_ifindex == ifindex:
                        out.append((handle, _attrs(buf, pos + 36, pos + length), buf))
                pos += (length + 3) & ~3
    finally:
        sock.close()


def _is_answer_filter(buf: bytes, opts: dict) -> bool:
    """Whether a u32 filter matches a source port (an answers' filter): a key of its
    struct tc_u32_sel (16 bytes, then keys of mask, val (be32), off, offmask) at the
    source port's offset and mask."""
    import struct

    if _TCA_U32_SEL not in opts:
        return False
    start, end = opts[_TCA_U32_SEL]
    nkeys = buf[start + 2]
    for i in range(nkeys):
        at = start + 16 + 16 * i
        if at + 16 > end:
            break
        if (buf[at:at + 4], struct.unpack_from("i", buf, at + 8)[0]) == _SPORT_KEY:
            return True
    return False


def read_back(netns: str | None, dev: str) -> dict:
    """Count what the kernel holds on dev, via netlink: shaped classes, u32 filters to a
    destination's port ("filters": one per link) and from the node's own port
    ("answer_filters": one per linked ip, when the table has its own port)."""
    import os
    import struct

    fd, idx = _netlink_fd_in(netns, dev)
    try:
        if not idx:
            raise TcError(f"no device {dev} in {netns or 'host'}")
        rates = {}
        n_classes = 0
        for handle, at, buf in _dump(fd, _RTM_GETTCLASS, idx, 0):
            if _TCA_KIND not in at or buf[at[_TCA_KIND][0]:at[_TCA_KIND][1]].rstrip(b"\0") != b"htb":
                continue
            n_classes += 1
            rate = 0
            if _TCA_OPTIONS in at:
                opts = _attrs(buf, *at[_TCA_OPTIONS])
                if _TCA_HTB_RATE64 in opts:
                    (rate,) = struct.unpack_from("Q", buf, opts[_TCA_HTB_RATE64][0])
                elif _TCA_HTB_PARMS in opts:
                    # struct tc_htb_opt starts with tc_ratespec rate: its u32 rate at +8
                    (rate,) = struct.unpack_from("I", buf, opts[_TCA_HTB_PARMS][0] + 8)
            rates[handle & 0xFFFF] = rate * 8
        n_filters = n_answers = 0
        for _handle, at, buf in _dump(fd, _RTM_GETTFILTER, idx, 0x10000):
            if _TCA_KIND not in at or buf[at[_TCA_KIND][0]:at[_TCA_KIND][1]].rstrip(b"\0") != b"u32":
                continue
            opts = _attrs(buf, *at[_TCA_OPTIONS]) if _TCA_OPTIONS in at else {}
            if _TCA_U32_CLASSID in opts:
                if _is_answer_filter(buf, opts):
                    n_answers += 1
                else:
                    n_filters += 1
    finally:
        os.close(fd)
    return {"classes": n_classes, "filters": n_filters, "answer_filters": n_answers, "rates_bps": rates}


def verify(table: LinkTable) -> int:
    """Check that the kernel holds one class and one filter per link, plus one answers'
    filter per linked ip when the table has its own port; return the link count."""
    got = read_back(table.netns, table.dev)
    n, m = len(table.minors), len(table.answers)
    if got["classes"] < n + 1 or got["filters"] < n or got["answer_filters"] < m:
        raise TcError(f"{table.netns or 'host'}/{table.dev}: expected {n} links and {m} answers' filters, "
                      f"kernel has {got['classes'] - 1} classes, {got['filters']} filters and "
                      f"{got['answer_filters']} answers' filters")
    return len(table.links)


_netem_lock = threading.Lock()
_netem_ok: bool | None = None


def netem_available() -> bool:
    """Try a netem qdisc in a throwaway namespace once; the answer is cached."""
    global _netem_ok
    with _netem_lock:
        if _netem_ok is None:
            import uuid
            ns = "etb-probe-" + uuid.uuid4().hex[:8]
            subprocess.run(["ip", "netns", "add", ns], check=True, capture_output=True)
            try:
                p = subprocess.run(["tc", "-n", ns, "qdisc", "add", "dev", "lo", "root", "netem",
                                    "delay", "1ms"], capture_output=True)
                _netem_ok = p.returncode == 0
            finally:
                subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        return _netem_ok


def _refuse_netem_if_missing(links: list[Link]) -> None:
    asking = [l for l in links if l.needs_netem]
    if asking and not netem_available():
        raise TcError(f"netem not available: this kernel lacks sch_netem, so the delay/jitter/"
                      f"loss asked for the link to {asking[0].dest} cannot be applied")
