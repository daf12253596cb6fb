"""MLflow: one parent run per invocation, one nested child run per trial.

All writes go through `MlflowClient` from the driver, so a sqlite store has one writer and a trial
needs no route to the tracking server. Steps already written for a run are never written again.
"""

from __future__ import annotations

import json
import math
import os
import time
import traceback
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from tunekd.errors import ConfigError

STATUS_TAG = "tunekd.status"
TRIAL_TAG = "tunekd.trial_id"
PARENT_TAG = "mlflow.parentRunId"
ERROR_TAG = "tunekd.error"


def _param_value(v: Any) -> str:
    if isinstance(v, (list, tuple, dict)) or v is None:
        return json.dumps(v)
    return str(v)


def check_uri(uri: str) -> None:
    """Fail fast, before anything runs, when a tracking server cannot be reached."""
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as resp:
                resp.read()
        except (urllib.error.URLError, OSError) as exc:
            raise ConfigError(f"tracking URI {uri!r} is unreachable ({exc}); start the server or use sqlite:///mlflow.db")
    elif uri.startswith("sqlite:///"):
        folder = os.path.dirname(os.path.abspath(uri[len("sqlite:///"):]))
        if not os.path.isdir(folder):
            raise ConfigError(f"tracking URI {uri!r}: folder {folder!r} does not exist")
    elif "://" not in uri or uri.startswith("file:"):
        raise ConfigError(f"tracking URI {uri!r}: use sqlite:///path.db or an http(s) MLflow server "
                          "(mlflow 3 refuses the file store)")


def _params_key(params: dict[str, Any]) -> tuple:
    return tuple(sorted((k, _param_value(v)[:6000]) for k, v in params.items()))


@dataclass
class TrialRecord:
    run_id: str
    params: dict[str, Any]
    last_step: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    status: str = "running"
    active: bool = True  # started in this driver session (False: loaded from MLflow on --resume)


class StudyTracker:
    def __init__(self, uri: str, experiment: str):
        check_uri(uri)
        import mlflow
        from mlflow.tracking import MlflowClient

        mlflow.set_tracking_uri(uri)
        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        exp = self.client.get_experiment_by_name(experiment)
        self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(experiment)
        self.experiment = experiment
        self.parent_id: str | None = None
        self.trials: dict[str, TrialRecord] = {}

    # parent -------------------------------------------------------------------------------------
    def start_parent(self, run_name: str, params: dict[str, Any], study_text: str, *, resume_id: str | None = None,
                     tags: dict[str, str] | None = None) -> str:
        if resume_id:
            self.parent_id = resume_id
            self.client.update_run(resume_id, status="RUNNING")
            self._load_children()
            return resume_id
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags={"tunekd.role": "study", **(tags or {})})
        self.parent_id = run.info.run_id
        self.log_params(self.parent_id, params)
        self.client.log_text(self.parent_id, study_text, "study.yaml")
        return self.parent_id

    def log_parent_metrics(self, metrics: dict[str, float]) -> None:
        self._log_metrics(self.parent_id, metrics, step=0)

    def end_parent(self, status: str = "FINISHED", error: str | None = None) -> None:
        if self.parent_id:
            if error:
                self.client.set_tag(self.parent_id, ERROR_TAG, error[-5000:])
            self.client.set_terminated(self.parent_id, status=status)

    @contextmanager
    def parent_guard(self):
        """Wrap everything from the parent run's creation to the end of the study: a crash ends the
        parent run FAILED with the error (tag `tunekd.error`), Ctrl-C ends it KILLED; either way the
        exception goes on. Without it, a crash leaves the parent run RUNNING forever. Does nothing while
        no parent run exists."""
        try:
            yield self
        except KeyboardInterrupt:
            self._end_parent_after_error("KILLED", "interrupted (KeyboardInterrupt); continue with --resume")
            raise
        except BaseException as exc:
            text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            self._end_parent_after_error("FAILED", text)
            raise

    def _end_parent_after_error(self, status: str, error: str) -> None:
        try:
            self.end_parent(status, error=error)
        except Exception:  # noqa: BLE001 - the store may be what failed; the original error matters more
            pass

    def _load_children(self) -> None:
        runs = self.client.search_runs([self.experiment_id], f"tags.`{PARENT_TAG}` = '{self.parent_id}'",
                                       max_results=10_000)
        for run in runs:
            trial_id = run.data.tags.get(TRIAL_TAG)
            if not trial_id:
                continue
            steps = [m.step for key in run.data.metrics for m in self.client.get_metric_history(run.info.run_id, key)]
            self.trials[trial_id] = TrialRecord(
                run_id=run.info.run_id, params=dict(run.data.params), last_step=max(steps, default=0),
                metrics=dict(run.data.metrics), status=run.data.tags.get(STATUS_TAG, "running"), active=False)

    # children -----------------------------------------------------------------------------------
    def start_trial(self, trial_id: str, params: dict[str, Any]) -> TrialRecord:
        if trial_id in self.trials:  # a retried or resumed trial keeps its run
            rec = self.trials[trial_id]
            rec.active = True
            self.client.update_run(rec.run_id, status="RUNNING")
            return rec
        self._supersede_orphans(trial_id, params)
        run = self.client.create_run(
            self.experiment_id, run_name=trial_id,
            tags={PARENT_TAG: self.parent_id, TRIAL_TAG: trial_id, STATUS_TAG: "running"})
        self.log_params(run.info.run_id, params)
        rec = TrialRecord(run_id=run.info.run_id, params=params)
        self.trials[trial_id] = rec
        return rec

    def _supersede_orphans(self, trial_id: str, params: dict[str, Any]) -> None:
        """A driver killed before Tune saved its state loses trials it had started; on --resume Tune starts
        them again under new ids, from scratch. Their old runs are kept, tagged `superseded` and pointing to
        the new trial, so that nothing is lost and no run holds two attempts' metrics."""
        key = _params_key(params)
        for old_id, rec in self.trials.items():
            if not rec.active and rec.status == "running" and _params_key(rec.params) == key:
                rec.status = "superseded"
                self.client.set_tag(rec.run_id, STATUS_TAG, "superseded")
                self.client.set_tag(rec.run_id, "tunekd.superseded_by", trial_id)
                self.client.set_terminated(rec.run_id, status="KILLED")
                return

    def log_trial_metrics(self, trial_id: str, metrics: dict[str, float], step: int) -> None:
        rec = self.trials[trial_id]
        if step <= rec.last_step:
            return  # written before (a retried trial replays from its checkpoint)
        self._log_metrics(rec.run_id, metrics, step)
        rec.last_step = step
        rec.metrics.update(metrics)

    def end_trial(self, trial_id: str, status: str, error: str | None = None) -> None:
        rec = self.trials[trial_id]
        rec.status = status
        self.client.set_tag(rec.run_id, STATUS_TAG, status)
        if error:
            self.client.set_tag(rec.run_id, ERROR_TAG, error[-5000:])
        self.client.set_terminated(rec.run_id, status="FAILED" if status == "failed" else "FINISHED")

    # helpers ------------------------------------------------------------------------------------
    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, _param_value(v)[:6000]) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i:i + 100])

    def _log_metrics(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and math.isfinite(float(v))]
        if items:
            self.client.log_batch(run_id, metrics=items)

    def log_artifact(self, run_id: str, path: str, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, path, artifact_path)

    def log_artifacts(self, run_id: str, folder: str, artifact_path: str | None = None) -> None:
        """Every file under `folder` as artifacts of `run_id` (under `artifact_path`)."""
        self.client.log_artifacts(run_id, folder, artifact_path)

    def ui_command(self) -> str:
        if self.uri.startswith("sqlite:///"):
            return f"mlflow ui --backend-store-uri {self.uri}"
        return f"open {self.uri} (experiment {self.experiment!r})"


# --- single runs and artifacts (the analysis CLIs go through these, not through mlflow) -------------


def client(uri: str):
    """An `MlflowClient` for `uri`, after `check_uri`."""
    check_uri(uri)
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def download_artifacts(uri: str, run_id: str, artifact_path: str, dst: str) -> str:
    """Run `run_id`'s artifact `artifact_path` downloaded under `dst`; returns its local path."""
    import mlflow.artifacts

    return mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path, dst_path=dst,
                                               tracking_uri=uri)


def log_single_run(uri: str, experiment: str, run_name: str, *, tags: dict[str, str], params: dict[str, str],
                   metrics: dict[str, float], files: list[str] = ()) -> str:
    """One finished run (created in `experiment` if needed) with its params, step-0 metrics and files as
    artifacts; returns its id."""
    from mlflow.entities import Metric, Param

    c = client(uri)
    exp = c.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else c.create_experiment(experiment)
    run = c.create_run(exp_id, run_name=run_name, tags=tags)
    rid = run.info.run_id
    now = int(time.time() * 1000)
    c.log_batch(rid, params=[Param(k, v) for k, v in params.items()],
                metrics=[Metric(k, v, now, 0) for k, v in metrics.items()])
    for f in files:
        c.log_artifact(rid, f)
    c.set_terminated(rid)
    return rid
