"use strict";
// Every value from an order is put on the page with textContent, never parsed as HTML.
const RULE = /^[A-Za-z0-9_-]{1,64}$/;
const RULE_TEXT = "1 to 64 characters, each an ASCII letter, a digit, '_' or '-'";
const $ = (id) => document.getElementById(id);
const num = new Intl.NumberFormat();

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "class") node.className = v; else if (k === "text") node.textContent = v; else node.setAttribute(k, v);
  }
  for (const c of children) if (c != null) node.append(c);
  return node;
}

function status(message, kind) {
  const box = $("status");
  box.replaceChildren(...[].concat(message));
  box.className = "status" + (kind ? " " + kind : "");
  box.hidden = false;
}

function list(pairs) {
  const dl = el("dl");
  for (const [k, v] of pairs) dl.append(el("dt", { text: k }), el("dd", { text: v == null || v === "" ? "—" : String(v) }));
  return dl;
}

const money = (n, cur) => `${num.format(n)} ${cur.toUpperCase()}`;
const when = (unix) => new Date(unix * 1000).toLocaleString();

function render(o) {
  const card = $("order");
  const copy = el("button", { class: "secondary", type: "button", text: "Copy id" });
  copy.addEventListener("click", () => navigator.clipboard && navigator.clipboard.writeText(o.order_uid).then(() => { copy.textContent = "Copied"; }));
  const rawToggle = el("button", { class: "secondary", type: "button", text: "Raw JSON" });
  const raw = el("pre", { text: JSON.stringify(o, null, 2) });
  raw.hidden = true;
  rawToggle.addEventListener("click", () => { raw.hidden = !raw.hidden; rawToggle.textContent = raw.hidden ? "Raw JSON" : "Card"; });

  const d = o.delivery, p = o.payment;
  const rows = o.items.map((i) => el("tr", {},
    el("td", { text: i.name }), el("td", { text: i.brand }), el("td", { text: i.size }),
    el("td", { class: "num", text: num.format(i.price) }), el("td", { class: "num", text: `${i.sale}%` }),
    el("td", { class: "num", text: num.format(i.total_price) }), el("td", { class: "num", text: String(i.status) })));
  const total = o.items.reduce((s, i) => s + i.total_price, 0);
  const table = el("table", {},
    el("thead", {}, el("tr", {}, ...["Item", "Brand", "Size", "Price", "Sale", "Total", "Status"].map((h, n) => el("th", { class: n >= 3 ? "num" : "", text: h })))),
    el("tbody", {}, ...rows),
    el("tfoot", {}, el("tr", {}, el("td", { text: `${o.items.length} item${o.items.length === 1 ? "" : "s"}` }), el("td"), el("td"), el("td"), el("td"),
      el("td", { class: "num", text: num.format(total) }), el("td"))));

  card.replaceChildren(
    el("div", { class: "head" }, el("h1", { text: o.order_uid }), copy, rawToggle),
    el("div", { class: "grid" },
      el("section", {}, el("h3", { text: "Order" }), list([["Track number", o.track_number], ["Entry", o.entry], ["Created", new Date(o.date_created).toLocaleString()], ["Delivery service", o.delivery_service], ["Customer", o.customer_id], ["Locale", o.locale]])),
      el("section", {}, el("h3", { text: "Delivery" }), list([["Name", d.name], ["Phone", d.phone], ["E-mail", d.email], ["Address", [d.address, d.city, d.region, d.zip].filter(Boolean).join(", ")]])),
      el("section", {}, el("h3", { text: "Payment" }), list([["Amount", money(p.amount, p.currency)], ["Provider", p.provider], ["Bank", p.bank], ["Paid", when(p.payment_dt)], ["Delivery cost", money(p.delivery_cost, p.currency)], ["Goods total", money(p.goods_total, p.currency)], ["Customs fee", money(p.custom_fee, p.currency)], ["Transaction", p.transaction]]))),
    table, raw);
  card.hidden = false;
}

function view(name) {
  $("rejected").hidden = name !== "rejected";
  $("recent").hidden = name === "rejected";
  $("results").hidden = true;
  $("order").hidden = true;
  $("status").hidden = true;
}

// Orders whose track number or customer id is exactly `q`.
async function findOrders(q) {
  const pages = await Promise.all(["track_number", "customer_id"].map(async (field) => {
    const r = await fetch(`/api/orders?limit=100&${field}=${encodeURIComponent(q)}`);
    return r.ok ? (await r.json()).orders : [];
  }));
  const seen = new Set();
  return pages.flat().filter((o) => !seen.has(o.order_uid) && seen.add(o.order_uid));
}

function showMatches(q, orders) {
  $("status").hidden = true;
  $("results-title").textContent = `${orders.length} order${orders.length === 1 ? "" : "s"} with track number or customer id ${q}`;
  $("results-list").replaceChildren(...orders.map(recentItem));
  $("results").hidden = false;
}

// An order id is looked up directly; anything else, or an id with no order,
// is looked for as a track number or customer id.
async function find(q, push) {
  if (RULE.test(q)) return show(q, push);
  $("uid").value = q;
  if (push) history.pushState({ q }, "", `/?q=${encodeURIComponent(q)}`);
  view("home");
  status("Searching…");
  let orders;
  try { orders = await findOrders(q); } catch (_) { return status("The server cannot be reached. Check your connection and try again.", "error"); }
  if (orders.length) return showMatches(q, orders);
  status(["Nothing found for ", el("code", { text: q }), `: it is not a valid order id (${RULE_TEXT}), and no order has it as its track number or customer id.`], "error");
}

async function show(uid, push) {
  $("uid").value = uid;
  if (push) history.pushState({ uid }, "", `/orders/${encodeURIComponent(uid)}`);
  view("home");
  if (!RULE.test(uid)) return status([el("strong", { text: "Invalid order id. " }), `An order id is ${RULE_TEXT}.`], "error");
  status("Loading…");
  let response;
  try {
    response = await fetch(`/order/${encodeURIComponent(uid)}`, { headers: { accept: "application/json" } });
  } catch (_) {
    return status("The server cannot be reached. Check your connection and try again.", "error");
  }
  if (response.status === 404) return notFound(uid, await response.json().catch(() => ({})));
  if (response.status === 400) return status([el("strong", { text: "Invalid order id. " }), `An order id is ${RULE_TEXT}.`], "error");
  if (!response.ok) return status(`The server could not answer (HTTP ${response.status}). Try again shortly.`, "error");
  $("status").hidden = true;
  render(await response.json());
}

async function notFound(uid, body) {
  const orders = await findOrders(uid).catch(() => []);
  if (orders.length) return showMatches(uid, orders);
  const letters = body.dead_letters || [];
  if (!letters.length) return status(["No order with id ", el("code", { text: uid }), "."], "error");
  status([el("p", {}, "Order ", el("code", { text: uid }), " was not stored: its message was rejected."),
    el("ol", { class: "letters" }, ...letters.map(letterItem))], "error");
}

// A rejected message: why, where from, and its payload on request, as text.
function letterItem(l) {
  const preview = el("pre", { class: "payload" });
  preview.hidden = true;
  const toggle = el("button", { class: "secondary", type: "button", text: "Payload" });
  toggle.addEventListener("click", async () => {
    if (!preview.dataset.loaded) {
      try {
        const r = await fetch(l.href);
        const d = r.ok ? await r.json() : null;
        preview.textContent = d ? d.payload_preview + (d.payload_complete ? "" : `\n… (${num.format(d.payload_bytes)} bytes in all)`) : `The letter could not be read (HTTP ${r.status}).`;
        preview.dataset.loaded = "1";
      } catch (_) { preview.textContent = "The server cannot be reached."; }
    }
    preview.hidden = !preview.hidden;
  });
  return el("li", { class: "letter", "data-stage": l.stage },
    el("div", { class: "head" },
      el("span", { class: "stage", text: l.stage }),
      el("code", { text: l.order_uid || l.key || "(no id)" }),
      el("span", { class: "meta", text: `${new Date(l.at).toLocaleString()} · ${l.source.topic}/${l.source.partition}/${l.source.offset}${l.replay_of ? ` · replay of ${l.replay_of}` : ""}` }),
      toggle),
    el("ul", { class: "reasons" }, ...l.reasons.map((r) => el("li", { text: r }))),
    preview);
}

let letterCursor = null;
async function loadLetters(more) {
  const stage = $("stage").value;
  const query = new URLSearchParams({ limit: "50" });
  if (stage) query.set("stage", stage);
  if (more && letterCursor) query.set("before", letterCursor);
  try {
    const r = await fetch(`/api/dead-letters?${query}`);
    if (!r.ok) return status(`Rejected messages could not be read (HTTP ${r.status}).`, "error");
    const page = await r.json();
    letterCursor = page.next_cursor;
    $("letters")[more ? "append" : "replaceChildren"](...page.dead_letters.map(letterItem));
    $("no-letters").hidden = $("letters").children.length > 0;
    $("more-letters").hidden = !letterCursor;
  } catch (_) { status("The server cannot be reached. Check your connection and try again.", "error"); }
}

function showRejected(stage, push) {
  $("stage").value = stage || "";
  if (push) history.pushState({}, "", stage ? `/rejected?stage=${encodeURIComponent(stage)}` : "/rejected");
  view("rejected");
  loadLetters(false);
}

function route() {
  const params = new URLSearchParams(location.search);
  if (location.pathname === "/rejected") return showRejected(params.get("stage"), false);
  const m = location.pathname.match(/^\/orders\/([^/]+)$/);
  const uid = m ? decodeURIComponent(m[1]) : params.get("id");
  if (uid != null) return show(uid, false);
  if (params.get("q") != null) return find(params.get("q"), false);
  view("home");
  $("uid").value = "";
}

function recentItem(s) {
  const a = el("a", { href: `/orders/${encodeURIComponent(s.order_uid)}`, "data-uid": s.order_uid },
    el("span", { class: "uid", text: s.order_uid }),
    el("span", { class: "meta", text: `${s.customer_id} · ${s.track_number} · ${s.item_count} item${s.item_count === 1 ? "" : "s"} · ${money(s.amount, s.currency)}` }));
  a.addEventListener("click", (e) => { e.preventDefault(); show(s.order_uid, true); window.scrollTo(0, 0); });
  return el("li", {}, a);
}

let cursor = null;
async function loadRecent(more) {
  try {
    const r = await fetch(`/api/orders?limit=20${more && cursor ? `&before=${cursor}` : ""}`);
    if (!r.ok) return;
    const page = await r.json();
    cursor = page.next_cursor;
    $("recent-list")[more ? "append" : "replaceChildren"](...page.orders.map(recentItem));
    $("more").hidden = !cursor;
  } catch (_) { /* the list is a convenience; lookups still work */ }
}

function live() {
  if (!window.EventSource) return;
  const source = new EventSource("/api/orders/stream");
  source.addEventListener("open", () => $("live").classList.add("on"));
  source.addEventListener("error", () => {
    $("live").classList.remove("on");
    // Refused (as many feeds open as allowed) or gone: the browser gives up, so try later.
    if (source.readyState === EventSource.CLOSED) setTimeout(live, 30000);
  });
  source.addEventListener("order", (e) => {
    const list = $("recent-list");
    list.prepend(recentItem(JSON.parse(e.data)));
    while (list.children.length > 200) list.lastElementChild.remove();
  });
}

document.addEventListener("DOMContentLoaded", () => {
  $("search").addEventListener("submit", (e) => { e.preventDefault(); find($("uid").value.trim(), true); });
  $("nav-rejected").addEventListener("click", (e) => { e.preventDefault(); showRejected("", true); });
  $("stage").addEventListener("change", () => showRejected($("stage").value, true));
  $("more-letters").addEventListener("click", () => loadLetters(true));
  $("more").addEventListener("click", () => loadRecent(true));
  window.addEventListener("popstate", route);
  route();
  loadRecent(false);
  live();
});
