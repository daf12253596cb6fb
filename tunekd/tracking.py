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
from pathlib import Path
from typing import Any

from tunekd.errors import ConfigError

STATUS_TAG = "tunekd.status"
TRIAL_TAG = "tunekd.trial_id"
PARENT_TAG = "mlflow.parentRunId"
ERROR_TAG = "tunekd.error"
NOTE_TAG = "mlflow.note.content"  # the run's description in the MLflow UI (Markdown)
# MLflow 3's UI opens an experiment on its GenAI "Overview" page unless the experiment says otherwise
KIND_TAG, KIND = "mlflow.experimentKind", "custom_model_development"
# the MLflow run status shown (as an icon) in the run list for each tunekd status: an early-stopped
# trial is not a failure, but it did not finish its epochs either
RUN_STATUS = {"completed": "FINISHED", "early_stopped": "KILLED", "failed": "FAILED", "superseded": "KILLED"}
VIEW_PREFIX = "mlflow.sharedViewState."  # an experiment tag the UI reads for `?viewStateShareKey=<key>`
NAME_COLUMN = "attributes.`Run Name`"
EPOCHS_METRIC = "train/epochs"  # a trial's epochs done, logged beside its metrics: the epoch of the list's values
GROUP_SUFFIX = "-by-strategy"  # the second saved view: the trials grouped by strategy
STORE_TAG = "tunekd.store_dir"  # experiment tag: the folder of the sqlite store the experiment was created in
STATUS_WORDS = {"completed": "completed", "early_stopped": "stopped early by the scheduler", "failed": "failed",
                "running": "running", "superseded": "superseded by a re-run"}


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


def _local_path(location: str) -> Path | None:
    if location.startswith("file://"):
        from urllib.parse import unquote, urlparse

        return Path(unquote(urlparse(location).path))
    return Path(location) if "://" not in location and os.path.isabs(location) else None


def moved_store(client, uri: str, experiment) -> str | None:
    """Whether a sqlite store's folder was copied or moved away from the experiment's artifacts: MLflow keeps
    absolute artifact paths, so anything logged through this store would land in the original folder. Returns
    a warning naming both folders, or None (not sqlite, artifacts not local, or where the store expects them).
    Known when the experiment records its store's folder (tag `tunekd.store_dir`); for older experiments, when
    the artifact folder lies outside this store's folder and a copy of it (same last two parts) inside."""
    if not uri.startswith("sqlite:///"):
        return None
    here = Path(uri[len("sqlite:///"):]).resolve().parent
    location = _local_path(experiment.artifact_location or "")
    if location is None or location.is_relative_to(here):
        return None
    origin = experiment.tags.get(STORE_TAG)
    if origin is not None:
        moved = Path(origin) != here and location.is_relative_to(origin)
    elif len(location.parts) > 3:  # e.g. /orig/mlruns/1: is there a /here/mlruns/1?
        origin, moved = str(location.parents[1]), (here / Path(*location.parts[-2:])).is_dir()
    else:
        moved = False
    if not moved:
        return None
    return (f"this MLflow store ({here}) is a copy or move of the study folder {origin}: its experiment "
            f"{experiment.name!r} stores artifacts at the absolute path {location}")


def _params_key(params: dict[str, Any]) -> tuple:
    return tuple(sorted((k, _param_value(v)[:6000]) for k, v in params.items()))


def git_commit(path: str | os.PathLike) -> str | None:
    """The commit checked out in the git repository holding `path` (a file or folder), or None."""
    import subprocess

    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    try:
        out = subprocess.run(["git", "-C", folder, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and len(commit) == 40 else None


def resolved_yaml(study) -> str:
    """The study as it ran (after --set): YAML of the validated model, defaults filled in."""
    import yaml

    return yaml.safe_dump(study.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def _note_value(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


@dataclass
class TrialRecord:
    run_id: str
    params: dict[str, Any]
    name: str = ""
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
        if exp is None:
            tags = {KIND_TAG: KIND}
            if uri.startswith("sqlite:///"):  # `moved_store` tells a copied study folder by it
                tags[STORE_TAG] = str(Path(uri[len("sqlite:///"):]).resolve().parent)
            self.experiment_id = self.client.create_experiment(experiment, tags=tags)
        else:
            moved = moved_store(self.client, uri, exp)
            if moved:
                raise ConfigError(f"{moved}; a study logged here would write into that folder: run it in the "
                                  "original folder, or as a new experiment (--set name=...)")
            self.experiment_id = exp.experiment_id
            if KIND_TAG not in exp.tags:
                self.client.set_experiment_tag(self.experiment_id, KIND_TAG, KIND)
        self.experiment = experiment
        self.parent_id: str | None = None
        self.parent_head = ""
        self.trials: dict[str, TrialRecord] = {}
        self.search_dims: list[str] = []  # the study's search dimensions: they name the trials
        self.teacher_metrics: dict[str, float] = {}
        self.parent_note = ""

    # parent -------------------------------------------------------------------------------------
    def start_parent(self, run_name: str, params: dict[str, Any], study_text: str, *, resume_id: str | None = None,
                     tags: dict[str, str] | None = None, study=None, study_file: str | None = None,
                     command: list[str] | None = None) -> str:
        """The study's parent run. `study_text`: the study file as written (artifact `study.original.yaml`
        when the resolved `study` is given, which becomes `study.yaml`, else `study.yaml`); `study_file`:
        its path (for the git commit of its repository); `command`: the command line (the description)."""
        import tunekd

        if study is not None:
            self.search_dims = list(study.search)
        if resume_id:
            self.parent_id = resume_id
            self.client.update_run(resume_id, status="RUNNING")
            self._load_children()
            return resume_id
        tags = {"tunekd.role": "study", "tunekd.version": tunekd.__version__, **(tags or {})}
        if study_file:
            commit = git_commit(study_file)
            tags["mlflow.source.name"] = os.path.abspath(study_file)
            if commit:
                tags["mlflow.source.git.commit"] = commit
        if study is not None:
            tags["tunekd.search"] = ", ".join(self.search_dims) or "–"
        self.parent_head = f"**Study `{study.name if study is not None else run_name}`** — tunekd {tunekd.__version__}"
        lines = []
        if command:
            import shlex

            lines += ["```", shlex.join(command), "```", ""]
        if study_file:
            lines.append(f"Study file: `{os.path.abspath(study_file)}`"
                         + (f" (git commit `{tags['mlflow.source.git.commit'][:12]}`)"
                            if "mlflow.source.git.commit" in tags else ""))
        if self.search_dims:
            lines.append(f"Search: {', '.join(self.search_dims)}")
        self.parent_note = "\n".join(lines)
        tags[NOTE_TAG] = "\n".join([self.parent_head, "", "Status: running", "", self.parent_note])
        tags[STATUS_TAG] = "running"
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags)
        self.parent_id = run.info.run_id
        self.log_params(self.parent_id, params)
        self.share_view()
        if study is not None:
            self.client.log_text(self.parent_id, resolved_yaml(study), "study.yaml")
            self.client.log_text(self.parent_id, study_text, "study.original.yaml")
        else:
            self.client.log_text(self.parent_id, study_text, "study.yaml")
        return self.parent_id

    def view_key(self) -> str:
        return f"tunekd-{self.parent_id}"

    def share_view(self, metrics: list[str] | None = None) -> None:
        """Two saved views of the MLflow UI's run list for this study (experiment tags `mlflow.sharedViewState.
        <key>`, opened by `ui_url`). `tunekd-<parent run id>`: the study's parent run and trials, the columns a
        researcher reads first — status (wide enough for the parent's tally), the parent's teacher and best
        metric, the eval metrics with the epoch they were measured at (`train/epochs`), the searched params —
        and every run in the charts. `tunekd-<parent run id>-by-strategy`: the same, grouped by
        `distill.strategy` (MLflow's "Group by" on params: a row per group with the mean of its runs;
        with grouped values in the charts, one colour per strategy), and by the other searched values but
        the seed (one row per cell, e.g. strategy × init, its seeds averaged)."""
        metrics = metrics or []
        status = f"tags.`{STATUS_TAG}`"
        cols = [status] + [f"metrics.`{m}`" for m in metrics[:1]]
        if metrics:  # the epoch of the trials' values, the parent row's best and teacher metric (`finish_parent`)
            short = metrics[0].split("/", 1)[-1]
            cols += [f"metrics.`{EPOCHS_METRIC}`", f"metrics.`best/{short}`", f"metrics.`teacher/{short}`"]
        cols += [f"metrics.`{m}`" for m in metrics[1:]]
        cols += [f"params.`{k}`" for k in self.search_dims]  # the rest of the name's parts are fixed
        state = {"searchFilter": f"tags.`{PARENT_TAG}` = '{self.parent_id}'",  # the UI adds the parent's row
                 "orderByKey": "attributes.start_time", "orderByAsc": True,
                 "selectedColumns": cols, "columnOrder": [NAME_COLUMN, *cols],
                 "columnWidths": {NAME_COLUMN: 300, status: 290, **{c: 150 for c in cols if c.startswith("metrics.")}},
                 "runsHiddenMode": "SHOW_ALL"}
        self.client.set_experiment_tag(self.experiment_id, VIEW_PREFIX + self.view_key(), json.dumps(state))
        if "distill.strategy" in self.search_dims:  # a cell: the strategy and the other searched values but seed
            keys = ["distill.strategy"] + [k for k in self.search_dims if k not in ("distill.strategy", "seed")]
            grouped = {**state, "groupBy": {"aggregateFunction": "average", "groupByKeys": [
                           {"mode": "param", "groupByData": k} for k in keys]},
                       "useGroupedValuesInCharts": True,  # a group's label names its values: a wider first column
                       "columnWidths": {**state["columnWidths"], NAME_COLUMN: 460}}
            self.client.set_experiment_tag(self.experiment_id, VIEW_PREFIX + self.view_key() + GROUP_SUFFIX,
                                           json.dumps(grouped))

    def log_parent_metrics(self, metrics: dict[str, float]) -> None:
        self.teacher_metrics.update({k: float(v) for k, v in metrics.items() if k.startswith("teacher/")})
        self._log_metrics(self.parent_id, metrics, step=0)

    def end_parent(self, status: str = "FINISHED", error: str | None = None) -> None:
        if self.parent_id:
            if error:
                self.client.set_tag(self.parent_id, ERROR_TAG, error[-5000:])
            self.client.set_terminated(self.parent_id, status=status)

    @contextmanager
    def parent_guard(self):
        """Wrap everything from the parent run's creation to the end of the study: a crash ends the
        parent run FAILED with the error (tag `tunekd.error`), Ctrl-C or another stop signal ends it KILLED;
        either way the exception goes on. Without it, a crash leaves the parent run RUNNING forever. Does nothing while
        no parent run exists."""
        try:
            yield self
        except KeyboardInterrupt as exc:  # Ctrl-C, or tunekd.errors.Interrupted (a stop signal, named)
            why = str(exc) or "interrupted (KeyboardInterrupt)"
            self._end_parent_after_error("KILLED", f"{why}; continue with --resume")
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
                run_id=run.info.run_id, params=dict(run.data.params), name=run.info.run_name or trial_id,
                last_step=max(steps, default=0),
                metrics=dict(run.data.metrics), status=run.data.tags.get(STATUS_TAG, "running"), active=False)

    # children -----------------------------------------------------------------------------------
    def start_trial(self, trial_id: str, params: dict[str, Any]) -> TrialRecord:
        """The trial's child run, named for what it is (`describe.trial_name`: unique within the parent)."""
        from tunekd import describe

        if trial_id in self.trials:  # a retried or resumed trial keeps its run
            rec = self.trials[trial_id]
            rec.active = True
            self.client.update_run(rec.run_id, status="RUNNING")
            return rec
        self._supersede_orphans(trial_id, params)
        name = describe.unique_name(describe.trial_name(params, self.search_dims),
                                    (r.name for r in self.trials.values()))
        rec = TrialRecord(run_id="", params=params, name=name)
        run = self.client.create_run(
            self.experiment_id, run_name=name,
            tags={PARENT_TAG: self.parent_id, TRIAL_TAG: trial_id, STATUS_TAG: "running",
                  NOTE_TAG: self.trial_note(trial_id, rec)})
        rec.run_id = run.info.run_id
        self.log_params(run.info.run_id, params)
        self.trials[trial_id] = rec
        return rec

    def trial_note(self, trial_id: str, rec: TrialRecord, error: str | None = None) -> str:
        """The child run's description: what the trial is, how it ended, its resolved map."""
        from tunekd import describe

        p = rec.params
        epochs = p.get("train.epochs")
        head = f"**{rec.name}** — {STATUS_WORDS.get(rec.status, rec.status)}"
        if rec.status != "running" and epochs is not None:
            head += f" after {rec.last_step}/{epochs} epochs"
        lines = [head, ""]
        evals = {k: v for k, v in sorted(rec.metrics.items()) if k.startswith("eval/")}
        if evals:
            lines += ["Final: " + ", ".join(f"{k} {v:.2f}" for k, v in evals.items()), ""]
        if error:
            last = [ln for ln in error.strip().splitlines() if ln.strip()]
            lines += [f"Error: `{last[-1][:300] if last else 'unknown'}`", ""]
        lines.append(f"Layer map (student layer ← teacher layer): {describe.layer_map_text(p.get('distill.layer_map'))}")
        copied = p.get("student.copied_teacher_layers")
        if copied not in (None, "null"):
            copied = json.loads(copied) if isinstance(copied, str) else copied
            lines.append("Copied teacher layers: " + ", ".join(str(i) for i in copied))
        lines.append(f"({describe.NUMBERING[0].upper()}{describe.NUMBERING[1:]}.)")
        shown = [k for k in ("distill.strategy", "student.init", "student.layers", "distill.lambda_hid", "seed",
                             "train.lr", "train.epochs") if k in p]
        shown += [k for k in self.search_dims if k in p and k not in shown]
        lines += ["", " | ".join(f"{k} = {_note_value(p[k])}" for k in shown), "",
                  f"Ray trial `{trial_id}`; parent run `{self.parent_id}`"]
        return "\n".join(lines)

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
                self.client.set_tag(rec.run_id, NOTE_TAG, self.trial_note(old_id, rec))
                self.client.set_terminated(rec.run_id, status=RUN_STATUS["superseded"])
                return

    def log_trial_metrics(self, trial_id: str, metrics: dict[str, float], step: int) -> None:
        rec = self.trials[trial_id]
        if step <= rec.last_step:
            return  # written before (a retried trial replays from its checkpoint)
        self._log_metrics(rec.run_id, {**metrics, EPOCHS_METRIC: step}, step)
        rec.last_step = step
        rec.metrics.update(metrics)

    def tag_trial(self, trial_id: str, key: str, value: str) -> None:
        """A tag on the trial's run (a value that is not a number, e.g. `tunekd.cache_source`)."""
        self.client.set_tag(self.trials[trial_id].run_id, key, value)

    def end_trial(self, trial_id: str, status: str, error: str | None = None) -> None:
        """Final status: tag `tunekd.status`, the MLflow run status (`RUN_STATUS`: an early-stopped trial
        shows as KILLED, a failed one as FAILED) and the description."""
        rec = self.trials[trial_id]
        rec.status = status
        self.client.set_tag(rec.run_id, STATUS_TAG, status)
        if error:
            self.client.set_tag(rec.run_id, ERROR_TAG, error[-5000:])
        self.client.set_tag(rec.run_id, NOTE_TAG, self.trial_note(trial_id, rec, error))
        self.client.set_terminated(rec.run_id, status=RUN_STATUS.get(status, "FINISHED"))

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for rec in self.trials.values():
            out[rec.status] = out.get(rec.status, 0) + 1
        return out

    def best(self, metric: str) -> tuple[str, TrialRecord] | None:
        """The completed trial with the highest final `metric` (e.g. `eval/accuracy`), or None."""
        done = [(tid, r) for tid, r in self.trials.items()
                if r.status == "completed" and isinstance(r.metrics.get(metric), (int, float))]
        return max(done, key=lambda item: item[1].metrics[metric]) if done else None

    def finish_parent(self, metric: str, *, wall_s: float, status: str = "FINISHED",
                      error: str | None = None) -> dict[str, Any]:
        """Close the parent run with the study's outcome: tags `tunekd.best.*` (run id, name, trial id,
        metric and value), `tunekd.trials.<status>` counts, metrics `best/<metric>`, `trials/<status>`,
        `study/wall_s`, and a description with the command line, the counts, the teacher and the best
        trial. Returns the summary as a dict."""
        counts = self.counts()
        best = self.best(metric)
        summary: dict[str, Any] = {"counts": counts, "wall_s": wall_s, "metric": metric,
                                   "teacher": dict(self.teacher_metrics)}
        tags = {f"tunekd.trials.{k}": str(v) for k, v in counts.items()}
        metrics = {f"trials/{k}": float(v) for k, v in counts.items()}
        metrics["study/wall_s"] = float(wall_s)
        if best:
            tid, rec = best
            value = rec.metrics[metric]
            summary.update(best_run_id=rec.run_id, best_name=rec.name, best_trial=tid, best_value=value)
            tags.update({"tunekd.best.run_id": rec.run_id, "tunekd.best.name": rec.name,
                         "tunekd.best.trial_id": tid, "tunekd.best.metric": metric,
                         "tunekd.best.value": f"{value:.4f}"})
            metrics[f"best/{metric.split('/', 1)[-1]}"] = float(value)
        self._log_metrics(self.parent_id, metrics, step=0)
        tally = ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) or "no trials"
        lines = [self.parent_head or f"**Study run `{self.parent_id}`**", "",
                 f"Status: {status.lower()}; wall time {wall_s:.0f} s", "", f"Trials: {tally}"]
        if self.teacher_metrics:
            lines.append("Teacher: " + ", ".join(f"{k.split('/', 1)[-1]} {v:.2f}"
                                                for k, v in self.teacher_metrics.items()))
        if best:
            lines.append(f"Best completed trial: **{rec.name}** ({metric} {value:.2f}), run `{rec.run_id}`")
        if self.parent_note:
            lines += ["", self.parent_note]
        tags[NOTE_TAG] = "\n".join(lines)
        tags[STATUS_TAG] = f"study: {tally}"  # shown in the run list's status column, on the parent's row
        for k, v in tags.items():
            self.client.set_tag(self.parent_id, k, v)
        evals = sorted({k for r in self.trials.values() for k in r.metrics if k.startswith("eval/")})
        self.share_view([metric] + [m for m in evals if m != metric])
        if error:
            self.client.set_tag(self.parent_id, ERROR_TAG, error[-5000:])
        self.client.set_terminated(self.parent_id, status=status)
        return summary

    # adaptive seeds ---------------------------------------------------------------------------------
    def log_seed_round(self, rounds: list[dict[str, Any]], pairs: list[dict[str, Any]], *, final: bool) -> None:
        """Record an adaptive-seed study's progress on the parent run: artifact `seeds/rounds.json` (every round
        run so far: its number, Ray path and trials; the pairs with their seeds, statistics and verdicts),
        tags `tunekd.seeds.rounds` (rounds run), `tunekd.seeds.state` (running / final) and, when `final`,
        `tunekd.seeds.verdicts` (counts), and metrics `seeds/rounds`, `seeds/trials` (step = round)."""
        def clean(v):
            if isinstance(v, float) and not math.isfinite(v):
                return None
            if hasattr(v, "item"):  # numpy scalars
                return clean(v.item())
            return v

        doc = {"rounds": rounds, "final": final,
               "pairs": [{k: clean(v) for k, v in p.items()} for p in pairs]}
        self.client.log_dict(self.parent_id, doc, "seeds/rounds.json")
        self.client.set_tag(self.parent_id, "tunekd.seeds.rounds", str(len(rounds)))
        self.client.set_tag(self.parent_id, "tunekd.seeds.state", "final" if final else "running")
        if final:
            tally: dict[str, int] = {}
            for p in pairs:
                tally[p["verdict"]] = tally.get(p["verdict"], 0) + 1
            self.client.set_tag(self.parent_id, "tunekd.seeds.verdicts",
                                ", ".join(f"{v} {k}" for k, v in sorted(tally.items())))
        self._log_metrics(self.parent_id, {"seeds/rounds": len(rounds),
                                           "seeds/trials": sum(len(r["trials"]) for r in rounds)}, step=len(rounds))

    def seed_rounds(self) -> list[dict[str, Any]]:
        """The rounds an adaptive-seed study recorded on the parent run (`log_seed_round`), [] when none."""
        import json
        import tempfile

        if self.client.get_run(self.parent_id).data.tags.get("tunekd.seeds.rounds") is None:
            return []
        with tempfile.TemporaryDirectory(prefix="tunekd-seeds-") as dst:
            path = self.client.download_artifacts(self.parent_id, "seeds/rounds.json", dst)
            with open(path) as f:
                return list(json.load(f).get("rounds", []))

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

    def ui_url(self, base: str = "http://127.0.0.1:5000", suffix: str = "") -> str:
        """The MLflow UI's run list of this study: the experiment's runs view (not the GenAI overview) in
        the study's saved view (`share_view`): its trials, with status, metrics and searched params;
        `suffix=GROUP_SUFFIX`: the view grouped by strategy."""
        from urllib.parse import quote

        if self.uri.startswith(("http://", "https://")):
            base = self.uri
        url = f"{base.rstrip('/')}/#/experiments/{self.experiment_id}/runs"
        return url + (f"?viewStateShareKey={quote(self.view_key() + suffix)}" if self.parent_id else "")

    def ui_command(self) -> str:
        """How to browse the study, as lines a user can paste: the `mlflow ui` command (sqlite stores), then
        the two views' links (a comment line each, so pasting the whole block into a shell is harmless)."""
        lines = [f"mlflow ui --backend-store-uri {self.uri}"] if self.uri.startswith("sqlite:///") else []
        lines.append(f"# then open: {self.ui_url()}")
        if self.parent_id and "distill.strategy" in self.search_dims:
            lines.append(f"# grouped by strategy: {self.ui_url(suffix=GROUP_SUFFIX)}")
        return "\n".join(lines)


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
    moved = moved_store(c, uri, exp) if exp else None
    if moved:
        raise ConfigError(f"{moved}; not logged to MLflow (it would be written there)")
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
