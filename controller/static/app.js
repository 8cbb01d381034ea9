/* EdgeTB dashboard page: everything it shows comes from ONE EventSource on /api/stream
 * (state about once a second, metrics and scenario events as they come, link fidelity
 * when it changes); the only other calls are /api/runs when the Runs tab is opened, and
 * /api/events once to tell a refused stream's 401 (sign in) from anything else.
 * Drawing is at most once a second and bounded (tables capped, graph edges limited to
 * the most loaded), so 300 nodes and 2000 links stay light. Charts: uPlot; graph:
 * cytoscape (vendored under /static/vendor/). The page sets body[data-ready="1"] once
 * the first state and metrics are drawn (controller/browser.py waits for it), and
 * body[data-finished="1"] while the state says the run is finished. */
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const REDRAW_MS = 1000;
  const NODE_ROWS = 200, LINK_ROWS = 25, LABELLED_EDGES = 40, MAX_RECORDS = 200000, MAX_EVENTS = 1000;
  const PER_NODE_SERIES = 8;       // more nodes than this: mean and min..max across nodes
  const PALETTE = ["#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#65a30d"];
  const STATE_COLOR = {
    training: "#3b82f6", aggregating: "#8b5cf6", uploading: "#8b5cf6", gossiping: "#8b5cf6",
    merging: "#8b5cf6", serving: "#8b5cf6", evaluating: "#8b5cf6", sending: "#8b5cf6",
    idle: "#94a3b8", ready: "#94a3b8", trained: "#94a3b8", waiting: "#94a3b8",
    finished: "#10b981", paused: "#f59e0b", error: "#ef4444", exited: "#475569", dead: "#475569",
  };
  const stateColor = (s) => STATE_COLOR[s] || "#cbd5e1";

  // ------------------------------------------------------------------ data
  const S = {
    state: null, stateMsgs: 0, backlog: false, runKey: null,
    seq: -1, acc: [], loss: [], events: [], fidelity: null,
  };
  const finite = (v) => typeof v === "number" && isFinite(v);
  const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));

  // The stream (re)sends everything so far after it opens: state, metrics, then events.
  function resetRecords() { S.seq = -1; S.acc = []; S.loss = []; S.events = []; S.backlog = false; }

  function onState(st) {
    if (!st || typeof st !== "object" || !Array.isArray(st.nodes)) return;
    const run = st.run || {};
    const key = `${run.algorithm}|${run.started}`;
    if (S.runKey !== null && finite(run.started) && key !== S.runKey) {
      // a new run: its records may already be here (the stream sends them as they come,
      // the state once a second), so drop only what is older than its start
      const keep = (r) => r.t >= run.started - 2;
      S.acc = S.acc.filter(keep); S.loss = S.loss.filter(keep);
      S.events = [];      // the stream sends the new run's events as they fire
      S.fidelity = null;
    }
    if (finite(run.started) || S.runKey === null) S.runKey = key;
    S.state = st;
    S.stateMsgs++;
    schedule();
  }

  function onMetrics(m) {
    if (!m || !Array.isArray(m.records)) return;
    for (const r of m.records) {
      if (!r || !(finite(r.seq) && r.seq > S.seq)) continue;
      S.seq = r.seq;
      if (!finite(r.t) || typeof r.node !== "string") continue;
      if (r.event === "aggregate" && finite(r.accuracy))
        S.acc.push({ t: r.t, node: r.node, round: r.round, v: r.accuracy, layer: r.layer });
      else if (r.event === "train" && finite(r.loss))
        S.loss.push({ t: r.t, node: r.node, round: r.round, v: r.loss });
    }
    if (S.acc.length > MAX_RECORDS) S.acc.splice(0, S.acc.length - MAX_RECORDS);
    if (S.loss.length > MAX_RECORDS) S.loss.splice(0, S.loss.length - MAX_RECORDS);
    schedule();
  }

  function onEvents(m) {
    if (!m || !Array.isArray(m.events)) return;
    S.events.push(...m.events.filter((e) => e && typeof e === "object"));
    if (S.events.length > MAX_EVENTS) S.events.splice(0, S.events.length - MAX_EVENTS);
    S.backlog = true;             // events come after all metrics so far
    schedule();
  }

  function onFidelity(f) {
    if (!f || !Array.isArray(f.links)) return;
    S.fidelity = f;
    schedule();
  }

  // What the page received and how long drawing took: for scripts and the page's tests
  // (window.edgetbDashboard.stats), nothing else reads it.
  const stats = { streams: 0, messages: {}, maxBytes: {}, bytes: 0, draws: 0, drawMaxMs: 0, drawLastMs: 0 };
  window.edgetbDashboard = { stats };

  // ------------------------------------------------------------------ the one stream
  let es = null, retry = null;
  function setConn(kind, text) {
    const c = $("conn");
    c.className = "conn " + kind;
    c.querySelector("span").textContent = text;
  }
  function connect() {
    clearTimeout(retry);
    if (es) es.close();
    es = new EventSource("/api/stream");
    stats.streams++;
    setConn("", "connecting");
    es.addEventListener("open", () => { resetRecords(); setConn("live", "live"); });   // it resends all so far
    const on = (name, fn) => es.addEventListener(name, (e) => {
      stats.messages[name] = (stats.messages[name] || 0) + 1;
      stats.maxBytes[name] = Math.max(stats.maxBytes[name] || 0, e.data.length);
      stats.bytes += e.data.length;
      let data;
      try { data = JSON.parse(e.data); } catch (_) { return; }
      fn(data);
    });
    on("state", onState);
    on("metrics", onMetrics);
    on("events", onEvents);
    on("fidelity", onFidelity);
    es.onerror = () => {
      if (es.readyState === EventSource.CLOSED) { es = null; whyClosed(); }
      else setConn("down", "reconnecting");
    };
  }
  async function whyClosed() {
    // EventSource hides the status of a refused stream: ask a small route once.
    try {
      const r = await fetch("/api/events", { credentials: "same-origin", cache: "no-store" });
      if (r.status === 401) { showLogin(""); setConn("down", "sign in"); return; }
      setConn("down", r.status === 503 ? "too many viewers; retrying" : `stream closed (${r.status}); retrying`);
    } catch (_) {
      setConn("down", "controller unreachable; retrying");
    }
    retry = setTimeout(connect, 5000);
  }

  function showLogin(msg) {
    $("login").hidden = false;
    $("login-msg").textContent = msg;
    $("login-token").focus();
  }
  $("login-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const body = new URLSearchParams({ token: $("login-token").value });
    try {
      const r = await fetch("/login", { method: "POST", body, credentials: "same-origin" });
      if (!r.ok) { showLogin(r.status === 401 || r.status === 403 ? "That token was refused." : `Sign-in failed (${r.status}).`); return; }
    } catch (_) { showLogin("The controller did not answer."); return; }
    $("login-token").value = "";
    $("login").hidden = true;
    connect();
    if (view === "runs") loadRuns();
  });

  // ------------------------------------------------------------------ formatting
  function fmtRate(bps) {
    if (!finite(bps)) return "–";
    for (const [u, d] of [["Gbit/s", 1e9], ["Mbit/s", 1e6], ["kbit/s", 1e3]])
      if (Math.abs(bps) >= d) return `${(bps / d).toPrecision(3)} ${u}`;
    return `${Math.round(bps)} bit/s`;
  }
  function fmtShort(bps) {
    if (!finite(bps)) return "–";
    for (const [u, d] of [["G", 1e9], ["M", 1e6], ["k", 1e3]])
      if (Math.abs(bps) >= d) return `${+(bps / d).toPrecision(3)}${u}`;
    return `${Math.round(bps)}`;
  }
  function fmtDur(s) {
    if (!finite(s) || s < 0) return "–";
    if (s < 60) return `${s.toFixed(0)} s`;
    if (s < 3600) return `${Math.floor(s / 60)}m ${String(Math.floor(s % 60)).padStart(2, "0")}s`;
    return `${Math.floor(s / 3600)}h ${String(Math.floor((s % 3600) / 60)).padStart(2, "0")}m`;
  }
  const fmtAge = (s) => (finite(s) ? (s < 10 ? `${s.toFixed(1)} s` : fmtDur(s)) : "–");
  const natural = new Intl.Collator(undefined, { numeric: true }).compare;
  function loadColor(load, down) {
    if (down) return "#0f172a";
    if (!finite(load) || load <= 0.01) return "#cbd5e1";
    const stops = [[0, [203, 213, 225]], [0.3, [34, 197, 94]], [0.65, [234, 179, 8]], [1, [239, 68, 68]]];
    const x = Math.min(1, load);
    for (let i = 1; i < stops.length; i++) {
      const [x1, c1] = stops[i], [x0, c0] = stops[i - 1];
      if (x <= x1) {
        const f = (x - x0) / (x1 - x0);
        return `rgb(${c0.map((v, k) => Math.round(v + f * (c1[k] - v))).join(",")})`;
      }
    }
    return "#ef4444";
  }
  function filterText() { return $("filter").value.trim().toLowerCase(); }
  const nodeMatches = (n, q) => !q || [n.name, n.role, n.state, n.worker].some((v) => v && String(v).toLowerCase().includes(q));
  function roots() {
    const r = S.state && S.state.run && S.state.run.root;
    return r ? String(r).split(",").map((x) => x.trim()).filter(Boolean) : [];
  }

  // ------------------------------------------------------------------ drawing, at most once a second
  let timer = null, lastDraw = 0, view = "live";
  function schedule() {
    if (timer) return;
    timer = setTimeout(draw, Math.max(0, lastDraw + REDRAW_MS - Date.now()));
  }
  function draw() {
    timer = null;
    lastDraw = Date.now();
    if (!S.state) return;
    const t0 = performance.now();
    try { drawAll(); } finally {
      stats.draws++;
      stats.drawLastMs = performance.now() - t0;
      stats.drawMaxMs = Math.max(stats.drawMaxMs, stats.drawLastMs);
    }
  }
  function drawAll() {
    drawHeader();
    drawCards();
    if (view === "live") { drawGraph(); drawCharts(); drawNodes(); drawLinks(); }
    if (view === "fidelity") drawFidelity();
    drawFidelityBadge();
    if (view === "live" && (S.backlog || S.stateMsgs >= 2)) document.body.dataset.ready = "1";
    // a screenshot at the end may wait for this too (the run's state as finished)
    document.body.dataset.finished = S.state.run && S.state.run.finished ? "1" : "";
  }

  function drawHeader() {
    const run = S.state.run || {};
    const parts = [];
    if (run.algorithm) parts.push(`<b>${esc(String(run.algorithm).toUpperCase())}</b>`);
    if (run.root) parts.push(`root ${esc(run.root)}`);
    if (run.started != null) parts.push(run.finished ? "finished" : `running ${fmtDur(S.state.t - run.started)}`);
    else parts.push("no run started");
    if (run.run_dir) parts.push(`<code>${esc(run.run_dir)}</code>`);
    $("run").innerHTML = parts.join(" · ");
  }

  function lastAccuracy() {
    const rs = roots();
    const mine = rs.length ? S.acc.filter((r) => rs.includes(r.node)) : S.acc;
    if (!mine.length) return null;
    if (rs.length) return mine[mine.length - 1];
    const last = new Map();
    for (const r of mine) last.set(r.node, r);
    const vals = [...last.values()];
    return { v: vals.reduce((a, r) => a + r.v, 0) / vals.length, round: Math.max(...vals.map((r) => r.round)), mean: vals.length };
  }

  function drawCards() {
    const st = S.state, nodes = st.nodes, run = st.run || {};
    $("c-nodes").textContent = String(nodes.length);
    const counts = new Map();
    for (const n of nodes) counts.set(n.state || "unknown", (counts.get(n.state || "unknown") || 0) + 1);
    $("c-states").innerHTML = [...counts.entries()].sort((a, b) => b[1] - a[1]).slice(0, 4)
      .map(([s, c]) => `<span class="chip" data-state="${esc(s)}"><i style="background:${stateColor(s)}"></i>${c} ${esc(s)}</span>`).join("");
    const rs = roots();
    const rounds = nodes.filter((n) => (rs.length ? rs.includes(n.name) : true) && finite(n.round)).map((n) => n.round);
    const rnd = rounds.length ? Math.max(...rounds) : null;
    $("c-round").textContent = rnd == null ? "–" : (finite(run.rounds) ? `${rnd} / ${run.rounds}` : String(rnd));
    $("c-elapsed").textContent = run.started == null ? "no run" : run.finished ? "finished" : `running ${fmtDur(st.t - run.started)}`;
    const la = lastAccuracy();
    $("c-acc").textContent = la ? la.v.toFixed(4) : "–";
    $("c-acc-note").textContent = la ? (la.mean ? `mean of ${la.mean} nodes, round ${la.round}` : `${la.node ?? ""} round ${la.round}`) : "waiting for a round";
    const links = st.links || [];
    $("c-links").textContent = String(st.links_total ?? links.length);
    const busy = links.filter((l) => finite(l.load) && l.load >= 0.9).length, down = links.filter((l) => l.down).length;
    $("c-links-note").textContent = `${busy} ≥ 90% loaded` + (down ? ` · ${down} down` : "") + (st.links_cut ? ` · ${links.length} most loaded sent` : "");
    const f = S.fidelity;
    if (f && f.links.length) {
      const bad = f.links.filter((l) => !l.ok).length;
      $("c-fid").textContent = `${f.links.length - bad} / ${f.links.length} ok`;
      $("c-fid-note").textContent = bad ? `${bad} flagged (outside ±${f.tolerance_pct}%)` : `all within ±${f.tolerance_pct}%`;
    } else {
      $("c-fid").textContent = "–";
      $("c-fid-note").textContent = "no link saturated long enough yet";
    }
    const ages = nodes.map((n) => n.hb_age_s).filter(finite);
    $("c-hb").textContent = ages.length ? `≤ ${fmtAge(Math.max(...ages))}` : "–";
    const silent = ages.filter((a) => a > 10).length;
    $("c-hb-note").textContent = ages.length ? (silent ? `${silent} silent > 10 s` : `${ages.length} nodes reporting`) : "none yet";
  }

  // ------------------------------------------------------------------ topology (cytoscape)
  let cy = null, graphKey = "";
  function ensureCy() {
    if (cy || typeof cytoscape !== "function") return cy;
    cy = cytoscape({
      container: $("graph"), wheelSensitivity: 0.3, minZoom: 0.05, maxZoom: 5, pixelRatio: 1,
      textureOnViewport: true, motionBlur: false, boxSelectionEnabled: false, autoungrabify: true,
      style: [
        { selector: "node", style: { "background-color": "data(color)", width: "data(size)", height: "data(size)",
          label: "data(id)", "font-size": 10, "min-zoomed-font-size": 10, "text-valign": "bottom", "text-margin-y": 2,
          color: "#334155", "border-width": 1, "border-color": "#fff" } },
        { selector: "node.hub", style: { "font-weight": "bold", "font-size": 12, "border-width": 2, "border-color": "#0f172a" } },
        { selector: "node.faded", style: { opacity: 0.15 } },
        { selector: "edge", style: { width: "data(w)", "line-color": "data(color)", "curve-style": "straight",
          opacity: 0.85, label: "data(label)", "font-size": 9, "min-zoomed-font-size": 7, "text-rotation": "autorotate",
          color: "#1e293b", "text-background-color": "#fff", "text-background-opacity": 0.85, "text-background-padding": 1 } },
        { selector: "edge.down", style: { "line-style": "dashed" } },
        { selector: "edge.off", style: { display: "none" } },
      ],
    });
    const tip = $("tip");
    cy.on("mouseover", "node, edge", (e) => {
      tip.textContent = e.target.data("tip") || "";
      const p = e.renderedPosition || e.target.renderedMidpoint?.() || { x: 0, y: 0 };
      tip.style.left = `${$("graph").offsetLeft + p.x + 12}px`;
      tip.style.top = `${$("graph").offsetTop + p.y + 12}px`;
      tip.hidden = false;
    });
    cy.on("mouseout", "node, edge", () => { tip.hidden = true; });
    cy.on("tap", "node", (e) => { $("filter").value = e.target.id(); schedule(); });
    return cy;
  }

  // Pairs of nodes with a link either way: one drawn edge each, the busier direction shown.
  function linkPairs(links) {
    const pairs = new Map();
    for (const l of links) {
      if (typeof l.src !== "string" || typeof l.dst !== "string") continue;
      const key = l.src < l.dst ? `${l.src}|${l.dst}` : `${l.dst}|${l.src}`;
      let p = pairs.get(key);
      if (!p) pairs.set(key, (p = { id: key, a: l.src < l.dst ? l.src : l.dst, b: l.src < l.dst ? l.dst : l.src, dirs: [] }));
      p.dirs.push(l);
    }
    for (const p of pairs.values()) {
      p.top = p.dirs.reduce((x, y) => ((y.load || 0) > (x.load || 0) ? y : x));
      p.load = finite(p.top.load) ? p.top.load : 0;
      p.down = p.dirs.some((l) => l.down);
    }
    return pairs;
  }

  // Hubs (the root, aggregators, servers, or nodes of far higher degree) in the middle or on
  // a circle, every other node on rings around the hub it is linked to; no hub: one circle.
  function layout(nodes, pairs) {
    const adj = new Map(nodes.map((n) => [n.name, []]));
    for (const p of pairs.values()) { adj.get(p.a)?.push(p.b); adj.get(p.b)?.push(p.a); }
    const rs = roots();
    const deg = (n) => adj.get(n)?.length || 0;
    const degs = nodes.map((n) => deg(n.name)).sort((a, b) => a - b);
    const median = degs.length ? degs[Math.floor(degs.length / 2)] : 0;
    // (degree counts too: a tree's inner nodes, whatever their role script)
    const hubs = nodes.filter((n) => rs.includes(n.name) || /aggregat|server|coordinat/i.test(n.role || "") ||
      (deg(n.name) >= 3 && deg(n.name) >= 4 * Math.max(1, median))).map((n) => n.name);
    const pos = {}, hubSet = new Set(hubs);
    const ring = (names, cx, cy0, r0) => {      // concentric rings, 26 px apart on each
      let i = 0, r = r0;
      while (i < names.length) {
        const cap = Math.max(6, Math.floor((2 * Math.PI * r) / 26));
        const k = Math.min(cap, names.length - i);
        for (let j = 0; j < k; j++) {
          const a = (2 * Math.PI * j) / k - Math.PI / 2;
          pos[names[i + j]] = { x: cx + r * Math.cos(a), y: cy0 + r * Math.sin(a) };
        }
        i += k;
        if (i < names.length) r += 30;
      }
      return r;
    };
    const sorted = nodes.map((n) => n.name).sort(natural);
    if (!hubs.length) { ring(sorted, 0, 0, Math.max(80, (sorted.length * 26) / (2 * Math.PI))); return { pos, hubs: hubSet }; }
    const members = new Map(hubs.map((h) => [h, []])), orphans = [];
    for (const n of sorted) {
      if (hubSet.has(n)) continue;
      const h = adj.get(n).filter((x) => hubSet.has(x)).sort(natural)[0];
      (h ? members.get(h) : orphans).push(n);
    }
    const R0 = 110;       // the first ring: links long enough for their labels
    const radius = (h) => { const m = members.get(h).length; return m ? R0 + 30 * Math.floor(m / Math.max(6, Math.floor((2 * Math.PI * R0) / 26))) : 20; };
    // a hub linked to other hubs (a tree's top) goes in the middle
    const top = hubs.slice().sort((x, y) => adj.get(y).filter((z) => hubSet.has(z)).length - adj.get(x).filter((z) => hubSet.has(z)).length)[0];
    const centre = hubs.length === 1 || adj.get(top).some((z) => hubSet.has(z)) ? top : null;
    let rTop = 0;
    if (centre) { pos[centre] = { x: 0, y: 0 }; rTop = members.get(centre).length ? ring(members.get(centre), 0, 0, R0) : 0; }
    const others = hubs.filter((h) => h !== centre).sort(natural);
    if (others.length) {
      const sizes = others.map((h) => 2 * radius(h) + 50);
      const circ = sizes.reduce((a, b) => a + b, 0);
      const R = Math.max(circ / (2 * Math.PI), rTop + Math.max(...sizes) / 2 + 40);
      let acc = 0;
      others.forEach((h, i) => {
        const a = (2 * Math.PI * (acc + sizes[i] / 2)) / circ - Math.PI / 2;
        acc += sizes[i];
        const x = R * Math.cos(a), y = R * Math.sin(a);
        pos[h] = { x, y };
        if (members.get(h).length) ring(members.get(h), x, y, R0);
      });
      rTop = R + Math.max(...sizes) / 2;
    }
    if (orphans.length) ring(orphans, 0, 0, rTop + 60);
    return { pos, hubs: hubSet };
  }

  function drawGraph() {
    if (!ensureCy()) return;
    const st = S.state, nodes = st.nodes, q = filterText();
    const pairs = linkPairs(st.links || []);
    const names = new Set(nodes.map((n) => n.name));
    for (const [k, p] of pairs) if (!names.has(p.a) || !names.has(p.b)) pairs.delete(k);
    const key = nodes.map((n) => n.name).sort().join(",") + "#" + [...pairs.keys()].sort().join(",") + "#" + roots().join(",");
    if (key !== graphKey) {          // the node or link set changed: lay out again
      graphKey = key;
      const { pos, hubs } = layout(nodes, pairs);
      cy.batch(() => {
        cy.elements().remove();
        cy.add(nodes.map((n) => ({ group: "nodes", data: { id: n.name, color: stateColor(n.state), size: hubs.has(n.name) ? 26 : 14 },
          position: pos[n.name] || { x: 0, y: 0 }, classes: hubs.has(n.name) ? "hub" : "" })));
        cy.add([...pairs.values()].map((p) => ({ group: "edges", data: { id: p.id, source: p.a, target: p.b, color: "#cbd5e1", w: 1, label: "" } })));
      });
      cy.fit(undefined, 24);
      if (cy.zoom() > 1.8) { cy.zoom(1.8); cy.center(); }     // a few nodes: not giant
    }
    const byName = new Map(nodes.map((n) => [n.name, n]));
    const match = new Set(nodes.filter((n) => nodeMatches(n, q)).map((n) => n.name));
    const sel = $("topn").value;      // "auto": every pair up to 100, else the 50 most loaded
    const topn = sel === "auto" ? (pairs.size <= 100 ? Infinity : 50) : Number(sel) || Infinity;
    const ranked = [...pairs.values()].filter((p) => !q || match.has(p.a) || match.has(p.b))
      .sort((x, y) => (y.down - x.down) || (y.load - x.load) || natural(x.id, y.id));
    const shown = new Map(ranked.slice(0, topn).map((p, i) => [p.id, i]));
    const labelAll = shown.size <= 12;      // else only the busiest links carry a label
    cy.batch(() => {
      cy.nodes().forEach((el) => {
        const n = byName.get(el.id());
        if (!n) return;
        el.data({ color: stateColor(n.state), tip: nodeTip(n) });
        el.toggleClass("faded", !match.has(n.name));
      });
      cy.edges().forEach((el) => {
        const p = pairs.get(el.id());
        const i = shown.get(el.id());
        el.toggleClass("off", i === undefined);
        if (!p || i === undefined) return;
        const t = p.top;
        el.data({
          color: loadColor(p.load, p.down), w: 1 + 4 * Math.min(1, p.load),
          label: labelAll || (i < LABELLED_EDGES && p.load >= 0.05) ? `${fmtShort(t.achieved_bps)}/${fmtShort(t.rate_bps)}` : "",
          tip: p.dirs.map((l) => `${l.src} → ${l.dst}: ${fmtRate(l.achieved_bps)} of ${fmtRate(l.rate_bps)}` +
            (finite(l.load) ? ` (${Math.round(l.load * 100)}%)` : "") + (l.down ? " DOWN" : "")).join("\n"),
        });
        el.toggleClass("down", p.down);
      });
    });
    $("graph-note").textContent = `${shown.size} of ${pairs.size} node pairs drawn` + (st.links_cut ? ` (of ${st.links_total} links, the most loaded sent)` : "");
  }

  function nodeTip(n) {
    return [`${n.name}  ${n.role || ""}`, `state ${n.state || "?"}, round ${n.round ?? "–"}`,
      `heartbeat ${fmtAge(n.hb_age_s)} ago`, `cpu ${finite(n.cpu_pct) ? n.cpu_pct.toFixed(0) + "%" : "–"}, mem ${finite(n.mem_mb) ? n.mem_mb.toFixed(0) + " MB" : "–"}`,
      `${n.kind || ""} on ${n.worker || "?"}`, n.error ? `error: ${n.error}` : ""].filter(Boolean).join("\n");
  }

  // ------------------------------------------------------------------ learning curves (uPlot)
  const charts = {};
  // [x values, series...] on one sorted x axis (seconds since the run started)
  function perNodeSeries(recs, t0, names) {
    const xs = [...new Set(recs.map((r) => +(r.t - t0).toFixed(3)))].sort((a, b) => a - b);
    const at = new Map(xs.map((x, i) => [x, i]));
    const ys = names.map(() => new Array(xs.length).fill(null));
    const idx = new Map(names.map((n, i) => [n, i]));
    const rounds = new Array(xs.length).fill(null);
    for (const r of recs) {
      const i = at.get(+(r.t - t0).toFixed(3)), k = idx.get(r.node);
      if (k === undefined) continue;
      ys[k][i] = r.v;
      rounds[i] = r.round;
    }
    return { data: [xs, ...ys], labels: names, rounds };
  }
  function bandSeries(recs, t0) {            // per round: mean, min, max across nodes
    const by = new Map();
    for (const r of recs) {
      if (!finite(r.round)) continue;
      let g = by.get(r.round);
      if (!g) by.set(r.round, (g = { ts: [], vs: [] }));
      g.ts.push(r.t); g.vs.push(r.v);
    }
    const rows = [...by.entries()].map(([round, g]) => ({
      round, x: g.ts.reduce((a, b) => a + b, 0) / g.ts.length - t0,
      mean: g.vs.reduce((a, b) => a + b, 0) / g.vs.length, min: Math.min(...g.vs), max: Math.max(...g.vs), n: g.vs.length,
    })).sort((a, b) => a.x - b.x);
    return { data: [rows.map((r) => r.x), rows.map((r) => r.mean), rows.map((r) => r.min), rows.map((r) => r.max)],
      labels: ["mean", "min", "max"], rounds: rows.map((r) => r.round), band: true };
  }

  // An event's place on the time axis: its "t" (when it fired: seconds after the start of
  // training, as summary.json has it; a unix time is taken too), else its planned "at".
  function eventX(e, t0) {
    if (finite(e.t)) return e.t > 1e9 ? e.t - t0 : e.t;
    return finite(e.at) ? e.at : null;
  }
  function eventLabel(e) {
    const what = e.node || (Array.isArray(e.link) ? e.link.join(e.dir === "both" ? "↔" : "→") : e.link) || "";
    return `${e.action || "?"} ${what}${e.bw ? " " + e.bw : ""}`;
  }
  const eventsPlugin = () => ({
    hooks: {
      draw: [(u) => {
        const t0 = u._t0, ctx = u.ctx;
        if (t0 == null) return;
        ctx.save();
        ctx.strokeStyle = "rgba(239,68,68,.8)"; ctx.fillStyle = "#b91c1c"; ctx.lineWidth = 1;
        ctx.setLineDash([4, 3]); ctx.font = "10px system-ui, sans-serif";
        let lastX = -1e9, row = 0;
        for (const e of S.events) {
          const x = eventX(e, t0);
          if (x == null) continue;
          const px = u.valToPos(x, "x", true);
          if (px < u.bbox.left || px > u.bbox.left + u.bbox.width) continue;
          ctx.beginPath(); ctx.moveTo(px, u.bbox.top); ctx.lineTo(px, u.bbox.top + u.bbox.height); ctx.stroke();
          row = px - lastX < 70 ? (row + 1) % 3 : 0;
          lastX = px;
          ctx.fillText(eventLabel(e), px + 3, u.bbox.top + 10 + row * 11);
        }
        ctx.restore();
      }],
    },
  });

  function lastEventX(t0) {
    let m = 0;
    if (t0 == null) return m;
    for (const e of S.events) { const x = eventX(e, t0); if (x != null && x > m) m = x * 1.02; }
    return m;
  }
  function chart(id, built, yLabel, yRange) {
    const el = $(id);
    const width = Math.max(200, el.clientWidth), height = 180;
    const sig = built.labels.join(",") + (built.band ? "#band" : "");
    let c = charts[id];
    if (c && c.sig !== sig) { c.u.destroy(); c = charts[id] = null; }
    if (!c) {
      const series = [{ label: "time", value: (u, v) => (v == null ? "–" : `${v.toFixed(0)} s`) }];
      built.labels.forEach((name, i) => {
        const band = built.band && i > 0;
        series.push({ label: name, stroke: built.band ? (band ? "#93c5fd" : "#2563eb") : PALETTE[i % PALETTE.length],
          width: band ? 1 : 2, dash: band ? [4, 3] : undefined, spanGaps: true,
          points: { show: true, size: band ? 3 : 5 }, value: (u, v) => (v == null ? "–" : v.toFixed(4)) });
      });
      const u = new uPlot({
        width, height, series, plugins: [eventsPlugin()],
        scales: {
          // fixed ranges while empty (uPlot cannot split an axis without data); x from the start
          x: { time: false, range: (u, mn, mx) => [0, Math.max(10, finite(mx) ? mx * 1.02 : 0, lastEventX(u._t0))] },
          y: { range: yRange },
        },
        axes: [{ label: "seconds since the run started", labelSize: 16, size: 36, font: "11px system-ui", labelFont: "11px system-ui" },
          { label: yLabel, labelSize: 16, size: 48, font: "11px system-ui", labelFont: "11px system-ui" }],
        legend: { show: built.labels.length <= PER_NODE_SERIES + 3 },
        cursor: { drag: { x: true, y: false } },
      }, built.data, el);
      c = charts[id] = { u, sig };
    } else {
      if (c.u.width !== width) c.u.setSize({ width, height });
      c.u.setData(built.data);
    }
    el.dataset.points = String(built.data.slice(1).reduce((a, s) => a + s.filter((v) => v != null).length, 0));
    return c.u;
  }

  function drawCharts() {
    if (typeof uPlot !== "function") return;
    const run = S.state.run || {};
    const first = Math.min(...[S.acc[0], S.loss[0]].filter(Boolean).map((r) => r.t));
    const t0 = finite(run.started) ? run.started : (isFinite(first) ? first : S.state.t);
    const rs = roots();
    // accuracy: the root(s); rootless runs: every node (mean and range when many)
    const accRecs = rs.length ? S.acc.filter((r) => rs.includes(r.node)) : S.acc;
    const accNodes = [...new Set(accRecs.map((r) => r.node))].sort(natural);
    const acc = accNodes.length > PER_NODE_SERIES ? bandSeries(accRecs, t0)
      : perNodeSeries(accRecs, t0, accNodes.length ? accNodes : (rs.length ? rs : ["accuracy"]));
    const ua = chart("acc", acc, "accuracy", (u, mn, mx) => [0, 1]);
    ua._t0 = t0;
    $("acc-title").textContent = rs.length ? `Accuracy of ${rs.join(", ")}` : run.started == null ? "Accuracy" : "Accuracy per node";
    $("acc-note").textContent = accRecs.length ? `${accRecs.length} point(s)` + (acc.band ? `, ${accNodes.length} nodes: mean and range` : "") : "waiting for the first aggregate";
    const lossNodes = [...new Set(S.loss.map((r) => r.node))].sort(natural);
    const loss = lossNodes.length > PER_NODE_SERIES ? bandSeries(S.loss, t0)
      : perNodeSeries(S.loss, t0, lossNodes.length ? lossNodes : ["loss"]);
    const ul = chart("loss", loss, "training loss",
      (u, mn, mx) => (finite(mn) && finite(mx) ? [Math.min(0, mn), mx > 0 ? mx * 1.08 : 1] : [0, 1]));
    ul._t0 = t0;
    $("loss-note").textContent = S.loss.length ? `${lossNodes.length} node(s)` + (loss.band ? ": mean and range per round" : "") : "waiting for the first training";
    ua.redraw(false, false); ul.redraw(false, false);
    const evs = S.events.slice(-8).reverse();
    $("events").innerHTML = S.events.length
      ? `<b>${S.events.length} fault event(s)</b> ` + evs.map((e) => `<span title="${esc(e.detail || "")}">${finite(e.at) ? e.at.toFixed(0) + " s " : ""}${esc(eventLabel(e))}${e.ok === false ? " (failed)" : ""}</span>`).join("")
      : "";
  }

  // ------------------------------------------------------------------ tables (bounded)
  function drawNodes() {
    const q = filterText();
    const nodes = S.state.nodes.filter((n) => nodeMatches(n, q))
      .sort((a, b) => ((b.state === "error") - (a.state === "error")) || natural(a.name, b.name));
    const rows = nodes.slice(0, NODE_ROWS).map((n) => {
      const hb = finite(n.hb_age_s) ? fmtAge(n.hb_age_s) : "–";
      return `<tr data-node="${esc(n.name)}" data-state="${esc(n.state)}" class="${n.state === "error" ? "bad" : ""}" title="${esc(n.error || "")}">` +
        `<td>${esc(n.name)}</td><td>${esc(n.role || "–")}</td>` +
        `<td><span class="state" style="background:${stateColor(n.state)}">${esc(n.state || "?")}</span></td>` +
        `<td class="r">${n.round ?? "–"}</td><td class="r${finite(n.hb_age_s) && n.hb_age_s > 10 ? " flag" : ""}">${hb}</td>` +
        `<td class="r">${finite(n.cpu_pct) ? n.cpu_pct.toFixed(0) + "%" : "–"}</td>` +
        `<td class="r">${finite(n.mem_mb) ? n.mem_mb.toFixed(0) + " MB" : "–"}</td>` +
        `<td class="muted">${esc(n.kind || "")}${n.worker ? " · " + esc(n.worker) : ""}</td></tr>` +
        (n.error ? `<tr class="bad"><td></td><td colspan="7" class="errtext">${esc(n.error)}</td></tr>` : "");
    });
    if (nodes.length > NODE_ROWS) rows.push(`<tr class="more"><td colspan="8">… ${nodes.length - NODE_ROWS} more: narrow the filter</td></tr>`);
    $("nodes").tBodies[0].innerHTML = rows.join("");
    $("nodes-note").textContent = q ? `${nodes.length} of ${S.state.nodes.length} match` : `${nodes.length}`;
  }

  function drawLinks() {
    const q = filterText();
    const byName = new Map(S.state.nodes.map((n) => [n.name, n]));
    const links = (S.state.links || []).filter((l) => !q || [l.src, l.dst].some((x) => byName.has(x) ? nodeMatches(byName.get(x), q) : String(x).toLowerCase().includes(q)))
      .sort((a, b) => ((b.down || 0) - (a.down || 0)) || ((b.load || 0) - (a.load || 0)) || natural(`${a.src}>${a.dst}`, `${b.src}>${b.dst}`));
    $("links").tBodies[0].innerHTML = links.slice(0, LINK_ROWS).map((l) => {
      const pct = finite(l.load) ? Math.round(l.load * 100) : null;
      return `<tr data-src="${esc(l.src)}" data-dst="${esc(l.dst)}" data-achieved-bps="${finite(l.achieved_bps) ? l.achieved_bps : ""}" data-rate-bps="${finite(l.rate_bps) ? l.rate_bps : ""}">` +
        `<td>${esc(l.src)} → ${esc(l.dst)}</td><td class="r">${fmtRate(l.rate_bps)}</td>` +
        `<td class="r achieved">${l.down ? '<span class="flag">down</span>' : fmtRate(l.achieved_bps)}</td>` +
        `<td><span class="bar"><i style="width:${Math.min(100, pct ?? 0)}%;background:${loadColor(l.load, l.down)}"></i></span> ${pct == null ? "–" : pct + "%"}</td></tr>`;
    }).join("");
    $("links-note").textContent = `${Math.min(LINK_ROWS, links.length)} of ${links.length}` + (S.state.links_cut ? ` (${S.state.links_total} in all)` : "");
  }

  function drawFidelity() {
    const f = S.fidelity;
    const body = $("fidelity").tBodies[0];
    if (!f) { body.innerHTML = ""; $("fid-note").textContent = "no data yet"; return; }
    const rows = f.links.slice().sort((a, b) => (a.ok - b.ok) || (Math.abs(b.error_pct) - Math.abs(a.error_pct)));
    body.innerHTML = rows.slice(0, 500).map((l) => `<tr class="${l.ok ? "" : "bad"}" data-src="${esc(l.src)}" data-dst="${esc(l.dst)}">` +
      `<td>${esc(l.src)} → ${esc(l.dst)}</td><td class="r">${fmtRate(l.rate_bps)}</td><td class="r">${fmtRate(l.ideal_bps)}</td>` +
      `<td class="r">${fmtRate(l.goodput_bps)}</td><td class="r">${finite(l.saturated_s) ? l.saturated_s.toFixed(0) + " s" : "–"}</td>` +
      `<td class="r">${finite(l.error_pct) ? (l.error_pct > 0 ? "+" : "") + l.error_pct.toFixed(2) + "%" : "–"}</td>` +
      `<td>${l.ok ? '<span class="ok">ok</span>' : '<span class="flag">outside ±' + esc(f.tolerance_pct) + "%</span>"}</td></tr>`).join("");
    const bad = f.links.filter((l) => !l.ok).length;
    $("fid-note").textContent = `${f.links.length} link(s) checked, ${bad} flagged, tolerance ±${f.tolerance_pct}%`;
  }
  function drawFidelityBadge() {
    const bad = S.fidelity ? S.fidelity.links.filter((l) => !l.ok).length : 0;
    $("fid-badge").hidden = !bad;
    $("fid-badge").textContent = String(bad);
  }

  // ------------------------------------------------------------------ runs (asked for when the tab opens)
  let runs = null;
  async function loadRuns() {
    $("runs-note").textContent = "loading…";
    try {
      const r = await fetch("/api/runs", { credentials: "same-origin", cache: "no-store" });
      if (r.status === 401) { showLogin(""); return; }
      if (!r.ok) throw new Error(`HTTP ${r.status}`);
      runs = (await r.json()).runs || [];
    } catch (e) { $("runs-note").textContent = `could not load: ${e.message}`; return; }
    $("runs-note").textContent = `${runs.length} run(s), newest first`;
    $("runs").tBodies[0].innerHTML = runs.map((run, i) => {
      const s = run.summary || {};
      const plots = (run.plots || []).length + (run.dashboard ? " + dashboard" : "");
      return `<tr data-i="${i}"><td><code>${esc(run.name)}</code></td><td>${esc(s.algorithm || "–")}</td>` +
        `<td class="r">${s.rounds ?? "–"}</td><td class="r">${finite(s.final_accuracy) ? s.final_accuracy.toFixed(4) : "–"}</td>` +
        `<td class="r">${finite(s.wall_seconds) ? fmtDur(s.wall_seconds) : "–"}</td><td>${plots || "–"}</td></tr>`;
    }).join("");
    if (runs.length) showRun(0);
  }
  function showRun(i) {
    const run = runs && runs[i];
    if (!run) return;
    [...$("runs").tBodies[0].rows].forEach((tr) => tr.classList.toggle("sel", tr.dataset.i === String(i)));
    const base = `/runs/${encodeURIComponent(run.name)}/`;
    const files = [...(run.plots || [])];
    if (run.dashboard && !files.includes("dashboard.png")) files.push("dashboard.png");
    $("run-plots").innerHTML = files.length ? files.map((f) => `<figure><a href="${base + encodeURIComponent(f)}" target="_blank" rel="noopener">` +
      `<img loading="lazy" alt="${esc(f)}" src="${base + encodeURIComponent(f)}"></a><figcaption>${esc(f)}</figcaption></figure>`).join("")
      : '<p class="muted">no plots in this run folder</p>';
  }
  $("runs").tBodies[0].addEventListener("click", (e) => {
    const tr = e.target.closest("tr");
    if (tr) showRun(Number(tr.dataset.i));
  });
  $("runs-reload").addEventListener("click", loadRuns);

  // ------------------------------------------------------------------ tabs, controls
  function show(v) {
    view = v;
    for (const b of $("tabs").querySelectorAll("button")) b.classList.toggle("on", b.dataset.view === v);
    for (const s of document.querySelectorAll(".view")) s.hidden = s.id !== `view-${v}`;
    if (v === "runs" && runs === null) loadRuns();
    if (v === "live" && cy) cy.resize();
    lastDraw = 0;
    schedule();
  }
  $("tabs").addEventListener("click", (e) => { const b = e.target.closest("button"); if (b) show(b.dataset.view); });
  $("filter").addEventListener("input", () => schedule());
  $("topn").addEventListener("change", () => schedule());
  window.addEventListener("resize", () => { if (cy) cy.resize(); schedule(); });

  connect();
})();
