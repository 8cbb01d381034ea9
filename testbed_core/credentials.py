"""The testbed's credentials as the admin side derives them (controller and agents).

The admin token opens the controller and the agents. Everything a node gets is derived
from it, so the controller and every agent compute the same values and no node
credential is ever stored or sent in a deployment body:
  node_token(admin, n)  the node's own credential: n calls the controller with it (its
                        heartbeat, log, finish) and the controller calls n with it; it
                        speaks for n alone and opens nothing on an agent;
  peer_token(admin)     what the nodes of one testbed show each other (role routes);
  service_key(admin, s) node s's key for the credentials of its clients;
  client_token(admin, s, c)  what node c shows node s's client routes (a serverless
                        worker to its server); s checks it with its key alone
                        (dml_app.node_auth.token_client), so it knows which node calls,
                        and can mint credentials only for its own routes.
Nodes never derive credentials: they get theirs in their environment and compare
(dml_app/node_auth.py).
"""
from __future__ import annotations

from dml_app.node_auth import mac, same_token

__all__ = ["mac", "same_token", "node_token", "peer_token", "service_key", "client_token", "token_node"]


def node_token(admin: str, node: str) -> str:
    return f"node.{node}.{mac(admin, 'node:' + node)}"


def peer_token(admin: str) -> str:
    return f"peer.{mac(admin, 'peer')}"


def service_key(admin: str, node: str) -> str:
    return mac(admin, "service:" + node)


def client_token(admin: str, server: str, client: str) -> str:
    return f"svc.{client}.{mac(service_key(admin, server), 'client:' + client)}"


def token_node(admin: str, given: str | None) -> str | None:
    """The node a node credential speaks for, or None when it is not a valid one."""
    if not given or not given.startswith("node.") or len(given) > 200:
        return None
    name = given[5:].rpartition(".")[0]
    return name if name and same_token(given, node_token(admin, name)) else None
