// The receiver's dashboard: plain JavaScript, no build step, no library.
//
// The API key lives in sessionStorage and travels only as an `Authorization: Bearer` header,
// never in a URL — so live updates read GET /v1/stream (Server-Sent Events) with fetch(), not
// EventSource (which cannot send headers). Every value from the API reaches the page through
// textContent or a checked attribute, never as HTML (the Content-Security-Policy forbids that too).
"use strict";

(() => {
  const KEY = "receiver.apiKey";
  const MAX_TASKS = 100;
  const state = {
    key: sessionStorage.getItem(KEY),
    tasks: new Map(), // id -> task, as the API shows it
    selected: null, // the task id whose detail is open
    stream: null, // the AbortController of the live stream
    refresh: null, // a pending refresh of the open detail
  };

  const $ = (selector) => document.querySelector(selector);

  // --- building the page safely -----------------------------------------------------------------

  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(props || {})) {
      if (value === undefined || value === null) continue;
      if (name === "class") node.className = value;
      else if (name === "text") node.textContent = String(value);
      else if (name.startsWith("data-")) node.setAttribute(name, String(value));
      else if (["id", "title", "type", "alt"].includes(name)) node.setAttribute(name, String(value));
      else if (name === "disabled" || name === "open") node[name] = Boolean(value);
      else throw new Error(`el(): unexpected property ${name}`);
    }
    for (const child of children.flat(Infinity)) {
      if (child === undefined || child === null || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  // A link or image source only for http(s) URLs: a `javascript:` URL from a payload must never be clickable.
  function safeUrl(value) {
    if (typeof value !== "string") return null;
    try {
      const url = new URL(value, window.location.href);
      return url.protocol === "https:" || url.protocol === "http:" ? url : null;
    } catch {
      return null;
    }
  }

  function link(value, text) {
    const url = safeUrl(value);
    if (!url) return el("span", { text: text || String(value ?? "") });
    const anchor = el("a", { text: text || url.href });
    anchor.href = url.href;
    anchor.rel = "noopener noreferrer";
    anchor.target = "_blank";
    return anchor;
  }

  // Thumbnails: a kept image (asset_url) is loaded from this very receiver, whatever host its URL names
  // (the public URL may be a tunnel's); otherwise the provider's https URL. Anything else shows no image.
  function thumbnailSource(image) {
    const kept = safeUrl(image && image.asset_url);
    if (kept && kept.pathname.startsWith("/assets/")) return kept.pathname;
    const original = safeUrl(image && image.url);
    return original && original.protocol === "https:" ? original.href : null;
  }

  function thumbnail(image, className) {
    const source = thumbnailSource(image);
    if (!source) return el("span", { class: `${className} placeholder`, title: "no preview", text: "·" });
    const img = el("img", { class: className, alt: "" });
    img.loading = "lazy";
    img.referrerPolicy = "no-referrer";
    img.src = source;
    return img;
  }

  function age(iso) {
    const seconds = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
    if (!Number.isFinite(seconds)) return "?";
    if (seconds < 60) return `${Math.floor(seconds)}s`;
    if (seconds < 3600) return `${Math.floor(seconds / 60)}m`;
    if (seconds < 86400) return `${Math.floor(seconds / 3600)}h`;
    return `${Math.floor(seconds / 86400)}d`;
  }

  function pretty(value) {
    return typeof value === "string" ? value : JSON.stringify(value, null, 2);
  }

  let quiet = null;
  function say(message, kind) {
    const status = $("#status");
    status.textContent = message || "";
    status.dataset.kind = kind || "info";
    clearTimeout(quiet);
    quiet = setTimeout(() => (status.textContent = ""), kind === "error" ? 10000 : 4000);
  }

  // --- the API ----------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(message, status, code) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  async function api(path, options) {
    const response = await fetch(path, {
      method: (options && options.method) || "GET",
      headers: { Authorization: `Bearer ${state.key}`, Accept: "application/json" },
      cache: "no-store",
      credentials: "omit",
    });
    const body = await response.json().catch(() => null);
    if (response.status === 401) {
      logout("The receiver refused that key.");
      throw new ApiError("unauthorized", 401, "unauthorized");
    }
    if (!response.ok) {
      const error = (body && body.error) || {};
      throw new ApiError(error.message || `HTTP ${response.status}`, response.status, error.code);
    }
    return body;
  }

  // --- logging in and out -----------------------------------------------------------------------

  async function login(event) {
    event.preventDefault();
    const key = $("#key").value.trim();
    $("#login-error").textContent = "";
    if (!key) return;
    state.key = key;
    try {
      await api("/v1/tasks?limit=1");
    } catch (error) {
      state.key = null;
      $("#login-error").textContent =
        error.status === 401 ? "The receiver refused that key." : `Cannot reach the receiver: ${error.message}`;
      return;
    }
    sessionStorage.setItem(KEY, key);
    $("#key").value = "";
    start();
  }

  function logout(message) {
    sessionStorage.removeItem(KEY);
    state.key = null;
    if (state.stream) state.stream.abort();
    state.stream = null;
    state.tasks.clear();
    state.selected = null;
    $("#dashboard").hidden = true;
    $("#logout").hidden = true;
    $("#login-view").hidden = false;
    $("#login-error").textContent = message || "";
    setLive("offline");
  }

  function start() {
    $("#login-view").hidden = true;
    $("#dashboard").hidden = false;
    $("#logout").hidden = false;
    listen();
  }

  // --- live updates: GET /v1/stream read with fetch() ----------------------------------------------

  function setLive(mode) {
    const live = $("#live");
    live.dataset.state = mode;
    live.textContent = mode;
  }

  async function listen() {
    const controller = new AbortController();
    state.stream = controller;
    let delay = 1000;
    while (!controller.signal.aborted) {
      try {
        const response = await fetch("/v1/stream", {
          headers: { Authorization: `Bearer ${state.key}`, Accept: "text/event-stream" },
          cache: "no-store",
          credentials: "omit",
          signal: controller.signal,
        });
        if (response.status === 401) {
          logout("The receiver refused that key.");
          return;
        }
        if (response.status === 429) {
          // Too many dashboards on this key: show the list as it is now, and say why it is not live.
          say("Too many dashboards are open with this key on this receiver; close one. Retrying…", "error");
          loadTasks();
        }
        if (!response.ok) throw new ApiError(`HTTP ${response.status}`, response.status);
        const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
        let buffer = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer += value;
          let end;
          while ((end = buffer.indexOf("\n\n")) >= 0) {
            const block = buffer.slice(0, end);
            buffer = buffer.slice(end + 2);
            if (onFrame(block)) delay = 1000;
          }
        }
      } catch (error) {
        if (controller.signal.aborted) return;
      }
      setLive("reconnecting");
      await new Promise((resolve) => setTimeout(resolve, delay));
      delay = Math.min(delay * 2, 15000);
    }
  }

  // One SSE block; true when it was an event (the stream works).
  function onFrame(block) {
    let event = "message";
    const data = [];
    for (const line of block.split("\n")) {
      if (line.startsWith(":")) continue;
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
      if (field === "event") event = value;
      else if (field === "data") data.push(value);
    }
    if (!data.length) return false;
    let payload;
    try {
      payload = JSON.parse(data.join("\n"));
    } catch {
      return false;
    }
    if (event === "ready") {
      // Listening now: read what to show, so that nothing falls between the list and the stream.
      setLive("live");
      loadTasks();
      if (state.selected) refreshDetail();
    } else if (event === "task") {
      upsert(payload);
      if (payload.id === state.selected) {
        renderSummary(payload);
        scheduleRefresh();
      }
    } else if ((event === "callback" || event === "delivery") && payload.task_id === state.selected) {
      scheduleRefresh();
    }
    return true;
  }

  // --- the task list ----------------------------------------------------------------------------

  async function loadTasks() {
    try {
      const page = await api("/v1/tasks?limit=50");
      for (const task of page.data) upsert(task, false);
      renderTasks();
    } catch (error) {
      if (error.status !== 401) say(`Could not list the tasks: ${error.message}`, "error");
    }
  }

  function upsert(task, render = true) {
    const known = state.tasks.get(task.id);
    // A task's changes may arrive out of order (several instances): never go back in sequence.
    if (known && known.sequence > task.sequence) return;
    state.tasks.set(task.id, task);
    if (state.tasks.size > MAX_TASKS) {
      // The oldest go first (ids sort by creation time), but never the task being looked at.
      const ids = [...state.tasks.keys()].sort().filter((id) => id !== state.selected);
      for (const id of ids.slice(0, state.tasks.size - MAX_TASKS)) state.tasks.delete(id);
    }
    if (render) renderTasks();
  }

  function renderTasks() {
    const body = $("#tasks tbody");
    const focused = document.activeElement && body.contains(document.activeElement)
      ? document.activeElement.dataset.taskId
      : null;
    const rows = [...state.tasks.values()]
      .sort((a, b) => (a.id < b.id ? 1 : -1))
      .map((task) => taskRow(task));
    body.replaceChildren(...rows);
    $("#tasks-empty").hidden = rows.length > 0;
    // A live redraw must not take the keyboard's place in the list away.
    const again = focused && rows.find((row) => row.dataset.taskId === focused);
    if (again) again.focus({ preventScroll: true });
  }

  function taskRow(task) {
    const images = (task.result && task.result.images) || [];
    const row = el(
      "tr",
      { class: `task${task.id === state.selected ? " selected" : ""}`, "data-task-id": task.id, "data-state": task.state },
      el("td", { class: "thumbs" }, images.slice(0, 3).map((image) => thumbnail(image, "thumb"))),
      el("td", {}, el("span", { class: `state state-${task.state}`, text: task.state }),
        task.result && task.result.mirror === "pending" ? el("span", { class: "note", text: " keeping images…" }) : null),
      el("td", {}, el("span", { text: task.provider }), el("span", { class: "muted", text: ` ${task.model || ""}` })),
      el("td", { class: "mono", text: task.id }),
      el("td", { class: "age", "data-created": task.created_at, text: age(task.created_at), title: task.created_at }),
    );
    row.tabIndex = 0;
    row.addEventListener("click", () => select(task.id));
    row.addEventListener("keydown", (event) => {
      if (event.key === "Enter") select(task.id);
    });
    return row;
  }

  function tickAges() {
    for (const cell of document.querySelectorAll("td.age")) cell.textContent = age(cell.dataset.created);
  }

  // --- one task: summary, callbacks, deliveries ---------------------------------------------------

  async function select(taskId) {
    state.selected = taskId;
    renderTasks();
    const detail = $("#detail");
    detail.dataset.taskId = taskId;
    const task = state.tasks.get(taskId);
    detail.replaceChildren(
      el("div", { id: "summary" }),
      el("h3", { text: "Callbacks" }),
      el("div", { id: "callbacks" }, el("p", { class: "muted", text: "Loading…" })),
      el("h3", { text: "Deliveries" }),
      el("div", { id: "deliveries" }, el("p", { class: "muted", text: "Loading…" })),
    );
    if (task) renderSummary(task);
    await refreshDetail();
  }

  function scheduleRefresh() {
    if (state.refresh) return;
    state.refresh = setTimeout(() => {
      state.refresh = null;
      refreshDetail();
    }, 100);
  }

  async function refreshDetail() {
    const taskId = state.selected;
    if (!taskId) return;
    try {
      const [task, callbacks, deliveries] = await Promise.all([
        api(`/v1/tasks/${encodeURIComponent(taskId)}`),
        api(`/v1/tasks/${encodeURIComponent(taskId)}/callbacks`),
        api(`/v1/deliveries?task_id=${encodeURIComponent(taskId)}&limit=100`),
      ]);
      if (state.selected !== taskId) return;
      upsert(task);
      renderSummary(task);
      renderCallbacks(callbacks.data);
      renderDeliveries(deliveries.data);
    } catch (error) {
      if (error.status !== 401) say(`Could not read ${taskId}: ${error.message}`, "error");
    }
  }

  function field(name, ...value) {
    return [el("dt", { text: name }), el("dd", {}, ...value)];
  }

  function renderSummary(task) {
    const summary = $("#summary");
    if (!summary || task.id !== state.selected) return;
    const result = task.result || {};
    const images = result.images || [];
    summary.replaceChildren(
      el("h2", {}, el("span", { class: "mono", text: task.id }), " ",
        el("span", { class: `state state-${task.state}`, text: task.state })),
      el(
        "dl",
        { class: "fields" },
        field("provider / model", `${task.provider} / ${task.model || "—"}`),
        field("upstream task", el("span", { class: "mono", text: task.upstream_task_id || "—" })),
        field("sequence", String(task.sequence)),
        field("created", task.created_at),
        field("completed", task.completed_at || "—"),
        result.mirror ? field("images kept", result.mirror) : [],
        task.error ? field("error", el("span", { class: "error", text: `${task.error.code}: ${task.error.message}` })) : [],
        task.warnings && task.warnings.length ? field("warnings", el("ul", {}, task.warnings.map((w) => el("li", { text: w })))) : [],
        field("request", el("pre", { text: pretty(task.request) })),
        Object.keys(task.metadata || {}).length ? field("metadata", el("pre", { text: pretty(task.metadata) })) : [],
      ),
      images.length
        ? el(
            "div",
            { class: "images" },
            images.map((image, index) =>
              el(
                "figure",
                {},
                thumbnail(image, "preview"),
                el(
                  "figcaption",
                  {},
                  `#${index} `,
                  image.asset_url ? link(image.asset_url, "kept copy") : null,
                  image.asset_url ? " · " : null,
                  link(image.url, "original"),
                  image.asset_error ? el("span", { class: "error", text: ` not kept: ${image.asset_error.code}` }) : null,
                ),
              ),
            ),
          )
        : [],
    );
  }

  // A callback's body as it arrived, byte for byte (what a signature is computed over): text, or
  // base64 when the bytes are not UTF-8.
  function rawBody(callback) {
    if (callback.raw_body === undefined || callback.raw_body === null) return pretty(callback.body);
    if (callback.raw_body_encoding === "base64") return `(not UTF-8 text; base64)\n${callback.raw_body}`;
    return callback.raw_body;
  }

  function renderCallbacks(callbacks) {
    const box = $("#callbacks");
    if (!box) return;
    if (!callbacks.length) {
      box.replaceChildren(el("p", { class: "muted", text: "No callback yet." }));
      return;
    }
    // A live redraw keeps what the reader opened open (and so the page where it was).
    const opened = new Set([...box.querySelectorAll("details[open]")].map((node) => node.dataset.callbackId));
    box.replaceChildren(
      ...callbacks.map((callback) =>
        el(
          "details",
          { class: "callback", "data-callback-id": callback.id, "data-verdict": callback.verdict,
            open: opened.has(callback.id) },
          el(
            "summary",
            {},
            el("span", { class: `verdict verdict-${callback.verdict}`, text: callback.verdict }),
            callback.reason ? el("span", { class: "muted", text: ` (${callback.reason})` }) : null,
            ` ${callback.reported_state || ""} · ${callback.dialect || "?"} · ${callback.received_at}`,
            callback.provider_signature ? el("span", { class: "muted", text: ` · signature ${callback.provider_signature}` }) : null,
          ),
          el("h4", { text: "Headers" }),
          el("dl", { class: "headers" }, Object.entries(callback.headers || {}).map(([name, value]) => field(name, value))),
          el("h4", { text: "Body, as received" }),
          el("pre", { class: "body", text: rawBody(callback) }),
        ),
      ),
    );
  }

  function renderDeliveries(deliveries) {
    const box = $("#deliveries");
    if (!box) return;
    if (!deliveries.length) {
      box.replaceChildren(el("p", { class: "muted", text: "No delivery: no subscription took this task's events." }));
      return;
    }
    box.replaceChildren(...deliveries.slice().reverse().map((delivery) => deliveryItem(delivery)));
  }

  function deliveryItem(delivery) {
    const button = el("button", { class: "redeliver", type: "button", text: "Redeliver", disabled: delivery.status === "pending" });
    button.addEventListener("click", () => redeliver(delivery.id, button));
    return el(
      "div",
      { class: "delivery", "data-delivery-id": delivery.id, "data-status": delivery.status },
      el(
        "div",
        { class: "delivery-head" },
        el("span", { class: `status status-${delivery.status}`, text: delivery.status }),
        el("span", { class: "event", text: ` ${delivery.event_type}` }),
        el("span", { class: "muted mono", text: ` → ${delivery.subscription_id}` }),
        delivery.next_attempt_at && delivery.status === "pending" ? el("span", { class: "muted", text: ` next ${delivery.next_attempt_at}` }) : null,
        button,
      ),
      delivery.attempts.length
        ? el(
            "table",
            { class: "attempts" },
            el("thead", {}, el("tr", {}, ["at", "status", "latency", "error"].map((h) => el("th", { text: h })))),
            el(
              "tbody",
              {},
              delivery.attempts.map((attempt) =>
                el(
                  "tr",
                  { class: "attempt" },
                  el("td", { text: attempt.at }),
                  el("td", { class: "code", text: attempt.status_code ?? "—" }),
                  el("td", { text: `${attempt.latency_ms} ms` }),
                  el("td", { class: "error", text: attempt.error || "" }),
                ),
              ),
            ),
          )
        : el("p", { class: "muted", text: "Not attempted yet." }),
    );
  }

  async function redeliver(deliveryId, button) {
    button.disabled = true;
    try {
      await api(`/v1/deliveries/${encodeURIComponent(deliveryId)}/retry`, { method: "POST" });
      say(`${deliveryId} queued to be sent again.`);
      scheduleRefresh();
    } catch (error) {
      button.disabled = false;
      if (error.status !== 401) say(`Cannot redeliver ${deliveryId}: ${error.message}`, "error");
    }
  }

  // --- start ------------------------------------------------------------------------------------

  document.addEventListener("DOMContentLoaded", () => {
    $("#login").addEventListener("submit", login);
    $("#logout").addEventListener("click", () => logout(""));
    setInterval(tickAges, 5000);
    if (state.key) start();
  });
})();
