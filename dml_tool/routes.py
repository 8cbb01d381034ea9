"""Routes over links.json: how weights travel between two nodes that have no direct link.

A link in links.json is one direction (sender -> dest). The route from A to B is the
direct link when there is one; otherwise the path with the fewest hops, and among
those the widest (the largest bottleneck bandwidth); a remaining tie goes to the
smallest node names, so a route is reproducible. Pure functions; the structure tools
turn a missing route into a ConfError naming links.json and what the node reaches.
"""
from __future__ import annotations

import math
import sys
from typing import Any, Mapping

try:  # imported as dml_tool.routes (the controller's --auto mode)
    from . import conf_utils as cu
except ImportError:  # imported by a tool run as a script
    import conf_utils as cu

if cu.ROOT not in sys.path:
    sys.path.append(cu.ROOT)
from worker.units import UnitError, parse_rate  # noqa: E402  (links.json's units, as tc reads them)

Graph = Mapping[str, Mapping[str, float]]   # {src: {dest: rate_bps}}


def link_rates(raw_links: Any, file: str = "links.json") -> dict[str, dict[str, float]]:
    """links.json -> {src: {dest: bits/s}}; a bad `bw` is a ConfError naming the key.

    Only the rates are read here: conf_utils.load_links checks everything else (names,
    shapes), so malformed entries are passed over."""
    out: dict[str, dict[str, float]] = {}
    for src, links in (raw_links.items() if isinstance(raw_links, dict) else ()):
        out[src] = {}
        for i, link in enumerate(links if isinstance(links, list) else ()):
            if not isinstance(link, dict) or "dest" not in link:
                continue
            try:
                out[src][link["dest"]] = float(parse_rate(link.get("bw")))
            except UnitError as e:
                raise cu.ConfError(f"{file}: {src}[{i}].bw: {e}") from None
    return out


def routes_from(graph: Graph, src: str) -> dict[str, list[str]]:
    """The route from `src` to every node it can reach: {dst: [src, ..., dst]}.

    Breadth first, so every route has the fewest hops; a node's route is chosen among
    its predecessors one hop nearer by (widest bottleneck, then smallest names).
    """
    best: dict[str, tuple[float, list[str]]] = {src: (math.inf, [src])}
    level = [src]
    while level:
        offers: dict[str, tuple[float, list[str]]] = {}
        for u in sorted(level):
            width_u, path_u = best[u]
            for v, rate in graph.get(u, {}).items():
                if v in best:
                    continue
                offer = (min(width_u, rate), path_u + [v])
                cur = offers.get(v)
                if cur is None or offer[0] > cur[0] or (offer[0] == cur[0] and offer[1] < cur[1]):
                    offers[v] = offer
        best.update(offers)
        level = list(offers)
    return {dst: path for dst, (_, path) in best.items() if dst != src}

