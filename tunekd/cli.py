"""The `tunekd` command: one entry point for run, report, angles, list and compare.

Each subcommand is the module it names (`tunekd run` = `python -m tunekd.run`, ...): the rest of the
command line goes to it unchanged, and `tunekd SUBCOMMAND --help` prints its own help.
"""

from __future__ import annotations

import sys

COMMANDS = {
    "run": ("tunekd.run", "main", "run a study file on Ray Tune, recorded in MLflow"),
    "report": ("tunekd.report", "main", "tables, paired tests, plots and a LaTeX table of a recorded study"),
    "plan": ("tunekd.planning", "main", "plan a study's seeds: verdict probabilities, expected trials and time"),
    "angles": ("tunekd.angles", "main", "angles at student states between teacher layers"),
    "list": ("tunekd.studies", "main_list", "the studies and parent runs in an MLflow store"),
    "compare": ("tunekd.studies", "main_compare", "two studies' strategy tables side by side"),
}

USAGE = """usage: tunekd {run,report,plan,angles,list,compare} ...

Knowledge-distillation studies with intermediate-layer matching, on Ray Tune and MLflow.

commands:
""" + "\n".join(f"  {name:<9}{text}" for name, (_, _, text) in COMMANDS.items()) + """

examples:
  tunekd run search_spaces/quickstart.yaml            # then open the printed MLflow UI link
  tunekd run search_spaces/quickstart.yaml --dry-run  # every trial's name, layer map, epochs; outputs
  tunekd list                                         # studies in ./mlflow.db
  tunekd report --experiment quickstart               # report/quickstart/{report.md,table.tex,...}
  tunekd plan search_spaces/robustness.yaml --sd 1.0  # verdict probabilities and expected seeds
  tunekd run search_spaces/quickstart.yaml --set name=quickstart-lambda1 --set distill.lambda_hid=1
  tunekd compare quickstart quickstart-lambda1        # the two studies side by side
  tunekd angles --best quickstart                     # angles of the quickstart's best kept student

outputs (relative to the working directory): ./mlflow.db (MLflow), ./ray_results/ (trials, checkpoints,
teacher-output cache), ./.tunekd_cache/teachers/ (fine-tuned teachers), ./report/<experiment>/ (reports);
with tune.storage_path s3://... or gs://..., trials, caches and teachers live there instead.
`tunekd COMMAND --help` explains each command. `python -m tunekd.run` etc. work as well."""


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        from tunekd.errors import unknown

        print(f"tunekd: error: {unknown('command', name, COMMANDS)}", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[name]
    import importlib

    return getattr(importlib.import_module(module), func)(rest)


if __name__ == "__main__":
    sys.exit(main())
