// The dashboard's pages: subscribe over /ws to this page's view and redraw on each push.
// window.dashboard counts updates and the newest update latency (for tests and the eye).
"use strict";
const body = document.body;
const pageName = body.dataset.page;
window.dashboard = { updates: 0, latencyMs: null, errors: [], last: null, connected: false };

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}

function table(id, headers, rows, empty) {
  const holder = document.getElementById(id);
  if (!holder) return;
  holder.replaceChildren();
  if (!rows.length) { holder.append(el("p", empty || "none", "muted")); return; }
  const t = el("table");
  const head = el("tr");
  headers.forEach(h => head.append(el("th", h)));
  t.append(head);
  rows.forEach(r => {
    const tr = el("tr");
    r.forEach(cell => {
      if (cell instanceof Node) { const td = el("td"); td.append(cell); tr.append(td); }
      else tr.append(el("td", cell === null || cell === undefined ? "" : cell));
    });
    t.append(tr);
  });
  holder.append(t);
}

const time = ms => ms ? new Date(ms).toISOString().replace("T", " ").slice(0, 19) : "";
const dates = list => list.map(ms => new Date(ms));
const plotConfig = { displaylogo: false, responsive: true };

function renderTopology(d) {
  const status = d.status || {};
  const summary = document.getElementById("summary");
  summary.textContent = d.error ? d.error :
    `namespace ${d.namespace}, phase ${status.phase}, execution ${status.execution ? status.execution.mode : "?"}` +
    `, kill switch ${d.kill_switch ? "ON" : "off"}; dashboard read ${d.feed.records} records` +
    (d.feed.error ? ` (feed: ${d.feed.error})` : "");
  summary.className = d.error ? "error" : "";
  table("processes", ["process", "state", "pid", "restarts", "last error"],
    (status.processes || []).map(p => [p.name,
      el("span", p.up ? "up" : (p.finished ? "finished" : (p.gave_up ? "gave up" : "down")), p.up ? "up" : "down"),
      p.pid, p.restarts, p.last_error || ""]), "no processes reported yet");
  table("groups", ["group", "members", "lag", "records/s"],
    Object.entries(status.groups || {}).map(([g, v]) => [g, v.members, v.lag, v.records_per_s.toFixed(1)]),
    "no consumer groups yet");
  table("topics", ["topic", "partitions", "records", "records/s"],
    Object.entries(status.topics || {}).map(([t, v]) => [t, v.partitions, v.end_offset, v.records_per_s.toFixed(1)]),
    "no topics yet");
}

function renderSymbol(d) {
  const top = document.getElementById("top");
  if (d.top) {
    const bid = d.top.bid, ask = d.top.ask;
    top.textContent = `bid ${bid ? bid.quantity + " @ " + bid.price : "—"} · ask ` +
      `${ask ? ask.quantity + " @ " + ask.price : "—"} · spread ${d.top.spread ?? "—"} · ` +
      `book at ${time(d.top.published_ms)}`;
  }
  if (d.depth) {
    Plotly.react("depth", [
      { x: d.depth.bids.price, y: d.depth.bids.cumulative, name: "bids", type: "scatter",
        mode: "lines", line: { shape: "hv", color: "#1b7f3b" }, fill: "tozeroy" },
      { x: d.depth.asks.price, y: d.depth.asks.cumulative, name: "asks", type: "scatter",
        mode: "lines", line: { shape: "hv", color: "#b3261e" }, fill: "tozeroy" },
    ], { title: { text: "Depth" }, xaxis: { title: { text: "price" } },
         yaxis: { title: { text: "cumulative quantity" } }, margin: { t: 40, r: 10 },
         uirevision: d.symbol }, plotConfig);
  }
  const c = d.candles;
  const buys = d.trades.side.map(s => String(s).toUpperCase() === "BUY");
  const pick = (values, want) => values.filter((_, i) => buys[i] === want);
  Plotly.react("candles", [
    { type: "candlestick", name: `bars ${c.interval}`, x: dates(c.start_ms), open: c.open,
      high: c.high, low: c.low, close: c.close },
    { type: "scatter", mode: "markers", name: "buys", x: dates(pick(d.trades.ms, true)),
      y: pick(d.trades.price, true), marker: { color: "#1b7f3b", size: 5, symbol: "triangle-up" } },
    { type: "scatter", mode: "markers", name: "sells", x: dates(pick(d.trades.ms, false)),
      y: pick(d.trades.price, false), marker: { color: "#b3261e", size: 5, symbol: "triangle-down" } },
  ], { title: { text: `Candles (${c.interval}) and trades` }, xaxis: { rangeslider: { visible: false } },
       margin: { t: 40, r: 10 }, uirevision: d.symbol }, plotConfig);
  table("health", ["time", "kind", "detail"], d.health.map(h => [time(h.ms), h.kind, h.detail]),
    "no book health events");
}

function renderTrading(d) {
  const state = document.getElementById("kill-state");
  state.textContent = d.kill_switch ? "ON" : "off";
  state.className = d.kill_switch ? "on" : "off";
  const button = document.getElementById("kill-button");
  button.textContent = d.kill_switch ? "Turn the kill switch off" : "Turn the kill switch ON";
  button.dataset.on = d.kill_switch ? "true" : "false";
  document.getElementById("counts").textContent = "order events: " +
    (Object.entries(d.counts).map(([k, n]) => `${k} ${n}`).join(", ") || "none yet");
  const strategies = Object.entries(d.strategies);
  table("strategies", ["strategy", "equity", "realized", "unrealized", "fees", "drawdown", "fills", "halted"],
    strategies.map(([s, v]) => [s, v.pnl.equity, v.pnl.realized_pnl, v.pnl.unrealized_pnl, v.pnl.fees,
      v.pnl.drawdown, v.pnl.fills, v.pnl.halted ? "HALTED" : "no"]), "no portfolio records yet");
  if (strategies.length) {
    Plotly.react("equity", strategies.map(([s, v]) => ({ type: "scatter", mode: "lines", name: s,
      x: dates(v.equity.ms), y: v.equity.value })),
      { title: { text: "Equity" }, margin: { t: 40, r: 10 }, uirevision: "equity" }, plotConfig);
  }
  table("positions", ["strategy", "symbol", "quantity", "avg entry", "mark", "realized", "unrealized"],
    d.positions.map(p => [p.strategy_id, p.symbol, p.quantity, p.average_entry, p.mark,
      p.realized_pnl, p.unrealized_pnl]), "no positions");
  table("orders", ["time", "order", "strategy", "symbol", "side", "price", "amount", "filled", "state"],
    d.open_orders.map(o => [time(o.event_ms), o.client_order_id, o.strategy_id, o.symbol, o.side,
      o.price, o.amount, o.filled_amount, o.kind]), "no open orders");
  table("fills", ["time", "order", "strategy", "symbol", "side", "price", "amount", "fee", "liquidity"],
    d.fills.map(f => [time(f.event_ms), f.client_order_id, f.strategy_id, f.symbol, f.side,
      f.last_fill_price, f.last_fill_amount, f.last_fill_fee, f.liquidity]), "no fills yet");
  table("rejections", ["time", "order", "strategy", "symbol", "kind", "reason"],
    d.rejections.map(r => [time(r.event_ms), r.client_order_id, r.strategy_id, r.symbol, r.kind,
      r.reason]), "no rejections");
}

const renderers = { topology: renderTopology, symbol: renderSymbol, trading: renderTrading };

function connect(delay) {
  const ws = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`);
  ws.onopen = () => {
    window.dashboard.connected = true;
    ws.send(JSON.stringify({ subscribe: pageName, symbol: body.dataset.symbol }));
  };
  ws.onmessage = event => {
    const message = JSON.parse(event.data);
    if (message.type === "error") { window.dashboard.errors.push(message.error); return; }
    renderers[message.type](message.data);
    window.dashboard.updates += 1;
    window.dashboard.last = message.data;
    if (message.data.newest_ms) window.dashboard.latencyMs = Date.now() - message.data.newest_ms;
  };
  ws.onclose = () => {
    window.dashboard.connected = false;
    setTimeout(() => connect(Math.min(delay * 2, 10000)), delay);
  };
  window.dashboard.socket = ws;
}

if (pageName === "trading") {
  document.getElementById("kill-button").addEventListener("click", async () => {
    const on = document.getElementById("kill-button").dataset.on !== "true";
    const text = on ? body.dataset.confirmOn : body.dataset.confirmOff;
    if (!window.confirm(text)) return;
    const reply = await fetch("/api/kill-switch", { method: "POST",
      headers: { "Content-Type": "application/json" }, body: JSON.stringify({ on, confirm: text }) });
    if (!reply.ok) window.dashboard.errors.push((await reply.json()).error);
  });
}
if (renderers[pageName]) connect(500);
