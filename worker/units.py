"""Units of links.json, as tc(8) reads them. Pure functions: the controller validates
with them before anything is deployed, the agents turn them into qdisc parameters.

Bandwidth: `bit kbit mbit gbit tbit` are bits per second; `bps kbps mbps gbps tbps` are
BYTES per second (EdgeTB passed "5mbps" straight to tc, so it meant 5 MB/s). SI
prefixes (k = 1000), as tc. Anything else is refused.
"""
from __future__ import annotations

import ipaddress
import re

_RATE_UNITS_BPS = {
    "bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12,
    "bps": 8, "kbps": 8 * 10**3, "mbps": 8 * 10**6, "gbps": 8 * 10**9, "tbps": 8 * 10**12,
}
_TIME_UNITS_US = {"us": 1, "usec": 1, "ms": 1000, "msec": 1000, "s": 10**6, "sec": 10**6}
_NUM = r"(\d+(?:\.\d+)?)"

MIN_RATE_BPS = 8_000          # below this HTB cannot shape with a 1-packet burst in sane time
MAX_RATE_BPS = 100 * 10**9


class UnitError(ValueError):
    pass


def parse_rate(text: str) -> int:
    """'10mbit' -> 10_000_000 bits/s; '2mbps' -> 16_000_000 bits/s."""
    if not isinstance(text, str):
        raise UnitError(f"bandwidth must be a string like '10mbit', got {text!r}")
    m = re.fullmatch(_NUM + r"\s*([a-zA-Z]+)", text.strip())
    if not m or m.group(2).lower() not in _RATE_UNITS_BPS:
        raise UnitError(
            f"bad bandwidth {text!r}: use a number and one of "
            f"{', '.join(_RATE_UNITS_BPS)} (as tc: 'mbit' = megabits/s, 'mbps' = megabytes/s)")
    bps = int(round(float(m.group(1)) * _RATE_UNITS_BPS[m.group(2).lower()]))
    if not MIN_RATE_BPS <= bps <= MAX_RATE_BPS:
        raise UnitError(f"bandwidth {text!r} is outside 8kbit..100gbit")
    return bps


def parse_time_us(text: str) -> int:
    """'10ms' -> 10000 microseconds (netem's unit)."""
    if not isinstance(text, str):
        raise UnitError(f"time must be a string like '10ms', got {text!r}")
    m = re.fullmatch(_NUM + r"\s*([a-zA-Z]+)", text.strip())
    if not m or m.group(2).lower() not in _TIME_UNITS_US:
        raise UnitError(f"bad time {text!r}: use a number and one of {', '.join(_TIME_UNITS_US)}")
    return int(round(float(m.group(1)) * _TIME_UNITS_US[m.group(2).lower()]))


def parse_loss_pct(text: str) -> float:
    """'1%' or '1' -> 1.0 (percent)."""
    m = re.fullmatch(_NUM + r"\s*%?", str(text).strip())
    if not m or not 0 <= float(m.group(1)) <= 100:
        raise UnitError(f"bad loss {text!r}: use a percentage like '1%'")
    return float(m.group(1))


def format_rate(bps: int) -> str:
    for unit, mult in (("gbit", 10**9), ("mbit", 10**6), ("kbit", 10**3)):
        if bps % mult == 0 and bps >= mult:
            return f"{bps // mult}{unit}"
    return f"{bps}bit"


def ipv4(value) -> str:
    """An IPv4 address given as a string ("10.0.0.2"); ValueError for anything else
    (ipaddress alone would take the integer 1, or true, as 0.0.0.1)."""
    if not isinstance(value, str):
        raise ValueError(f"expected an IPv4 address string like \"10.0.0.2\", got {type(value).__name__}")
    return str(ipaddress.IPv4Address(value))
