// The Vault page's only script (served as a file: the CSP allows no inline
// script). It follows state changes over server-sent events and updates the
// state and health shown for each connection.
(function () {
  "use strict";
  var src = document.body.getAttribute("data-events");
  if (!src || !window.EventSource) { return; }
  var es = new EventSource(src);
  es.addEventListener("state", function (ev) {
    var e;
    try { e = JSON.parse(ev.data); } catch (err) { return; }
    var row = document.querySelector('[data-connection="' + CSS.escape(e.connection_id) + '"]');
    if (!row) { window.location.reload(); return; }
    var st = row.querySelector("[data-field=state]");
    var he = row.querySelector("[data-field=health]");
    var before = st ? st.textContent : "";
    if (st && e.state) { st.textContent = e.state; st.className = "state state-" + e.state; }
    if (he && e.health) { he.textContent = e.health; }
    // A new step the page does not show yet (a connection added or
    // deleted elsewhere, a tenant to pick) needs other controls: render
    // the page again. Changes the page itself made are already rendered.
    if ((before === "available" && e.state !== "available") ||
        (before !== "available" && e.state === "available") ||
        (before === "added" && e.state === "authorized")) {
      window.location.reload();
    }
  });
  // Confirm before destructive actions.
  document.querySelectorAll("form[data-confirm]").forEach(function (f) {
    f.addEventListener("submit", function (ev) {
      if (!window.confirm(f.getAttribute("data-confirm"))) { ev.preventDefault(); }
    });
  });
})();
