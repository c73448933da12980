"""Gloo, the peer of `thunderlink bench --vs gloo` and `bench/peers.py --peer gloo`,
through one of two implementations:

  torch  PyTorch's torch.distributed, backend "gloo" (needs torch).
  lib    bench/gloo's driver library, libgloo_allreduce.so (bench/gloo/build.sh
         builds it from a Gloo checkout; nothing else is needed where it runs):
         the same Gloo all-reduce that torch.distributed calls for a dense CPU
         tensor (gloo::allreduce: ring algorithm, in place, TCP transport),
         without PyTorch. Its path: --gloo-lib PATH or THUNDERLINK_GLOO_LIB.

"gloo" alone means torch where it can be imported, else the library; the
output's header says which one ran.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os

import numpy as np

__all__ = ["IMPLS", "GlooLib", "GlooUnavailable", "check_lib", "lib_path", "resolve", "torch_available"]

IMPLS = ("torch", "lib")
# bench/gloo/gloo_allreduce.cc's codes.
_DTYPES = {np.dtype(np.float32): 0, np.dtype(np.float64): 1, np.dtype(np.int64): 2}
SUM, MAX = 0, 1
_ERRLEN = 1024


class GlooUnavailable(Exception):
    """No implementation of Gloo can run here; the message says how to get one."""


def torch_available() -> bool:
    """torch.distributed with Gloo importable (without importing torch, which is slow)."""
    try:
        return importlib.util.find_spec("torch") is not None and \
            importlib.util.find_spec("torch.distributed") is not None
    except (ImportError, ValueError):
        return False


def lib_path(explicit: str | None = None) -> str | None:
    """The driver library's path: ``explicit`` (--gloo-lib), else THUNDERLINK_GLOO_LIB, else None."""
    if explicit:
        return os.path.abspath(os.path.expanduser(explicit))
    from ..config import gloo_lib

    path = gloo_lib()
    return os.path.abspath(os.path.expanduser(path)) if path else None


def check_lib(path: str) -> str:
    """Load the library at ``path`` once and return its version line;
    GlooUnavailable naming the problem if it is not there or not the driver."""
    if not os.path.isfile(path):
        raise GlooUnavailable(f"the Gloo driver library {path} does not exist: build it with "
                              f"bench/gloo/build.sh GLOO_SRC (see bench/gloo/README.md)")
    try:
        lib = ctypes.CDLL(path)
        lib.tlg_version.restype = ctypes.c_char_p
        return lib.tlg_version().decode()
    except (OSError, AttributeError) as e:
        raise GlooUnavailable(f"{path} is not a loadable Gloo driver library (bench/gloo/build.sh builds one): "
                              f"{e}") from None


def resolve(want: str, explicit_lib: str | None = None) -> tuple[str, str | None]:
    """Which implementation runs for ``want`` ("auto", "torch" or "lib"):
    ("torch", None) or ("lib", path). GlooUnavailable when none can."""
    if want not in ("auto",) + IMPLS:
        raise ValueError(want)
    path = lib_path(explicit_lib)
    if want == "torch" or (want == "auto" and torch_available()):
        if not torch_available():
            raise GlooUnavailable("Gloo through PyTorch needs torch (a CPU build is enough): pip install torch")
        return "torch", None
    if path is None:
        raise GlooUnavailable(
            ("PyTorch is not installed, and no Gloo driver library is named: " if want == "auto"
             else "no Gloo driver library is named: ")
            + "give --gloo-lib PATH or set THUNDERLINK_GLOO_LIB to a libgloo_allreduce.so built by "
              "bench/gloo/build.sh" + (", or pip install torch" if want == "auto" else ""))
    check_lib(path)
    return "lib", path


class GlooLib:
    """One rank's Gloo context through the driver library: a full mesh over
    TCP on ``iface`` (or ``hostname``), rendezvous in ``store_dir`` (a
    directory every rank of the job names; the launcher makes and removes it)."""

    def __init__(self, path: str, rank: int, size: int, store_dir: str, iface: str = "lo",
                 hostname: str | None = None, timeout: float = 300):
        lib = ctypes.CDLL(path)
        lib.tlg_version.restype = ctypes.c_char_p
        lib.tlg_open.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p,
                                 ctypes.c_double, ctypes.POINTER(ctypes.c_void_p), ctypes.c_char_p,
                                 ctypes.c_size_t]
        lib.tlg_allreduce.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                      ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t]
        lib.tlg_barrier.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
        lib.tlg_close.argtypes = [ctypes.c_void_p]
        lib.tlg_close.restype = None
        self.lib, self.path, self.rank, self.size = lib, path, rank, size
        self.version = lib.tlg_version().decode()
        self._err = ctypes.create_string_buffer(_ERRLEN)
        handle = ctypes.c_void_p()
        rc = lib.tlg_open(rank, size, os.fsencode(store_dir), iface.encode() if iface else None,
                          hostname.encode() if hostname else None, float(timeout), ctypes.byref(handle),
                          self._err, _ERRLEN)
        self._check(rc, "joining the job")
        self.handle = handle

    def _check(self, rc: int, what: str) -> None:
        if rc != 0:
            raise RuntimeError(f"Gloo driver library ({self.path}), rank {self.rank}, {what}: "
                               f"{self._err.value.decode(errors='replace')}")

    def allreduce(self, a: np.ndarray, op: int = SUM) -> None:
        """In place; ``a`` contiguous float32, float64 or int64."""
        code = _DTYPES.get(a.dtype)
        if code is None or not a.flags.c_contiguous or not a.flags.writeable:
            raise ValueError(f"Gloo driver library: need a writable contiguous float32/float64/int64 array, "
                             f"not {a.dtype} (contiguous: {a.flags.c_contiguous})")
        self._check(self.lib.tlg_allreduce(self.handle, a.ctypes.data, a.size, code, op, self._err, _ERRLEN),
                    "all-reduce")

    def caller(self, a: np.ndarray, op: int = SUM):
        """A function of no arguments that all-reduces ``a`` in place: the
        arguments are converted once, so each call is one foreign call."""
        code = _DTYPES.get(a.dtype)
        if code is None or not a.flags.c_contiguous or not a.flags.writeable:
            raise ValueError(f"Gloo driver library: need a writable contiguous float32/float64/int64 array, "
                             f"not {a.dtype}")
        fn, h, ptr, n, err, check = (self.lib.tlg_allreduce, self.handle, ctypes.c_void_p(a.ctypes.data),
                                     ctypes.c_size_t(a.size), self._err, self._check)
        code, op_ = ctypes.c_int(code), ctypes.c_int(op)
        errlen = ctypes.c_size_t(_ERRLEN)

        def run() -> None:
            if fn(h, ptr, n, code, op_, err, errlen):
                check(-1, "all-reduce")

        return run

    def barrier(self) -> None:
        self._check(self.lib.tlg_barrier(self.handle, self._err, _ERRLEN), "barrier")

    def close(self) -> None:
        if getattr(self, "handle", None) is not None:
            self.lib.tlg_close(self.handle)
            self.handle = None
