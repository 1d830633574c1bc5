// azu's user page: talks to the same HTTP API as any client. No framework, no build step.
// Everything the server sends is put in the page as text (textContent), never as HTML.
"use strict";

(() => {
  const KEY = "azu.apiKey";
  const KEY_ID = "azu.apiKeyId";
  const NETWORK_EVERY_MS = 3000;

  const $ = (id) => document.getElementById(id);
  const el = (tag, text, cls) => {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (cls) node.className = cls;
    return node;
  };
  const say = (id, text, kind) => {
    const node = $(id);
    node.textContent = text || "";
    node.dataset.kind = kind || "";
  };

  // --- the API key ------------------------------------------------------------------------------------------
  const apiKey = () => localStorage.getItem(KEY) || "";
  function setKey(key, id) {
    if (key) localStorage.setItem(KEY, key); else localStorage.removeItem(KEY);
    if (id !== undefined && id !== null) localStorage.setItem(KEY_ID, String(id)); else localStorage.removeItem(KEY_ID);
    showKeyState();
  }
  function showKeyState() {
    const key = apiKey();
    $("key-state").textContent = key ? `API key in use: ${key.slice(0, 6)}…${key.slice(-4)}` : "No API key in this browser";
  }

  // --- requests ---------------------------------------------------------------------------------------------
  class ApiError extends Error {
    constructor(status, message, retryAfter) {
      super(message);
      this.status = status;
      this.retryAfter = retryAfter;
    }
  }

  // The message of either error shape: {"error": "..."} outside /v1, {"error": {"message": ...}} under /v1.
  function errorMessage(body, status) {
    const err = body && body.error;
    if (typeof err === "string") return err;
    if (err && typeof err.message === "string") return err.message;
    return `the server answered ${status}`;
  }

  async function api(method, path, body, opts = {}) {
    const headers = { Accept: "application/json" };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    if (apiKey() && opts.auth !== false) headers.Authorization = `Bearer ${apiKey()}`;
    const resp = await fetch(path, {
      method, headers, body: body === undefined ? undefined : JSON.stringify(body), signal: opts.signal,
    });
    if (opts.raw && resp.ok) return resp;
    let data = null;
    try { data = parseJson(await resp.text()); } catch (_) { data = null; }
    if (!resp.ok) throw new ApiError(resp.status, errorMessage(data, resp.status), resp.headers.get("Retry-After"));
    return data;
  }

  // Money is integers of base units (wei: 10^18 per HYPE), past what a JS number holds exactly (2^53), so
  // integer literals of 16+ digits are read as BigInt instead of being rounded.
  function parseJson(text) {
    const marked = text.replace(/([:[,]\s*)(-?\d{16,})(?=\s*[,\]}])/g, '$1"\\u0000big:$2"');
    return JSON.parse(marked, (_k, v) => (typeof v === "string" && v.startsWith("\u0000big:") ? BigInt(v.slice(5)) : v));
  }
  const amount = (v) => (typeof v === "bigint" || typeof v === "number" ? v.toLocaleString("en-US") : String(v));

  const describe = (err) => {
    if (!(err instanceof ApiError)) return `Request failed: ${err.message}`;
    const retry = err.retryAfter ? ` (try again in ${err.retryAfter} s)` : "";
    return `${err.message}${retry}`;
  };

  // --- playground -------------------------------------------------------------------------------------------
  const conversation = [];
  let running = null; // AbortController of the answer being streamed

  async function loadModels() {
    const select = $("model");
    if (!apiKey()) return;
    try {
      const data = await api("GET", "/v1/models");
      const previous = select.value;
      select.replaceChildren();
      if (!data.data.length) select.append(el("option", "(no model is ready yet)"));
      for (const m of data.data) {
        const opt = el("option", m.id);
        opt.value = m.id;
        select.append(opt);
      }
      if (previous && data.data.some((m) => m.id === previous)) select.value = previous;
      say("chat-status", "");
    } catch (err) {
      say("chat-status", `Models: ${describe(err)}`, "error");
    }
  }

  function addMessage(role, text) {
    const item = el("li", null, `message ${role}`);
    item.append(el("span", role === "user" ? "You" : "Assistant", "who"));
    const body = el("p", text, "text");
    item.append(body);
    $("messages").append(item);
    return body;
  }

  // Server-sent events: "data: <json>" lines, blank-line separated; ":" lines are keep-alives.
  async function* sseData(resp) {
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      buffer += decoder.decode(value || new Uint8Array(), { stream: !done });
      let newline;
      while ((newline = buffer.indexOf("\n")) >= 0) {
        const line = buffer.slice(0, newline).replace(/\r$/, "");
        buffer = buffer.slice(newline + 1);
        if (line.startsWith("data:")) yield line.slice(5).trimStart();
      }
      if (done) return;
    }
  }

  async function sendChat(event) {
    event.preventDefault();
    if (running) return;
    const prompt = $("prompt").value.trim();
    const model = $("model").value;
    if (!apiKey()) { say("chat-status", "Add an API key first (API keys, below).", "error"); return; }
    if (!model) { say("chat-status", "Pick a model.", "error"); return; }
    if (!prompt) return;
    const maxTokens = parseInt($("max-tokens").value, 10);
    const temperature = parseFloat($("temperature").value);
    conversation.push({ role: "user", content: prompt });
    addMessage("user", prompt);
    $("prompt").value = "";
    const out = addMessage("assistant", "");
    out.parentElement.setAttribute("aria-busy", "true");
    running = new AbortController();
    $("chat-send").disabled = true;
    $("chat-stop").disabled = false;
    say("chat-status", "Waiting for the first token…");
    const body = {
      model, messages: conversation.slice(), stream: true, stream_options: { include_usage: true },
    };
    if (Number.isFinite(maxTokens)) body.max_tokens = maxTokens;
    if (Number.isFinite(temperature)) body.temperature = temperature;
    let text = "";
    let finish = null;
    try {
      const resp = await api("POST", "/v1/chat/completions", body, { raw: true, signal: running.signal });
      say("chat-status", "Streaming…");
      for await (const data of sseData(resp)) {
        if (data === "[DONE]") break;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new ApiError(0, errorMessage(chunk, 0));
        for (const choice of chunk.choices || []) {
          if (choice.delta && choice.delta.content) {
            text += choice.delta.content;
            out.textContent = text;
          }
          if (choice.finish_reason) finish = choice.finish_reason;
        }
        if (chunk.usage) {
          const u = chunk.usage;
          say("chat-status", `Done (${finish || "stop"}): ${u.prompt_tokens} prompt + ${u.completion_tokens} ` +
            `completion tokens, ${u.token_layers} token-layers over ${Object.keys(u.workers).length} worker(s).`, "ok");
        }
      }
      if (!finish) throw new ApiError(0, "the stream ended before the answer was complete");
      if (!$("chat-status").dataset.kind) say("chat-status", `Done (${finish}).`, "ok");
    } catch (err) {
      if (err.name === "AbortError") say("chat-status", "Stopped.");
      else say("chat-status", describe(err), "error");
    } finally {
      out.parentElement.removeAttribute("aria-busy");
      if (text) conversation.push({ role: "assistant", content: text });
      else { out.parentElement.remove(); conversation.pop(); }
      running = null;
      $("chat-send").disabled = false;
      $("chat-stop").disabled = true;
      // The job is settled a moment after its last token (by the scheduler): look again shortly after.
      refreshBalance();
      setTimeout(refreshBalance, 1500);
      setTimeout(refreshBalance, 5000);
    }
  }

  // --- balance and deposits ---------------------------------------------------------------------------------
  async function refreshBalance() {
    if (!apiKey()) return;
    try {
      const data = await api("GET", "/balance");
      $("balance-address").textContent = data.address;
      $("balance-amount").textContent = amount(data.balance);
      $("balance-held").textContent = amount(data.held);
      if (!$("deposit-address").value) $("deposit-address").value = data.address;
      say("balance-status", "");
    } catch (err) {
      say("balance-status", describe(err), "error");
    }
  }

  async function deposit(event) {
    event.preventDefault();
    say("deposit-status", "Checking the transaction…");
    try {
      const data = await api("POST", "/deposit", {
        tx_sig: $("deposit-tx").value.trim(), user_pubkey: $("deposit-address").value.trim(),
      }, { auth: false });
      say("deposit-status", `Credited ${amount(data.amount)} base units of ${data.unit} to ` +
        `${data.address}; balance ${amount(data.balance)}.`, "ok");
      $("deposit-tx").value = "";
      refreshBalance();
    } catch (err) {
      say("deposit-status", describe(err), "error");
    }
  }

  // --- API keys ---------------------------------------------------------------------------------------------
  const utf8Hex = (text) => "0x" + Array.from(new TextEncoder().encode(text), (b) => b.toString(16).padStart(2, "0")).join("");

  async function createKey(event) {
    event.preventDefault();
    const wallet = window.ethereum;
    if (!wallet || typeof wallet.request !== "function") {
      say("keys-status", "No wallet found in this browser (window.ethereum). Install one, or paste an existing key.", "error");
      return;
    }
    try {
      say("keys-status", "Asking the wallet for your address…");
      const accounts = await wallet.request({ method: "eth_requestAccounts" });
      const address = accounts && accounts[0];
      if (!address) throw new Error("the wallet shared no account");
      const { challenge } = await api("POST", "/auth/challenge", { address }, { auth: false });
      say("keys-status", "Sign the challenge in your wallet…");
      const signature = await wallet.request({ method: "personal_sign", params: [utf8Hex(challenge), address] });
      const label = $("key-label").value.trim();
      const made = await api("POST", "/auth/keys", { address, challenge, signature, label: label || null }, { auth: false });
      setKey(made.key, made.id);
      const shown = $("key-new");
      shown.replaceChildren(el("strong", "New key (shown once, saved in this browser): "), el("code", made.key));
      shown.hidden = false;
      say("keys-status", `Key ${made.id} created for ${made.address}.`, "ok");
      await afterKeyChange();
    } catch (err) {
      say("keys-status", err instanceof ApiError ? describe(err) : `Wallet: ${err.message || err}`, "error");
    }
  }

  async function listKeys() {
    const rows = $("key-rows");
    if (!apiKey()) { rows.replaceChildren(row5("No key in this browser yet.")); return; }
    try {
      const data = await api("GET", "/auth/keys");
      const mine = localStorage.getItem(KEY_ID);
      rows.replaceChildren();
      for (const k of data.keys) {
        const tr = el("tr");
        const created = el("td", shortDate(k.created_at));
        created.title = k.created_at;
        tr.append(el("td", k.id), el("td", k.label || "—"), created);
        const state = k.revoked_at ? "revoked" : String(k.id) === mine ? "in use here" : "active";
        tr.append(el("td", state));
        const cell = el("td");
        if (!k.revoked_at) {
          const btn = el("button", "Revoke", "secondary danger");
          btn.type = "button";
          btn.setAttribute("aria-label", `Revoke key ${k.id}${k.label ? ` (${k.label})` : ""}`);
          btn.addEventListener("click", () => revokeKey(k.id));
          cell.append(btn);
        }
        tr.append(cell);
        rows.append(tr);
      }
      if (!data.keys.length) rows.append(row5("No keys."));
    } catch (err) {
      say("keys-status", describe(err), "error");
    }
  }

  // "2026-11-29 22:48" in the browser's time zone.
  function shortDate(iso) {
    const d = new Date(iso);
    if (Number.isNaN(d.getTime())) return iso;
    const p = (n) => String(n).padStart(2, "0");
    return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())} ${p(d.getHours())}:${p(d.getMinutes())}`;
  }

  function row5(text) {
    const tr = el("tr");
    const td = el("td", text);
    td.colSpan = 5;
    tr.append(td);
    return tr;
  }

  async function revokeKey(id) {
    try {
      await api("DELETE", `/auth/keys/${encodeURIComponent(id)}`);
      if (String(id) === localStorage.getItem(KEY_ID)) {
        setKey("", null);
        say("keys-status", `Key ${id} revoked; it was this browser's key, so it was forgotten here too.`, "ok");
        $("key-rows").replaceChildren(row5("No key in this browser yet."));
        return;
      }
      say("keys-status", `Key ${id} revoked.`, "ok");
      listKeys();
    } catch (err) {
      say("keys-status", describe(err), "error");
    }
  }

  async function afterKeyChange() {
    await Promise.all([listKeys(), refreshBalance(), loadModels()]);
  }

  // --- the network ------------------------------------------------------------------------------------------
  const gib = (bytes) => (bytes / 2 ** 30 >= 0.1 ? `${(bytes / 2 ** 30).toFixed(1)} GiB` : `${(bytes / 2 ** 20).toFixed(1)} MiB`);

  function renderModels(models) {
    const box = $("net-models");
    box.replaceChildren();
    for (const m of models) {
      const fig = el("figure", null, "model");
      const n = m.num_layers;
      const served = m.served ? "served" : "no complete route";
      fig.append(el("figcaption", `${m.model_id} — ${n ?? "?"} layers — ${served}`));
      const list = el("ul", null, "layer-map");
      list.setAttribute("aria-label", `Layers of ${m.model_id} held by each worker`);
      for (const h of m.holders) {
        const li = el("li", null, "holder");
        li.append(el("span", h.worker_id, "holder-name"));
        const track = el("span", null, "track");
        const bar = el("span", `${h.embeddings ? "emb · " : ""}${h.first}–${h.last - 1}${h.head ? " · head" : ""}`, "bar");
        if (n) { // CSSOM, not a style attribute: allowed by the page's Content-Security-Policy
          bar.style.left = `${(100 * h.first) / n}%`;
          bar.style.width = `${(100 * (h.last - h.first)) / n}%`;
        }
        bar.title = h.label;
        track.append(bar);
        li.append(track, el("span", h.label, "visually-hidden"));
        list.append(li);
      }
      if (!m.holders.length) list.append(el("li", "No live worker holds any of its layers.", "empty"));
      fig.append(list);
      box.append(fig);
    }
  }

  function renderWorkers(workers) {
    const rows = $("net-rows");
    rows.replaceChildren();
    for (const w of workers) {
      const tr = el("tr");
      const used = w.total_memory - w.free_memory;
      const holds = w.stages.map((s) => `${s.model_id}: ${s.label}`).join("; ") || "nothing yet";
      tr.append(el("td", w.worker_id), el("td", w.device), el("td", `${gib(used)} of ${gib(w.total_memory)}`),
        el("td", holds), el("td", w.cached_jobs), el("td", `${w.heartbeat_age_s} s ago`));
      rows.append(tr);
    }
    if (!workers.length) {
      const tr = el("tr");
      const td = el("td", "No live workers.");
      td.colSpan = 6;
      tr.append(td);
      rows.append(tr);
    }
  }

  async function refreshNetwork() {
    if (document.hidden) return;
    try {
      const net = await api("GET", "/network", undefined, { auth: false });
      $("net-tps").textContent = net.tokens_per_s === null ? "measuring…" : net.tokens_per_s.toFixed(1);
      $("net-workers").textContent = net.workers.length;
      $("net-jobs").textContent = net.active_jobs;
      renderModels(net.models);
      renderWorkers(net.workers);
      $("network").dataset.loaded = "true";
      say("net-status", "");
    } catch (err) {
      say("net-status", `Network: ${describe(err)}`, "error");
    }
  }

  // --- wiring -----------------------------------------------------------------------------------------------
  document.addEventListener("DOMContentLoaded", () => {
    showKeyState();
    $("chat-form").addEventListener("submit", sendChat);
    $("prompt").addEventListener("keydown", (e) => {
      if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) $("chat-form").requestSubmit();
    });
    $("chat-stop").addEventListener("click", () => running && running.abort());
    $("chat-clear").addEventListener("click", () => { conversation.length = 0; $("messages").replaceChildren(); say("chat-status", ""); });
    $("models-refresh").addEventListener("click", loadModels);
    $("balance-refresh").addEventListener("click", refreshBalance);
    $("deposit-form").addEventListener("submit", deposit);
    $("key-form").addEventListener("submit", createKey);
    $("keys-refresh").addEventListener("click", listKeys);
    $("key-paste").addEventListener("submit", (e) => {
      e.preventDefault();
      const key = $("key-input").value.trim();
      if (!key) return;
      setKey(key, null);
      $("key-input").value = "";
      afterKeyChange();
    });
    $("key-forget").addEventListener("click", () => {
      setKey("", null);
      $("key-rows").replaceChildren(row5("No key in this browser yet."));
      ["balance-address", "balance-amount", "balance-held"].forEach((id) => { $(id).textContent = "—"; });
    });
    afterKeyChange();
    refreshNetwork();
    setInterval(refreshNetwork, NETWORK_EVERY_MS);
    document.addEventListener("visibilitychange", refreshNetwork);
  });
})();
