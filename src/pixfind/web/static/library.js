// pixfind web page, the whole library at once: the duplicates view (a run on the server, polled)
// and the line that says what `pixfind serve --watch` is doing. Plain JavaScript, no build step;
// kept apart from app.js (the search page), which it only listens to. Every name shown comes from
// files and is set as text, never as HTML.
"use strict";

(() => {
  const $ = (sel) => document.querySelector(sel);
  const els = {
    view: $("#duplicates-view"), form: $("#dupes-form"), threshold: $("#dupes-threshold"), under: $("#dupes-under"),
    start: $("#dupes-start"), cancel: $("#dupes-cancel"), progress: $("#dupes-progress"), bar: $("#dupes-bar"),
    progressText: $("#dupes-progress-text"), error: $("#dupes-error"), summary: $("#dupes-summary"),
    groups: $("#dupes-groups"), more: $("#dupes-more"), tabSearch: $("#view-search"),
    tabDuplicates: $("#view-duplicates"), watch: $("#watch-line"),
  };
  const POLL_MS = 1000;
  const WATCH_POLL_MS = 3000;
  const GROUPS_PER_PAGE = 100;

  const { basename, dirname, plural, formatBytes, el } = window.pixfindDom;
  const clock = (seconds) => new Date(seconds * 1000).toLocaleTimeString();

  function formatElapsed(seconds) {
    if (seconds < 10) return `${seconds.toFixed(1)} s`;
    const s = Math.round(seconds);
    return s < 60 ? `${s} s` : `${Math.floor(s / 60)} min ${String(s % 60).padStart(2, "0")} s`;
  }

  // The end of a folder's path says most about it (the start is the same for every picture).
  function shortFolder(folder) {
    const parts = folder.split("/").filter(Boolean);
    return parts.length > 2 ? `…/${parts.slice(-2).join("/")}` : folder;
  }

  async function api(method, url) {
    const response = await fetch(url, { method, headers: { Accept: "application/json" } });
    let body = null;
    try { body = await response.json(); } catch { body = null; }
    return { status: response.status, ok: response.ok, body };
  }

  // -- which view -------------------------------------------------------------------------------

  const inDuplicates = () => new URLSearchParams(location.search).get("view") === "duplicates";

  function showView() {
    const on = inDuplicates();
    document.body.classList.toggle("view-duplicates", on);
    els.view.hidden = !on;
    els.tabDuplicates.classList.toggle("active", on);
    els.tabSearch.classList.toggle("active", !on);
    if (on) { els.tabDuplicates.setAttribute("aria-current", "page"); els.tabSearch.removeAttribute("aria-current"); }
    else { els.tabSearch.setAttribute("aria-current", "page"); els.tabDuplicates.removeAttribute("aria-current"); }
    if (on) pollJob();
  }

  function leaveDuplicates() {
    // A search started from the top bar shows its results: app.js sets its own address.
    if (!document.body.classList.contains("view-duplicates")) return;
    document.body.classList.remove("view-duplicates");
    els.view.hidden = true;
    els.tabDuplicates.classList.remove("active");
    els.tabSearch.classList.add("active");
  }

  els.tabDuplicates.addEventListener("click", (event) => {
    if (event.metaKey || event.ctrlKey || event.shiftKey || event.button !== 0) return;
    event.preventDefault();
    if (!inDuplicates()) history.pushState(null, "", "/?view=duplicates");
    showView();
  });
  els.tabSearch.addEventListener("click", (event) => {
    if (event.metaKey || event.ctrlKey || event.shiftKey || event.button !== 0) return;
    event.preventDefault();
    if (location.search) history.pushState(null, "", "/");
    window.dispatchEvent(new PopStateEvent("popstate")); // app.js shows the search page afresh
  });
  window.addEventListener("popstate", showView);
  $("#search-form").addEventListener("submit", leaveDuplicates);
  $("#file-input").addEventListener("change", leaveDuplicates);
  window.addEventListener("drop", leaveDuplicates);
  document.addEventListener("paste", leaveDuplicates);
  for (const chip of document.querySelectorAll("#examples .chip")) chip.addEventListener("click", leaveDuplicates);

  // -- the duplicates run -----------------------------------------------------------------------

  const job = { timer: null, shownRun: null, shownGroups: 0, total: 0, thresholdSet: false };

  function showError(message) {
    els.error.textContent = message;
    els.error.hidden = !message;
  }

  async function pollJob() {
    clearTimeout(job.timer);
    job.timer = null;
    let answer;
    try {
      answer = await api("GET", `/api/duplicates?limit=${GROUPS_PER_PAGE}`);
    } catch (err) {
      showError(`the server cannot be reached: ${err.message}`);
      return;
    }
    if (!answer.ok) { showError(answer.body?.detail || `error ${answer.status}`); return; }
    renderJob(answer.body);
    if (answer.body.state === "running" && inDuplicates()) job.timer = setTimeout(pollJob, POLL_MS);
  }

  function renderJob(data) {
    if (!job.thresholdSet) { // the server's default, or the last run's threshold and folder
      els.threshold.value = String(data.threshold ?? data.default_threshold ?? 0.95);
      els.under.value = data.under || "";
      job.thresholdSet = true;
    }
    const running = data.state === "running";
    els.start.disabled = running;
    els.cancel.hidden = !running;
    els.progress.hidden = !running;
    if (data.state !== "failed") showError("");
    if (running) {
      els.bar.max = Math.max(1, data.total);
      if (data.total) els.bar.value = data.scanned; else els.bar.removeAttribute("value"); // preparing: indeterminate
      els.progressText.textContent = data.total
        ? `Compared ${data.scanned.toLocaleString()} of ${plural(data.total, "picture")} · `
          + `${plural(data.groups_found, "group")} so far · ${formatElapsed(data.elapsed_s || 0)}`
        : `${data.phase || "starting"}…`;
      els.summary.replaceChildren();
      clearGroups();
      return;
    }
    if (data.state === "idle") {
      els.summary.textContent = "Nothing compared yet: choose a threshold and press Find duplicates.";
      clearGroups();
    } else if (data.state === "cancelled") {
      els.summary.textContent = `Cancelled after comparing ${data.scanned.toLocaleString()} of `
        + `${plural(data.total, "picture")}.`;
      clearGroups();
    } else if (data.state === "failed") {
      els.summary.replaceChildren();
      showError(data.error || "the search for duplicates failed");
      clearGroups();
    } else if (data.state === "done") {
      renderSummary(data);
      if (job.shownRun !== data.started_at) { // a new result: shown from its first group
        clearGroups();
        job.shownRun = data.started_at;
        appendGroups(data);
      }
    }
  }

  function renderSummary(data) {
    const where = data.under ? [" under ", el("code", { text: data.under })] : [];
    els.summary.replaceChildren(
      el("strong", { text: plural(data.groups_total, "group") + " of duplicates" }), ...where,
      ` (${plural(data.images_total, "picture")}; ${formatBytes(data.reclaimable_bytes)} freed by keeping the `
        + `largest of each) at threshold ${data.threshold}, in ${formatElapsed(data.elapsed_s || 0)}.`,
      el("span", {
        class: "dupes-asof",
        text: ` These are from the index as it was at ${clock(data.started_at)}, when the search ran: pictures `
          + "added, changed or deleted since are not in them (run it again to see them).",
      }),
    );
  }

  function clearGroups() {
    job.shownRun = null;
    job.shownGroups = 0;
    els.groups.replaceChildren();
    els.more.hidden = true;
  }

  function appendGroups(data) {
    const start = job.shownGroups;
    data.groups.forEach((group, i) => els.groups.append(renderGroup(group, start + i + 1)));
    job.shownGroups += data.groups.length;
    job.total = data.groups_total;
    els.more.hidden = job.shownGroups >= job.total;
    els.more.textContent = `Show more groups (${(job.total - job.shownGroups).toLocaleString()} left)`;
  }

  function renderGroup(group, number) {
    const files = group.files;
    const head = el("div", { class: "dupe-group-head" },
      el("strong", { text: `#${number} · ${plural(files.length, "picture")}` }),
      el("span", { class: "muted", text: ` · similarity ≥ ${group.similarity.toFixed(4)}` }),
      group.exact_copies ? el("span", { class: "dupe-exact", text: "identical bytes" }) : "",
      el("span", { class: "muted", text: ` · ${formatBytes(group.reclaimable_bytes)} to free` }));
    const keep = files[0].content;
    const row = el("div", { class: "dupe-row" },
      ...files.map((file, i) => renderFile(file, i === 0, i > 0 && Boolean(keep) && file.content === keep)));
    return el("article", { class: "dupe-group" }, head, row);
  }

  function renderFile(file, largest, sameBytes) {
    const name = basename(file.path);
    const img = el("img", { src: file.thumb, alt: name, loading: "lazy", decoding: "async" });
    img.addEventListener("load", () => img.classList.add("loaded"));
    img.addEventListener("error", () => figure.classList.add("broken"));
    const figure = el("figure", { class: largest ? "dupe largest" : "dupe" },
      el("a", { class: "dupe-thumb", href: file.image, target: "_blank", rel: "noopener", title: file.path }, img,
        largest ? el("span", { class: "dupe-badge", text: "Largest", title: "the largest copy: the one to keep" }) : ""),
      el("figcaption", {},
        el("span", { class: "dupe-name", text: name, title: file.path }),
        el("span", { class: "dupe-folder", text: shortFolder(dirname(file.path)), title: file.path }),
        el("span", { class: "dupe-dims", text: `${file.width} × ${file.height} · ${formatBytes(file.size)}` }),
        sameBytes ? el("span", { class: "dupe-same", text: "same bytes as the largest" }) : ""));
    return figure;
  }

  els.form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const p = new URLSearchParams({ threshold: els.threshold.value });
    const under = els.under.value.trim();
    if (under) p.set("under", under);
    showError("");
    els.start.disabled = true;
    let answer;
    try {
      answer = await api("POST", `/api/duplicates?${p}`);
    } catch (err) {
      els.start.disabled = false;
      showError(`the server cannot be reached: ${err.message}`);
      return;
    }
    if (answer.status === 409) { // one run at a time: follow the one under way
      els.summary.textContent = `A search for duplicates is already running (started ${clock(answer.body.started_at)}): `
        + "shown below.";
    } else if (!answer.ok) {
      els.start.disabled = false;
      showError(answer.body?.detail || `error ${answer.status}`);
      return;
    }
    job.thresholdSet = true;
    pollJob();
  });

  // What the user typed is kept: the server's values only fill fields nobody touched yet.
  for (const field of [els.threshold, els.under]) field.addEventListener("input", () => { job.thresholdSet = true; });

  els.cancel.addEventListener("click", async () => {
    els.cancel.disabled = true;
    try { await api("DELETE", "/api/duplicates"); } finally { els.cancel.disabled = false; }
    pollJob();
  });

  els.more.addEventListener("click", async () => {
    const answer = await api("GET", `/api/duplicates?offset=${job.shownGroups}&limit=${GROUPS_PER_PAGE}`);
    if (!answer.ok || answer.body.state !== "done" || answer.body.started_at !== job.shownRun) { pollJob(); return; }
    appendGroups(answer.body);
  });

  // -- the live index (`pixfind serve --watch`) ----------------------------------------------------

  let watchTimer = null;

  async function pollWatch() {
    clearTimeout(watchTimer);
    watchTimer = null;
    let answer;
    try {
      answer = await api("GET", "/api/watch");
    } catch {
      watchTimer = setTimeout(pollWatch, WATCH_POLL_MS * 3); // the server restarting: ask again later
      return;
    }
    if (!answer.ok || !answer.body?.active) { els.watch.hidden = true; return; } // no --watch: nothing shown
    renderWatch(answer.body);
    if (!document.hidden) watchTimer = setTimeout(pollWatch, WATCH_POLL_MS);
  }

  function renderWatch(data) {
    const folders = data.folders || [];
    const names = folders.slice(0, 3).flatMap((folder, i) => [i ? ", " : "", el("code", { text: basename(folder), title: folder })]);
    if (folders.length > 3) names.push(` and ${folders.length - 3} more`);
    const failed = data.phase === "failed";
    const parts = [el("span", { class: `watch-dot ${failed ? "off" : data.applying || data.phase === "indexing" ? "busy" : "on"}`, "aria-hidden": "true" }),
      failed ? "Stopped watching " : "Watching ", ...names];
    if (data.phase === "indexing") parts.push(el("span", { class: "muted", text: " · indexing the folders…" }));
    else if (data.applying) parts.push(el("span", { class: "muted", text: " · indexing changes…" }));
    const last = data.last_batch;
    if (last) {
      const counts = `${last.new + last.copied} added, ${last.updated} changed, ${last.moved} moved, `
        + `${last.removed} removed, ${last.failed} failed`;
      parts.push(el("span", { class: "watch-last", text: ` · last change ${clock(last.at)}: ${counts}`,
        title: (last.problems || []).join("\n") }));
    }
    if (data.pending) parts.push(el("span", { class: "muted", text: ` · ${plural(data.pending, "change")} pending` }));
    for (const folder of data.missing || []) {
      parts.push(el("span", { class: "watch-error", text: ` · watched folder gone: ${folder}` }));
    }
    if (data.error) parts.push(el("span", { class: "watch-error", text: ` · ${data.error}` }));
    els.watch.replaceChildren(...parts);
    els.watch.classList.toggle("failed", failed || Boolean((data.missing || []).length));
    els.watch.hidden = false;
  }

  document.addEventListener("visibilitychange", () => { if (!document.hidden && !els.watch.hidden) pollWatch(); });

  showView();
  pollWatch();
})();
