"""python -m thunderlink.testing.softverbs --path: print the provider's path."""

import argparse
import sys

from . import ENV_VARS, path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m thunderlink.testing.softverbs",
        description="softverbs, a software ibverbs provider for tests. Run a program over it with "
                    "THUNDERLINK_IBV_LIB=$(python -m thunderlink.testing.softverbs --path).",
        epilog="Read by the library: " + ", ".join(ENV_VARS) + " (see the package's docstring).")
    parser.add_argument("--path", action="store_true", help="print the library's absolute path")
    args = parser.parse_args(argv)
    if not args.path:
        parser.print_help()
        return 2
    try:
        print(path())
    except FileNotFoundError as e:
        print(f"softverbs: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
