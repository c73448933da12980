"""cffi build script for thunderlink.bindings._core (API mode, out of line).

Run by setuptools through ``cffi_modules`` in setup.py, by file path, before
the package exists: it must not import thunderlink. Build switches:

  THUNDERLINK_BUILD_DEBUG=1   -O0 -g, and AddressSanitizer when =asan
"""

import os
import sys

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))  # holds setup.py
CSRC = os.path.join("src", "thunderlink", "csrc")

# Listed, not globbed, so a stray file never ends up in the build.
SOURCES = [
    "core/comm.c",
    "core/options.c",
    "core/log.c",
    "core/msg.c",
    "core/topo.c",
    "core/bootstrap.c",
    "core/auth.c",
    "core/progress.c",
    "core/heartbeat.c",
    "core/tcpio.c",
    "core/interrupt.c",
    "coll/api.c",
    "coll/select.c",
    "coll/schedule.c",
    "coll/ring.c",
    "coll/mesh.c",
    "coll/small.c",
    "coll/p2p.c",
    "transport/tcp.c",
    "transport/shm.c",
    "transport/rdma.c",
    "reduce/reduce.c",
]

# Headers: setuptools rebuilds the extension when one of these is newer
# than it, as it does for SOURCES (an edit to the options table, say).
HEADERS = [
    "tl.h",
    "core/internal.h",
    "core/options.h",
    "transport/ibv_abi.h",
]


def _compile_args():
    debug = os.environ.get("THUNDERLINK_BUILD_DEBUG", "")
    args = ["-std=c11", "-Wall", "-Wextra", "-Wno-unused-parameter",
            "-Werror=incompatible-pointer-types", "-Werror=implicit-function-declaration",
            "-fvisibility=hidden"]
    if sys.platform.startswith("linux"):
        args.append("-D_GNU_SOURCE")
    if debug:
        args += ["-O0", "-g"]
        if debug == "asan":
            args += ["-fsanitize=address", "-fno-omit-frame-pointer"]
    else:
        args += ["-O3"]
    return args


def _link_args():
    args = []
    if os.environ.get("THUNDERLINK_BUILD_DEBUG") == "asan":
        args.append("-fsanitize=address")
    if sys.platform.startswith("linux"):
        args += ["-ldl", "-lpthread"]
    return args


ffibuilder = FFI()
with open(os.path.join(HERE, "_cdef.h")) as f:
    ffibuilder.cdef(f.read())

ffibuilder.set_source(
    "thunderlink.bindings._core",
    '#include "tl.h"',
    # Relative to setup.py: setuptools rejects absolute source paths.
    sources=[os.path.join(CSRC, s) for s in SOURCES],
    depends=[os.path.join(CSRC, h) for h in HEADERS],
    include_dirs=[CSRC],
    extra_compile_args=_compile_args(),
    extra_link_args=_link_args(),
    py_limited_api=True,
)

if __name__ == "__main__":
    os.chdir(ROOT)
    ffibuilder.compile(verbose=True)
