"""Does the MLflow UI show a study at a glance? A real `mlflow server` and headless Chromium.

    python benchmarks/ui_check.py [--out /tmp/tunekd-ui] [--keep]

1. writes a synthetic study into a fresh sqlite store with `tunekd.tracking.StudyTracker` (the
   quickstart's study file, 2 strategies x 2 inits x 2 seeds, MiniLM's 6 teacher layers; trials end
   completed, early_stopped and failed; no model runs);
2. starts `mlflow server` on 127.0.0.1 (sqlite backend, `--workers 1`,
   MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false);
3. opens the experiment's runs view, the parent run expanded, in headless Chromium (Debian's
   `chromium`): a screenshot (PNG) and the rendered DOM;
4. checks that every trial's run name and each status appear in the run list; exit 1 otherwise.

Screenshots go to --out (default /tmp/tunekd-ui), never into the repository. Runs with whatever
`tunekd` is on the path, so the same script shows the run list before and after a change.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STATUSES = ("completed", "early_stopped", "failed")


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def build_store(db: Path) -> dict:
    """A synthetic study in `db`; returns {experiment_id, parent, trials: [(name, status)]}."""
    from tunekd import plan
    from tunekd.study import load_study
    from tunekd.tracking import StudyTracker

    study = load_study(REPO / "search_spaces" / "quickstart.yaml",
                       ["name=ui-check", "search.distill.strategy.grid=[forward,reverse]", "search.seed.grid=[0,1]"])
    tracker = StudyTracker(f"sqlite:///{db}", study.experiment)
    try:  # the issue-13 tracker takes the resolved study; an older one only the file's text
        tracker.start_parent("ui-check-run", {"overrides": []}, "name: ui-check\n", study=study,
                             study_file=str(REPO / "search_spaces" / "quickstart.yaml"),
                             command=["tunekd", "run", "search_spaces/quickstart.yaml"])
    except TypeError:
        tracker.start_parent("ui-check-run", {"overrides": []}, "name: ui-check\n")
    tracker.log_parent_metrics({"teacher/accuracy": 91.5})
    points = [dict(zip(study.search, combo)) for combo in __import__("itertools").product(
        *[d.sample_points() for d in study.search.values()])]
    out = []
    for i, point in enumerate(points):
        t = study.trial(point)
        p = plan.resolve(t, 6, True)
        trial_id = f"4c9fb_{i:05d}"
        rec = tracker.start_trial(trial_id, p.params(t))
        status = STATUSES[i % 3]
        epochs = t.train.epochs if status == "completed" else 1
        for e in range(1, epochs + 1):
            tracker.log_trial_metrics(trial_id, {"eval/accuracy": 80 + i + e, "train/loss": 1.0 / e}, e)
        tracker.end_trial(trial_id, status, error="RuntimeError: non-finite loss at step 3" if status == "failed"
                          else None)
        out.append((getattr(rec, "name", "") or trial_id, status, rec.run_id))
    if hasattr(tracker, "finish_parent"):
        tracker.finish_parent("eval/accuracy", wall_s=123.0)
    else:
        tracker.end_parent("FINISHED")
    from urllib.parse import quote

    study_url = (tracker.ui_url("BASE") if hasattr(tracker, "ui_url") else
                 f"BASE/#/experiments/{tracker.experiment_id}/runs?searchFilter="
                 + quote(f"tags.`mlflow.parentRunId` = '{tracker.parent_id}'", safe=""))
    return {"experiment_id": tracker.experiment_id, "parent": tracker.parent_id, "trials": out,
            "study_url": study_url}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(db: Path, port: int, log: Path) -> subprocess.Popen:
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    mlflow = str(Path(sys.executable).with_name("mlflow"))
    proc = subprocess.Popen(
        [mlflow, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{db}", "--default-artifact-root", str(db.parent / "artifacts")],
        env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc
        except OSError:
            time.sleep(0.5)
    raise RuntimeError("mlflow server did not answer /health within 120 s")


EXPANDER = 'button[data-component-id*="runnamecellrenderer"]'  # the "+" that unfolds a parent run's children


def browse(url: str, png: Path, wait_s: float = 12.0, expand: bool = False) -> str:
    """Open `url` in headless Chromium (DevTools protocol over a websocket), optionally click every
    parent run's "+" (a researcher's one click), screenshot into `png`; return the page's visible text."""
    import asyncio
    import base64

    import aiohttp

    port = free_port()
    proc = subprocess.Popen(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1700,1100",
         f"--remote-debugging-port={port}", f"--user-data-dir={tempfile.mkdtemp(prefix='tkd-chrome-')}",
         "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    async def session() -> str:
        async with aiohttp.ClientSession() as http:
            for _ in range(100):
                try:
                    async with http.get(f"http://127.0.0.1:{port}/json/list") as r:
                        pages = [t for t in await r.json() if t["type"] == "page"]
                    if pages:
                        break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.2)
            async with http.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                seq = iter(range(1, 10_000))

                async def call(method, **params):
                    i = next(seq)
                    await ws.send_json({"id": i, "method": method, "params": params})
                    async for msg in ws:
                        data = msg.json()
                        if data.get("id") == i:
                            return data.get("result", {})

                async def js(expr):
                    res = await call("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=True)
                    return res.get("result", {}).get("value")

                await call("Page.enable")
                await call("Page.navigate", url=url)
                await asyncio.sleep(wait_s)
                if expand:
                    await js(f"document.querySelectorAll('{EXPANDER}').forEach(b => b.click()); 0")
                    await asyncio.sleep(4)
                shot = await call("Page.captureScreenshot", format="png")
                png.write_bytes(base64.b64decode(shot["data"]))
                return await js("document.body.innerText") or ""

    try:
        return asyncio.run(session())
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=20)


def check(out: Path, keep: bool = False) -> dict:
    if chromium() is None:
        raise SystemExit("no chromium (apt-get install -y chromium)")
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="tunekd-ui-"))
    db = work / "mlflow.db"
    store = build_store(db)
    port = free_port()
    server = start_server(db, port, out / "mlflow-server.log")
    try:
        base = f"http://127.0.0.1:{port}"
        exp = store["experiment_id"]
        pages = {
            "experiment": f"{base}/#/experiments/{exp}",
            "runs": f"{base}/#/experiments/{exp}/runs",
            "parent": f"{base}/#/experiments/{exp}/runs/{store['parent']}",
            "study": store["study_url"].replace("BASE", base),  # what the end-of-study message prints
        }
        results = {}
        for name, url in pages.items():
            text = browse(url, out / f"{name}.png", expand=name in ("runs", "study"))
            (out / f"{name}.txt").write_text(text)
            results[name] = text
        runs_text = results["study"]
        names = {n: n in runs_text for n, _, _ in store["trials"]}
        cells = [c.strip() for c in re.split(r"[\t\n]", runs_text)]  # a table cell per line/tab
        icons = {s: cells.count(s) for s in STATUSES}
        report = {
            "pages": {k: str(out / f"{k}.png") for k in pages},
            "names_shown": sum(names.values()), "trials": len(names), "missing": [n for n, v in names.items() if not v],
            "status_words_in_run_list": icons,
            "overview_page": "Overview" in results["experiment"] and "Traces" in results["experiment"],
            "trials_detail": store["trials"],
        }
        return report
    finally:
        os.killpg(server.pid, 15)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, 9)
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="/tmp/tunekd-ui", help="screenshots and DOM dumps (default: %(default)s)")
    p.add_argument("--keep", action="store_true", help="keep the temporary MLflow store")
    args = p.parse_args(argv)
    report = check(Path(args.out), args.keep)
    print(json.dumps(report, indent=1))
    return 0 if not report["missing"] else 1


if __name__ == "__main__":
    sys.exit(main())
