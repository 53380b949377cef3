"""The web console end to end, in headless Chromium (Debian's `chromium`, driven by Playwright for Python).

An SDK training loop creates a run; the browser signs in (after a refused key), finds the run,
sees its loss curve with one point per step (and a new point when another step is trained),
sets a checkpoint's TTL, deletes another checkpoint from the page, and cannot see another key's run.
A screenshot of the run page is saved under the test's tmp dir; with TETHER_UPDATE_SCREENSHOT=1 it
also replaces docs/console.png (the README's picture).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import tether
from tether.server.config import ServerConfig
from tether.server.main import ServerThread

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not Path(CHROMIUM).exists(), reason="needs Debian's chromium (apt-get install chromium)"
    ),
]
playwright_api = pytest.importorskip(
    "playwright.sync_api", reason="needs playwright (pip install playwright)"
)

UPDATE_SCREENSHOT = os.environ.get("TETHER_UPDATE_SCREENSHOT") == "1"
STEPS = 24 if UPDATE_SCREENSHOT else 8  # the README's picture wants longer curves
BROWSER_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
README_SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "console.png"
WAIT_MS = 20_000


@pytest.fixture(scope="module")
def server(tmp_path_factory, default_model_dir):
    config = ServerConfig(port=0, data_dir=tmp_path_factory.mktemp("data"), api_keys=["tml-alice", "tml-bob"])
    thread = ServerThread(config)
    with thread:
        yield thread


def train_step(trainer, datum, step: int) -> None:
    fb = trainer.forward_backward([datum], "cross_entropy")
    trainer.optim_step(tether.AdamParams(learning_rate=2e-2))
    output = fb.result()
    logprobs = output.loss_fn_outputs[0]["logprobs"].to_numpy()
    trainer.log_metrics(
        {
            "train/nll": output.metrics["loss:sum"] / len(logprobs),
            "train/target_prob": float(np.exp(logprobs).mean()),
        },
        step,
    )


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        yield browser
        browser.close()


def test_console_sign_in_run_curves_checkpoints_and_isolation(server, browser, tmp_path):
    server = server.base_url
    alice = tether.ServiceClient(base_url=server, api_key="tml-alice")
    bob = tether.ServiceClient(base_url=server, api_key="tml-bob")
    try:
        trainer = alice.create_lora_training_client(base_model="tether/tiny-qwen3", rank=4).result()
        bobs_run = bob.create_lora_training_client(base_model="tether/tiny-qwen3", rank=2).result().model_id
        tokens = trainer.get_tokenizer().encode("tether trains models you run yourself, step by step.")[:41]
        datum = tether.datum_from_model_input_weights(
            tether.ModelInput.from_ints(tokens), [1.0] * len(tokens)
        )
        for step in range(STEPS):
            train_step(trainer, datum, step)
        trainer.save_state("keep").result()
        trainer.save_state("scratch").result()
        run_id = trainer.model_id

        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("dialog", lambda dialog: dialog.accept())
        page.goto(f"{server}/console")

        page.fill("#api-key", "tml-mallory")
        page.click("button[type=submit]")
        page.wait_for_selector("#signin-error:has-text('refused')", timeout=WAIT_MS)

        page.fill("#api-key", "tml-alice")
        page.click("button[type=submit]")
        page.wait_for_selector(f"#runs-table tr[data-run-id='{run_id}']", timeout=WAIT_MS)
        assert page.locator(f"tr[data-run-id='{bobs_run}']").count() == 0
        row = page.locator(f"tr[data-run-id='{run_id}']")
        assert "LoRA rank 4" in row.inner_text()

        row.locator("a").first.click()
        loss = page.locator("svg[data-series='server/loss:sum']")
        loss.wait_for(timeout=WAIT_MS)
        assert loss.get_attribute("data-points") == str(STEPS)
        for key in (
            "server/loss:per_token",
            "server/grad_norm",
            "server/learning_rate",
            "server/tokens_per_s",
            "client/train/nll",
            "client/train/target_prob",
        ):
            assert page.locator(f"svg[data-series='{key}']").get_attribute("data-points") == str(STEPS), key
        assert page.inner_text("#run-steps") == str(STEPS)

        page.check("#log-scale")
        assert loss.get_attribute("data-scale") == "log"
        page.uncheck("#log-scale")

        train_step(trainer, datum, STEPS)  # the open page picks up the new step by itself
        page.wait_for_selector(
            f"svg[data-series='server/loss:sum'][data-points='{STEPS + 1}']", timeout=WAIT_MS
        )

        keep = page.locator("tr[data-checkpoint='weights/keep']")
        scratch = page.locator("tr[data-checkpoint='weights/scratch']")
        assert f"tinker://{run_id}/weights/keep" in keep.inner_text()
        assert "training state" in keep.inner_text()
        keep.locator("input").fill("2")
        keep.locator("button.set-ttl").click()
        page.wait_for_selector("tr[data-checkpoint='weights/keep'] td:has-text('in 2 h')", timeout=WAIT_MS)
        page.set_viewport_size({"width": 1280, "height": 900})
        screenshot = tmp_path / "console-run-page.png"
        page.screenshot(path=str(screenshot), full_page=True)
        assert screenshot.stat().st_size > 10_000
        if UPDATE_SCREENSHOT:
            shutil.copyfile(screenshot, README_SCREENSHOT)

        scratch.locator("button.delete").click()
        scratch.wait_for(state="detached", timeout=WAIT_MS)
        paths = [
            c.tinker_path for c in alice.create_rest_client().list_checkpoints(run_id).result().checkpoints
        ]
        assert paths == [f"tinker://{run_id}/weights/keep"]

        page.goto(f"{server}/console#/runs/{bobs_run}")
        page.wait_for_selector("#not-found", timeout=WAIT_MS)
        assert page.locator("svg.chart").count() == 0

        page.goto(f"{server}/console#/sessions")
        page.wait_for_selector(f"#sessions-table a:has-text('{run_id}')", timeout=WAIT_MS)
        for kind in ("jobs", "deployments"):
            page.goto(f"{server}/console#/{kind}")
            page.wait_for_selector(f"#{kind}-empty", timeout=WAIT_MS)

        page.click("#sign-out")
        page.wait_for_selector("#api-key", timeout=WAIT_MS)
    finally:
        alice.close()
        bob.close()


def test_a_100000_step_run_page_draws_downsampled_curves(server, browser):
    service = tether.ServiceClient(base_url=server.base_url, api_key="tml-alice")
    try:
        run_id = service.create_lora_training_client(base_model="tether/tiny-qwen3", rank=2).result().model_id
        run_metrics = server.app.state.tether.run_metrics
        for step in range(100_000):
            run_metrics.record(run_id, step, {"loss:sum": 1000.0 / (step + 1)}, source="server")
        page = browser.new_page()
        page.on("response", lambda r: sizes.append(len(r.body())) if "/metrics" in r.url else None)
        sizes: list[int] = []
        page.goto(f"{server.base_url}/console")
        page.fill("#api-key", "tml-alice")
        page.click("button[type=submit]")
        page.wait_for_selector("#runs-table", timeout=WAIT_MS)
        page.goto(f"{server.base_url}/console#/runs/{run_id}")
        loss = page.locator("svg[data-series='server/loss:sum']")
        loss.wait_for(timeout=WAIT_MS)
        assert 500 <= int(loss.get_attribute("data-points")) <= 1000  # the page asks for 1,000 points at most
        assert page.inner_text("#run-steps") == "100000"
        assert sizes and max(sizes) < 100_000  # bytes of metrics JSON, not megabytes
    finally:
        service.close()
