"""thunderlink bench: bandwidth and latency of collectives, nccl-tests style.

With no arguments: 2 ranks on this host, all_sum of float32 from 4 B to
64 MiB. Inside a launched job (THUNDERLINK_RANK or MLX_RANK set) it runs as
one rank of that job.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

from ..bindings.comm import TRANSPORTS
from ..config import parse_size
from ..errors import ConfigError
from ..launch.workers import worker_args
from .ops import DTYPES, OPS
from .worker import Settings


MAX_SIZES = 1000  # sizes in one sweep
MAX_ITERS = 1_000_000  # timed iterations per size: each one's time is kept, and exchanged


def parse_sizes(text: str) -> tuple[int, ...]:
    """'4:64M' (x2 steps), '4:64M:x4' (factor), '1M:8M:+1M' (step), or '4,1K,1M'.
    Exits with a message when malformed."""
    try:
        return _parse_sizes(text)
    except ValueError as e:
        raise SystemExit(f"thunderlink bench: --sizes {text!r}: {e}") from None


def _sizes_arg(text: str) -> tuple[int, ...]:
    """--sizes, as an argparse type (a bad value is a usage error)."""
    try:
        return _parse_sizes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ConfigError:
        raise ValueError(f"{text!r} is not a size (examples: 4096, 64K, 1M)") from None


def _parse_sizes(text: str) -> tuple[int, ...]:
    """The sizes of --sizes; ValueError saying what is wrong."""
    if "," in text or ":" not in text:
        sizes = tuple(_size(t) for t in text.split(",") if t)
        if not sizes or min(sizes) < 1:
            raise ValueError("give sizes of at least 1 byte")
        if len(sizes) > MAX_SIZES:
            raise ValueError(f"at most {MAX_SIZES} sizes")
        return sizes
    parts = text.split(":")
    if len(parts) not in (2, 3):
        raise ValueError("expected MIN:MAX[:xFACTOR|:+STEP]")
    lo, hi = _size(parts[0]), _size(parts[1])
    step = parts[2] if len(parts) == 3 else "x2"
    if lo < 1 or hi < lo:
        raise ValueError("need 1 <= MIN <= MAX")
    inc, factor = 0, 1.0
    if step.startswith("+"):
        inc = _size(step[1:])
        if inc < 1:
            raise ValueError("step must be positive")
    else:
        try:
            factor = float(step.removeprefix("x"))
        except ValueError:
            raise ValueError(f"{step!r} is not xFACTOR or +STEP") from None
        if not (math.isfinite(factor) and factor > 1):
            raise ValueError("factor must be above 1")
    sizes, s = [], lo
    while s <= hi:
        if len(sizes) == MAX_SIZES:
            raise ValueError(f"more than {MAX_SIZES} sizes from MIN to MAX: take a larger step or factor")
        sizes.append(s)
        s = s + inc if inc else max(s + 1, int(s * factor))
    return tuple(sizes)


def _count(lo: int, hi: int | None = None):
    """An argparse type: an integer from lo (to hi)."""

    def count(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if v < lo or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"{v} is out of range: give {lo} or more" if hi is None
                                             else f"{v} is out of range: give {lo}..{hi}")
        return v

    return count


def _seconds(text: str) -> float:
    """An argparse type: a positive, finite number of seconds."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"{text} is not a positive number of seconds")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="thunderlink bench",
        description="Measure a collective over a size sweep: time, algbw, busbw and #wrong per size, "
        "out-of-place and in-place, like nccl-tests.",
    )
    p.add_argument("-n", "--ranks", type=_count(1), default=None, help="local ranks to start (default 2)")
    p.add_argument("--hostfile", metavar="FILE",
                   help="run one rank per hostfile entry (over ssh, or inside emulated hosts) instead of locally")
    p.add_argument("--op", choices=sorted(OPS), default="all_sum", help="collective (default all_sum)")
    p.add_argument("--sizes", type=_sizes_arg, default="4:64M",
                   help="MIN:MAX[:xF|:+STEP] or a list, bytes (default 4:64M)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="element type (default float32)")
    p.add_argument("--warmup", type=_count(0), default=5, help="warm-up iterations per size (default 5)")
    p.add_argument("--iters", type=_count(0, MAX_ITERS), default=0,
                   help=f"timed iterations per size, at most {MAX_ITERS} (default, or 0: about 0.2 s worth)")
    p.add_argument("--no-check", dest="check", action="store_false", help="do not verify results")
    p.add_argument("--inplace", choices=("both", "in", "out"), default=None,
                   help="which variants of the core (default both; out with --vs/--via)")
    p.add_argument("--json", dest="json_path", metavar="PATH", help="also write every measurement as JSON")
    p.add_argument("--plot", dest="plot_path", metavar="PNG",
                   help="draw bus bandwidth and latency against size (needs thunderlink[plot])")
    p.add_argument("--vs", choices=("mlx-ring", "gloo", "gloo-torch", "gloo-lib"), action="append", default=[],
                   help="also measure a peer, interleaved size by size, with the ratio of times: mlx-ring (MLX's "
                        "ring backend over the same hosts) or gloo (Gloo, local ranks, in place: through "
                        "torch.distributed where torch is installed, else through the Gloo driver library, "
                        "--gloo-lib); gloo-torch, gloo-lib: that one (both: side by side)")
    p.add_argument("--gloo-lib", metavar="PATH",
                   help="the Gloo driver library (libgloo_allreduce.so, from bench/gloo/build.sh) for --vs gloo "
                        "without torch and --vs gloo-lib (default: THUNDERLINK_GLOO_LIB)")
    p.add_argument("--skip-core", action="store_true",
                   help="measure only the --vs/--via series (to compare with a run of the peer alone)")
    p.add_argument("--gloo-port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--gloo-impl", choices=("torch", "lib"), default="", help=argparse.SUPPRESS)
    p.add_argument("--gloo-store", default="", help=argparse.SUPPRESS)
    p.add_argument("--via", choices=("core", "mlx"), action="append", default=[],
                   help="mlx: also measure through mx.distributed (thunderlink's Group), MLX overhead included")
    p.add_argument("--transport", choices=tuple(TRANSPORTS), default=None,
                   help="THUNDERLINK_TRANSPORT for thunderlink's ranks: auto (shared memory between ranks of one "
                        "host, TCP otherwise), tcp or shm (default: the environment's, else auto)")
    p.add_argument("--timeout", type=_seconds, default=None, help="stop the job after this many seconds")
    p.add_argument("--profile", metavar="FILE",
                   help="a tuning profile (thunderlink tune) against the defaults, side by side (--op, --sizes, "
                        "--iters, -n, --hostfile apply)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p


def settings_of(args) -> Settings:
    inplace = args.inplace or ("out" if (args.vs or "mlx" in args.via) else "both")
    return Settings(op=args.op, sizes=args.sizes, dtype=args.dtype, warmup=args.warmup,
                    iters=args.iters, check=args.check, inplace=inplace, json_path=args.json_path,
                    plot_path=args.plot_path, vs=tuple(dict.fromkeys(args.vs)), via_mlx="mlx" in args.via,
                    skip_core=args.skip_core, gloo_port=args.gloo_port, gloo_impl=args.gloo_impl,
                    gloo_lib=args.gloo_lib or "", gloo_store=args.gloo_store)


def run_worker(args) -> int:
    from .. import connect
    from .worker import run

    s = settings_of(args)
    with connect(transport=args.transport) as comm:
        if comm.size < 2 and s.op == "sendrecv":
            raise SystemExit("thunderlink bench: sendrecv needs at least 2 ranks")
        results = run(comm, s)
    return 1 if any(m.wrong for m in results) else 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)  # every value is checked here, before anything starts
    if args.profile:
        from ..tune.compare import main as compare_profile

        return compare_profile(argv)
    if args.plot_path:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise SystemExit("thunderlink bench: --plot needs matplotlib: pip install 'thunderlink[plot]'") from None
    from ..config import from_env

    if args.worker or from_env().configured:
        return run_worker(args)
    if args.hostfile and args.ranks is not None:
        parser.error("give -n N or --hostfile FILE, not both")
    gloo = resolve_gloo(parser, args)  # {--vs name: ("torch", None) or ("lib", path)}
    ranks = 2 if args.ranks is None else args.ranks

    from ..launch import free_ports, launch_local, private_tempdir

    progress = Progress(len(args.sizes))

    def on_line(rank: int, stream: str, line: str) -> None:
        if rank == 0 and stream == "out":
            progress.clear()
            print(line, flush=True)
            if not line.startswith("#"):
                progress.step()
        else:
            progress.clear()
            (sys.stdout if stream == "out" else sys.stderr).write(f"[{rank}] {line}\n")

    env = dict(os.environ)
    cmd = [sys.executable, "-m", "thunderlink.bench", "--worker"] + worker_args(argv)
    with private_tempdir(prefix="thunderlink-bench-") as tmp:
        try:
            if args.hostfile:
                from ..launch.ssh import launch_hostfile

                try:
                    return launch_hostfile(args.hostfile, ["--"] + cmd, env=env, timeout=args.timeout,
                                           on_line=on_line).status
                except ConfigError as e:  # the hostfile's problem, named by the message
                    sys.stderr.write(f"thunderlink bench: {str(e).removeprefix('[thunderlink] ')}\n")
                    return 2
            if args.vs:
                # MLX's ring over the same loopback, on its own ports.
                path = os.path.join(tmp, "mlx_ring.json")
                with open(path, "w") as f:
                    json.dump([[f"127.0.0.1:{p}"] for p in free_ports(ranks)], f)
                env["MLX_HOSTFILE"] = path
            impls = {impl for impl, _ in gloo.values()}
            if "torch" in impls:
                env.setdefault("GLOO_SOCKET_IFNAME", "lo")
                cmd += ["--gloo-port", str(free_ports(1)[0])]
            if "lib" in impls:  # a FileStore in the job's private directory, removed with it
                store = os.path.join(tmp, "gloo-store")
                os.mkdir(store, 0o700)
                cmd += ["--gloo-store", store,
                        "--gloo-lib", next(path for impl, path in gloo.values() if impl == "lib")]
            if "gloo" in gloo:
                cmd += ["--gloo-impl", gloo["gloo"][0]]
            return launch_local(ranks, cmd, env=env, timeout=args.timeout, on_line=on_line).status
        finally:
            progress.clear()


def resolve_gloo(parser, args) -> dict:
    """The launcher's choice, for every rank, of how each --vs gloo* series
    runs: {name: ("torch", None) or ("lib", path)}; exits naming the fix when
    none can."""
    names = [v for v in dict.fromkeys(args.vs) if v.startswith("gloo")]
    if not names:
        return {}
    if args.hostfile:
        parser.error(f"--vs {names[0]} runs on local ranks only (-n N), not across a hostfile")
    if "gloo" in names and len(names) > 1:
        parser.error("--vs gloo picks torch.distributed or the driver library itself: give it alone, or "
                     "--vs gloo-torch and/or --vs gloo-lib")
    from .gloo import GlooUnavailable, resolve

    out = {}
    for name in names:
        try:
            out[name] = resolve({"gloo": "auto", "gloo-torch": "torch", "gloo-lib": "lib"}[name], args.gloo_lib)
        except GlooUnavailable as e:
            raise SystemExit(f"thunderlink bench: --vs {name}: {e}") from None
    return out


class Progress:
    """A progress line on stderr, for sweeps that take more than a few
    seconds, when stderr is a terminal."""

    def __init__(self, total: int):
        import time

        self.total, self.done, self.start, self.time = total, 0, time.monotonic(), time
        self.shown = False
        self.tty = sys.stderr.isatty()

    def step(self) -> None:
        self.done += 1
        elapsed = self.time.monotonic() - self.start
        if not self.tty or elapsed < 3 or self.done >= self.total:
            return
        width = 30
        filled = width * self.done // self.total
        eta = elapsed / self.done * (self.total - self.done)
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} sizes, "
                         f"about {eta:.0f} s left ")
        sys.stderr.flush()
        self.shown = True

    def clear(self) -> None:
        if self.shown:
            sys.stderr.write("\r" + " " * 70 + "\r")
            sys.stderr.flush()
            self.shown = False


if __name__ == "__main__":
    sys.exit(main())
