"""The study's storage: `tune.storage_path` as a local folder or a URI Ray Tune accepts (`s3://bucket/prefix`,
`gs://bucket/prefix`), and everything tunekd itself reads from and writes to it. Nothing else in tunekd
talks to object storage.

Storage I/O goes through `pyarrow.fs`, as Ray Tune's own does, so one configuration serves both:
credentials come only from the provider chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE,
an instance or pod role; GOOGLE_APPLICATION_CREDENTIALS for GCS), and an S3-compatible endpoint (MinIO,
Ceph, moto) from AWS_ENDPOINT_URL, which pyarrow, Ray and boto3 (MLflow) all honour. A study file holds
neither (`check_uri` refuses a URI with them), and no message here prints them.

- `check_writable(uri)`: the bucket is reachable and writable (a probe object written, read back, deleted);
  a ConfigError line otherwise.
- `publish(folder, uri)`: upload a local folder, its files first and last `COMPLETE`, which records every
  file's size. Object stores have no atomic rename; a folder without `COMPLETE` (an upload cut short) is
  not there for `complete`, and one whose files are not the recorded sizes is refused (`TornUpload`).
- `local_copy(uri, key)`: the node-local copy of a published folder: read once into
  `<node cache>/<key>` (downloaded into a temporary folder, sizes checked, renamed into place: atomic),
  then reused by every process of the node; the least recently used copies are deleted beyond the node
  cache's size bound (`TUNEKD_NODE_CACHE` folder, default ~/.cache/tunekd/storage;
  `TUNEKD_NODE_CACHE_GB`, default 50).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

from tunekd.errors import ConfigError

COMPLETE = ".tunekd-complete.json"  # written last by `publish`: {"files": {relative path: size}}
SCHEMES = ("s3", "gs", "gcs")  # remote storage Ray Tune and pyarrow.fs know (besides local folders)
NODE_CACHE_ENV = "TUNEKD_NODE_CACHE"
NODE_CACHE_GB_ENV = "TUNEKD_NODE_CACHE_GB"
DEFAULT_NODE_CACHE_GB = 50.0


class TornUpload(RuntimeError):
    """A published folder whose files are not what its `COMPLETE` record says (an upload cut short)."""


# --- names --------------------------------------------------------------------------------------


def scheme(path: str) -> str:
    """The URI scheme of `path` ('' for a local path, also for file://)."""
    s = urlsplit(path).scheme.lower() if "://" in path else ""
    return "" if s == "file" else s


def is_remote(path: str) -> bool:
    return bool(scheme(path))


def check_uri(path: str, key: str = "tune.storage_path") -> None:
    """A storage path is a local folder or `<scheme>://bucket[/prefix]` with a known scheme, no credentials
    and no query (the endpoint comes from AWS_ENDPOINT_URL); a ConfigError line otherwise, starting with
    `key` (none when `key` is '': the study validator names it)."""
    if "://" not in path:
        return
    parts = urlsplit(path)
    s = parts.scheme.lower()
    if s == "file":
        return
    what = f"{key} " if key else ""
    if parts.username or parts.password or "@" in parts.netloc:  # the URI itself is not repeated: a secret
        raise ConfigError(f"{what}{s}://...: credentials do not go in the study file; remove them from the URI and "
                          "set them in the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, a profile or a role)")
    if s not in SCHEMES:
        raise ConfigError(f"{what}{path!r}: scheme {s!r} is not supported; use a local folder, s3://bucket/prefix "
                          "or gs://bucket/prefix")
    if parts.query or parts.fragment:
        raise ConfigError(f"{what}{s}://{parts.netloc}{parts.path}?...: a storage URI takes no query; give an "
                          "S3-compatible endpoint in AWS_ENDPOINT_URL (e.g. http://minio:9000)")
    if not parts.netloc:
        raise ConfigError(f"{what}{path!r}: no bucket; expected {s}://bucket/prefix")


def resolve(path: str) -> str:
    """A storage path in one canonical spelling: a local one absolute (symlinks resolved), a URI
    `scheme://bucket/prefix` without a trailing slash (gcs:// spelled gs://)."""
    if not is_remote(path):
        if path.startswith("file://"):
            path = urlsplit(path).path
        return str(Path(path).expanduser().resolve())
    parts = urlsplit(path)
    s = "gs" if parts.scheme.lower() == "gcs" else parts.scheme.lower()
    tail = "/".join(p for p in parts.path.split("/") if p)
    return f"{s}://{parts.netloc}" + (f"/{tail}" if tail else "")


def join(base: str, *parts: str) -> str:
    """`base` (a local path or a URI) with `parts` appended."""
    if not is_remote(base):
        return str(Path(base).joinpath(*parts))
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def is_under(path: str, root: str) -> bool:
    """`path` lies strictly under `root` (both resolved; a URI only under a URI of the same bucket)."""
    path, root = resolve(path), resolve(root)
    if is_remote(path) != is_remote(root):
        return False
    if not is_remote(path):
        return Path(path).is_relative_to(root) and path != root
    return path.startswith(root.rstrip("/") + "/")


# --- the file system ----------------------------------------------------------------------------


def filesystem(path: str):
    """(pyarrow file system, path within it) of a local path or URI."""
    import pyarrow.fs as pafs

    if not is_remote(path):
        return pafs.LocalFileSystem(), resolve(path)
    return pafs.FileSystem.from_uri(resolve(path))


def reason(exc: BaseException) -> str:
    """An error's first line without request ids (no credentials are ever in it: pyarrow does not print them)."""
    line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return line.split(" (Request ID:")[0]


def check_writable(path: str, key: str = "tune.storage_path") -> None:
    """The storage at `path` (a URI) is reachable and writable: a probe object is written under it, read
    back and deleted. A ConfigError line otherwise (the endpoint named, never the credentials)."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    where = f" (endpoint {endpoint} from AWS_ENDPOINT_URL)" if endpoint and scheme(path) == "s3" else ""
    probe = join(path, f".tunekd-probe-{uuid.uuid4().hex}")
    try:
        fs, p = filesystem(probe)
        with fs.open_output_stream(p) as out:
            out.write(b"tunekd")
        with fs.open_input_stream(p) as inp:
            back = inp.read()
        fs.delete_file(p)
    except Exception as exc:  # noqa: BLE001 - any failure of the probe is the one line
        raise ConfigError(f"{key} {resolve(path)!r} is not reachable and writable{where}: {reason(exc)}") from None
    if back != b"tunekd":
        raise ConfigError(f"{key} {resolve(path)!r}: a probe object read back differs from what was written")


def exists(path: str) -> bool:
    import pyarrow.fs as pafs

    fs, p = filesystem(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def read_bytes(path: str) -> bytes:
    fs, p = filesystem(path)
    with fs.open_input_stream(p) as f:
        return f.read()


def files(fs, root: str) -> dict[str, int]:
    """{path relative to `root`: size} of the files under `root`."""
    import pyarrow.fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    base = root.rstrip("/") + "/"
    return {i.path[len(base):]: int(i.size) for i in infos if i.type == pafs.FileType.File}


# --- publishing and reading folders -------------------------------------------------------------


def record(path: str) -> dict | None:
    """The `COMPLETE` record of the folder published at `path`, or None (not there, or an upload cut short)."""
    try:
        return json.loads(read_bytes(join(path, COMPLETE)))
    except (FileNotFoundError, OSError, ValueError):
        return None


def complete(path: str) -> bool:
    return record(path) is not None


def publish(folder: str | Path, path: str) -> int:
    """Upload local `folder` to `path` (a URI or a local folder), `COMPLETE` last; returns the bytes uploaded."""
    import pyarrow.fs as pafs

    folder = Path(folder)
    sizes = {str(f.relative_to(folder)): f.stat().st_size for f in sorted(folder.rglob("*"))
             if f.is_file() and f.name != COMPLETE}
    fs, root = filesystem(path)
    local = pafs.LocalFileSystem()
    for name in sizes:
        if isinstance(fs, pafs.LocalFileSystem):  # object stores have no folders to create
            fs.create_dir(f"{root}/{name}".rsplit("/", 1)[0], recursive=True)
        pafs.copy_files(str(folder / name), f"{root}/{name}", source_filesystem=local, destination_filesystem=fs)
    if isinstance(fs, pafs.LocalFileSystem):
        fs.create_dir(root, recursive=True)
    with fs.open_output_stream(f"{root}/{COMPLETE}") as out:
        out.write(json.dumps({"files": sizes}).encode())
    return sum(sizes.values())


def download(path: str, folder: str | Path) -> dict:
    """Copy the folder published at `path` into the new local `folder`; returns its record. Raises
    FileNotFoundError when nothing is published there, `TornUpload` when its files are not the recorded ones."""
    import pyarrow.fs as pafs

    rec = record(path)
    if rec is None:
        raise FileNotFoundError(f"nothing published at {resolve(path)} (no {COMPLETE})")
    fs, root = filesystem(path)
    present = files(fs, root)
    bad = [n for n, size in rec["files"].items() if present.get(n) != size]
    if bad:
        raise TornUpload(f"{resolve(path)}: {bad[0]} is missing or not the size its {COMPLETE} records "
                         f"({len(bad)} of {len(rec['files'])} files); refusing a torn upload")
    folder = Path(folder)
    folder.mkdir(parents=True)
    local = pafs.LocalFileSystem()
    for name in rec["files"]:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(f"{root}/{name}", str(folder / name), source_filesystem=fs, destination_filesystem=local)
        if (folder / name).stat().st_size != rec["files"][name]:  # changed while we read it
            raise TornUpload(f"{resolve(path)}: {name} changed size while it was read")
    (folder / COMPLETE).write_text(json.dumps(rec))
    return rec


# --- the node-local cache -----------------------------------------------------------------------


def node_cache_root() -> Path:
    env = os.environ.get(NODE_CACHE_ENV)
    root = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tunekd" / "storage"
    return root.expanduser().resolve()


def node_cache_bytes() -> int:
    return int(float(os.environ.get(NODE_CACHE_GB_ENV, DEFAULT_NODE_CACHE_GB)) * 1024**3)


def _entries(root: Path) -> list[Path]:
    """The complete copies in the node cache (`<root>/<kind>/<key>/COMPLETE`)."""
    return [m.parent for m in root.glob(f"*/*/{COMPLETE}")]


def local_copy(path: str, key: str, *, root: str | Path | None = None, max_bytes: int | None = None) -> tuple[Path, bool]:
    """(the node-local folder holding the folder published at `path`, whether it was downloaded now).

    `key` (`<kind>/<fingerprint>`, e.g. `teacher_cache/<cache key>`) names it in the node cache: a copy made
    by any process of this node is reused; a new one is downloaded into a temporary folder and renamed into
    place (a reader never sees half a copy; of two processes downloading at once, one copy stays). Afterwards
    the least recently used copies, other than this one, are deleted while the cache holds more than
    `max_bytes`. Raises as `download` does."""
    root = Path(root) if root is not None else node_cache_root()
    target = root / key
    fetched = False
    if not (target / COMPLETE).is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
        try:
            download(path, tmp / "c")
            try:
                os.rename(tmp / "c", target)
                fetched = True
            except OSError:
                if not (target / COMPLETE).is_file():  # not another process's finished copy: a leftover
                    os.rename(target, tmp / "stale")
                    os.rename(tmp / "c", target)
                    fetched = True
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    now = time.time()
    os.utime(target / COMPLETE, (now, now))  # last use, for the LRU order
    evict(root, max_bytes if max_bytes is not None else node_cache_bytes(), keep=target)
    return target, fetched


def adopt(folder: str | Path, key: str, *, root: str | Path | None = None) -> Path:
    """Move a folder just published from this node (`publish`) into the node cache as `key`, so that this
    node's trials need not download it again. Returns where it is."""
    root = Path(root) if root is not None else node_cache_root()
    target = root / key
    folder = Path(folder)
    if not (folder / COMPLETE).is_file():
        sizes = {str(f.relative_to(folder)): f.stat().st_size for f in folder.rglob("*") if f.is_file()}
        (folder / COMPLETE).write_text(json.dumps({"files": sizes}))
    target.parent.mkdir(parents=True, exist_ok=True)
    if (target / COMPLETE).is_file():
        shutil.rmtree(folder, ignore_errors=True)
        return target
    if target.exists():
        shutil.rmtree(target)
    os.rename(folder, target)
    return target


def evict(root: Path, max_bytes: int, *, keep: Path | None = None) -> list[Path]:
    """Delete the least recently used copies (by the time of their `COMPLETE` record) until the node cache
    holds at most `max_bytes`; `keep` stays. A copy a process has memory-mapped stays readable by it (the
    files are unlinked, not overwritten). Returns what was deleted."""
    entries = sorted(_entries(Path(root)), key=lambda e: (e / COMPLETE).stat().st_mtime)
    sizes = {e: sum(f.stat().st_size for f in e.rglob("*") if f.is_file()) for e in entries}
    total = sum(sizes.values())
    gone = []
    for e in entries:
        if total <= max_bytes:
            break
        if keep is not None and e.resolve() == Path(keep).resolve():
            continue
        shutil.rmtree(e, ignore_errors=True)
        total -= sizes[e]
        gone.append(e)
    return gone
