"""The text sample in a real browser (Debian Chromium through Playwright): Explore shows the query,
its proponents and opponents as readable sentences, and Triage lists the suspects with their text."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.browser_support import CHROMIUM_ARGS, serve_app, wait_idle

pytestmark = [pytest.mark.browser, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def text_app(tmp_path):
    if shutil.which("chromium") is None:
        pytest.skip("Debian chromium is not installed (make test installs it: apt-get install -y chromium)")
    from engine import Project
    from engine.api import cached_scores
    from engine.core.samples import prepare_sample

    proj = tmp_path / "text"
    prepare_sample("text", proj)
    project = Project.load(proj)
    cached_scores(project, "trak")  # the run the pages show
    with serve_app(proj, tmp_path / "server.log", {"HF_HUB_OFFLINE": "1"}, wait_s=120) as base:
        yield {"base": base, "project": project}


def test_text_explore_and_triage(text_app, tmp_path):
    import numpy as np
    from playwright.sync_api import sync_playwright

    from app import services as svc

    project = text_app["project"]
    shots = Path(os.environ.get("PROPONENT_SCREENSHOT_DIR") or tmp_path / "shots")
    shots.mkdir(parents=True, exist_ok=True)
    key = svc.done_runs(project)[0]["key"]
    S = svc.load_run(project, key)["scores"]
    q = 3
    top = svc.topk(np.asarray(S[q]), 8)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1600})
        try:
            page.goto(f"{text_app['base']}/explore?q={q}")
            wait_idle(page, timeout=240)
            page.get_by_text(f"Query: test #{q}").wait_for(timeout=120_000)
            page.get_by_text("Top-8 proponents").first.wait_for(timeout=60_000)
            wait_idle(page)
            # the query and its strongest proponent and opponent, as sentences on the page
            for text in (project.text("test", q), project.text("train", int(top["proponents"][0])),
                         project.text("train", int(top["opponents"][0]))):
                # a card (markdown, or the HTML grid of cards), not the query table's hidden accessible copy of its cells
                page.locator("[data-testid='stMarkdownContainer'] div, .pp-card .pp-text", has_text=text).first.wait_for(
                    timeout=30_000)
            assert page.locator("[data-testid='stImage'] img").count() == 0
            page.screenshot(path=str(shots / "explore-text.png"), full_page=True)

            page.locator("[data-testid='stSidebarNav'] a:has-text('Triage')").click()
            page.get_by_text("Bulk actions", exact=True).wait_for(timeout=120_000)
            wait_idle(page)
            page.locator("[class*='st-key-view'] label:has-text('Table')").first.click()
            wait_idle(page)
            # the suspects table carries a text column with the most suspicious sentence first
            tri = svc.triage_table(project, key, "trak", flags={})
            first = project.text("train", int(tri.iloc[0]["index"]))
            grid = page.locator("[data-testid='stDataFrame'], [data-testid='stDataFrameResizable']").first
            grid.wait_for(timeout=30_000)
            assert page.locator("[data-testid='stDataFrame'] >> text=text").count() >= 1 or \
                page.get_by_role("columnheader", name="text").count() >= 1
            page.screenshot(path=str(shots / "triage-text.png"), full_page=True)
            # glide data grid draws cells on a canvas: read the table's text through its accessible copy
            cells = page.locator("[data-testid='stDataFrame'] table td, [data-testid='stDataFrame'] [role='gridcell']")
            texts = cells.all_inner_texts()
            assert any(first[:40] in t for t in texts), texts[:20]
        finally:
            browser.close()
