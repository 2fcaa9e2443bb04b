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

  // -- a run page ---------------------------------------------------------
  // The page holds one page of the timeline (keyset: the steps after a
  // position) without values. "later steps" appends the next page, an opened
  // value is fetched then, and a change of the run fetches the bounded parts
  // of the page plus, when the page shows the tail, only the steps after the
  // last one it has.

  function stepsTable() { return document.querySelector("table.steps[data-steps]"); }

  function get(url) {
    return fetch(url, { credentials: "same-origin", headers: { "Accept": "text/html" } })
      .then(function (r) { return r.ok ? r.text() : Promise.reject(r.status); });
  }

  function parse(html) { return new DOMParser().parseFromString(html, "text/html"); }

  // A row that can change keeps the markup it came with, to tell whether a
  // fetched copy differs (its live DOM differs once a value is opened).
  function remember(row, markup) {
    if (row.getAttribute("data-open") === "1") {
      row.setAttribute("data-html", markup.innerHTML);
    }
    return row;
  }

  // Move the rows of a fetched <tbody id="new-steps"> to the page's timeline.
  function appendSteps(doc) {
    var fresh = doc.getElementById("new-steps");
    var rows = document.getElementById("step-rows");
    if (!fresh || !rows) { return; }
    var have = rows.getAttribute("data-last");
    fresh.querySelectorAll("tr[data-position]").forEach(function (tr) {
      var pos = tr.getAttribute("data-position");
      if (Number(pos) > Number(have)) {
        rows.appendChild(remember(document.importNode(tr, true), tr));
        return;
      }
      // A row fetched again because it could change: replaced if it did (an
      // unchanged row is kept, with its value open if it was).
      var old = rows.querySelector('tr[data-position="' + pos + '"]');
      if (old && old.getAttribute("data-html") !== tr.innerHTML) {
        old.replaceWith(remember(document.importNode(tr, true), tr));
      }
    });
    if (Number(fresh.getAttribute("data-last")) > Number(have)) {
      rows.setAttribute("data-last", fresh.getAttribute("data-last"));
    }
    rows.setAttribute("data-more", fresh.getAttribute("data-more"));
    var more = document.getElementById("more-steps");
    if (more) {
      more.hidden = fresh.getAttribute("data-more") !== "1";
      more.setAttribute("href", "?after=" + rows.getAttribute("data-last"));
    }
  }

  // The live refresh asks for the steps after the last one shown, or from the
  // earliest row that can still change (data-open) among the last page shown.
  function liveAfter(rows) {
    var after = Number(rows.getAttribute("data-last"));
    var shown = rows.querySelectorAll("tr[data-position]");
    for (var i = Math.max(shown.length - 50, 0); i < shown.length; i++) {
      if (shown[i].getAttribute("data-open") === "1") {
        after = Math.min(after, Number(shown[i].getAttribute("data-position")) - 1);
        break;
      }
    }
    return after;
  }

  function replaceById(doc, id) {
    var fresh = doc.getElementById(id);
    var old = document.getElementById(id);
    if (fresh && old) { old.replaceWith(document.importNode(fresh, true)); }
  }

  function refreshRun() {
    if (refreshing) { again = true; return; }
    if (busy()) { return; }
    var table = stepsTable();
    var rows = document.getElementById("step-rows");
    if (!table || !rows) { return; }
    refreshing = true;
    var url = table.getAttribute("data-steps") + "/live";
    if (rows.getAttribute("data-more") !== "1") {
      url += "?after=" + encodeURIComponent(liveAfter(rows));
    }
    get(url)
      .then(function (html) {
        var doc = parse(html);
        replaceById(doc, "live");
        replaceById(doc, "live-tail");
        appendSteps(doc);
        connect();  // the page may show new child runs: watch those too
      })
      .catch(function () { /* the next event or a reload will do */ })
      .then(function () {
        refreshing = false;
        if (again) { again = false; refreshRun(); }
      });
  }

  function moreSteps(e) {
    var table = stepsTable();
    var rows = document.getElementById("step-rows");
    if (!table || !rows) { return; }
    e.preventDefault();
    get(table.getAttribute("data-steps") + "/steps?after=" +
        encodeURIComponent(rows.getAttribute("data-last")))
      .then(function (html) { appendSteps(parse(html)); })
      .catch(function () { window.location.href = e.target.href; });
  }

  // A value is fetched when its <details> is first opened, and shown as text.
  function openValue(e) {
    var d = e.target;
    if (!d || d.tagName !== "DETAILS" || !d.open || !d.hasAttribute("data-value") ||
        d.hasAttribute("data-loaded")) { return; }
    d.setAttribute("data-loaded", "");
    var pre = d.querySelector("pre");
    fetch(d.getAttribute("data-value"), { credentials: "same-origin" })
      .then(function (r) { return r.ok ? r.text() : Promise.reject(r.status); })
      .then(function (text) { if (pre) { pre.textContent = text; } })
      .catch(function () { d.removeAttribute("data-loaded"); });
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

  document.querySelectorAll("#step-rows tr[data-open]").forEach(function (tr) {
    remember(tr, tr);
  });
  document.addEventListener("toggle", openValue, true);  // toggle does not bubble
  document.addEventListener("click", function (e) {
    if (e.target && e.target.id === "more-steps") { moreSteps(e); }
  });
  connect();
})();
