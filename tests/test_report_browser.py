"""The report renders in headless Chromium: no console errors, every image decoded, findings present."""

import json
import os
import re
import shutil
import subprocess

import pytest

pytestmark = pytest.mark.slow

PROBE = """
<script>
window.__errors = [];
window.addEventListener('error', function (e) { window.__errors.push(String(e.message || e)); }, true);
var _ce = console.error; console.error = function () { window.__errors.push(Array.prototype.join.call(arguments, ' ')); _ce.apply(console, arguments); };
</script>
"""
CHECK = """
<script>
window.addEventListener('load', function () {
  // the load event fires only after every <img> has loaded (or failed); a decoded image has a natural size
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0 && i.naturalHeight > 0; });
  // no element reaches past its column: wide tables scroll inside their own box instead
  var main = document.querySelector('main'), cs = getComputedStyle(main);
  var right = main.getBoundingClientRect().right - parseFloat(cs.paddingRight) + 1, wide = [];
  main.querySelectorAll('*').forEach(function (el) {
    for (var p = el.parentElement; p && p !== main; p = p.parentElement) {
      if (['auto', 'scroll', 'hidden'].indexOf(getComputedStyle(p).overflowX) >= 0) return;
    }
    var b = el.getBoundingClientRect();
    if (b.width > 0 && b.right > right) wide.push(el.tagName + '#' + el.id + '.' + el.className);
  });
  var scrolling = Array.prototype.filter.call(document.querySelectorAll('.tablewrap'),
                                              function (t) { return t.scrollWidth > t.clientWidth; }).length;
  var r = {images: imgs.length, decoded: ok.length, errors: window.__errors, wide: wide, scrolling: scrolling,
           findings: document.querySelectorAll('#findings ol.findings li').length,
           tables: document.querySelectorAll('table.sortable').length};
  var pre = document.createElement('pre'); pre.id = 'probe-result'; pre.textContent = 'PROBE' + JSON.stringify(r) + 'EBORP';
  document.body.appendChild(pre);
});
</script>
"""


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        p = shutil.which(name)
        if p:
            return p
    if os.environ.get("CI"):
        pytest.fail("Chromium is not installed: .ci/run must install Debian's chromium package")
    pytest.skip("Chromium not installed (apt-get install chromium); CI installs it and runs this test")


def test_report_in_headless_chromium(quick_run, tmp_path):
    exe = _chromium()
    html = (quick_run / "report" / "index.html").read_text()
    page = html.replace("<head>", "<head>" + PROBE, 1).replace("</body>", CHECK + "</body>", 1)
    probe = tmp_path / "probe.html"
    probe.write_text(page)
    cmd = [
        exe,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--enable-logging=stderr",
        "--v=0",
        "--window-size=1000,2000",
        "--virtual-time-budget=10000",
        "--dump-dom",
        probe.as_uri(),
    ]
    for _attempt in range(3):  # a loaded machine can starve headless Chromium of its virtual time budget
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
        m = re.search(r"id=\"probe-result\">PROBE(.*?)EBORP", out.stdout, re.S)
        if m:
            break
    assert m, f"probe did not run; chromium said: {out.stderr[-2000:]}"
    r = json.loads(m.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert r["errors"] == []
    console_errors = [ln for ln in out.stderr.splitlines() if "CONSOLE" in ln and ("Error" in ln or "ERROR" in ln)]
    assert console_errors == []
    assert r["images"] >= 5 and r["decoded"] == r["images"]
    assert r["findings"] >= 1 and r["tables"] >= 1
    assert r["wide"] == [], "elements wider than their column"
    assert r["scrolling"] >= 1, "the wide tables (strategies) scroll inside their box"
