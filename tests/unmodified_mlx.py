"""An ordinary MLX data-parallel program: nothing here mentions thunderlink.
With MLX_DISTRIBUTED_BACKEND=thunderlink it must run on thunderlink."""

import mlx.core as mx
import mlx.nn as nn

world = mx.distributed.init()
x = mx.ones((8,)) * (world.rank() + 1)
total = mx.distributed.all_sum(x)  # no group: the default group
grads = {"w": mx.ones((4, 4)) * world.rank(), "b": mx.ones((4,))}
avg = nn.average_gradients(grads)
mx.eval(total, avg)
n = world.size()
assert total.tolist() == [n * (n + 1) / 2] * 8, total
assert avg["w"].tolist() == [[(n - 1) / 2] * 4] * 4, avg["w"]
print(f"rank {world.rank()} of {n}: ok", flush=True)
