"""summary.json's "participants" and "missing_nodes" (controller/results.py): every node's
participants metrics events in time order, who was missing over the run, bounded for
hundreds of nodes, and the table's lines on them."""
from __future__ import annotations

import json


from controller import results


def part(t, rnd, participants, missing, **more):
    return {"t": t, "node": "x", "event": "participants", "round": rnd, "participants": participants,
            "missing": missing, **more}


def test_events_of_every_node_in_time_order_and_who_was_missing():
    metrics = {
        "n1": [{"t": 1.0, "event": "aggregate", "round": 1, "accuracy": 0.5},
               part(10.0, 1, ["n2", "n3"], {}, attempt=1, accepted=True),
               part(30.0, 3, ["n2"], {"n3": "dead"}, attempt=1, accepted=True),
               part(31.0, 3, ["n2"], {"n3": "dead"}, attempt=2, accepted=True),    # round 3 again
               part(40.0, 4, ["n2"], {"n3": "timeout", "n4": "refused"}, attempt=1, accepted=True)],
        "p1": [part(20.0, 2, ["n2"], {"n3": "dead"}, waited_s=1.5)],
        "n9": [{"t": 5.0, "event": "train", "round": 1, "loss": 1.0}],
    }
    s = results.summarize("fl", metrics, "n1", 12.0, {})
    got = [(e["node"], e["round"]) for e in s["participants"]]
    assert got == [("n1", 1), ("p1", 2), ("n1", 3), ("n1", 3), ("n1", 4)]
    assert s["participants"][1] == {"node": "p1", "round": 2, "participants": ["n2"], "missing": {"n3": "dead"},
                                    "waited_s": 1.5}
    assert all("t" not in e and "event" not in e for e in s["participants"])
    assert s["missing_nodes"] == {
        "n3": {"first_round": 2, "last_round": 4, "why": "dead", "rounds_missed": 3},
        "n4": {"first_round": 4, "last_round": 4, "why": "refused", "rounds_missed": 1}}
    assert "participants_left_out" not in s
    table = results.table(s)
    assert "    3  n3 (dead)" in table and "    4  n3 (timeout), n4 (refused)" in table, table
    rows = table.split("missing (why)")[1].split("node ")[0]
    assert [line.split()[0] for line in rows.strip().splitlines()] == ["2", "3", "4"], rows   # not round 1
    assert "n3            2      4      3  dead" in table, table
    # no events: empty keys, no table lines
    s = results.summarize("fl", {"n1": [{"t": 1.0, "event": "aggregate", "round": 1, "accuracy": 0.5}]},
                          "n1", 1.0, {})
    assert s["participants"] == [] and s["missing_nodes"] == {} and "missing (why)" not in results.table(s)


def test_three_hundred_nodes_over_many_rounds_stay_small():
    nodes = [f"t{i}" for i in range(300)]
    recs = [part(float(r), r, nodes[:250], {n: "dead" for n in nodes[250:]}, attempt=1, accepted=True,
                 junk={"deep": [1, 2]}, text="y" * 5000)
            for r in range(1, 1001)]
    s = results.summarize("fl", {"n1": recs}, "n1", 1.0, {})
    assert len(s["participants"]) == results.MAX_PARTICIPANT_ENTRIES and s["participants_left_out"] == 800
    assert [e["round"] for e in s["participants"][:2]] == [1, 2] and s["participants"][-1]["round"] == 1000
    e = s["participants"][0]
    assert len(e["participants"]) == results.MAX_NAMES and e["participants_count"] == 250
    assert len(e["missing"]) == 50 and "missing_count" not in e
    assert e["junk"] == {"deep": None} and len(e["text"]) == results.MAX_TEXT
    # missing_nodes counts every event, not only those kept
    assert s["missing_nodes"]["t299"] == {"first_round": 1, "last_round": 1000, "why": "dead", "rounds_missed": 1000}
    size = len(json.dumps(s))
    assert size < 400_000, size     # measured: about 270 kB
    table = results.table(s)
    assert "... and 180 more round(s) with someone missing" in table and "... and 30 more node(s)" in table
    assert max(len(line) for line in table.splitlines()) < 130


def test_a_manager_adds_its_own_entries():
    """A ring's controller-side records (RaManager) join those of the metrics."""
    s = results.summarize("ra", {"n1": [part(1.0, 1, ["n1"], {"n2": "dead"})]}, None, 1.0, {})
    results.add_participants(s, [{"node": "controller", "round": 2, "participants": ["n1", "n3"],
                                  "missing": {"n2": "dead", "n4": "timeout"}, "ring": ["n1", "n3"]}])
    assert [e["node"] for e in s["participants"]] == ["n1", "controller"]
    assert s["missing_nodes"]["n2"] == {"first_round": 1, "last_round": 2, "why": "dead", "rounds_missed": 2}
    assert s["missing_nodes"]["n4"]["first_round"] == 2
    # entries not of this shape do not break the table
    s["participants"].append({"node": "n5", "round": 3, "dead_peers": ["n2"]})
    s["participants"].append("junk")
    assert "    2  n2 (dead), n4 (timeout)" in results.table(s)


def test_a_rootless_final_accuracy_leaves_out_nodes_that_dropped_out():
    """Without a root (ring, gossip) the final accuracy is the mean over the nodes that
    reached the last round: a member lost in round 1 does not bring its stale 0.1 in."""
    agg = lambda rnd, acc: {"t": float(rnd), "event": "aggregate", "round": rnd, "accuracy": acc}  # noqa: E731
    metrics = {"r1": [agg(1, 0.5), agg(2, 0.7), agg(3, 0.9)],
               "r2": [agg(1, 0.4), agg(2, 0.6), agg(3, 0.8)],
               "r3": [agg(1, 0.1)]}
    s = results.summarize("ra", metrics, None, 1.0, {})
    assert s["rounds"] == 3 and abs(s["final_accuracy"] - 0.85) < 1e-12, s
    assert [round(p["accuracy"], 6) for p in s["accuracy_per_round"]] == [round(1.0 / 3, 6), 0.65, 0.85]
