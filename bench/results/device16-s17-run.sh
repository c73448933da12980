#!/bin/bash
# Device run of stop 17 (issue 12): bash .whl/run3/run.sh PHASE; writes $OUT/log-PHASE.txt and $OUT/res-PHASE.tgz
PHASE=${1:-1}
R=/tmp/r; mkdir -p $R
LOG=$OUT/log-$PHASE.txt
exec > >(tee -a $LOG) 2>&1
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH
GL=".whl/libgloo_allreduce.so"
SIZES=4,1K,64K,1M,4M,16M,64M,256M
step() { local t=$1; shift; if [ $((SECONDS + t)) -gt 575 ]; then echo "=== skipped (time): $*"; return; fi
         echo; echo "=== [$SECONDS s] $*"; timeout $t "$@"; echo "=== rc $?"; }
echo "nproc $(nproc); $(ldd --version | head -1); python $(python3 -V); $(python3 -c 'import torch, numpy; print("torch", torch.__version__, "numpy", numpy.__version__)' 2>&1 | tail -1)"
source .whl/run3/phase$PHASE.sh
echo "=== done at $SECONDS s"
tar czf $OUT/res-$PHASE.tgz -C $R .
# N=2: through MLX vs MLX's ring vs Gloo (torch), twice; the core over TCP with I/O threads on/off (auto = on here); Gloo library vs torch
for rep in 1 2; do
  step 150 thunderlink bench -n 2 --via mlx --vs mlx-ring --vs gloo --inplace both --warmup 3 --sizes $SIZES --json $R/main-n2-r$rep.json
done
for rep in 1 2; do
  for t in auto off; do
    step 60 env THUNDERLINK_TCP_THREADS=$t thunderlink bench -n 2 --transport tcp --vs mlx-ring --inplace both --warmup 3 --sizes 64K,1M,4M,16M,64M,256M --json $R/tcp-n2-$t-r$rep.json
  done
done
step 40 env THUNDERLINK_TRANSPORT=tcp THUNDERLINK_TCP_THREADS=on thunderlink launch -n 2 --timeout 35 bench/tcp_threads_cpu.py 16,64,256
step 60 thunderlink bench -n 2 --skip-core --vs gloo-torch --vs gloo-lib --gloo-lib $GL --warmup 3 --sizes 1M,16M,64M,256M --json $R/gloo-check-n2.json
# N=8: through MLX vs MLX's ring vs Gloo (torch); the core over TCP, threads off (auto) and on
step 240 thunderlink bench -n 8 --via mlx --vs mlx-ring --vs gloo --inplace both --warmup 3 --sizes $SIZES --json $R/main-n8-r1.json
for t in auto on; do
  step 90 env THUNDERLINK_TCP_THREADS=$t thunderlink bench -n 8 --transport tcp --vs mlx-ring --inplace out --warmup 3 --sizes 1M,4M,16M,64M,256M --json $R/tcp-n8-$t.json
done
step 160 thunderlink bench -n 8 --via mlx --vs mlx-ring --vs gloo --inplace both --warmup 3 --sizes 1M,16M,64M,256M --json $R/main-n8-r2.json
# N=2 over TCP, in place and out, 4-64 MiB: where the I/O threads start to pay, and the knobs around them
S=2M,4M,16M,64M
step 45 thunderlink bench -n 2 --transport tcp --vs mlx-ring --inplace both --warmup 3 --sizes $S --json $R/k-default.json
for kv in THUNDERLINK_TCP_THREADS_MIN_BYTES=1M "THUNDERLINK_TCP_THREADS_MIN_BYTES=1M THUNDERLINK_CONNS=4" "THUNDERLINK_TCP_THREADS_MIN_BYTES=1M THUNDERLINK_CHUNK_BYTES=1M" "THUNDERLINK_TCP_THREADS_MIN_BYTES=1M THUNDERLINK_PIPELINE_DEPTH=4" "THUNDERLINK_TCP_THREADS_MIN_BYTES=1M THUNDERLINK_CHUNK_BYTES=2M THUNDERLINK_PIPELINE_DEPTH=4"; do
  name=$(echo "$kv" | sed 's/THUNDERLINK_//g; s/ /_/g; s/=/-/g')
  step 45 env $kv thunderlink bench -n 2 --transport tcp --vs mlx-ring --inplace both --warmup 3 --sizes $S --json $R/k-$name.json
done
step 45 thunderlink bench -n 2 --transport tcp --vs mlx-ring --inplace both --warmup 3 --sizes $S --json $R/k-default2.json
# phase4.sh (written on the machine by the run command):
S=1M,2M,4M,16M
for rep in 1 2; do for m in 2M 8M; do
step 40 env THUNDERLINK_TCP_THREADS_MIN_BYTES=$m thunderlink bench -n 2 --transport tcp --vs mlx-ring --inplace both --warmup 3 --sizes $S --json $R/m-$m-r$rep.json
done; done
