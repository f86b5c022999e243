// pixfind web page: the small helpers both scripts use (app.js, the search page; library.js, the
// duplicates view and the watch line), written once. Names from files are only ever set as text.
"use strict";

window.pixfindDom = (() => {
  const basename = (p) => p.slice(p.lastIndexOf("/") + 1) || p;
  const dirname = (p) => { const i = p.lastIndexOf("/"); return i > 0 ? p.slice(0, i) : "/"; };
  const plural = (n, word) => `${n.toLocaleString()} ${word}${n === 1 ? "" : "s"}`;

  function formatBytes(n) {
    if (!n && n !== 0) return "";  // no size known (as app.js had it before the helpers moved here)
    const units = ["bytes", "KB", "MB", "GB", "TB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return i === 0 ? `${n} bytes` : `${n.toFixed(n < 10 ? 1 : 0)} ${units[i]}`;
  }

  // An element with attributes ("text" sets its text, never HTML) and children.
  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs)) {
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else node.setAttribute(key, value);
    }
    for (const child of children) node.append(child);
    return node;
  }

  return Object.freeze({ basename, dirname, plural, formatBytes, el });
})();
