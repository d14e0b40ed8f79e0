// The map page's script: draws the cells from the JSON block, labels the
// rows with their guest offsets, fills the findings table a page at a time,
// and shows where any cell or finding lies when hovered. It reads nothing but
// the page itself.
"use strict";
(function () {
  const D = JSON.parse(document.getElementById("map-data").textContent);
  const cs = D.cell_size, cols = D.cols, px = D.px, cells = D.cells;
  const sector = D.sector_size;
  const rows = Math.ceil(cells / cols);
  const KINDS = D.kinds;

  function bytesOf(b64) {
    const bin = atob(b64);
    const out = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
    return out;
  }
  const dominant = bytesOf(D.dominant);
  const share = bytesOf(D.share);

  const hex = (n) => "0x" + n.toString(16);
  function human(n) {
    const units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let u = 0;
    while (n >= 1024 && u < units.length - 1) { n /= 1024; u++; }
    return u === 0 ? n + " B" : n.toFixed(1) + " " + units[u];
  }
  const grouped = (n) => n.toLocaleString("en-US");

  // Segments: the extent covering each cell's start, as runs of cells.
  const seg = { cell: [], kind: [], depth: [], host: [], file: [] };
  for (let i = 0, c = 0; i < D.segments.length; i += 5) {
    c += D.segments[i];
    seg.cell.push(c);
    seg.kind.push(D.segments[i + 1]);
    seg.depth.push(D.segments[i + 2]);
    seg.host.push(D.segments[i + 3]);
    seg.file.push(D.segments[i + 4]);
  }

  // Findings, and the cells each one touches.
  const F = 8;
  const nf = D.findings.length / F;
  const fd = { off: [], len: [], first: [], kind: [], depth: [], host: [], file: [] };
  const cellFindings = new Map();
  for (let i = 0, off = 0; i < nf; i++) {
    const r = i * F;
    off += D.findings[r];
    const len = D.findings[r + 1];
    fd.off.push(off);
    fd.len.push(len);
    fd.first.push(off + D.findings[r + 2]);
    fd.kind.push(D.findings[r + 3]);
    fd.depth.push(D.findings[r + 4]);
    fd.host.push(D.findings[r + 5]);
    fd.file.push(D.findings[r + 6]);
    const c0 = Math.floor(off / cs);
    const c1 = Math.min(cells - 1, Math.floor((off + Math.max(len, 1) - 1) / cs));
    for (let c = c0; c <= c1; c++) {
      const list = cellFindings.get(c);
      if (list === undefined) cellFindings.set(c, [i]);
      else list.push(i);
    }
  }

  function describe(kind, depth, host, file) {
    if (kind < 0) return "past the end of the image (the reference is longer)";
    const name = D.files[file] === undefined ? "?" : D.files[file];
    let text;
    switch (KINDS[kind]) {
      case "data": text = "data at host offset " + hex(host) + " in " + name; break;
      case "compressed": text = "compressed cluster in " + name; break;
      case "zero": text = "zero: reads as zeros (" + name + ")"; break;
      case "unallocated": return "unallocated: nothing in the chain stores it, reads as zeros";
      default: text = "unreadable metadata in " + name;
    }
    return depth > 0 ? text + " [backing file, depth " + depth + "]" : text;
  }

  function segmentAt(cell) {
    let lo = 0, hi = seg.cell.length - 1;
    while (lo < hi) {
      const mid = (lo + hi + 1) >> 1;
      if (seg.cell[mid] <= cell) lo = mid; else hi = mid - 1;
    }
    return lo;
  }

  function mappingAt(cell) {
    if (cell * cs >= D.image_size) return describe(-1, 0, -1, 0);
    const s = segmentAt(cell);
    const host = seg.host[s] < 0 ? -1 : seg.host[s] + (cell - seg.cell[s]) * cs;
    return describe(seg.kind[s], seg.depth[s], host, seg.file[s]);
  }

  function rgb(colour) {
    const n = parseInt(colour.slice(1), 16);
    return [(n >> 16) & 255, (n >> 8) & 255, n & 255];
  }

  // The picture: one px-by-px square per cell, rows of `cols` cells.
  const canvas = document.getElementById("map");
  const mark = document.getElementById("mark");
  const width = cols * px, height = Math.max(1, rows) * px;
  for (const c of [canvas, mark]) {
    c.width = width;
    c.height = height;
    c.style.width = width + "px";
    c.style.height = height + "px";
  }
  const ctx = canvas.getContext("2d");
  const img = ctx.createImageData(width, height);
  const colours = D.classes.map((c) => rgb(c.colour));
  const found = rgb(D.finding_colour);
  for (let cell = 0; cell < cells; cell++) {
    const colour = cellFindings.has(cell) ? found : colours[dominant[cell]];
    const x0 = (cell % cols) * px, y0 = Math.floor(cell / cols) * px;
    for (let y = y0; y < y0 + px; y++) {
      let p = (y * width + x0) * 4;
      for (let x = 0; x < px; x++, p += 4) {
        img.data[p] = colour[0];
        img.data[p + 1] = colour[1];
        img.data[p + 2] = colour[2];
        img.data[p + 3] = 255;
      }
    }
  }
  ctx.putImageData(img, 0, 0);

  // Row labels: the guest offset of every few rows, about 48 pixels apart.
  const axis = document.getElementById("axis");
  axis.style.height = height + "px";
  let every = 1;
  while (every * px < 48) every *= 2;
  for (let r = 0; r < rows; r += every) {
    const label = document.createElement("span");
    label.textContent = hex(r * cols * cs);
    label.title = human(r * cols * cs);
    label.style.top = (r * px + px / 2) + "px";
    axis.appendChild(label);
  }

  // A tick beside every row that holds a finding: a one-sector finding is
  // one small cell, easy to miss in a big picture.
  const ticked = new Set();
  for (const cell of cellFindings.keys()) ticked.add(Math.floor(cell / cols));
  for (const r of ticked) {
    const tick = document.createElement("i");
    tick.className = "tick";
    tick.style.top = (r * px) + "px";
    tick.style.height = Math.max(px, 2) + "px";
    tick.style.background = D.finding_colour;
    axis.appendChild(tick);
  }

  // The tooltip.
  const tip = document.getElementById("tip");
  function showTip(text, ev) {
    tip.textContent = text;
    tip.hidden = false;
    const x = Math.min(ev.clientX + 14, window.innerWidth - tip.offsetWidth - 4);
    const y = Math.min(ev.clientY + 14, window.innerHeight - tip.offsetHeight - 4);
    tip.style.left = Math.max(0, x) + "px";
    tip.style.top = Math.max(0, y) + "px";
  }
  function hideTip() { tip.hidden = true; }

  const mctx = mark.getContext("2d");
  // Frame the given cells (in order): one box per run of them within a row,
  // so the cells inside keep their colour.
  function outline(list) {
    mctx.clearRect(0, 0, width, height);
    mctx.strokeStyle = "#111";
    mctx.lineWidth = 1.5;
    let i = 0;
    while (i < list.length) {
      let j = i;
      while (j + 1 < list.length && list[j + 1] === list[j] + 1 && list[j + 1] % cols !== 0) j++;
      const x = (list[i] % cols) * px, y = Math.floor(list[i] / cols) * px;
      mctx.strokeRect(x - 1, y - 1, (j - i + 1) * px + 2, px + 2);
      i = j + 1;
    }
  }

  function cellText(cell) {
    const start = cell * cs;
    const end = Math.min(start + cs, D.size);
    const cls = D.classes[dominant[cell]];
    const lines = [
      "cell " + grouped(cell) + ": guest " + hex(start) + " - " + hex(end - 1) + " (" + human(end - start) + ")",
      "mostly " + cls.label + " (" + share[cell] + "% of the cell)",
      "at " + hex(start) + ": " + mappingAt(cell),
    ];
    const here = cellFindings.get(cell);
    if (here) {
      const shown = here.slice(0, 3).map((i) => "#" + (i + 1) + " sector " + grouped(fd.off[i] / sector));
      lines.push(grouped(here.length) + " finding" + (here.length > 1 ? "s" : "") + " here: " + shown.join(", ") + (here.length > 3 ? ", ..." : ""));
    }
    return lines.join("\n");
  }

  function cellAt(ev) {
    const rect = canvas.getBoundingClientRect();
    const x = Math.floor((ev.clientX - rect.left) / (rect.width / cols));
    const y = Math.floor((ev.clientY - rect.top) / (rect.height / Math.max(1, rows)));
    const cell = y * cols + x;
    return x >= 0 && x < cols && y >= 0 && cell < cells ? cell : -1;
  }
  canvas.addEventListener("mousemove", (ev) => {
    const cell = cellAt(ev);
    if (cell < 0) { hideTip(); return; }
    outline([cell]);
    showTip(cellText(cell), ev);
  });
  canvas.addEventListener("mouseleave", () => { hideTip(); outline([]); });

  // The findings table, a page at a time (100,000 rows at once would stall).
  const PAGE = 500;
  const tbody = document.querySelector("#finding-table tbody");
  const more = document.getElementById("more");
  let shownRows = 0;
  function findingCells(i) {
    const c0 = Math.floor(fd.off[i] / cs);
    const c1 = Math.min(cells - 1, Math.floor((fd.off[i] + Math.max(fd.len[i], 1) - 1) / cs));
    const out = [];
    for (let c = c0; c <= c1 && out.length < 4096; c++) out.push(c);
    return out;
  }
  function kindText(i) {
    const k = fd.kind[i];
    if (k < 0) return "past end";
    return fd.depth[i] > 0 ? KINDS[k] + " (depth " + fd.depth[i] + ")" : KINDS[k];
  }
  function findingText(i) {
    const off = fd.off[i], len = fd.len[i];
    const lines = [
      "finding #" + (i + 1) + ": sector " + grouped(off / sector) + ", guest " + hex(off) + " - " + hex(off + Math.max(len, 1) - 1) + " (" + grouped(len) + " bytes)",
      "first differing byte at " + hex(fd.first[i]) + ": " + describe(fd.kind[i], fd.depth[i], fd.host[i], fd.file[i]),
    ];
    const note = D.notes[String(i)];
    if (note) lines.push(note);
    return lines.join("\n");
  }
  function addRows() {
    const end = Math.min(nf, shownRows + PAGE);
    const frag = document.createDocumentFragment();
    for (let i = shownRows; i < end; i++) {
      const tr = document.createElement("tr");
      tr.dataset.i = String(i);
      const note = D.notes[String(i)];
      const cellsText = [
        grouped(i + 1),
        grouped(fd.off[i] / sector),
        human(fd.len[i]),
        kindText(i) + (note && note.startsWith("read error") ? " (read error)" : ""),
        fd.host[i] < 0 ? "-" : hex(fd.host[i]),
      ];
      cellsText.forEach((text, col) => {
        const td = document.createElement("td");
        td.textContent = text;
        if (col !== 3) td.className = "num";
        if (col === 3 && note && note.startsWith("read error")) td.className = "err";
        tr.appendChild(td);
      });
      frag.appendChild(tr);
    }
    tbody.appendChild(frag);
    shownRows = end;
    more.hidden = shownRows >= nf;
    more.textContent = "Show " + grouped(Math.min(PAGE, nf - shownRows)) + " more (" + grouped(nf - shownRows) + " left)";
  }
  more.addEventListener("click", addRows);
  tbody.addEventListener("mouseover", (ev) => {
    const tr = ev.target.closest("tr");
    if (!tr) return;
    const i = Number(tr.dataset.i);
    outline(findingCells(i));
    showTip(findingText(i), ev);
  });
  tbody.addEventListener("mousemove", (ev) => {
    if (!tip.hidden) showTip(tip.textContent, ev);
  });
  tbody.addEventListener("mouseleave", () => { hideTip(); });
  tbody.addEventListener("click", (ev) => {
    const tr = ev.target.closest("tr");
    if (!tr) return;
    for (const on of tbody.querySelectorAll("tr.on")) on.classList.remove("on");
    tr.classList.add("on");
    outline(findingCells(Number(tr.dataset.i)));
    canvas.scrollIntoView({ block: "nearest" });
  });
  if (nf > 0) addRows();

  // page.html#finding-N opens with finding N (counting from 1) marked and
  // described, so a link can point at one finding.
  const wanted = /^#finding-(\d+)$/.exec(window.location.hash);
  if (wanted && Number(wanted[1]) >= 1 && Number(wanted[1]) <= nf) {
    const i = Number(wanted[1]) - 1;
    while (shownRows <= i) addRows();
    const tr = tbody.querySelector('tr[data-i="' + i + '"]');
    tr.classList.add("on");
    const list = findingCells(i);
    outline(list);
    const rect = canvas.getBoundingClientRect();
    const cell = list[0];
    showTip(findingText(i), {
      clientX: rect.left + (cell % cols) * px + px,
      clientY: rect.top + Math.floor(cell / cols) * px + px,
    });
  }
  document.body.dataset.ready = "1";
})();
