// Live parts of a page: an element with data-live="URL" is replaced by what URL returns every
// data-every seconds (default 2), until the answer carries the header X-Live-Done.
// A file input with data-into="ID" copies the chosen file's text into the textarea ID.
"use strict";
function live(el) {
  const every = 1000 * (parseFloat(el.dataset.every) || 2);
  async function tick() {
    try {
      const resp = await fetch(el.dataset.live, {credentials: "same-origin", headers: {"Accept": "text/html"}});
      if (resp.status === 401) { window.location.reload(); return; }
      if (resp.ok) {
        el.innerHTML = await resp.text();
        el.dataset.updates = String((parseInt(el.dataset.updates || "0", 10)) + 1);
        if (resp.headers.get("X-Live-Done")) { el.dataset.done = "1"; return; }
      }
    } catch (e) { /* the console restarts or the network blips: try again */ }
    setTimeout(tick, every);
  }
  setTimeout(tick, every);
}
document.addEventListener("DOMContentLoaded", function () {
  document.querySelectorAll("[data-live]").forEach(live);
  document.querySelectorAll("input[type=file][data-into]").forEach(function (input) {
    input.addEventListener("change", async function () {
      if (input.files.length) { document.getElementById(input.dataset.into).value = await input.files[0].text(); }
    });
  });
  document.addEventListener("submit", function (e) {  // delegated: live parts replace their forms
    const f = e.target;
    if (f.dataset && f.dataset.confirm && !window.confirm(f.dataset.confirm)) { e.preventDefault(); }
  });
});
