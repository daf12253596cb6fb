"""What a node pays to read a published teacher cache from object storage once, against the trials after it
that find the node's copy (`tunekd.storage.local_copy`), on moto's S3 server on 127.0.0.1.

    python benchmarks/storage_cache.py                 # a 64 MB folder (4 files), 3 repetitions
    python benchmarks/storage_cache.py --mb 256 --reps 5

(a) the first read on a node: download into the node cache (temporary folder, size checks, rename);
(b) a later read on that node: the copy found and its last use recorded. Medians over --reps, each (a) into
a fresh node cache. moto is a Python server: its throughput is not S3's; compare (a) with (b), and the
publish time with (a). Last line: JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.helpers import MotoS3, environ  # noqa: E402
from tunekd import storage  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=int, default=64, help="size of the published folder (4 files)")
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tunekd-bench-") as tmp:
        tmp = Path(tmp)
        s3 = MotoS3(tmp)
        try:
            s3.create_bucket("bench")
            with environ(s3.env):
                out = run(tmp, args.mb, args.reps)
        finally:
            s3.stop()
    print(f"publish {out['publish_s']:.2f} s; first read on a node {out['first_read_s']:.2f} s "
          f"({out['first_read_mb_s']:.0f} MB/s); a later read {out['later_read_s'] * 1e3:.2f} ms; "
          f"ratio {out['first_over_later']:.0f}")
    print(json.dumps(out))


def run(tmp: Path, mb: int, reps: int) -> dict:
    src = tmp / "src"
    src.mkdir()
    chunk = bytes(range(256)) * 4096  # 1 MiB
    for i in range(4):
        with open(src / f"part{i}.bin", "wb") as f:
            for _ in range(mb // 4):
                f.write(chunk)
    uri = "s3://bench/teacher_cache/key"
    t0 = time.perf_counter()
    storage.publish(src, uri)
    publish_s = time.perf_counter() - t0
    first, later = [], []
    for r in range(reps):
        node = tmp / f"node{r}"
        t0 = time.perf_counter()
        _, fetched = storage.local_copy(uri, "teacher_cache/key", root=node)
        first.append(time.perf_counter() - t0)
        assert fetched
        t0 = time.perf_counter()
        _, fetched = storage.local_copy(uri, "teacher_cache/key", root=node)
        later.append(time.perf_counter() - t0)
        assert not fetched
    a, b = statistics.median(first), statistics.median(later)
    size = sum(f.stat().st_size for f in src.iterdir())
    return {"mb": size / 2**20, "reps": reps, "publish_s": publish_s, "first_read_s": a, "later_read_s": b,
            "first_read_mb_s": size / 2**20 / a, "first_over_later": a / b}


if __name__ == "__main__":
    main()
