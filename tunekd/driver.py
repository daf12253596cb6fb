"""The study driver: one study, top to bottom, as named steps that keep their results on one object.

    driver = StudyDriver(study, RunOptions(study_file="search_spaces/quickstart.yaml"))
    driver.run()

`run` is the whole study (each step reads what the earlier ones left on `self`):

    find_resume     --resume only: the parent run and its Ray state (checked under storage_path); reads only
    setup_task      task data, tokenizer, model family and teacher config (cheap; fails on bad input)
    preflight       resolve and check every trial config the study can produce (`plan.Trials`)
    check_resume    --resume only: this study's fingerprint against the parent run's (refused if changed)
    describe        --dry-run only: the trials, where the study would write, the loss settings; then stop
    connect         a local Ray on 127.0.0.1, or attach to --address
    setup_data      tokenize the task once
    setup_teacher   load the teacher or fine-tune it once (cached by content hash)
    setup_cache     the teacher-output cache for every trial; the `Shared` data the trials receive
    guard           from here to the end of fit: a crash ends the parent run FAILED, a stop signal KILLED
    setup_tracking  the MLflow parent run (or the one --resume continues)
    setup_tuner     tune.Tuner (or Tuner.restore) with `TrialCallback`, which holds this driver
    fit             run the trials; prune checkpoints; settle trials no driver saw finish; close the parent run
    run_rounds      instead of setup_tuner + fit when the study has `tune.seeds`: one setup_tuner + fit per
                    round of adaptive seeds (`tunekd.seeds`), until every pair's verdict is decided
    summarise       the table of trials and the closing lines
    disconnect      shut down the Ray that `connect` started or attached (not one it found running)

The benchmarks drive the same steps (`benchmarks/study.py`) with `RunOptions(track=False)`.
"""

from __future__ import annotations

import os
import signal
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from tunekd import groups, plan
from tunekd.errors import SIGNAL_NAMES, ConfigError, Interrupted
from tunekd.study import Study, grid_size, max_epochs


CACHE_SOURCE_TAG = "tunekd.cache_source"  # a trial run's teacher cache: local, storage, object store, online

# the stop signal this process received (`StudyDriver.stop_signals`), for the Tune callbacks, which Tune
# pickles and so cannot hold the driver: a trial whose worker the signal ended is not failed but unfinished
STOPPING: list[int] = []


def log(msg: str) -> None:
    from tunekd.progress import write  # above any progress bar

    write(f"[tunekd] {msg}")


@dataclass
class RunOptions:
    """How to run a study (the CLI's options other than the study itself)."""

    study_file: str | None = None  # recorded in MLflow (path and text)
    overrides: list[str] = field(default_factory=list)
    address: str | None = None  # attach to this Ray cluster; None: start a local one
    address_source: str = "--address"  # where the address came from (--address or RAY_ADDRESS), for errors
    num_cpus: int | None = None  # CPUs of a local Ray (None: all)
    resume: str | None = None  # "latest" or a parent run id
    resume_force: bool = False  # --resume even when the study's fingerprint changed (the change is recorded)
    dry_run: bool = False
    track: bool = True  # False: no MLflow (the benchmarks)
    command: list[str] = field(default_factory=list)  # the command line, for the parent run's description


class StudyDriver:
    """One study's run. Every step fills attributes that later steps (and `TrialCallback`) read."""

    def __init__(self, study: Study, options: RunOptions | None = None, *, log=log):
        self.study = study
        self.options = options or RunOptions()
        self.log = log
        self.t_start = time.perf_counter()
        # setup_task
        self.spec = self.base = self.teacher_config = self.family = self.raw = self.tokenizer = None
        self.trials: plan.Trials | None = None  # the memoised config -> (trial study, plan)
        self.points: list[dict[str, Any]] = []
        # setup_data / setup_teacher / setup_cache
        self.encoded: dict | None = None
        self.padding: dict[str, float] = {}
        self.teacher = None  # teacher.TeacherInfo
        self.sanity_tags: dict[str, str] = {}  # the teacher sanity check's verdict (tags of the parent run)
        self.cache = None  # cache.CacheInfo
        self.teacher_model_config = None  # the (fine-tuned) teacher's transformers config
        self.shared = None  # trainable.Shared
        # setup_tracking / setup_tuner / fit
        self.tracker = None  # tracking.StudyTracker, None when not tracking
        self.ray_path: str | None = None
        self.tuner = None
        self.results = None  # tune.ResultGrid
        self.started: set[str] = set()
        self.cache_sources: dict[str, str] = {}  # trial id -> its latest perf/cache_source (tag tunekd.cache_source)
        self.progress = None  # progress.StudyProgress: the study's bar (trials running / done / stopped)
        self.owns_ray = False  # connect started or attached Ray (and disconnect shuts it down)
        self.interrupted = False  # a stop signal stopped the trials (Tune returns with unfinished ones)
        self.signal: int | None = None  # the stop signal received (`stop_signals`)
        self.fitting = False  # Tune is running trials (a stop signal asks it to stop)
        self.stop_handler = None  # `stop_signals`' handler, while it is installed
        self.stop_signals_caught: list[int] = []  # the signals it handles (not those ignored before, as by nohup)
        self.summary: dict[str, Any] = {}  # tracking.StudyTracker.finish_parent's summary of the study
        # find_resume / check_resume: what --resume continues, this study's fingerprint, a forced change
        self.resumable = None  # resume.Resumable
        self.fingerprint_parts: dict[str, Any] | None = None
        self.resume_change: str | None = None
        # run_rounds (adaptive seeds): the trial configs of the current round, its size, the last plan
        self.round_points: list[dict[str, Any]] | None = None
        self.round_total: int | None = None
        self.seed_plan = None  # seeds.RoundPlan

    # --- the study, top to bottom ------------------------------------------------------------------

    def run(self) -> int:
        with self.stop_signals(), self.named_interrupt():
            return self._run()

    @contextmanager
    def named_interrupt(self):
        """A KeyboardInterrupt that is not `Interrupted` (Ray raises its own when a signal arrives while it
        waits in C++) becomes `Interrupted` of the signal received, so that it ends the same way."""
        try:
            yield
        except KeyboardInterrupt as exc:
            if isinstance(exc, Interrupted):
                raise
            raise Interrupted(self.signal or signal.SIGINT) from None

    def _run(self) -> int:
        if self.options.resume:
            self.find_resume()  # before anything is created: nothing to resume fails here, in seconds
        self.setup_task()
        self.preflight()
        if self.options.resume:
            self.check_resume()
        if self.options.dry_run:
            self.describe()
            return 0
        self.connect()
        try:
            self.setup_data()
            self.setup_teacher()
            self.setup_cache()
            with self.guard():  # from here on a crash ends the parent run FAILED, a stop signal KILLED
                self.setup_tracking()
                if self.study.tune.seeds is not None:
                    self.run_rounds()
                else:
                    self.setup_tuner()
                    self.fit()
            self.summarise()
        finally:
            self.disconnect()
        return 128 + (self.signal or signal.SIGINT) if self.interrupted else 0

    @contextmanager
    def stop_signals(self):
        """SIGINT (Ctrl-C), SIGTERM (a scheduler's preemption) and SIGHUP (a closed terminal) stop the study
        alike. While Tune runs trials, the first one asks Tune to stop (through the SIGUSR1 handler Tune
        installs for this): it saves every trial's state for --resume and returns, `fit` ends the parent run
        KILLED, and the command exits 128 + the signal's number. Outside the trials, or a second signal:
        `Interrupted` at once (the parent run, if any, ends KILLED in `guard`). Tune's own SIGINT handler is
        turned off (TUNE_DISABLE_SIGINT_HANDLER), so that all three take this one path."""
        import threading

        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield
            return

        def stop(signum, frame):
            first = self.signal is None
            if first:
                self.signal = signum
                STOPPING.append(signum)
            tune_stop = signal.getsignal(signal.SIGUSR1)
            if first and self.fitting and callable(tune_stop):
                self.log(f"{SIGNAL_NAMES[signum]}: stopping the trials, saving their state for --resume "
                         "(a second signal stops at once)")
                tune_stop(signal.SIGUSR1, frame)
                return
            raise Interrupted(signum)

        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
        self.stop_handler = stop  # installed again once Ray is up (`connect`: ray.init takes SIGTERM over)
        # a signal ignored already stays ignored: `nohup tunekd run ...` must outlive its terminal (SIGHUP)
        previous = {s: signal.signal(s, stop) for s in SIGNAL_NAMES if signal.getsignal(s) is not signal.SIG_IGN}
        self.stop_signals_caught = list(previous)
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            STOPPING.clear()
            self.stop_handler = None

    # --- the steps ---------------------------------------------------------------------------------

    @property
    def metric(self) -> str:
        return f"eval/{self.spec.primary_metric}"

    @property
    def total_trials(self) -> int:
        if self.round_total is not None:
            return self.round_total
        return grid_size(self.study) * self.study.tune.num_samples

    def setup_task(self) -> None:
        """Task data, tokenizer, family and teacher config: everything that can fail on bad input, cheaply."""
        from transformers import AutoConfig, AutoTokenizer

        from tunekd.models import family_for
        from tunekd.tasks import load_configured, spec_for
        from tunekd.teacher import resolve_model
        from tunekd.checks import check_outputs, check_teacher_head
        from tunekd.tracking import check_uri

        study = self.study
        check_outputs(study, num_cpus=self.options.num_cpus, address=self.options.address,  # paths, URI, CPUs/GPUs
                      resources=not self.options.dry_run, probe=not self.options.dry_run)
        self.log(f"study {study.name!r}: {len(study.search)} search dimensions, grid of {grid_size(study)} x "
                 f"{study.tune.num_samples} samples; scheduler {study.tune.scheduler}, searcher {study.tune.searcher}")
        if self.options.track:
            check_uri(study.tracking.uri)
        quiet_libraries()
        spec = spec_for(study.task)
        source = (study.task.data_dir or (study.task.data and study.task.data.path)
                  or ("the hub" if spec.hub else "the built-in generator"))
        self.log(f"task {spec.name} ({spec.kind}): loading from {source}")
        # the data first: a bad file, column or label fails here, before the teacher is materialised
        spec, self.raw = load_configured(study.task, seed=study.seed)
        self.spec = spec
        self.base = resolve_model(study.teacher.model)
        try:
            self.teacher_config = AutoConfig.from_pretrained(self.base, trust_remote_code=study.teacher.trust_remote_code)
        except OSError as exc:
            raise ConfigError(f"teacher.model {study.teacher.model!r} cannot be loaded: "
                              f"{str(exc).splitlines()[0]}") from None
        self.family = family = family_for(self.teacher_config)
        if spec.kind not in family.task_kinds:
            raise ConfigError(f"task {spec.name!r} ({spec.kind}) cannot be run by the {family.name} family "
                              f"(it runs: {', '.join(family.task_kinds)})")
        check_teacher_head(study, self.teacher_config, spec)
        if spec.label_names and study.task.kind is not None:  # labels read from the data travel with the study
            self.study = study = study.model_copy(
                update={"task": study.task.model_copy(update={"labels": list(spec.label_names)})})
        self.tokenizer = AutoTokenizer.from_pretrained(self.base, trust_remote_code=study.teacher.trust_remote_code)
        self.trials = plan.Trials(study, family.num_layers(self.teacher_config), family.match_embeddings_default)

    def preflight(self) -> None:
        """Resolve and check every trial the study can produce; a bad combination is a ConfigError now, not later."""
        from tunekd.checks import check_trial

        family, config = self.family, self.teacher_config
        t_width = family.hidden_size(config)
        self.points = list(plan.trial_points(self.study))
        if self.study.tune.seeds is not None:  # every seed a round may run (a `random` map depends on it)
            from tunekd.seeds import Design

            self.points = [{**p, "seed": s} for s in Design.from_study(self.study).seeds for p in self.points]
        for point in self.points:
            try:
                trial = self.trials(point)
                check_trial(trial.study, config, family)
            except ConfigError as exc:
                where = ", ".join(f"{k}={v!r}" for k, v in point.items())
                raise ConfigError(f"{exc}" + (f" (trial {where})" if where else "")) from None
            width = trial.study.student.hidden_size or t_width
            if trial.study.student.init == "copy" and width != t_width:
                raise ConfigError(f"student.init 'copy' needs the teacher's width: student.hidden_size {width} != "
                                  f"teacher {t_width}; use student.init 'random' for a narrower student")
        self.log(f"validated {len(self.points)} trial configurations against the teacher ({family.name}, "
                 f"{family.num_layers(config)} layers, width {t_width})")
        if self.study.tune.group_by:
            self.check_groups()
        if (cfg := self.study.tune.seeds) is not None:
            self.log(f"tune.seeds: {grid_size(self.study)} configurations x seeds {self.study.seed}.."
                     f"{self.study.seed + cfg.min - 1} first, then one more seed per round for each pair still "
                     f"open against {cfg.compare}={cfg.reference!r} (margin {cfg.margin:g}), up to {cfg.max} seeds; "
                     f"sequential design, {cfg.spending.replace('_', '–')} α spending (boundaries: --dry-run)")
        for warning in plan.identical_trials(self.trials, self.points):
            self.log("WARNING: " + warning)

    def check_groups(self) -> None:
        """tune.group_by: the largest group's memory against what a trial has (`checks.check_group_memory`)."""
        from tunekd.checks import GiB, check_group_memory

        found = [[self.trials(m).study for m in groups.members(g)]
                 for g in groups.group_points(self.points, self.study.tune.group_by)]
        worst = check_group_memory(self.study, found, self.teacher_config, self.family)
        self.log(f"tune.group_by {', '.join(self.study.tune.group_by)}: groups of up to {worst['k']} trials, one Ray "
                 f"trial each; the largest needs about {worst['total'] / GiB:.2f} GiB")

    def find_resume(self) -> None:
        """--resume: the parent run and its Ray state, from the tracking store as it is (nothing created).
        Done already when `resumable` is set (the CLI looks before importing Ray)."""
        from tunekd.resume import find_resumable

        if self.resumable is not None:
            self.ray_path = self.resumable.ray_path
            return
        study, resume = self.study, self.options.resume
        self.resumable = find_resumable(study.tracking.uri, study.experiment, study.tune.storage_path,
                                        None if resume == "latest" else resume)
        self.ray_path = self.resumable.ray_path

    def fingerprint(self) -> dict[str, Any]:
        """The parts of this study's fingerprint (`tunekd.resume`), computed once."""
        if self.fingerprint_parts is None:
            from tunekd.resume import fingerprint_parts

            self.fingerprint_parts = fingerprint_parts(self.study, self.raw, self.base)
        return self.fingerprint_parts

    def check_resume(self) -> None:
        """--resume: the study must be the one the parent run recorded; with --resume-force the change is
        kept (`resume_change`) and recorded on the parent run by `setup_tracking`."""
        from tunekd.resume import compare

        self.resume_change = compare(self.resumable, self.fingerprint(), force=self.options.resume_force)
        if self.resume_change:
            self.log(f"--resume-force: {self.resume_change}")

    def describe(self) -> None:
        """--dry-run: every trial (name, resolved map, epochs), where the study would write, and the loss each
        distinct trial config computes."""
        from tunekd.describe import dry_run_lines

        trials = ((pt, self.trials(pt).study, self.trials(pt).plan) for pt in self.points)
        print("\n".join(dry_run_lines(self.study, trials)))
        print("resolved loss settings:\n" + "\n".join(plan.describe_losses(self.trials, self.points, self.family)))
        if self.study.tune.seeds is not None:
            from tunekd.seeds import Design

            print(Design.from_study(self.study).boundaries().describe())

    def connect(self) -> None:
        """A local Ray on loopback, or the cluster at --address; checks the study's resources fit. A Ray this
        process already runs (a test session, the benchmarks, a notebook) is used as it is, and left running."""
        import ray

        if ray.is_initialized() and not self.options.address:
            self.log(f"ray: using the Ray this process runs ({int(ray.cluster_resources().get('CPU', 0))} CPUs)")
        else:
            connect_ray(self.options.address, self.options.num_cpus, log=self.log, source=self.options.address_source)
            self.owns_ray = True
            if self.stop_handler is not None:  # ray.init installed its own SIGTERM handler (sys.exit)
                for signum in self.stop_signals_caught:
                    signal.signal(signum, self.stop_handler)
        try:
            check_resources(ray, self.study)
        except ConfigError:
            self.disconnect()
            raise

    def disconnect(self) -> None:
        """Shut down the Ray connection `connect` made (not one it found)."""
        if self.owns_ray:
            import ray

            ray.shutdown()
            self.owns_ray = False

    def setup_data(self) -> None:
        from tunekd.data import encode_splits, padding_report

        study = self.study
        self.encoded = encoded = encode_splits(self.raw, self.tokenizer, self.spec, study.task.max_length,
                                               family=self.family)
        self.log("data: " + ", ".join(f"{k} {len(v)} rows" for k, v in encoded.items())
                 + f" (max length {study.task.max_length})")
        self.padding = pad = padding_report(encoded["train"], study.train.batch_size, seed=study.seed)
        self.log(f"data: padding fraction of a training epoch: {pad['random']:.1%} with shuffled batches, "
                 f"{pad['bucketed']:.1%} with length buckets ({'on' if study.train.bucket_by_length else 'off'})")

    def setup_teacher(self) -> None:
        from tunekd.teacher import check_teacher, prepare_teacher

        self.teacher = prepare_teacher(self.study, self.family, self.spec, self.encoded, self.base, self.tokenizer,
                                       log=self.log)
        self.log("teacher: " + ", ".join(f"{k}={v:.2f}" for k, v in self.teacher.metrics.items()))
        self.sanity_tags = check_teacher(self.study, self.spec, self.encoded, self.teacher.metrics, log=self.log)

    def setup_cache(self) -> None:
        """The teacher-output cache for every trial at `points`, and the data every trial shares."""
        from tunekd import cache as tcache
        from tunekd import storage
        from tunekd.trainable import make_shared

        model = self.family.load(self.teacher.path, self.spec, trust_remote_code=self.study.teacher.trust_remote_code)
        self.cache = tcache.for_study(self.study, self.family, model, self.encoded, self.points, trials=self.trials,
                                      tokenizer=self.tokenizer, log=self.log)
        # a cluster whose nodes may not share a local storage folder gets small caches through the object store;
        # on object storage every node reads the cache from there (`cache.open_shared`)
        remote = storage.is_remote(self.study.tune.storage_path)
        self.shared = make_shared(self.study, self.family.name, model, self.encoded, self.cache,
                                  ship_cache=bool(self.options.address) and not remote)
        self.teacher_model_config = model.config

    def setup_tracking(self) -> None:
        """The MLflow parent run of this invocation, or the one --resume continues; the Ray path."""
        from tunekd import storage as tstorage

        storage = tstorage.resolve(self.study.tune.storage_path)  # a folder, or a URI (s3://bucket/prefix)
        if not self.options.track:
            self.ray_path = tstorage.join(storage, f"{self.study.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}")
            return
        from tunekd.tasks import task_params
        from tunekd.tracking import StudyTracker

        study, opts, info = self.study, self.options, self.teacher
        if self.tracker is None:
            self.tracker = StudyTracker(study.tracking.uri, study.experiment)
        tracker = self.tracker
        if opts.resume:  # find_resume found the run and checked its Ray path; check_resume the fingerprint
            from tunekd.resume import FINGERPRINT_FILE, FORCED_TAG

            parent, self.ray_path = self.resumable.parent_id, self.resumable.ray_path
            tracker.start_parent("", {}, "", resume_id=parent, study=study)
            if self.resume_change:
                stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
                earlier = tracker.client.get_run(parent).data.tags.get(FORCED_TAG)
                text = ((earlier + "\n") if earlier else "") + f"{stamp}: {self.resume_change}"
                tracker.client.set_tag(parent, FORCED_TAG, text[-4000:])
                if "tune.seeds" in self.resume_change:  # the sequential design changed: its α no longer holds
                    from tunekd.report import UNADJUSTED_TAG

                    tracker.client.set_tag(parent, UNADJUSTED_TAG, "true")
                tracker.client.log_dict(parent, self.fingerprint(), f"resumed/{stamp}-{FINGERPRINT_FILE}")
            self.log(f"mlflow: resuming parent run {parent} ({len(tracker.trials)} trials recorded) from {self.ray_path}")
            return
        import json

        from tunekd.report import DESIGN_TAG
        from tunekd.resume import FINGERPRINT_FILE, FINGERPRINT_TAG, RAY_PATH_TAG, digest
        from tunekd.seeds import Design, design_record

        run_name = f"{study.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
        self.ray_path = tstorage.join(storage, run_name)
        study_file = Path(opts.study_file) if opts.study_file else None
        parent = tracker.start_parent(run_name, {
            "study_file": str(study_file.resolve()) if study_file else "", "overrides": opts.overrides,
            "teacher.path": info.path, "teacher.cached": info.cached, "task.train_rows": len(self.encoded["train"]),
            "teacher.cache_mode": self.cache.mode, "teacher.cache_reason": self.cache.reason,
            "data.padding_random": round(self.padding["random"], 4),
            "data.padding_bucketed": round(self.padding["bucketed"], 4), **task_params(self.spec, self.study.task),
        }, study_file.read_text() if study_file else study.model_dump_json(),
            tags={RAY_PATH_TAG: self.ray_path, FINGERPRINT_TAG: digest(self.fingerprint()), **self.sanity_tags,
                  DESIGN_TAG: json.dumps(design_record(study))},
            study=study, study_file=opts.study_file, command=opts.command)
        tracker.client.log_dict(parent, self.fingerprint(), FINGERPRINT_FILE)
        if study.tune.seeds is not None:
            tracker.client.log_dict(parent, Design.from_study(study).to_dict(), "design.json")
        tracker.log_parent_metrics({f"teacher/{k}": v for k, v in info.metrics.items()})
        self.log(f"mlflow: experiment {study.experiment!r}, parent run {parent}")

    def setup_tuner(self) -> None:
        from ray import tune

        from tunekd.trainable import tune_trainable

        study = self.study
        # Ray's automatic per-trial loggers (TensorBoard, CSV, JSON) stay off; `tune.ray_loggers` (default) adds
        # the JSON one only: result.json (one line per epoch) and params.json per trial, what
        # `ray.tune.ExperimentAnalysis` and `Tuner.restore(...).get_results()` read
        os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
        if not study.tune.ray_loggers:  # the result grid then warns, per trial, that it found no result.json
            import logging

            logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
        trainable = tune.with_resources(tune.with_parameters(tune_trainable, shared=self.shared),
                                        {"cpu": study.tune.resources.cpu, "gpu": study.tune.resources.gpu})
        # TrialCallback first: it exports a finished trial's student before CheckpointCallback prunes it
        callbacks = [TrialCallback(self)] if self.tracker is not None else []
        if self.tracker is not None:
            from tunekd.progress import StudyProgress

            self.progress = StudyProgress(self.total_trials, study.name)
        callbacks.append(CheckpointCallback(self.metric, study.tune.keep_students, self.ray_path))
        if study.tune.ray_loggers:
            from ray.tune.logger import JsonLoggerCallback

            callbacks.append(JsonLoggerCallback())
        if self.options.resume and self.round_points is None:
            self.tuner = tune.Tuner.restore(self.ray_path, trainable, resume_unfinished=True, resume_errored=False,
                                            restart_errored=False)
            attach_callbacks(self.tuner, self)
            return
        space, config = ((param_space(study), tune_config(study, self.metric)) if self.round_points is None
                         else round_space(study, self.metric, self.round_points))
        parent, _, name = self.ray_path.rstrip("/").rpartition("/")  # a folder or a URI
        self.tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=config,
            run_config=tune.RunConfig(
                name=name, storage_path=parent, verbose=0,
                callbacks=callbacks,
                # a running trial's latest checkpoint only; finished trials: `CheckpointCallback`
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                failure_config=tune.FailureConfig(max_failures=study.tune.max_failures)),
        )

    @contextmanager
    def guard(self):
        """Around the parent run's life: a crash ends it FAILED with the error, a stop signal KILLED (`parent_guard`)."""
        if not self.options.track:
            yield
            return
        from tunekd.tracking import StudyTracker

        self.tracker = StudyTracker(self.study.tracking.uri, self.study.experiment)
        with self.tracker.parent_guard(), self.named_interrupt():  # the parent's tag names the signal
            yield

    def fit(self, finish: bool = True) -> None:
        """Run the trials; end the parent run FINISHED, or KILLED when a stop signal stopped them (Tune, asked by
        `stop_signals`, saves their state and returns with unfinished ones); settle trials no driver saw finish. `finish=False`
        (a round of adaptive seeds) leaves the parent run open."""
        self.fitting = True
        try:
            self.results = self.tuner.fit()
        finally:
            self.fitting = False
            if self.progress is not None:
                self.progress.close()
        self.interrupted = (self.signal is not None
                            or self.results.num_terminated + self.results.num_errors < len(self.results))
        if not self.interrupted:  # every trial ended, also those no driver saw end: no optimizer state stays
            from tunekd import checkpoints

            for result in self.results:
                if result.path:
                    checkpoints.finish_trial(storage_uri(result.path, self.ray_path), member_scores(
                        "", result.config, None if result.error else result.metrics or {}, self.metric))
            checkpoints.prune_students(self.ray_path, self.study.tune.keep_students)
        if self.tracker is None:
            return
        for result in self.results:  # trials that ended while no driver was listening (a killed driver)
            trial_id = (result.metrics or {}).get("trial_id")
            stopped = self.interrupted and not (result.metrics or {}).get("done")
            for member in groups.views(trial_id, result.config, result.metrics) if trial_id else ():
                rec = self.tracker.trials.get(member.trial_id)
                if rec is None or rec.status != "running":
                    continue
                if stopped and member.error is None:
                    continue  # stopped by the signal: it stays running, and --resume continues it
                if result.error is not None or member.error is not None:
                    self.tracker.end_trial(member.trial_id, "failed", error=str(member.error or result.error))
                else:
                    self.tracker.end_trial(member.trial_id, self.finished_status(member.config, member.result)[0])
        if finish:
            self.finish()

    def finish(self) -> None:
        """Close the parent run: FINISHED, or KILLED after a stop signal."""
        self.summary = self.tracker.finish_parent(  # best trial, counts, wall time, description; closes the run
            self.metric, wall_s=time.perf_counter() - self.t_start, status="KILLED" if self.interrupted else "FINISHED",
            error=f"interrupted ({SIGNAL_NAMES[self.signal or signal.SIGINT]}); continue with --resume"
            if self.interrupted else None)

    def run_rounds(self) -> None:
        """Adaptive seeds: round after round, run the trials `seeds.plan_round` asks for (every pair at `min` seeds,
        then one more seed for each still inconclusive pair) until every pair is decided or has `max` seeds.

        Each round is one Tuner.fit in its own Ray folder (`<ray path>-round<k>`, a fresh one on --resume) under
        the same MLflow parent run; the plan is recomputed from the ended child runs, so a resumed study
        (whose parent's children `setup_tracking` read back) reruns only what no round finished. The parent
        records every round (`StudyTracker.log_seed_round`: artifact seeds/rounds.json, tags tunekd.seeds.*)."""
        from tunekd import seeds

        if self.tracker is None:
            raise ConfigError("tune.seeds needs MLflow tracking (the rounds are planned from the recorded trials)")
        from tunekd.report import UNADJUSTED_TAG

        unadjusted = self.tracker.client.get_run(self.tracker.parent_id).data.tags.get(UNADJUSTED_TAG) == "true"
        design = seeds.Design.from_study(self.study, unadjusted=unadjusted)
        base = self.ray_path
        rounds = self.tracker.seed_rounds() if self.options.resume else []
        while True:
            records = ((r.params, r.status, r.metrics) for r in self.tracker.trials.values())
            self.seed_plan = plan = seeds.plan_round(seeds.results_frame(records, design, self.metric), design)
            if plan.done or self.interrupted:
                break
            if rounds and not rounds[-1]["interrupted"] and plan.needed == rounds[-1]["trials"]:
                raise RuntimeError(f"tune.seeds: round {len(rounds)} would run the same {len(plan.needed)} trials "
                                   "as the last one (their results are not found in MLflow)")
            k = len(rounds)
            self.ray_path = f"{base}-round{k}"
            from tunekd import storage

            if storage.exists(self.ray_path):  # a resumed round: a fresh Ray folder of its own
                self.ray_path += f"-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
            pending = sum(p["state"] != "final" for p in plan.pairs)
            self.log(f"seeds: round {k}: {len(plan.needed)} trials for {pending} undecided strategy/cell pairs "
                     f"(seeds {sorted({c['seed'] for c in plan.needed})})")
            self.round_points, self.round_total, self.started = plan.needed, len(plan.needed), set()
            self.setup_tuner()
            self.fit(finish=False)
            rounds.append({"round": k, "ray_path": self.ray_path, "trials": plan.needed,
                           "interrupted": self.interrupted})
            self.tracker.log_seed_round(rounds, plan.pairs, final=False)
        self.tracker.log_seed_round(rounds, plan.pairs, final=plan.done)
        self.round_points = self.round_total = None
        self.finish()

    def summarise(self) -> None:
        if self.tracker is None:
            return
        tracker = self.tracker
        counts = {s: sum(1 for r in tracker.trials.values() if r.status == s)
                  for s in ("completed", "early_stopped", "failed")}
        print()
        print(summary_table(tracker, self.spec.primary_metric))
        print()
        if self.seed_plan is not None:
            from tunekd.seeds import verdict_table

            cfg = self.study.tune.seeds
            print(f"adaptive seeds: {self.metric} at the final epoch, each {cfg.compare} - {cfg.reference} paired by "
                  f"seed; margin {cfg.margin:g}, alpha {cfg.alpha:g}; sequential design over seeds {cfg.min}..{cfg.max} "
                  f"({cfg.spending.replace('_', '–')} α spending; 'different' family-wise over each cell's pairs)"
                  + ("" if self.seed_plan.done else " (not finished: continue with --resume)"))
            print(verdict_table(self.seed_plan))
            print()
        self.log(f"teacher {self.metric}: {self.teacher.metrics.get(self.spec.primary_metric, float('nan')):.2f}; "
                 "trials: " + ", ".join(f"{v} {k}" for k, v in counts.items())
                 + f"; wall time {time.perf_counter() - self.t_start:.0f} s")
        if "best_name" in self.summary:
            self.log(f"best completed trial: {self.summary['best_name']} ({self.metric} "
                     f"{self.summary['best_value']:.2f}), run {self.summary['best_run_id']}")
        self.log("browse it in MLflow's UI:")
        from tunekd.progress import write

        for line in tracker.ui_command().splitlines():
            write(line)
        self.log(f"report: {self.study_report()}")

    def study_report(self) -> str:
        """`tunekd report` of this invocation (its parent run): where it is, or why there is none."""
        from tunekd import report

        if os.environ.get("TUNEKD_REPORT", "1") == "0":
            return f"not written (TUNEKD_REPORT=0); tunekd report --experiment {self.tracker.experiment}"
        try:
            return report.study_report(self.tracker.uri, self.tracker.experiment, self.tracker.parent_id)
        except Exception as exc:  # noqa: BLE001 - the study itself is done and recorded: say why, go on
            return f"not written: {exc}" if isinstance(exc, ConfigError) else f"not written: {type(exc).__name__}: {exc}"

    # --- per trial (called by TrialCallback) ---------------------------------------------------------

    def finished_status(self, config, last_result) -> tuple[str, int, int]:
        epochs = self.trials(config).study.train.epochs
        last = int((last_result or {}).get("epoch", 0))
        return ("completed" if last >= epochs else "early_stopped"), last, epochs

    def save_trained_student(self, trial, member: groups.MemberView) -> None:
        """The member's last checkpoint → a `transformers` folder → MLflow artifact `student/` of its child run."""
        from safetensors.torch import load_file

        from tunekd.students import export_student

        resolved = self.trials(member.config)
        with trial.checkpoint.as_directory() as folder:
            tensors = load_file(str(Path(folder) / member.folder / "model.safetensors"))
        state = {k[len("student."):]: v for k, v in tensors.items() if k.startswith("student.")}
        with tempfile.TemporaryDirectory(prefix="tunekd-student-") as out:
            export_student(state, self.teacher_model_config, self.family, self.spec, resolved.study.student, out,
                           copied_layers=resolved.plan.copied_layers, tokenizer_dir=self.teacher.path)
            self.tracker.log_artifacts(self.tracker.trials[member.trial_id].run_id, out, "student")


# --- the Tune callback ---------------------------------------------------------------------------


def _callback_base():
    from ray import tune

    return tune.Callback


class TrialCallback(_callback_base()):
    """Driver-side MLflow logging of each trial (child run, metrics, final status) and its console lines.
    It holds the driver; Tune pickles it into its experiment state without it (`__getstate__`), and a
    resumed study attaches its own driver (`attach_callbacks`)."""

    def __init__(self, driver: StudyDriver | None = None):
        self.driver = driver

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.driver = None

    def on_trial_start(self, iteration, trials, trial, **info):
        d = self.driver
        for member in groups.views(trial.trial_id, trial.config):  # a group's members are trials each
            rec = d.tracker.trials.get(member.trial_id)
            if member.folder and rec is not None and rec.status == "failed":
                continue  # a resumed group's member that had failed alone stays ended
            rec = d.tracker.start_trial(member.trial_id, d.trials(member.config).params())
            d.started.add(member.trial_id)
            if d.progress is not None:
                d.progress.started(member.trial_id)
            d.log(f"trial {len(d.started)}/{d.total_trials} started: {rec.name} ({member.trial_id})")

    def on_trial_recover(self, iteration, trials, trial, **info):
        self.driver.log(f"  {trial.trial_id} failed and will be retried from its last checkpoint")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        d = self.driver
        for member in groups.views(trial.trial_id, trial.config, result):
            if d.tracker.trials[member.trial_id].status != "running":
                continue
            if member.error is not None:  # a group's member that failed alone; the others go on
                self.end_failed(member.trial_id, member.error)
                continue
            if "epoch" not in member.result:
                continue
            metrics = {k: v for k, v in member.result.items() if k.startswith(("eval/", "train/", "perf/"))}
            step = int(member.result.get("epoch", result.get("training_iteration", 0)))
            d.tracker.log_trial_metrics(member.trial_id, metrics, step)
            source = member.result.get("perf/cache_source")
            if source is not None and d.cache_sources.get(member.trial_id) != source:  # a tag, once per change
                d.cache_sources[member.trial_id] = source
                d.tracker.tag_trial(member.trial_id, CACHE_SOURCE_TAG, source)
                if source == "online" and d.cache is not None and d.cache.mode != "off":
                    d.log(f"  WARNING: {member.trial_id} runs the teacher online: the teacher cache "
                          f"{d.cache.folder} was not readable on its node (perf/cache_source=online)")
            shown = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k.startswith("eval/") or k == "train/loss")
            d.log(f"  {member.trial_id} epoch {step}: {shown}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        d = self.driver
        for member in groups.views(trial.trial_id, trial.config, trial.last_result):
            if d.tracker.trials[member.trial_id].status != "running":
                continue  # a group's member that failed alone
            status, last, epochs = d.finished_status(member.config, member.result)
            if d.trials(member.config).study.train.save_model and trial.checkpoint is not None:
                d.save_trained_student(trial, member)
            d.tracker.end_trial(member.trial_id, status)
            if d.progress is not None:
                d.progress.ended(member.trial_id, status)
            d.log(f"  {d.tracker.trials[member.trial_id].name} {status} after {last}/{epochs} epochs")

    def on_trial_error(self, iteration, trials, trial, **info):
        if STOPPING:  # its worker ended with the signal: unfinished, not failed (--resume continues it)
            return
        d = self.driver
        members = list(groups.views(trial.trial_id, trial.config))
        if all(m.trial_id not in d.tracker.trials for m in members):  # its actor died before it started (e.g. OOM)
            self.on_trial_start(iteration, trials, trial)
        text = trial_error_text(trial)
        for member in members:
            if d.tracker.trials[member.trial_id].status == "running":
                self.end_failed(member.trial_id, text)

    def end_failed(self, trial_id: str, text: str) -> None:
        d = self.driver
        d.tracker.end_trial(trial_id, "failed", error=text)
        if d.progress is not None:
            d.progress.ended(trial_id, "failed")
        lines = [ln for ln in text.strip().splitlines() if ln.strip()]
        d.log(f"  {trial_id} failed: {lines[-1] if lines else text}")


def attach_callbacks(tuner, driver: StudyDriver) -> None:
    """Give the callbacks a restored Tuner unpickled from its experiment state this driver (and a
    `CheckpointCallback` if that state has none)."""
    run_config = tuner._local_tuner.get_run_config()  # Tune keeps no public handle on restored callbacks
    callbacks = [cb for cb in run_config.callbacks or [] if not isinstance(cb, CheckpointCallback)]
    found = [cb for cb in callbacks if isinstance(cb, TrialCallback)]
    if not found and driver.tracker is not None:
        callbacks.append(TrialCallback())
        found = callbacks[-1:]
    for cb in found:
        cb.driver = driver
    run_config.callbacks = [*callbacks, CheckpointCallback(driver.metric, driver.study.tune.keep_students,
                                                           driver.ray_path)]


class CheckpointCallback(_callback_base()):
    """A trial that ended keeps no optimizer or RNG state, and its weights only while it is among the
    experiment's best `keep` finished trials (`tunekd.checkpoints`), also on object storage (`ray_path`, a
    folder or URI, says which). Holds plain values (Tune pickles it)."""

    def __init__(self, metric: str, keep: int, ray_path: str = ""):
        self.metric, self.keep, self.ray_path = metric, keep, ray_path

    def _finish(self, trial, failed: bool = False) -> None:
        from tunekd import checkpoints

        if trial.path:  # a failed trial's weights are not kept
            path = storage_uri(trial.path, self.ray_path)
            checkpoints.finish_trial(path, member_scores(trial.trial_id, trial.config,
                                                         None if failed else trial.last_result, self.metric))
            checkpoints.prune_students(path.rstrip("/").rsplit("/", 1)[0], self.keep)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._finish(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        if not STOPPING:  # a worker the stop signal ended keeps its checkpoint for --resume
            self._finish(trial, failed=True)


def member_scores(trial_id: str, config: dict[str, Any], result: dict[str, Any] | None,
                  metric: str) -> dict[str, float | None]:
    """{checkpoint subfolder: the member's `metric` at its last epoch} of a Ray trial ('' for a plain trial;
    None for a failed member, or for all when `result` is None: the trial failed)."""
    return {m.folder: None if result is None or m.error else m.result.get(metric)
            for m in groups.views(trial_id, config, result)}


def storage_uri(path: str, ray_path: str) -> str:
    """A trial's or result's `path` as Ray gives it (within its file system: `bucket/prefix/...` on object
    storage) as a folder or URI `tunekd.storage` opens, with the scheme of the study's `ray_path`."""
    from tunekd import storage

    scheme = storage.scheme(ray_path or "")
    return f"{scheme}://{path.lstrip('/')}" if scheme and "://" not in path else path


def trial_error_text(trial) -> str:
    """The trial's error trace: the local error file Tune has just written, else its copy in storage."""
    path = trial.error_file
    if path and os.path.isfile(path):
        return Path(path).read_text()
    err = trial.get_error()
    return str(err) if err is not None else "unknown error"


# --- translating the study for Tune ---------------------------------------------------------------


def param_space(study: Study) -> dict[str, Any]:
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
    return groups.grouped_space(space, study)


def round_space(study: Study, metric: str, points: list[dict[str, Any]]):
    """(param_space, TuneConfig) that run exactly the trial configs `points` (a round of adaptive seeds): every
    point sets every searched key, so each replaces one sample (`BasicVariantGenerator.points_to_evaluate`)."""
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    points = groups.group_points(points, study.tune.group_by)
    keys = sorted({k for p in points for k in p})
    space = {k: tune.grid_search(list({repr(p[k]): p[k] for p in points}.values())) for k in keys}  # lists too
    config = tune_config(study, metric)
    config.search_alg = BasicVariantGenerator(points_to_evaluate=[dict(p) for p in points],
                                              max_concurrent=config.max_concurrent_trials or 0)
    config.max_concurrent_trials = None  # the generator limits them (Tune ignores it with a search generator)
    config.num_samples = len(points)
    return space, config


def tune_config(study: Study, metric: str):
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


# --- Ray -----------------------------------------------------------------------------------------


def connect_ray(address: str | None, num_cpus: int | None, *, log=log, source: str = "--address"):
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    import ray

    try:
        if address:
            check_address(address, source)
            ray.init(address=address, log_to_driver=True, configure_logging=False)
            log(f"ray: attached to the cluster at {address}")
        else:
            with signals_blocked(SIGNAL_NAMES):  # Ray's processes inherit them blocked: see signals_blocked
                ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                         configure_logging=False, log_to_driver=True)
            log(f"ray: started locally on 127.0.0.1 with {int(ray.cluster_resources().get('CPU', 0))} CPUs")
    except ConfigError:
        raise
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ConfigError(f"cannot reach the Ray cluster at {address!r} (from {source}): "
                          f"{str(exc).splitlines()[0]}") from None
    return ray


@contextmanager
def signals_blocked(signals):
    """`signals` blocked in this thread while the body runs: the processes it starts (a local Ray's GCS,
    raylet and, through the raylet, its workers) inherit the block. A stop signal sent to the whole process
    group (Ctrl-C in a terminal, SIGHUP when it closes, SIGTERM from a job scheduler) then reaches the
    driver only, which stops the trials in order (their state saved for --resume) and shuts the Ray down
    itself, instead of a raylet that died under a running Tune. (Ray blocks SIGINT in its processes the same
    way; `ray.shutdown` ends them with SIGKILL.)"""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.pthread_sigmask(signal.SIG_BLOCK, set(signals))
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


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


def check_resources(ray, study: Study) -> None:
    res = ray.cluster_resources()
    gpu = study.tune.resources.gpu
    if gpu > 0 and res.get("GPU", 0) < gpu:
        raise ConfigError(f"tune.resources.gpu is {gpu} but the Ray cluster has {res.get('GPU', 0):g} GPUs")
    cpu = study.tune.resources.cpu
    if res.get("CPU", 0) < cpu:
        raise ConfigError(f"tune.resources.cpu is {cpu:g} but the Ray cluster has {res.get('CPU', 0):g} CPUs")


# --- output --------------------------------------------------------------------------------------


def summary_table(tracker, metric: str) -> str:
    import pandas as pd

    rows = []
    for trial_id, rec in tracker.trials.items():
        row = {"trial": rec.name or trial_id}
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
