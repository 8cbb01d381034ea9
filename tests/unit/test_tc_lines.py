"""The tc batches worker.tc builds (pure: no root, no kernel), and its netlink read-back
against a real namespace (root)."""
import subprocess


import pytest

from tests.support import agents as ah
from worker import tc


def L(ip, rate, **kw):
    return tc.Link(dest=ip, ip=ip, port=4444, rate_bps=rate, **kw)


def test_every_link_gets_class_segmenting_leaf_and_filter():
    t = tc.LinkTable(dev="eth0", netns="x")
    lines = tc.install_lines(t, [L("10.0.0.1", 10**6), L("10.0.0.2", 10**9)])
    assert lines[0].startswith("qdisc add dev eth0 root handle 1: htb default 1")
    for minor, ip in ((0x10, "10.0.0.1"), (0x11, "10.0.0.2")):
        assert any(l.startswith(f"class add dev eth0 parent 1: classid 1:{minor:x} htb") for l in lines)
        assert f"qdisc add dev eth0 parent 1:{minor:x} handle {minor:x}: tbf rate 100gbit burst 3028 " \
               f"limit {tc.SEGMENT_LIMIT_BYTES}" in lines
        assert any(f"match ip dst {ip}/32 match ip dport 4444 0xffff flowid 1:{minor:x}" in l for l in lines)
    assert len(lines) == 2 + 3 * 2


def test_own_port_shapes_the_nodes_answers_by_the_same_class():
    t = tc.LinkTable(dev="eth0", netns="x", own_port=5555)
    lines = tc.install_lines(t, [L("10.0.0.1", 10**6), L("10.0.0.2", 10**9)])
    for minor, ip in ((0x10, "10.0.0.1"), (0x11, "10.0.0.2")):
        assert f"filter add dev eth0 parent 1: protocol ip prio 1 u32 match ip dst {ip}/32 " \
               f"match ip dport 4444 0xffff flowid 1:{minor:x}" in lines
        assert f"filter add dev eth0 parent 1: protocol ip prio 1 u32 match ip dst {ip}/32 " \
               f"match ip sport 5555 0xffff flowid 1:{minor:x}" in lines
    assert len(lines) == 2 + 4 * 2
    assert t.answers == {"10.0.0.1": 0x10, "10.0.0.2": 0x11}


def test_answers_to_one_ip_go_by_its_first_link():
    # nodes of one host share its ip: answers (to an ephemeral port) cannot tell them apart
    t = tc.LinkTable(dev="eth0", netns=None, own_port=5555)
    lines = tc.install_lines(t, [tc.Link(dest="p1", ip="10.0.0.1", port=4444, rate_bps=10**6),
                                 tc.Link(dest="p2", ip="10.0.0.1", port=4445, rate_bps=10**7)])
    sport = [l for l in lines if "sport" in l]
    assert sport == ["filter add dev eth0 parent 1: protocol ip prio 1 u32 match ip dst 10.0.0.1/32 "
                     "match ip sport 5555 0xffff flowid 1:10"]


def test_bad_own_port_is_refused():
    for bad in (0, 65536, True, "4444", float("nan")):
        with pytest.raises(ValueError):
            tc.LinkTable(dev="eth0", netns="x", own_port=bad)


def test_change_gives_a_new_link_both_filters_and_down_shares_the_leaf():
    t = tc.LinkTable(dev="eth0", netns="x", own_port=5555)
    tc.install_lines(t, [L("10.0.0.1", 10**6)])
    lines = tc.change_lines(t, [L("10.0.0.1", 10**6), L("10.0.0.2", 10**7)])
    assert [l for l in lines if l.startswith("filter")] == [
        "filter add dev eth0 parent 1: protocol ip prio 1 u32 match ip dst 10.0.0.2/32 match ip dport 4444 0xffff flowid 1:11",
        "filter add dev eth0 parent 1: protocol ip prio 1 u32 match ip dst 10.0.0.2/32 match ip sport 5555 0xffff flowid 1:11"]
    # gone and back: both filters stayed, nothing to add
    tc.change_lines(t, [L("10.0.0.1", 10**6)])
    assert not [l for l in tc.change_lines(t, [L("10.0.0.1", 10**6), L("10.0.0.2", 10**7)]) if l.startswith("filter")]
    # down swaps the one leaf both filters lead to (answers drop too); filters untouched
    assert tc.down_lines(t, "10.0.0.2", True) == ["qdisc del dev eth0 parent 1:11 handle 11:",
                                                  "qdisc add dev eth0 parent 1:11 handle 11: pfifo limit 0"]


def test_two_links_to_one_destination_are_refused():
    with pytest.raises(tc.TcError, match="two links"):
        tc.install_lines(tc.LinkTable(dev="eth0", netns="x"), [L("10.0.0.1", 10**6), L("10.0.0.1", 10**7)])


def test_change_touches_only_what_changed():
    t = tc.LinkTable(dev="eth0", netns="x")
    tc.install_lines(t, [L("10.0.0.1", 10**6), L("10.0.0.2", 10**7)])
    assert tc.change_lines(t, [L("10.0.0.1", 10**6), L("10.0.0.2", 10**7)]) == []
    lines = tc.change_lines(t, [L("10.0.0.1", 2 * 10**6), L("10.0.0.2", 10**7)])
    assert len(lines) == 1 and lines[0].startswith("class change dev eth0 parent 1: classid 1:10 htb rate 2000000bit")


def test_removed_link_goes_unshaped_and_comes_back_with_its_leaf():
    t = tc.LinkTable(dev="eth0", netns="x")
    tc.install_lines(t, [L("10.0.0.1", 10**6)])
    gone = tc.change_lines(t, [])
    assert gone == ["qdisc del dev eth0 parent 1:10 handle 10:",
                    "class change dev eth0 parent 1: classid 1:10 htb rate 100gbit ceil 100gbit quantum 200000"]
    back = tc.change_lines(t, [L("10.0.0.1", 10**6)])
    assert back[0].startswith("class change dev eth0 parent 1: classid 1:10 htb rate 1000000bit")
    assert back[1].startswith("qdisc add dev eth0 parent 1:10 handle 10: tbf")
    assert len(back) == 2                     # the filter stayed


def test_leaf_kind_changes_by_del_and_add():
    t = tc.LinkTable(dev="eth0", netns="x")
    tc.install_lines(t, [L("10.0.0.1", 10**6)])
    to_netem = tc.change_lines(t, [L("10.0.0.1", 10**6, delay_us=5000)])
    assert to_netem == ["qdisc del dev eth0 parent 1:10 handle 10:",
                        "qdisc add dev eth0 parent 1:10 handle 10: netem delay 5000us"]
    assert tc.change_lines(t, [L("10.0.0.1", 10**6, delay_us=6000)]) == \
        ["qdisc change dev eth0 parent 1:10 handle 10: netem delay 6000us"]
    back = tc.change_lines(t, [L("10.0.0.1", 10**6)])
    assert back[0] == "qdisc del dev eth0 parent 1:10 handle 10:" and " tbf " in back[1]


@ah.need_root()
def test_read_back_counts_and_rates_in_a_namespace():
    ns = "etb-" + ah.new_tag() + "rb"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", "eth1"], check=True)
        subprocess.run(["ip", "-n", ns, "link", "set", "eth0", "up"], check=True)
        t = tc.LinkTable(dev="eth0", netns=ns)
        links = [L(f"10.0.{i // 200}.{i % 200 + 1}", 10**6 * (i + 1)) for i in range(300)]
        links.append(L("10.9.9.9", 50 * 10**9))              # above 2^32 bytes/s: RATE64
        tc.install(t, links)
        got = tc.read_back(ns, "eth0")
        assert got["classes"] == 302 and got["filters"] == 301
        assert got["rates_bps"][1] == 100 * 10**9
        assert [got["rates_bps"][0x10 + i] for i in range(301)] == [l.rate_bps for l in links]
        assert tc.verify(t) == 301
        tc.change(t, links[:10])
        got = tc.read_back(ns, "eth0")
        # the ten kept links keep their rates, every removed one is unshaped (100gbit),
        # and no class or filter went away (a removed link comes back in place)
        assert [got["rates_bps"][0x10 + i] for i in range(10)] == [l.rate_bps for l in links[:10]]
        assert {got["rates_bps"][0x10 + i] for i in range(10, 301)} == {100 * 10**9}
        assert got["classes"] == 302 and got["filters"] == 301 and got["rates_bps"][1] == 100 * 10**9
        tc.clear(ns, "eth0")
        assert tc.read_back(ns, "eth0") == {"classes": 0, "filters": 0, "answer_filters": 0, "rates_bps": {}}
        # with the node's own port: an answers' filter per linked ip, counted apart
        t = tc.LinkTable(dev="eth0", netns=ns, own_port=4444)
        tc.install(t, links)
        got = tc.read_back(ns, "eth0")
        assert (got["filters"], got["answer_filters"]) == (301, 301) and tc.verify(t) == 301
        # a missing answers' filter is seen: the last one added (handle 800::800 + 2 * 301 - 1)
        subprocess.run(["tc", "-n", ns, "filter", "del", "dev", "eth0", "parent", "1:", "prio", "1",
                        "handle", f"800::{0x800 + 2 * 301 - 1:x}", "u32"], check=True)
        got = tc.read_back(ns, "eth0")
        assert (got["filters"], got["answer_filters"]) == (301, 300)
        with pytest.raises(tc.TcError, match="301 answers' filters, kernel has 301 classes, 301 filters and 300"):
            tc.verify(t)
        tc.clear(ns, "eth0")
        with pytest.raises(tc.TcError, match="no device"):
            tc.read_back(ns, "eth7")
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    with pytest.raises(tc.TcError, match="no namespace"):
        tc.read_back(ns, "eth0")
