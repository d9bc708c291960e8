"""`m2po` command line (also `python -m m2po`)."""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["report"]:  # its own options and help
        from m2po import report

        return report.main(argv[1:])
    parser = argparse.ArgumentParser(prog="m2po", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="verify in a fresh process that `import verl` registers the M2PO losses, "
                           "trainers and checks; --gpu: the whole GPU install, with real main_ppo steps")
    check.add_argument("--gpu", action="store_true", help="also CUDA/NCCL/vLLM versions, pytest -m gpu and a few real "
                       "main_ppo steps with vLLM + FSDP on a tiny model built offline (skipped without a GPU)")
    check.add_argument("--tests-dir", default=None, help="the source checkout's tests/ for pytest -m gpu "
                       "(default: ./tests when it exists)")
    check.add_argument("--out", default=None, help="where the check runs write (default: a temporary folder)")
    sub.add_parser("config-dir", help="print the directory of the shipped hydra configs (for --config-path)")
    sub.add_parser("report", help="Table 1 and curves from runs' logs: m2po report RUN [RUN ...] (see m2po report -h)")
    args = parser.parse_args(argv)

    if args.command == "check":
        if args.gpu:
            from m2po.gpu_check import run_gpu_check

            tests_dir = args.tests_dir or ("tests" if os.path.isfile(os.path.join("tests", "test_gpu.py")) else None)
            return run_gpu_check(tests_dir=tests_dir, out_dir=args.out)
        from m2po import selfcheck

        return selfcheck.run_check()
    from m2po.configs import config_dir

    print(config_dir())
    return 0


if __name__ == "__main__":
    sys.exit(main())
