"""THUNDERLINK_MALLOC_HEAP: what config reads, and that thunderlink's MLX
group keeps large blocks in glibc's heap (in a child process: the setting is
process-wide)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from thunderlink.config import from_env
from thunderlink.errors import ConfigError

from conftest import PKG_ROOT as SRC

G = 1 << 30


@pytest.mark.parametrize("env,heap", [
    ({}, G),
    ({"THUNDERLINK_MALLOC_HEAP": "0"}, 0),
    ({"THUNDERLINK_MALLOC_HEAP": "256M"}, 256 << 20),
    ({"MALLOC_MMAP_THRESHOLD_": "1000000"}, None),            # the user's own glibc settings win
    ({"MALLOC_TRIM_THRESHOLD_": "1000000"}, None),
    ({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=4096"}, None),
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, G),        # other malloc knobs do not
    ({"THUNDERLINK_MALLOC_HEAP": "512M", "MALLOC_MMAP_THRESHOLD_": "1"}, 512 << 20),
])
def test_malloc_heap_from_env(env, heap):
    assert from_env(env).malloc_heap == heap


@pytest.mark.parametrize("bad", ["4G", "-1", "lots"])
def test_malloc_heap_bad_values(bad):
    with pytest.raises(ConfigError, match="THUNDERLINK_MALLOC_HEAP"):
        from_env({"THUNDERLINK_MALLOC_HEAP": bad})


CHILD = r"""
import ctypes, resource, sys
import thunderlink.mlx_backend as tlb
state = tlb.tune_malloc(int(sys.argv[1]))
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size = 64 << 20
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
p = libc.malloc(size); ctypes.memset(p, 1, size); libc.free(p)   # grows the heap once
f0 = faults()
for _ in range(3):
    p = libc.malloc(size); ctypes.memset(p, 1, size); libc.free(p)
print(state, "|", faults() - f0)
"""


def child(heap: int) -> tuple[str, int]:
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES"):
        env.pop(k, None)
    p = subprocess.run([sys.executable, "-c", CHILD, str(heap)], env=env, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, p.stderr
    state, faults = p.stdout.strip().rsplit("|", 1)
    return state.strip(), int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_heap_keeps_large_blocks():
    """64 MiB blocks, freed and taken again: with the heap kept, no new page
    faults; left alone, glibc maps them afresh each time (16384 pages each)."""
    state, faults = child(G)
    assert state == f"heap {G}"
    assert faults < 1000, faults
    state, faults = child(0)
    assert state.startswith("left alone: THUNDERLINK_MALLOC_HEAP=0")
    assert faults > 3 * 10000, faults
