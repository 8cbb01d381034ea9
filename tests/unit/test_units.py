"""worker/units.py, as pure functions: every tc(8) rate unit (bits and BYTES per second,
SI prefixes), the refusals, netem times, loss percentages, rate formatting and ipv4."""

import pytest

from worker.units import (MAX_RATE_BPS, MIN_RATE_BPS, UnitError, format_rate, ipv4,
                          parse_loss_pct, parse_rate, parse_time_us)


# Expected values written out by hand from tc(8): "bit" units are bits/s, "bps" units are
# BYTES/s, k = 1000 (not 1024).
@pytest.mark.parametrize("text,bits_per_s", [
    ("8000bit", 8_000), ("8kbit", 8_000), ("10kbit", 10_000), ("10mbit", 10_000_000),
    ("1gbit", 1_000_000_000), ("0.1tbit", 100_000_000_000),
    ("1000bps", 8_000), ("1kbps", 8_000), ("2kbps", 16_000), ("5mbps", 40_000_000),
    ("2gbps", 16_000_000_000), ("0.01tbps", 80_000_000_000),
    ("1.5mbit", 1_500_000), ("2.5mbps", 20_000_000),
    ("10MBIT", 10_000_000), ("10Mbps", 80_000_000), (" 10 mbit ", 10_000_000),
])
def test_parse_rate_every_tc_unit(text, bits_per_s):
    assert parse_rate(text) == bits_per_s


def test_kbps_is_a_thousand_bytes_per_second_as_tc():
    # tc(8): "kbps  Kilobytes per second", "kbit  Kilobits per second"; SI prefixes.
    assert parse_rate("1kbps") == 8 * 1000
    assert parse_rate("1kbps") == parse_rate("8kbit")
    assert parse_rate("1mbps") == parse_rate("8mbit") == 8 * 1000 * 1000
    assert parse_rate("1kbps") != 8 * 1024


@pytest.mark.parametrize("bad", [
    "", "10", "mbit", "10 megabit", "10kibit", "10mibps", "10mb", "-5mbit", "1e3mbit",
    "10mbit/s", "ten mbit", "10mbit 5", "0x10mbit", "1,5mbit",
])
def test_parse_rate_refuses_bad_text(bad):
    with pytest.raises(UnitError, match="bad bandwidth"):
        parse_rate(bad)


@pytest.mark.parametrize("bad", [10, 10.0, None, b"10mbit", ["10mbit"], True])
def test_parse_rate_refuses_non_strings(bad):
    with pytest.raises(UnitError, match="must be a string"):
        parse_rate(bad)


@pytest.mark.parametrize("bad", ["7999bit", "7kbit", "0bit", "0mbit", "999bps", "101gbit", "13gbps", "1tbit"])
def test_parse_rate_refuses_out_of_range(bad):
    with pytest.raises(UnitError, match="outside 8kbit..100gbit"):
        parse_rate(bad)


def test_parse_rate_range_edges_are_accepted():
    assert MIN_RATE_BPS == 8_000 and MAX_RATE_BPS == 100_000_000_000
    assert parse_rate("8kbit") == 8_000
    assert parse_rate("100gbit") == 100_000_000_000
    assert parse_rate("12.5gbps") == 100_000_000_000


def test_unit_error_is_a_value_error():
    assert issubclass(UnitError, ValueError)


@pytest.mark.parametrize("text,us", [
    ("0us", 0), ("250us", 250), ("250usec", 250), ("10ms", 10_000), ("10msec", 10_000),
    ("1.5ms", 1_500), ("2s", 2_000_000), ("2sec", 2_000_000), ("0.25s", 250_000),
    ("10MS", 10_000), (" 3 ms ", 3_000),
])
def test_parse_time_us(text, us):
    assert parse_time_us(text) == us


@pytest.mark.parametrize("bad", ["", "10", "ms", "10m", "10min", "-1ms", "10 ns", "1h", "10ms5"])
def test_parse_time_us_refuses_bad_text(bad):
    with pytest.raises(UnitError, match="bad time"):
        parse_time_us(bad)


@pytest.mark.parametrize("bad", [10, None, 1.5])
def test_parse_time_us_refuses_non_strings(bad):
    with pytest.raises(UnitError, match="must be a string"):
        parse_time_us(bad)


@pytest.mark.parametrize("text,pct", [
    ("0", 0.0), ("0%", 0.0), ("1%", 1.0), ("1", 1.0), ("2.5%", 2.5), (" 3 % ", 3.0), ("100%", 100.0),
    (5, 5.0),
])
def test_parse_loss_pct(text, pct):
    assert parse_loss_pct(text) == pct


@pytest.mark.parametrize("bad", ["", "%", "101%", "100.5", "-1%", "1%%", "one", "1 percent", "0.5%1"])
def test_parse_loss_pct_refuses(bad):
    with pytest.raises(UnitError, match="bad loss"):
        parse_loss_pct(bad)


@pytest.mark.parametrize("bps,text", [
    (1_000_000_000, "1gbit"), (100_000_000_000, "100gbit"), (10_000_000, "10mbit"),
    (1_500_000, "1500kbit"), (8_000, "8kbit"), (40_000_000, "40mbit"), (1_000_001, "1000001bit"),
    (999, "999bit"), (2_000_500_000, "2000500kbit"),
])
def test_format_rate(bps, text):
    assert format_rate(bps) == text


@pytest.mark.parametrize("text", ["8kbit", "10mbit", "1gbit", "5mbps", "1kbps", "1.5mbit", "12345bit", "100gbit"])
def test_format_rate_round_trips_through_parse_rate(text):
    bps = parse_rate(text)
    assert parse_rate(format_rate(bps)) == bps


def test_ipv4_accepts_and_normalises_strings():
    assert ipv4("10.0.0.2") == "10.0.0.2"
    assert ipv4("192.168.1.255") == "192.168.1.255"


@pytest.mark.parametrize("bad", [1, 167772162, True, None, 10.0, b"10.0.0.2", ["10.0.0.2"]])
def test_ipv4_refuses_non_strings(bad):
    with pytest.raises(ValueError, match="expected an IPv4 address string"):
        ipv4(bad)


@pytest.mark.parametrize("bad", ["", "10.0.0", "10.0.0.256", "::1", "10.0.0.2/24", "host", "010.0.0.2", " 10.0.0.2"])
def test_ipv4_refuses_bad_strings(bad):
    with pytest.raises(ValueError):
        ipv4(bad)
