#!/usr/bin/env bash
# The Python packages raypose needs that the lent H200 machine's image lacks, as one archive a
# device call can carry (the whole tree travels in at most 64 MiB, and Ray's wheel alone is 79 MB).
# Run here, from the repository root, where pip reaches the package index:
#
#     bash benchmarks/gpu_bundle.sh            # -> .whl/site.tar.xz (~45 MB; .whl/ is git-ignored)
#
# then, on the device (carry: [".whl"]), before benchmarks/gpu_check.sh:
#
#     mkdir -p /tmp/site && tar xJf .whl/site.tar.xz -C /tmp/site && export PYTHONPATH=/tmp/site:$PWD
#
# The image (KINDS.md in the device tool's notes) has Python 3.12, torch and torchvision for CUDA
# 13, transformers, pyarrow, pillow, numpy, typer and Ray's other needs; it lacks Ray, pydantic,
# jsonschema and nvImageCodec. So this installs, for CPython 3.12 on x86-64 Linux: Ray and pydantic
# at the versions installed here (what the tests ran with), jsonschema, and nvImageCodec with
# nvJPEG for CUDA 13. Left out to fit: Ray's Java jars and RLlib, and nvImageCodec's bindings for
# other Pythons. s3fs is not carried: the GPU check reads local files.
set -euo pipefail
dest=${1:-.whl}
version() { python -m pip show "$1" 2>/dev/null | sed -n 's/^Version: //p'; }
ray_version=$(version ray)
pydantic_version=$(version pydantic)
pydantic_core_version=$(version pydantic_core)
site="$dest/site"
rm -rf "$dest"
mkdir -p "$site"
python -m pip install --quiet --no-deps --no-compile --only-binary=:all: --target "$site" \
    --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 \
    "ray==$ray_version" "pydantic==$pydantic_version" "pydantic-core==$pydantic_core_version" annotated-types \
    typing-inspection jsonschema referencing rpds-py jsonschema-specifications nvidia-nvimgcodec-cu13 \
    "nvidia-nvjpeg>=13,<14"
rm -rf "$site/ray/jars" "$site/ray/rllib" "$site/bin"
find "$site/nvidia/nvimgcodec" -name 'nvimgcodec_impl.cpython-*.so' ! -name '*cpython-312-*' -delete
tar cf - -C "$site" . | xz -T0 -6 > "$dest/site.tar.xz"
rm -rf "$site"
ls -l "$dest/site.tar.xz"
