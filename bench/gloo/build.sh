#!/usr/bin/env bash
# Build bench/gloo's driver library, libgloo_allreduce.so: Gloo's all-reduce
# (TCP transport) behind a small C API that the benchmarks load with ctypes,
# so that Gloo can be measured where PyTorch is not installed.
#
#   bench/gloo/build.sh GLOO_SRC [BUILD_DIR]
#
# GLOO_SRC: a checkout of https://github.com/pytorch/gloo (the script fetches
# nothing). BUILD_DIR (default build/gloo, git-ignored): Gloo is built there
# as a static library (TCP transport only: no CUDA, MPI, ibverbs, redis,
# libuv or TLS), then the driver is linked against it into
# BUILD_DIR/libgloo_allreduce.so, with libstdc++ and libgcc linked statically
# and every symbol but the driver's C API hidden, so that the file runs on
# another x86_64 Linux (glibc only) and cannot clash with a PyTorch (and its
# own Gloo) loaded into the same process.
#
# Needs: cmake >= 3.18, g++ >= 10 (C++20, as Gloo asks), make or ninja.
set -euo pipefail

if [ $# -lt 1 ] || [ ! -f "$1/gloo/allreduce.h" ]; then
    echo "usage: $0 GLOO_SRC [BUILD_DIR]   (GLOO_SRC: a checkout of github.com/pytorch/gloo;" >&2
    echo "       ${1:-GLOO_SRC}/gloo/allreduce.h not found)" >&2
    exit 2
fi
here="$(cd "$(dirname "$0")" && pwd)"
src="$(cd "$1" && pwd)"
out="${2:-$here/../../build/gloo}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
jobs="${JOBS:-$(nproc)}"
cxx="${CXX:-g++}"   # cmake also takes $CXX for Gloo

# 1. Gloo itself: static, position-independent (Gloo adds -fPIC), Release.
cmake -S "$src" -B "$out/gloo" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
    -DUSE_REDIS=OFF -DUSE_IBVERBS=OFF -DUSE_NCCL=OFF -DUSE_RCCL=OFF -DUSE_LIBUV=OFF \
    -DUSE_TCP_OPENSSL_LINK=OFF -DUSE_TCP_OPENSSL_LOAD=OFF -DUSE_CUDA=OFF -DUSE_ROCM=OFF \
    -DUSE_MPI=OFF -DBUILD_TEST=OFF -DBUILD_BENCHMARK=OFF >"$out/cmake.log"
cmake --build "$out/gloo" --target gloo -j "$jobs" >"$out/make.log"
lib="$(find "$out/gloo" -name libgloo.a | head -n 1)"
[ -n "$lib" ] || { echo "$0: libgloo.a not built (see $out/make.log)" >&2; exit 1; }

# 2. The driver. Only its C API (tlg_*) is exported (a version script), so
# the copies of Gloo and libstdc++ inside cannot interpose on, or be
# interposed by, another copy in the process (PyTorch's, MLX's libstdc++).
# -O3, no -march: the reduction, gloo::sum<float>, is a template compiled
# here; PyTorch's x86_64 wheels have it SSE-vectorized (addps, after a
# runtime check that the buffers don't overlap), and so does -O3, where
# GCC's -O2 (its "very cheap" vectorizer model, which adds no such checks)
# leaves the loop scalar (addss). Same machine code as PyTorch's, then,
# whether or not the loop is what limits the all-reduce (BENCHMARKS.md).
printf '{ global: tlg_*; local: *; };\n' >"$out/exports.map"
commit="unknown"
if [ -f "$src/GLOO_COMMIT" ]; then commit="$(head -c 40 "$src/GLOO_COMMIT")"
elif git -C "$src" rev-parse HEAD >/dev/null 2>&1; then commit="$(git -C "$src" rev-parse HEAD)"; fi
"$cxx" -std=c++20 -O3 -fPIC -shared -fvisibility=hidden -pthread \
    -I"$src" -I"$out/gloo" -DTLG_GLOO_COMMIT="\"$commit\"" \
    "$here/gloo_allreduce.cc" "$lib" \
    -static-libstdc++ -static-libgcc -Wl,--version-script="$out/exports.map" -Wl,-Bsymbolic -Wl,--no-undefined \
    -Wl,-z,now -o "$out/libgloo_allreduce.so"
echo "$out/libgloo_allreduce.so"
