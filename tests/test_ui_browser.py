"""The sweep comparison as a user sees it: a real sweep into a real MLflow server, the links it
prints opened in headless Chromium (Debian's `chromium`, driven by Playwright), and what the page
shows read from its DOM. Screenshots go to outputs/ui/.

The saved view is MLflow's internal UI state, so this test is what notices when an MLflow upgrade
stops rendering it: it fails, it never skips."""

import os
import re
import shutil
import sys

import pytest
from playwright.sync_api import Browser, HttpCredentials, Page, expect, sync_playwright

from pipeline.__main__ import main
from pipeline.tracking import ui
from tests.conftest import PROJECT_ROOT, SMALL, all_runs
from tests.test_cli import invoke_ok

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SHOTS = PROJECT_ROOT / "outputs" / "ui"
LOAD = 120_000  # ms: the UI's first load parses a large bundle on a busy 2-core machine
# a user who has closed MLflow's assistant panel once (it opens by itself on the very first visit)
NO_ASSISTANT = (
    "localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');"
    "localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');"
)


@pytest.fixture(scope="module")
def browser():
    if shutil.which(CHROMIUM) is None:
        pytest.fail("Chromium is missing: `make browser` installs it (apt-get install -y chromium, as root)")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


def visit(browser: Browser, url: str, ready: str) -> Page:
    """`url` in a new browser context (nothing remembered from other pages), logged in as the user
    the environment names, once `ready` shows."""
    login: HttpCredentials | None = None
    if "MLFLOW_TRACKING_USERNAME" in os.environ:
        login = {
            "username": os.environ["MLFLOW_TRACKING_USERNAME"],
            "password": os.environ["MLFLOW_TRACKING_PASSWORD"],
        }
    context = browser.new_context(viewport={"width": 1600, "height": 1000}, http_credentials=login)
    context.add_init_script(NO_ASSISTANT)
    page = context.new_page()
    page.goto(url)
    page.get_by_text(ready).first.wait_for(timeout=LOAD)
    return page


def runs_listed(page: Page):
    """The links to runs on the page, top to bottom (a run's name is its link's text)."""
    return page.locator("a[href*='/runs/']")


def chart(page: Page, title: str):
    return page.locator(".react-resizable", has_text=title)


def shot(page: Page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / name))


@pytest.mark.slow
def test_the_printed_links_open_the_sweep_comparison(
    as_admin, browser, mnist_root, tmp_path, monkeypatch, capsys
):
    uri = as_admin.uri  # a server with logins, as `make server` runs it
    monkeypatch.setattr(sys, "argv", sys.argv)
    invoke_ok(
        main,
        [*SMALL, "n_eval=64", "attack=fgsm", "eps=0.2,0.05,0.1", "tracking.experiment=ui", "-m"],
        tmp_path,
    )
    printed = capsys.readouterr().out
    (link,) = re.findall(r"compare the sweep in the MLflow UI: (\S+)", printed)
    run_links = re.findall(r"MLflow run \w+ in \S+: (\S+)", printed)
    (training,) = re.findall(r"every cached model's training curves: (\S+)", printed)
    assert link.startswith(uri) and len(run_links) == 3
    kids = sorted(
        (r for r in all_runs(uri, "ui") if r.data.tags.get("stage") == "attack"),
        key=lambda r: r.data.metrics["eps"],
    )
    assert [k.data.metrics["eps"] for k in kids] == [0.05, 0.1, 0.2]
    names = [k.info.run_name for k in kids]
    assert names == ["eps=0.05", "eps=0.1", "eps=0.2"]  # a sweep's runs are named by its swept values

    # the sweep's link: its three runs in eps order, each key metric against eps, the images
    page = visit(browser, link, "eps vs. success_rate")
    page.wait_for_function(  # every run's example grid, loaded
        "() => { const i = [...document.querySelectorAll('img.rc-image-img')];"
        " return i.length == 3 && i.every(e => e.complete && e.naturalWidth > 0); }",
        timeout=LOAD,
    )
    expect(runs_listed(page)).to_have_text(names, timeout=LOAD)
    for metric in ui.SWEEP_CHARTS:
        card = chart(page, f"eps vs. {metric}")
        assert card.locator("text.xtitle").text_content() == "eps"
        assert card.locator("text.ytitle").text_content() == metric
        assert card.locator("path.point").count() == 3  # a point per run
    assert page.get_by_text("Model metrics").count() == 0  # no charts the view did not ask for
    parent = next(r for r in all_runs(uri, "ui") if r.data.tags.get("stage") == "sweep")
    expect(page.locator("body")).to_contain_text(parent.info.run_name)  # the view's name (Views menu)
    shot(page, "sweep_comparison.png")
    chart(page, "examples").locator("[data-component-id=fullscreen_button_chartcard]").click()
    expect(page.get_by_role("dialog").locator("img.rc-image-img")).to_have_count(3, timeout=LOAD)
    expect(page.get_by_role("dialog")).to_contain_text("eps=0.05")
    shot(page, "sweep_examples.png")

    # the same view as a table: the key metrics are columns, the rows in eps order
    table = visit(browser, link.replace("compareRunsMode=CHART", "compareRunsMode=TABLE"), "success_rate")
    headers = set(table.locator("[role=columnheader]").all_inner_texts())
    assert {"eps", "success_rate", "adv_accuracy", "l2_mean", "clean_accuracy"} <= headers
    expect(runs_listed(table)).to_have_text(names, timeout=LOAD)
    shot(table, "sweep_table.png")

    # what `make ui` prints: each experiment's runs table ("Model training", not the GenAI
    # overview) and the newest sweep's comparison
    ui.main(["--store", uri, "--links"])
    listed = capsys.readouterr().out
    assert listed.strip().endswith(link)
    (experiment,) = re.findall(r"^  ui +(\S+)$", listed, re.MULTILINE)
    runs_table = visit(browser, experiment, "Run Name")
    assert "/runs" in runs_table.url and "workflowType=machine_learning" in runs_table.url
    expect(runs_listed(runs_table).filter(has_text=parent.info.run_name)).to_have_count(1, timeout=LOAD)
    shot(runs_table, "experiment.png")

    # a job's own link: its run page with its metrics
    run_page = visit(browser, run_links[0], "success_rate")
    assert kids[
        [k.info.run_id for k in kids].index(run_links[0].split("/runs/")[1].split("?")[0])
    ].info.run_name in run_page.inner_text("body")
    shot(run_page, "run.png")

    # the training experiment: each cached model's curves
    (trained,) = all_runs(uri, "ui-train")
    curves = visit(browser, training, "val_accuracy")
    for metric in ("val_accuracy", "val_loss", "train_loss"):  # a line per training run
        expect(chart(curves, metric).locator("path.js-line").first).to_be_attached(timeout=LOAD)
        expect(chart(curves, metric)).to_contain_text(trained.info.run_name)
    shot(curves, "training.png")
