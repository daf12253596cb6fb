"""Teacher-output cache: run the teacher once per study, let every trial read its outputs.

Before the trials the driver runs the teacher (eval mode, fp32) once over the training split and
stores what the trials need:

- `logits.bin`: [N, C] float32 logits (sequence-level; C floats a row, so kept exact);
- for each layer stack and each teacher hidden-state index any trial's layer map can use,
  `<stack>.h<k>.bin`: the states of the valid (non-padding) tokens only, packed row after row,
  [T, H] in fp16 (or bf16 bits as uint16 when a value would overflow fp16); `<stack>.starts.npy`
  and `<stack>.counts.npy` say where each row's tokens are;
- `manifest.json`, written last: shapes, dtypes, layers and the key.

Files are memory-mapped by the trials. The folder is `<root>/<key>`, the key hashing the teacher's
weights, its config and tokenizer, the data, the max length, the layer set and the stored dtype, so a
later study with the same key reuses it; it is written in a temporary folder and renamed into place
(atomic). `rows.npy` holds a fingerprint of each row's tokens, and every lookup checks the batch's
rows against it (and each row's valid-token count), so rows out of step with the cache are refused.

A size budget decides the mode: `full` (logits and hidden states), `logits` (logits only; a trial
that matches hidden states runs the teacher only up to its highest mapped layer) or `off`.

Across nodes: the folder lives under the study's storage path (`<tune.storage_path>/teacher_cache/<key>`).
On one machine, or a cluster whose nodes mount one filesystem, that is a folder every trial opens. On
object storage (`s3://`, `gs://`: `tunekd.storage`) the driver builds it on its node and publishes it
(files first, a completion record last); a trial's node reads it once into its node-local cache
(`storage.local_copy`, keyed by the cache key) and memory-maps it from there. Without either, the
driver may ship the arrays through Ray's object store (`load_arrays`, when they are small), and a trial
that finds nothing runs the teacher online. `open_shared` says which (`perf/cache_source`: local,
storage, object store, online).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from tunekd import storage
from tunekd.data import Encoded, batch_indices

FORMAT = 2  # 2: the key holds the teacher config and tokenizer; per-row fingerprints
MODES = ("full", "logits", "off")
DTYPES = ("fp16", "bf16")
GB = 1024**3


# --- what to store ------------------------------------------------------------------------------


def layers_from_maps(layer_maps: Iterable[Iterable[tuple[int, int]]]) -> set[int]:
    """The teacher hidden-state indices used by any of these layer maps."""
    return {int(t) for m in layer_maps for _, t in m}


def needed_layers(trials, points: Iterable[dict]) -> set[int]:
    """Union of the teacher indices that the trials at `points` (dicts of search overrides, e.g.
    `plan.trial_points(study)`) match with a hidden loss (λ > 0 and a non-empty map); `trials` is the
    study's `plan.Trials` (the memoised resolution of a trial config)."""
    out: set[int] = set()
    for point in points:
        trial = trials(point)
        if trial.study.distill.lambda_hid <= 0:
            continue
        out |= layers_from_maps([trial.plan.layer_map])
    return out


def weights_digest(state: dict) -> str:
    """Content hash of a state dict (numpy arrays or tensors), names and values."""
    h = hashlib.sha256()
    for name in sorted(state):
        v = state[name]
        arr = v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
        h.update(name.encode())
        h.update(str(arr.dtype).encode() + str(arr.shape).encode())
        h.update(np.ascontiguousarray(arr).data)
    return h.hexdigest()


def config_digest(config) -> str:
    """Hash of a model config (what the forward pass computes besides the weights: activation, norms,
    attention settings...), without its load path and tunekd's own metadata."""
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    d = {k: v for k, v in d.items() if k != "_name_or_path" and not str(k).startswith("tunekd_")}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
                    "merges.txt", "spiece.model", "sentencepiece.bpe.model", "added_tokens.json", "tokenizer.model")


def tokenizer_digest(tokenizer) -> str:
    """Hash of a tokenizer: a tokenizer object (its full definition: vocabulary, normaliser, pre- and
    post-processing, special tokens) or a model folder (its tokenizer files). "" when there is none."""
    if tokenizer is None:
        return ""
    h = hashlib.sha256()
    if isinstance(tokenizer, (str, Path)):
        folder = Path(tokenizer)
        for name in _TOKENIZER_FILES:
            f = folder / name
            if f.is_file():
                h.update(name.encode() + b"\0" + f.read_bytes())
        return h.hexdigest()
    h.update(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items()), default=str).encode())
    specials = getattr(tokenizer, "special_tokens_map", {})
    h.update(json.dumps(specials, sort_keys=True, default=str).encode())
    for attr in ("padding_side", "truncation_side", "model_max_length"):
        h.update(f"{attr}={getattr(tokenizer, attr, None)}".encode())
    return h.hexdigest()


def cache_key(teacher_digest: str, data_digest: str, max_length: int, layers: Iterable[int], dtype: str, *,
              config: str = "", tokenizer: str = "") -> str:
    """The cache folder's name: the teacher's weights, config (`config_digest`) and tokenizer
    (`tokenizer_digest`), the data, the max length, the stored layers and dtype."""
    blob = json.dumps({"format": FORMAT, "teacher": teacher_digest, "config": config, "tokenizer": tokenizer,
                       "data": data_digest, "max_length": max_length,
                       "layers": sorted(int(x) for x in layers), "dtype": dtype}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def row_fingerprints(batch: dict[str, torch.Tensor]) -> np.ndarray:
    """One int64 per row of a batch from its token ids at valid positions (weighted by position, so a
    row's content and order matter; independent of how wide the batch is padded). The cache stores
    them and a lookup compares, so a batch whose rows are not the rows `index` names is refused."""
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    b = ids.shape[0]
    length = ids.shape[-1]
    ids = ids.reshape(b, -1, length).long()
    valid = torch.ones_like(ids) if mask is None else (mask.reshape(b, -1, length) != 0).long()
    pos = torch.arange(1, length + 1, device=ids.device).view(1, 1, length)
    grp = torch.arange(ids.shape[1], device=ids.device).view(1, -1, 1) * 2 + 1
    return ((ids + 1) * valid * pos * grp).sum(dim=(1, 2)).cpu().numpy().astype(np.int64)


def estimate_bytes(data: Encoded, width: int, num_labels: int, layers: Iterable[int], stacks: int = 1) -> dict[str, int]:
    """Bytes of a logits-only and of a full cache of `data` (valid tokens of every stack: estimated
    from the attention mask; exact for the encoder family)."""
    n_layers = len(set(layers))
    tokens = int(np.asarray(data.lengths).sum()) * stacks
    logits = len(data) * num_labels * 4
    index = len(data) * 12 * stacks
    return {"logits": logits + index, "full": logits + index + tokens * n_layers * width * 2}


@dataclass
class CacheInfo:
    """What the driver decided and built; `reason` is the line to print and log."""

    mode: str  # full | logits | off
    reason: str
    folder: str | None = None
    key: str | None = None
    layers: tuple[int, ...] = ()
    reused: bool = False
    nbytes: int = 0
    teacher_rows: int = 0  # rows the teacher ran on to build it (0 when reused or off)
    seconds: float = 0.0

    def params(self) -> dict:
        """Flat values for the study's MLflow parent run."""
        return {f"teacher.cache_{k}": (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


def choose_mode(estimate: dict[str, int], budget_gb: float, *, layers: Iterable[int], needs_logits: bool,
                free_bytes: int | None = None) -> tuple[str, str]:
    """Full cache, logits only, or off, and why (one line)."""
    layers = sorted(set(layers))
    budget = float(budget_gb) * GB
    if budget <= 0:
        return "off", "teacher.cache_budget_gb is 0: the teacher runs online in every trial"
    if not layers and not needs_logits:
        return "off", "no trial uses the teacher (α_kl = 0 and no layer map): nothing to cache"
    room = budget if free_bytes is None else min(budget, 0.9 * free_bytes)
    where = "the budget" if free_bytes is None or budget <= 0.9 * free_bytes else "the free disk space"
    full, logits = estimate["full"], estimate["logits"]
    what = f"logits + hidden states {layers}" if layers else "logits"
    if full <= room:
        return "full", f"caching {what}: {_gb(full)} <= {where} {_gb(room)}; trials do not run the teacher"
    if logits <= room:
        return "logits", (f"caching logits only: logits + hidden states {layers} need {_gb(full)} > {where} "
                          f"{_gb(room)}; a trial runs the teacher up to its highest mapped layer")
    return "off", f"not caching: even the logits need {_gb(logits)} > {where} {_gb(room)}"


def _gb(n: float) -> str:
    return f"{n / GB:.3g} GB"


# --- building -----------------------------------------------------------------------------------


class _Overflow(Exception):
    pass


def _to_stored(x: torch.Tensor, dtype: str) -> np.ndarray:
    if dtype == "fp16":
        with np.errstate(over="ignore"):
            y = x.float().cpu().numpy().astype(np.float16)
        if not np.isfinite(y).all():
            raise _Overflow
        return y
    return x.float().to(torch.bfloat16).view(torch.int16).cpu().numpy().view(np.uint16)


@torch.no_grad()
def build(family, teacher, data: Encoded, folder: str | Path, *, layers: Iterable[int], key: str, dtype: str = "fp16",
          batch_size: int = 64, device: torch.device | str | None = None) -> dict:
    """Run `teacher` over `data` and write the cache files into `folder` (which must be new). Returns
    the manifest. Padding never enters the files: only positions where the stack's mask is 1."""
    layers = sorted(set(int(x) for x in layers))
    folder = Path(folder)
    folder.mkdir(parents=True)
    device = torch.device(device) if device is not None else next(teacher.parameters()).device
    was_training = teacher.training
    teacher.eval()
    n = len(data)
    logits = None
    fingerprints = None
    starts: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    pos: dict[str, int] = {}
    files: dict[tuple[str, int], object] = {}
    width = None
    from tunekd.progress import bar

    batches = batch_indices(data.lengths, batch_size, shuffle=False, bucket=True)
    rows = bar(n, "teacher cache", unit="row")
    try:
        for index in batches:
            rows.update(len(index))
            batch = {k: v.to(device) for k, v in data.batch(index).items() if k != "index"}
            if fingerprints is None:
                fingerprints = np.zeros(n, dtype=np.int64)
            fingerprints[index] = row_fingerprints(batch)
            out = family.forward(teacher, batch, hidden=bool(layers))
            if out.logits_mask is not None:
                raise NotImplementedError("the teacher cache stores sequence-level logits only")
            lg = out.logits.float().cpu().numpy()
            if logits is None:
                logits = np.zeros((n, lg.shape[-1]), dtype=np.float32)
            logits[index] = lg
            if not layers:
                continue
            for stack, states in out.hidden.items():
                if max(layers) >= len(states):
                    raise ValueError(f"cache layers {layers}: the teacher's {stack} has {len(states)} states")
                valid = out.masks[stack] != 0
                cnt = valid.sum(dim=1).cpu().numpy().astype(np.int64)
                if stack not in starts:
                    starts[stack] = np.zeros(n, dtype=np.int64)
                    counts[stack] = np.zeros(n, dtype=np.int64)
                    pos[stack] = 0
                starts[stack][index] = pos[stack] + np.cumsum(cnt) - cnt
                counts[stack][index] = cnt
                pos[stack] += int(cnt.sum())
                for k in layers:
                    x = states[k][valid]  # [n_valid, H], row after row, positions in order
                    width = int(x.shape[-1])
                    fh = files.get((stack, k))
                    if fh is None:
                        fh = files[(stack, k)] = open(folder / f"{stack}.h{k}.bin", "wb")
                    fh.write(np.ascontiguousarray(_to_stored(x, dtype)).tobytes())
    finally:
        rows.close()
        for fh in files.values():
            fh.close()
        teacher.train(was_training)
    np.save(folder / "logits.npy", logits)
    np.save(folder / "rows.npy", fingerprints)
    for stack in starts:
        np.save(folder / f"{stack}.starts.npy", starts[stack])
        np.save(folder / f"{stack}.counts.npy", counts[stack])
    manifest = {
        "format": FORMAT, "key": key, "rows": n, "num_labels": int(logits.shape[1]), "layers": layers,
        "dtype": dtype, "width": width, "stacks": {s: int(pos[s]) for s in starts},
        "mode": "full" if layers else "logits",
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def prepare(family, teacher, data: Encoded, root: str | Path, *, layers: Iterable[int], budget_gb: float = 2.0,
            max_length: int, needs_logits: bool = True, teacher_digest: str | None = None, dtype: str = "fp16",
            batch_size: int = 64, device=None, log: Callable[[str], None] | None = None,
            tokenizer=None) -> CacheInfo:
    """Decide (budget), then reuse `<root>/<key>` or build it atomically. `data` is the training split.
    `layers` is the union of the teacher indices the trials match (`needed_layers`). `tokenizer` (an
    object or a model folder) enters the key; None: the tokenizer files of the teacher's own folder
    (`teacher.name_or_path`) when it has them."""
    if dtype not in DTYPES:
        raise ValueError(f"cache dtype {dtype!r}; known: {', '.join(DTYPES)}")
    layers = sorted(set(int(x) for x in layers))
    remote = storage.is_remote(str(root))
    root = storage.resolve(str(root))
    # where it is built: beside its final place, or for object storage in this node's cache (then published)
    local_root = storage.node_cache_root() / "teacher_cache" if remote else Path(root)
    width = family.hidden_size(teacher.config)
    num_labels = int(getattr(teacher.config, "num_labels", 2))
    stacks = len(family.stacks(teacher))
    est = estimate_bytes(data, width, num_labels, layers, stacks)
    probe = local_root
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    mode, reason = choose_mode(est, budget_gb, layers=layers, needs_logits=needs_logits, free_bytes=free)
    if mode == "off":
        return CacheInfo(mode="off", reason=reason)
    stored_layers = layers if mode == "full" else []
    teacher_digest = teacher_digest or weights_digest(teacher.state_dict())
    cfg_digest = config_digest(teacher.config)
    if tokenizer is None:
        where = getattr(teacher, "name_or_path", "") or getattr(teacher.config, "_name_or_path", "")
        tokenizer = where if where and Path(where).is_dir() else None
    tok_digest = tokenizer_digest(tokenizer)
    t0 = time.perf_counter()
    last_error = None
    for dt in ((dtype, "bf16") if dtype == "fp16" else (dtype,)):
        key = cache_key(teacher_digest, data.digest(), max_length, stored_layers, dt, config=cfg_digest,
                        tokenizer=tok_digest)
        target = storage.join(root, key)
        found = storage.record(target) if remote else _valid(Path(target), key)
        if found:
            nbytes = sum(found["files"].values()) if remote else _folder_bytes(Path(target))
            return CacheInfo(mode=mode, reason=reason + " (reused)", folder=target, key=key,
                             layers=tuple(stored_layers), reused=True, nbytes=nbytes,
                             seconds=time.perf_counter() - t0)
        local_root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=local_root, prefix=f".{key}-"))
        try:
            if log:
                log(f"teacher cache: running the teacher once over {len(data)} rows -> {target}")
            build(family, teacher, data, tmp / "c", layers=stored_layers, key=key, dtype=dt,
                  batch_size=batch_size, device=device)
            nbytes = _folder_bytes(tmp / "c")
            if remote:  # published (completion record last), then kept as this node's copy
                storage.publish(tmp / "c", target)
                storage.adopt(tmp / "c", f"teacher_cache/{key}")
            else:
                _move_into_place(tmp, Path(target), key)
        except _Overflow:
            last_error = "fp16 overflow"
            continue
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        note = "" if dt == dtype else f" (stored as {dt}: {last_error})"
        return CacheInfo(mode=mode, reason=reason + note, folder=target, key=key, layers=tuple(stored_layers),
                         reused=False, nbytes=nbytes, teacher_rows=len(data), seconds=time.perf_counter() - t0)
    raise RuntimeError(f"teacher cache could not be built: {last_error}")  # pragma: no cover


def _move_into_place(tmp: Path, target: Path, key: str) -> None:
    """Rename the cache built at `tmp/c` to `target` (atomic: a half-written cache is never read)."""
    if target.exists() and not _valid(target, key):  # an incomplete leftover: move it away first
        os.rename(target, tmp / "stale")
    try:
        os.rename(tmp / "c", target)
    except OSError:
        if not _valid(target, key):  # another driver may have finished the same cache first
            raise


def for_study(study, family, teacher, encoded: dict[str, Encoded], points: Iterable[dict], *,
              trials=None, budget_gb: float | None = None, log: Callable[[str], None] | None = None,
              tokenizer=None) -> CacheInfo:
    """The driver's step: decide and build (or reuse) the cache of the training split for every trial at
    `points` (`plan.trial_points(study)`: every value of a grid/choice/randint dimension), under
    `<tune.storage_path>/teacher_cache/`. `trials` is the study's `plan.Trials` (built here when not
    given). The budget is `budget_gb`, else the study's `teacher.cache_budget_gb` (0 = off); the stored
    dtype `teacher.cache_dtype`. Returns the decision; its `reason` is the line to print and log."""
    from tunekd.device import device_for
    from tunekd.plan import Trials
    from tunekd.tasks import spec_for

    spec = spec_for(study.task)
    kind = spec.kind
    if kind not in ("classification", "regression"):
        info = CacheInfo(mode="off", reason=f"the teacher cache holds classification and regression outputs "
                                            f"only; task {spec.name!r} is {kind}: the teacher runs online")
        if log:
            log(f"teacher cache: off: {info.reason}")
        return info
    budget = study.teacher.cache_budget_gb if budget_gb is None else budget_gb
    points = list(points) or [{}]
    if trials is None:
        trials = Trials(study, family.num_layers(teacher.config), family.match_embeddings_default)
    layers = needed_layers(trials, points)
    needs_logits = any(trials(p).study.distill.alpha_kl > 0 for p in points)
    root = storage.join(storage.resolve(study.tune.storage_path), "teacher_cache")
    device = device_for()
    teacher.to(device)
    try:
        info = prepare(family, teacher, encoded["train"], root, layers=layers, budget_gb=budget,
                       max_length=study.task.max_length, needs_logits=needs_logits, device=device, log=log,
                       dtype=study.teacher.cache_dtype, tokenizer=tokenizer)
    finally:
        teacher.to("cpu")
    if log:
        log(f"teacher cache: {info.mode}: {info.reason}" + (f" [{info.folder}]" if info.folder else ""))
    return info


def _valid(folder: Path, key: str) -> bool:
    try:
        return json.loads((folder / "manifest.json").read_text()).get("key") == key
    except (OSError, ValueError):
        return False


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


# --- reading ------------------------------------------------------------------------------------


def _refuse_mismatch(got: np.ndarray, want: np.ndarray, rows: np.ndarray, describe: Callable[[int], str]) -> None:
    """ValueError naming the first batch row whose `got` differs from the cached `want` (`describe(i)`)."""
    bad = np.flatnonzero(got != want)
    if bad.size:
        raise ValueError(f"teacher cache: {describe(int(bad[0]))} ({bad.size} of {len(rows)} rows differ): was the "
                         "cache built from other data, or are the row numbers out of step with the batch?")


@dataclass
class TeacherCache:
    """Read side: the teacher's outputs for any rows of the cached split."""

    manifest: dict
    arrays: dict[str, np.ndarray] = field(repr=False)

    @classmethod
    def open(cls, folder: str | Path) -> "TeacherCache":
        folder = Path(folder)
        manifest = json.loads((folder / "manifest.json").read_text())
        arrays = {"logits": np.load(folder / "logits.npy", mmap_mode="r")}
        if (folder / "rows.npy").is_file():
            arrays["rows"] = np.load(folder / "rows.npy")
        store = np.float16 if manifest["dtype"] == "fp16" else np.uint16
        for stack, tokens in manifest["stacks"].items():
            arrays[f"{stack}.starts"] = np.load(folder / f"{stack}.starts.npy")
            arrays[f"{stack}.counts"] = np.load(folder / f"{stack}.counts.npy")
            for k in manifest["layers"]:
                arrays[f"{stack}.h{k}"] = np.memmap(folder / f"{stack}.h{k}.bin", dtype=store, mode="r",
                                                    shape=(tokens, manifest["width"]))
        return cls(manifest, arrays)

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(self.manifest["layers"])

    @property
    def rows(self) -> int:
        return int(self.manifest["rows"])

    def covers(self, layers: Iterable[int]) -> bool:
        return set(layers) <= set(self.layers)

    def check_rows(self, index: torch.Tensor, batch: dict[str, torch.Tensor]) -> None:
        """Raise ValueError unless each row of `batch` is the cached row its `index` entry names (per-row
        token fingerprints; a permuted or foreign batch is refused, not silently mismatched)."""
        if "rows" not in self.arrays:
            return
        rows = index.detach().cpu().numpy()
        got = row_fingerprints(batch)
        _refuse_mismatch(got, np.asarray(self.arrays["rows"][rows]), rows,
                         lambda i: f"batch row {i} is not cached row {int(rows[i])} (its tokens differ)")

    def logits(self, index: torch.Tensor, device=None) -> torch.Tensor:
        rows = index.detach().cpu().numpy()
        return torch.from_numpy(np.asarray(self.arrays["logits"][rows], dtype=np.float32)).to(device)

    def _tokens(self, stack: str, rows: np.ndarray) -> np.ndarray:
        """Positions in the packed arrays of the valid tokens of `rows`, row after row."""
        starts = self.arrays[f"{stack}.starts"][rows]
        counts = self.arrays[f"{stack}.counts"][rows]
        total = int(counts.sum())
        within = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
        return np.repeat(starts, counts) + within

    def hidden(self, stack: str, index: torch.Tensor, mask: torch.Tensor, layers: Iterable[int]) -> dict[int, torch.Tensor]:
        """Teacher states `layers` for the rows `index`, unpacked to [B, L, H] float32 on `mask`'s device:
        valid positions (mask != 0) hold the cached values, padded positions zeros."""
        rows = index.detach().cpu().numpy()
        tokens = self._tokens(stack, rows)
        valid = mask != 0
        got = valid.sum(dim=1).cpu().numpy()
        want = np.asarray(self.arrays[f"{stack}.counts"][rows])
        _refuse_mismatch(got, want, rows, lambda i: f"batch row {i} has {int(got[i])} valid {stack} tokens, cached "
                                                    f"row {int(rows[i])} {int(want[i])}")
        b, length = mask.shape
        dense = bool(valid.all())  # no padding: the packed rows are the batch already
        out = {}
        for k in layers:
            packed = np.asarray(self.arrays[f"{stack}.h{k}"][tokens])
            t = torch.from_numpy(packed.view(np.int16)).view(torch.bfloat16) if packed.dtype == np.uint16 \
                else torch.from_numpy(packed)
            t = t.to(mask.device, non_blocking=True).float()
            if dense:
                out[k] = t.view(b, length, t.shape[-1])
                continue
            full = t.new_zeros((b, length, t.shape[-1]))
            full[valid] = t
            out[k] = full
        return out

    def states(self, stack: str, index: torch.Tensor, mask: torch.Tensor, layers: Iterable[int],
               num_states: int) -> list[torch.Tensor | None]:
        """A hidden-states sequence as a model returns it (length `num_states`), holding only `layers`."""
        seq: list[torch.Tensor | None] = [None] * num_states
        for k, t in self.hidden(stack, index, mask, layers).items():
            seq[k] = t
        return seq


def load_arrays(folder: str | Path) -> TeacherCache:
    """The cache read fully into memory (to ship through Ray's object store to nodes without the folder)."""
    c = TeacherCache.open(folder)
    return TeacherCache(dict(c.manifest), {k: np.array(v) for k, v in c.arrays.items()})


_OPEN: dict[str, TeacherCache] = {}

SOURCES = ("local", "storage", "object store", "online")  # perf/cache_source


def open_shared(info: CacheInfo | None, arrays: TeacherCache | None = None) -> tuple[TeacherCache | None, str, str]:
    """A trial's teacher cache: (the cache or None, where it came from (`SOURCES`), why a cache the driver
    built is not used ('' when it is, or when there is none)). `info` is the driver's decision, `arrays`
    the cache shipped through the object store (or None). The source: `local` (a folder on this node: the
    storage path, or the node's copy of a published cache), `storage` (read from object storage into the
    node cache by this trial), `object store`, `online` (the trial runs the teacher)."""
    if info is None or info.mode == "off" or not info.folder:
        return None, "online", ""
    if storage.is_remote(info.folder):
        try:
            folder, fetched = storage.local_copy(info.folder, f"teacher_cache/{info.key}")
            found = open_cached(folder)
            if found is not None:
                return found, ("storage" if fetched else "local"), ""
            why = f"the node's copy {folder} has no manifest"
        except Exception as exc:  # noqa: BLE001 - unreachable storage, a torn upload: the trial says so
            why = f"cannot read {info.folder}: {storage.reason(exc)}"
    else:
        found = open_cached(info.folder)
        if found is not None:
            return found, "local", ""
        why = f"{info.folder} is not on this node"
    if arrays is not None:
        return arrays, "object store", ""
    return None, "online", why


def open_cached(folder: str | Path) -> TeacherCache | None:
    """Open (once per process) the cache at `folder`; None when this machine does not have it."""
    folder = str(folder)
    if folder not in _OPEN:
        if not (Path(folder) / "manifest.json").is_file():
            return None
        _OPEN.clear()  # one study's cache at a time per worker
        _OPEN[folder] = TeacherCache.open(folder)
    return _OPEN[folder]
