"""Units of links.json, as tc(8) reads them: the agent's names for dml_app/formats.py's
parsers (one implementation, shared with the controller, dml_tool and the nodes).

Bandwidth: `bit kbit mbit gbit tbit` are bits per second; `bps kbps mbps gbps tbps` are
BYTES per second (EdgeTB passed "5mbps" straight to tc, so it meant 5 MB/s). SI
prefixes (k = 1000), as tc. Anything else is refused.
"""
from __future__ import annotations

from dml_app.formats import (MAX_RATE_BPS, MAX_TIME_US, MIN_RATE_BPS, UnitError, format_rate,  # noqa: F401
                             ipv4, parse_loss_pct, parse_rate, parse_time_us)
