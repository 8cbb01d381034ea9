"""Bounded input: body limits per route, JSON no deeper than MAX_JSON_DEPTH with finite
numbers only, and one checker for every number that comes from outside (`number`).
"""
from __future__ import annotations

import json as jsonlib
import math
from typing import Any, Callable, Mapping

# Every server of the testbed (controller, agents, nodes) bounds what it takes: a body
# limit per route (413, before the handler runs and before the body is read into memory),
# JSON no deeper than MAX_JSON_DEPTH with only finite numbers (400), and one checker for
# every number that comes from outside (`number`, ValueError naming the field).

KiB, MiB = 1 << 10, 1 << 20
JSON_LIMIT = 1 * MiB                # JSON control routes: confs, heartbeats, agent commands
DEFAULT_WEIGHTS_LIMIT = 64 * MiB    # weights routes of a role that declared no model
WEIGHTS_SLACK = 1 * MiB             # safetensors header and metadata on top of 2 x the model
MAX_JSON_DEPTH = 32                 # the testbed's own documents nest 5 deep at most
MAX_JSON_INT = 1 << 63              # no count, id or size of the testbed comes near this


class BodyError(ValueError):
    """A request body (or weights metadata) refused: invalid or too deep JSON, a number
    that is not finite, not the object a route needs. HTTP 400 with the message."""


def human_bytes(n: int) -> str:
    """1048576 -> '1 MiB', 1572864 -> '1.5 MiB', 900 -> '900 bytes'."""
    for unit, size in (("GiB", 1 << 30), ("MiB", MiB), ("KiB", KiB)):
        if n >= size:
            return f"{n / size:.1f}".rstrip("0").rstrip(".") + f" {unit}"
    return f"{n} bytes"


def show_value(value: Any) -> str:
    """A value as the JSON a user wrote (true, NaN, "4"), cut to 40 characters."""
    try:
        text = jsonlib.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


def number(value: Any, name: str, lo: float | None = None, hi: float | None = None, *,
           integer: bool = False, lo_open: bool = False, hi_open: bool = False) -> int | float:
    """`value` as a finite int (integer=True) or float within [lo, hi]; ValueError naming
    `name` for anything else: bools, strings (even "4"), None, NaN, +-Infinity, 1e309,
    fractions where an integer is needed, values out of range. `lo_open`/`hi_open` make
    a bound exclusive. A float with an integral value (2.0) is taken as an integer."""
    kind = "an integer" if integer else "a number"
    if lo is not None and hi is not None:
        rng = f" in {'(' if lo_open else '['}{_fmt(lo)}, {_fmt(hi)}{')' if hi_open else ']'}"
    elif lo is not None:
        rng = f" {'>' if lo_open else '>='} {_fmt(lo)}"
    elif hi is not None:
        rng = f" {'<' if hi_open else '<='} {_fmt(hi)}"
    else:
        rng = ""
    bad = ValueError(f"{name} must be {kind}{rng}, got {show_value(value)}")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad
    if isinstance(value, float):
        if not math.isfinite(value) or (integer and not value.is_integer()):
            raise bad
        if integer:
            value = int(value)
    elif abs(value) >= MAX_JSON_INT:
        raise bad
    if lo is not None and (value < lo or (lo_open and value == lo)):
        raise bad
    if hi is not None and (value > hi or (hi_open and value == hi)):
        raise bad
    return int(value) if integer else float(value)


def _check_tree(obj: Any, max_depth: int, what: str) -> None:
    """Depth and numbers of a parsed JSON document, iteratively (no recursion)."""
    stack = [(obj, 1, "")]
    while stack:
        cur, depth, path = stack.pop()
        if isinstance(cur, (dict, list)):
            if depth > max_depth:
                raise BodyError(f"{what}: JSON nested more than {max_depth} levels deep")
            items = cur.items() if isinstance(cur, dict) else enumerate(cur)
            for k, v in items:
                if isinstance(v, (dict, list, float)) or (isinstance(v, int) and not isinstance(v, bool)):
                    sub = f"{path}.{k}" if isinstance(cur, dict) else f"{path}[{k}]"
                    stack.append((v, depth + 1, sub.lstrip(".")))
        elif isinstance(cur, float) and not math.isfinite(cur):
            raise BodyError(f"{what}: {path or 'value'}: {show_value(cur)} is not a finite number "
                            "(NaN, Infinity and numbers beyond 1e308 are refused)")
        elif isinstance(cur, int) and not isinstance(cur, bool) and abs(cur) >= MAX_JSON_INT:
            raise BodyError(f"{what}: {path or 'value'}: integer out of range (|n| < 2**63)")


def parse_json_body(raw: bytes | str, *, max_depth: int = MAX_JSON_DEPTH, want_object: bool = True,
                    what: str = "body") -> Any:
    """Parse a JSON request body; BodyError (a ValueError, HTTP 400) when it is not valid
    JSON, nests deeper than `max_depth` (checked iteratively; the parser's own
    RecursionError is caught too), holds NaN, +-Infinity, 1e309 or an integer beyond
    2**63, or is not an object where `want_object`. `what` starts every message."""
    if isinstance(raw, (bytes, bytearray)):
        try:
            raw = bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            raise BodyError(f"{what}: not valid JSON (not UTF-8)") from None
    try:
        obj = jsonlib.loads(raw)
    except RecursionError:
        raise BodyError(f"{what}: JSON nested more than {max_depth} levels deep") from None
    except ValueError as e:   # also a number of more than 4300 digits
        raise BodyError(f"{what}: not valid JSON ({e})") from None
    _check_tree(obj, max_depth, what)
    if want_object and not isinstance(obj, dict):
        raise BodyError(f"{what}: expected a JSON object {{...}}, got {type(obj).__name__}")
    return obj


class BodyLimits:
    """The body limit of each route of one app: a number of bytes or a function giving it
    at request time (weights routes follow the model). Routes are Flask rules
    ("/log", "/share/<digest>"); any other route gets `default`."""

    def __init__(self, default: int = JSON_LIMIT):
        self.default = default
        self.routes: dict[str, int | Callable[[], int]] = {}

    def set(self, rule: str, limit: int | Callable[[], int]) -> None:
        self.routes[rule] = limit

    def limit_for(self, rule: str | None) -> int:
        limit = self.routes.get(rule, self.default) if rule is not None else self.default
        return int(limit() if callable(limit) else limit)

    def largest(self) -> int:
        """What the server must take at all (its waitress bound), as the limits are now."""
        return max([self.default] + [self.limit_for(r) for r in self.routes])


def body_limits(app) -> BodyLimits | None:
    return app.extensions.get("edgetb.body_limits")


def limit_bodies(app, *, default: int = JSON_LIMIT,
                 routes: Mapping[str, int | Callable[[], int]] | None = None,
                 json_errors: bool = True) -> BodyLimits:
    """Bound every request body of `app` (call it once, after the credential check is
    installed, so that nobody without one makes the server parse anything):

    * a body over its route's limit is answered 413 with a message naming the limit,
      from Content-Length before the handler runs (waitress gives Content-Length to
      chunked bodies too, and `request.max_content_length` stops any later read);
    * a JSON body (Content-Type application/json) is parsed here by `parse_json_body`:
      400 for invalid JSON, too deep nesting or a number that is not finite; handlers'
      `request.get_json()` then returns that document, and the app's JSON loader is the
      same bounded parser for every other call;
    * answers are {"error": message} (`json_errors`) or plain text.
    The server's own bound (serving.Server) is the largest of these limits.
    """
    from flask import jsonify, request
    from flask.json.provider import DefaultJSONProvider

    limits = BodyLimits(default)
    for rule, limit in (routes or {}).items():
        limits.set(rule, limit)
    app.extensions["edgetb.body_limits"] = limits

    class _BoundedJSON(DefaultJSONProvider):
        def loads(self, s, **kwargs):
            return parse_json_body(s, want_object=False)

    app.json = _BoundedJSON(app)

    def refuse(status: int, message: str):
        if json_errors:
            return jsonify(error=message), status
        return (message + "\n", status, {"Content-Type": "text/plain; charset=utf-8"})

    @app.before_request
    def _bound_body():
        rule = request.url_rule.rule if request.url_rule is not None else None
        limit = limits.limit_for(rule)
        size = request.content_length
        if size is not None and size > limit:
            return refuse(413, f"{request.method} {request.path}: a body of {size} bytes is over this "
                               f"route's limit of {human_bytes(limit)} ({limit} bytes)")
        request.max_content_length = limit
        if request.routing_exception is None and request.is_json and size:
            try:
                doc = parse_json_body(request.get_data(cache=True), want_object=False)
            except BodyError as e:
                return refuse(400, str(e))
            request._cached_json = (doc, doc)   # what get_json() answers from now on
            request.environ["edgetb.json"] = doc
        return None

    return limits


def request_json(*, want_object: bool = True, what: str = "body") -> Any:
    """The current request's body as JSON (whatever its Content-Type), through
    parse_json_body; BodyError (HTTP 400) with the reason. Empty body: BodyError."""
    from flask import request

    if "edgetb.json" in request.environ:      # parsed and checked by limit_bodies already
        doc = request.environ["edgetb.json"]
        if want_object and not isinstance(doc, dict):
            raise BodyError(f"{what}: expected a JSON object {{...}}, got {type(doc).__name__}")
        return doc
    raw = request.get_data(cache=True)
    if not raw:
        raise BodyError(f"{what}: expected a JSON {'object' if want_object else 'document'}, got no body")
    return parse_json_body(raw, want_object=want_object, what=what)
