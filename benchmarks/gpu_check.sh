#!/usr/bin/env bash
# One prepared run for a lent GPU machine: every check that needs a GPU, in one go, within the
# device tool's 10-minute command limit. Run from the repository root:
#
#     bash benchmarks/gpu_check.sh OUT_DIR
#
# 1. the GPU tests (nvJPEG crops against Pillow's);
# 2. the pose batch and the device crops broken down (`profile_pose.py`), ViTPose-B bf16;
# 3. the crop stage's CPU per crop, JPEG regions vs Pillow (`crop_cost.py`); each JPEG decoder's
#    ms per image and its crops' pixel differences to Pillow's (`jpeg_decoders.py`: nvJPEG,
#    nvImageCodec's hardware, hybrid and GPU backends on the crops' regions);
# 4. raypose against the reference and the model ceiling (`throughput.py`), crops in tasks
#    (the GPU default, with the host row: the forward a stand-in) and on the device, 1024 images
#    of the mixed set, and 1024 of the coco workload; the layout that ran (one pose actor per
#    GPU) is in each run's manifest.
set -euo pipefail
out=${1:-gpu-out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python -m pytest -q -m gpu tests/unit 2>&1 | tail -5 | tee "$out/gpu-tests.txt"
python benchmarks/profile_pose.py --preset vitpose-base --device cuda --dtype bfloat16 --batch-size 256 \
    --device-crops 256 2>&1 | tee "$out/profile_pose.txt"
python benchmarks/crop_cost.py --images 60 --out "$out/bench" 2>&1 | tail -6 | tee "$out/crop_cost.txt"
python benchmarks/jpeg_decoders.py --images 60 --out "$out/bench/decoders" 2>&1 | tail -8 | tee "$out/jpeg_decoders.txt"
python benchmarks/throughput.py --preset vitpose-base --images 1024 --out "$out/bench" \
    --rows reference,ceiling,raypose,host --json "$out/throughput-tasks.json" 2>&1 | tail -40 \
    | tee "$out/throughput-tasks.txt"
python benchmarks/throughput.py --preset vitpose-base --images 1024 --workload coco --out "$out/bench" \
    --rows ceiling,raypose --json "$out/throughput-coco.json" 2>&1 | tail -40 | tee "$out/throughput-coco.txt"
python benchmarks/throughput.py --preset vitpose-base --images 1024 --out "$out/bench" --rows raypose \
    --set resources.crop_in=pose_device --json "$out/throughput-device.json" 2>&1 | tail -40 \
    | tee "$out/throughput-device.txt"
