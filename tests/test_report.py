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
        # a copy of the second release, evaluated at the three running sites by `ppsehr release evaluate`, which
        # writes the signed addendum into it and rebuilds the report (with the coordinator key pinned) beside it
        from ppsehr.deploy.cli import main

        shutil.copytree(tmp / "r1", tmp / "r1e")
        args = ["release", "evaluate", str(tmp / "r1e"), "--dictionary", str(demo / "dictionary.toml"),
                "--signing-key", str(consortium_keys.coordinator_key), "--job-dir", str(tmp / "evaluation-job"),
                "--report-out", str(tmp / "r1e-report")]
        for g in running[:2] + running[3:]:
            site = g.guard.config.site
            args += ["--site-key", f"{site}={consortium_keys.site_keys[site][1]}", "--guard", f"{site}={g.address}"]
        assert main(args) == 0
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
        # two releases, a receipt per round (small per-site tables, 1-ways, candidates, selected tables)
        assert len(points) == len(receipts) == sum(len(m["plans"]) for m in (first, second)) >= 6
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



# ----------------------------------------------------------------------------- evaluation, unit, exclusions
def _section(page: str, sid: str) -> str:
    start = page.index(f'<section id="{sid}">')
    return page[start:page.index("</section>", start)]


def _pm(value, sd):
    return f"{value:.3f} ± {Z95 * sd:.3f}"


@pytest.fixture(scope="module")
def evaluated(releases):
    """The evaluated copy of the second release, its addendum, and the report `release evaluate` rebuilt."""
    import json

    tmp, _ = releases
    [path] = (tmp / "r1e" / "evaluations").glob("*.json")
    return tmp / "r1e", json.loads(path.read_text()), (tmp / "r1e-report" / "report.html").read_text()


def test_evaluate_rebuilds_the_report_with_the_verified_addendums_figures(evaluated, consortium_keys):
    from ppsehr.common import keys

    release, add, page = evaluated
    ev = _section(page, "evaluation")
    assert "<span class=\"tag ok\">verified</span>" in ev and "not verified" not in ev
    assert f"Evaluation <span class=\"mono\">{add['evaluation_id']}</span>" in ev
    fingerprint = keys.fingerprint(keys.load_public_key(consortium_keys.coordinator_pub))
    assert f"coordinator key {fingerprint} (pinned)" in ev
    tstr = add["results"]["utility"]["tstr"]
    assert [t["target"] for t in tstr] and all(t["auc"] is not None for t in tstr)
    for t in tstr:  # each figure the addendum states, with 1.96 x its noise sd
        assert f"{t['target']} = {t['positive']}" in ev
        assert _pm(t["auc"], t["auc_sd"]) in ev and _pm(t["accuracy"], t["accuracy_sd"]) in ev
    for u in add["results"]["fidelity"]["unmeasured"]:
        assert f"{u['tvd']:.3f}" in ev and f"{u['tvd_noise_bound']:.3f}" in ev
    risk = add["results"]["privacy_risk"]
    d, c = risk["distance"]["all"], risk["unique_copied"]["all"]
    assert _pm(d["exact_copy_share"], d["exact_copy_share_sd"]) in ev and _pm(c["share"], c["share_sd"]) in ev
    assert f"{d['mean_distance']:.2f} ± {Z95 * d['mean_distance_sd']:.2f}" in ev
    assert risk["membership"]["auc"] is None and "no held-out site answered" in ev  # switzerland was down
    assert f"by {risk['dp_bound']['max_advantage']:.3f}" in ev
    assert str(escape(add["privacy"]["statement"])) in ev
    for site, e in add["sites"].items():
        assert f"<td>{site}</td>" in ev and f"<td>{e['rho']:.4g}</td>" in ev and f"<td>{e['combined_rho']:.4g}</td>" in ev
    assert 'data-file="figures/evaluation-' in ev and "Distance to closest record" in ev
    # the release's own report, hashed by its manifest, was built before the evaluation and says how to run one
    own = _section((release / "report.html").read_text(), "evaluation")
    assert "No evaluation: this report was built with the release" in own and "ppsehr release evaluate" in own
    assert "tag ok" not in own


def _resign(release, change, key):
    import json

    from ppsehr.common import keys
    from ppsehr.server.evaluate import addendum as ad

    [path] = (release / "evaluations").glob("*.json")
    a = json.loads(path.read_text())
    change(a)
    path.write_bytes(ad.to_bytes(a))
    if key is not None:
        path.with_suffix(".sig").write_text(keys.b64(keys.load_signing_key(key).sign(path.read_bytes())) + "\n")


@pytest.mark.parametrize("resigned, reason", [
    (True, r"results.utility.tstr\[0\].auc \(0.999"),  # re-signed by the coordinator: the figures do not follow
    (False, r"the coordinator&#39;s signature of \w+.json does not verify"),  # edited after signing
])
def test_a_tampered_addendum_is_shown_as_not_verified_without_its_figures(evaluated, demo, consortium_keys, tmp_path,
                                                                         resigned, reason):
    release, add, _ = evaluated
    copy = tmp_path / "rel"
    shutil.copytree(release, copy)
    _resign(copy, lambda a: a["results"]["utility"]["tstr"][0].update(auc=0.999),
            consortium_keys.coordinator_key if resigned else None)
    out = write_report(copy, tmp_path / "report", demo / "dictionary.toml", coordinator_key=consortium_keys.coordinator_pub)
    ev = _section((out / "report.html").read_text(), "evaluation")
    assert "<span class=\"tag bad\">not verified</span>" in ev and "tag ok" not in ev
    assert re.search(reason, ev), ev
    assert "0.999 ±" not in ev and _pm(add["results"]["utility"]["tstr"][0]["auc"], add["results"]["utility"]["tstr"][0]["auc_sd"]) not in ev
    assert "TSTR AUC" not in ev and str(escape(add["privacy"]["statement"])) not in ev
    assert not any(p.name.startswith("evaluation-") for p in (out / "figures").iterdir())


def test_an_addendum_of_a_release_that_does_not_verify_is_not_shown(evaluated, demo, tmp_path):
    release, add, _ = evaluated
    copy = tmp_path / "rel"
    shutil.copytree(release, copy)
    (copy / "aggregates.json").write_text((copy / "aggregates.json").read_text() + " ")  # hashed by the manifest
    page = (write_report(copy, tmp_path / "report", demo / "dictionary.toml") / "report.html").read_text()
    ev = _section(page, "evaluation")
    assert "not verified" in ev and "the release itself does not verify" in ev and "aggregates.json" in ev
    assert "TSTR AUC" not in ev


def test_a_report_without_evaluation_says_how_to_run_one(report, releases):
    files, _ = report
    tmp, _ = releases
    ev = _section(files["report.html"].decode(), "evaluation")
    assert "No evaluation addendum in this release." in ev
    assert f"ppsehr release evaluate {tmp / 'r1'} --dictionary" in ev and "--signing-key" in ev and "--site-key" in ev
    assert "ppsehr demo --evaluate" in ev and "TSTR AUC" not in ev and "verified</span>" not in ev


def test_the_unmeasured_pairs_flag_a_tvd_beyond_its_noise_bound(evaluated, dictionary):
    """Rendering of the unmeasured pairs (the demo release measures every pair, so a real addendum has none)."""
    import copy as cp

    release, add, _ = evaluated
    add = cp.deepcopy(add)
    add["results"]["fidelity"] = {"unmeasured": [
        {"variables": ["sex", "fbs"], "cells": 6, "tvd": 0.4321, "tvd_noise_bound": 0.1234, "rows": 900.0},
        {"variables": ["cp", "exang"], "cells": 12, "tvd": 0.0567, "tvd_noise_bound": 0.2345, "rows": 880.0}],
        "mean_tvd": 0.2444, "mean_tvd_noise_bound": 0.179}
    manifest, measurements, samples, fidelity = _inputs(release, dictionary)
    files = build_report(dictionary, manifest, measurements, samples, fidelity,
                         evaluations=[{"file": "evaluations/x.json", "verified": True, "check": "test", "addendum": add}])
    ev = _section(files["report.html"].decode(), "evaluation")
    rows = re.findall(r"<tr><td><span class='mono'>([^<]+)</span></td><td>\d+</td><td>\d+</td><td>([\d.]+)</td>"
                      r"<td>([\d.]+)</td><td>(.*?)</td></tr>", ev)
    assert [(v, t, b) for v, t, b, _ in rows] == [("sex × fbs", "0.432", "0.123"), ("cp × exang", "0.057", "0.234")]
    assert "beyond the noise bound" in rows[0][3] and "within the noise" in rows[1][3]
    assert "1 of 2 unmeasured pair(s) beyond their noise bound; mean TVD 0.244" in ev
    assert any(k.endswith("-unmeasured.png") for k in files)


def _inputs(release, dictionary):
    from ppsehr.server.release.report import release_inputs

    return release_inputs(release, dictionary)


def test_the_unit_is_the_manifests(releases, dictionary):
    tmp, (_, manifest) = releases
    _, measurements, samples, fidelity = _inputs(tmp / "r1", dictionary)
    # the real release: each site's unit as its receipts state it, in the manifest's words
    page = build_report(dictionary, manifest, measurements, samples, fidelity)["report.html"].decode()
    privacy = _section(page, "privacy")
    for site, u in manifest["privacy"]["site_units"].items():
        assert f"<td>{site}</td><td><code>{u['unit']}</code></td><td>{escape(u['description'])}</td>" in privacy
    # another source's unit: the report follows the manifest, whatever it says, and adds no unit of its own
    omop = {"unit": "patient", "rows_per_patient": 1, "description": "one OMOP person (person.person_id) <all rows>"}
    k3 = {"unit": "patient_rows", "rows_per_patient": 3, "description": "one patient, with up to 3 records"}
    other = dict(manifest, privacy=dict(manifest["privacy"], unit="one OMOP person or a 3-row patient",
                                        statement="Privacy unit: one OMOP person or a 3-row patient.",
                                        site_units={"cleveland": omop, "va": k3}),
                 sites={s: e for s, e in manifest["sites"].items() if s in ("cleveland", "va")})
    privacy = _section(build_report(dictionary, other, measurements, samples, fidelity)["report.html"].decode(), "privacy")
    assert "one OMOP person (person.person_id) &lt;all rows&gt;" in privacy and "one patient, with up to 3 records" in privacy
    assert "<td>cleveland</td><td><code>patient</code></td>" in privacy and "<td>va</td><td><code>patient_rows</code></td>" in privacy
    assert "one patient record" not in privacy and "attests each row" not in privacy and "patient_attested_row" not in privacy
    # a manifest that states no unit is not given one
    bare = dict(manifest, privacy={k: v for k, v in manifest["privacy"].items() if k not in ("unit", "site_units")},
                sites={s: {k: v for k, v in e.items() if k not in ("unit", "rows_per_patient")}
                       for s, e in manifest["sites"].items()})
    privacy = _section(build_report(dictionary, bare, measurements, samples, fidelity)["report.html"].decode(), "privacy")
    assert "The manifest states no privacy unit" in privacy and "not stated in the manifest" in privacy
    assert "patient_attested_row" not in privacy


def test_exclusions_that_name_a_node_or_state_no_charge_render(releases, dictionary):
    tmp, (_, manifest) = releases
    _, measurements, samples, fidelity = _inputs(tmp / "r1", dictionary)
    excluded = [{"node": "9141964316318799682", "round": 2, "code": "REJECTED", "message": "answer rejected: <bad>"},
                {"site": "va", "round": 3, "code": "TIMEOUT", "message": "late", "charged": "unknown: check the ledger"},
                {"node": 17, "code": "GUARD_UNAVAILABLE", "message": "down", "charged": "no"}]
    page = build_report(dictionary, dict(manifest, sites_not_included=excluded), measurements, samples,
                        fidelity)["report.html"].decode()
    section = _section(page, "sites-not-included")
    rows = re.findall(r"<tr>(.*?)</tr>", section.split("<tbody>")[1])
    assert len(rows) == 3
    assert rows[0].startswith("<td>node 9141964316318799682 <span class='muted'>(no known site)</span></td><td>2</td>")
    assert "answer rejected: &lt;bad&gt;" in rows[0] and rows[0].endswith("<td><span class='muted'>unknown</span></td>")
    assert rows[1].startswith("<td>va</td><td>3</td>") and "unknown: check the ledger" in rows[1]
    assert rows[2].startswith("<td>node 17 <span class='muted'>(no known site)</span></td><td>–</td>")
    assert "None" not in section and "3 answers did not count" in section


def test_figures_drawn_on_workers_are_the_figures_drawn_here(releases, tmp_path):
    """Inside `figures.workers()` the report's figures come from worker processes: the same report,
    a dead worker's figures drawn here instead, and no worker left running after the block."""
    from ppsehr.server.release import figures
    from ppsehr.server.release.compare import VariableComparison

    c = VariableComparison("age", ["<40", "40-60", ">60"], np.array([0.2, 0.5, 0.3]), np.array([0.25, 0.45, 0.3]),
                           np.array([0.03, 0.03, 0.03]), ["age"])
    here = figures.figure_distribution(c, "age (years)")
    with figures.workers(2):
        pool = figures._pool
        assert pool is not None and len(pool.procs) == 2
        drawings = [figures.draw(figures.figure_distribution, c, "age (years)") for _ in range(3)]
        assert all(isinstance(d, figures.Drawing) for d in drawings)
        assert all(d.result() == here for d in drawings)  # Agg output is deterministic
        for proc in pool.procs:  # workers die: their figures are drawn here
            proc.kill()
            proc.wait()
        late = [figures.draw(figures.figure_distribution, c, "age (years)") for _ in range(5)]
        assert all((d if isinstance(d, bytes) else d.result()) == here for d in late)
    assert figures._pool is None and all(p.poll() is not None for p in pool.procs)
    assert isinstance(figures.draw(figures.figure_distribution, c, "age (years)"), bytes)  # outside: drawn here
