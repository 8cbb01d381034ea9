"""Real node and controller processes over HTTP on 127.0.0.1: runtime, roles, servers, exact runs; no root."""
