#!/usr/bin/env bash
# Sets up this machine for the testbed (controller, embedded agent, node apps) and its
# tests: Debian packages for namespaces, traffic control and link measurement, then the
# pinned Python requirements into the python3 that runs the testbed; with EDGETB_DOCKER=1
# also Docker, a running dockerd and the node image for docker nodes. Run as root.
set -euo pipefail
cd "$(dirname "$0")"
if [ "$(id -u)" != 0 ]; then echo "install.sh: run as root (sudo ./install.sh)" >&2; exit 2; fi
# apt_need COMMAND:PACKAGE...: install from Debian the packages whose command is missing.
apt_need() {
  local need=() pair
  for pair in "$@"; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || need+=("${pair#*:}")
  done
  if [ ${#need[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  fi
}
apt_need ip:iproute2 tc:iproute2 iperf3:iperf3 iptables:iptables mount:mount curl:curl setpriv:util-linux \
  unshare:util-linux tini:tini
# Node apps run as this unprivileged system user (no home, no login) unless a node asks
# for root; the agent refuses to start them without it. Made once, kept afterwards.
if ! getent passwd edgetb-node >/dev/null; then
  getent group edgetb-node >/dev/null || groupadd --system edgetb-node
  useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin \
    --gid edgetb-node --comment "EdgeTB node apps" edgetb-node
  echo "install.sh: created the system user edgetb-node (uid $(id -u edgetb-node)) for node apps"
fi
py=python3
extra=()
# Debian's own python3 refuses system-wide pip installs (PEP 668) unless told.
if "$py" -c 'import sys,sysconfig,os; sys.exit(0 if os.path.exists(os.path.join(sysconfig.get_paths()["stdlib"],"EXTERNALLY-MANAGED")) else 1)'; then
  extra+=(--break-system-packages)
fi
if ! "$py" -m pip --version >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq python3-pip >/dev/null
fi
"$py" -m pip install -q "${extra[@]}" -r requirements.txt
# This checkout as the package `edgetb` (pyproject.toml), editable: the folders here stay
# the code that runs, and `controller`, `worker`, `dml_app`, `dml_tool`, ... import the same
# way from any folder. (A node app imports the dml_app/ of its own volume: the agent puts
# the folder holding its app folder first on its PYTHONPATH.)
"$py" -m pip install -q "${extra[@]}" --no-deps -e .
"$py" -c 'import torch, pyroute2, safetensors, flask, waitress, mlxtend, matplotlib, docker; print("install.sh: ready (torch", torch.__version__ + ")")'
(cd / && "$py" -c 'import controller.testbed, worker.agent, dml_app.net, dml_tool.conf_utils, testbed_core.credentials') || {
  echo "install.sh: the package edgetb does not import from outside $PWD" >&2; exit 1; }
# The dashboard's browser, with EDGETB_BROWSER=1 (on by default with EDGETB_DOCKER=1, as CI
# runs): Debian's chromium, which the page tests drive headless and the controller uses
# for the run folder's dashboard.png (controller/browser.py; without it /finish just
# skips the picture).
if [ "${EDGETB_BROWSER:-${EDGETB_DOCKER:-0}}" = 1 ]; then
  apt_need chromium:chromium
fi
# Docker nodes, with EDGETB_DOCKER=1 (CI sets it): docker.io and debootstrap from Debian,
# dockerd started in the background unless a daemon answers (readiness polled, bounded),
# and the node image built unless present (worker/image.py; offline, about 75 s, where
# no registry answers).
if [ "${EDGETB_DOCKER:-0}" = 1 ]; then
  apt_need dockerd:docker.io docker-init:tini debootstrap:debootstrap
  if ! docker info >/dev/null 2>&1; then
    setsid dockerd >/var/log/edgetb-dockerd.log 2>&1 </dev/null &
    echo "install.sh: started dockerd (pid $!, log /var/log/edgetb-dockerd.log)"
    for _ in $(seq 120); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
    docker info >/dev/null 2>&1 || { echo "install.sh: dockerd did not answer within 60 s (see /var/log/edgetb-dockerd.log)" >&2; exit 1; }
  fi
  "$py" worker/image.py build
fi
