"""`m2po` command line (also `python -m m2po`)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["report"]:  # its own options and help
        from m2po import report

        return report.main(argv[1:])
    parser = argparse.ArgumentParser(prog="m2po", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("check", help="verify in a fresh process that `import verl` registers the M2PO losses, trainers and checks")
    sub.add_parser("config-dir", help="print the directory of the shipped hydra configs (for --config-path)")
    sub.add_parser("report", help="Table 1 and curves from runs' logs: m2po report RUN [RUN ...] (see m2po report -h)")
    args = parser.parse_args(argv)

    if args.command == "check":
        from m2po import selfcheck

        return selfcheck.run_check()
    from m2po.configs import config_dir

    print(config_dir())
    return 0


if __name__ == "__main__":
    sys.exit(main())
