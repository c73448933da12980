"""macOS builds, checked on Linux: nobody here runs a Mac, so this test
cross-compiles and links thunderlink's two extensions for macOS with zig's
C/C++ toolchain (the ``ziglang`` package, which carries Apple's libc headers
and libSystem's symbol list), then reads the Mach-O files it made.

For aarch64-macos and x86_64-macos, from 14.0 on (the oldest macOS that MLX
0.32.4 has wheels for):

- the C core: every file in _build.py's SOURCES, with _build.py's compile
  arguments as on a Mac, and -Werror. No object may call a Linux-only
  function (Linux-only macros such as SO_BINDTODEVICE or SYS_futex do not
  exist in Apple's headers, so using them fails the compile already);
- the cffi module: the C that cffi generates from _cdef.h, compiled like the
  core (without -Werror: cffi's code is not ours), linked with the core into a
  Python extension (-undefined dynamic_lookup). The core must define every
  tl_ function _cdef.h declares, tl_get_vtable included (Python hands the
  shim that table), and the module may leave only Python's own symbols for
  the interpreter to provide.

For aarch64-macos only (MLX has no x86_64 macOS wheel, so the shim cannot
exist there):

- the MLX shim: shim.cpp and nanobind (from the installed ``nanobind``
  package, built as CMakeLists.txt's nanobind_add_module does), against the
  headers of the macOS ``mlx-metal`` wheel (mlx's own wheel holds only the
  Python module) and linked to its libmlx.dylib with CMakeLists.txt's Apple
  rpath. Every symbol the shim takes from libmlx.dylib must be one the dylib
  exports, only Python's symbols may be left unbound, and the rpath must
  lead from thunderlink/mlx_backend/ to mlx/lib/libmlx.dylib as the wheels
  install them.

What differs from a real Mac build: Python's headers are this machine's
(Linux CPython's pyconfig.h; no macOS copy is at hand), the C++ standard
library is zig's libc++ (same std::__1 ABI as Apple's, linked statically
here instead of /usr/lib/libc++.1.dylib), and the extensions are dylibs
(zig 0.17's -bundle writes no valid file), which resolve symbols the same
way. Nothing
built here is ever run.

Downloads (the 45 MB mlx-metal wheel) and zig's cache (compiler-rt and
libc++, built once per target) are kept under $XDG_CACHE_HOME/thunderlink/macos
(~/.cache by default): a first run takes about 90 s on two cores, later ones
about 10 s (a few when no source changed). Where ziglang, nanobind or the
wheel cannot be had, the test skips saying why; with CI set it fails
instead, since CI must check macOS.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import io
import os
import posixpath
import re
import shlex
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from unittest import mock

import pytest

import macho

# A cold cache builds compiler-rt and libc++ for each target first.
pytestmark = pytest.mark.timeout(900)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join("src", "thunderlink")  # relative to ROOT, as diagnostics name files
CSRC = os.path.join(PKG, "csrc")
BUILD_SCRIPT = os.path.join(ROOT, PKG, "bindings", "_build.py")
CDEF = os.path.join(ROOT, PKG, "bindings", "_cdef.h")
SHIM_DIR = os.path.join(PKG, "mlx_backend")

MACOS = "14.0"
CORE_TARGETS = ("aarch64-macos", "x86_64-macos")
SHIM_TARGET = "aarch64-macos"
MLX_PLATFORM = "macosx_14_0_arm64"

CACHE = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "thunderlink", "macos")

# Functions a Mac does not have; a Linux code path that lost its #ifdef.
LINUX_ONLY = {
    "memfd_create", "process_vm_readv", "process_vm_writev",
    "epoll_create", "epoll_create1", "epoll_ctl", "epoll_wait", "epoll_pwait",
    "eventfd", "eventfd_read", "eventfd_write", "signalfd", "timerfd_create",
    "accept4", "pipe2", "sendmmsg", "recvmmsg", "splice", "vmsplice", "mremap",
    "sched_getcpu", "sched_setaffinity", "pthread_setaffinity_np", "gettid", "prctl",
    "getrandom", "memrchr",
    # futex and gettid go through syscall(2), deprecated on macOS (and
    # SYS_futex, SYS_gettid have no Apple numbers).
    "syscall",
}


@dataclass
class Step:
    """One compiler or linker run."""

    what: str
    cmd: list[str]
    returncode: int = 0
    output: str = ""

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def report(self) -> str:
        return f"{self.what} failed (exit {self.returncode}):\n{self.output.rstrip()}\n$ {shlex.join(self.cmd)}"


def _run(step: Step) -> Step:
    env = dict(os.environ, ZIG_GLOBAL_CACHE_DIR=os.path.join(CACHE, "zig"))
    proc = subprocess.run(step.cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    step.returncode, step.output = proc.returncode, proc.stdout
    return step


def _run_all(steps: list[Step]) -> None:
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        list(pool.map(_run, steps))


def _unavailable(reason: str):
    if os.environ.get("CI"):
        pytest.fail(f"{reason}\nCI must check the macOS builds, so there this is a failure.", pytrace=False)
    pytest.skip(reason)


def _zig(lang: str, target: str) -> list[str]:
    if importlib.util.find_spec("ziglang") is None:
        _unavailable("ziglang is not installed (pip install '.[test]' brings it)")
    return [sys.executable, "-m", "ziglang", lang, "-target", f"{target}.{MACOS}", "-fno-color-diagnostics"]


def _python_include() -> str:
    include = sysconfig.get_paths()["include"]
    if not os.path.exists(os.path.join(include, "Python.h")):
        _unavailable(f"Python's headers are not in {include} (python3-dev)")
    return include


def _mlx_version() -> str:
    with open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8") as f:
        found = re.search(r"""["']mlx==([0-9][^;"']*); platform_system == 'Darwin'["']""", f.read())
    assert found, "pyproject.toml no longer pins mlx==VERSION for Darwin; update _mlx_version()"
    return found.group(1)


@dataclass
class CoreBuild:
    target: str
    objects: dict[str, str] = field(default_factory=dict)  # source -> object
    compiles: list[Step] = field(default_factory=list)
    cffi_compile: Step | None = None
    cffi_object: str = ""
    link: Step | None = None
    module: str = ""


def _build_script_for_macos():
    """_build.py as setuptools runs it on a Mac: its SOURCES, its compile and
    link arguments for a release build, and its FFI builder. Loaded by path,
    like setuptools does; it builds the FFI at import but compiles nothing."""
    spec = importlib.util.spec_from_file_location("_thunderlink_build_for_macos", BUILD_SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    with mock.patch.object(sys, "platform", "darwin"), mock.patch.dict(os.environ):
        os.environ.pop("THUNDERLINK_BUILD_DEBUG", None)
        return script.SOURCES, script._compile_args(), script._link_args(), script.ffibuilder


@pytest.fixture(scope="module")
def core_builds(tmp_path_factory) -> dict[str, CoreBuild]:
    sources, compile_args, link_args, ffibuilder = _build_script_for_macos()
    out = str(tmp_path_factory.mktemp("macos-core"))
    cffi_c = os.path.join(out, "_core.c")
    with contextlib.redirect_stdout(io.StringIO()):  # its "generating ..." line
        ffibuilder.emit_c_code(cffi_c)
    python_include = _python_include()

    builds = {t: CoreBuild(t) for t in CORE_TARGETS}
    for target, build in builds.items():
        cc = _zig("cc", target)
        for src in sources:
            path = os.path.join(CSRC, src)
            obj = os.path.join(out, f"{target}-{src.replace('/', '-')}.o")
            build.objects[path] = obj
            build.compiles.append(Step(f"{target}: compiling {path}",
                                       cc + compile_args + ["-Werror", f"-I{CSRC}", "-c", path, "-o", obj]))
        build.cffi_object = os.path.join(out, f"{target}-_core.o")
        build.cffi_compile = Step(f"{target}: compiling cffi's module (from {os.path.relpath(CDEF, ROOT)})",
                                  cc + compile_args + [f"-I{CSRC}", f"-I{python_include}",
                                                       "-c", cffi_c, "-o", build.cffi_object])
    _run_all([s for b in builds.values() for s in (*b.compiles, b.cffi_compile)])

    links = []
    for target, build in builds.items():
        if all(s.ok for s in (*build.compiles, build.cffi_compile)):
            build.module = os.path.join(out, f"{target}-_core.abi3.so")
            build.link = Step(f"{target}: linking the cffi module",
                              _zig("cc", target) + ["-shared", "-undefined", "dynamic_lookup", "-o", build.module,
                                                    build.cffi_object, *build.objects.values(), *link_args])
            links.append(build.link)
    _run_all(links)
    return builds


def _fail(problems: list[str]):
    if problems:
        pytest.fail("\n\n".join(problems), pytrace=False)


def _linux_only(target: str, objects) -> list[str]:
    problems = []
    for source, obj in objects:
        called = {n[1:] for n in macho.read(obj).undefined} & LINUX_ONLY
        if called:
            problems.append(f"{source} ({target}) calls Linux-only {', '.join(sorted(called))}: not on macOS")
    return problems


def _not_python(image: macho.MachO, what: str) -> list[str]:
    """Python's C API is all that an extension may leave to the interpreter."""
    stray = sorted(n for n in image.unbound() if not re.match(r"__?Py", n))
    if not stray:
        return []
    return [f"{what} leaves symbols that neither a linked library nor Python provides "
            f"(it would fail to load): {', '.join(n[1:] for n in stray)}"]


@pytest.mark.parametrize("target", CORE_TARGETS)
def test_core_compiles_for_macos(core_builds, target):
    build = core_builds[target]
    _fail([s.report() for s in build.compiles if not s.ok])
    _fail(_linux_only(target, build.objects.items()))


@pytest.mark.parametrize("target", CORE_TARGETS)
def test_cffi_module_links_for_macos(core_builds, target):
    build = core_builds[target]
    if not all(s.ok for s in build.compiles):
        pytest.fail(f"not linked: the core did not compile for {target} (see test_core_compiles_for_macos)",
                    pytrace=False)
    _fail([s.report() for s in (build.cffi_compile, build.link) if not s.ok])

    with open(CDEF, encoding="utf-8") as f:
        declared = set(re.findall(r"\b(tl_\w+)\s*\(", f.read()))
    _fail([] if "tl_get_vtable" in declared else
          ["_cdef.h no longer declares tl_get_vtable: Python could not hand the shim the core's table"])
    defined = set().union(*(macho.read(o).defined for o in build.objects.values()))
    missing = sorted(n for n in declared if f"_{n}" not in defined)
    _fail([f"{target}: _cdef.h declares {', '.join(missing)}, which no core source defines"] if missing else [])
    _fail(_not_python(macho.read(build.module), f"{target}: the cffi module"))


@pytest.fixture(scope="module")
def mlx_macos() -> str:
    """The mlx-metal wheel's mlx/include and mlx/lib/libmlx.dylib, laid out
    as in site-packages, in the cache (downloaded and unpacked once)."""
    version = _mlx_version()
    dest = os.path.join(CACHE, f"mlx-metal-{version}-{MLX_PLATFORM}")
    if os.path.isdir(dest):
        return dest
    os.makedirs(CACHE, exist_ok=True)
    wheels = os.path.join(CACHE, "wheels")
    pattern = os.path.join(wheels, f"mlx_metal-{version}-*-{MLX_PLATFORM}.whl")
    if not glob.glob(pattern):
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", f"mlx-metal=={version}", "--no-deps",
             "--only-binary=:all:", "--platform", MLX_PLATFORM, "--dest", wheels,
             "--disable-pip-version-check", "--quiet"],
            stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if not glob.glob(pattern):
            _unavailable(f"could not download mlx-metal=={version} for {MLX_PLATFORM}:\n{proc.stdout}{proc.stderr}")
    (wheel,) = glob.glob(pattern)
    # Unpacked beside dest, then renamed: an interrupted run leaves no half tree.
    unpacking = tempfile.mkdtemp(prefix="unpacking-", dir=CACHE)
    with zipfile.ZipFile(wheel) as z:
        z.extractall(unpacking, [n for n in z.namelist()
                                 if n.startswith("mlx/include/") or n == "mlx/lib/libmlx.dylib"])
    os.rename(unpacking, dest)
    return dest


@dataclass
class ShimBuild:
    compiles: list[Step]
    shim_object: str
    libmlx: str
    shim: str
    link: Step | None = None


def _apple_rpath() -> str:
    with open(os.path.join(ROOT, SHIM_DIR, "CMakeLists.txt"), encoding="utf-8") as f:
        found = re.search(r'if\(APPLE\)\s*set\(_rpath "([^"]+)"\)', f.read())
    assert found, 'CMakeLists.txt no longer sets the Apple rpath as if(APPLE) set(_rpath "..."); update _apple_rpath()'
    return found.group(1)


@pytest.fixture(scope="module")
def shim_build(tmp_path_factory, mlx_macos):
    if importlib.util.find_spec("nanobind") is None:
        _unavailable("nanobind is not installed (pip install '.[test]' brings it)")
    import nanobind

    nb = os.path.dirname(nanobind.__file__)
    out = str(tmp_path_factory.mktemp("macos-shim"))
    cxx = _zig("c++", SHIM_TARGET)
    # As CMake builds nanobind_add_module(... NB_STATIC NB_DOMAIN mlx NOMINSIZE)
    # in Release with CMAKE_CXX_STANDARD 20.
    common = ["-std=c++20", "-O3", "-DNDEBUG", "-fvisibility=hidden", "-fno-stack-protector",
              f"-I{_python_include()}", f"-I{os.path.join(nb, 'include')}"]
    shim_obj, nb_obj = os.path.join(out, "shim.o"), os.path.join(out, "nanobind.o")
    shim_cpp = os.path.join(SHIM_DIR, "shim.cpp")
    compiles = [
        Step(f"{SHIM_TARGET}: compiling {shim_cpp}",
             cxx + common + ["-DNB_DOMAIN=mlx", f'-DTL_BUILT_MLX_VERSION="{_mlx_version()}"',
                             f"-I{os.path.join(mlx_macos, 'mlx', 'include')}", f"-I{CSRC}",
                             "-c", shim_cpp, "-o", shim_obj]),
        Step(f"{SHIM_TARGET}: compiling nanobind",
             cxx + common + ["-DNB_BUILD", "-DNB_COMPACT_ASSERTIONS", "-fno-strict-aliasing",
                             f"-I{os.path.join(nb, 'ext', 'robin_map', 'include')}",
                             "-c", os.path.join(nb, "src", "nb_combined.cpp"), "-o", nb_obj]),
    ]
    _run_all(compiles)
    build = ShimBuild(compiles, shim_obj, libmlx=os.path.join(mlx_macos, "mlx", "lib", "libmlx.dylib"),
                      shim=os.path.join(out, "_shim.so"))
    if all(s.ok for s in compiles):
        build.link = _run(Step(f"{SHIM_TARGET}: linking the shim",
                               cxx + ["-shared", "-undefined", "dynamic_lookup", "-o", build.shim, shim_obj, nb_obj,
                                      build.libmlx, f"-Wl,-rpath,{_apple_rpath()}"]))
    return build


def test_shim_links_against_mlx_for_macos(shim_build, mlx_macos):
    build = shim_build
    _fail([s.report() for s in (*build.compiles, build.link) if s is not None and not s.ok])
    _fail(_linux_only(SHIM_TARGET, [(os.path.join(SHIM_DIR, "shim.cpp"), build.shim_object)]))

    shim, libmlx = macho.read(build.shim), macho.read(build.libmlx)
    from_mlx = shim.undefined_from("/libmlx.dylib")
    assert from_mlx, f"the shim takes nothing from libmlx.dylib; it links {shim.libraries}"
    # A name libmlx.dylib lacks is left unbound by the link: look for MLX's
    # namespace (mangled "N3mlx") among those too.
    absent = sorted((from_mlx | {n for n in shim.unbound() if "N3mlx" in n}) - libmlx.exported)
    _fail([f"the shim needs {len(absent)} symbols that libmlx.dylib ({_mlx_version()}, {MLX_PLATFORM}) "
           "does not export: " + ", ".join(n[1:] for n in absent)] if absent else [])
    _fail(_not_python(shim, "the shim"))

    # Installed as site-packages/thunderlink/mlx_backend/_shim*.so; the
    # mlx-metal wheel puts libmlx.dylib in site-packages/mlx/lib.
    _fail([] if "@rpath/libmlx.dylib" in shim.libraries else
          [f"the shim links {shim.libraries}, not @rpath/libmlx.dylib as the wheel's libmlx.dylib names itself"])
    leads_to = [posixpath.normpath(posixpath.join("thunderlink/mlx_backend", r[len("@loader_path/"):], "libmlx.dylib"))
                for r in shim.rpaths if r.startswith("@loader_path/")]
    _fail([] if any(os.path.isfile(os.path.join(mlx_macos, p)) for p in leads_to) else
          [f"dyld would not find libmlx.dylib: from site-packages/thunderlink/mlx_backend/, the shim's rpaths "
           f"{shim.rpaths} lead to {leads_to}, not to mlx/lib/libmlx.dylib where the mlx-metal wheel installs it"])
