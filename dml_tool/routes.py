"""Forwarding over links.json as EdgeTB's E-tree confs have it (the `forward` key).

A link in links.json is one direction (sender -> dest). A node sends straight to every
node it has a link to (its `connect`). For any other node D, `forward[D]` is the next
hop on a shortest path to D over the links that exist in BOTH directions (A -> B and
B -> A), EdgeTB's rule. Among equally short paths the next hop with the smallest name
is taken, so the confs are reproducible. Every hop is nearer to D than the node before
it (a node at k hops from D hands over to one at k - 1, or straight to D over a link
it has), so a message never loops. Pure functions over {src: [dest, ...]} (what
conf_utils.load_links returns); the structure tools turn a missing route into a
ConfError naming links.json.
"""
from __future__ import annotations

from collections import deque
from typing import Iterable, Mapping, Sequence

Links = Mapping[str, Sequence[str]]   # {src: [dest, ...]}, as conf_utils.load_links returns


def both_ways(links: Links) -> dict[str, list[str]]:
    """{node: sorted neighbours} over the links that exist in both directions."""
    adj: dict[str, set[str]] = {}
    for a, dests in links.items():
        for b in dests:
            if a in links.get(b, ()):
                adj.setdefault(a, set()).add(b)
    return {a: sorted(bs) for a, bs in adj.items()}


def hops_to(adj: Mapping[str, Sequence[str]], dst: str) -> dict[str, int]:
    """How many both-way hops every node that reaches `dst` is from it (breadth first)."""
    dist = {dst: 0}
    queue = deque([dst])
    while queue:
        u = queue.popleft()
        for v in adj.get(u, ()):
            if v not in dist:
                dist[v] = dist[u] + 1
                queue.append(v)
    return dist


def next_hops(links: Links, names: Iterable[str]) -> dict[str, dict[str, str]]:
    """{src: {dst: next hop}} for every src in `names` and every other node of `names`
    that src has no link to but reaches over both-way links (EdgeTB's `forward`, by name)."""
    names = list(names)
    adj = both_ways(links)
    table: dict[str, dict[str, str]] = {n: {} for n in names}
    for dst in names:
        dist = hops_to(adj, dst)
        for src in names:
            if src == dst or src not in dist or dst in links.get(src, ()):
                continue
            table[src][dst] = min(v for v in adj[src] if dist.get(v) == dist[src] - 1)
    return table


def path(links: Links, table: Mapping[str, Mapping[str, str]], src: str, dst: str) -> list[str] | None:
    """The nodes a message from `src` to `dst` passes, [src, ..., dst], each node sending
    straight over its own link when it has one, else to its `table` next hop; None when
    some node on the way has neither."""
    out = [src]
    while out[-1] != dst:
        here = out[-1]
        hop = dst if dst in links.get(here, ()) else table.get(here, {}).get(dst)
        if hop is None:
            return None
        out.append(hop)
    return out
