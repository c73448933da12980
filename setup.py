"""Builds thunderlink's two extensions: the C core through cffi
(thunderlink.bindings._core) and the MLX shim through CMake and nanobind
(thunderlink.mlx_backend._shim). Metadata lives in pyproject.toml."""

import os
import shutil
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
SHIM_DIR = os.path.join(HERE, "src", "thunderlink", "mlx_backend")
CSRC = os.path.join(HERE, "src", "thunderlink", "csrc")


class CMakeExtension(Extension):
    def __init__(self, name, source_dir):
        super().__init__(name, sources=[])
        self.source_dir = source_dir


class BuildExt(build_ext):
    """cffi's extension goes through setuptools as usual; the shim through CMake."""

    def build_extension(self, ext):
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        import mlx.core

        out_dir = os.path.dirname(os.path.abspath(self.get_ext_fullpath(ext.name)))
        build_dir = os.path.join(os.path.abspath(self.build_temp), "shim")
        _drop_stale_cache(build_dir)
        os.makedirs(build_dir, exist_ok=True)
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        subprocess.check_call(
            ["cmake", "-S", ext.source_dir, "-B", build_dir, *generator,
             f"-DPython_EXECUTABLE={sys.executable}", "-DCMAKE_BUILD_TYPE=Release",
             f"-DTL_CSRC={CSRC}", f"-DTL_OUTPUT_DIR={out_dir}",
             f"-DTL_MLX_VERSION={mlx.core.__version__}"]
        )
        subprocess.check_call(["cmake", "--build", build_dir, "--parallel"])


def _drop_stale_cache(build_dir):
    """Forget a CMake cache made by another cmake (pip's isolated builds use a
    throwaway one), which CMake would refuse to reuse."""
    cache = os.path.join(build_dir, "CMakeCache.txt")
    if not os.path.exists(cache):
        return
    cmake = os.path.realpath(shutil.which("cmake") or "")
    with open(cache, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("CMAKE_COMMAND:"):
                if os.path.realpath(line.split("=", 1)[1].strip()) != cmake:
                    shutil.rmtree(build_dir, ignore_errors=True)
                return


class BuildPyWithPth(build_py):
    """Also installs thunderlink.pth into site-packages: one line that, only
    when MLX_DISTRIBUTED_BACKEND=thunderlink, makes unmodified MLX programs
    use thunderlink (see thunderlink/mlx_backend/autoload.py)."""

    def run(self):
        super().run()
        shutil.copy(os.path.join(SHIM_DIR, "thunderlink.pth"), os.path.join(self.build_lib, "thunderlink.pth"))


# The software ibverbs provider for tests (thunderlink.testing.softverbs): a
# plain shared library that programs dlopen in place of libibverbs; never
# imported, so it needs no Python symbols.
SOFTVERBS = Extension(
    "thunderlink.testing.softverbs._softverbs",
    sources=["src/thunderlink/testing/softverbs/softverbs.c"],
    depends=["src/thunderlink/csrc/transport/ibv_abi.h"],
    include_dirs=["src/thunderlink/csrc/transport"],
    extra_compile_args=["-std=gnu11", "-O2", "-Wall", "-fvisibility=hidden"],
    extra_link_args=["-pthread"],
)

setup(
    cffi_modules=["src/thunderlink/bindings/_build.py:ffibuilder"],
    ext_modules=[CMakeExtension("thunderlink.mlx_backend._shim", SHIM_DIR), SOFTVERBS],
    cmdclass={"build_ext": BuildExt, "build_py": BuildPyWithPth},
    zip_safe=False,
)
