"""The rendered report in a real browser: headless Debian Chromium driven by Playwright.

Opens index.html and latent pages from file://, and checks: no console errors, no request
outside file://, no script from the injected hostile text ran, every plot loaded, clicking a
column header sorts the table. Screenshots go to $REVERIE_ARTIFACTS (else the test's tmp dir).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from test_report import RUN, build_synthetic_db

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not found: install Debian's chromium package (apt-get install chromium) for the browser test")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    from reverie.pipeline.config import load_config
    from reverie.reports.render import render_reports

    root = tmp_path_factory.mktemp("browser")
    cfg = load_config(None, {"project.dir": str(root / "project")})
    with build_synthetic_db(cfg.project.path) as store:
        return render_reports(cfg, store, RUN, root / "report")


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    d = Path(os.environ["REVERIE_ARTIFACTS"]) / "report-screenshots" if os.environ.get("REVERIE_ARTIFACTS") else tmp_path_factory.mktemp("shots")
    d.mkdir(parents=True, exist_ok=True)
    print(f"report screenshots: {d}")
    return d


def _open(browser, path: Path):
    """A fresh page with listeners; returns (page, problems) where problems collects failures."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("request", lambda r: problems.append(f"request outside file://: {r.url}") if not r.url.startswith("file://") else None)
    page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))

    def dialog(d):
        problems.append(f"dialog opened: {d.message}")
        d.dismiss()

    page.on("dialog", dialog)
    page.goto(path.as_uri(), wait_until="load")
    return page, problems


def _check_loaded(page, problems: list[str]) -> None:
    assert page.evaluate("window.__pwned === undefined"), "a script from the injected text ran"
    imgs = page.evaluate("Array.from(document.images).map(i => [i.getAttribute('src'), i.complete && i.naturalWidth > 0])")
    assert imgs, "no plots on the page"
    assert all(ok for _, ok in imgs), f"plots not loaded: {[s for s, ok in imgs if not ok]}"
    assert not problems, problems


def test_index_loads_offline_and_sorts(browser, rendered, shots):
    page, problems = _open(browser, rendered)
    _check_loaded(page, problems)

    def column(i: int) -> list[str]:
        return page.evaluate(f"Array.from(document.querySelectorAll('table.targets tbody tr')).map(r => r.cells[{i}].getAttribute('data-sort'))")

    headers = page.locator("table.targets thead th")
    ratio = headers.nth(4)
    assert ratio.inner_text().startswith("ratio")
    ratio.click()
    vals = column(4)
    nums = [float(v) for v in vals if v]
    assert nums == sorted(nums, reverse=True) and vals[len(nums):] == [""] * (len(vals) - len(nums)), vals
    assert ratio.get_attribute("aria-sort") == "descending"
    ratio.click()
    nums = [float(v) for v in column(4) if v]
    assert nums == sorted(nums) and ratio.get_attribute("aria-sort") == "ascending"
    headers.nth(0).click()  # text/number column: target ids by first latent
    assert [int(v) for v in column(0)] == sorted((int(v) for v in column(0)), reverse=True)
    page.screenshot(path=str(shots / "index.png"), full_page=True)
    assert not problems, problems
    page.close()


@pytest.mark.parametrize("name", ["latent-101.html", "latent-101_202.html"])
def test_latent_page_loads_offline_and_shows_hostile_text_as_text(browser, rendered, shots, name):
    page, problems = _open(browser, rendered.parent / name)
    _check_loaded(page, problems)
    if name == "latent-101.html":
        text = page.inner_text("body")
        assert "<script>window.__pwned=1;alert(1)</script>" in text  # shown, not run
        assert page.locator("table.dreams tbody tr").count() == 18
        assert page.locator(".attr-row").count() == 2
        tip = page.locator(".attr-tok").first.get_attribute("title")
        assert "top replacements" in tip
        # hovering shows the tooltip without errors; the attribution bars have height
        assert page.evaluate("Math.max(...Array.from(document.querySelectorAll('.attr .bar')).map(b => b.getBoundingClientRect().height))") > 5
    page.screenshot(path=str(shots / name.replace(".html", ".png")), full_page=True)
    assert not problems, problems
    page.close()
