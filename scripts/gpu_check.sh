#!/usr/bin/env bash
# One prepared check for a lent NVIDIA GPU machine (no internet, a copy of this repository):
#
#   1. extract on CUDA: the backbone's pure forward on decoded images already on the GPU
#      (fp32, fp32 + channels_last, bf16 autocast + channels_last), then the full
#      `xfeat.extract(device="cuda")` on the same images (its img/s from the cache), the ratio,
#      and the features against a CPU forward of the same images;
#   2. `xfeat finetune --device cuda` (bf16 autocast, channels_last: the defaults): img/s of
#      the second epoch (the first one pays for cuDNN's warm-up);
#   3. `torchrun --standalone --nproc_per_node=1 -m xfeat extract --device cuda`: it finishes,
#      and its features equal the single-process ones.
#
# Within 8 minutes (every stage has its own `timeout`); a table at the end; everything
# (table, JSON lines, logs) under $OUT when set, else a temporary folder. Fails at once, with
# the reason, when no GPU is visible. Data: --data PATH, else the shared chest X-rays when
# present ($XFEAT_SHARED, ../shared or ./shared), else synthetic 224x224 JPEGs (the table says
# which).
#
#   scripts/gpu_check.sh [--data PATH] [--model resnet50] [--images 2048]
#   scripts/gpu_check.sh --cpu-dry-run   # the whole script on the CPU, tiny (tests the script)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

MODEL=resnet50 IMAGES=2048 BATCH=256 FT_IMAGES=1024 FT_BATCH=128 IMAGE_SIZE=224 DEVICE=cuda
DATA=""
while [[ $# -gt 0 ]]; do
    case $1 in
        --data) DATA=$2; shift 2 ;;
        --model) MODEL=$2; shift 2 ;;
        --images) IMAGES=$2; shift 2 ;;
        --cpu-dry-run) DEVICE=cpu MODEL=resnet18 IMAGES=64 BATCH=16 FT_IMAGES=32 FT_BATCH=16
                       IMAGE_SIZE=64; shift ;;
        -h|--help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done

die() { echo "gpu_check: $*" >&2; exit 2; }

# $PYTHON, else the project's .venv (`make setup`), else python3 with torch installed.
PY=${PYTHON:-}
if [[ -z $PY && -x .venv/bin/python ]]; then PY=$REPO/.venv/bin/python; fi
PY=${PY:-$(command -v python3 || true)}
[[ -n $PY ]] && command -v "$PY" > /dev/null ||
    die "no Python found (${PY:-none}): run \`make setup\` (creates .venv) or install python3"
"$PY" -c "import torch" 2>/dev/null ||
    die "$PY cannot import torch: run \`make setup\` or \`pip install torch torchvision\`"

if [[ $DEVICE == cuda ]]; then
    if ! command -v nvidia-smi > /dev/null; then smi="not installed (no NVIDIA driver)"
    else smi=$(nvidia-smi -L 2>&1) || smi="failed: $smi"; fi
    cuda=$("$PY" -c "import torch; print(torch.cuda.is_available(), torch.version.cuda)" 2>&1)
    if [[ $cuda != True* ]]; then
        die "no CUDA GPU visible, nothing to check here.
  nvidia-smi -L: $smi
  torch.cuda.is_available(), torch.version.cuda: $cuda  (python: $PY)
  Run this on the lent accelerator machine (a torch build with CUDA, a visible GPU), or
  --cpu-dry-run to test the script itself on the CPU."
    fi
fi

OUT=${OUT:-$(mktemp -d -t xfeat-gpu-check.XXXXXX)}
mkdir -p "$OUT/work"
trap 'rm -rf "$OUT/work"' EXIT  # the data copy and caches; the logs and tables stay
RESULTS=$OUT/gpu_check.jsonl
: > "$RESULTS"
export PYTHONPATH=$REPO:$REPO/scripts${PYTHONPATH:+:$PYTHONPATH}
export XFEAT_CACHE=$OUT/work/cache
T_START=$SECONDS

# record CHECK RESULT STATUS SECONDS: one JSON line per check.
record() {
    "$PY" -c 'import json, sys
print(json.dumps(dict(zip(["check", "result", "status", "seconds"], sys.argv[1:]))))' \
        "$@" >> "$RESULTS"
}

# stage NAME SECONDS COMMAND...: run with a time limit and a log; a failure is a table row.
stage() {
    local name=$1 limit=$2 t0=$SECONDS rc=0
    shift 2
    echo "== $name (limit ${limit} s)"
    timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1 || rc=$?
    tail -n 3 "$OUT/$name.log"
    STAGE_SECONDS=$((SECONDS - t0))
    if [[ $rc -ne 0 ]]; then
        local why="exit status $rc"
        [[ $rc -eq 124 || $rc -eq 137 ]] && why="timed out after ${limit} s"
        record "$name" "$why; see $OUT/$name.log" FAIL $((SECONDS - t0))
    fi
}

# --- data: a stratified subset of the real X-rays as symlinks, or synthetic JPEGs
if [[ -z $DATA ]]; then
    for shared in "${XFEAT_SHARED:-$REPO/../shared}" "$REPO/shared"; do
        [[ -d $shared/data/chest_xray224 ]] && DATA=$shared/data/chest_xray224 && break
    done
fi
DATA=${DATA:-../shared/data/chest_xray224}
timeout 60 "$PY" - "$DATA" "$OUT/work/data" "$IMAGES" <<'PY'
import sys
from pathlib import Path

import numpy as np
from PIL import Image

src, dst, n = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
if (src / "train").is_dir():
    from bench_extract import make_subset
    make_subset(src, dst, n)
    (dst.parent / "data.txt").write_text(f"{n} images of {src}")
else:  # no real data on this machine: grey 224x224 JPEGs, a bright square marks the class
    rng = np.random.default_rng(0)
    for i in range(n):
        label = i % 2
        img = rng.integers(0, 120, (224, 224), dtype=np.uint8)
        img[20 + 100 * label:80 + 100 * label, 40:100] = 230
        d = dst / "train" / ("NORMAL", "PNEUMONIA")[label]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).convert("RGB").save(d / f"img{i:05d}.jpeg", quality=90)
    (dst.parent / "data.txt").write_text(f"{n} synthetic 224x224 JPEGs ({src} not found)")
PY
echo "data: $(cat "$OUT/work/data.txt")"

# --- 1. extract on CUDA against the pure forward
stage extract 150 "$PY" - "$OUT/work/data" "$MODEL" "$BATCH" "$DEVICE" "$IMAGE_SIZE" "$RESULTS" <<'PY'
import contextlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

import xfeat
from xfeat.backbones import create_backbone
from xfeat.data import load_dataset

root, model, batch, device, size, results = sys.argv[1:]
batch, size, dev = int(batch), int(size), torch.device(sys.argv[4])


def record(check, result, ok=True, seconds=0.0):
    with open(results, "a") as f:
        f.write(json.dumps({"check": check, "result": result, "status": "ok" if ok else "FAIL",
                            "seconds": round(seconds, 1)}) + "\n")


def sync():
    if dev.type == "cuda":
        torch.cuda.synchronize()


backbone = create_backbone(model, "none", image_size=size)
split = load_dataset(root).splits["train"]
prep = backbone.preprocessing
images = [prep.resize_and_crop(split.read_image(i, draft_size=prep.resize_size,  # as extract
                                                exif_transpose=prep.exif_transpose))
          for i in range(min(batch, len(split)))]
x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
net, norm = backbone.model.to(dev).eval(), prep.normalize
forward = {}
for name, channels_last, dtype in (("fp32", False, None), ("fp32 channels_last", True, None),
                                   ("bf16 channels_last", True, torch.bfloat16)):
    net.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    xb = x.to(dev)
    amp = torch.autocast(dev.type, dtype=dtype) if dtype else contextlib.nullcontext()
    with torch.inference_mode(), amp:
        def step():
            y = norm(xb)
            net(y.contiguous(memory_format=torch.channels_last) if channels_last else y)
        for _ in range(3):  # warm-up: cuDNN algorithm choice, allocator
            step()
        sync()
        t0, n = time.perf_counter(), 0
        while time.perf_counter() - t0 < 3 and n < 200:
            step()
            n += 1
        sync()
        seconds = time.perf_counter() - t0
        forward[name] = n * len(xb) / seconds
    record(f"forward only, {name}", f"{forward[name]:.0f} img/s ({model}, batch {len(xb)})",
           seconds=seconds)

t0 = time.perf_counter()
path = xfeat.extract(root, model, image_size=size, batch_size=batch, device=str(dev),
                     progress=False)
meta = xfeat.read_meta(path)
n = sum(s["n"] for s in meta.splits.values())
rate = n / sum(s["seconds_total"] for s in meta.splits.values())
ratio = rate / forward["fp32 channels_last"]  # extract runs fp32 with channels_last on CUDA
record("xfeat extract (full pass)",
       f"{rate:.0f} img/s on {n} images = {ratio:.2f} x forward-only fp32 channels_last",
       seconds=time.perf_counter() - t0)

# The features against a CPU forward of the same images (cuDNN may use TF32: small diffs).
cpu = create_backbone(model, "none", image_size=size).model.eval()
k = min(16, len(split))
with torch.inference_mode():
    expected = cpu(norm(x[:k])).numpy()
got = xfeat.read_cache(path, ["train"])["train"].features[:k]
err = float(np.abs(got - expected).max() / (np.abs(expected).max() + 1e-12))
record("extract features vs CPU forward", f"max abs diff / max abs = {err:.1e} ({k} images)",
       ok=err < 1e-2)
(Path(results).parent / "extract_cache.txt").write_text(str(path))
PY

# --- 2. fine-tuning speed on CUDA
stage finetune 150 "$PY" -m xfeat -q finetune --data "$OUT/work/data" --model "$MODEL" \
    --image-size "$IMAGE_SIZE" --device "$DEVICE" --epochs 2 --batch-size "$FT_BATCH" \
    --max-train-images "$FT_IMAGES" --n-boot 0 --out "$OUT/work/finetune" --json
if [[ -f $OUT/work/finetune/results.json ]]; then
    "$PY" - "$OUT/work/finetune/results.json" "$RESULTS" "$MODEL" "$FT_BATCH" <<'PY'
import json
import sys

record = json.load(open(sys.argv[1]))
h = record["history"]
p = record["params"]
line = (f"{h[-1]['images_per_second']:.0f} img/s train, epoch {h[-1]['epoch']} "
        f"(epoch 1: {h[0]['images_per_second']:.0f}); {sys.argv[3]} batch {sys.argv[4]}, "
        f"amp {p.get('amp')}, channels_last {p.get('channels_last')}")
with open(sys.argv[2], "a") as f:
    f.write(json.dumps({"check": "xfeat finetune", "result": line, "status": "ok",
                        "seconds": round(record["timing"]["wall_seconds"], 1)}) + "\n")
PY
fi

# --- 3. torchrun with one process on one GPU: same features as one plain process
stage torchrun 100 "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 -m xfeat \
    -q extract --data "$OUT/work/data" --model "$MODEL" --weights none --image-size "$IMAGE_SIZE" \
    --batch-size "$BATCH" --device "$DEVICE" --cache-dir "$OUT/work/cache-torchrun"
if [[ -f $OUT/extract_cache.txt ]] && compgen -G "$OUT/work/cache-torchrun/*.h5" > /dev/null; then
    "$PY" - "$(cat "$OUT/extract_cache.txt")" "$OUT/work/cache-torchrun" "$RESULTS" \
        "$STAGE_SECONDS" <<'PY'
import json
import sys
from pathlib import Path

import numpy as np

import xfeat

single = xfeat.read_cache(sys.argv[1])
ddp = xfeat.read_cache(next(Path(sys.argv[2]).glob("*.h5")))
diff = max(float(np.abs(single[s].features - ddp[s].features).max()) for s in single.splits)
same_ids = all(single[s].ids == ddp[s].ids for s in single.splits)
with open(sys.argv[3], "a") as f:
    f.write(json.dumps({"check": "torchrun 1 GPU extract vs 1 process",
                        "result": f"ids {'equal' if same_ids else 'DIFFER'}, "
                                  f"max abs feature diff {diff:.1e}",
                        "status": "ok" if same_ids and diff < 1e-3 else "FAIL",
                        "seconds": int(sys.argv[4])}) + "\n")
PY
fi

# --- the table
echo
"$PY" - "$RESULTS" "$OUT" "$DEVICE" "$(cat "$OUT/work/data.txt")" $((SECONDS - T_START)) \
    <<'PY' | tee "$OUT/gpu_check.md"
import json
import sys

rows = [json.loads(line) for line in open(sys.argv[1])]
device = ("CPU dry run: tests the script; its speeds mean nothing" if sys.argv[3] == "cpu"
          else "CUDA")
print(f"xfeat GPU check ({device}), data: {sys.argv[4]}, {sys.argv[5]} s in all; "
      f"outputs in {sys.argv[2]}")
print("| check | result | s | status |\n|---|---|---|---|")
for r in rows:
    print(f"| {r['check']} | {r['result']} | {r['seconds']} | {r['status']} |")
if not rows or any(r["status"] != "ok" for r in rows):
    sys.exit(1)
PY
