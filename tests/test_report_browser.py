"""report.html in a real headless browser (Debian's chromium, which .ci/run installs where it
can): the page loads without console messages, the table has its rows, both plots decode, and a
screenshot is taken. A control page with a script error shows the check can fail. DNS is
mapped to nowhere, so a page that needed the network would fail to load its parts."""
import os
import re
import shutil
import subprocess

import pytest
from PIL import Image

from edgestar.report.build import report
from test_report import add_firmware, add_latency
from test_report_runs import write_run

PROBE = """<script>
window.addEventListener("load", () => {
  const imgs = [...document.querySelectorAll("img.plot")].map(i => `${i.id}=${i.naturalWidth}x${i.naturalHeight}`);
  const rows = document.querySelectorAll("#results tbody tr").length;
  console.log(`EDGESTAR-PROBE rows=${rows} imgs=${imgs.join(",")}`);
});
</script>"""


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("no chromium on PATH (.ci/run installs Debian's chromium where apt works)")


def load(page, tmp_path):
    """Load ``page`` (with the probe script added) headless; (console lines, screenshot path)."""
    probed = tmp_path / f"probed-{page.name}"
    probed.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    shot = tmp_path / f"{page.stem}.png"
    home = tmp_path / "chromium-home"
    home.mkdir(exist_ok=True)
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
           f"--user-data-dir={home}", "--host-resolver-rules=MAP * ~NOTFOUND", "--enable-logging=stderr",
           "--v=0", f"--screenshot={shot}", "--window-size=1400,2000", probed.as_uri()]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                              env={**os.environ, "HOME": str(home)})
    except subprocess.TimeoutExpired:
        pytest.skip("chromium did not finish within 120 s here")
    console = re.findall(r":CONSOLE[^\]]*\] (.*)", proc.stderr)
    if not shot.exists():
        pytest.skip(f"chromium cannot run here (exit {proc.returncode}): {proc.stderr.strip()[-300:]}")
    return console, shot


def test_report_html_in_a_headless_browser(tmp_path):
    root = tmp_path / "sweep"
    a = write_run(root / "s050-32px", variant="s050", flip=0.3, seed=1)
    write_run(root / "s1-32px", variant="s1", flip=0.05, seed=2)
    write_run(root / "s100-32px", variant="s100", fail_at="validate")
    add_latency(a, {"fp32": {"xnnpack": 1.0}, "int8": {"xnnpack": 0.7}})
    add_firmware(a)
    report([root], out=tmp_path / "out", formats=("html",))
    console, shot = load(tmp_path / "out" / "report.html", tmp_path)
    probes = [c for c in console if "EDGESTAR-PROBE" in c]
    others = [c for c in console if "EDGESTAR-PROBE" not in c]
    assert others == [], f"the page logged to the console: {others}"
    assert len(probes) == 1, console
    rows = int(re.search(r"rows=(\d+)", probes[0]).group(1))
    assert rows == 5  # 2 runs x (fp32, int8) + the failed run
    sizes = dict(re.findall(r"([\w-]+)=(\d+x\d+)", probes[0].split("imgs=")[1]))
    assert set(sizes) == {"accuracy-vs-size", "accuracy-vs-latency"}
    assert all(int(s.split("x")[0]) > 600 for s in sizes.values()), sizes  # decoded, not broken images
    with Image.open(shot) as im:
        assert im.size == (1400, 2000)
        colours = im.convert("RGB").resize((140, 200)).getcolors(maxcolors=100_000)
        assert colours is not None and len(colours) > 50  # a rendered page, not a blank one


def test_the_browser_check_catches_a_broken_page(tmp_path):
    page = tmp_path / "broken.html"
    page.write_text('<!doctype html><html><body><table id="results"><tbody></tbody></table>'
                    '<img class="plot" id="x" src="https://example.invalid/plot.png">'
                    '<script>undefinedFunction();</script></body></html>')
    console, _ = load(page, tmp_path)
    others = [c for c in console if "EDGESTAR-PROBE" not in c]
    assert any("undefinedFunction" in c for c in others)
    probe = next(c for c in console if "EDGESTAR-PROBE" in c)
    assert "x=0x0" in probe  # the image that needed the network did not load
