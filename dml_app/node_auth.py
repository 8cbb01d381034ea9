"""The node's side of the testbed's credentials: the header and environment variables that
carry them, and the check every server of a node (and every agent) puts in front of its
routes (require_token). The admin-side derivations of these credentials from the admin
token are testbed_core/credentials.py's; a node only compares what it was given.
"""
from __future__ import annotations

import hashlib
import hmac
import os
from typing import Iterable

TOKEN_HEADER = "X-Testbed-Token"
TOKEN_ENV = "EDGE_TB_TOKEN"              # a node's own credential; an agent's admin token
PEER_TOKEN_ENV = "EDGE_TB_PEER_TOKEN"    # what the nodes of one testbed show each other
SERVICE_KEY_ENV = "EDGE_TB_SERVICE_KEY"  # a node's key for checking its clients' credentials


def token_from_env() -> str:
    tok = os.environ.get(TOKEN_ENV, "")
    if not tok:
        raise RuntimeError(f"{TOKEN_ENV} is not set: the testbed token is required")
    return tok


def mac(key: str, label: str) -> str:
    """The testbed's keyed digest of `label` (HMAC-SHA256, 40 hex digits): what every
    credential ends with."""
    return hmac.new(key.encode(), label.encode(), hashlib.sha256).hexdigest()[:40]


def token_client(key: str, given: str | None) -> str | None:
    """The node a client credential speaks for, checked with the server's service key;
    None when it is not a valid one."""
    if not key or not given or not given.startswith("svc.") or len(given) > 200:
        return None
    name = given[4:].rpartition(".")[0]
    if not name:
        return None
    want = f"svc.{name}.{mac(key, 'client:' + name)}"
    return name if same_token(given, want) else None


def same_token(given: str | None, want: str | None) -> bool:
    """Constant-time comparison; an empty credential never matches."""
    return bool(given) and bool(want) and hmac.compare_digest(given.encode(), want.encode())


def require_token(app, token: str, *, peer_token: str | None = None,
                  owner_only: Iterable[str] = (), client_key: str | None = None,
                  client_routes: Iterable[str] | None = None) -> None:
    """Answer 401 to any request without a credential this server knows, before any
    handler runs.

    `token` opens every route (an agent's admin token; a node's own credential, which
    the controller holds too). `peer_token` (nodes: what the testbed's other nodes show)
    opens every route except the `owner_only` ones and the client routes. A client
    credential (testbed_core.credentials.client_token, checked with `client_key`) opens
    only the paths in `client_routes` (a set the caller may fill later), and
    `flask.g.client` is then the node it speaks for (None for the others). The controller
    has its own, finer check (controller/access.py).
    """
    from flask import g, request

    owner_only = frozenset(owner_only)
    clients = client_routes if client_routes is not None else set()

    @app.before_request
    def _check_token():
        g.client = None
        given = request.headers.get(TOKEN_HEADER, "")
        if same_token(given, token):
            return None
        if request.path in clients and client_key:
            node = token_client(client_key, given)
            if node is not None:
                g.client = node
                return None
        if peer_token and same_token(given, peer_token):
            if request.path in owner_only:
                return (f"{request.path} takes the controller's credential, not a peer's\n", 403)
            if request.path in clients:
                return (f"{request.path} takes a worker credential of this node's clients (the "
                        f"api_key its invoker passed), not the testbed's peer credential\n", 403)
            return None
        return ("missing or wrong testbed token (header " + TOKEN_HEADER + ")\n", 401)
