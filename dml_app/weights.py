"""Model weights on the wire: a state dict and JSON metadata as safetensors bytes."""
from __future__ import annotations

import json as jsonlib
from typing import Any, Mapping

from dml_app.bounded_input import parse_json_body

def pack_weights(tensors: Mapping[str, Any], meta: Mapping[str, Any] | None = None) -> bytes:
    """State dict (+ JSON-able metadata) -> safetensors bytes."""
    import torch
    from safetensors.torch import save

    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()
            if isinstance(v, torch.Tensor)}
    return save(flat, metadata={"edgetb": jsonlib.dumps(dict(meta or {}))})


def unpack_weights(body: bytes) -> tuple[dict, dict]:
    """safetensors bytes -> (tensors, metadata); ValueError for anything else, BodyError
    for metadata that is not a bounded JSON object (parse_json_body)."""
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
    return tensors, parse_json_body(meta_raw, what="weights metadata")
