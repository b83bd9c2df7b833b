"use strict";
// Every value from an order is put on the page with textContent, never parsed as HTML.
const RULE = /^[A-Za-z0-9_-]{1,64}$/;
const RULE_TEXT = "1 to 64 characters, each a letter, a digit, '_' or '-'";
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

const money = (n, cur) => `${num.format(n)} ${cur}`;
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

async function show(uid, push) {
  $("uid").value = uid;
  if (push) history.pushState({ uid }, "", `/orders/${encodeURIComponent(uid)}`);
  $("order").hidden = true;
  if (!RULE.test(uid)) return status([el("strong", { text: "Invalid order id. " }), `An order id is ${RULE_TEXT}.`], "error");
  status("Loading…");
  let response;
  try {
    response = await fetch(`/order/${encodeURIComponent(uid)}`, { headers: { accept: "application/json" } });
  } catch (_) {
    return status("The server cannot be reached. Check your connection and try again.", "error");
  }
  if (response.status === 404) return status(["No order with id ", el("code", { text: uid }), "."], "error");
  if (response.status === 400) return status([el("strong", { text: "Invalid order id. " }), `An order id is ${RULE_TEXT}.`], "error");
  if (!response.ok) return status(`The server could not answer (HTTP ${response.status}). Try again shortly.`, "error");
  $("status").hidden = true;
  render(await response.json());
}

function route() {
  const m = location.pathname.match(/^\/orders\/([^/]+)$/);
  const uid = m ? decodeURIComponent(m[1]) : new URLSearchParams(location.search).get("id");
  if (uid != null) show(uid, false); else { $("order").hidden = true; $("status").hidden = true; $("uid").value = ""; }
}

function recentItem(s) {
  const a = el("a", { href: `/orders/${encodeURIComponent(s.order_uid)}`, "data-uid": s.order_uid },
    el("span", { class: "uid", text: s.order_uid }),
    el("span", { class: "meta", text: `${s.customer_id} · ${s.item_count} item${s.item_count === 1 ? "" : "s"} · ${money(s.amount, s.currency)}` }));
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
  source.addEventListener("error", () => $("live").classList.remove("on"));
  source.addEventListener("order", (e) => {
    const list = $("recent-list");
    list.prepend(recentItem(JSON.parse(e.data)));
    while (list.children.length > 200) list.lastElementChild.remove();
  });
}

document.addEventListener("DOMContentLoaded", () => {
  $("search").addEventListener("submit", (e) => { e.preventDefault(); show($("uid").value.trim(), true); });
  $("more").addEventListener("click", () => loadRecent(true));
  window.addEventListener("popstate", route);
  route();
  loadRecent(false);
  live();
});
