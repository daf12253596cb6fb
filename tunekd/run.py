"""`python -m tunekd.run STUDY.yaml`: run a KD study on Ray Tune and record it in MLflow.

The command line only: it loads the study (with `--set` overrides) and hands it to
`tunekd.driver.StudyDriver`, whose named steps are the study (see that module).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from tunekd.errors import ArgumentParser, run_cli


def _epilog() -> str:
    from tunekd.describe import OUTPUTS_HELP

    return ("examples:\n"
            "  tunekd run search_spaces/quickstart.yaml\n"
            "  tunekd run search_spaces/quickstart.yaml --dry-run   # every trial: name, layer map, epochs; outputs\n"
            "  tunekd run search_spaces/quickstart.yaml --set name=quickstart-lambda1 --set distill.lambda_hid=1\n"
            "  tunekd run search_spaces/quickstart.yaml --resume    # continue the latest 'quickstart' run\n\n"
            + OUTPUTS_HELP)


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(
        prog="tunekd run",
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
                        "trials are not run again, unfinished ones resume from their latest checkpoints, the same "
                        "MLflow parent run is used; refused when the study changed since (see --resume-force)")
    p.add_argument("--resume-force", action="store_true",
                   help="with --resume (implied): continue even though the study's fingerprint (resolved config, "
                        "data, teacher, tunekd version) differs from the parent run's; the change is recorded on "
                        "the parent run (tag tunekd.resume_forced). Without it a changed study is refused")
    p.add_argument("--dry-run", action="store_true",
                   help="validate the study and every trial config it can produce, print the trials, and stop")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    from tunekd.study import load_study

    study = load_study(args.study, args.overrides)
    if args.tracking_uri:
        study = study.model_copy(update={"tracking": study.tracking.model_copy(update={"uri": args.tracking_uri})})
    address, source = args.address, "--address"
    if address is None and os.environ.get("RAY_ADDRESS"):
        address, source = os.environ["RAY_ADDRESS"], "RAY_ADDRESS"
    resume = args.resume or ("latest" if args.resume_force else None)
    found = None
    if resume:  # nothing to resume fails here, before Ray (or the driver's imports of it) and anything else
        from tunekd.resume import find_resumable

        found = find_resumable(study.tracking.uri, study.experiment, study.tune.storage_path,
                               None if resume == "latest" else resume, adaptive=study.tune.seeds is not None)
    from tunekd.driver import RunOptions, StudyDriver

    options = RunOptions(study_file=args.study, overrides=args.overrides, address=address, address_source=source,
                         num_cpus=args.num_cpus, resume=resume, resume_force=args.resume_force, dry_run=args.dry_run,
                         command=_command_line())
    driver = StudyDriver(study, options)
    driver.resumable = found
    return driver.run()


def _command_line() -> list[str]:
    """The command as typed: `python -m tunekd.run ...` or `tunekd run ...`."""
    prog = Path(sys.argv[0]).name
    head = ["python", "-m", "tunekd.run"] if prog.endswith(".py") else [prog]
    return head + sys.argv[1:]


def main(argv=None) -> int:
    return run_cli(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
