// The dashboard's only script; every page works without it.
// - Elements with data-refresh="N" (and an id) are replaced every N seconds by the
//   same element of a fresh copy of the page: live counts, charts and progress.
// - A checkbox with data-select-all="NAME" ticks every checkbox named NAME.
"use strict";

async function refresh(ids) {
  let response;
  try {
    response = await fetch(location.href, { credentials: "same-origin", cache: "no-store" });
  } catch (error) {
    return; // offline for a moment: keep what is shown, try again next tick
  }
  if (!response.ok || response.redirected) return; // logged out: leave the page as it is
  const fresh = new DOMParser().parseFromString(await response.text(), "text/html");
  for (const id of ids) {
    const current = document.getElementById(id);
    const replacement = fresh.getElementById(id);
    // Not under a pointer on its way to a button, nor while a button has the focus:
    // the click would land on a button the swap just removed. Next tick, then.
    if (current && current.querySelector("button:hover, button:focus")) continue;
    if (current && replacement) current.replaceWith(document.importNode(replacement, true));
  }
}

function startRefreshing() {
  const live = Array.from(document.querySelectorAll("[data-refresh][id]"));
  if (live.length === 0) return;
  const seconds = Math.min(...live.map((el) => Number(el.dataset.refresh) || 5));
  const tick = async () => {
    const ids = Array.from(document.querySelectorAll("[data-refresh][id]"), (el) => el.id);
    if (ids.length === 0) return; // the page stopped being live (e.g. the job finished)
    if (!document.hidden) await refresh(ids);
    setTimeout(tick, seconds * 1000);
  };
  setTimeout(tick, seconds * 1000);
}

function wireSelectAll() {
  for (const box of document.querySelectorAll("input[data-select-all]")) {
    box.addEventListener("change", () => {
      for (const other of document.querySelectorAll(`input[name="${box.dataset.selectAll}"]`)) {
        other.checked = box.checked;
      }
    });
  }
}

document.addEventListener("DOMContentLoaded", () => {
  startRefreshing();
  wireSelectAll();
});
