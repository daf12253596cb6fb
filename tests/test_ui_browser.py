"""The MLflow UI in a real browser: `benchmarks/ui_check.py` starts `mlflow server` (sqlite, 127.0.0.1)
and headless Chromium, and checks that the study's run list shows every trial's name and status.
Opt-in (about 90 s, so the suite stays under 5 minutes): `TUNEKD_UI_CHECK=1 python -m pytest -q
tests/test_ui_browser.py`; skipped where Chromium is not installed (`apt-get install -y chromium`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.mark.skipif(os.environ.get("TUNEKD_UI_CHECK") != "1", reason="opt-in: TUNEKD_UI_CHECK=1")
@pytest.mark.skipif(not any(shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome")),
                    reason="no chromium on this machine")
def test_run_list_shows_trial_names_and_status(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "ui_check.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=900, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert report["names_shown"] == report["trials"] == 8 and not report["missing"]
    # the parent's row: its teacher and best metric; the trials' epochs column; its status not cut off; the
    # view grouped by strategy (x init) shows both strategies' groups
    assert all(report["parent_row"].values()) and report["parent_status_shown"], report["parent_row"]
    assert not [c for c in report["cut_off_cells"] if c[0].startswith("study:")], report["cut_off_cells"]
    assert report["groups_shown"] == {"forward": True, "reverse": True}
    # 8 trials ending completed, early_stopped, failed in turn: each status word appears in the list
    assert report["status_words_in_run_list"] == {"completed": 3, "early_stopped": 3, "failed": 2}
    for png in report["pages"].values():
        assert Path(png).read_bytes()[:4] == b"\x89PNG"
