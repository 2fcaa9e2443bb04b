// pgjournal dashboard: live updates over server-sent events. Hand-written, no
// build step, no inline script anywhere (the pages' CSP forbids it). Only
// textContent and server-rendered (escaped) HTML are ever put into the page.
(function () {
  "use strict";
  var body = document.body;
  var source = null;
  var refreshing = false;
  var again = false;

  function setLive(on) {
    var dot = document.getElementById("live-state");
    if (dot) {
      dot.className = on ? "live on" : "live";
      dot.title = on ? "live: updates as runs change" : "not live (reconnecting)";
    }
  }

  function watched() {
    var seen = {};
    var list = [];
    document.querySelectorAll("[data-run][data-fp]").forEach(function (el) {
      var id = el.getAttribute("data-run");
      if (!seen[id]) {
        seen[id] = true;
        list.push(id + "~" + el.getAttribute("data-fp"));
      }
    });
    return list;
  }

  function busy() {
    // Never replace the page under someone typing into a form.
    var active = document.activeElement;
    if (active && active.form) { return true; }
    var typed = false;
    document.querySelectorAll("#live input[type=text], #live input:not([type])").forEach(function (el) {
      if (el.value) { typed = true; }
    });
    return typed;
  }

  function refreshRun() {
    if (refreshing) { again = true; return; }
    if (busy()) { return; }
    refreshing = true;
    fetch(window.location.href, { credentials: "same-origin", headers: { "Accept": "text/html" } })
      .then(function (r) { return r.ok ? r.text() : Promise.reject(r.status); })
      .then(function (html) {
        var doc = new DOMParser().parseFromString(html, "text/html");
        var fresh = doc.getElementById("live");
        var old = document.getElementById("live");
        if (fresh && old) {
          old.replaceWith(document.importNode(fresh, true));
          connect();  // the page may show new child runs: watch those too
        }
      })
      .catch(function () { /* the next event or a reload will do */ })
      .then(function () {
        refreshing = false;
        if (again) { again = false; refreshRun(); }
      });
  }

  function onRun(e) {
    var d = JSON.parse(e.data);
    document.querySelectorAll("[data-run-status]").forEach(function (el) {
      if (el.getAttribute("data-run-status") === d.id) {
        el.textContent = d.status;
        el.className = "status s-" + d.status;
      }
    });
    document.querySelectorAll("[data-run][data-fp]").forEach(function (el) {
      if (el.getAttribute("data-run") === d.id) { el.setAttribute("data-fp", d.fp); }
    });
    if (body.getAttribute("data-page") === "run") { refreshRun(); }
  }

  function connect() {
    var url = body.getAttribute("data-events");
    if (!url || !window.EventSource) { return; }
    if (source) { source.close(); }
    var runs = watched();
    url += (url.indexOf("?") < 0 ? "?" : "&") + "runs=" + encodeURIComponent(runs.join(","));
    source = new EventSource(url);
    source.addEventListener("hello", function () { setLive(true); });
    source.addEventListener("run", onRun);
    source.addEventListener("newer", function () {
      var note = document.getElementById("newer");
      if (note) { note.hidden = false; }
    });
    source.onerror = function () { setLive(false); };
  }

  connect();
})();
