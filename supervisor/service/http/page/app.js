// gpuvisor's status page: polls /v1/glance once a second and draws it.
// Everything from the server goes in as text (textContent, attributes),
// never as markup: a mode's name is the operator's to choose, and the page
// runs under a Content-Security-Policy that allows no inline script or style.
"use strict";

(() => {
  const POLL_MS = 1000;
  const PHASES = ["stop", "reclaim", "spawn", "load", "warmup"];
  const CHART = { w: 320, h: 96, pad: 4, label: 14, span: 600 }; // span: the most seconds shown, what the daemon keeps
  const WHY = { switch: "ordered", restart: "a restart", jobs: "for queued jobs" }; // who asked for a switch
  const SVG = "http://www.w3.org/2000/svg";
  const $ = (id) => document.getElementById(id);
  const actions = new Map(); // device -> its operator controls, kept across redraws (a chosen mode, focus)

  // ------------------------------------------------------------ building

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") node.className = value;
      else node.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
      if (child !== null && child !== undefined) node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG, tag);
    for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, String(value));
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function bytes(n) {
    if (n === null || n === undefined) return "-";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
    return `${n.toFixed(i === 0 || n >= 100 ? 0 : 1)} ${units[i]}`;
  }

  function seconds(s) {
    if (s === null || s === undefined) return "-";
    if (s < 1) return `${(s * 1000).toFixed(0)} ms`;
    if (s < 60) return `${s.toFixed(s < 10 ? 2 : 1)} s`;
    if (s < 3600) return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
    return `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} min`;
  }

  function ago(s) {
    if (s === null || s === undefined) return "now";
    if (s < 1) return "just now";
    if (s < 60) return `${Math.round(s)} s ago`;
    if (s < 3600) return `${Math.round(s / 60)} min ago`;
    return `${(s / 3600).toFixed(1)} h ago`;
  }

  function field(name, value, key) {
    return el("div", { "data-field": key || name }, el("dt", null, name), el("dd", null, value));
  }

  // ------------------------------------------------------------ drawing

  function draw(p) {
    const state = $("state");
    state.textContent = p.state || "unknown";
    state.dataset.state = p.state || "";
    const reason = $("failed-reason");
    reason.textContent = p.failed_reason || "";
    reason.hidden = !p.failed_reason;
    $("config").textContent = p.config || "built-in";
    $("queued").textContent = String(p.queued);
    $("jobs-done").textContent = String(p.jobs_done);
    $("restarts").textContent = String(p.restarts);
    $("updated").textContent = new Date(p.at * 1000).toLocaleTimeString();
    $("updated").dataset.at = String(p.at);
    document.body.dataset.operator = String(Boolean(p.operator));
    drawDevices(p);
    drawSwitches(p);
    drawQueue(p);
    drawBroken(p);
    drawErrors(p);
  }

  function drawDevices(p) {
    const box = $("devices");
    const cards = p.devices.map((d) => {
      const facts = [
        field("mode", d.mode || "none"),
        field("worker", d.worker_state || "none", "worker_state"),
        field("pid", d.worker_pid ?? "-", "pid"),
        d.switching_to ? field("switching to", d.switching_to, "switching_to") : null,
        field("in flight", d.in_flight, "in_flight"),
        field("restarts", d.restarts),
        field("jobs done", d.jobs_done, "jobs_done"),
        field("RSS", bytes(d.rss_bytes), "rss"),
        d.gpu_name || d.vram_bytes != null ? field("VRAM", bytes(d.vram_bytes), "vram") : null,
        d.gpu_total_bytes ? field("GPU used", `${bytes(d.gpu_used_bytes)} of ${bytes(d.gpu_total_bytes)}`, "gpu") : null,
        d.standby_ready ? field("standby", "ready") : null,
        d.idle_unloaded ? field("unloaded when idle", d.idle_unloaded, "idle_unloaded") : null,
      ];
      const broken = Object.entries(d.broken || {}).map(brokenItem);
      const card = el("article", { class: "device", "data-device": d.name, "data-worker": d.worker_state || "none" },
        el("h3", null, d.name, d.gpu_name ? el("span", { class: "gpu-name" }, ` ${d.gpu_name}`) : null),
        el("div", { class: "device-body" },
          el("div", null,
            el("dl", { class: "fields" }, facts),
            d.failed_reason ? el("p", { class: "device-failed" }, d.failed_reason) : null,
            broken.length ? el("ul", { class: "device-broken" }, broken) : null),
          chart(d.name, p.memory[d.name] || [], p.at)));
      if (p.operator) card.append(controls(d.name, p.modes, d.mode));
      return card;
    });
    box.replaceChildren(...cards);
    if (!p.operator) actions.clear();
  }

  function chart(name, points, now) {
    const { w, h, pad, label } = CHART; // labels above and below the lines, never on them
    const span = Math.min(CHART.span, Math.max(60, now - (points.length ? points[0][0] : now))); // what is kept, at least a minute
    const shown = points.filter((pt) => pt[0] >= now - span);
    const values = shown.flatMap((pt) => [pt[1], pt[2]]).filter((v) => v !== null && v !== undefined);
    const top = Math.max(1, ...values);
    const x = (t) => pad + ((w - 2 * pad) * (t - (now - span))) / span;
    const y = (v) => h - label - ((h - 2 * label) * v) / top;
    const back = span >= 120 ? `${Math.round(span / 60)} min` : `${Math.round(span)} s`;
    const box = svg("svg", { class: "chart", viewBox: `0 0 ${w} ${h}`, role: "img",
      "aria-label": `worker memory on ${name} over the last ${back}` });
    box.append(svg("rect", { class: "frame", x: 0.5, y: 0.5, width: w - 1, height: h - 1 }));
    box.append(svg("line", { class: "grid", x1: pad, x2: w - pad, y1: y(top), y2: y(top) }));
    for (const [index, kind] of [[1, "rss"], [2, "vram"]]) {
      let d = "";
      let run = 0; // points in the line drawn so far; a null ends it, so a gap shows as a gap
      for (const pt of shown) {
        const v = pt[index];
        if (v === null || v === undefined) {
          if (run === 1) d += "h0.5 "; // a lone point: a dot
          run = 0;
          continue;
        }
        d += `${run ? "L" : "M"}${x(pt[0]).toFixed(1)},${y(v).toFixed(1)} `;
        run += 1;
      }
      if (run === 1) d += "h0.5";
      if (d) box.append(svg("path", { class: `line ${kind}`, "data-kind": kind, d }));
    }
    box.append(svg("text", { class: "axis", x: pad + 2, y: label - 4 }, values.length ? `${bytes(top)} at most` : "no samples yet"));
    box.append(svg("text", { class: "axis", x: pad + 2, y: h - 4 }, `-${back}`));
    box.append(svg("text", { class: "axis end", x: w - pad - 2, y: h - 4 }, "now"));
    return el("figure", { class: "memory", "data-device": name }, box,
      el("figcaption", null, el("span", { class: "key rss" }, "worker RSS"),
        shown.some((pt) => pt[2] !== null && pt[2] !== undefined) ? el("span", { class: "key vram" }, "worker VRAM") : null));
  }

  function controls(device, modes, current) {
    let box = actions.get(device);
    const wanted = modes.join("\n");
    if (!box || box.dataset.modes !== wanted) {
      const select = el("select", { class: "mode-select", "aria-label": `mode for ${device}` },
        modes.map((m) => el("option", { value: m, selected: m === current }, m)));
      const answer = el("output", { class: "answer", "aria-live": "polite" });
      const button = (action, text, body) => {
        const b = el("button", { type: "button", "data-action": action }, text);
        b.addEventListener("click", () => act(box, action, body(select.value), answer));
        return b;
      };
      box = el("div", { class: "actions", "data-device": device, "data-modes": wanted }, select,
        button("switch", "Switch", (mode) => ({ mode, device })),
        button("restart", "Restart", () => ({ device })),
        button("unload", "Unload", () => ({ device })),
        answer);
      actions.set(device, box);
    }
    return box;
  }

  async function act(box, action, body, answer) {
    const buttons = box.querySelectorAll("button");
    buttons.forEach((b) => { b.disabled = true; });
    answer.dataset.state = "pending";
    answer.textContent = `${action}...`;
    try {
      const r = await fetch(`/v1/admin/${action}`, {
        method: "POST", credentials: "same-origin", cache: "no-store",
        headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
      });
      const data = await r.json().catch(() => null);
      if (!r.ok) throw new Error((data && data.error && data.error.message) || `HTTP ${r.status}`);
      answer.dataset.state = "ok";
      answer.textContent = said(data);
    } catch (e) {
      answer.dataset.state = "error";
      answer.textContent = e.message;
    } finally {
      buttons.forEach((b) => { b.disabled = false; });
      poll();
    }
  }

  function said(data) {
    if (data && Array.isArray(data.unloaded)) {
      return data.unloaded.length ? `unloaded ${data.unloaded.map((u) => `${u.mode} (pid ${u.pid})`).join(", ")}` : "nothing was loaded";
    }
    if (data && data.status) {
      const took = typeof data.seconds === "number" ? ` in ${seconds(data.seconds)}` : "";
      return `${data.mode}: ${data.status.replace("_", " ")}${data.pid ? ` (pid ${data.pid})` : ""}${took}`;
    }
    return "done";
  }

  function drawSwitches(p) {
    const spent = (sw) => (sw.seconds ?? Math.max(0, p.at - sw.started));
    const longest = Math.max(0.001, ...p.switches.map(spent));
    const items = p.switches.map((sw) => {
      const total = spent(sw);
      const bar = el("div", { class: "bar", "aria-hidden": "true" });
      bar.style.width = `${Math.max(2, (100 * total) / longest)}%`;
      const parts = PHASES.filter((ph) => sw.phases[ph] !== undefined).map((ph) => [ph, sw.phases[ph]]);
      const known = parts.reduce((sum, [, s]) => sum + s, 0);
      if (sw.outcome === "failed") parts.push(["failed", Math.max(0, total - known)]);
      else if (sw.outcome !== "ready") parts.push([sw.phase, Math.max(0, total - known)]);
      else if (total - known > 0.02 * total) parts.push(["other", total - known]);
      for (const [phase, s] of parts) {
        const seg = el("span", { class: "seg", "data-phase": phase, title: `${phase} ${seconds(s)}` });
        seg.style.width = `${total > 0 ? (100 * s) / total : 100}%`;
        bar.append(seg);
      }
      const outcome = sw.outcome === "under way" ? `under way: ${sw.phase}`
        : sw.outcome === "failed" && sw.failed_in ? `failed in ${sw.failed_in}` : sw.outcome;
      const detail = parts.map(([ph, s]) => `${ph} ${seconds(s)}`).join(" · ");
      return el("li", { class: "switch", "data-outcome": sw.outcome.replace(" ", "-"), "data-mode": sw.mode, "data-device": sw.device },
        el("div", { class: "switch-head" },
          el("span", { class: "outcome" }, outcome),
          el("strong", { class: "mode" }, sw.mode),
          el("span", { class: "from" }, sw.previous ? `from ${sw.previous}` : "from nothing loaded"),
          el("span", { class: "why", "data-why": sw.why || "" }, WHY[sw.why] || sw.why || ""),
          el("span", { class: "where" }, `on ${sw.device}`),
          el("span", { class: "age" }, ago(p.at - sw.started))),
        el("div", { class: "track" }, bar),
        el("div", { class: "phases" }, `${seconds(total)}${detail ? ` — ${detail}` : ""}`),
        sw.error ? el("p", { class: "switch-error" }, sw.error) : null);
    });
    $("switches").replaceChildren(...(items.length ? items : [el("li", { class: "none" }, "No switch yet.")]));
  }

  function drawQueue(p) {
    const rows = Object.entries(p.waiting).sort(([a], [b]) => a.localeCompare(b)).map(([mode, w]) =>
      el("tr", { "data-mode": mode }, el("td", null, mode), el("td", null, String(w.jobs)), el("td", null, seconds(w.oldest_s))));
    if (!rows.length) rows.push(el("tr", { class: "none" }, el("td", { colspan: 3 }, "Nothing waits.")));
    $("queue").tBodies[0].replaceChildren(...rows);
  }

  function brokenItem([mode, b]) {
    const retry = b.retry_in_s == null ? " (until an operator retries it)" : ` (tried again in ${seconds(b.retry_in_s)})`;
    return el("li", { "data-mode": mode }, el("strong", null, mode), `: ${b.reason || "broken"}`, retry);
  }

  function drawBroken(p) {
    const items = Object.entries(p.broken_modes).map(brokenItem);
    $("broken").replaceChildren(...(items.length ? items : [el("li", { class: "none" }, "None.")]));
  }

  function drawErrors(p) {
    const items = p.errors.map((e) => el("li", { class: "error", "data-mode": e.mode ?? "", "data-device": e.device ?? "" },
      el("span", { class: "age" }, e.t === null ? "now" : ago(p.at - e.t)),
      e.device ? el("span", { class: "where" }, e.device) : null,
      el("span", { class: "what" }, e.what)));
    $("errors").replaceChildren(...(items.length ? items : [el("li", { class: "none" }, "None.")]));
  }

  // ------------------------------------------------------------ polling

  function banner(text) {
    const b = $("banner");
    b.textContent = text || "";
    b.hidden = !text;
    document.body.classList.toggle("stale", Boolean(text));
  }

  let timer = null;
  let busy = false; // one request at a time: an action's poll joins the one under way
  let again = false;

  async function poll() {
    if (busy) { again = true; return; }
    busy = true;
    clearTimeout(timer);
    let picture = null;
    try {
      const r = await fetch("/v1/glance", { credentials: "same-origin", cache: "no-store" });
      if (r.status === 401) {
        banner("This browser is not admitted: open /ui?token=TOKEN once, with a token of the daemon's token_file.");
      } else if (!r.ok) {
        const data = await r.json().catch(() => null);
        const error = (data && data.error) || {};
        if (error.code === "shutting_down") { // a draining daemon answers nothing new, this page included
          $("state").textContent = $("state").dataset.state = "draining";
        }
        banner(`The daemon answered ${r.status}: ${error.message || r.statusText}`);
      } else {
        picture = await r.json();
      }
    } catch (e) {
      banner("The daemon does not answer: it stopped, or this address no longer reaches it. Trying again every second.");
    }
    try {
      if (picture) {
        draw(picture);
        banner(null);
      }
    } catch (e) { // a page bug, not the daemon's: say so, and keep polling
      console.error(e);
      banner(`This page could not draw the daemon's answer: ${e.message}`);
    } finally {
      busy = false;
    }
    if (again) {
      again = false;
      poll();
    } else {
      timer = setTimeout(poll, POLL_MS);
    }
  }

  poll();
})();
