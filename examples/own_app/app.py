"""A small EdgeTB-style node app of your own: Flask, numpy and requests, no testbed code.

Federated nearest-centroid on MNIST, one round: the root (the node the controller
sends /start) asks each of its children for its per-class pixel sums and counts,
adds them up, classifies its own test parts with the class means and reports the
accuracy; then it calls the controller's /finish and posts its log to /log.

Every node runs `python3 app.py` with cwd = this folder. What it reads:
  EDGE_TB_ID, NET_NODE_NAME, DML_PORT     who it is, where to listen (0.0.0.0:DML_PORT)
  NET_CTL_ADDRESS                         the controller (ip:port)
  EDGE_TB_TOKEN                           its own credential: the controller sends it to
                                          this node; this node sends it to the controller
  EDGE_TB_PEER_TOKEN                      what peers send each other
  DML_LOG_DIR                             the one folder it may write (default ./log)
  ../dataset                              the split dataset (dml_tool/splitter.py)
and the confs the controller pushes: POST /conf/dataset, POST /conf/structure (JSON; the
files dml_tool/dataset_conf.py and dml_tool/fl_structure_conf.py write).
"""
import hmac
import json
import logging
import os
import sys
import threading
import time

import numpy as np
import requests
from flask import Flask, abort, jsonify, request

NAME = os.environ["NET_NODE_NAME"]
NODE_ID = os.environ["EDGE_TB_ID"]
PORT = int(os.environ["DML_PORT"])
CTL = os.environ["NET_CTL_ADDRESS"]
MY_TOKEN = os.environ["EDGE_TB_TOKEN"]
PEER_TOKEN = os.environ["EDGE_TB_PEER_TOKEN"]
LOG_DIR = os.environ.get("DML_LOG_DIR", "log")
DATASET = os.environ.get("DML_DATASET_DIR", "../dataset")

os.makedirs(LOG_DIR, exist_ok=True)
LOG_FILE = os.path.join(LOG_DIR, NAME + ".log")
METRICS_FILE = os.path.join(LOG_DIR, NAME + ".metrics.jsonl")
log = logging.getLogger(NAME)            # to <name>.log and stderr (stdout.log / docker logs)
log.setLevel(logging.INFO)
log.propagate = False                    # Flask's request lines stay out of <name>.log
for handler in (logging.FileHandler(LOG_FILE), logging.StreamHandler(sys.stderr)):
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    log.addHandler(handler)

app = Flask(__name__)
http = requests.Session()
http.trust_env = False                   # testbed addresses never through an HTTP proxy
conf = {"dataset": None, "structure": None}
state = {"state": "idle", "round": 0, "bytes_sent": 0}


# ---------------------------------------------------------------- credentials
def caller() -> str:
    """'self' for this node's own credential (the controller uses it), 'peer' for the
    peer credential; anything else ends the request: 401 without a token, 403 wrong."""
    got = request.headers.get("X-Testbed-Token", "")
    if hmac.compare_digest(got.encode(), MY_TOKEN.encode()):
        return "self"
    if hmac.compare_digest(got.encode(), PEER_TOKEN.encode()):
        return "peer"
    abort(401 if not got else 403)


def only_controller() -> None:
    if caller() != "self":
        abort(403)


def ctl(method: str, path: str, headers=None, timeout=120, **kw) -> requests.Response:
    """A call to the controller with this node's own credential."""
    r = http.request(method, f"http://{CTL}{path}", headers={**(headers or {}), "X-Testbed-Token": MY_TOKEN},
                         timeout=timeout, **kw)
    r.raise_for_status()
    return r


def heartbeat(s: str, rnd: int = 0) -> None:
    """Optional: shows the state in the controller's /status."""
    state.update(state=s, round=rnd)
    try:
        ctl("POST", "/heartbeat", json={"node": NAME, "state": s, "round": rnd}, timeout=5)
    except requests.RequestException as e:
        log.info("heartbeat not sent: %s", e)


def metric(event: str, rnd: int, **values) -> None:
    with open(METRICS_FILE, "a") as f:
        f.write(json.dumps({"t": time.time(), "node": NAME, "event": event, "round": rnd, **values}) + "\n")


# ---------------------------------------------------------------- data and "training"
def load_parts(split: str, start: int, count: int):
    xs, ys = [], []
    for i in range(start, start + count):
        xs.append(np.load(os.path.join(DATASET, split, f"{i}_x.npy"), allow_pickle=False))
        ys.append(np.load(os.path.join(DATASET, split, f"{i}_y.npy"), allow_pickle=False))
    x = np.concatenate(xs).reshape(sum(len(a) for a in xs), -1).astype(np.float64)
    return x, np.concatenate(ys)


def local_sums():
    d = conf["dataset"]
    x, y = load_parts("train", int(d["train_start_index"]), int(d["train_len"]))
    classes = 10
    sums = np.zeros((classes, x.shape[1]))
    np.add.at(sums, y, x)
    counts = np.bincount(y, minlength=classes)
    means = sums / np.maximum(counts, 1)[:, None]
    loss = float(((x - means[y]) ** 2).sum(axis=1).mean())    # within-class spread
    return sums, counts, loss


# ---------------------------------------------------------------- routes
@app.route("/hi")
def hi():
    caller()
    try:                                   # shared folders are read-only to nodes
        open(".probe", "w").close()
        os.remove(".probe")
        writable = True
    except OSError:
        writable = False
    return jsonify(name=NAME, id=NODE_ID, uid=os.getuid(), cwd=os.getcwd(), pid=os.getpid(),
                   app_dir_writable=writable, log_dir=LOG_DIR, torch_loaded="torch" in sys.modules)


@app.route("/conf/dataset", methods=["POST"])
def conf_dataset():
    only_controller()
    conf["dataset"] = request.get_json(force=True)
    log.info("dataset conf: %s", json.dumps(conf["dataset"], sort_keys=True))
    return "ok"


@app.route("/conf/structure", methods=["POST"])
def conf_structure():
    only_controller()
    conf["structure"] = request.get_json(force=True)
    log.info("structure conf: %s", json.dumps(conf["structure"], sort_keys=True))
    return "ok"


@app.route("/train", methods=["POST"])
def train():
    caller()                               # the root asks with the peer credential
    rnd = int(request.get_json(force=True)["round"])
    heartbeat("training", rnd)
    sums, counts, loss = local_sums()
    log.info("Train: loss=%.4f, round=%d,", loss, rnd)
    metric("train", rnd, loss=loss)
    body = json.dumps({"name": NAME, "sums": sums.tolist(), "counts": counts.tolist()})
    state["bytes_sent"] += len(body)
    heartbeat("trained", rnd)
    return app.response_class(body, mimetype="application/json")


@app.route("/start")
def start():
    only_controller()
    if conf["dataset"] is None or conf["structure"] is None:
        return "push /conf/dataset and /conf/structure first\n", 409
    threading.Thread(target=run_root, daemon=True).start()
    return "started\n"


@app.route("/log")
def get_log():                             # the controller reads these at /finish
    caller()
    with open(LOG_FILE) as f:
        return app.response_class(f.read(), mimetype="text/plain")


@app.route("/metrics")
def get_metrics():
    caller()
    text = open(METRICS_FILE).read() if os.path.exists(METRICS_FILE) else ""
    return app.response_class(text, mimetype="text/plain")


@app.route("/stats")
def stats():
    caller()
    return jsonify(state)


# ---------------------------------------------------------------- the root's work
def run_root() -> None:
    try:
        aggregate()
    except Exception as e:                 # noqa: BLE001 - say it where the user looks
        log.exception("root failed: %s", e)
        heartbeat("error", state["round"])


def aggregate() -> None:
    s = conf["structure"]
    connect = s.get("connect", {})
    children = s.get("child_node") or sorted(connect)
    rnd = 1
    heartbeat("aggregating", rnd)
    sums, counts = 0.0, 0
    for child in children:
        r = http.post(f"http://{connect[child]}/train", json={"round": rnd},
                          headers={"X-Testbed-Token": PEER_TOKEN}, timeout=120)
        r.raise_for_status()
        got = r.json()
        sums = sums + np.array(got["sums"])
        counts = counts + np.array(got["counts"])
        log.info("got %s: %d samples, %d bytes", got["name"], int(np.sum(got["counts"])), len(r.content))
    means = sums / np.maximum(counts, 1)[:, None]
    d = conf["dataset"]
    x, y = load_parts("test", int(d["test_start_index"]), int(d["test_len"]))
    dist = (x ** 2).sum(1)[:, None] - 2 * x @ means.T + (means ** 2).sum(1)[None, :]
    acc = float((dist.argmin(1) == y).mean())
    log.info("Aggregate: accuracy=%.4f, round=%d,", acc, rnd)
    metric("aggregate", rnd, accuracy=acc)
    # /finish: the controller makes the run folder, reads every node's /log, /metrics
    # and /stats into it and writes summary.json.
    summary = ctl("GET", "/finish").json()
    log.info("finish: run folder %s", summary.get("run_dir"))
    # Then this node's whole log, this line included, into the same folder.
    with open(LOG_FILE, "rb") as f:
        ctl("POST", f"/log?name={NAME}", data=f.read(), headers={"Content-Type": "text/plain"})
    heartbeat("done", rnd)


if __name__ == "__main__":
    log.info("node %s (id %s) listening on port %d, controller %s", NAME, NODE_ID, PORT, CTL)
    app.run(host="0.0.0.0", port=PORT, threaded=True)
