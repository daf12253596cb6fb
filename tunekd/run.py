"""`python -m tunekd.run STUDY.yaml`: run a KD study on Ray Tune and record it in MLflow.

1. load and validate the study (and every trial config it can produce) before anything starts;
2. connect to Ray: a local one on 127.0.0.1, or `--address` / RAY_ADDRESS;
3. prepare once on the driver: task data (tokenized), the fine-tuned teacher, its metric;
4. MLflow parent run; Tune runs the trials (ASHA or FIFO; grid, random or Optuna);
5. a summary table and the `mlflow ui` command.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from datetime import datetime
from pathlib import Path

from tunekd.errors import ConfigError, run_cli



def log(msg: str) -> None:
    from tunekd.progress import write  # issue 13: above any progress bar

    write(f"[tunekd] {msg}")


def _epilog() -> str:  # issue 13: examples and output locations
    from tunekd.describe import OUTPUTS_HELP

    return ("examples:\n"
            "  tunekd run search_spaces/quickstart.yaml\n"
            "  tunekd run STUDY.yaml --set train.epochs=2 --set search.distill.lambda_hid.grid=[0,1,3]\n"
            "  tunekd run STUDY.yaml --dry-run        # every trial: name, layer map, epochs; where it writes\n"
            "  tunekd run STUDY.yaml --resume\n\n" + OUTPUTS_HELP)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m tunekd.run",
        description="Run a knowledge-distillation study (a YAML study file) on Ray Tune; every trial is "
                    "recorded as a nested MLflow run.",
        epilog=_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study", help="the study file, e.g. search_spaces/quickstart.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value (dotted key, YAML value), e.g. --set train.epochs=2 "
                        "--set task.data_dir=../shared/data/sst2 --set search.distill.strategy.grid=[forward]; "
                        "repeatable")
    p.add_argument("--address", default=None,
                   help="attach to a running Ray cluster (default: $RAY_ADDRESS; unset: a local Ray on 127.0.0.1)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: the study's tracking.uri, sqlite:///mlflow.db)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs for a local Ray (default: all)")
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="PARENT_RUN_ID",
                   help="continue an interrupted study (default: the experiment's latest parent run): finished "
                        "trials are not run again, unfinished ones resume from their checkpoints, the same "
                        "MLflow parent run is used")
    p.add_argument("--dry-run", action="store_true",
                   help="validate the study and every trial config it can produce, print the trials, and stop")
    return p.parse_args(argv)


# --- validation of every trial before anything runs --------------------------------------------


def trial_points(study, limit: int = 10_000):
    """Every combination of the grid/choice values and the bounds of the continuous dimensions."""
    names = list(study.search)
    values = [study.search[n].sample_points() for n in names]
    for combo in itertools.islice(itertools.product(*values), limit):
        yield dict(zip(names, combo))


def preflight(study, teacher_config, family) -> int:
    """Resolve every trial the study can produce; a bad combination is a ConfigError now, not later."""
    from tunekd import plan

    t_layers = family.num_layers(teacher_config)
    t_width = family.hidden_size(teacher_config)
    n = 0
    for point in trial_points(study):
        trial = study.trial(point)
        try:
            plan.resolve(trial, t_layers, family.match_embeddings_default)
        except ConfigError as exc:
            where = ", ".join(f"{k}={v!r}" for k, v in point.items())
            raise ConfigError(f"{exc}" + (f" (trial {where})" if where else "")) from None
        width = trial.student.hidden_size or t_width
        if trial.student.init == "copy" and width != t_width:
            raise ConfigError(f"student.init 'copy' needs the teacher's width: student.hidden_size {width} != "
                              f"teacher {t_width}; use student.init 'random' for a narrower student")
        n += 1
    return n


def param_space(study):
    from ray import tune

    space = {}
    for name, dim in study.search.items():
        v = dim.value
        space[name] = {
            "grid": lambda: tune.grid_search(list(v)),
            "choice": lambda: tune.choice(list(v)),
            "uniform": lambda: tune.uniform(*v),
            "loguniform": lambda: tune.loguniform(*v),
            "randint": lambda: tune.randint(v[0], v[1] + 1),  # [low, high] inclusive
        }[dim.kind]()
    return space


def tune_config(study, metric: str):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if study.tune.scheduler == "asha":
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=max_epochs(study),
                                  grace_period=study.tune.asha.grace_period,
                                  reduction_factor=study.tune.asha.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    search_alg = None
    if study.tune.searcher == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(seed=study.seed)
    return tune.TuneConfig(metric=metric, mode="max", scheduler=scheduler, search_alg=search_alg,
                           num_samples=study.tune.num_samples, max_concurrent_trials=study.tune.max_concurrent_trials,
                           reuse_actors=study.tune.reuse_actors)


def max_epochs(study) -> int:
    dim = study.search.get("train.epochs")
    return int(max(dim.sample_points())) if dim else study.train.epochs


# --- Ray ---------------------------------------------------------------------------------------


def connect_ray(address: str | None, num_cpus: int | None):
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    import ray

    source = "--address"  # issue 13: say where the address came from
    if address is None and os.environ.get("RAY_ADDRESS"):
        address, source = os.environ["RAY_ADDRESS"], "RAY_ADDRESS"
    try:
        if address:
            check_address(address, source)
            ray.init(address=address, log_to_driver=True, configure_logging=False)
            log(f"ray: attached to the cluster at {address}")
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                     configure_logging=False, log_to_driver=True)
            log(f"ray: started locally on 127.0.0.1 with {int(ray.cluster_resources().get('CPU', 0))} CPUs")
    except ConfigError:
        raise
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ConfigError(f"cannot reach the Ray cluster at {address!r} (from {source}): "
                          f"{str(exc).splitlines()[0]}") from None
    return ray


def check_address(address: str, source: str = "--address") -> None:
    """A TCP connect to host:port with a short timeout, so that a wrong address fails in seconds."""
    import socket

    if address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"Ray address {address!r} (from {source}) is not host:port (or ray://host:port, auto)")
    try:
        with socket.create_connection((host, int(port)), timeout=5):
            pass
    except OSError as exc:
        raise ConfigError(f"cannot reach the Ray cluster at {address!r} (from {source}): {exc}") from None


def check_resources(ray, study) -> None:
    res = ray.cluster_resources()
    gpu = study.tune.resources.gpu
    if gpu > 0 and res.get("GPU", 0) < gpu:
        raise ConfigError(f"tune.resources.gpu is {gpu} but the Ray cluster has {res.get('GPU', 0):g} GPUs")
    cpu = study.tune.resources.cpu
    if res.get("CPU", 0) < cpu:
        raise ConfigError(f"tune.resources.cpu is {cpu:g} but the Ray cluster has {res.get('CPU', 0):g} CPUs")


class StudyContext:
    """What the driver-side MLflow callback needs; kept out of the callback so that Tune can pickle the
    callback into its experiment state and a resumed study gets a live context."""

    tracker = None
    study = None
    teacher_layers = 0
    teacher_config = None
    teacher_path = None
    family = None
    total = 0
    started: dict = {}
    progress = None  # issue 13: tunekd.progress.StudyProgress


def _trial_callback_class():
    from ray import tune

    from tunekd import plan

    class MlflowCallback(tune.Callback):
        """Driver-side MLflow logging: the child run of each trial, its metrics and its final status."""

        def _label(self, trial):
            bits = [f"{k.split('.')[-1]}={v}" for k, v in trial.config.items()]
            return f"{trial.trial_id} ({', '.join(bits)})"

        def on_trial_start(self, iteration, trials, trial, **info):
            ctx = StudyContext
            t_study = ctx.study.trial(trial.config)
            p = plan.resolve(t_study, ctx.teacher_layers, ctx.family.match_embeddings_default)
            rec = ctx.tracker.start_trial(trial.trial_id, p.params(t_study))
            ctx.started[trial.trial_id] = True
            if ctx.progress is not None:  # issue 13
                ctx.progress.started(trial.trial_id)
            log(f"trial {len(ctx.started)}/{ctx.total} started: {rec.name} ({trial.trial_id})")  # issue 13: name

        on_trial_restore = on_trial_start

        def on_trial_recover(self, iteration, trials, trial, **info):
            log(f"  {trial.trial_id} failed and will be retried from its last checkpoint")

        def on_trial_result(self, iteration, trials, trial, result, **info):
            metrics = {k: v for k, v in result.items() if k.startswith(("eval/", "train/", "perf/"))}
            step = int(result.get("epoch", result.get("training_iteration", 0)))
            StudyContext.tracker.log_trial_metrics(trial.trial_id, metrics, step)
            shown = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k.startswith("eval/") or k == "train/loss")
            log(f"  {trial.trial_id} epoch {step}: {shown}")

        def on_trial_complete(self, iteration, trials, trial, **info):
            status, last, epochs = finished_status(trial.config, trial.last_result)
            if StudyContext.study.trial(trial.config).train.save_model and trial.checkpoint is not None:
                save_trained_student(trial)
            StudyContext.tracker.end_trial(trial.trial_id, status)
            if StudyContext.progress is not None:  # issue 13
                StudyContext.progress.ended(trial.trial_id, status)
            log(f"  {StudyContext.tracker.trials[trial.trial_id].name} {status} after {last}/{epochs} epochs")

        def on_trial_error(self, iteration, trials, trial, **info):
            if trial.trial_id not in StudyContext.tracker.trials:  # its actor died before it started (e.g. OOM)
                self.on_trial_start(iteration, trials, trial)
            text = trial_error_text(trial)
            StudyContext.tracker.end_trial(trial.trial_id, "failed", error=text)
            if StudyContext.progress is not None:  # issue 13
                StudyContext.progress.ended(trial.trial_id, "failed")
            lines = [ln for ln in text.strip().splitlines() if ln.strip()]
            log(f"  {trial.trial_id} failed: {lines[-1] if lines else text}")

    return MlflowCallback


def save_trained_student(trial) -> None:
    """The trial's last checkpoint → a `transformers` folder → MLflow artifact `student/` of its child run."""
    import tempfile

    from safetensors.torch import load_file

    from tunekd import plan
    from tunekd.students import export_student
    from tunekd.tasks import get_task

    ctx = StudyContext
    t_study = ctx.study.trial(trial.config)
    p = plan.resolve(t_study, ctx.teacher_layers, ctx.family.match_embeddings_default)
    with trial.checkpoint.as_directory() as folder:
        tensors = load_file(str(Path(folder) / "model.safetensors"))
    state = {k[len("student."):]: v for k, v in tensors.items() if k.startswith("student.")}
    with tempfile.TemporaryDirectory(prefix="tunekd-student-") as out:
        export_student(state, ctx.teacher_config, ctx.family, get_task(t_study.task.name), t_study.student, out,
                       copied_layers=p.copied_layers, tokenizer_dir=ctx.teacher_path)
        rec = ctx.tracker.trials[trial.trial_id]
        ctx.tracker.client.log_artifacts(rec.run_id, out, "student")


def trial_error_text(trial) -> str:
    """The trial's error trace: the local error file Tune has just written, else its copy in storage."""
    path = trial.error_file
    if path and os.path.isfile(path):
        return Path(path).read_text()
    err = trial.get_error()
    return str(err) if err is not None else "unknown error"


def finished_status(config, last_result) -> tuple[str, int, int]:
    epochs = StudyContext.study.trial(config).train.epochs
    last = int((last_result or {}).get("epoch", 0))
    return ("completed" if last >= epochs else "early_stopped"), last, epochs


# --- the study ---------------------------------------------------------------------------------


def prepare(study):
    """Task data, tokenizer, family and teacher config: everything that can fail on bad input, cheaply."""
    from transformers import AutoConfig, AutoTokenizer

    from tunekd.models import family_for
    from tunekd.tasks import get_task, load_task
    from tunekd.teacher import resolve_model

    spec = get_task(study.task.name)
    base = resolve_model(study.teacher.model)
    try:
        config = AutoConfig.from_pretrained(base, trust_remote_code=study.teacher.trust_remote_code)
    except OSError as exc:
        raise ConfigError(f"teacher.model {study.teacher.model!r} cannot be loaded: {str(exc).splitlines()[0]}") from None
    family = family_for(config)
    if spec.kind not in family.task_kinds:
        raise ConfigError(f"task {spec.name!r} ({spec.kind}) cannot be run by the {family.name} family "
                          f"(it runs: {', '.join(family.task_kinds)})")
    source = study.task.data_dir or ("the hub" if spec.hub else "the built-in generator")
    log(f"task {spec.name}: loading from {source}")
    raw = load_task(spec.name, study.task.data_dir, max_train_samples=study.task.max_train_samples,
                    max_eval_samples=study.task.max_eval_samples, seed=study.seed,
                    synthetic=study.task.synthetic.model_dump())
    tokenizer = AutoTokenizer.from_pretrained(base, trust_remote_code=study.teacher.trust_remote_code)
    return spec, base, config, family, raw, tokenizer


def summarize(tracker, metric: str) -> str:
    import pandas as pd

    rows = []
    for trial_id, rec in tracker.trials.items():
        row = {"trial": rec.name or trial_id}  # issue 13: the run name
        for key in ("distill.strategy", "student.init", "student.layers", "distill.lambda_hid", "train.lr", "seed"):
            row[key.split(".")[-1]] = rec.params.get(key)
        for k, v in sorted(rec.metrics.items()):
            if k.startswith("eval/"):
                row[k] = round(v, 2)
        row["epochs"] = rec.last_step
        row["status"] = rec.status
        rows.append(row)
    if not rows:
        return "(no trials)"
    df = pd.DataFrame(rows)
    if f"eval/{metric}" in df:
        df = df.sort_values(f"eval/{metric}", ascending=False)
    return df.to_string(index=False)


def quiet_libraries() -> None:
    """Keep the output readable: no per-load weight reports or progress bars from transformers/datasets."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import datasets
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()


def run(args) -> int:
    from tunekd.study import grid_size, load_study

    t_start = time.perf_counter()
    study = load_study(args.study, args.overrides)
    if args.tracking_uri:
        study = study.model_copy(update={"tracking": study.tracking.model_copy(update={"uri": args.tracking_uri})})
    log(f"study {study.name!r}: {len(study.search)} search dimensions, grid of {grid_size(study)} x "
        f"{study.tune.num_samples} samples; scheduler {study.tune.scheduler}, searcher {study.tune.searcher}")

    from tunekd.tracking import check_uri

    check_uri(study.tracking.uri)
    quiet_libraries()
    spec, base, config, family, raw, tokenizer = prepare(study)
    n_points = preflight(study, config, family)
    log(f"validated {n_points} trial configurations against the teacher ({family.name}, "
        f"{family.num_layers(config)} layers, width {family.hidden_size(config)})")
    if args.dry_run:  # issue 13: names, resolved maps, epochs, output locations
        from tunekd import plan
        from tunekd.describe import dry_run_lines

        t_layers, emb = family.num_layers(config), family.match_embeddings_default
        trials = ((pt, study.trial(pt), plan.resolve(study.trial(pt), t_layers, emb)) for pt in trial_points(study))
        print("\n".join(dry_run_lines(study, trials)))
        return 0

    ray = connect_ray(args.address, args.num_cpus)
    try:
        check_resources(ray, study)
        return _run_study(study, args, spec, base, config, family, raw, tokenizer, t_start)
    finally:
        ray.shutdown()


def _run_study(study, args, spec, base, config, family, raw, tokenizer, t_start) -> int:
    from ray import tune

    from tunekd.data import encode_splits
    from tunekd.study import grid_size
    from tunekd.teacher import prepare_teacher
    from tunekd.tracking import StudyTracker
    from tunekd.trainable import make_shared, tune_trainable

    encoded = encode_splits(raw, tokenizer, spec, study.task.max_length, family=family)
    log("data: " + ", ".join(f"{k} {len(v)} rows" for k, v in encoded.items()) + f" (max length {study.task.max_length})")
    from tunekd.data import padding_report

    pad = padding_report(encoded["train"], study.train.batch_size, seed=study.seed)
    log(f"data: padding fraction of a training epoch: {pad['random']:.1%} with shuffled batches, "
        f"{pad['bucketed']:.1%} with length buckets ({'on' if study.train.bucket_by_length else 'off'})")
    info = prepare_teacher(study, family, spec, encoded, base, tokenizer, log=log)
    log("teacher: " + ", ".join(f"{k}={v:.2f}" for k, v in info.metrics.items()))
    from tunekd.teacher import check_teacher

    sanity_tags = check_teacher(study, spec, encoded, info.metrics, log=log)  # issue 13
    teacher_model = family.load(info.path, spec, trust_remote_code=study.teacher.trust_remote_code)
    from tunekd import cache as tcache

    cache_info = tcache.for_study(study, family, teacher_model, encoded, trial_points(study), log=log)
    shared = make_shared(study, family.name, teacher_model, encoded, cache_info, ship_cache=bool(args.address))
    t_layers = family.num_layers(teacher_model.config)
    teacher_config = teacher_model.config
    del teacher_model

    metric = f"eval/{spec.primary_metric}"
    tracker = StudyTracker(study.tracking.uri, study.experiment)
    storage = Path(study.tune.storage_path).expanduser().resolve()
    if args.resume:
        parent, ray_path = tracker.resumable_parent(None if args.resume == "latest" else args.resume)
        if not (Path(ray_path) / "tuner.pkl").is_file():
            raise ConfigError(f"--resume: the study's Ray state {ray_path!r} is missing; cannot resume")
        tracker.start_parent("", {}, "", resume_id=parent, study=study)
        log(f"mlflow: resuming parent run {parent} ({len(tracker.trials)} trials recorded) from {ray_path}")
    else:
        run_name = f"{study.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
        ray_path = str(storage / run_name)
        parent = tracker.start_parent(run_name, {
            "study_file": str(Path(args.study).resolve()), "overrides": args.overrides, "teacher.path": info.path,
            "teacher.cached": info.cached, "task.train_rows": len(encoded["train"]),
            "teacher.cache_mode": cache_info.mode, "teacher.cache_reason": cache_info.reason,
            "data.padding_random": round(pad["random"], 4), "data.padding_bucketed": round(pad["bucketed"], 4),
        }, Path(args.study).read_text(), tags={"tunekd.ray_path": ray_path, **sanity_tags},
            study=study, study_file=args.study, command=_command_line())  # issue 13
        tracker.log_parent_metrics({f"teacher/{k}": v for k, v in info.metrics.items()})
        log(f"mlflow: experiment {study.experiment!r}, parent run {parent}")

    StudyContext.tracker, StudyContext.study, StudyContext.family = tracker, study, family
    StudyContext.teacher_layers = t_layers
    StudyContext.teacher_config, StudyContext.teacher_path = teacher_config, info.path
    StudyContext.total = grid_size(study) * study.tune.num_samples
    StudyContext.started = {}
    from tunekd.progress import StudyProgress

    StudyContext.progress = StudyProgress(StudyContext.total, study.name)  # issue 13
    trainable = tune.with_resources(tune.with_parameters(tune_trainable, shared=shared),
                                    {"cpu": study.tune.resources.cpu, "gpu": study.tune.resources.gpu})
    if args.resume:
        tuner = tune.Tuner.restore(ray_path, trainable, resume_unfinished=True, resume_errored=False,
                                   restart_errored=False)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(study),
            tune_config=tune_config(study, metric),
            run_config=tune.RunConfig(
                name=Path(ray_path).name, storage_path=str(storage), verbose=0,
                callbacks=[_trial_callback_class()()],
                checkpoint_config=tune.CheckpointConfig(
                    num_to_keep=study.tune.checkpoint_keep, checkpoint_score_attribute=metric,
                    checkpoint_score_order="max"),
                failure_config=tune.FailureConfig(max_failures=study.tune.max_failures)),
        )
    status = "FAILED"
    try:
        results = tuner.fit()
        status = "FINISHED"
    finally:
        StudyContext.progress.close()
        tracker.end_parent(status)
    for result in results:  # trials that ended while no driver was listening (a killed driver)
        trial_id = (result.metrics or {}).get("trial_id")
        rec = tracker.trials.get(trial_id)
        if rec is not None and rec.status == "running":
            if result.error is not None:
                tracker.end_trial(trial_id, "failed", error=str(result.error))
            else:
                tracker.end_trial(trial_id, finished_status(result.config, result.metrics)[0])
    counts = {s: sum(1 for r in tracker.trials.values() if r.status == s)
              for s in ("completed", "early_stopped", "failed")}
    summary = tracker.finish_parent(metric, wall_s=time.perf_counter() - t_start)  # issue 13
    print()
    print(summarize(tracker, spec.primary_metric))
    print()
    log(f"teacher {metric}: {info.metrics.get(spec.primary_metric, float('nan')):.2f}; trials: "
        + ", ".join(f"{v} {k}" for k, v in counts.items()) + f"; wall time {time.perf_counter() - t_start:.0f} s")
    if "best_name" in summary:
        log(f"best completed trial: {summary['best_name']} ({metric} {summary['best_value']:.2f}), "
            f"run {summary['best_run_id']}")
    log(f"browse it: {tracker.ui_command()}")
    return 0


def _command_line() -> list[str]:
    """The command as typed: `python -m tunekd.run ...` or `tunekd run ...`."""
    prog = Path(sys.argv[0]).name
    head = ["python", "-m", "tunekd.run"] if prog.endswith(".py") else [prog]
    return head + sys.argv[1:]


def main(argv=None) -> int:
    return run_cli(run, parse_args(argv))


if __name__ == "__main__":
    # Run as the importable module `tunekd.run`, not as `__main__`: Tune pickles the MLflow callback into
    # its experiment state, and the callback must find the live StudyContext by reference on --resume.
    from tunekd.run import main as _main

    sys.exit(_main())
