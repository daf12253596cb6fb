"""`tunekd.angles`: cosines on hand-built geometry, padding, summaries, and the CLI end to end."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from tunekd import angles
from tunekd.errors import ConfigError


def states(*vectors, pad: int = 0, pad_value: float = float("nan")):
    """One [1, 2 + pad, H] state per vector: the vector at 2 valid tokens, then `pad` padded positions
    filled with `pad_value`."""
    out = []
    for v in vectors:
        v = torch.tensor(v, dtype=torch.float32)
        row = torch.stack([v, v] + [torch.full_like(v, pad_value)] * pad)
        out.append(row.unsqueeze(0))  # [1, 2 + pad, H]
    return out


def test_known_geometry_student_at_origin():
    s, *t = states([0, 0, 0], [1, 0, 0], [0, 1, 0], [-1, 0, 0], [2, 0, 0])
    mask = torch.ones(1, 2)
    cos = angles.angle_cosines(s, t, mask)
    assert cos.dtype == torch.float64 and cos.shape == (6, 2)
    assert angles.teacher_pairs(4) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    expected = {(0, 1): 0.0, (0, 2): -1.0, (0, 3): 1.0, (1, 2): 0.0, (1, 3): 0.0, (2, 3): -1.0}
    for row, pair in enumerate(angles.teacher_pairs(4)):
        assert torch.allclose(cos[row], torch.full((2,), expected[pair], dtype=torch.float64), atol=1e-12), pair


def test_known_geometry_student_off_origin():
    # S = (1, 1): T1 − S = e1, T2 − S = e2 (right angle), T3 − S = −e1 (straight), T4 − S = (1, 1) (45°)
    s, *t = states([1, 1], [2, 1], [1, 2], [0, 1], [2, 2])
    cos = angles.angle_cosines(s, t, torch.ones(1, 2))
    got = dict(zip(angles.teacher_pairs(4), cos[:, 0].tolist()))
    assert got[(0, 1)] == pytest.approx(0.0, abs=1e-12)
    assert got[(0, 2)] == pytest.approx(-1.0, abs=1e-12)
    assert got[(0, 3)] == pytest.approx(1 / math.sqrt(2), abs=1e-12)
    assert got[(1, 3)] == pytest.approx(1 / math.sqrt(2), abs=1e-12)
    assert got[(2, 3)] == pytest.approx(-1 / math.sqrt(2), abs=1e-12)


@pytest.mark.parametrize("pad_value", [float("nan"), 1e30, float("inf")])
def test_padding_changes_nothing(pad_value):
    clean_s, *clean_t = states([0, 0, 0], [1, 0, 0], [0, 1, 0], [-1, 0, 0])
    pad_s, *pad_t = states([0, 0, 0], [1, 0, 0], [0, 1, 0], [-1, 0, 0], pad=3, pad_value=pad_value)
    mask = torch.tensor([[1, 1, 0, 0, 0]])
    clean = angles.angle_cosines(clean_s, clean_t, torch.ones(1, 2))
    padded = angles.angle_cosines(pad_s, pad_t, mask)
    assert padded.shape == (3, 2) and torch.equal(clean, padded)
    assert torch.isfinite(padded).all()


def reference_cosines(s: np.ndarray, ts: list[np.ndarray], mask: np.ndarray) -> np.ndarray:
    """Plain float64 loops over tokens and pairs."""
    rows = []
    for j, k in itertools.combinations(range(len(ts)), 2):
        vals = []
        for b, pos in zip(*np.nonzero(mask)):
            a, c = ts[j][b, pos] - s[b, pos], ts[k][b, pos] - s[b, pos]
            vals.append(a @ c / (np.linalg.norm(a) * np.linalg.norm(c)))
        rows.append(vals)
    return np.array(rows)


def test_random_states_match_reference_with_holes_in_mask():
    g = torch.Generator().manual_seed(0)
    b, length, h, n_t = 3, 7, 16, 5
    s = torch.randn(b, length, h, generator=g)
    ts = [torch.randn(b, length, h, generator=g) + 0.3 * i for i in range(n_t)]
    mask = (torch.rand(b, length, generator=g) > 0.3).long()
    mask[0, 0] = 1
    cos = angles.angle_cosines(s, ts, mask)
    ref = reference_cosines(s.double().numpy(), [t.double().numpy() for t in ts], mask.numpy())
    assert cos.shape == (n_t * (n_t - 1) // 2, int(mask.sum()))
    np.testing.assert_allclose(cos.numpy(), ref, rtol=0, atol=1e-12)
    stacked = angles.angle_cosines(s, torch.stack(ts), mask)  # a [T, B, L, H] tensor works the same
    assert torch.equal(cos, stacked)


def test_narrower_student_is_an_error():
    with pytest.raises(ConfigError, match="width 16 differs from the teacher width 32.*undefined"):
        angles.angle_cosines(torch.zeros(1, 2, 16), [torch.zeros(1, 2, 32)] * 2, torch.ones(1, 2))


def test_coincident_state_is_undefined_and_summary():
    # token 0: T1 coincides with S → the pairs with T1 are NaN there; token 1 regular
    s = torch.zeros(1, 2, 2)
    t1 = torch.tensor([[[0.0, 0.0], [1.0, 0.0]]])
    t2 = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])
    t3 = torch.tensor([[[1.0, 1.0], [-1.0, 0.0]]])
    cos = angles.angle_cosines(s, [t1, t2, t3], torch.ones(1, 2))
    assert math.isnan(cos[0, 0]) and math.isnan(cos[1, 0])
    assert cos[2, 0].item() == pytest.approx(1 / math.sqrt(2))
    summary = angles.summarize(cos, 3)
    assert summary.teacher_layers == [1, 2, 3] and summary.pairs == [(1, 2), (1, 3), (2, 3)]
    # per pair: (1,2): [nan, 1/√2]; (1,3): [nan, −1]; (2,3): [1/√2, −1/√2]
    r = 1 / math.sqrt(2)
    np.testing.assert_allclose(summary.mean_pair, [r, -1.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(summary.acute_pair, [1.0, 0.0, 0.5])
    assert summary.count.tolist() == [1, 1, 2] and summary.undefined == 2
    m = summary.mean_matrix
    assert np.isnan(np.diag(m)).all() and m[0, 1] == m[1, 0] == pytest.approx(r) and m[0, 2] == pytest.approx(-1)
    assert summary.acute_matrix[1, 2] == 0.5
    assert summary.mean_cos == pytest.approx((r - 1.0 + r - r) / 4)
    assert summary.frac_acute == pytest.approx(2 / 4)
    # batches add up: two halves give the whole
    halves = angles.AngleSummary([1, 2, 3]).update(cos[:, :1]).update(cos[:, 1:])
    np.testing.assert_allclose(halves.mean_pair, summary.mean_pair)
    assert halves.hist.sum() == 4


# --- models and the CLI ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_teacher(tiny_bert_dir):
    """A tiny random 4-layer BERT (width 32) with MiniLM's tokenizer."""
    return tiny_bert_dir


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory):
    from mlflow.tracking import MlflowClient

    tmp = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{tmp}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("kd", artifact_location=(tmp / "artifacts" / "kd").as_uri())
    client.create_experiment("angles", artifact_location=(tmp / "artifacts" / "angles").as_uri())
    return uri, client, exp


def test_cli_minilm_copy_student_end_to_end(tmp_path, mlflow_store, capsys):
    uri, client, _ = mlflow_store
    out = tmp_path / "ang"
    rc = angles.main(["--teacher", "minilm", "--student", "copy", "--layers", "3", "--samples", "16",
                      "--out", str(out), "--tracking-uri", uri, "--experiment", "angles"])
    assert rc == 0
    files = {"angles.csv", "hist.png", "heatmap_s0.png", "heatmap_s1.png", "heatmap_s2.png", "heatmap_s3.png"}
    assert {p.name for p in out.iterdir()} == files
    df = pd.read_csv(out / "angles.csv")
    assert len(df) == 4 * 15  # student states 0..3 x teacher pairs of 1..6
    assert set(df["student_layer"]) == {0, 1, 2, 3} and df["teacher_j"].min() == 1 and df["teacher_k"].max() == 6
    assert df["mean_cos"].between(-1, 1).all() and df["frac_acute"].between(0, 1).all()
    assert (df["n_tokens"] > 16).all()  # several valid tokens per example, padding excluded
    printed = capsys.readouterr().out
    assert "mean cos" in printed and "all" in printed
    exp = client.get_experiment_by_name("angles")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.data.tags["tunekd.role"] == "angles"
    assert 0 <= run.data.metrics["angles/frac_acute"] <= 1 and -1 <= run.data.metrics["angles/mean_cos"] <= 1
    assert "angles/mean_cos/s3" in run.data.metrics
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == files
    assert run.data.params["student.copied_teacher_layers"] == "[2, 4, 6]"  # 1-based, as every output


def _log_student(client, exp_id, tiny_teacher, tmp_path, *, with_artifact=True):
    """A study parent run naming the teacher, and a trial run with a trained-looking student logged as student/."""
    from tunekd.models import family_for
    from tunekd.study import StudentConfig
    from tunekd.students import build_student
    from tunekd.tasks import get_task

    spec = get_task("synthetic")
    parent = client.create_run(exp_id, tags={"tunekd.role": "study"})
    client.log_param(parent.info.run_id, "teacher.path", str(tiny_teacher))
    child = client.create_run(exp_id, tags={"mlflow.parentRunId": parent.info.run_id, "tunekd.trial_id": "t0",
                                            "tunekd.status": "completed"})
    for k, v in {"task.name": "synthetic", "task.max_length": "32", "student.init": "copy"}.items():
        client.log_param(child.info.run_id, k, v)
    if with_artifact:
        from transformers import AutoConfig

        family = family_for(AutoConfig.from_pretrained(tiny_teacher))
        teacher = family.load(str(tiny_teacher), spec)
        student = build_student(teacher, family, spec, StudentConfig(layers=2, init="copy"), seed=1).model
        with torch.no_grad():  # "trained": move away from the copied weights
            for p in student.parameters():
                p.add_(0.01 * torch.randn_like(p))
        folder = tmp_path / "student"
        student.save_pretrained(folder)
        client.log_artifacts(child.info.run_id, str(folder), "student")
    return child.info.run_id


def test_cli_student_from_mlflow_run(tmp_path, mlflow_store, tiny_teacher):
    uri, client, exp_id = mlflow_store
    run_id = _log_student(client, exp_id, tiny_teacher, tmp_path)
    out = tmp_path / "from_run"
    # the teacher, task and max length default to the trial's
    rc = angles.main(["--student", f"run:{run_id}", "--tracking-uri", uri, "--samples", "8", "--out", str(out)])
    assert rc == 0
    df = pd.read_csv(out / "angles.csv")
    assert len(df) == 3 * 6  # student states 0..2 x pairs of teacher layers 1..4
    # the same model loaded from the local folder gives the same cosines
    out2 = tmp_path / "from_folder"
    rc = angles.main(["--teacher", str(tiny_teacher), "--student", str(tmp_path / "student"), "--samples", "8",
                      "--max-length", "32", "--out", str(out2)])
    assert rc == 0
    pd.testing.assert_frame_equal(df, pd.read_csv(out2 / "angles.csv"))


def test_kept_student_in_ray_results_by_run_id_and_best(tmp_path, mlflow_store, tiny_teacher, capsys):
    """A trial whose weights `tune.keep_students` kept in ray_results/ (no artifact): `--student run:ID` and
    `--best EXPERIMENT` rebuild it from the trial's student.* params on its teacher; the cosines equal those of
    the same weights saved as a transformers folder. `--best` skips a better trial that kept nothing."""
    from safetensors.torch import save_file
    from transformers import AutoConfig

    from tunekd.models import family_for
    from tunekd.study import StudentConfig, flatten
    from tunekd.students import build_student
    from tunekd.tasks import get_task

    uri, client, _ = mlflow_store
    exp_id = client.create_experiment("kept", artifact_location=(tmp_path / "art").as_uri())
    spec = get_task("synthetic")
    family = family_for(AutoConfig.from_pretrained(tiny_teacher))
    teacher = family.load(str(tiny_teacher), spec)
    cfg = StudentConfig(layers=2, init="random")
    student = build_student(teacher, family, spec, cfg, seed=3).model
    ray_dir = tmp_path / "ray_results" / "kept-20260101-000000"
    ckpt = ray_dir / "tune_trainable_ab12c_00001_1_x" / "checkpoint_000002"
    ckpt.mkdir(parents=True)
    tensors = {f"student.{k}": v.clone().contiguous() for k, v in student.state_dict().items()}
    save_file(tensors, str(ckpt / "model.safetensors"))
    student.save_pretrained(tmp_path / "same")
    parent = client.create_run(exp_id, tags={"tunekd.role": "study", "tunekd.ray_path": str(ray_dir),
                                             "tunekd.best.metric": "eval/accuracy"})
    client.log_param(parent.info.run_id, "teacher.path", str(tiny_teacher))
    ids = {}
    for trial_id, acc in (("ab12c_00000", 90.0), ("ab12c_00001", 80.0)):
        child = client.create_run(exp_id, tags={"mlflow.parentRunId": parent.info.run_id, "tunekd.trial_id": trial_id,
                                                "tunekd.status": "completed"})
        params = {"task.name": "synthetic", "task.max_length": "32",
                  **{f"student.{k}": json.dumps(v) if not isinstance(v, str) else v
                     for k, v in flatten(cfg.model_dump(mode="json")).items()}}
        for k, v in params.items():
            client.log_param(child.info.run_id, k, v)
        client.log_metric(child.info.run_id, "eval/accuracy", acc, step=2)
        ids[trial_id] = child.info.run_id
    kept = ids["ab12c_00001"]
    rc = angles.main(["--student", f"run:{kept}", "--tracking-uri", uri, "--samples", "8", "--out", str(tmp_path / "a")])
    assert rc == 0
    rc = angles.main(["--best", "kept", "--tracking-uri", uri, "--samples", "8", "--out", str(tmp_path / "b")])
    assert rc == 0 and f"run {kept}" in capsys.readouterr().err
    rc = angles.main(["--teacher", str(tiny_teacher), "--student", str(tmp_path / "same"), "--samples", "8",
                      "--max-length", "32", "--out", str(tmp_path / "c")])
    assert rc == 0
    ref = pd.read_csv(tmp_path / "c" / "angles.csv")
    assert len(ref) == 3 * 6
    for out in ("a", "b"):
        pd.testing.assert_frame_equal(pd.read_csv(tmp_path / out / "angles.csv"), ref)
    capsys.readouterr()
    # the better trial kept nothing: by run id it is one error line
    rc = angles.main(["--student", f"run:{ids['ab12c_00000']}", "--tracking-uri", uri, "--out", str(tmp_path / "d")])
    err = capsys.readouterr().err
    assert rc == 2 and "no weights kept" in err and len(err.strip().splitlines()) == 1
    rc = angles.main(["--best", "nosuch", "--tracking-uri", uri, "--out", str(tmp_path / "e")])
    assert rc == 2 and "nosuch" in capsys.readouterr().err


def test_cli_errors(tmp_path, mlflow_store, tiny_teacher, capsys):
    uri, client, exp_id = mlflow_store
    bare = _log_student(client, exp_id, tiny_teacher, tmp_path, with_artifact=False)
    rc = angles.main(["--student", f"run:{bare}", "--tracking-uri", uri, "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert rc == 2 and "no artifact folder 'student/'" in err and len(err.strip().splitlines()) == 1

    # a narrower student: undefined angles
    from transformers import BertConfig, BertForSequenceClassification

    narrow = tmp_path / "narrow"
    BertForSequenceClassification(BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=2,
                                             num_attention_heads=2, intermediate_size=32,
                                             max_position_embeddings=128)).save_pretrained(narrow)
    rc = angles.main(["--teacher", str(tiny_teacher), "--student", str(narrow), "--out", str(tmp_path / "y")])
    err = capsys.readouterr().err
    assert rc == 2 and "width 16 differs from the teacher width 32" in err

    rc = angles.main(["--teacher", str(tiny_teacher), "--student", "nowhere", "--out", str(tmp_path / "z")])
    assert rc == 2 and "expected random, copy, run:<mlflow_run_id>" in capsys.readouterr().err


def test_help_text(capsys):
    with pytest.raises(SystemExit):
        angles.main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--teacher", "--student", "--layers", "--task", "--samples", "--out", "--experiment"):
        assert flag in text
