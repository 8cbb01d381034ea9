"""The controller's content-addressed stores, read by agents and nodes: a shared
folder's archive (/share/<sha256>, controller/share.py) and a data bundle
(/data/<sha256>, a serverless worker's data part)."""
from __future__ import annotations

from flask import Blueprint, jsonify

from controller.api.common import run

bp = Blueprint("sharing", __name__)


@bp.route("/share/<digest>", methods=["GET"])
def share_archive(digest):
    # For agents on other machines; token-checked like every route.
    data = run().tb.share_store.get(digest)
    if data is None:
        return jsonify(error=f"no shared archive {digest[:80]!r} on this controller"), 404
    return data, 200, {"Content-Type": "application/x-tar"}


@bp.route("/data/<digest>", methods=["GET"])
def data_bundle(digest):
    # A node credential opens it (access.node_route), any node any bundle.
    data = run().data_store.get(digest)
    if data is None:
        return jsonify(error=f"no data bundle {digest[:80]!r} on this controller"), 404
    return data, 200, {"Content-Type": "application/octet-stream"}
