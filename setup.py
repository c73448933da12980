"""Builds thunderlink's two extensions: the C core through cffi
(thunderlink.bindings._core) and the MLX shim through CMake and nanobind
(thunderlink.mlx_backend._shim). Metadata lives in pyproject.toml."""

import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


class BuildPyWithPth(build_py):
    """Also installs thunderlink.pth into site-packages: one line that, only
    when MLX_DISTRIBUTED_BACKEND=thunderlink, makes unmodified MLX programs
    use thunderlink (see thunderlink/mlx_backend/autoload.py)."""

    def run(self):
        super().run()
        src = os.path.join(HERE, "src", "thunderlink", "mlx_backend", "thunderlink.pth")
        if os.path.exists(src):
            shutil.copy(src, os.path.join(self.build_lib, "thunderlink.pth"))


setup(
    cffi_modules=["src/thunderlink/bindings/_build.py:ffibuilder"],
    cmdclass={"build_py": BuildPyWithPth},
    zip_safe=False,
)
