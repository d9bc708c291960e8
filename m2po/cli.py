"""`m2po` command line (also `python -m m2po`)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="m2po", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("check", help="verify in a fresh process that `import verl` registers the M2PO losses, trainers and checks")
    sub.add_parser("config-dir", help="print the directory of the shipped hydra configs (for --config-path)")
    args = parser.parse_args(argv)

    if args.command == "check":
        from m2po import selfcheck

        return selfcheck.run_check()
    from m2po.configs import config_dir

    print(config_dir())
    return 0


if __name__ == "__main__":
    sys.exit(main())
