#!/usr/bin/env bash
# One prepared run for a lent GPU machine: every check that needs a GPU, in one go, within the
# device tool's 10-minute command limit. Run from the repository root:
#
#     bash benchmarks/gpu_check.sh OUT_DIR [TRAINED_VITPOSE_FOLDER]
#
# 1. the GPU tests (nvImageCodec's and nvJPEG's crops against Pillow's);
# 2. the pose batch and the device crops broken down (`profile_pose.py`), ViTPose-B bf16, with the
#    forward under torch.compile: its compile seconds and after how many crops it pays;
# 3. the crop stage's CPU per crop, JPEG regions vs Pillow (`crop_cost.py`); each JPEG decoder's
#    ms per image and its crops' pixel differences to Pillow's (`jpeg_decoders.py`: the device
#    cropper's nvimgcodec and nvjpeg decoders, nvImageCodec's hardware, hybrid and GPU backends
#    alone, with and without fancy upsampling; with a trained checkpoint, the keypoint drift);
# 4. raypose against the reference and the model ceiling (`throughput.py`), crops in tasks
#    (the GPU default, with the host row: the forward a stand-in) and on the device (nvImageCodec,
#    then nvJPEG), 1024 images of the mixed set, and 1024 of the coco workload; the layout that
#    ran (one pose actor per GPU) is in each run's manifest.
set -euo pipefail
out=${1:-gpu-out}
model=${2:-}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python -m pytest -q -m gpu tests/unit 2>&1 | tail -5 | tee "$out/gpu-tests.txt"
python benchmarks/profile_pose.py --preset vitpose-base --device cuda --dtype bfloat16 --batch-size 256 --compile \
    --device-crops 256 2>&1 | tee "$out/profile_pose.txt"
python benchmarks/crop_cost.py --images 60 --out "$out/bench" 2>&1 | tail -6 | tee "$out/crop_cost.txt"
python benchmarks/jpeg_decoders.py --images 60 --out "$out/bench/decoders" ${model:+--model "$model"} 2>&1 | tail -12 \
    | tee "$out/jpeg_decoders.txt"
python benchmarks/throughput.py --preset vitpose-base --images 1024 --out "$out/bench" \
    --rows reference,ceiling,raypose,host --json "$out/throughput-tasks.json" 2>&1 | tail -40 \
    | tee "$out/throughput-tasks.txt"
python benchmarks/throughput.py --preset vitpose-base --images 1024 --workload coco --out "$out/bench" \
    --rows ceiling,raypose --json "$out/throughput-coco.json" 2>&1 | tail -40 | tee "$out/throughput-coco.txt"
python benchmarks/throughput.py --preset vitpose-base --images 1024 --out "$out/bench" --rows raypose \
    --set resources.crop_in=pose_device --json "$out/throughput-device.json" 2>&1 | tail -40 \
    | tee "$out/throughput-device.txt"
python benchmarks/throughput.py --preset vitpose-base --images 1024 --out "$out/bench" --rows raypose \
    --set resources.crop_in=pose_device --set images.gpu_decoder=nvjpeg --json "$out/throughput-device-nvjpeg.json" \
    2>&1 | tail -40 | tee "$out/throughput-device-nvjpeg.txt"
