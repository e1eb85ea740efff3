// make-us-rich live dashboard: one symbol and interval at a time. History comes from the
// REST API, live updates from the SSE feed /v1/stream. Plain JS, no build step; the chart is
// TradingView's lightweight-charts (vendored under static/vendor).
"use strict";

(() => {
  const LWC = window.LightweightCharts;
  const $ = (id) => document.getElementById(id);
  const HISTORY = 300;               // candles and predictions loaded when a series is picked
  const MAX_POINTS = 5000;           // per series kept in the page; older points are dropped
  const POLL_MS = 10000;             // /v1/monitoring and /readyz
  const WATCHDOG_MS = 2000;          // how often a CLOSED EventSource is noticed and reopened
  const colors = {
    up: "#26a69a", down: "#ef5350", forecast: "#f5a623", band: "rgba(245, 166, 35, 0.18)",
  };

  // Errors the page ran into (the browser test asserts there are none).
  window.__murErrors = [];
  window.addEventListener("error", (e) => window.__murErrors.push(String(e.message)));
  window.addEventListener("unhandledrejection", (e) => window.__murErrors.push(String(e.reason)));

  // ---- a filled band between `lower` and `upper`: lightweight-charts has none built in ----

  class BandSeries {
    update(data) { this.data = data; }
    priceValueBuilder(row) { return [row.lower, row.upper, (row.lower + row.upper) / 2]; }
    isWhitespace(row) { return row.lower === undefined || row.upper === undefined; }
    defaultOptions() { return { ...LWC.customSeriesDefaultOptions }; }
    renderer() {
      return {
        draw: (target, toY) => target.useMediaCoordinateSpace(({ context: ctx }) => {
          const bars = this.data ? this.data.bars : [];
          if (bars.length === 0) return;
          const pts = bars.map((b) => [b.x, toY(b.originalData.upper), toY(b.originalData.lower)]);
          // Upper edge left to right, lower edge back: one closed polygon.
          ctx.beginPath();
          pts.forEach(([x, up], i) => (i ? ctx.lineTo(x, up) : ctx.moveTo(x, up)));
          for (let i = pts.length - 1; i >= 0; i--) ctx.lineTo(pts[i][0], pts[i][2]);
          ctx.closePath();
          ctx.fillStyle = colors.band;
          ctx.fill();
          // A single forecast has no area: draw its interval as a short vertical bar.
          ctx.strokeStyle = colors.forecast;
          ctx.lineWidth = 1;
          const [x, up, low] = pts[pts.length - 1];
          ctx.beginPath();
          ctx.moveTo(x, up);
          ctx.lineTo(x, low);
          ctx.stroke();
        }),
      };
    }
  }

  // ---- chart ----

  const chartEl = $("chart");
  const chart = LWC.createChart(chartEl, {
    autoSize: true,
    layout: { background: { color: "#171d24" }, textColor: "#d6dde6", attributionLogo: false },
    grid: { vertLines: { color: "#222a33" }, horzLines: { color: "#222a33" } },
    timeScale: { timeVisible: true, secondsVisible: false, rightOffset: 4, barSpacing: 12 },
    crosshair: { mode: LWC.CrosshairMode.Normal },
  });
  const band = chart.addCustomSeries(new BandSeries(), {
    lastValueVisible: false, priceLineVisible: false,
  });
  const candleSeries = chart.addSeries(LWC.CandlestickSeries, {
    upColor: colors.up, downColor: colors.down, borderVisible: false,
    wickUpColor: colors.up, wickDownColor: colors.down,
  });
  const forecast = chart.addSeries(LWC.LineSeries, {
    color: colors.forecast, lineWidth: 2, lineStyle: LWC.LineStyle.Dashed,
    pointMarkersVisible: true, pointMarkersRadius: 2, title: "forecast",
  });

  // ---- page state ----

  const config = JSON.parse(document.body.dataset.config || "{}");
  const query = new URLSearchParams(location.search);
  const state = {
    symbol: null,
    interval: null,
    generation: 0,        // bumped on every (re)load: late answers of an older one are ignored
    ready: false,         // history drawn; until then live events wait in `pending`
    pending: [],
    es: null,             // the EventSource
    lastEventId: null,    // newest SSE id seen: where a reopened stream resumes
    opens: 0,
    candles: new Map(),   // time (s) -> bar
    predictions: new Map(), // target time (s) -> prediction
    lastCandleT: -Infinity,
    lastPredictionT: -Infinity,
  };

  // ---- helpers ----

  const el = (tag, text, cls) => {
    const node = document.createElement(tag);
    if (text !== undefined) node.textContent = text;
    if (cls) node.className = cls;
    return node;
  };
  const utc = (ms) => new Date(ms).toISOString().replace("T", " ").slice(0, 19) + " UTC";
  const precisionOf = (price) => (price < 1 ? 8 : price < 100 ? 4 : 2);
  const fmt = (x, digits = 2) => (x === null || x === undefined ? "n/a" : Number(x).toFixed(digits));
  const pct = (x) => (x === null || x === undefined ? "n/a" : (100 * x).toFixed(1) + "%");

  async function getJSON(url) {
    const response = await fetch(url, { headers: { Accept: "application/json" } });
    if (!response.ok) {
      const error = new Error(`${url}: HTTP ${response.status}`);
      error.status = response.status;
      throw error;
    }
    return response.json();
  }

  function setStatus(text) { $("status").textContent = text; }

  function setConn(name) {
    const badge = $("conn");
    badge.textContent = name;
    badge.dataset.state = name;
    badge.dataset.opens = String(state.opens);
  }

  function fill(select, values, chosen) {
    select.replaceChildren(...values.map((v) => Object.assign(el("option", v), { value: v })));
    select.value = chosen;
  }

  // ---- drawing: the newest point goes through update(), anything else redraws ----

  function sortedValues(map) {
    return [...map.entries()].sort((a, b) => a[0] - b[0]).map(([, v]) => v);
  }

  function trim(map) {
    if (map.size <= MAX_POINTS) return;
    const keys = [...map.keys()].sort((a, b) => a - b);
    keys.slice(0, map.size - MAX_POINTS).forEach((k) => map.delete(k));
  }

  function setPrecision(price) {
    const precision = precisionOf(price);
    const priceFormat = { type: "price", precision, minMove: 10 ** -precision };
    [candleSeries, forecast, band].forEach((s) => s.applyOptions({ priceFormat }));
  }

  function redrawCandles() {
    candleSeries.setData(sortedValues(state.candles));
  }

  function redrawPredictions() {
    const rows = sortedValues(state.predictions);
    forecast.setData(rows.map((p) => ({ time: p.target_open_time / 1000, value: p.predicted_close })));
    band.setData(rows.map((p) => ({ time: p.target_open_time / 1000, lower: p.lower, upper: p.upper })));
  }

  function addCandle(c, draw = true) {
    const t = c.open_time / 1000;
    const bar = { time: t, open: c.open, high: c.high, low: c.low, close: c.close };
    if (state.candles.size === 0) setPrecision(c.close);
    state.candles.set(t, bar);
    if (draw && t >= state.lastCandleT && state.candles.size <= MAX_POINTS) {
      candleSeries.update(bar);
    } else if (draw) {
      trim(state.candles);
      redrawCandles();
    }
    state.lastCandleT = Math.max(state.lastCandleT, t);
    chartEl.dataset.candles = String(state.candles.size);
    chartEl.dataset.lastCandleTime = String(state.lastCandleT * 1000);
  }

  function addPrediction(p, draw = true) {
    const t = p.target_open_time / 1000;
    state.predictions.set(t, p);
    if (draw && t >= state.lastPredictionT && state.predictions.size <= MAX_POINTS) {
      forecast.update({ time: t, value: p.predicted_close });
      band.update({ time: t, lower: p.lower, upper: p.upper });
    } else if (draw) {
      trim(state.predictions);
      redrawPredictions();
    }
    if (t >= state.lastPredictionT) {
      state.lastPredictionT = t;
      showLastPrediction(p);
    }
    chartEl.dataset.predictions = String(state.predictions.size);
    chartEl.dataset.lastPredictionTime = String(state.lastPredictionT * 1000);
  }

  function showLastPrediction(p) {
    const digits = precisionOf(p.last_close);
    const box = $("last-prediction");
    box.replaceChildren(
      el("div", `${p.symbol} ${p.interval} · close of the candle at ${utc(p.target_open_time)}`,
        "small muted"),
      el("div", fmt(p.predicted_close, digits), "value"),
      el("div", `80% interval ${fmt(p.lower, digits)} – ${fmt(p.upper, digits)}`, "small"),
      el("div", `last close ${fmt(p.last_close, digits)} · source ${p.source}`, "small muted"),
    );
    box.dataset.targetOpenTime = String(p.target_open_time);
    box.dataset.predictedClose = String(p.predicted_close);
    $("model-version").textContent = p.model_version;
  }

  // ---- live events ----

  function onEvent(type, data) {
    if (type === "alert") return showAlert(data);
    if (data.symbol !== state.symbol || data.interval !== state.interval) return;
    if (type === "candle") addCandle(data);
    else if (type === "prediction") addPrediction(data);
    else if (type === "drift") showDriftEvent(data);
  }

  function showAlert(a) {
    const list = $("alerts");
    if (list.querySelector(".muted")) list.replaceChildren();
    const version = a.model_version ? ` (${a.model_version})` : "";
    list.prepend(el("li", `${utc(a.ts_event)} ${a.kind}${version}: ${a.message}`));
    while (list.children.length > 20) list.lastChild.remove();
  }

  // The stream is filtered to one symbol and interval; without an `events` parameter it
  // carries every type the server offers (candle, prediction, alert, and drift once
  // /v1/stream accepts it). The browser reconnects by itself after a network error, sending
  // Last-Event-ID; the watchdog below reopens a stream that ended for good (closed, or
  // refused by the server), resuming with ?last_event_id=.
  function openStream() {
    const params = new URLSearchParams({ symbols: state.symbol, interval: state.interval });
    if (state.lastEventId) params.set("last_event_id", state.lastEventId);
    const es = new EventSource("v1/stream?" + params);
    state.es = es;
    window.__murSSE = es;
    es.onopen = () => {
      if (es !== state.es) return;
      state.opens += 1;
      setConn("live");
    };
    es.onerror = () => {
      if (es === state.es) setConn("reconnecting");
    };
    for (const type of ["candle", "prediction", "alert", "drift"]) {
      es.addEventListener(type, (ev) => {
        if (es !== state.es) return;
        if (ev.lastEventId) state.lastEventId = ev.lastEventId;
        const data = JSON.parse(ev.data);
        if (state.ready) onEvent(type, data);
        else state.pending.push([type, data]);
      });
    }
  }

  function closeStream() {
    if (state.es) state.es.close();
    state.es = null;
  }

  setInterval(() => {
    if (state.es && state.es.readyState === EventSource.CLOSED) {
      setConn("reconnecting");
      openStream();
    }
  }, WATCHDOG_MS);

  // ---- loading a series: open the stream first, then read history, then replay the
  // events that arrived meanwhile (points already in the history are simply replaced) ----

  async function load() {
    const generation = ++state.generation;
    closeStream();
    Object.assign(state, {
      ready: false, pending: [], lastEventId: null,
      candles: new Map(), predictions: new Map(), lastCandleT: -Infinity, lastPredictionT: -Infinity,
    });
    candleSeries.setData([]);
    redrawPredictions();
    chartEl.dataset.ready = "false";
    chartEl.dataset.candles = chartEl.dataset.predictions = "0";
    chartEl.dataset.lastCandleTime = chartEl.dataset.lastPredictionTime = "";
    $("last-prediction").textContent = "waiting for the first forecast…";
    chart.timeScale().applyOptions({ secondsVisible: state.interval.endsWith("s") });
    history.replaceState(null, "", `?symbol=${state.symbol}&interval=${state.interval}`);
    setConn("connecting");
    openStream();

    const path = encodeURIComponent(state.symbol);
    const qs = `interval=${encodeURIComponent(state.interval)}&limit=${HISTORY}`;
    try {
      const [candles, predictions] = await Promise.all([
        getJSON(`v1/candles/${path}?${qs}`),
        getJSON(`v1/predictions/${path}/history?${qs}`),
      ]);
      if (generation !== state.generation) return;
      candles.forEach((c) => addCandle(c, false));
      predictions.forEach((p) => addPrediction(p, false));
      redrawCandles();
      redrawPredictions();
      if (state.candles.size >= 40) chart.timeScale().fitContent();
      state.ready = true;
      chartEl.dataset.ready = "true";
      state.pending.forEach(([type, data]) => onEvent(type, data));
      state.pending = [];
      setStatus("");
    } catch (error) {
      if (generation !== state.generation) return;
      setStatus(`cannot load history (${error.message}); retrying`);
      setTimeout(() => generation === state.generation && load(), 3000);
    }
    poll();
  }

  // ---- model, quality and drift: polled ----

  async function poll() {
    const { symbol, interval } = state;
    try {
      // /readyz answers JSON with model_version both when ready (200) and not (503).
      const ready = await (await fetch("readyz")).json();
      $("ready-model").textContent = ready.model_version || "n/a";
    } catch (_) {
      $("ready-model").textContent = "n/a";
    }
    let monitoring = null;
    try {
      const qs = `interval=${encodeURIComponent(interval)}`;
      monitoring = await getJSON(`v1/monitoring/${encodeURIComponent(symbol)}?${qs}`);
    } catch (_) {
      // 404 (no monitoring yet, or an API without it) or unreachable: n/a, keep going.
    }
    if (symbol === state.symbol && interval === state.interval) showMonitoring(monitoring);
  }

  function showMonitoring(m) {
    const box = $("quality");
    if (!m || !m.quality || m.quality.length === 0) {
      box.replaceChildren(el("span", "n/a"));
      box.className = "muted";
    } else {
      // One block per model version scored on this series (most recently updated first).
      box.replaceChildren(...m.quality.map((q) => {
        const block = el("div", undefined, "quality-block");
        block.append(
          el("div", q.model_version, "version"),
          el("div", `last ${Math.min(q.window, q.scored)} of ${q.scored} scored · ` +
            `MAE ${fmt(q.mae, 3)} (persistence ${fmt(q.mae_persistence, 3)})`, "small"),
          el("div", `skill ${fmt(q.skill, 4)} · hit rate ${pct(q.hit_rate)} · ` +
            `80% coverage ${pct(q.coverage_80)}`, "small"),
        );
        return block;
      }));
      box.className = "";
    }
    const drift = m && m.drift;
    if (!drift) return showDrift("n/a", "");
    showDrift(drift.state, driftDetail(drift.psi_max, drift.error_ratio_drift, drift.reason));
  }

  function driftDetail(psiMax, errorRatio, reason) {
    const parts = [];
    if (psiMax !== null && psiMax !== undefined) parts.push(`PSI max ${fmt(psiMax, 3)}`);
    if (errorRatio !== null && errorRatio !== undefined) parts.push(`error ratio ${fmt(errorRatio, 2)}`);
    if (reason) parts.push(reason);
    return parts.join(" · ");
  }

  function showDrift(name, detail) {
    $("drift").textContent = name;
    $("drift").dataset.state = name;
    $("drift-detail").textContent = detail;
  }

  // A live drift event: "drift" or "recovered" (recovered shows as ok until the next poll).
  function showDriftEvent(d) {
    const detail = driftDetail(d.psi_max, d.error_ratio_drift, d.reason);
    showDrift(d.status === "drift" ? "drift" : "ok", detail);
  }

  // ---- pickers ----

  async function start() {
    const intervals = config.intervals && config.intervals.length ? config.intervals : ["1m"];
    let symbols = config.symbols || [];
    try {
      // Symbols the worker wrote besides the configured ones (one latest forecast each).
      const qs = `interval=${encodeURIComponent(intervals[0])}`;
      const latest = await getJSON(`v1/predictions/latest?${qs}`);
      symbols = [...new Set([...symbols, ...latest.map((p) => p.symbol)])];
    } catch (_) { /* the configured symbols will do */ }
    if (symbols.length === 0) return setStatus("no symbols: is this page served by the API?");
    const wanted = (query.get("symbol") || "").toUpperCase();
    state.symbol = symbols.includes(wanted) ? wanted : symbols[0];
    state.interval = intervals.includes(query.get("interval")) ? query.get("interval") : intervals[0];
    fill($("symbol"), symbols, state.symbol);
    fill($("interval"), intervals, state.interval);
    $("symbol").addEventListener("change", (e) => { state.symbol = e.target.value; load(); });
    $("interval").addEventListener("change", (e) => { state.interval = e.target.value; load(); });
    setInterval(poll, POLL_MS);
    load();
  }

  start();
})();
