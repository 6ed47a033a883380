#!/usr/bin/env bash
# The GPU throughput benchmark, in one command: `monitor bench` with 64 and then 100 file streams
# of 1920x1080 at 15 fps each, YOLOv8s (random weights: nothing is downloaded) at imgsz 640 on
# CUDA, each compared with Ultralytics' own predict loop on the same frames (--compare-naive).
#
# The machine needs python3 with torch (CUDA), torchvision (the build that matches torch),
# opencv-python(-headless) and numpy. Everything else monitor.bench imports comes as wheels in
# .whl/ (git-ignored: carry it), installed with --no-deps into $SITE. Exactly these, checked
# against the import chain of `python -m monitor bench` on a machine that had only the four above
# (monitor.bench never imports fastapi, uvicorn or paho-mqtt; Ultralytics' matplotlib, polars,
# psutil and thop are not imported on this path):
#
#   ultralytics==8.4.190 supervision==0.31.2 trackers==2.6.1
#   pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
#   typing-extensions==4.16.0 pydantic-settings==2.16.3 python-dotenv==1.2.4 pyyaml==6.0.4
#   prometheus-client==0.26.0 tqdm==4.70.1 pillow==13.0.0 scipy==1.17.1 pydeprecate==0.13.0
#   defusedxml==0.7.1 requests==2.34.2 urllib3==2.8.0 idna==3.20 certifi==2026.10.19.post1
#   charset-normalizer==3.5.3 rich==15.0.0 nvidia-ml-py==13.615.71
#
# (who needs them: supervision -> pillow, scipy, pydeprecate, defusedxml, requests (+ urllib3, idna,
# certifi, charset-normalizer); trackers -> rich; settings -> pydantic(-settings), pyyaml, dotenv;
# nvidia-ml-py only gives the GPU utilisation, which is reported as null without it.)
# pydantic-core, pyyaml, pillow, scipy and charset-normalizer are binary: download them for the GPU
# machine's Python (scipy 1.17 needs Python >= 3.11 and numpy >= 1.26; on 3.10 take scipy==1.15.3):
#
#   python3 -m pip download -d .whl --no-deps --only-binary=:all: --implementation cp \
#     --python-version 3.11 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 <the packages above>
#
# About 45 MiB in all (scipy is 35). If the machine has no torchvision, add the wheel that matches
# its torch (torch 2.N pairs with torchvision 0.(N+15)) to .whl/ as well.
#
# Results go to ${OUT:-out}/: machine.txt, clip.txt, bench-64.json, bench-100.json (one JSON
# report each, see monitor/bench/report.py), their .log (stderr), and summary.txt. A run that cannot
# get the shared memory its decoders need (a small /dev/shm in a container) says so in its .log;
# --synthetic is no way around that (its stand-in decoders write into the same shared memory).
#
# Knobs (defaults are the GPU run above; e.g. DEVICE=cpu STREAMS=2 DURATION=5 IMGSZ=320 for a
# dry run on a CPU box): PYTHON SITE DEVICE STREAMS FPS WIDTH HEIGHT IMGSZ MODEL DURATION WARMUP
# NAIVE_FRAMES MAX_BATCH NVDEC_STREAMS RUN_TIMEOUT. With pynvvideocodec's wheel in .whl/ (the
# nvdec extra) a third run decodes NVDEC_STREAMS (200) streams on the GPU. Budget: ~1 min of
# set-up and ~100 s per run; each run is cut at RUN_TIMEOUT (200 s): two runs stay well under
# 10 minutes, three usually do (set STREAMS=64 to be sure).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-out}
PYTHON=${PYTHON:-python3}
SITE=${SITE:-/tmp/site}
DEVICE=${DEVICE:-cuda}
STREAMS=${STREAMS:-64 100}
FPS=${FPS:-15}
WIDTH=${WIDTH:-1920}
HEIGHT=${HEIGHT:-1080}
IMGSZ=${IMGSZ:-640}
MODEL=${MODEL:-yolov8s.yaml}
DURATION=${DURATION:-60}
WARMUP=${WARMUP:-5}
NAIVE_FRAMES=${NAIVE_FRAMES:-200}
MAX_BATCH=${MAX_BATCH:-16}
NVDEC_STREAMS=${NVDEC_STREAMS:-200}
RUN_TIMEOUT=${RUN_TIMEOUT:-200}
CLIP=${CLIP:-/tmp/monitor-bench-${WIDTH}x${HEIGHT}-${FPS}fps.mp4}

mkdir -p "$OUT"
started=$(date +%s)
log() { echo "[gpu_bench +$(($(date +%s) - started))s] $*" >&2; }

shopt -s nullglob
wheels=(.whl/*.whl)
shopt -u nullglob
if ((${#wheels[@]})); then
    log "installing ${#wheels[@]} wheels into $SITE"
    "$PYTHON" -m pip install -q --no-index --no-deps --upgrade --target "$SITE" "${wheels[@]}"
else
    log "no wheels in .whl/: using what $SITE and the interpreter already have"
fi
export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export YOLO_CONFIG_DIR=${YOLO_CONFIG_DIR:-/tmp/ultralytics-config}
export YOLO_OFFLINE=True YOLO_AUTOINSTALL=False YOLO_VERBOSE=False

{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "cores: $(nproc)"
    grep -m1 "model name" /proc/cpuinfo || true
    grep MemTotal /proc/meminfo || true
    df -h /dev/shm 2>/dev/null || echo "no /dev/shm"
    if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; fi
    "$PYTHON" - <<'EOF'
import importlib
import sys

print("python", sys.version.split()[0])
missing = []
for name in ("torch", "torchvision", "cv2", "numpy", "ultralytics", "supervision", "trackers", "pydantic",
             "pydantic_settings", "yaml", "prometheus_client", "tqdm", "scipy", "PIL", "monitor.bench"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "ok"))
    except Exception as exc:  # report every missing piece at once
        missing.append(f"{name}: {type(exc).__name__}: {exc}")
import torch  # noqa: E402

print("cuda available", torch.cuda.is_available(), torch.version.cuda,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
if missing:
    sys.exit("cannot import:\n  " + "\n  ".join(missing))
EOF
} | tee "$OUT/machine.txt" >&2

log "making the ${WIDTH}x${HEIGHT} clip $CLIP"
"$PYTHON" - "$ROOT/tests/data/vtest.mp4" "$CLIP" "$WIDTH" "$HEIGHT" "$FPS" <<'EOF' | tee "$OUT/clip.txt" >&2
import sys

import cv2

source, target, width, height, fps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
cap = cv2.VideoCapture(source)
writer = None
codec = None
frames = 0
while True:
    ok, image = cap.read()
    if not ok:
        break
    image = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
    if writer is None:
        for codec in ("avc1", "mp4v"):  # H.264 when this OpenCV build can encode it (pip builds cannot)
            writer = cv2.VideoWriter(target, cv2.VideoWriter_fourcc(*codec), fps, (width, height))
            if writer.isOpened():
                break
        else:
            sys.exit(f"OpenCV cannot write {target} as avc1 or mp4v")
    writer.write(image)
    frames += 1
cap.release()
if writer is None:
    sys.exit(f"cannot read {source}")
writer.release()
check = cv2.VideoCapture(target)
print(f"clip {target}: {frames} frames {width}x{height} at {fps:g} fps, codec {codec}, "
      f"reads back at {check.get(cv2.CAP_PROP_FPS):g} fps, {int(check.get(cv2.CAP_PROP_FRAME_COUNT))} frames")
EOF

bench() {  # bench NAME EXTRA-ARGS...: one run; its report in $OUT/NAME.json, stderr in $OUT/NAME.log
    local name=$1
    shift
    log "run $name: $*"
    local rc=0
    timeout --kill-after=10 "$RUN_TIMEOUT" "$PYTHON" -m monitor bench --model "$MODEL" --imgsz "$IMGSZ" \
        --device "$DEVICE" --fps "$FPS" --width "$WIDTH" --height "$HEIGHT" --max-batch "$MAX_BATCH" \
        --duration "$DURATION" --warmup "$WARMUP" --compare-naive --naive-frames "$NAIVE_FRAMES" --json \
        "$@" >"$OUT/$name.json" 2>"$OUT/$name.log" || rc=$?
    log "run $name: exit $rc"
    tail -n 3 "$OUT/$name.log" >&2 || true
    return "$rc"
}

for n in $STREAMS; do
    bench "bench-$n" --streams "$n" --clip "$CLIP" --decoder cpu || true
done

# NVDEC, when PyNvVideoCodec's wheel came along (.whl/pynvvideocodec-*.whl). A stream NVDEC
# cannot decode (the clip is mp4v when this OpenCV cannot write H.264) falls back to the CPU,
# and each decoder logs which it used: grep "decoded on the" in the run's .log.
if "$PYTHON" -c "import PyNvVideoCodec" 2>/dev/null; then
    for n in $NVDEC_STREAMS; do
        bench "bench-nvdec-$n" --streams "$n" --clip "$CLIP" --decoder nvdec || true
        grep -o "decoded on the [A-Z]*" "$OUT/bench-nvdec-$n.log" | sort | uniq -c >&2 || true
    done
else
    log "PyNvVideoCodec is not importable: no nvdec run"
fi

"$PYTHON" - "$OUT" <<'EOF' | tee "$OUT/summary.txt"
import json
import sys
from pathlib import Path


def fmt(value, spec=".1f"):
    return "n/a" if value is None else format(value, spec)


for path in sorted(Path(sys.argv[1]).glob("bench-*.json"), key=lambda p: (len(p.name), p.name)):
    try:
        r = json.loads(path.read_text())
    except ValueError:
        print(f"{path.name}: no report (see {path.with_suffix('.log').name})")
        continue
    m, c, p, lat = r["machine"], r["config"], r["pipeline"], r["latency"]["capture_to_detections"]
    print(f"{path.name}: {c['streams']} {c['mode']} streams {c['width']}x{c['height']} at {c['fps']} fps, "
          f"decoder {c.get('decoder', 'n/a')}, {c['model']} imgsz {c['imgsz']} on {m['gpu'] or m['cpu_model']} ({c['runtime']}, "
          f"{'fp16' if c['half'] else 'fp32'}), max_batch {c['max_batch']}")
    print(f"  pipeline (end to end): offered {fmt(p['offered_fps'])} fps, processed {fmt(p['processed_fps'])} fps "
          f"({fmt(p['processed_fps_per_stream'], '.2f')}/stream), dropped {fmt(p['drop_pct'])} %, "
          f"batch mean {fmt(p['batch_size']['mean'], '.1f')}")
    print(f"  capture->detections p50/p95/p99 {fmt(lat['p50'])}/{fmt(lat['p95'])}/{fmt(lat['p99'])} ms; "
          f"CPU {fmt(p['cpu']['cores_used'], '.1f')} cores (decoders {fmt(p['cpu']['decoders_cores_used'], '.1f')}); "
          f"GPU {fmt(p['gpu']['utilization_pct'], '.0f')} %, peak {fmt(p['gpu']['max_memory_allocated_mib'], '.0f')} MiB")
    stages = ", ".join(f"{k} {fmt(v['p50'])}/{fmt(v['p99'])}" for k, v in r["stages"].items())
    print(f"  stages p50/p99 ms: {stages}")
    if r["naive"]:
        n, q = r["naive"], r["ratios"]
        print(f"  detector only on {n['frames']} frames: Ultralytics per frame {fmt(n['ultralytics_per_frame_fps'])} fps, "
              f"batched({n['batch']}) {fmt(n['ultralytics_batched_fps'])} fps, ours {fmt(n['detector_fps'])} fps")
        print(f"  ratios: detector {fmt(q['detector_vs_ultralytics_per_frame'], '.2f')}x per-frame, "
              f"{fmt(q['detector_vs_ultralytics_batched'], '.2f')}x batched; pipeline "
              f"{fmt(q['pipeline_vs_ultralytics_per_frame'], '.2f')}x per-frame, "
              f"{fmt(q['pipeline_vs_ultralytics_batched'], '.2f')}x batched "
              f"({'saturated' if q['pipeline_saturated'] else 'not saturated: bounded by the offered rate'})")
EOF
log "done: results in $OUT/"
