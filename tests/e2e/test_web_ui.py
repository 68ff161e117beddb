"""The Dagster web UI in a real browser, as a person uses it after `make run` and `make ui`.

The whole graph is materialized once per session on the default sample (tests/conftest.py, the CLI in a
subprocess), `dagster dev` serves that instance on a free loopback port, and headless Debian
chromium (driven by selenium through Debian's chromedriver) opens it: the asset catalog must list every
asset of the graph, and evaluation_report's latest materialization must show the evaluation table (rows
vit, swin, clip, unet, ensemble) with the figures of reports/evaluation.json.  Screenshots go to the
pytest tmp dir and to REVERSE_SD_HOME/reports/ui.png.  tests/browser_setup.sh installs chromium and
selenium (idempotent); where they cannot be installed the test is skipped with that script's reason.

Marked `browser` (part of the default run; it shares the session's materialized sample, tests/conftest.py):
run it with `.venv/bin/python -m pytest -m browser tests/test_web_ui.py`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.timeout(1800)]

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# Debian's chromium as root, offline: no sandbox, and none of its background connections (which this
# machine's closed network refuses, slowly).
CHROMIUM_FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1600,2400",  # tall enough that the catalog renders every asset row at once
]
SERVER_START_S = 300
PAGE_WAIT_S = 120


def _asset_keys() -> list[str]:
    """Every asset key of the graph, as assets/definitions.py lists them."""
    from assets.definitions import ALL_ASSETS

    keys = []
    for asset in ALL_ASSETS:
        for key in getattr(asset, "keys", None) or [asset.key]:
            keys.append(key.to_user_string())
    return sorted(keys)


@pytest.fixture(scope="module")
def browser_ready():
    setup = subprocess.run(
        ["bash", str(PROJECT / "tests" / "browser_setup.sh"), sys.executable],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if setup.returncode != 0:
        pytest.skip(f"browser not installable here (tests/browser_setup.sh): {setup.stderr.strip()[-600:]}")
    try:
        import selenium  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"selenium not importable after tests/browser_setup.sh: {exc}")
    return setup.stdout.strip()


@pytest.fixture(scope="module")
def sample_instance(browser_ready, materialized_sample) -> dict[str, str]:
    """The environment (REVERSE_SD_HOME, DAGSTER_HOME, ...) of the session's sample, materialized end to end
    by tests/conftest.py as `make run` does."""
    return dict(materialized_sample)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group, from /proc."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


def _stop(proc: subprocess.Popen) -> list[int]:
    """Stop the server's whole process group (dagster dev, webserver, daemon, code servers): SIGTERM, and
    SIGKILL for whatever is still there after a grace period (dagster dev's own shutdown can take longer
    than a test should wait).  Returns the processes of the group still alive afterwards."""
    for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + grace
        while _group_members(proc.pid) and time.monotonic() < deadline:
            proc.poll()
            time.sleep(0.5)
        if not _group_members(proc.pid):
            break
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    return _group_members(proc.pid)


@pytest.fixture(scope="module")
def ui_server(sample_instance, tmp_path_factory):
    """`dagster dev -w workspace.yaml` over the sample's instance, as `make ui` starts it."""
    env = sample_instance
    port = _free_port()
    log = tmp_path_factory.mktemp("dagster_dev") / "dagster_dev.log"
    dagster = Path(sys.executable).with_name("dagster")
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(dagster), "dev", "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)],
            cwd=PROJECT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so every child is stopped with it
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"dagster dev exited with {proc.returncode}: {log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/server_info", timeout=5) as response:
                    if response.status == 200 and json.load(response).get("dagster_webserver_version"):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"dagster dev did not serve {url} in {SERVER_START_S} s: {log.read_text()[-3000:]}")
            time.sleep(2)
        yield url
    finally:
        left = _stop(proc)
    assert not left, f"dagster dev left processes running: {left}"


@pytest.fixture(scope="module")
def browser(browser_ready, tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    # An explicit driver path: selenium must not try to download one.
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(PAGE_WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(driver, timeout: float = PAGE_WAIT_S):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout)


def _open(driver, url: str) -> None:
    """Open a page and dismiss Dagster's first-visit "Join the Dagster community" dialog if it shows."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC

    driver.get(url)
    try:
        _wait(driver, 8).until(EC.element_to_be_clickable((By.XPATH, "//button[normalize-space()='Skip']"))).click()
    except TimeoutException:
        pass


def test_catalog_lists_every_asset(ui_server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    expected = _asset_keys()
    assert {"diffusiondb_parts", "trained_models", "evaluation_report", "prompt_bank"} <= set(expected)
    _open(browser, f"{ui_server}/assets")

    def shown(driver) -> set[str]:
        links = driver.find_elements(By.CSS_SELECTOR, "a[href^='/assets/']")
        return {link.text.strip() for link in links} & set(expected)

    try:
        _wait(browser).until(lambda d: shown(d) == set(expected))
    finally:
        browser.save_screenshot(str(tmp_path / "catalog.png"))
    assert shown(browser) == set(expected)
    body = browser.find_element(By.TAG_NAME, "body").text
    assert "Never materialized" not in body, "every asset was materialized, the catalog says otherwise"


def test_evaluation_report_shows_the_table(ui_server, browser, sample_instance, tmp_path):
    import dagster as dg
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC

    env = sample_instance
    home = Path(env["REVERSE_SD_HOME"])
    cosine = json.loads((home / "reports" / "evaluation.json").read_text())["cosine"]
    with dg.DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        latest = instance.get_latest_materialization_event(dg.AssetKey("evaluation_report"))
    assert latest is not None

    _open(browser, f"{ui_server}/assets/evaluation_report?view=events")
    screenshot = tmp_path / "evaluation_report.png"
    try:
        # the events view opens on the latest materialization: its run is named in the header
        run_link = (
            f"//*[starts-with(normalize-space(.), 'Materialized in run')]//a[normalize-space()='{latest.run_id[:8]}']"
        )
        _wait(browser).until(EC.presence_of_element_located((By.XPATH, run_link)))
        # Table 1 is Dagster table metadata, shown inline: the figures with the paper's beside them
        table = _wait(browser).until(
            EC.presence_of_element_located(
                (By.XPATH, "//tr[td[normalize-space()='evaluation_table']]//table[.//th[normalize-space()='model']]")
            )
        )
        header = [th.text.strip() for th in table.find_elements(By.CSS_SELECTOR, "thead th")]
        rows = {}
        for tr in table.find_elements(By.CSS_SELECTOR, "tbody tr"):
            cells = [td.text.strip() for td in tr.find_elements(By.TAG_NAME, "td")]
            if cells:
                rows[cells[0]] = cells[1:]
        browser.save_screenshot(str(screenshot))
        # at least one plot is an image in the page (Dagster puts long Markdown behind "[Show Markdown]")
        plot_row = browser.find_element(By.XPATH, "//tr[td[normalize-space()='plot_test_cosine']]")
        plot_row.find_element(By.XPATH, ".//*[normalize-space(text())='[Show Markdown]']").click()
        image = _wait(browser).until(
            EC.visibility_of_element_located((By.CSS_SELECTOR, "[role='dialog'] img[src^='data:image/png']"))
        )
        assert image.size["width"] > 200, image.size
        browser.save_screenshot(str(tmp_path / "evaluation_plot.png"))
    finally:
        if not screenshot.exists():
            browser.save_screenshot(str(screenshot))
    assert any("(paper)" in h for h in header), header
    for backbone in ("vit", "swin", "clip", "unet"):
        assert backbone in rows, f"no {backbone} row in the UI's evaluation table: {sorted(rows)}"
        # the figure the UI shows is the one in evaluation.json, to 4 decimals
        assert float(rows[backbone][0]) == round(cosine[f"{backbone}/baseline"], 4), (backbone, rows[backbone])
    ensemble = [name for name in rows if name.startswith("ensemble")]
    assert ensemble, f"no ensemble row in the UI's evaluation table: {sorted(rows)}"
    shown = {float(cell) for name in ensemble for cell in rows[name] if cell.replace(".", "", 1).isdigit()}
    assert round(cosine["ensemble+dakl"], 4) in shown
    reports = home / "reports"
    shutil.copyfile(screenshot, reports / "ui.png")
    # REVERSE_SD_SCREENSHOT_DIR=docs/ui refreshes the README's screenshots from this run
    if os.environ.get("REVERSE_SD_SCREENSHOT_DIR"):
        target = Path(os.environ["REVERSE_SD_SCREENSHOT_DIR"])
        target.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(screenshot, target / "evaluation_report.png")
        shutil.copyfile(tmp_path / "evaluation_plot.png", target / "evaluation_plot.png")
    assert (reports / "ui.png").stat().st_size > 10_000  # a real page, not a blank image


def test_a_cli_run_re_executes_from_the_ui_and_cli_runs_are_on_the_timeline(
    ui_server, browser, sample_instance, tmp_path
):
    """CLI runs were launched through the instance (they have a job origin): the run page's Re-execute
    launches a child run that succeeds, and the Overview timeline lists the CLI's jobs."""
    import dagster as dg
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC

    from assets.jobs import RANGE_START_TAG

    env = sample_instance
    with dg.DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        (run,) = [
            r
            for r in instance.get_runs(filters=dg.RunsFilter(job_name="materialize_diffusiondb_parts"))
            # one part per run, or (the default for 4 parts on 2 workers) a range starting at it
            if "part-000001" in (r.tags.get("dagster/partition"), r.tags.get(RANGE_START_TAG))
        ][:1]
        assert run.tags.get("reverse-sd/invocation")  # launched by `reverse-sd materialize`
    try:
        _open(browser, f"{ui_server}/overview/activity/timeline")
        _wait(browser).until(lambda d: "materialize_trained_models" in d.find_element(By.TAG_NAME, "body").text)
        browser.save_screenshot(str(tmp_path / "timeline.png"))

        _open(browser, f"{ui_server}/runs/{run.run_id}")
        button = _wait(browser).until(
            EC.element_to_be_clickable((By.XPATH, "//button[starts-with(normalize-space(.), 'Re-execute')]"))
        )
        button.click()
        try:  # a menu on some versions: "All steps in root run" / "All"
            _wait(browser, 5).until(
                EC.element_to_be_clickable(
                    (
                        By.XPATH,
                        "//*[@role='menuitem' or self::a or self::button][starts-with(normalize-space(.), 'All')]",
                    )
                )
            ).click()
        except Exception:  # noqa: BLE001 - a single button launched it already
            pass
    finally:
        browser.save_screenshot(str(tmp_path / "re_execute.png"))

    def child(instance):
        runs = instance.get_runs(filters=dg.RunsFilter(tags={"dagster/parent_run_id": run.run_id}))
        return (
            runs[0] if runs and runs[0].status in (dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE) else None
        )

    deadline = time.monotonic() + 300
    with dg.DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        while (done := child(instance)) is None:
            assert time.monotonic() < deadline, "the UI's re-execution did not finish in 300 s"
            time.sleep(2)
    assert done.status == dg.DagsterRunStatus.SUCCESS and done.job_name == "materialize_diffusiondb_parts"
