#!/usr/bin/env bash
# Developer tool: pack a Triton release into parts small enough to carry to a GPU machine that
# reaches no package registry, a call at a time, for running genbench's kernels on that release.
#
#   tools/pack_triton.sh 3.9.0 [OUTDIR] [PYTHON_VERSION]   # OUTDIR default .whl, Python 3.12
#
# It downloads the release's manylinux wheel for that Python, unpacks it without what
# Hopper kernels never load (CUPTI and the profiler, the instrumentation test library,
# the AMD code generator), compresses it with xz and splits it into 50 MB parts:
# OUTDIR/tVERSION.part-0, -1, ... (a 190-290 MB wheel packs into 100-112 MB).
# On the GPU machine, once every part is there (in /tmp/tw, say):
#
#   cat /tmp/tw/t3.9.0.part-* | python3 -c "import sys, tarfile; \
#       tarfile.open(fileobj=sys.stdin.buffer, mode='r|xz').extractall('/tmp/t3.9.0')"
#   PYTHONPATH=/tmp/t3.9.0 python3 -m bench attention ...
#
# genbench's kernels need Triton alone, not torch's compiler, so the machine's torch runs beside
# a Triton it was not built with. docs/attention-kernels.md ("Triton releases") has the runs.
set -euo pipefail
version=$1
out=${2:-.whl}
py=${3:-3.12}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$work/wheel" "triton==$version"
mkdir -p "$work/tree"
(cd "$work/tree" && unzip -q "$work"/wheel/triton-*.whl)
rm -rf "$work"/tree/triton/backends/nvidia/lib/cupti* "$work"/tree/triton/instrumentation \
    "$work"/tree/triton/backends/amd/lib/libtriton_amd_codegen.so "$work"/tree/triton/_C/libproton.so
mkdir -p "$out"
tar -C "$work/tree" -cf - . | xz -9 -T0 | split -b 50M -d -a 1 - "$out/t$version.part-"
ls -l "$out"/t"$version".part-*
