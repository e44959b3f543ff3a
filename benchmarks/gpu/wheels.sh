#!/usr/bin/env bash
# Fill the ignored wheelhouse .whl/ with what the GPU machine's image lacks, for CPython 3.12
# manylinux x86-64: megatron-core, DeepSpeed (built here from its sdist, every op left to JIT)
# and their missing dependencies, one version each, <= 60 MiB. The image already has torch 2.11
# (CUDA 13), numpy, packaging, einops, msgpack, ninja, psutil, py-cpuinfo, tqdm, nvidia-ml-py,
# sentencepiece, pyyaml, tensorboard, xxhash, matplotlib, pyarrow (benchmarks/gpu/README.md).
#
#   bash benchmarks/gpu/wheels.sh            # -> .whl/*.whl
#   WHEELHOUSE=/tmp/w PYTHON=python3 bash benchmarks/gpu/wheels.sh
#
# benchmarks/gpu/check.py installs them with `pip install --no-index --no-deps --target DIR`.
set -euo pipefail
cd "$(dirname "$0")/../.."

OUT=${WHEELHOUSE:-.whl}
# a Python with pip, setuptools and torch: DeepSpeed's setup.py imports torch to build its wheel
PY=${PYTHON:-.venv/bin/python}
LIMIT_MIB=60

# name==version of every wheel taken from PyPI as built (py3 or cp312 manylinux x86-64)
WHEELS=(
    megatron-core==0.16.1      # needs torch, numpy, packaging: in the image
    pydantic==2.14.4           # DeepSpeed's config models
    pydantic-core==2.50.5      # pinned exactly by pydantic 2.14.4
    annotated-types==0.8.0     # pydantic
    typing-inspection==0.4.5   # pydantic
    typing-extensions==4.16.0  # pydantic-core needs >= 4.16; the image's version is not known
    hjson==3.1.0               # DeepSpeed
)
DEEPSPEED=deepspeed==0.19.8

platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 \
    manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
done

rm -rf "$OUT"
mkdir -p "$OUT"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platforms[@]}" -d "$OUT" "${WHEELS[@]}"

# DeepSpeed publishes only an sdist: build a pure-Python wheel for the CUDA accelerator with no
# op compiled (DS_BUILD_OPS=0); on the GPU, ops such as FusedAdam are JIT-built with its nvcc.
src=$(mktemp -d)
trap 'rm -rf "$src"' EXIT
"$PY" -m pip download -q --no-deps --no-binary=:all: -d "$src" "$DEEPSPEED"
DS_BUILD_OPS=0 DS_ACCELERATOR=cuda "$PY" -m pip wheel -q --no-deps --no-build-isolation \
    -w "$OUT" "$src"/deepspeed-*.tar.gz >"$src/build.log" 2>&1 || {
    tail -40 "$src/build.log"
    exit 1
}

# one version of each distribution, and the size limit
dupes=$(for f in "$OUT"/*.whl; do basename "$f" | cut -d- -f1 | tr 'A-Z-' 'a-z_'; done | sort | uniq -d)
if [[ -n $dupes ]]; then
    echo "error: more than one version of: $dupes" >&2
    exit 1
fi
total=$(du -cb "$OUT"/*.whl | tail -1 | cut -f1)
for f in "$OUT"/*.whl; do
    awk -v b="$(stat -c %s "$f")" -v n="$(basename "$f")" 'BEGIN { printf "%8.2f MiB  %s\n", b / 1048576, n }'
done
awk -v b="$total" -v l="$LIMIT_MIB" 'BEGIN { printf "%8.2f MiB  total (limit %d MiB)\n", b / 1048576, l }'
if ((total > LIMIT_MIB * 1048576)); then
    echo "error: the wheelhouse is over $LIMIT_MIB MiB" >&2
    exit 1
fi
