"""The full λ sweep {0, 1, 3, 5, 10} for `forward` and `all_to_one` (copy init), put together from the two
tunekd.report tables: λ ∈ {1, 5, 10} from results/lambda/table.csv; λ = 3 from the copy-init rows of
results/strategies/table.csv (the study default); λ = 0 from its copy-init `none` row (with λ = 0 the
hidden loss is skipped, so forward/all_to_one at λ = 0 are the same computation as `none`).

Usage: python lambda_table.py RESULTS_DIR  → RESULTS_DIR/lambda_sweep.csv, lambda_sweep.md, lambda_sweep.png
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

M = "eval/accuracy"


def main(results: Path) -> None:
    strat = pd.read_csv(results / "strategies" / "table.csv")
    lam = pd.read_csv(results / "lambda" / "table.csv")
    copy = strat[strat["init"] == "copy"]
    rows = []
    for s in ("forward", "all_to_one"):
        none = copy[copy["strategy"] == "none"].iloc[0]
        rows.append({"strategy": s, "lambda_hid": 0.0, "source": "strategies: none (copy)",
                     "mean": none[f"{M} mean"], "sd": none[f"{M} sd"], "n": none[f"{M} n"]})
        at3 = copy[copy["strategy"] == s].iloc[0]
        rows.append({"strategy": s, "lambda_hid": 3.0, "source": f"strategies: {s} (copy)",
                     "mean": at3[f"{M} mean"], "sd": at3[f"{M} sd"], "n": at3[f"{M} n"]})
        for _, r in lam[lam["strategy"] == s].iterrows():
            rows.append({"strategy": s, "lambda_hid": float(r["lambda_hid"]), "source": "lambda",
                         "mean": r[f"{M} mean"], "sd": r[f"{M} sd"], "n": r[f"{M} n"]})
    df = pd.DataFrame(rows).sort_values(["strategy", "lambda_hid"], ascending=[False, True])
    df.to_csv(results / "lambda_sweep.csv", index=False)

    wide = df.assign(cell=[f"{m:.2f} ± {s:.2f} ({int(n)})" for m, s, n in zip(df["mean"], df["sd"], df["n"])])
    wide = wide.pivot(index="lambda_hid", columns="strategy", values="cell")[["forward", "all_to_one"]]
    lines = ["| λ | forward | all_to_one |", "|---|---|---|"]
    lines += [f"| {lam_:g} | {r['forward']} | {r['all_to_one']} |" for lam_, r in wide.iterrows()]
    (results / "lambda_sweep.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for s, g in df.groupby("strategy", sort=False):
        ax.errorbar(g["lambda_hid"], g["mean"], yerr=g["sd"], marker="o", capsize=3, label=s)
    ax.set_xlabel("λ (hidden-loss weight)")
    ax.set_ylabel("SST-2 dev accuracy (%)")
    ax.set_title("copy init, mean ± sd over 3 seeds")
    ax.legend()
    fig.tight_layout()
    fig.savefig(results / "lambda_sweep.png", dpi=120)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
