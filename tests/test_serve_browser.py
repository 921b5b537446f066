"""`edge-m2kd serve` in a real browser: headless Chromium (Debian's chromium and chromium-driver)
driven by Selenium. The server runs as the user would start it, on a free loopback port; the page
teaches two new digit classes from uploaded PNGs, follows the step to its end, shows the new
classes on the overview and a prediction for an uploaded image.

Screenshots go to the test's tmp dir, and to $EDGE_M2KD_SCREENSHOTS when set (the README's come
from there), with the measured page-load and prediction times in timings.json beside them.
Skipped where /usr/bin/chromium is missing, unless EDGE_M2KD_REQUIRE_BROWSER=1 (CI sets it).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from edge_m2kd.data import load_digits

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
REQUIRED = os.environ.get("EDGE_M2KD_REQUIRE_BROWSER") == "1"
if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
    if REQUIRED:
        pytest.fail(f"EDGE_M2KD_REQUIRE_BROWSER=1 but {CHROMIUM} or {CHROMEDRIVER} is missing: "
                    "apt-get install chromium chromium-driver", pytrace=False)
    pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium chromium-driver)", allow_module_level=True)
try:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:
    if REQUIRED:
        raise
    pytest.skip("selenium is not installed (pip install -e '.[dev]')", allow_module_level=True)

INIT = ["--backbone", "resnet20", "--input-size", "16", "--exemplars", "40", "--epochs", "2", "--batch-size", "32",
        "--planned-steps", "4", "--device", "cpu", "--no-flip", "--memory-budget", "1GiB"]
# Without the background-networking flags Chromium hangs on a machine with no route out.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1280,1700"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_digits(root: Path, names: list[str], per_class: int) -> dict[str, list[Path]]:
    data = load_digits("train", size=16)
    out = {}
    for name in names:
        folder = root / name
        folder.mkdir(parents=True)
        images = data.images[data.labels == data.class_names.index(name)][:per_class]
        out[name] = [folder / f"{name}-{i:03d}.png" for i in range(len(images))]
        for img, path in zip(images, out[name]):
            Image.fromarray(img).save(path)
    return out


@pytest.fixture
def server(tmp_path):
    """`edge-m2kd serve` on a workspace that knows 0 and 1, as a process on a free loopback port."""
    initial = write_digits(tmp_path / "first", ["0", "1"], 24)
    ws = tmp_path / "ws"
    # Separate processes, as on a device: the step's memory check counts its own process's
    # resident size, and late in the suite the test process alone is larger than the budget.
    for args in (["init", str(ws), *INIT], ["add-classes", str(ws), str(tmp_path / "first")]):
        done = subprocess.run([sys.executable, "-m", "edge_m2kd", *args], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "edge_m2kd", "serve", str(ws), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # The user opens the URL serve prints, the token in its #fragment (the page holds none).
    line = proc.stdout.readline()
    found = re.search(rf"(http://127\.0\.0\.1:{port}/#token=[A-Za-z0-9_-]+)", line)
    assert found, line
    url = found.group(1)
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, proc.communicate()[0]
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2).read()
            break
        except OSError:
            assert time.monotonic() < deadline, "serve never answered"
            time.sleep(0.2)
    yield url, ws, initial
    proc.terminate()
    proc.wait(30)


@pytest.fixture
def browser(tmp_path):
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def test_teach_two_classes_watch_the_step_and_try_the_model_in_chromium(server, browser, tmp_path):
    url, ws, _ = server
    shots = tmp_path / "screenshots"
    shots.mkdir()
    wait = WebDriverWait(browser, 120, poll_frequency=0.1)
    js = browser.execute_script

    def shot(name: str) -> None:
        browser.save_screenshot(str(shots / name))

    # -- the overview, timed from navigation start to every report drawn
    browser.get(url)
    wait.until(lambda d: js("return document.body.dataset.overview") == "steps-1")
    token = url.split("#token=")[1]
    # the page took the token into the tab's session storage and out of the address bar
    assert js("return sessionStorage.getItem('edge-token')") == token
    assert "token" not in browser.current_url and token not in browser.page_source
    wait.until(lambda d: js("return window.edgeTimings.overview_ms") is not None)
    first_load_ms = js("return window.edgeTimings.overview_ms")
    assert [c.text.split("\n")[0] for c in browser.find_elements(By.CSS_SELECTOR, ".cls")] == ["0", "1"]
    reloads = []
    for _ in range(3):  # again, as a user coming back finds it (the server's views are computed once per commit)
        browser.refresh()
        wait.until(lambda d: js("return window.edgeTimings && window.edgeTimings.overview_ms") is not None)
        reloads.append(js("return window.edgeTimings.overview_ms"))
    nav = js("const n = performance.getEntriesByType('navigation')[0]; return [n.domContentLoadedEventEnd, n.loadEventEnd];")

    # -- teach 2 and 3 from uploaded PNGs (send_keys on a file input is Selenium's upload)
    new = write_digits(tmp_path / "upload", ["2", "3"], 24)
    browser.find_element(By.ID, "tab-teach").click()
    browser.find_element(By.ID, "add-class").click()
    rows = browser.find_elements(By.CSS_SELECTOR, ".teach-class")
    for row, name in zip(rows, ["2", "3"]):
        row.find_element(By.CSS_SELECTOR, ".class-name").send_keys(name)
        row.find_element(By.CSS_SELECTOR, ".class-files").send_keys("\n".join(str(p) for p in new[name]))
        assert row.find_element(By.CSS_SELECTOR, ".count").text == "24 images"
    browser.find_element(By.ID, "epochs").send_keys("5")  # a short schedule, long enough to watch
    browser.find_element(By.ID, "start").click()
    seen: list[tuple[str, str, str]] = []
    taken = False

    def progressed(d) -> bool:
        nonlocal taken
        state = (js("return document.getElementById('job-status').dataset.status"),
                 browser.find_element(By.ID, "job-epoch").text, browser.find_element(By.ID, "job-left").text)
        if not seen or seen[-1] != state:
            seen.append(state)
        if not taken and state[0] == "running" and state[1].startswith(("2 / 5 (train)", "3 / 5 (train)")):
            shot("serve-teach.png")  # mid-step: phase, epoch, loss, images/s, time left
            taken = True
        return state[0] in ("done", "refused", "failed", "cancelled")

    wait.until(progressed)
    assert seen[-1][0] == "done", (seen, browser.find_element(By.ID, "job-reason").text)
    assert any(s[0] == "running" and "train" in s[1] for s in seen), seen
    assert "learned 2, 3 from" in browser.find_element(By.ID, "job-result").text
    assert js("return document.getElementById('job-bar').style.width") == "100%"
    if not taken:
        shot("serve-teach.png")
    shot("serve-teach-done.png")

    # -- the overview has the new classes (the page reloads it when the step ends)
    browser.find_element(By.ID, "tab-overview").click()
    wait.until(lambda d: js("return document.body.dataset.overview") == "steps-2")
    wait.until(lambda d: js("return document.getElementById('history-plot').complete && "
                            "document.getElementById('history-plot').naturalWidth > 0"))
    assert [c.text.split("\n")[0] for c in browser.find_elements(By.CSS_SELECTOR, ".cls")] == ["0", "1", "2", "3"]
    shot("serve-overview.png")

    # -- try it: predictions for uploaded images, round trip timed by the page
    browser.find_element(By.ID, "tab-try").click()
    probe = new["2"][0]
    for i in range(6):
        browser.find_element(By.ID, "try-files").send_keys(str(probe))
        wait.until(lambda d, n=i + 1: len(js("return window.edgeTimings.predictions || []")) == n)
    top = browser.find_element(By.CSS_SELECTOR, ".prediction").get_attribute("data-top")
    assert top in {"0", "1", "2", "3"}
    assert "round trip through the page" in browser.find_element(By.ID, "try-meta").text
    shot("serve-try.png")
    round_trips = js("return window.edgeTimings.predictions")
    timings = {"overview_rendered_first_ms": first_load_ms, "overview_rendered_reload_ms": reloads,
               "dom_content_loaded_ms": nav[0], "load_event_ms": nav[1],
               "predict_round_trip_ms": round_trips,
               "predict_round_trip_median_ms_after_first": statistics.median(round_trips[1:]),
               "top_class_for_a_2": top, "progress_states_seen": len(seen)}
    (shots / "timings.json").write_text(json.dumps(timings, indent=2))
    print(json.dumps(timings))
    if os.environ.get("EDGE_M2KD_SCREENSHOTS"):
        dest = Path(os.environ["EDGE_M2KD_SCREENSHOTS"])
        dest.mkdir(parents=True, exist_ok=True)
        for f in shots.iterdir():
            shutil.copy(f, dest / f.name)
    assert first_load_ms < 30_000 and max(reloads) < 30_000 and max(round_trips) < 30_000
