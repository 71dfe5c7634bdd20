/* plmscope front end: heatmaps (one canvas per row), structure colouring, permalinks.
 * Plain ES2017, no build step.  Pages put their data in data-* attributes and <script type="application/json">.
 * Every view state (alignment, zoom, open bin, selected residue, shown structure) is mirrored in the URL
 * with history.replaceState, so the address bar is always a permalink. */
(function () {
  'use strict';

  // The colour scale comes from the server (plmscope/vocab.py, as JSON in every page), so the
  // heatmaps, the 3D view and the legends drawn by the templates cannot disagree.
  var SCALE = JSON.parse(document.getElementById('colour-scale').textContent);
  var ZERO = SCALE.zero;
  var CONTEXT_FREE_FILL = SCALE.context_free;  // "not measured", not "zero"
  var UNMAPPED = parseInt(SCALE.unmapped.slice(1), 16);
  function hexToRgb(h) { return [parseInt(h.slice(1, 3), 16), parseInt(h.slice(3, 5), 16), parseInt(h.slice(5, 7), 16)]; }
  var RGB = SCALE.stops.map(hexToRgb);
  function colour(t) {
    if (!(t > 0)) return ZERO;
    t = Math.min(1, t);
    var x = t * (RGB.length - 1), i = Math.min(Math.floor(x), RGB.length - 2), f = x - i;
    var a = RGB[i], b = RGB[i + 1];
    return 'rgb(' + Math.round(a[0] + f * (b[0] - a[0])) + ',' + Math.round(a[1] + f * (b[1] - a[1])) + ',' + Math.round(a[2] + f * (b[2] - a[2])) + ')';
  }
  // 3Dmol takes colours as 0xRRGGBB numbers (it does not parse CSS rgb() strings).
  function colourHex(t) {
    var c = colour(t);
    if (c.charAt(0) === '#') return parseInt(c.slice(1), 16);
    var v = c.slice(4, -1).split(',').map(Number);
    return (v[0] << 16) | (v[1] << 8) | v[2];
  }
  function textColour(t) { return t > 0.5 ? '#fff' : '#1d232a'; }
  window.plmscopeColour = colour;

  // ---- URL state ----
  function params() { return new URL(location.href).searchParams; }
  function setParam(key, value) {
    var u = new URL(location.href);
    if (value === null || value === undefined || value === '' || value === false) u.searchParams.delete(key);
    else u.searchParams.set(key, String(value));
    history.replaceState(null, '', u.toString());
    var box = document.getElementById('permalink');
    if (box && box.classList.contains('shown')) box.value = permalink();
  }
  function permalink() {
    var u = new URL(location.href);
    var atlas = document.body.getAttribute('data-atlas');
    if (atlas) u.searchParams.set('atlas', atlas);
    return u.toString();
  }

  function fmt(v) {
    if (v === null || v === undefined) return '–';
    if (v === 0) return '0';
    return Math.abs(v) >= 100 ? v.toFixed(1) : Math.abs(v) >= 1 ? v.toFixed(3) : v.toPrecision(3);
  }

  // ---- tooltip ----
  var tip = document.createElement('div');
  tip.id = 'hm-tip';
  document.body.appendChild(tip);
  function showTip(text, x, y) {
    tip.textContent = text;
    tip.style.display = 'block';
    var w = tip.offsetWidth;
    tip.style.left = Math.min(x + 12, window.innerWidth - w - 4) + 'px';
    tip.style.top = (y + 14) + 'px';
  }
  function hideTip() { tip.style.display = 'none'; }

  // ---- heatmap rows ----
  var rows = [];
  var cellW = parseInt(params().get('zoom') || '', 10) || (window.innerWidth < 600 ? 5 : 9);
  var ROW_H = 18;
  var selected = null; // {acc, pos}: clicked residue (in the URL)
  var hovered = null;  // {acc, pos}: residue under the mouse in a heatmap or the structure
  var res = params().get('res');
  if (res && res.indexOf(':') > 0) {
    var parts = res.split(':');
    selected = { acc: parts[0], pos: parseInt(parts[1], 10) };
  }

  function Row(el) {
    this.el = el;
    this.canvas = el.querySelector('canvas.hm');
    this.acc = el.getAttribute('data-acc');
    this.seq = el.getAttribute('data-seq') || '';
    var raw = el.getAttribute('data-values');
    this.values = raw ? raw.split(',').map(Number) : [];
    this.scale = parseFloat(el.getAttribute('data-scale')) || Math.max.apply(null, this.values.concat([1e-9]));
    this.maxPos = parseInt(el.getAttribute('data-maxpos'), 10) || 1;
    // leading residues without protein context (UniRep's residue 1): greyed, left out of every statistic
    this.cf = parseInt(el.getAttribute('data-cf'), 10) || 0;
    this.group = el.closest('.hm-group');
    this.offset = 0;
    var self = this;
    this.canvas.addEventListener('mousemove', function (e) { self.hover(e); });
    this.canvas.addEventListener('mouseleave', function () { hideTip(); hoverStructure(self.acc, null); hoverRows(self.acc, null); });
    this.canvas.addEventListener('click', function (e) { var p = self.posAt(e); if (p) select(self.acc, p, self); });
  }
  Row.prototype.posAt = function (e) {
    var r = this.canvas.getBoundingClientRect();
    var i = Math.floor((e.clientX - r.left) / cellW) - this.offset;
    return i >= 0 && i < this.values.length ? i + 1 : null;
  };
  Row.prototype.hover = function (e) {
    var p = this.posAt(e);
    if (!p) { hideTip(); return; }
    var v = this.values[p - 1];
    var text = (this.seq.charAt(p - 1) || '?') + p + ' · ' + fmt(v);
    if (p <= this.cf) text += ' · context-free: a left-to-right pLM has seen no protein context here; left out of every statistic';
    this.canvas.setAttribute('data-hover', text);
    showTip(text, e.clientX, e.clientY);
    if (!hovered || hovered.acc !== this.acc || hovered.pos !== p) hoverRows(this.acc, p);
    hoverStructure(this.acc, p);
  };
  Row.prototype.draw = function () {
    var n = this.values.length, off = this.offset, w = (off + n) * cellW;
    var dpr = window.devicePixelRatio || 1;
    var c = this.canvas;
    c.style.width = w + 'px';
    c.style.height = ROW_H + 'px';
    c.width = Math.ceil(w * dpr);
    c.height = Math.ceil(ROW_H * dpr);
    var ctx = c.getContext('2d');
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, w, ROW_H);
    var letters = cellW >= 8 && this.seq.length === n;
    if (letters) { ctx.font = Math.min(12, cellW + 1) + 'px ui-monospace, Menlo, Consolas, monospace'; ctx.textAlign = 'center'; ctx.textBaseline = 'middle'; }
    for (var i = 0; i < n; i++) {
      var t = i < this.cf ? 0 : this.values[i] / this.scale;
      ctx.fillStyle = i < this.cf ? CONTEXT_FREE_FILL : colour(t);
      ctx.fillRect((off + i) * cellW, 0, cellW, ROW_H);
      if (letters) { ctx.fillStyle = t > 0 ? textColour(t) : '#7a838c'; ctx.fillText(this.seq.charAt(i), (off + i + 0.5) * cellW, ROW_H / 2 + 0.5); }
    }
    if (hovered && hovered.acc === this.acc && hovered.pos <= n) {
      ctx.strokeStyle = '#1d232a'; ctx.lineWidth = 1.5;
      ctx.strokeRect((off + hovered.pos - 1) * cellW + 0.75, 0.75, cellW - 1.5, ROW_H - 1.5);
    }
    if (selected && selected.acc === this.acc && selected.pos <= n) {
      ctx.strokeStyle = '#d6004c'; ctx.lineWidth = 2;
      ctx.strokeRect((off + selected.pos - 1) * cellW + 1, 1, cellW - 2, ROW_H - 2);
    }
  };

  function aligned() { var box = document.getElementById('align'); return !!(box && box.checked); }
  function layoutRows() {
    var groups = new Map();
    rows.forEach(function (r) { if (!groups.has(r.group)) groups.set(r.group, []); groups.get(r.group).push(r); });
    groups.forEach(function (list) {
      var anchor = aligned() ? Math.max.apply(null, list.map(function (r) { return r.maxPos; })) : 0;
      list.forEach(function (r) { r.offset = aligned() ? anchor - r.maxPos : 0; r.draw(); });
      // rows as wide as the widest one: sticky labels then stay in view wherever the group is scrolled
      var widest = Math.max.apply(null, list.map(function (r) { return (r.offset + r.values.length) * cellW; }));
      list.forEach(function (r) { r.el.style.minWidth = widest + 'px'; });
    });
    if (aligned()) {  // bring the aligned column into view
      groups.forEach(function (list, g) {
        if (!g) return;
        var anchor = Math.max.apply(null, list.map(function (r) { return r.maxPos; }));
        g.scrollLeft = Math.max(0, anchor * cellW - g.clientWidth / 2);
      });
    }
    drawTracks();
  }

  // ---- annotation tracks (protein page): drawn with the same cell width as the heatmap ----
  function drawTracks() {
    document.querySelectorAll('canvas.track').forEach(function (c) {
      var items = JSON.parse(c.getAttribute('data-items') || '[]');
      var n = parseInt(c.getAttribute('data-length'), 10) || 0;
      var kind = c.getAttribute('data-kind');
      // overlapping items (nested or overlapping domains) go to separate lanes
      var lanes = [], laneOf = [];
      if (kind !== 'plddt') items.forEach(function (a, k) {
        var l = 0;
        while (lanes[l] !== undefined && lanes[l] >= a.start) l++;
        lanes[l] = a.end; laneOf[k] = l;
      });
      var LH = 14, h = LH * Math.max(1, lanes.length), w = n * cellW, dpr = window.devicePixelRatio || 1;
      c.style.width = w + 'px'; c.style.height = h + 'px';
      c.width = Math.ceil(w * dpr); c.height = Math.ceil(h * dpr);
      var ctx = c.getContext('2d');
      ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
      ctx.fillStyle = '#f4f5f7'; ctx.fillRect(0, 0, w, h);
      ctx.font = '10px system-ui, sans-serif'; ctx.textBaseline = 'middle';
      if (kind === 'plddt') {
        items.forEach(function (v, i) { if (v === null) return; ctx.fillStyle = colour(1 - v / 100); ctx.fillRect(i * cellW, 0, cellW, h); });
      } else {
        items.forEach(function (a, k) {
          var y = laneOf[k] * LH;
          ctx.fillStyle = kind === 'pfam' ? ['#7b5ea7', '#a3569b'][laneOf[k] % 2] : ['#4c78a8', '#72b7b2', '#9d755d', '#bab0ac'][k % 4];
          var x = (a.start - 1) * cellW, ww = (a.end - a.start + 1) * cellW;
          ctx.fillRect(x, y + 1, ww, LH - 2);
          ctx.fillStyle = '#fff';
          if (ww > 30) ctx.fillText(a.text.slice(0, Math.floor(ww / 6)), x + 3, y + LH / 2);
        });
      }
      c.onmousemove = function (e) {
        var r = c.getBoundingClientRect(), p = Math.floor((e.clientX - r.left) / cellW) + 1;
        var hits = kind === 'plddt' ? (items[p - 1] !== null && items[p - 1] !== undefined ? ['pLDDT ' + items[p - 1]] : [])
          : items.filter(function (a) { return a.start <= p && p <= a.end; }).map(function (a) { return a.text + ' (' + a.start + '–' + a.end + ')'; });
        if (hits.length) showTip(p + ': ' + hits.join('; '), e.clientX, e.clientY); else hideTip();
      };
      c.onmouseleave = hideTip;
    });
  }

  // ---- structure viewer (3Dmol) ----
  var structures = {};
  var sdata = document.getElementById('structures-data');
  if (sdata) structures = JSON.parse(sdata.textContent);
  var viewer = null, shown = null, viewerEl = document.getElementById('viewer');

  function rowFor(acc) { for (var i = 0; i < rows.length; i++) if (rows[i].acc === acc) return rows[i]; return null; }

  function showStructure(acc) {
    var s = structures[acc];
    if (!viewerEl || !s || typeof $3Dmol === 'undefined') return false;
    var row = rowFor(acc);
    var values = row ? row.values : [], scale = row ? row.scale : 1;
    var byAuth = {}, toAuth = {};
    s.residues.seq_pos.forEach(function (p, i) {
      var key = s.residues.auth_seq_id[i] + (s.residues.ins_code[i] || '');
      byAuth[key] = p; toAuth[p] = s.residues.auth_seq_id[i];
    });
    if (!viewer) {
      viewer = $3Dmol.createViewer(viewerEl, { backgroundColor: 'white', antialias: true });
    }
    viewer.clear();
    viewer.addModel(s.content, 'pdb');
    shown = { acc: acc, byAuth: byAuth, toAuth: toAuth, values: values, scale: scale, chain: s.chain };
    styleStructure();
    viewer.setHoverable({}, true, function (atom) {
      var p = byAuth[atom.resi + (atom.icode || '').trim()];
      var info = atom.resn + ' ' + atom.resi + (p ? ' · residue ' + p + ' · ' + fmt(values[p - 1]) : ' · not in sequence');
      if (atom.b !== undefined && s.is_prediction) info += ' · pLDDT ' + atom.b.toFixed(1);
      setViewerInfo(info);
      if (p && (!hovered || hovered.pos !== p || hovered.acc !== acc)) hoverRows(acc, p);
    }, function () { hoverRows(acc, null); });
    viewer.setClickable({}, true, function (atom) {
      var p = byAuth[atom.resi + (atom.icode || '').trim()];
      if (p) select(acc, p, rowFor(acc));
    });
    viewer.zoomTo();
    viewer.render();
    var label = document.getElementById('viewer-title');
    if (label) label.textContent = s.title || acc;
    var pl = document.getElementById('viewer-plddt');
    if (pl) pl.style.display = s.is_prediction ? '' : 'none';
    var lmax = document.getElementById('legend-max');
    if (lmax) lmax.textContent = fmt(scale);
    viewerEl.setAttribute('data-shown', acc);
    if (viewerEl.getAttribute('data-state') !== 'fixed') setParam('view', acc === viewerEl.getAttribute('data-default') ? null : acc);
    return true;
  }

  function styleStructure(highlightPos, hoverPos) {
    if (!viewer || !shown) return;
    var sh = shown;
    viewer.setStyle({}, {
      cartoon: {
        colorfunc: function (atom) {
          var p = sh.byAuth[atom.resi + (atom.icode || '').trim()];
          return p ? colourHex(sh.values[p - 1] / sh.scale) : UNMAPPED;
        }
      }
    });
    viewer.removeAllLabels();
    if (highlightPos && sh.toAuth[highlightPos] !== undefined) {
      var sel = { resi: sh.toAuth[highlightPos] };
      viewer.addStyle(sel, { stick: { colorscheme: 'magentaCarbon', radius: 0.3 } });
      viewer.addResLabels(sel, { fontSize: 11, backgroundColor: '#1d232a', backgroundOpacity: 0.8 });
    }
    if (hoverPos && hoverPos !== highlightPos && sh.toAuth[hoverPos] !== undefined) {
      viewer.addStyle({ resi: sh.toAuth[hoverPos] }, { stick: { color: '#1d232a', radius: 0.25 } });
    }
    viewer.render();
  }

  function setViewerInfo(text) { var el = document.getElementById('viewer-info'); if (el) el.textContent = text; }
  var pendingFrame = 0, lastHover = null;
  function hoverStructure(acc, pos) {
    if (!shown || acc !== shown.acc) return;
    setViewerInfo(pos ? 'residue ' + pos + ' · ' + fmt(shown.values[pos - 1]) : '');
    var key = pos ? acc + ':' + pos : null;
    if (key === lastHover) return;
    lastHover = key;
    cancelAnimationFrame(pendingFrame);
    pendingFrame = requestAnimationFrame(function () { styleStructure(selected && selected.acc === acc ? selected.pos : null, pos); });
  }
  function hoverRows(acc, pos) {
    var before = hovered;
    hovered = pos ? { acc: acc, pos: pos } : null;
    rows.forEach(function (r) { if ((before && r.acc === before.acc) || r.acc === acc) r.draw(); });
  }

  function select(acc, pos, row) {
    selected = { acc: acc, pos: pos };
    setParam('res', acc + ':' + pos);
    var label = document.getElementById('selection');
    if (label) {
      var r = row || rowFor(acc);
      label.textContent = 'selected: ' + acc + ' ' + (r ? r.seq.charAt(pos - 1) : '') + pos + (r ? ' · ' + fmt(r.values[pos - 1]) : '');
    }
    rows.forEach(function (r) { r.draw(); });
    if (structures[acc]) {
      if (!shown || shown.acc !== acc) showStructure(acc);
      styleStructure(pos);
    }
  }

  // ---- copy link ----
  function initCopy() {
    var btn = document.getElementById('copy-link');
    if (!btn) return;
    btn.addEventListener('click', function () {
      var url = permalink();
      var box = document.getElementById('permalink');
      if (box) { box.value = url; box.classList.add('shown'); box.select(); }
      if (navigator.clipboard && window.isSecureContext) {
        navigator.clipboard.writeText(url).then(function () { btn.textContent = 'Link copied'; }, function () { btn.textContent = 'Copy the link below'; });
      } else { btn.textContent = 'Copy the link below'; }
      setTimeout(function () { btn.textContent = 'Copy link'; }, 2500);
    });
  }

  // ---- init ----
  function init() {
    document.querySelectorAll('.hm-row').forEach(function (el) { rows.push(new Row(el)); });
    var align = document.getElementById('align');
    if (align) {
      align.checked = params().get('align') === '1';
      align.addEventListener('change', function () { setParam('align', align.checked ? '1' : null); layoutRows(); });
    }
    var zoom = document.getElementById('zoom');
    if (zoom) {
      zoom.value = String(cellW);
      if (zoom.value !== String(cellW)) { var o = document.createElement('option'); o.value = o.textContent = String(cellW); zoom.appendChild(o); zoom.value = String(cellW); }
      zoom.addEventListener('change', function () { cellW = parseInt(zoom.value, 10); setParam('zoom', cellW); layoutRows(); });
    }
    document.querySelectorAll('details.bin').forEach(function (d) {
      d.addEventListener('toggle', function () {
        if (d.open) setParam('bin', d.getAttribute('data-bin'));
        else if (params().get('bin') === d.getAttribute('data-bin')) setParam('bin', null);
      });
    });
    document.querySelectorAll('[data-show-structure]').forEach(function (b) {
      b.addEventListener('click', function (e) { e.preventDefault(); showStructure(b.getAttribute('data-show-structure')); });
    });
    layoutRows();
    initCopy();
    if (viewerEl) {
      var want = params().get('view') || (selected && structures[selected.acc] ? selected.acc : null) || viewerEl.getAttribute('data-default');
      if (want && structures[want]) showStructure(want);
    }
    if (selected) select(selected.acc, selected.pos, null);
    var resizeTimer = null;
    window.addEventListener('resize', function () { clearTimeout(resizeTimer); resizeTimer = setTimeout(function () { if (viewer) viewer.resize(); }, 150); });
    document.body.setAttribute('data-ready', '1');
  }
  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', init); else init();
})();
