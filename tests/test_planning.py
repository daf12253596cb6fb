"""`tunekd plan`: the design's boundaries, per-pair verdict probabilities and expected seeds/trials, from the same
rule the planner runs (`stats.simulate_cell`)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from scipy import stats as sps

from tunekd import planning, stats

REPO = Path(__file__).resolve().parents[1]


def _rows(text: str) -> dict[str, list[float]]:
    """The per-pair table: true Δ label -> [P(equivalent), P(different), P(inconclusive), E[seeds]]."""
    out = {}
    for line in text.splitlines():
        m = re.match(r"\s+(0|margin)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$", line)
        if m:
            out[m.group(1)] = [float(x) for x in m.groups()[1:]]
    return out


def test_plan_robustness_preset(capsys):
    code = planning.main([str(REPO / "search_spaces" / "robustness.yaml"), "--sd", "1.0", "--reps", "2000",
                          "--trial-seconds", "20", "--concurrency", "2"])
    assert code == 0
    text = capsys.readouterr().out
    assert text.count("c_eq =") == 4  # looks at 3, 4, 5, 6 seeds
    rows = _rows(text)
    for label in ("0", "margin"):
        p = rows[label]
        assert sum(p[:3]) == pytest.approx(1.0, abs=2e-3) and 3 <= p[3] <= 6
    # the same numbers as the simulation it reports, and the error rates it implies hold
    b = stats.boundaries(3, 6, 0.05, "obrien_fleming", pairs=4)
    sim = stats.simulate_cell([1.0] * 4, 1.0, 1.0, b, reps=2000, seed=1)
    assert rows["margin"][0] == pytest.approx(sim["pairs"][0]["equivalent"], abs=1e-3)
    assert rows["margin"][0] <= 0.05 + 3.5 * (0.05 * 0.95 / 2000) ** 0.5
    assert "at most 60" in text and "2 cell(s) x 5 levels" in text  # 2 inits x (4 strategies + forward) x 6 seeds
    assert "expected wall time (Δ = 0)" in text


def test_plan_fixed_seed_study_uses_the_exact_t_test(tmp_path, capsys):
    study = tmp_path / "s.yaml"
    study.write_text((REPO / "search_spaces" / "quickstart.yaml").read_text())
    assert planning.main([str(study), "--sd", "0.5", "--reps", "500"]) == 0
    text = capsys.readouterr().out
    m = re.search(r"c_eq = ([\d.]+)\s+c_diff = ([\d.]+)", text)
    assert float(m.group(1)) == pytest.approx(sps.t.isf(0.05, 1), rel=1e-3)  # 2 seeds: one look, df 1
    assert float(m.group(2)) == pytest.approx(sps.t.isf(0.05 / 4 / 2, 1), rel=1e-3)  # Bonferroni over 4 pairs
    assert text.count("c_eq =") == 1


@pytest.mark.parametrize("argv, words", [
    (["--sd", "0"], "--sd must be a finite number > 0"),
    (["--sd", "1", "--reps", "5"], "--reps must be at least 100"),
    (["--sd", "1", "--set", "search.seed=null"], "a paired comparison needs at least 2"),
])
def test_plan_bad_input_is_one_line(argv, words, tmp_path, capsys):
    code = planning.main([str(REPO / "search_spaces" / "quickstart.yaml"), *argv])
    err = capsys.readouterr().err
    assert code == 2 and words in err and len(err.strip().splitlines()) == 1
