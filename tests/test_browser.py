"""A real browser (Debian Chromium through Playwright) drives the running app like a user:
load the digits sample, run TRAK, open a query, see proponent images, flag one, reload, and
the flag is still there. Screenshots of every page go to PROPONENT_SCREENSHOT_DIR (default: the
test's temporary folder; `assets/` for the README). With PROPONENT_APP_BENCH=PATH the measured
latencies are written there as a docs/bench JSON."""
from __future__ import annotations

import csv
import io
import json
import os
import platform
import re
import shutil
import time
from pathlib import Path

import pytest

from tests.browser_support import CHROMIUM_ARGS, serve_app, wait_idle

pytestmark = [pytest.mark.browser, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def app_server(digits_project, tmp_path):
    if shutil.which("chromium") is None:
        pytest.skip("Debian chromium is not installed (make test installs it: apt-get install -y chromium)")
    proj = tmp_path / "digits"
    shutil.copytree(digits_project.root, proj, ignore=shutil.ignore_patterns(".proponent"))
    with serve_app(proj, tmp_path / "server.log") as base:
        yield {"base": base, "project": proj}


def test_user_flow(app_server, tmp_path):
    from playwright.sync_api import sync_playwright

    from app import services as svc

    shots = Path(os.environ.get("PROPONENT_SCREENSHOT_DIR") or tmp_path / "shots")
    shots.mkdir(parents=True, exist_ok=True)
    base = app_server["base"]
    timings = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1500})
        try:
            # 1. load the project
            page.goto(base + "/")
            wait_idle(page)
            page.get_by_text("Test accuracy").first.wait_for()
            page.screenshot(path=str(shots / "project.png"), full_page=True)

            # 2. run TRAK (the default method) as a background job
            page.goto(base + "/attribute")
            wait_idle(page)
            assert page.get_by_text("No finished runs yet.").count() == 1
            t_click = time.perf_counter()
            page.locator("button:has-text('Run')").first.click()
            # live progress from the job: its stage and count (a rate shows once a stage has reported twice;
            # TRAK's stages on digits are now too short for a poll to be sure to catch one)
            page.get_by_text(re.compile(r"attribute · trak · (featurize|kernel|score)")).first.wait_for(timeout=60_000)
            timings["progress_visible_s"] = time.perf_counter() - t_click
            page.screenshot(path=str(shots / "attribute-running.png"), full_page=True)
            # reload mid-job: the new session finds the running job through SQLite and keeps showing it
            page.reload()
            wait_idle(page)
            if page.get_by_text("No finished runs yet.").count():
                page.locator("[data-testid='stProgress']").first.wait_for(timeout=30_000)
            page.get_by_text("No finished runs yet.").wait_for(state="detached", timeout=240_000)
            timings["run_done_s"] = time.perf_counter() - t_click
            wait_idle(page)
            page.screenshot(path=str(shots / "attribute.png"), full_page=True)

            # 3. open a query; 4. see the proponent images
            page.locator("[data-testid='stSidebarNav'] a:has-text('Explore')").click()
            page.get_by_text("Top-8 proponents").first.wait_for(timeout=60_000)
            wait_idle(page)
            timings["click_run_to_proponents_s"] = time.perf_counter() - t_click
            q = page.get_by_label("Test query index")
            q.fill("5")
            q.press("Enter")
            wait_idle(page)
            page.get_by_text("Query: test #5").wait_for()
            # → and ← step through the queries that match the filters (all of them here)
            page.get_by_text("Query: test #5").click()  # focus the page, not the number input
            page.keyboard.press("ArrowRight")
            page.get_by_text("Query: test #6").wait_for(timeout=30_000)
            wait_idle(page)
            page.keyboard.press("ArrowLeft")
            page.get_by_text("Query: test #5").wait_for(timeout=30_000)
            wait_idle(page)
            # the query's image, then the 8 + 8 cards (one HTML grid per side)
            assert page.locator("[data-testid='stImage'] img, [data-testid='stImageContainer'] img").count() >= 1
            cards = page.locator(".pp-card")
            assert cards.count() >= 16 and page.locator(".pp-card img").count() >= 16, cards.count()
            assert page.locator(".pp-card img").first.evaluate("i => i.naturalWidth") > 0
            first_id = int(page.locator(".pp-card:has-text('score +')").first.get_attribute("data-index"))
            page.screenshot(path=str(shots / "explore.png"), full_page=True)

            # 5. flag one (the first proponent card)
            card = page.locator(f".pp-card[data-index='{first_id}']").first
            assert "mislabeled" not in card.inner_text()
            page.get_by_role("button", name=f"#{first_id}", exact=True).first.click()  # its pill in the flag control
            wait_idle(page)
            page.locator(f".pp-card[data-index='{first_id}']:has-text('mislabeled')").first.wait_for(timeout=30_000)
            db_flags = svc.db_for(app_server["project"]).flags("train")
            assert db_flags[str(first_id)]["flag"] == "mislabeled"

            # a deep link to a query, opened in a second tab, shows that query
            tab = browser.new_page(viewport={"width": 1400, "height": 1000})
            tab.goto(page.url.split("?")[0] + "?" + "&".join(
                f"{k}={v}" for k, v in (("project", str(app_server["project"])), ("q", "9"))))
            wait_idle(tab)
            tab.get_by_text("Query: test #9").wait_for(timeout=30_000)
            tab.close()

            # 6. reload; 7. the flag is still there (same query from the URL, flag from SQLite)
            page.reload()
            wait_idle(page)
            page.get_by_text("Query: test #5").wait_for(timeout=30_000)
            page.locator(f".pp-card[data-index='{first_id}']:has-text('mislabeled')").first.wait_for(timeout=30_000)
            # its pill is shown selected (the control reads the stored flag)
            page.get_by_role("button", name=f"#{first_id}", exact=True, pressed=True).first.wait_for(timeout=30_000)
            wait_idle(page)

            # page change once results are cached
            t0 = time.perf_counter()
            page.locator("[data-testid='stSidebarNav'] a:has-text('Triage')").click()
            page.get_by_text("Bulk actions", exact=True).wait_for(timeout=60_000)
            wait_idle(page)
            timings["page_change_triage_s"] = time.perf_counter() - t0
            page.screenshot(path=str(shots / "triage.png"), full_page=True)

            # review one by one with the keyboard: M flags the first suspect mislabeled, in SQLite
            from engine import Project

            proj = Project.load(app_server["project"])
            suspects = svc.triage_table(proj, svc.done_runs(proj)[0]["key"], "trak", flags={})
            first_suspect = int(suspects["index"][0])
            page.get_by_text("Suspect 1 of").first.wait_for(timeout=30_000)  # one by one is the first view
            page.get_by_text("Review one by one").first.click()  # focus the page, not an input
            page.keyboard.press("m")
            deadline = time.time() + 30
            def reviewed():
                return [a for a in svc.db_for(app_server["project"]).audit(50)
                        if a["item"] == str(first_suspect) and a["source"] == "app-review" and a["new"] == "mislabeled"]
            while not reviewed() and time.time() < deadline:
                time.sleep(0.3)
            assert reviewed(), "the M key did not flag the first suspect"
            assert svc.db_for(app_server["project"]).flags("train")[str(first_suspect)]["flag"] == "mislabeled"
            wait_idle(page)
            page.get_by_text("Suspect 2 of").first.wait_for(timeout=30_000)  # and it moved on

            # a note typed in the table's first row and committed with Enter lands on that row alone,
            # in SQLite, beside the flag the M key set (the grid moves its cursor down, as a
            # spreadsheet does; the edit does not move with it)
            wait_idle(page)
            page.locator("[class*='st-key-view'] label:has-text('Table')").first.click()
            editor_sel = "[class*='st-key-editor_']"
            page.wait_for_function("""() => { const e = document.querySelector("[class*='st-key-editor_']");
                                              return e && e.querySelector('canvas'); }""", timeout=30_000)
            wait_idle(page)
            table = page.locator(editor_sel).first.locator("[data-testid='stDataFrame']").first
            table.scroll_into_view_if_needed()
            cell_editor = page.locator("textarea.gdg-input")  # the grid's overlay editor
            for _ in range(3):  # the grid may still be mounting after the review's rerun
                box = table.bounding_box()
                page.mouse.dblclick(box["x"] + box["width"] - 30, box["y"] + 35 + 17)  # the note cell, first row
                try:
                    cell_editor.wait_for(timeout=5_000)
                    break
                except Exception:
                    wait_idle(page)
            # into the cell, never to the review's key handler; the grid's overlay may still set its initial
            # value after it shows (seen under load: the text gone, Enter committing the old value), so the
            # text is checked to be there, a moment later, before Enter commits it
            for _ in range(5):
                cell_editor.fill("blurry scan")
                page.wait_for_timeout(300)
                if cell_editor.input_value() == "blurry scan":
                    break
            assert cell_editor.input_value() == "blurry scan"
            cell_editor.press("Enter")
            second_suspect = int(suspects["index"][1])
            deadline = time.time() + 30
            while (svc.db_for(app_server["project"]).flags("train").get(str(first_suspect), {}).get("note") != "blurry scan"
                   and time.time() < deadline):
                time.sleep(0.3)
            state = svc.db_for(app_server["project"]).flags("train")
            if state[str(first_suspect)].get("note") != "blurry scan":  # where did it go? (a screenshot and every note)
                page.screenshot(path=str(shots / "triage-note-lost.png"), full_page=True)
            assert state[str(first_suspect)]["note"] == "blurry scan", (
                state.get(str(first_suspect)), {k: r["note"] for k, r in state.items() if r.get("note")})
            assert state[str(first_suspect)]["flag"] == "mislabeled"
            assert not (state.get(str(second_suspect)) or {}).get("note"), state.get(str(second_suspect))
            wait_idle(page)
            t0 = time.perf_counter()
            page.locator("[data-testid='stSidebarNav'] a:has-text('Explore')").click()
            page.get_by_text("Top-8 proponents").first.wait_for(timeout=60_000)
            wait_idle(page)
            timings["page_change_explore_s"] = time.perf_counter() - t0

            # select two suspects in the grid and export them: the CSV holds exactly those rows
            page.locator("[data-testid='stSidebarNav'] a:has-text('Triage')").click()
            page.get_by_text("Bulk actions", exact=True).wait_for(timeout=60_000)
            wait_idle(page)
            page.locator("[class*='st-key-view'] label:has-text('Grid')").first.click()  # the view stayed Table
            wait_idle(page)
            # the grid's cards, and one pill per card that selects it
            grid_ids = [int(x) for x in page.locator(".pp-card").evaluate_all("cs => cs.map(c => c.dataset.index)")]
            assert len(grid_ids) >= 6, grid_ids
            picked = [grid_ids[0], grid_ids[2]]
            for i in picked:
                page.get_by_role("button", name=f"#{i}", exact=True).first.click()
                wait_idle(page)
            page.get_by_text("2 selected in the grid").wait_for(timeout=30_000)
            with page.expect_download() as dl:
                page.locator("[data-testid='stDownloadButton'] button:has-text('Export the 2 selected')").first.click()
            rows = list(csv.DictReader(io.StringIO(Path(dl.value.path()).read_text())))
            assert sorted(int(r["index"]) for r in rows) == sorted(picked), (rows, picked)
            page.screenshot(path=str(shots / "triage-grid.png"), full_page=True)

            for name in ("Synset", "Attribute", "Project"):  # every page opens without an error
                page.locator(f"[data-testid='stSidebarNav'] a:has-text('{name}')").click()
                wait_idle(page)
                assert page.locator("[data-testid='stException']").count() == 0, name

            page.locator("[data-testid='stSidebarNav'] a:has-text('Leakage')").click()
            wait_idle(page)
            page.screenshot(path=str(shots / "leakage.png"), full_page=True)
            page.locator("[data-testid='stSidebarNav'] a:has-text('Report')").click()
            wait_idle(page)
            page.locator("button:has-text('Build the report')").click()
            page.locator("[data-testid='stDownloadButton']").wait_for(timeout=120_000)
            wait_idle(page)
            time.sleep(1.0)  # let the preview iframe draw
            page.screenshot(path=str(shots / "report.png"), full_page=True)
            # embeddings: a quick PCA layout computed through the service (the default layout for the README shots)
            reducer = svc.DEFAULT_REDUCER if os.environ.get("PROPONENT_SCREENSHOT_DIR") else "pca"
            for kind in ("influence", "penultimate"):
                svc.compute_embedding(proj, kind, reducer)
            page.locator("[data-testid='stSidebarNav'] a:has-text('Embeddings')").click()
            wait_idle(page)
            page.get_by_text("Influence embedding").first.wait_for(timeout=30_000)
            page.screenshot(path=str(shots / "embeddings.png"), full_page=True)
        finally:
            browser.close()
    print("timings", json.dumps(timings))
    bench = os.environ.get("PROPONENT_APP_BENCH")
    if bench:
        from engine.storage.arrays import atomic_write_json

        rows = [[k, round(v, 2)] for k, v in timings.items()]
        atomic_write_json(bench, {
            "title": "App latency (digits sample, real browser)", "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.system()} {platform.machine()}, CPU, 2 cores shared, no GPU",
            "command": f"PROPONENT_APP_BENCH={os.path.relpath(bench, ROOT)} python -m pytest -q tests/test_browser.py",
            "tables": [{"title": "Seconds, measured by Playwright in Chromium", "columns": ["step", "seconds"], "rows": rows,
                        "notes": "click_run_to_proponents_s: click Run (TRAK, default settings) on Attribute → job done → "
                                 "Explore shows the top-8 proponents. page_change_*: sidebar click → page idle, "
                                 "with results cached. Every step ends when the page has been idle for 0.4 s (included)."}],
            "notes": "The machine was shared with other work while measuring; figures are wall-clock."})
