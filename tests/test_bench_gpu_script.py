"""benchmarks/gpu_random_init.py (issue 10's GPU check) runs end to end on the CPU: a tiny teacher, a few rows."""

from __future__ import annotations

import importlib.util
import json

from tests.conftest import REPO


def test_gpu_random_init_main_on_cpu(tmp_path, tiny_bert_dir, capsys, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # the script sets it for --device cpu; restored afterwards
    monkeypatch.setenv("TUNEKD_THREADS", "1")
    data = tmp_path / "sst2"
    data.mkdir()
    words = ["good", "bad", "fine", "awful", "great", "dull"]
    for split, n in (("train", 32), ("dev", 16)):
        lines = [f"{words[i % 6]} film number {i} \t{(i % 6) % 2 == 0:d}" for i in range(n)]
        (data / f"{split}.tsv").write_text("sentence\tlabel\n" + "\n".join(lines) + "\n")
    spec = importlib.util.spec_from_file_location("gpu_random_init", REPO / "benchmarks" / "gpu_random_init.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "out"
    assert script.main(["--device", "cpu", "--epochs", "1", "--teacher-epochs", "1", "--teacher", str(tiny_bert_dir),
                        "--data", str(data), "--workdir", str(tmp_path / "work"), "--out", str(out)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    result = json.loads(last)
    assert set(result["accuracy"]) == {"none", "forward"}
    assert result["gap"] == result["accuracy"]["forward"] - result["accuracy"]["none"]
    assert result["rows"] == 32 and result["precision"] == "fp32" and result["epochs"] == 1
    assert all(v > 0 for v in result["step_s"].values())
    assert json.loads((out / "result.json").read_text())["accuracy"] == result["accuracy"]


def test_gpu_groups_main_on_cpu(tmp_path, capsys):
    """benchmarks/gpu_groups.py (issue 21's GPU check) on the CPU: the MiniLM shape, tiny batches, K = 1, 2."""
    spec = importlib.util.spec_from_file_location("gpu_groups", REPO / "benchmarks" / "gpu_groups.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "out"
    assert script.main(["--device", "cpu", "--shape", "minilm", "--length", "8", "--batch-size", "2", "--reps", "1",
                        "--warmup", "0", "--ks", "1,2", "--threads", "1", "--out", str(out)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    step = result["step"]
    assert sorted(step["group_s"]) == ["1", "2"] and step["shape"] == "minilm" and step["device"] == "cpu"
    assert result["k2_over_plain"] == round(step["group_s"]["2"] / 2 / step["plain_s"], 3)
    assert result["k2_over_plain_cpu"] == round(step["per_member_over_plain_cpu"]["2"], 3) > 0
    assert json.loads((out / "result.json").read_text())["step"]["plain_s"] == step["plain_s"]
