"""The human path in a real browser: after a real `merge_on_upload` run (dag.test() against a real MLflow server),
Debian's headless Chromium, driven through chromedriver's W3C WebDriver protocol, opens the MLflow UI at `/#/models`,
the merged model and its `candidate` version; the evidence table, intervals, gate verdicts and the links to the report
and the per-sample verdicts are on screen (and the links serve those files); the alias `champion` is set by clicks
in the UI; `regression_eval` then evaluates exactly that version.

Offline: the browser talks only to the loopback MLflow server (background networking and component updates off).
Screenshots go to the test's tmp dir; their paths are printed (`pytest -s` shows them).
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from pipeline_support import REPO, airflow_env, dag_test, env_vars, make_family, migrate_airflow, register, write_params

from tasks.stack import free_port, stop_group

pytestmark = pytest.mark.pipeline
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
W3C_ELEMENT = "element-6066-11e4-a52e-4f735466cecf"  # the key of an element reference in the W3C protocol
ENTER = "\ue007"


class Browser:
    """Headless Chromium through chromedriver's W3C WebDriver HTTP API (no client library needed)."""

    def __init__(self, profile: Path, log: Path) -> None:
        for exe in (CHROMIUM, CHROMEDRIVER):
            assert shutil.which(exe), f"{exe} is missing: apt-get install chromium chromium-driver"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        with open(log, "w") as fh:
            self.proc = subprocess.Popen([CHROMEDRIVER, f"--port={self.port}", "--allowed-ips=127.0.0.1"],
                                         stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        self._until(lambda: self._call("GET", "/status").get("ready"), 30, "chromedriver to start")
        caps = {"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
            "binary": CHROMIUM,
            "args": ["--headless=new", "--disable-background-networking", "--disable-component-update",
                     "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                     "--disable-sync", "--window-size=1600,1300", f"--user-data-dir={profile}"]}}}}
        self.session = self._call("POST", "/session", caps)["sessionId"]

    def _call(self, method: str, path: str, body: dict | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return json.loads(r.read() or b"{}").get("value")
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"webdriver {method} {path}: {e.code} {e.read()[:400]!r}") from None

    @staticmethod
    def _until(check: Any, timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(OSError, RuntimeError):
                got = check()
                if got:
                    return got
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {timeout}s for {what}")
            time.sleep(0.25)

    def cmd(self, method: str, path: str, body: dict | None = None) -> Any:
        return self._call(method, f"/session/{self.session}{path}", body)

    def open(self, url: str) -> None:
        self.cmd("POST", "/url", {"url": url})

    def js(self, script: str, *args: Any) -> Any:
        return self.cmd("POST", "/execute/sync", {"script": script, "args": list(args)})

    def elements(self, xpath: str) -> list[str]:
        return [e[W3C_ELEMENT] for e in self.cmd("POST", "/elements", {"using": "xpath", "value": xpath})]

    def visible(self, xpath: str, timeout: float = 60) -> str:
        """The first displayed element matching `xpath` (explicit wait)."""
        def find() -> str | None:
            return next((e for e in self.elements(xpath) if self.cmd("GET", f"/element/{e}/displayed")), None)
        return self._until(find, timeout, f"a visible {xpath}")

    def click(self, xpath: str, timeout: float = 60) -> None:
        self._until(lambda: self.cmd("POST", f"/element/{self.visible(xpath, timeout)}/click", {}) is None, timeout,
                    f"a click on {xpath}")

    def type(self, xpath: str, text: str) -> None:
        self.cmd("POST", f"/element/{self.visible(xpath)}/value", {"text": text})

    def text(self) -> str:
        return self.js("return document.body.innerText")

    def wait_text(self, needle: str, timeout: float = 60) -> str:
        return self._until(lambda: needle in self.text() and self.text(), timeout, f"text {needle!r} on the page")

    def hrefs(self, link_text: str) -> list[str]:
        return self.js("return Array.from(document.querySelectorAll('a')).filter(a => a.textContent.trim() === "
                       "arguments[0]).map(a => a.href)", link_text)

    def screenshot(self, path: Path) -> Path:
        path.write_bytes(base64.b64decode(self.cmd("GET", "/screenshot")))
        print(f"screenshot: {path}")
        return path

    def quit(self) -> None:
        with contextlib.suppress(OSError, RuntimeError):
            self.cmd("DELETE", "")
        stop_group(self.proc.pid, grace=5)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)


@pytest.fixture(scope="module")
def pipeline(mlflow_server, tmp_path_factory):
    """One real merge_on_upload run for a new code version. The gate margins are 1.0 (a gate every merge of this
    random tiny family passes): this test is about the human path to promotion, and needs a `candidate`; the
    statistics of the gates are tested in test_stats.py / test_gates.py and at real margins in test_pipeline_dags.py."""
    tmp = tmp_path_factory.mktemp("ui")
    home, root = tmp / "airflow", tmp / "root"
    migrate_airflow(home)
    params = write_params(tmp / "params.yaml", root=root, family="ui", pairing={"enhancement": False},
                          pipeline={"experiment": "ui-pipeline"}, merge={"methods": {"sar": {}}},
                          gate={"margin": 1.0, "base_margin": 1.0})
    values = {"MLFLOW_TRACKING_URI": mlflow_server.url, "SARMERGE_PARAMS": str(params),
              "SARMERGE_PIPELINE_ROOT": str(root)}
    env = airflow_env(home, **values)
    with env_vars(**values):
        fam = make_family(tmp / "fam", [("math_s0", "math", 81), ("code_s0", "code", 82)], base_seed=7)
        base = register(fam["base"], "ui-base", kind="base")
        register(fam["math_s0"], "ui-math", domain="math", base=base["uri"], calib=fam["calib_math"])
        code = register(fam["code_s0"], "ui-code", domain="code", base=base["uri"], calib=fam["calib_code"])
        run = dag_test(REPO / "dags" / "merge_on_upload.py", env, {"versions": [f"ui-code/{code['version']}"]})
        assert run["state"] == "success", run["log"][-5000:]
        yield {"env": env, "url": mlflow_server.url, "tmp": tmp}


def _fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as r:
        assert r.status == 200, url
        return r.read().decode()


def test_promote_in_the_mlflow_ui_then_regression_checks_that_version(pipeline, tmp_path):
    from tasks import registry as reg

    client = reg.get_client()
    candidate = reg.alias_ref(client, "ui-merged", "candidate")
    assert candidate is not None and candidate.tags[reg.TAG_GATE] == "pass"
    assert reg.alias_ref(client, "ui-merged", "champion") is None  # auto_promote is off: a person decides
    url, v = pipeline["url"], candidate.version

    browser = Browser(tmp_path / "chromium-profile", tmp_path / "chromedriver.log")
    try:
        browser.open(f"{url}/#/models")
        browser.visible("//a[normalize-space(.)='ui-merged']")
        # MLflow 3.17's one-time "new model registry UI" dialog and its assistant panel sit over the page
        with contextlib.suppress(TimeoutError):
            browser.click("//button[normalize-space(.)='Try it now']", timeout=10)
        with contextlib.suppress(TimeoutError):
            browser.click("//button[@data-component-id='mlflow.assistant.chat_panel.close']", timeout=5)
        browser.screenshot(tmp_path / "1-models.png")
        browser.click("//a[normalize-space(.)='ui-merged']")
        browser.click(f"//a[normalize-space(.)='Version {v}']")
        page = browser.wait_text("Paired differences")
        browser.screenshot(tmp_path / "2-candidate-version.png")
        assert f"/#/models/ui-merged/versions/{v}" in browser.js("return location.href")
        # the evidence: scores with 95 % intervals, paired differences, every gate's verdict with its interval
        assert "Gate verdict: all gates pass" in page and "Scores (95 % interval)" in page
        assert "merged − parent" in page and "merged − base" in page
        assert re.search(r"\d\.\d{3} \[\d\.\d\d, \d\.\d\d\]", page), "a score with its interval"
        gates = re.findall(r"(noninferior:\S+|vs_base:\S+)\s+\S*\s*pass\s+([+-]\d\.\d{3} \[[+-]\d\.\d{3}, "
                           r"[+-]\d\.\d{3}\])", page)
        assert len(gates) == 4, page[:4000]
        assert "Decision size" in page
        browser.visible("//*[@title='candidate' and @role='status']")  # the alias tag beside the version
        # the links to the report and the per-sample verdicts are on the page, and serve those files
        (report,) = browser.hrefs("analysis report")
        (samples,) = browser.hrefs("per-sample verdicts")
        assert f"run_uuid={candidate.run_id}" in report and report.endswith("path=analysis/report.html")
        html = _fetch(report)
        # the report opens with the short summary, then the plots; the long bullets and tables come after
        assert html.index("<b>Summary</b>") < html.index("<figure>") < html.index("<details>") < \
            html.index("At a glance")
        records = [json.loads(line) for line in _fetch(samples).splitlines()]
        assert records and all(r["verdict"] in ("correct", "incorrect") for r in records)

        # promote through the UI: edit the aliases, add `champion`, save
        browser.click("//button[@title='Edit aliases']")
        combobox = "//div[@role='dialog']//input[@role='combobox']"
        browser.click(combobox)
        browser.type(combobox, "champion")
        browser.visible("//div[@role='dialog']//*[contains(@class,'select-item-option') and @title='champion'] | "
                        "//*[contains(@class,'select-item-option') and @title='champion']")
        browser.type(combobox, ENTER)
        browser.screenshot(tmp_path / "3-alias-dialog.png")
        browser.click("//button[@data-component-id='mlflow.edit-aliases-modal.save-button']")
        # saved: the dialog closes and the page shows the new alias beside the version
        browser.visible("//*[@title='champion' and @role='status' and not(ancestor::div[@role='dialog'])]")
        browser.screenshot(tmp_path / "4-champion.png")
    finally:
        browser.quit()
    champion = Browser._until(lambda: reg.alias_ref(client, "ui-merged", "champion"), 30, "the alias in the registry")
    assert champion.version == v

    # the scheduled regression check evaluates exactly the version the person promoted
    result = dag_test(REPO / "dags" / "regression_eval.py", pipeline["env"])
    assert result["state"] == "success", result["log"][-3000:]
    experiment = client.get_experiment_by_name("ui-pipeline-regression")
    runs = client.search_runs([experiment.experiment_id])
    assert [(r.data.tags["sarmerge.model_version"], r.data.tags["sarmerge.alias"]) for r in runs] == \
        [(f"models:/ui-merged/{v}", "champion")]
    tags = client.get_model_version("ui-merged", v).tags
    # 3 problems per suite: no alarm and no false comfort either
    assert tags[reg.TAG_REGRESSION] == "inconclusive" and "champion" in tags[reg.TAG_REGRESSION_DETAIL]
