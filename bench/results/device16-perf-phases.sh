# phase 2 of the perf helper's device run (called by run.sh 2)
SIZES=4,1K,64K,1M,4M,8M,16M,64M,256M
HP=GLIBC_TUNABLES=glibc.malloc.hugetlb=1
step 200 thunderlink bench -n 8 --via mlx --vs mlx-ring --inplace both --warmup 3 --sizes $SIZES --json $R/main-n8-r2.json
for rep in 1 2; do
  step 45 env A=1 thunderlink bench -n 2 --via mlx --inplace both --warmup 3 --sizes 4M,16M,64M,256M --json $R/hp-n2-heap-$rep.json
  step 45 env $HP thunderlink bench -n 2 --via mlx --inplace both --warmup 3 --sizes 4M,16M,64M,256M --json $R/hp-n2-thp-$rep.json
done
step 45 env NUMPY_MADVISE_HUGEPAGE=0 thunderlink bench -n 2 --via mlx --inplace both --warmup 3 --sizes 4M,16M,64M,256M --json $R/hp-n2-nonumpythp.json
step 70 env A=1 thunderlink bench -n 8 --via mlx --inplace both --warmup 3 --sizes 4M,16M,64M,256M --json $R/hp-n8-heap.json
step 70 env $HP thunderlink bench -n 8 --via mlx --inplace both --warmup 3 --sizes 4M,16M,64M,256M --json $R/hp-n8-thp.json
for rep in 1 2; do
  step 30 thunderlink bench -n 8 --inplace both --sizes 2M,3M,4M,6M,8M,12M,16M --json $R/step-n8-$rep.json
done
step 80 python3 $P/peers.py --peer mlx-ring -n 8 --sizes 4,64K,1M,16M,64M,256M --inplace both --json $R/ring-alone-n8.json
step 30 thunderlink bench -n 2 --inplace both --sizes 2M,3M,4M,6M,8M,12M,16M --json $R/step-n2-1.json
# phase 3: the MLX in-place series donate now (phase 1-2's did not: the bench kept a second reference)
SIZES=4,1K,64K,1M,4M,8M,16M,64M,256M
step 110 thunderlink bench -n 2 --via mlx --vs mlx-ring --inplace both --warmup 3 --sizes $SIZES --json $R/main-n2-r3.json
step 170 thunderlink bench -n 8 --via mlx --vs mlx-ring --inplace both --warmup 3 --sizes $SIZES --json $R/main-n8-r3.json
step 60 thunderlink bench -n 2 --transport tcp --via mlx --vs mlx-ring --inplace both --warmup 3 --sizes 64K,1M,4M,16M,64M,256M --json $R/tcp-n2.json
step 80 thunderlink bench -n 8 --transport tcp --via mlx --vs mlx-ring --inplace out --warmup 3 --sizes 1M,4M,16M,64M,256M --json $R/tcp-n8.json
step 60 python3 $P/peak_rss.py -n 8 --size 256M --iters 2 --cases core,tl-mlx,tl-mlx-in,ring,ring-in --json $R/rss-n8.json
step 110 thunderlink bench -n 2 --via mlx --vs mlx-ring --inplace both --warmup 3 --sizes $SIZES --json $R/main-n2-r4.json
# phase 4: alignment / thread of the core's in-place all_sum, next to the MLX in-place series
step 90 thunderlink launch -n 2 --timeout 80 $P/align.py
step 60 thunderlink bench -n 2 --via mlx --inplace in --warmup 3 --sizes 4M,16M,64M --json $R/inplace-n2-a.json
step 90 thunderlink launch -n 2 --timeout 80 $P/align.py
step 60 thunderlink bench -n 2 --via mlx --inplace in --warmup 3 --sizes 4M,16M,64M --json $R/inplace-n2-b.json
# phase 5: does MLX's ring in the same processes slow thunderlink's MLX in-place series?
for rep in 1 2; do
step 60 thunderlink bench -n 2 --via mlx --inplace in --warmup 3 --sizes 4M,16M,64M,256M --json $R/inplace-noring-$rep.json
step 80 thunderlink bench -n 2 --via mlx --vs mlx-ring --inplace in --warmup 3 --sizes 4M,16M,64M,256M --json $R/inplace-ring-$rep.json
done
step 80 python3 $P/peers.py --peer mlx-ring -n 2 --sizes 4M,16M,64M,256M --inplace in --json $R/inplace-ring-alone.json
