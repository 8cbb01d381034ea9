"""The one HTTP helper of the testbed: client calls, the token check, the WSGI server
and the safetensors wire format for model weights.

It is used by the controller, the agents and every node app, so it lives in dml_app/
(the only folder a node sees) and imports nothing else from the project.
"""
from __future__ import annotations

import hmac
import ipaddress
import json as jsonlib
import os
import threading
import time
from typing import Any, Iterable, Mapping

import requests

TOKEN_HEADER = "X-Testbed-Token"
TOKEN_ENV = "EDGE_TB_TOKEN"

_session_local = threading.local()


class HttpError(RuntimeError):
    """A call that did not get a 2xx answer; `status` is None when nothing answered."""

    def __init__(self, method: str, url: str, status: int | None, message: str):
        self.method, self.url, self.status, self.message = method, url, status, message
        where = f"{method} {url}"
        super().__init__(f"{where}: HTTP {status}: {message}" if status else f"{where}: {message}")


def _session() -> requests.Session:
    s = getattr(_session_local, "s", None)
    if s is None:
        s = requests.Session()
        s.trust_env = False  # testbed addresses never go through a user's proxy
        _session_local.s = s
    return s


def call(method: str, url: str, *, token: str | None = None, json: Any = None,
         data: bytes | str | None = None, params: Mapping[str, Any] | None = None,
         headers: Mapping[str, str] | None = None, timeout_s: float = 30.0,
         retries: int = 0) -> requests.Response:
    """One HTTP call; raises HttpError on a connection failure or a non-2xx answer.

    `retries` repeats only connection failures (the peer not listening yet), never an
    answered request, so a POST is not applied twice; waits grow from 0.1 s to 1 s.
    """
    if not url.startswith("http://") and not url.startswith("https://"):
        url = "http://" + url
    hdrs = dict(headers or {})
    if token:
        hdrs[TOKEN_HEADER] = token
    last: Exception | None = None
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(min(0.1 * 2 ** (attempt - 1), 1.0))
        try:
            r = _session().request(method, url, json=json, data=data, params=params,
                                   headers=hdrs, timeout=timeout_s)
        except (requests.ConnectionError, requests.Timeout) as e:
            last = e
            continue
        if r.status_code >= 300:
            raise HttpError(method, url, r.status_code, r.text.strip()[:500])
        return r
    raise HttpError(method, url, None, f"no answer ({type(last).__name__}: {last})")


def get_json(url: str, **kw) -> Any:
    return call("GET", url, **kw).json()


def post_json(url: str, body: Any, **kw) -> Any:
    r = call("POST", url, json=body, **kw)
    return r.json() if r.content and r.headers.get("content-type", "").startswith("application/json") else r.text


# ----------------------------------------------------------------------------- server side

def token_from_env() -> str:
    tok = os.environ.get(TOKEN_ENV, "")
    if not tok:
        raise RuntimeError(f"{TOKEN_ENV} is not set: the testbed token is required")
    return tok


def _is_loopback(addr: str | None) -> bool:
    try:
        return addr is not None and ipaddress.ip_address(addr).is_loopback
    except ValueError:
        return False


def require_token(app, token: str, *, trust_loopback: bool = False,
                  exempt: Iterable[str] = ()) -> None:
    """Answer 401 to any request without the testbed token, before any handler runs.

    `trust_loopback` lets the controller keep EdgeTB's plain `curl localhost:3333/...`
    workflow: requests from this machine's loopback need no token, all others do.
    """
    from flask import request

    exempt = set(exempt)

    @app.before_request
    def _check_token():
        if request.path in exempt:
            return None
        if trust_loopback and _is_loopback(request.remote_addr):
            return None
        given = request.headers.get(TOKEN_HEADER, "")
        if not given or not hmac.compare_digest(given.encode(), token.encode()):
            return ("missing or wrong testbed token (header " + TOKEN_HEADER + ")\n", 401)
        return None


class Server:
    """A waitress WSGI server on its own thread; `close()` stops it."""

    def __init__(self, app, host: str, port: int, *, threads: int = 8):
        from waitress.server import create_server

        self._srv = create_server(app, host=host, port=port, threads=threads,
                                  ident="edgetb", clear_untrusted_proxy_headers=True,
                                  max_request_body_size=1 << 30)
        self.port = self._srv.effective_port
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"http:{port}")

    def _run(self):
        try:
            self._srv.run()
        except OSError:
            pass  # closed from close()

    def start(self) -> "Server":
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self._run()

    def close(self) -> None:
        # Let handler threads finish before the socket and trigger go, or waitress
        # raises EBADF in threads still answering.
        self._srv.task_dispatcher.shutdown(cancel_pending=True, timeout=5)
        self._srv.close()
        # Open keep-alive connections outlive the listening socket: a client's pooled
        # connection would hand its next request (even one meant for a new server on this
        # port) to the stopped dispatcher, and it would hang. Close them; the loop ends.
        from waitress import wasyncore

        wasyncore.close_all(self._srv._map, ignore_all=True)
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(5)   # its loop ends within a poll timeout; then the port is free


def serve(app, host: str, port: int, *, threads: int = 8) -> Server:
    return Server(app, host, port, threads=threads).start()


# ----------------------------------------------------------------------------- weights

def pack_weights(tensors: Mapping[str, Any], meta: Mapping[str, Any] | None = None) -> bytes:
    """State dict (+ JSON-able metadata) -> safetensors bytes."""
    import torch
    from safetensors.torch import save

    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()
            if isinstance(v, torch.Tensor)}
    return save(flat, metadata={"edgetb": jsonlib.dumps(dict(meta or {}))})


def unpack_weights(body: bytes) -> tuple[dict, dict]:
    """safetensors bytes -> (tensors, metadata); ValueError for anything else."""
    from safetensors import safe_open  # noqa: F401  (imported for its error type below)
    from safetensors.torch import load

    if not body or len(body) < 8:
        raise ValueError("body is not safetensors (empty or shorter than its header)")
    header_len = int.from_bytes(body[:8], "little")
    if header_len <= 0 or 8 + header_len > len(body):
        raise ValueError("body is not safetensors (bad header length)")
    try:
        header = jsonlib.loads(body[8:8 + header_len])
        tensors = load(bytes(body))
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"body is not safetensors ({type(e).__name__}: {e})") from None
    meta_raw = (header.get("__metadata__") or {}).get("edgetb", "{}")
    try:
        meta = jsonlib.loads(meta_raw)
    except ValueError:
        meta = {}
    return tensors, meta if isinstance(meta, dict) else {}
