"""Does the MLflow UI show a study at a glance? A real `mlflow server` and headless Chromium.

    python benchmarks/ui_check.py [--out /tmp/tunekd-ui] [--keep]

1. writes a synthetic study into a fresh sqlite store with `tunekd.tracking.StudyTracker` (the
   quickstart's study file, 2 strategies x 2 inits x 2 seeds, MiniLM's 6 teacher layers; trials end
   completed, early_stopped and failed; no model runs);
2. starts `mlflow server` on 127.0.0.1 (sqlite backend, `--workers 1`,
   MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false);
3. opens the experiment's runs view, the parent run expanded, in headless Chromium (Debian's
   `chromium`): a screenshot (PNG) and the rendered DOM;
4. checks that every trial's run name and each status appear in the run list, that the parent's row shows the
   teacher's and the best trial's metric, that the trials show their epochs (`train/epochs`), that the parent's
   `tunekd.status` is not cut off, and that the view grouped by strategy shows one row per strategy;
   exit 1 otherwise.

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
    grouped_url = study_url.replace(tracker.parent_id, tracker.parent_id + "-by-strategy")
    parent = tracker.client.get_run(tracker.parent_id).data
    return {"experiment_id": tracker.experiment_id, "parent": tracker.parent_id, "trials": out,
            "study_url": study_url, "grouped_url": grouped_url, "strategies": sorted(
                {p for p in (r.params.get("distill.strategy") for r in tracker.trials.values()) if p}),
            "parent_status": parent.tags.get("tunekd.status", ""), "parent_metrics": dict(parent.metrics)}


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


# the text cells cut off by their column (an ellipsis: [text, shown width, full width]) and the first row's cells
# (the parent run's, ordered by start time)
PROBE = ("JSON.stringify({cut: [...document.querySelectorAll('.ag-cell')].filter(c => c.scrollWidth > c.clientWidth + 1)"
         ".map(c => [c.innerText, c.clientWidth, c.scrollWidth]), first: [...document.querySelectorAll("
         "'.ag-row[row-index=\"0\"] .ag-cell')].map(c => c.innerText.trim())})")


def browse(url: str, png: Path, wait_s: float = 12.0, expand: bool = False, probe: str | None = None):
    """Open `url` in headless Chromium (DevTools protocol over a websocket), optionally click every
    parent run's "+" (a researcher's one click), screenshot into `png`; return the page's visible text (and,
    with `probe`, that JavaScript expression's value: (text, value))."""
    import asyncio
    import base64

    import aiohttp

    port = free_port()
    proc = subprocess.Popen(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=2200,1100",
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
                text = await js("document.body.innerText") or ""
                return (text, await js(probe)) if probe else text

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
            "grouped": store["grouped_url"].replace("BASE", base),  # the same, grouped by strategy
            "grouped_charts": store["grouped_url"].replace("BASE", base) + "&compareRunsMode=CHART",
        }
        results, probe = {}, {}
        for name, url in pages.items():
            text, found = browse(url, out / f"{name}.png", expand=name in ("runs", "study"), probe=PROBE)
            probe[name] = json.loads(found or '{"cut": [], "first": []}')
            (out / f"{name}.txt").write_text(text)
            results[name] = text
        runs_text = results["study"]
        names = {n: n in runs_text for n, _, _ in store["trials"]}
        cells = [c.strip() for c in re.split(r"[\t\n]", runs_text)]  # a table cell per line/tab
        icons = {s: cells.count(s) for s in STATUSES}
        metrics, first = store["parent_metrics"], probe["study"]["first"]
        shown = {  # the parent's row holds its teacher and best metric (as the list prints them), and the headers
            "teacher_value": any(c in (f"{metrics['teacher/accuracy']:g}", f"{metrics['teacher/accuracy']:.2f}")
                                 for c in first),
            "best_value": any(c in (f"{metrics['best/accuracy']:g}", f"{metrics['best/accuracy']:.2f}") for c in first),
            **{f"{col}_column": col in runs_text for col in ("teacher/accuracy", "best/accuracy", "train/epochs")}}
        grouped_cells = [c.strip() for c in re.split(r"[\t\n]", results["grouped"])]
        report = {
            "pages": {k: str(out / f"{k}.png") for k in pages},
            "names_shown": sum(names.values()), "trials": len(names), "missing": [n for n, v in names.items() if not v],
            "parent_row": shown,
            "parent_status_shown": store["parent_status"] in cells,
            "parent_row_cells": first,
            "cut_off_cells": probe["study"]["cut"],
            "groups_shown": {s: any("Group" in c and s in c for c in grouped_cells) for s in store["strategies"]},
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
    ok = (not report["missing"] and all(report["parent_row"].values()) and report["parent_status_shown"]
          and not [c for c in report["cut_off_cells"] if c[0].startswith("study:")]
          and all(report["groups_shown"].values()))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
