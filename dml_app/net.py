"""The testbed's HTTP core for node apps, under one name: `from dml_app import net`.

Each concern has its own module, and the testbed's own code imports from those:
  calls.py          client calls: one deadline per exchange, answer caps, retries of
                    what cannot have arrived, Reply and its classification;
  serving.py        the waitress server of every part (Server, serve) and its caps;
  bounded_input.py  body limits per route, bounded JSON, `number`;
  weights.py        safetensors weights on the wire;
  node_auth.py      the credential header and variables, and the node's check.
This module re-exports their public names for node apps and users' own apps.

The derivations of credentials from the admin token (node_token, peer_token, ...) are
not node code: they are testbed_core/credentials.py's, still found here by name for
callers on the admin side that have the whole checkout.
"""
from __future__ import annotations

from dml_app.bounded_input import (DEFAULT_WEIGHTS_LIMIT, JSON_LIMIT, MAX_JSON_DEPTH, MAX_JSON_INT, WEIGHTS_SLACK,
                                   BodyError, BodyLimits, KiB, MiB, body_limits, human_bytes, limit_bodies,
                                   number, parse_json_body, request_json, show_value)
from dml_app.calls import (ANSWER_LIMIT, DEAD, DEADLINE_SLACK_S, ERROR, REFUSED, TIMEOUT, HttpError, Reply,
                           _session, call, get_json, post_json, reply_for)
from dml_app.node_auth import (PEER_TOKEN_ENV, SERVICE_KEY_ENV, TOKEN_ENV, TOKEN_HEADER, require_token, same_token,
                               token_client, token_from_env)
from dml_app.serving import (CONNECTION_LIMIT, PER_PEER_MAX, TRUSTED_IDLE_S, UNTRUSTED_IDLE_S, UNTRUSTED_MAX,
                             Server, raise_open_files_limit, serve, wait_fd)
from dml_app.weights import pack_weights, unpack_weights

__all__ = [
    "DEFAULT_WEIGHTS_LIMIT", "JSON_LIMIT", "MAX_JSON_DEPTH", "MAX_JSON_INT", "WEIGHTS_SLACK", "BodyError",
    "BodyLimits", "KiB", "MiB", "body_limits", "human_bytes", "limit_bodies", "number", "parse_json_body",
    "request_json", "show_value",
    "ANSWER_LIMIT", "DEAD", "DEADLINE_SLACK_S", "ERROR", "REFUSED", "TIMEOUT", "HttpError", "Reply", "_session",
    "call", "get_json", "post_json", "reply_for",
    "PEER_TOKEN_ENV", "SERVICE_KEY_ENV", "TOKEN_ENV", "TOKEN_HEADER", "require_token", "same_token",
    "token_client", "token_from_env",
    "CONNECTION_LIMIT", "PER_PEER_MAX", "TRUSTED_IDLE_S", "UNTRUSTED_IDLE_S", "UNTRUSTED_MAX", "Server",
    "raise_open_files_limit", "serve", "wait_fd",
    "pack_weights", "unpack_weights",
]

_ADMIN_SIDE = frozenset({"node_token", "peer_token", "service_key", "client_token", "token_node"})


def __getattr__(name: str):
    if name in _ADMIN_SIDE:
        from testbed_core import credentials
        return getattr(credentials, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
