// The dashboard's live panel: this gateway's engines and queues, from /dashboard/live,
// every 1.5 s. Text goes in with textContent only: a username never becomes markup.
"use strict";

(function () {
  const EVERY_MS = 1500;
  const panel = document.getElementById("live");
  if (!panel) {
    return;
  }
  const engines = document.getElementById("live-engines");
  const users = document.getElementById("live-users");
  const stamp = document.getElementById("live-updated");

  function cell(row, text, className) {
    const td = document.createElement("td");
    td.textContent = String(text);
    if (className) {
      td.className = className;
    }
    row.appendChild(td);
    return td;
  }

  function slots(row, engine) {
    const td = cell(row, "", "slots");
    for (let i = 0; i < engine.slots; i += 1) {
      const slot = document.createElement("span");
      slot.className = i < engine.busy ? "slot busy" : "slot";
      td.appendChild(slot);
    }
    const count = document.createElement("span");
    count.className = "count";
    count.textContent = engine.busy + " / " + engine.slots;
    td.appendChild(count);
  }

  function showEngines(list) {
    engines.replaceChildren();
    for (const engine of list) {
      const row = document.createElement("tr");
      row.dataset.engine = engine.url;
      row.dataset.busy = String(engine.busy);
      cell(row, engine.url);
      cell(row, engine.healthy ? "up" : "down", engine.healthy ? "up" : "down");
      slots(row, engine);
      engines.appendChild(row);
    }
  }

  function showUsers(list) {
    users.replaceChildren();
    if (list.length === 0) {
      const row = document.createElement("tr");
      cell(row, "idle", "muted").colSpan = 3;
      users.appendChild(row);
    }
    for (const user of list) {
      const row = document.createElement("tr");
      row.dataset.user = user.username;
      cell(row, user.username);
      cell(row, user.generating, "num").dataset.field = "generating";
      cell(row, user.waiting, "num").dataset.field = "waiting";
      users.appendChild(row);
    }
  }

  async function refresh() {
    try {
      const answer = await fetch("/dashboard/live", { cache: "no-store" });
      if (answer.status === 401) {
        window.location.assign("/dashboard/login");
        return;
      }
      if (!answer.ok) {
        throw new Error("the gateway answered " + answer.status);
      }
      const live = await answer.json();
      showEngines(live.engines);
      showUsers(live.users);
      panel.dataset.busy = String(live.engines.reduce((n, e) => n + e.busy, 0));
      panel.dataset.waiting = String(live.waiting);
      panel.classList.remove("stale");
      stamp.textContent = "updated " + new Date().toLocaleTimeString();
    } catch (error) {
      panel.classList.add("stale");
      stamp.textContent = "not updated: " + error.message;
    }
    setTimeout(refresh, EVERY_MS);
  }

  refresh();
})();
