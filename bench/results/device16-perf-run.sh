#!/bin/bash
# perf helper's device run: one complete measurement script (see the perf branch's BENCHMARKS.md).
# usage: bash .whl/perf/run.sh PHASE   (PHASE 1 or 2); writes $OUT/log-PHASE.txt and $OUT/res-PHASE.tgz
PHASE=${1:-1}
R=/tmp/r; mkdir -p $R
LOG=$OUT/log-$PHASE.txt
exec > >(tee -a $LOG) 2>&1
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH
P=.whl/perf
SIZES=4,1K,64K,1M,4M,8M,16M,64M,256M
# a step runs only if its timeout still ends before 570 s (the call's limit is 600)
step() { local t=$1; shift; if [ $((SECONDS + t)) -gt 570 ]; then echo "=== skipped (time): $*"; return; fi
         echo; echo "=== [$SECONDS s] $*"; timeout $t "$@"; echo "=== rc $?"; }
echo "nproc $(nproc); $(ldd --version | head -1); THP $(cat /sys/kernel/mm/transparent_hugepage/enabled); python $(python3 -V)"
python3 -c "import thunderlink.mlx_backend as t, mlx.core as mx; print('mlx', mx.__version__)"
if [ "$PHASE" = 1 ]; then
  step 130 thunderlink bench -n 2 --via mlx --vs mlx-ring --inplace both --warmup 3 --sizes $SIZES --json $R/main-n2-r1.json
  step 200 thunderlink bench -n 8 --via mlx --vs mlx-ring --inplace both --warmup 3 --sizes $SIZES --json $R/main-n8-r1.json
  # fairness: MLX's ring at N=8, small sizes: alone, in the bench alone, in the bench beside the core
  step 60 python3 $P/peers.py --peer mlx-ring -n 8 --sizes 4,1K,64K,1M --inplace out --json $R/fair-alone.json
  step 60 thunderlink bench -n 8 --vs mlx-ring --skip-core --sizes 4,1K,64K,1M --json $R/fair-skipcore.json
  step 60 thunderlink bench -n 8 --vs mlx-ring --sizes 4,1K,64K,1M --json $R/fair-withcore.json
  step 60 python3 $P/peers.py --peer mlx-ring -n 8 --sizes 4,1K,64K,1M --inplace out --json $R/fair-alone2.json
  step 100 python3 $P/peak_rss.py -n 2 --size 256M --iters 3 --json $R/rss-n2.json
  # mid sizes, core alone, N=2: the knobs
  for kv in DEFAULT=1 THUNDERLINK_CHUNK_BYTES=1M THUNDERLINK_CHUNK_BYTES=2M THUNDERLINK_CONNS=1 THUNDERLINK_PIPELINE_DEPTH=4 THUNDERLINK_ALGO_THRESHOLD=4M THUNDERLINK_SPIN_US=0; do
    step 40 env $kv thunderlink bench -n 2 --inplace out --sizes 1M,2M,4M,8M,16M,64M --json $R/knob-n2-${kv//=/_}.json
  done
  step 60 python3 $P/peers.py --peer mlx-ring -n 2 --sizes 1M,4M,16M,64M,256M --inplace both --json $R/ring-alone-n2.json
  step 130 thunderlink bench -n 2 --via mlx --vs mlx-ring --inplace both --warmup 3 --sizes $SIZES --json $R/main-n2-r2.json
  for kv in DEFAULT=1 THUNDERLINK_CHUNK_BYTES=2M THUNDERLINK_CONNS=1; do
    step 40 env $kv thunderlink bench -n 8 --inplace out --sizes 1M,4M,16M,64M --json $R/knob-n8-${kv//=/_}.json
  done
else
  source $P/phase$PHASE.sh
fi
echo "=== done at $SECONDS s"
tar czf $OUT/res-$PHASE.tgz -C $R .
