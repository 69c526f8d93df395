#!/usr/bin/env bash
# One prepared run for a lent GPU machine: every check that needs a GPU, in one go, within the
# device tool's 10-minute command limit. Run from the repository root:
#
#     bash benchmarks/gpu_check.sh OUT_DIR [TRAINED_VITPOSE_FOLDER]
#
# On the lent H200, whose image lacks Ray, pydantic and nvImageCodec: make their bundle here first
# (`bash benchmarks/gpu_bundle.sh`), then make one device call, carrying [".whl"], timeout 600:
#
#     mkdir -p /tmp/site && tar xJf .whl/site.tar.xz -C /tmp/site && export PYTHONPATH=/tmp/site:$PWD \
#         && bash benchmarks/gpu_check.sh $OUT
#
# 1. the GPU tests (nvImageCodec's and nvJPEG's crops against Pillow's);
# 2. the pose batch and the device crops broken down (`profile_pose.py`), ViTPose-B bf16, with the
#    forward under torch.compile: its compile seconds and after how many crops it pays;
# 3. each JPEG decoder's ms per image and its crops' pixel differences to Pillow's
#    (`jpeg_decoders.py`: the device cropper's nvimgcodec and nvjpeg decoders, nvImageCodec's
#    hardware, hybrid and GPU backends alone, with and without fancy upsampling; with a trained
#    checkpoint, the keypoint drift);
# 4. raypose against the model ceiling (`throughput.py`) over ~100k crops, the steady state and
#    the time to the first crop apart: 1024 images of the mixed set x 24 copies (hard links, so
#    no more drawing) with crops in tasks (the GPU default) beside the host row (the forward a
#    stand-in: the host's own limit); 1024 of the coco workload x 16; the mixed set with the
#    crops on the device (nvImageCodec). The layout that ran is in each run's manifest.
#
# Each step has its own time limit and log, all of them inside GPU_CHECK_SECONDS (default 560),
# and a step that fails or runs out of time does not stop the ones after it (a lent GPU's minutes
# are few). OUT_DIR holds eight files at most (what a device call brings back): steps.txt (the GPU,
# then each step's exit status and seconds), one NAME.log a step and json.tgz (the throughput
# results); images, checkpoints and job outputs go to GPU_CHECK_WORK (default /tmp/gpu-check-work).
set -uo pipefail
out=${1:-gpu-out}
model=${2:-}
deadline=${GPU_CHECK_SECONDS:-560}
work=${GPU_CHECK_WORK:-/tmp/gpu-check-work}
py=${PYTHON:-python3}  # on the lent image, python3 is the interpreter that holds torch
export PYTHONUNBUFFERED=1
mkdir -p "$out" "$work"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/steps.txt"

# step NAME SECONDS COMMAND...: COMMAND within SECONDS (or what is left of the deadline); its log in
# OUT_DIR/NAME.log, the last 15 lines also printed.
step() {
    local name=$1 limit=$2 started=$SECONDS rc
    shift 2
    local left=$((deadline - SECONDS))
    if ((left < 20)); then
        echo "$name skipped: ${left}s left of ${deadline}s" | tee -a "$out/steps.txt"
        return
    fi
    ((limit > left)) && limit=$left
    timeout --kill-after=10 "$limit" "$@" > "$out/$name.log" 2>&1
    rc=$?
    tail -15 "$out/$name.log"
    echo "$name rc=$rc $((SECONDS - started))s (limit ${limit}s)" | tee -a "$out/steps.txt"
}

step gpu-tests 75 "$py" -m pytest -q -m gpu tests/unit
step profile_pose 110 "$py" benchmarks/profile_pose.py --preset vitpose-base --device cuda --dtype bfloat16 \
    --batch-size 256 --compile --device-crops 256
step jpeg_decoders 60 "$py" benchmarks/jpeg_decoders.py --images 60 --out "$work/decoders" ${model:+--model "$model"}
step throughput-mixed 150 "$py" benchmarks/throughput.py --preset vitpose-base --images 1024 --image-copies 24 \
    --out "$work" --rows ceiling,raypose,host --json "$work/throughput-mixed.json"
step throughput-coco 80 "$py" benchmarks/throughput.py --preset vitpose-base --images 1024 --image-copies 16 \
    --workload coco --out "$work" --rows ceiling,raypose --json "$work/throughput-coco.json"
step throughput-device 80 "$py" benchmarks/throughput.py --preset vitpose-base --images 1024 --image-copies 24 \
    --out "$work" --rows raypose --set resources.crop_in=pose_device --json "$work/throughput-device.json"
if ls "$work"/*.json > /dev/null 2>&1; then tar czf "$out/json.tgz" -C "$work" $(cd "$work" && ls *.json); fi
cat "$out/steps.txt"
