// pixfind web page: plain JavaScript, no build step, no external resources.
"use strict";

(() => {
  const $ = (sel) => document.querySelector(sel);
  const els = {
    form: $("#search-form"), q: $("#q"), k: $("#k"), under: $("#under"), underClear: $("#under-clear"),
    folders: $("#folders"), uploadBtn: $("#upload-btn"), file: $("#file-input"),
    status: $("#status"), error: $("#error"), empty: $("#empty"), results: $("#results"),
    info: $("#info"), summary: $("#index-summary"), dropzone: $("#dropzone"), notice: $("#notice"),
    viewer: $("#viewer"), vImg: $("#viewer-img"), vName: $("#viewer-name"), vPath: $("#viewer-path"),
    vDims: $("#viewer-dims"), vSize: $("#viewer-size"), vScore: $("#viewer-score"), vRank: $("#viewer-rank"),
    vCopies: $("#viewer-copies"), not: $("#not"), minScore: $("#min-score"), allCopies: $("#all-copies"),
    vOpen: $("#viewer-open"), vMore: $("#more-like-this"), vFolder: $("#viewer-folder"),
    vCopy: $("#viewer-copy"), vPrev: $("#viewer-prev"), vNext: $("#viewer-next"), vClose: $("#viewer-close"),
    vTaken: $("#viewer-taken"), vCamera: $("#viewer-camera"),
  };
  // Filters on what a photo is: [API parameter, control]; each goes into the search and the URL as it is.
  const photoFilters = [["after", $("#after")], ["before", $("#before")], ["camera", $("#camera")],
    ["type", $("#type")], ["orientation", $("#orientation")]];

  const state = {
    hits: [], current: -1, controller: null, queryImageUrl: null, queryFile: null, folders: new Set(), maxUpload: 0,
  };

  // -- helpers --------------------------------------------------------------------------------

  const { basename, dirname, plural, formatBytes, el } = window.pixfindDom;
  // Scores are cosines; -0.000 reads oddly, so near-zero shows as 0.000.
  const formatScore = (score, digits = 3) => (Math.abs(score) < 0.5 * 10 ** -digits ? 0 : score).toFixed(digits);

  function showError(message) {
    els.error.textContent = message;
    els.error.hidden = !message;
  }

  function setStatus(...parts) {
    // A query thumbnail sits beside the sentence; the sentence itself flows as text.
    const images = parts.filter((part) => part instanceof HTMLImageElement);
    const words = parts.filter((part) => !(part instanceof HTMLImageElement));
    els.status.replaceChildren(...images, ...(words.length ? [el("span", { class: "status-text" }, ...words)] : []));
  }

  function params() {
    const p = new URLSearchParams();
    p.set("k", els.k.value);
    const under = els.under.value.trim();
    if (under) p.set("under", under);
    els.underClear.hidden = !under;
    const not = els.not.value.trim();
    if (not) p.set("not", not);
    const minScore = els.minScore.value.trim();
    if (minScore) p.set("min_score", minScore);
    for (const [name, control] of photoFilters) if (control.value.trim()) p.set(name, control.value.trim());
    if (els.allCopies.checked) p.set("all", "true");
    return p;
  }

  async function request(url, options = {}) {
    if (state.controller) state.controller.abort();
    const controller = new AbortController();
    state.controller = controller;
    const started = performance.now();
    const response = await fetch(url, { ...options, signal: controller.signal });
    let body = null;
    try { body = await response.json(); } catch { body = null; }
    if (!response.ok) {
      const detail = body && body.detail ? body.detail : `${response.status} ${response.statusText}`;
      throw new Error(typeof detail === "string" ? detail : JSON.stringify(detail));
    }
    return { hits: body, ms: Math.round(performance.now() - started) };
  }

  // -- searching ------------------------------------------------------------------------------

  async function run(kind, url, options, describe) {
    showError("");
    els.empty.hidden = true;
    document.body.classList.add("has-results");
    renderSkeleton(Number(els.k.value));
    setStatus(el("span", { class: "spinner", "aria-hidden": "true" }), " Searching…");
    try {
      const { hits, ms } = await request(url, options);
      state.hits = hits;
      render(hits);
      setStatus(...describe(hits, ms));
    } catch (err) {
      if (err.name === "AbortError") return;
      state.hits = [];
      els.results.replaceChildren();
      setStatus();
      showError(err.message);
    }
  }

  function searchText(q, push = true) {
    q = q.trim();
    if (!q) { els.q.focus(); return; }
    const p = params();
    p.set("q", q);
    if (push) pushUrl({ q });
    dropQueryImage();
    return run("text", `/api/search?${p}`, {}, (hits, ms) => [
      el("strong", { text: plural(hits.length, "picture") }), " for ",
      el("q", { text: q }), folderNote(), el("span", { class: "muted", text: ` · ${ms} ms` }),
    ]);
  }

  function searchSimilar(path, push = true, hit = null) {
    const p = params();
    // A hit carries server-made URLs that keep any file name exact; a path from the address bar
    // is sent as it reads.
    const url = hit ? `${hit.similar}&${p}` : `/api/similar?${p}&${new URLSearchParams({ path })}`;
    const thumb = hit ? hit.thumb : `/api/thumb?${new URLSearchParams({ path })}`;
    if (push) pushUrl({ like: path });
    dropQueryImage();
    els.q.value = "";
    return run("similar", url, {}, (hits, ms) => [
      el("img", { class: "query-thumb", src: thumb, alt: "" }),
      el("strong", { text: plural(hits.length, "picture") }), " like ",
      el("span", { class: "filename", text: basename(path), title: path }), folderNote(),
      el("span", { class: "muted", text: ` · ${ms} ms` }),
    ]);
  }

  function searchImage(file) {
    if (!file) return;
    if (file.type && !file.type.startsWith("image/")) {
      showError(`${file.name || "That file"} is not an image`);
      return;
    }
    if (state.maxUpload && file.size > state.maxUpload) { // said here, without sending it first
      showError(`${file.name || "That image"} is too large to search by (${formatBytes(file.size)}; `
        + `the limit is ${formatBytes(state.maxUpload)}): a smaller copy finds the same pictures`);
      return;
    }
    const body = new FormData();
    body.append("file", file, file.name || "pasted-image.png");
    pushUrl({});
    els.q.value = "";
    dropQueryImage();
    state.queryFile = file; // kept so a new result count or folder can re-run it
    state.queryImageUrl = URL.createObjectURL(file);
    const name = file.name || "pasted image";
    return run("image", `/api/search/image?${params()}`, { method: "POST", body }, (hits, ms) => [
      el("img", { class: "query-thumb", src: state.queryImageUrl, alt: "" }),
      el("strong", { text: plural(hits.length, "picture") }), " like ",
      el("span", { class: "filename", text: name }), folderNote(),
      el("span", { class: "muted", text: ` · ${ms} ms` }),
    ]);
  }

  function folderNote() {
    const under = els.under.value.trim();
    const not = els.not.value.trim();
    const minScore = els.minScore.value.trim();
    return el("span", {},
      under ? el("span", { text: " in ", class: "in" }, el("code", { text: under })) : "",
      not ? el("span", { text: " but not ", class: "not-note" }, el("q", { text: not })) : "",
      minScore ? el("span", { class: "muted", text: ` · score ≥ ${minScore}` }) : "",
      ...photoFilters.filter(([, control]) => control.value.trim()).map(([name, control]) =>
        el("span", { class: "muted filter-note", text: ` · ${name} ${control.value.trim()}` })));
  }

  function dropQueryImage() {
    if (state.queryImageUrl) URL.revokeObjectURL(state.queryImageUrl);
    state.queryImageUrl = null;
    state.queryFile = null;
  }

  // -- rendering ------------------------------------------------------------------------------

  function renderSkeleton(count) {
    const cards = [];
    for (let i = 0; i < Math.min(count, 24); i++) cards.push(el("div", { class: "card skeleton" }, el("div", { class: "thumb" }), el("div", { class: "meta" })));
    els.results.replaceChildren(...cards);
  }

  function render(hits) {
    if (!hits.length) {
      els.results.replaceChildren(el("p", { class: "none", text: "No pictures found. Try other words or another folder." }));
      return;
    }
    const cards = hits.map((hit, i) => {
      const name = basename(hit.path);
      const img = el("img", { src: hit.thumb, alt: name, loading: "lazy", decoding: "async" });
      img.addEventListener("load", () => img.classList.add("loaded"));
      img.addEventListener("error", () => img.closest(".card").classList.add("broken"));
      const card = el("a", { class: "card", href: hit.image, "data-index": String(i), title: hit.path },
        el("div", { class: "thumb" }, img, el("span", { class: "score", text: formatScore(hit.score) }),
          hit.copies > 1 ? el("span", { class: "copies", text: `×${hit.copies}`, title: `${hit.copies} identical files` }) : ""),
        el("div", { class: "meta" }, el("span", { class: "name", text: name })));
      card.addEventListener("click", (event) => {
        if (event.metaKey || event.ctrlKey || event.shiftKey || event.button !== 0) return;
        event.preventDefault();
        openViewer(i);
      });
      rememberFolder(dirname(hit.path));
      return card;
    });
    els.results.replaceChildren(...cards);
  }

  function rememberFolder(folder) {
    if (state.folders.has(folder) || state.folders.size > 200) return;
    state.folders.add(folder);
    els.folders.append(el("option", { value: folder }));
  }

  // -- viewer ---------------------------------------------------------------------------------

  function openViewer(i) {
    const hit = state.hits[i];
    if (!hit) return;
    state.current = i;
    els.vImg.classList.remove("full");
    els.vImg.src = hit.thumb; // shown at once, replaced by the original once it has loaded
    const full = new Image();
    full.onload = () => { if (state.current === i) { els.vImg.src = hit.image; els.vImg.classList.add("full"); } };
    full.src = hit.image;
    els.vImg.alt = basename(hit.path);
    els.vName.textContent = basename(hit.path);
    els.vName.title = hit.path;
    // Let long folder paths wrap after a slash rather than in the middle of a name.
    els.vPath.replaceChildren(...dirname(hit.path).split(/(?<=\/)/).flatMap((part) => [part, el("wbr")]));
    els.vDims.textContent = hit.width && hit.height ? `${hit.width} × ${hit.height} px` : "unknown";
    els.vSize.textContent = formatBytes(hit.size);
    els.vScore.textContent = formatScore(hit.score, 4);
    els.vTaken.textContent = hit.taken
      ? `${hit.taken.replace("T", " ")}${hit.taken_from === "mtime" ? " (file date)" : ""}` : "unknown";
    els.vCamera.textContent = hit.camera || "unknown";
    const others = hit.copy_paths || [];
    els.vCopies.replaceChildren(others.length ? `${hit.copies} identical files; also at:` : "none",
      ...others.slice(0, 20).map((path) => el("code", { class: "copy-list", text: path })),
      ...(others.length > 20 ? [el("span", { class: "copy-list", text: `and ${others.length - 20} more` })] : []));
    els.vRank.textContent = `#${hit.rank} of ${state.hits.length}`;
    els.vOpen.href = hit.image;
    els.vPrev.disabled = i === 0;
    els.vNext.disabled = i === state.hits.length - 1;
    if (!els.viewer.open) els.viewer.showModal();
  }

  function closeViewer() {
    if (els.viewer.open) els.viewer.close();
  }

  els.vClose.addEventListener("click", closeViewer);
  els.viewer.addEventListener("click", (event) => { if (event.target === els.viewer) closeViewer(); });
  els.viewer.addEventListener("close", () => { state.current = -1; els.vImg.removeAttribute("src"); });
  els.vPrev.addEventListener("click", () => openViewer(state.current - 1));
  els.vNext.addEventListener("click", () => openViewer(state.current + 1));
  els.vMore.addEventListener("click", () => {
    const hit = state.hits[state.current];
    closeViewer();
    if (hit) searchSimilar(hit.path, true, hit);
  });
  els.vFolder.addEventListener("click", () => {
    const hit = state.hits[state.current];
    if (!hit) return;
    closeViewer();
    els.under.value = dirname(hit.path);
    rerun();
  });
  els.vCopy.addEventListener("click", async () => {
    const hit = state.hits[state.current];
    if (!hit) return;
    try {
      await navigator.clipboard.writeText(hit.path);
      els.vCopy.textContent = "Copied";
    } catch {
      window.getSelection().selectAllChildren(els.vPath);
      els.vCopy.textContent = "Press Ctrl+C";
    }
    setTimeout(() => { els.vCopy.textContent = "Copy path"; }, 1500);
  });

  // -- URL state ------------------------------------------------------------------------------

  function pushUrl({ q, like }) {
    const p = new URLSearchParams();
    if (q) p.set("q", q);
    if (like) p.set("like", like);
    if (els.k.value !== "24") p.set("k", els.k.value);
    const under = els.under.value.trim();
    if (under && (q || like)) p.set("under", under);
    const not = els.not.value.trim();
    if (not && (q || like)) p.set("not", not);
    const minScore = els.minScore.value.trim();
    if (minScore && (q || like)) p.set("min_score", minScore);
    for (const [name, control] of photoFilters) if (control.value.trim() && (q || like)) p.set(name, control.value.trim());
    if (els.allCopies.checked && (q || like)) p.set("all", "true");
    const url = p.toString() ? `?${p}` : location.pathname;
    if (url !== location.search) history.pushState(null, "", url);
  }

  function fromUrl() {
    const p = new URLSearchParams(location.search);
    if (p.get("k")) els.k.value = p.get("k");
    els.under.value = p.get("under") || els.under.value;
    els.not.value = p.get("not") || "";
    els.minScore.value = p.get("min_score") || "";
    for (const [name, control] of photoFilters) control.value = p.get(name) || "";
    els.allCopies.checked = p.get("all") === "true";
    if (p.get("q")) {
      els.q.value = p.get("q");
      searchText(p.get("q"), false);
    } else if (p.get("like")) {
      searchSimilar(p.get("like"), false);
    } else {
      state.hits = [];
      els.q.value = "";
      els.results.replaceChildren();
      els.empty.hidden = false;
      document.body.classList.remove("has-results");
      setStatus();
      showError("");
    }
  }

  function rerun() {
    const p = new URLSearchParams(location.search);
    if (els.q.value.trim()) searchText(els.q.value);
    else if (p.get("like")) searchSimilar(p.get("like"));
    else if (state.queryFile) searchImage(state.queryFile);
    else params();
  }

  // -- events ---------------------------------------------------------------------------------

  els.form.addEventListener("submit", (event) => { event.preventDefault(); searchText(els.q.value); });
  els.k.addEventListener("change", rerun);
  els.under.addEventListener("change", rerun);
  els.underClear.addEventListener("click", () => { els.under.value = ""; rerun(); });
  els.not.addEventListener("change", rerun);
  els.minScore.addEventListener("change", rerun);
  for (const [, control] of photoFilters) control.addEventListener("change", rerun);
  els.allCopies.addEventListener("change", rerun);
  els.uploadBtn.addEventListener("click", () => els.file.click());
  els.file.addEventListener("change", () => { searchImage(els.file.files[0]); els.file.value = ""; });
  for (const chip of document.querySelectorAll("#examples .chip")) {
    chip.addEventListener("click", () => { els.q.value = chip.textContent; searchText(chip.textContent); });
  }
  window.addEventListener("popstate", fromUrl);

  document.addEventListener("keydown", (event) => {
    if (els.viewer.open) {
      if (event.key === "ArrowLeft" && state.current > 0) openViewer(state.current - 1);
      if (event.key === "ArrowRight" && state.current < state.hits.length - 1) openViewer(state.current + 1);
      return;
    }
    if (event.key === "/" && document.activeElement !== els.q && !/INPUT|SELECT|TEXTAREA/.test(document.activeElement.tagName)) {
      event.preventDefault();
      els.q.focus();
      els.q.select();
    }
  });

  // Drop an image anywhere, or paste one.
  let dragDepth = 0;
  const hasFiles = (event) => Array.from(event.dataTransfer?.types || []).includes("Files");
  window.addEventListener("dragenter", (event) => {
    if (!hasFiles(event)) return;
    event.preventDefault();
    dragDepth++;
    els.dropzone.hidden = false;
  });
  window.addEventListener("dragover", (event) => { if (hasFiles(event)) event.preventDefault(); });
  window.addEventListener("dragleave", () => { if (--dragDepth <= 0) { dragDepth = 0; els.dropzone.hidden = true; } });
  window.addEventListener("drop", (event) => {
    if (!hasFiles(event)) return;
    event.preventDefault();
    dragDepth = 0;
    els.dropzone.hidden = true;
    searchImage(event.dataTransfer.files[0]);
  });
  document.addEventListener("paste", (event) => {
    const item = Array.from(event.clipboardData?.items || []).find((i) => i.type.startsWith("image/"));
    if (item) { event.preventDefault(); searchImage(item.getAsFile()); }
  });

  // -- start ----------------------------------------------------------------------------------

  async function loadInfo() {
    try {
      const response = await fetch("/api/info");
      const info = await response.json();
      if (!response.ok) throw new Error(info.detail || response.statusText);
      const count = Number(info.images ?? info.count ?? 0);
      const model = info.model ? `${info.model}${info.weights ? ` · ${info.weights}` : ""}` : "";
      els.info.textContent = [plural(count, "picture") + " indexed", model].filter(Boolean).join(" · ");
      els.summary.textContent = count
        ? `${plural(count, "picture")} in the index, embedded with ${info.model || "CLIP"}.`
        : "The index is empty: run pixfind index FOLDER, then search here.";
      const max = info.server?.max_results;
      if (max) for (const option of els.k.options) option.disabled = Number(option.value) > max;
      if (info.server?.max_query_chars) els.q.maxLength = info.server.max_query_chars;
      state.maxUpload = Number(info.server?.max_upload_bytes || 0);
      if (info.random_weights) showRandomWeightsNotice();
    } catch (err) {
      els.info.textContent = `index unavailable: ${err.message}`;
    }
  }

  function showRandomWeightsNotice() {
    // Said once, at the top: every ranking on this page is then meaningless.
    els.notice.replaceChildren(
      el("strong", { text: "Random weights. " }),
      "This index was built with ", el("code", { text: "--pretrained none" }),
      " (a test model): the rankings here mean nothing. Index again with real weights to search by meaning.",
    );
    els.notice.hidden = false;
  }

  loadInfo();
  fromUrl();
})();
