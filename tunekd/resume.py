"""A resumed study is the same study: its fingerprint, and finding what `--resume` continues.

The fingerprint of a resolved study is everything that changes its results: the resolved configuration
(every study value except where things are written and how many run at once, `OPERATIONAL`), the digest
of the task data as loaded, the digest of the teacher's base model (config and weights; the fine-tuned
teacher follows from it, the data and `teacher.finetune`) and the tunekd version. The parent run records
its digest (tag `tunekd.fingerprint`) and its parts (artifact `fingerprint.json`); `--resume` recomputes
them and refuses a changed study naming what changed, unless `--resume-force`.

`find_resumable` runs before anything is created: it reads the tracking store only if it exists, creates
no experiment, and checks that the Ray path recorded in the parent run's tag lies under the study's own
`tune.storage_path` before Tune is allowed to unpickle anything from it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunekd.errors import ConfigError

FINGERPRINT_TAG = "tunekd.fingerprint"
FINGERPRINT_FILE = "fingerprint.json"
FORCED_TAG = "tunekd.resume_forced"
RAY_PATH_TAG = "tunekd.ray_path"

# study values that change where things are written or how fast, never a trial's numbers
OPERATIONAL = ("name", "tracking.", "tune.storage_path", "tune.max_failures", "tune.max_concurrent_trials",
               "tune.reuse_actors", "tune.checkpoint_every", "tune.keep_students", "tune.ray_loggers",
               "train.save_model", "teacher.cache_dir")  # tune.seeds.max counts: a sequential design fixes it


def config_part(study) -> dict[str, Any]:
    from tunekd.study import flatten

    flat = flatten(study.model_dump(mode="json"))
    return {k: v for k, v in sorted(flat.items()) if not any(k == o or k.startswith(o) for o in OPERATIONAL)}


def data_digest(raw) -> str:
    """sha256 of the task's loaded splits (a `datasets.DatasetDict`): each split's rows as Arrow IPC bytes."""
    import pyarrow as pa

    h = hashlib.sha256()
    for name in sorted(raw):
        table = raw[name].with_format("arrow")[:]  # the selected rows (also under an indices mapping)
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        h.update(name.encode())
        h.update(sink.getvalue().to_pybytes())
    return h.hexdigest()


def fingerprint_parts(study, raw, base_model: str) -> dict[str, Any]:
    import tunekd
    from tunekd.teacher import model_digest

    return {"config": config_part(study), "data_digest": data_digest(raw), "teacher_digest": model_digest(base_model),
            "tunekd_version": tunekd.__version__}


def digest(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs between two fingerprints' parts, one short item per key: `train.epochs 4 → 6`."""
    out = []
    o_cfg, n_cfg = old.get("config", {}), new.get("config", {})
    for key in sorted(set(o_cfg) | set(n_cfg)):
        if o_cfg.get(key, "(unset)") != n_cfg.get(key, "(unset)"):
            out.append(f"{key} {_short(o_cfg.get(key, '(unset)'))} → {_short(n_cfg.get(key, '(unset)'))}")
    for key, what in (("data_digest", "the task data"), ("teacher_digest", "the teacher model"),
                      ("tunekd_version", "tunekd version")):
        if old.get(key) != new.get(key):
            out.append(f"{what} ({key} {str(old.get(key))[:12]} → {str(new.get(key))[:12]})")
    return out


def _short(v: Any) -> str:
    text = json.dumps(v) if not isinstance(v, str) else v
    return text if len(text) <= 40 else text[:37] + "..."


# --- what --resume continues -----------------------------------------------------------------------


@dataclass
class Resumable:
    parent_id: str
    ray_path: str
    parts: dict[str, Any] | None  # the recorded fingerprint's parts (None: the run has none)
    recorded: str | None  # the recorded digest


def check_under(path: str, storage_path: str) -> str:
    """`path` (from a tag) resolved, when it lies under the study's storage path (a folder, or a URI of the
    same bucket: `storage.is_under`); else a ConfigError."""
    from tunekd import storage

    if not storage.is_under(path, storage_path):
        raise ConfigError(f"--resume: the parent run's {RAY_PATH_TAG} {path!r} is not under this study's "
                          f"tune.storage_path {storage.resolve(storage_path)!r}; refusing to load Ray state from it")
    return storage.resolve(path)


def find_resumable(uri: str, experiment: str, storage_path: str, run_id: str | None = None, *,
                   adaptive: bool = False) -> Resumable:
    """The parent run `--resume` continues (the given one or the experiment's latest study run), its
    checked Ray path and recorded fingerprint. Reads only: a missing sqlite file, experiment or run, or a
    Ray state that is not there, is a ConfigError and nothing has been created. An `adaptive` study
    (`tune.seeds`) keeps one Ray folder per round beside `ray_path` and reads its state back from MLflow."""
    if uri.startswith("sqlite:///"):
        db = uri[len("sqlite:///"):]
        if not os.path.isfile(db):
            raise ConfigError(f"--resume: no tracking store {db!r}; there is no study to resume")
        _sqlite_precheck(db, experiment)
    from tunekd.tracking import client

    c = client(uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        raise ConfigError(f"--resume: experiment {experiment!r} does not exist in {uri}; there is no study to resume")
    if run_id:
        try:
            run = c.get_run(run_id)
        except Exception:
            raise ConfigError(f"--resume: no MLflow run {run_id!r}") from None
        if run.info.experiment_id != exp.experiment_id or run.data.tags.get("tunekd.role") != "study":
            raise ConfigError(f"--resume: run {run_id!r} is not a study run of experiment {experiment!r}")
    else:
        runs = c.search_runs([exp.experiment_id], "tags.`tunekd.role` = 'study'",
                             order_by=["attributes.start_time DESC"], max_results=1)
        if not runs:
            raise ConfigError(f"--resume: experiment {experiment!r} has no study run to resume")
        run = runs[0]
    tag = run.data.tags.get(RAY_PATH_TAG)
    if not tag:
        raise ConfigError(f"--resume: run {run.info.run_id} has no {RAY_PATH_TAG} tag")
    ray_path = check_under(tag, storage_path)
    from tunekd import storage

    try:
        state = adaptive or storage.exists(storage.join(ray_path, "tuner.pkl"))
    except OSError as exc:
        raise ConfigError(f"--resume: cannot read the study's Ray state {ray_path!r}: {storage.reason(exc)}") from None
    if not state:
        raise ConfigError(f"--resume: the study's Ray state {ray_path!r} is missing; cannot resume")
    parts = None
    recorded = run.data.tags.get(FINGERPRINT_TAG)
    if recorded:
        quiet = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
        os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"  # no progress bar on stderr for one file
        with tempfile.TemporaryDirectory(prefix="tunekd-fp-") as tmp:
            try:
                local = c.download_artifacts(run.info.run_id, FINGERPRINT_FILE, tmp)
                parts = json.loads(Path(local).read_text())
            except Exception:  # noqa: BLE001 - reported as "no fingerprint" by `compare`
                parts = None
            finally:
                if quiet is None:
                    del os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"]
                else:
                    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = quiet
    return Resumable(run.info.run_id, ray_path, parts, recorded)


def _sqlite_precheck(db: str, experiment: str) -> None:
    """A sqlite store read directly, read-only, to refuse in a fraction of a second what has nothing to
    resume (opening it through MLflow checks its schema: seconds). Unknown layouts are left to MLflow."""
    import sqlite3

    try:
        con = sqlite3.connect(f"{Path(db).resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error:
        return
    try:
        exp = con.execute("SELECT experiment_id FROM experiments WHERE name = ? AND lifecycle_stage = 'active'",
                          (experiment,)).fetchone()
        if exp is None:
            raise ConfigError(f"--resume: experiment {experiment!r} does not exist in sqlite:///{db}; there is no "
                              "study to resume")
        run = con.execute("SELECT 1 FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid WHERE r.experiment_id = ? "
                          "AND r.lifecycle_stage = 'active' AND t.key = 'tunekd.role' AND t.value = 'study' LIMIT 1",
                          (exp[0],)).fetchone()
        if run is None:
            raise ConfigError(f"--resume: experiment {experiment!r} has no study run to resume")
    except sqlite3.Error:
        return
    finally:
        con.close()


def compare(found: Resumable, parts: dict[str, Any], *, force: bool) -> str | None:
    """None when the study is the recorded one; else the one-line description of the change, which is a
    ConfigError unless `force`."""
    if found.parts is not None and found.recorded == digest(parts):
        return None
    if found.parts is None:
        what = f"run {found.parent_id} recorded no study fingerprint"
    else:
        what = "the study changed: " + "; ".join(changes(found.parts, parts) or ["(fingerprint differs)"])
    if not force:
        raise ConfigError(f"--resume: {what}; run it as a new study, or continue anyway with --resume-force")
    return what
