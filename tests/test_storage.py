"""tunekd.storage against a real S3 HTTP endpoint on 127.0.0.1 (moto's standalone server): URI checks, the
reachability/write probe, publishing with a completion record, torn uploads refused, the node-local cache
(atomic, keyed, LRU size bound)."""

from __future__ import annotations

import json
import os

import pytest

from tests.helpers import MotoS3, environ
from tunekd import storage
from tunekd.errors import ConfigError


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = MotoS3(tmp_path_factory.mktemp("moto"))
    server.create_bucket("bkt")
    try:
        with environ(server.env):
            yield server
    finally:
        server.stop()


def _folder(path, sizes: dict[str, int]):
    path.mkdir(parents=True)
    for name, n in sizes.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(bytes(range(256)) * (n // 256) + b"x" * (n % 256))
    return path


# --- names (no server) ----------------------------------------------------------------------------


@pytest.mark.parametrize("uri, words", [
    ("ftp://host/x", "scheme 'ftp' is not supported"),
    ("s3://AKIA:secret@bkt/x", "credentials do not go in the study file"),
    ("s3://bkt/x?endpoint_override=http://127.0.0.1:9000", "AWS_ENDPOINT_URL"),
    ("s3:///x", "no bucket"),
])
def test_check_uri_refuses(uri, words):
    with pytest.raises(ConfigError, match=words) as e:
        storage.check_uri(uri)
    assert "secret" not in str(e.value)


def test_names():
    assert storage.resolve("s3://bkt//a/b/") == "s3://bkt/a/b"
    assert storage.resolve("gcs://bkt/a") == "gs://bkt/a"
    assert storage.join("s3://bkt/a/", "/b", "c") == "s3://bkt/a/b/c"
    assert storage.is_under("s3://bkt/a/run-1", "s3://bkt/a/")
    assert not storage.is_under("s3://bkt/ab/run-1", "s3://bkt/a")  # a prefix of the name is not a folder
    assert not storage.is_under("s3://bkt/a", "s3://bkt/a")
    assert not storage.is_under("s3://other/a/run", "s3://bkt/a")
    assert not storage.is_under("/tmp/a/run", "s3://bkt/a")
    assert storage.is_under("/tmp/a/../a/run", "/tmp/a")
    storage.check_uri("s3://bkt/prefix")
    storage.check_uri("gs://bkt")
    storage.check_uri("ray_results")


# --- against the endpoint -------------------------------------------------------------------------


def test_check_writable(s3):
    storage.check_writable("s3://bkt/study")
    assert storage.files(*storage.filesystem("s3://bkt/study")) == {}  # the probe is deleted
    with pytest.raises(ConfigError, match=r"'s3://nobucket/x' is not reachable and writable \(endpoint "
                                          rf"{s3.endpoint} from AWS_ENDPOINT_URL\)") as e:
        storage.check_writable("s3://nobucket/x")
    assert "\n" not in str(e.value) and s3.env["AWS_SECRET_ACCESS_KEY"] not in str(e.value)


def test_publish_download_and_torn(s3, tmp_path):
    src = _folder(tmp_path / "src", {"a.bin": 1000, "sub/b.json": 10})
    uri = "s3://bkt/pub/one"
    assert not storage.complete(uri)
    assert storage.publish(src, uri) == 1010
    assert storage.record(uri) == {"files": {"a.bin": 1000, "sub/b.json": 10}}
    rec = storage.download(uri, tmp_path / "got")
    assert rec["files"]["a.bin"] == 1000
    assert (tmp_path / "got" / "a.bin").read_bytes() == (src / "a.bin").read_bytes()
    assert (tmp_path / "got" / "sub" / "b.json").read_bytes() == (src / "sub" / "b.json").read_bytes()
    # an upload cut short before its record: not there
    fs, root = storage.filesystem("s3://bkt/pub/cut")
    with fs.open_output_stream(f"{root}/a.bin") as out:
        out.write(b"partial")
    assert not storage.complete("s3://bkt/pub/cut")
    with pytest.raises(FileNotFoundError):
        storage.download("s3://bkt/pub/cut", tmp_path / "cut")
    # a file replaced by a shorter one after the record: refused, and nothing left locally
    with fs.open_output_stream(f"{root.rsplit('/', 1)[0]}/one/a.bin") as out:
        out.write(b"short")
    with pytest.raises(storage.TornUpload, match="a.bin is missing or not the size"):
        storage.download(uri, tmp_path / "torn")
    assert not (tmp_path / "torn").exists()


def test_local_copy_is_keyed_atomic_and_lru(s3, tmp_path):
    root = tmp_path / "node"
    uris = []
    for i in range(3):
        uri = f"s3://bkt/lru/k{i}"
        storage.publish(_folder(tmp_path / f"s{i}", {"data.bin": 4000}), uri)
        uris.append(uri)
    path, fetched = storage.local_copy(uris[0], "kind/k0", root=root, max_bytes=10_000)
    assert fetched and path == root / "kind" / "k0" and (path / "data.bin").stat().st_size == 4000
    path, fetched = storage.local_copy(uris[0], "kind/k0", root=root, max_bytes=10_000)
    assert not fetched  # the node's copy is reused
    assert [p.name for p in root.joinpath("kind").iterdir()] == ["k0"]  # no temporary folder left
    storage.local_copy(uris[1], "kind/k1", root=root, max_bytes=10_000)
    os.utime(root / "kind/k1" / storage.COMPLETE, (1, 1))  # k1 the least recently used
    storage.local_copy(uris[2], "kind/k2", root=root, max_bytes=10_000)  # 3 x ~4 kB > 10 kB: one goes
    assert sorted(p.name for p in root.joinpath("kind").iterdir()) == ["k0", "k2"]
    # a bound smaller than the copy in use keeps that one
    path, _ = storage.local_copy(uris[1], "kind/k1", root=root, max_bytes=1)
    assert sorted(p.name for p in root.joinpath("kind").iterdir()) == ["k1"]
    assert json.loads((path / storage.COMPLETE).read_text())["files"] == {"data.bin": 4000}


def test_adopt_and_local_publish(tmp_path):
    """Publishing to a local folder works the same (a study on local storage uses the same code)."""
    src = _folder(tmp_path / "src", {"x.bin": 300})
    storage.publish(src, str(tmp_path / "store" / "k"))
    assert storage.complete(str(tmp_path / "store" / "k"))
    path = storage.adopt(src, "teachers/k", root=tmp_path / "node")
    assert path == tmp_path / "node" / "teachers" / "k" and not src.exists()
    again, fetched = storage.local_copy(str(tmp_path / "store" / "k"), "teachers/k", root=tmp_path / "node")
    assert again == path and not fetched


# --- the teacher cache on object storage ------------------------------------------------------------


def test_teacher_cache_on_s3_is_published_and_read_per_node(s3, tmp_path, monkeypatch, one_thread, family, teacher,
                                                            encoded):
    """The driver builds the cache, publishes it (manifest and completion record in the bucket) and keeps it
    as its node's copy; another node (another node cache) reads it from the bucket once, then locally; the
    values equal the driver's local build; a torn upload makes a trial run online and say why."""
    import numpy as np

    from tunekd import cache as tc

    driver_node, other_node = tmp_path / "driver_node", tmp_path / "other_node"
    monkeypatch.setenv(storage.NODE_CACHE_ENV, str(driver_node))
    info = tc.prepare(family, teacher, encoded["train"], "s3://bkt/study/teacher_cache", layers=(0, 2),
                      max_length=32, batch_size=16)
    assert info.mode == "full" and info.folder == f"s3://bkt/study/teacher_cache/{info.key}" and not info.reused
    rec = storage.record(info.folder)
    assert "manifest.json" in rec["files"] and info.nbytes == sum(rec["files"].values())
    local = tc.prepare(family, teacher, encoded["train"], tmp_path / "local_cache", layers=(0, 2), max_length=32,
                       batch_size=16)
    assert local.key == info.key  # the same cache, wherever it is kept
    again = tc.prepare(family, teacher, encoded["train"], "s3://bkt/study/teacher_cache", layers=(0, 2),
                       max_length=32, batch_size=16)
    assert again.reused and again.folder == info.folder and again.teacher_rows == 0

    tc._OPEN.clear()
    cache, source, why = tc.open_shared(info)
    assert (source, why) == ("local", "")  # the driver's node kept its copy
    monkeypatch.setenv(storage.NODE_CACHE_ENV, str(other_node))
    tc._OPEN.clear()
    cache, source, why = tc.open_shared(info)
    assert (source, why) == ("storage", "") and (other_node / "teacher_cache" / info.key / "manifest.json").is_file()
    tc._OPEN.clear()
    assert tc.open_shared(info)[1] == "local"  # read once per node
    reference = tc.TeacherCache.open(local.folder)
    for name in ("logits", "rows", "encoder.h2"):
        assert np.array_equal(np.asarray(cache.arrays[name]), np.asarray(reference.arrays[name])), name

    # a torn upload (a file cut short after its record) on a node without a copy: online, with the reason
    fs, root = storage.filesystem(info.folder)
    with fs.open_output_stream(f"{root}/logits.npy") as out:
        out.write(b"cut")
    monkeypatch.setenv(storage.NODE_CACHE_ENV, str(tmp_path / "third_node"))
    tc._OPEN.clear()
    cache, source, why = tc.open_shared(info)
    assert cache is None and source == "online" and "logits.npy is missing or not the size" in why
    assert tc.open_shared(info, arrays=reference)[1] == "object store"
    assert tc.open_shared(tc.CacheInfo(mode="off", reason="")) == (None, "online", "")


def test_cli_refuses_an_unwritable_bucket_in_one_line(s3, tmp_path, monkeypatch, capsys):
    """A study on a bucket that does not exist: one line naming it and the endpoint (no credentials), exit 2,
    nothing written in the working folder, nothing in the bucket."""
    import yaml

    from tunekd import run as cli

    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({
        "name": "bucket", "task": {"name": "synthetic", "synthetic": {"train_size": 16, "eval_size": 16}},
        "teacher": {"model": "minilm"}, "student": {"layers": 2}, "tune": {"storage_path": "s3://missing/x"}}))
    monkeypatch.chdir(tmp_path)
    assert cli.main([str(path)]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and "'s3://missing/x' is not reachable and writable" in err[0], err
    assert s3.endpoint in err[0] and s3.env["AWS_SECRET_ACCESS_KEY"] not in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.yaml"]


def test_finished_trials_pruned_on_s3(s3):
    """On object storage as on disk: a finished trial loses its optimizer and RNG states and gets its score,
    and only the best `keep` finished trials keep their weights (the same functions, through pyarrow.fs).
    The driver's trial paths come without the scheme (`driver.storage_uri` puts it back)."""
    from tunekd import checkpoints
    from tunekd.driver import storage_uri

    fs, root = storage.filesystem("s3://bkt/prune/exp")
    for trial in ("a", "b", "c", "running"):
        for name, n in ((checkpoints.WEIGHTS, 100), (checkpoints.OPTIM, 200), (checkpoints.RNG, 10),
                        (checkpoints.PROGRESS, 5)):
            with fs.open_output_stream(f"{root}/{trial}/checkpoint_000001/{name}") as out:
                out.write(b"x" * n)
    assert storage_uri("bkt/prune/exp/a", "s3://bkt/prune/exp") == "s3://bkt/prune/exp/a"
    assert storage_uri("/local/exp/a", "/local/exp") == "/local/exp/a"
    for trial, score in (("a", 50.0), ("b", 75.0), ("c", None)):
        checkpoints.finish_trial(storage_uri(f"{root}/{trial}", "s3://bkt/prune/exp"), score)
    kept = checkpoints.prune_students("s3://bkt/prune/exp", 1)
    assert kept == ["s3://bkt/prune/exp/b/checkpoint_000001"]
    left = storage.files(fs, root)
    assert sorted(k for k in left if k.endswith(checkpoints.WEIGHTS)) == [
        "b/checkpoint_000001/model.safetensors", "running/checkpoint_000001/model.safetensors"]
    assert sorted(k.split("/")[0] for k in left if k.endswith(checkpoints.OPTIM)) == ["running"]
    assert json.loads(storage.read_bytes("s3://bkt/prune/exp/b/checkpoint_000001/final.json")) == {"score": 75.0}
    assert json.loads(storage.read_bytes("s3://bkt/prune/exp/c/checkpoint_000001/final.json")) == {"score": None}


def test_driver_tags_the_cache_source_and_warns_when_online():
    """Tag `tunekd.cache_source` once per change of a trial's `perf/cache_source`; a console warning when a
    trial runs the teacher online although the driver built a cache (not when the cache is off)."""
    from types import SimpleNamespace

    from tunekd import cache as tc
    from tunekd.driver import CACHE_SOURCE_TAG, TrialCallback

    tags, lines = [], []
    tracker = SimpleNamespace(log_trial_metrics=lambda *a: None, tag_trial=lambda *a: tags.append(a),
                              trials={"t1": SimpleNamespace(status="running")})
    driver = SimpleNamespace(tracker=tracker, cache_sources={}, log=lines.append,
                             cache=tc.CacheInfo(mode="full", reason="", folder="s3://bkt/c/k", key="k"))
    cb = TrialCallback(driver)
    trial = SimpleNamespace(trial_id="t1", config={})
    for epoch, source in ((1, "storage"), (2, "storage"), (3, "online")):
        cb.on_trial_result(0, [], trial, {"epoch": epoch, "perf/cache_source": source, "eval/accuracy": 50.0})
    assert tags == [("t1", CACHE_SOURCE_TAG, "storage"), ("t1", CACHE_SOURCE_TAG, "online")]
    warnings = [ln for ln in lines if "WARNING" in ln]
    assert len(warnings) == 1 and "t1 runs the teacher online" in warnings[0] and "s3://bkt/c/k" in warnings[0]
    driver.cache, driver.cache_sources, lines[:] = tc.CacheInfo(mode="off", reason=""), {}, []
    cb.on_trial_result(0, [], trial, {"epoch": 1, "perf/cache_source": "online"})
    assert not [ln for ln in lines if "WARNING" in ln]
