"""The release report: numbers behind the figures, a real release's report, and a real headless Chromium."""

from __future__ import annotations

import base64
import os
import re
import shutil
import tempfile

import numpy as np
import pytest
from markupsafe import escape

from ppsehr.server.model.graphical import Measurement
from ppsehr.server.release.compare import Z95, budget_history, compare_variables, dp_marginal
from ppsehr.server.release.report import SECTIONS, build_report, write_report


@pytest.fixture(scope="module")
def releases(tmp_path_factory, demo, consortium_keys):
    """Two real releases from three in-process guards; a fourth site's guard is down (not included)."""
    from conftest import RunningGuard

    from ppsehr.client.config import load_site_config
    from ppsehr.client.guard import SiteGuard
    from ppsehr.deploy.local import write_site_config
    from ppsehr.server.pipeline import Events, ReleaseJob, run_release
    from ppsehr.deploy.transports import DirectTransport

    tmp = tmp_path_factory.mktemp("report")
    running = []
    try:
        for site in ("cleveland", "hungarian", "switzerland", "va"):
            cfg = write_site_config(tmp / f"{site}.toml", site, demo / "dictionary.toml", demo / "sites" / f"{site}.toml",
                                    tmp / "state" / site, "127.0.0.1:0", 10.0, 1e-6, consortium_keys.site_keys[site][0],
                                    [consortium_keys.coordinator_pub])
            running.append(RunningGuard(SiteGuard(load_site_config(cfg))))
        running[2].stop()  # switzerland is down
        transport = DirectTransport({g.guard.config.site: g.address for g in running})
        manifests = []
        for i, eps in enumerate((1.0, 2.0)):
            job = ReleaseJob.create(dictionary=str(demo / "dictionary.toml"), out=str(tmp / f"r{i}"),
                             signing_key=str(consortium_keys.coordinator_key),
                             site_keys={s: str(p[1]) for s, p in consortium_keys.site_keys.items()}, epsilon=eps, seed=i)
            manifests.append(run_release(job, transport, Events()))
    finally:
        for g in running[:2] + running[3:]:
            g.stop()
    return tmp, manifests


@pytest.fixture(scope="module")
def report(releases, demo):
    """The second release's report, made by `ppsehr release report` with the first as history."""
    import json

    from ppsehr.deploy.cli import main

    tmp, _ = releases
    out = tmp / "report"
    assert main(["release", "report", str(tmp / "r1"), "--dictionary", str(demo / "dictionary.toml"),
                 "--out", str(out), "--history", str(tmp / "r0" / "manifest.json")]) == 0
    files = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    return files, json.loads((tmp / "r1" / "manifest.json").read_text())


def test_dp_marginal_combines_every_table_by_inverse_variance():
    a = Measurement(("a",), np.array([10.0, 20.0]), 4.0)
    ab = Measurement(("a", "b"), np.array([[1.0, 2.0], [3.0, 4.0]]), 1.0)  # summed over b: [3, 7], variance 2 each
    partial = Measurement(("a",), np.array([1e6, 1e6]), np.array([np.inf, 1.0]))  # a cell unobserved: ignored
    counts, variance, used = dp_marginal("a", [a, ab, partial])
    assert used == 2
    np.testing.assert_allclose(variance, [1 / (1 / 4 + 1 / 2)] * 2)
    np.testing.assert_allclose(counts, [(10 / 4 + 3 / 2) / 0.75, (20 / 4 + 7 / 2) / 0.75])
    assert dp_marginal("c", [a, ab]) is None


def test_band_comes_from_the_summed_site_tables(dictionary):
    """A `site` axis is summed away (variances add); the band is 1.96 sd of each cell over the noisy total."""
    sex = dictionary["sex"]
    values = np.array([[30.0, 70.0], [10.0, 90.0]])  # two site groups
    m = Measurement(("site", "sex"), values, np.array([[4.0], [5.0]]))
    j = dictionary.names.index("sex")
    samples = np.zeros((10, len(dictionary.names)), dtype=np.int32)
    samples[:, j] = [0] * 2 + [1] * 8  # 20% female in the records
    [c] = [c for c in compare_variables(dictionary, [m], samples) if c.variable == "sex"]
    assert c.cells == sex.cells and c.tables == 1
    np.testing.assert_allclose(c.dp, [40 / 200, 160 / 200])
    np.testing.assert_allclose(c.half_width, [Z95 * 3 / 200] * 2)
    np.testing.assert_allclose(c.synthetic, [0.2, 0.8])
    assert c.inside == 2
    samples[:, j] = 1  # no female record: 0 is 0.2 away from the aggregate, far outside a band of 0.029
    [c] = [c for c in compare_variables(dictionary, [m], samples) if c.variable == "sex"]
    assert c.inside == 0


def test_budget_history_counts_each_receipt_once(releases):
    _, (first, second) = releases
    hist = budget_history([first, second, second])
    assert set(hist) == {"cleveland", "hungarian", "va"}
    for site, points in hist.items():
        receipts = [r for m in (first, second) for r in m["receipts"] if r["site"] == site]
        assert len(points) == len(receipts) == 6  # two releases of three rounds (1-ways, candidates, selected tables)
        spent = 0.0
        for (t, total, _, debit), earlier in zip(points, [points[0]] + points[:-1]):
            spent += debit
            assert earlier[0] <= t and total == pytest.approx(spent)
        assert points[-1][1] == pytest.approx(second["sites"][site]["rho_total"])


def test_report_of_a_real_release(report, dictionary):
    files, manifest = report
    page = files["report.html"].decode()
    expected = ({"report.html", "figures/structure.png", "figures/budget.png", "figures/fidelity.png"}
                | {f"figures/distribution-{v}.png" for v in dictionary.names})
    assert set(files) == expected
    for name, data in files.items():
        if name.endswith(".png"):
            assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000
            # the page embeds exactly this figure
            assert f'src="data:image/png;base64,{base64.b64encode(data).decode()}"' in page
    for sid in SECTIONS:
        assert f'<section id="{sid}">' in page
    # self-contained: nothing to fetch, and a CSP that forbids fetching anything but data: images
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//|file:)""", page)
    assert "default-src 'none'" in page and "<script" not in page
    assert str(escape(manifest["privacy"]["statement"])) in page
    assert "GUARD_UNAVAILABLE" in page and "switzerland" in page
    assert "across 2 releases" in page
    for site, s in manifest["sites"].items():
        assert f"<td>{site}</td>" in page and f"{s['rho']:.4g}" in page


def test_report_escapes_what_sites_and_manifests_say(releases):
    from ppsehr.common.dictionary import parse_dictionary

    _, (_, manifest) = releases
    small = parse_dictionary({"dictionary": {"name": "d<i>", "version": "1"},
                              "variables": {"sex": {"type": "categorical", "categories": ["female", "male"],
                                                    "description": "<b>sex</b>"}}})
    manifest = dict(manifest, generator={"cliques": [["sex"]], "note": "<script>x</script>"},
                    sites_not_included=[{"site": "evil<b>", "round": 1, "code": "X", "charged": "no",
                                         "message": "<script>alert(1)</script><img src=https://example.org/x>"}])
    page = build_report(small, manifest, [Measurement(("sex",), np.array([5.0, 6.0, 1.0]), 1.0)],
                        np.array([[0], [1]]), {"note": "<i>"})["report.html"].decode()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "evil&lt;b&gt;" in page
    assert "<script" not in page and "<img src=https" not in page and "<b>sex" not in page and "<i>" not in page


def test_measurements_that_do_not_fit_the_dictionary_are_refused(dictionary):
    from ppsehr.common.errors import ReleaseError

    samples = np.zeros((3, len(dictionary.names)), dtype=np.int32)
    with pytest.raises(ReleaseError, match=r"measurement 0 over \['sex'\] has shape \(3,\); the dictionary says \(2,\)"):
        build_report(dictionary, {}, [Measurement(("sex",), np.ones(3), 1.0)], samples, {})
    with pytest.raises(ReleaseError, match=r"samples must be an \(n, 14\) array"):
        build_report(dictionary, {}, [], samples[:, :3], {})


def test_write_report_is_whole_or_nothing(releases, report, demo, tmp_path):
    from ppsehr.common.errors import ReleaseError

    tmp, _ = releases
    with pytest.raises(ReleaseError, match="already exists"):
        write_report(tmp / "r1", tmp / "report", demo / "dictionary.toml")
    broken = tmp_path / "broken"
    shutil.copytree(tmp / "r1", broken)
    (broken / "records.csv").write_text((broken / "records.csv").read_text().replace("female", "femme", 1))
    with pytest.raises(ReleaseError, match=r"records.csv, record \d+, column 'sex': 'femme' is not a cell of 'sex'"):
        write_report(broken, tmp_path / "rep2", demo / "dictionary.toml")
    assert not (tmp_path / "rep2").exists()


# ----------------------------------------------------------------------------- headless Chromium
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost", "--window-size=1280,900"]


@pytest.fixture(scope="module")
def browser():
    """A real headless Chromium driven by chromedriver (Debian packages chromium + chromium-driver)."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not binary or not driver_path:
        pytest.skip("chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"  # never let Selenium Manager look for a browser or driver online
    profile = tempfile.mkdtemp(prefix="ppsehr-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={profile}"]:
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=opts, service=Service(driver_path))
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _render(driver, path):
    """Load a file:// page; return its console problems, broken images and non-data resource loads."""
    driver.get_log("browser")  # drop what an earlier page logged
    driver.get(path.as_uri())
    problems = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]
    broken = driver.execute_script(
        "return [...document.images].filter(i => !i.complete || i.naturalWidth === 0).map(i => i.alt)")
    fetched = driver.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name).filter(n => !n.startsWith('data:'))")
    return problems, broken, fetched


def test_report_renders_in_headless_chromium(browser, report, tmp_path):
    files, _ = report
    for name, data in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    page = tmp_path / "report.html"
    problems, broken, fetched = _render(browser, page)
    assert problems == [] and broken == [] and fetched == []
    title = browser.title
    assert title.startswith("Release report")
    shown = browser.execute_script(
        "return arguments[0].map(id => { const s = document.getElementById(id);"
        " return s ? [id, s.querySelector('h2').innerText, s.getBoundingClientRect().height] : [id, null, 0]; })",
        list(SECTIONS))
    assert [(sid, h2) for sid, h2, _ in shown] == list(SECTIONS.items())
    assert all(height > 60 for _, _, height in shown)
    images = browser.execute_script("return [...document.images].map(i => [i.alt, i.naturalWidth, i.naturalHeight])")
    assert len(images) == len(files) - 1 and all(w > 300 and h > 200 for _, w, h in images)
    # a full-page screenshot that is not blank
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(1280, height)
    shot = tmp_path / "report.png"
    assert browser.save_screenshot(str(shot))
    from PIL import Image

    with Image.open(shot) as im:
        assert im.size[0] == 1280 and im.size[1] > 3000
        assert len(im.convert("RGB").resize((320, 320)).getcolors(1 << 16)) > 200
    if os.environ.get("PPSEHR_REPORT_SCREENSHOT"):
        shutil.copy(shot, os.environ["PPSEHR_REPORT_SCREENSHOT"])
    # the checks catch a page that tries the network or shows a broken figure
    bad = tmp_path / "bad.html"
    bad.write_text(page.read_text().replace("</main>", '<img src="https://example.org/x.png" alt="remote">'
                                                       '<img src="data:image/png;base64,AAAA" alt="corrupt"></main>'))
    problems, broken, fetched = _render(browser, bad)
    assert problems and set(broken) == {"remote", "corrupt"}
