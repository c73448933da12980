#!/usr/bin/env bash
# Shared memory on a machine with cores to spare (the 16-core lent machine):
# all_sum busbw at N = 2, 4, 8 over shared memory, N = 2 over TCP loopback
# (the 3x figure), and through mx.distributed against MLX's ring in the same
# run. Each sweep twice; JSON per sweep in $OUT (or ./shm-scaling).
#
#   bash bench/shm_scaling.sh            # needs thunderlink installed
set -euo pipefail
out=${OUT:-shm-scaling}
mkdir -p "$out"
big=1M,4M,16M,64M,256M
for rep in 1 2; do
  for n in 2 4 8; do
    thunderlink bench -n "$n" --transport shm --sizes "4,64K,$big" --inplace out \
      --json "$out/shm-n$n-r$rep.json" --timeout 240
  done
  thunderlink bench -n 2 --transport tcp --sizes "4,64K,$big" --inplace out \
    --json "$out/tcp-n2-r$rep.json" --timeout 240
  thunderlink bench -n 2 --transport shm --via mlx --vs mlx-ring --sizes 4,1M,16M,64M \
    --json "$out/mlx-n2-r$rep.json" --timeout 240
done
