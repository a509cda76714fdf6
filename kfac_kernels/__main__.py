"""Command line: ``python -m kfac_kernels {demo,lm-realtext,env} [options]`` and ``--version``."""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    from ._version import __version__
    ap = argparse.ArgumentParser(prog="python -m kfac_kernels",
                                 description="kfac_kernels command line")
    ap.add_argument("--version", action="version", version=f"kfac_kernels {__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("demo", help="train real models with K-FAC, Adam and SGD; print a table, "
                                "write a plot (see --help of the subcommand)", add_help=False)
    sub.add_parser("lm-realtext", help="benchmark: a byte-level GPT on the standard library's "
                                       "source, K-FAC against AdamW, SOAP, Shampoo (see --help "
                                       "of the subcommand)", add_help=False)
    sub.add_parser("env", help="report versions and which backends work here, and why not")
    args, rest = ap.parse_known_args(argv)
    if args.cmd == "demo":
        from .demo import main as demo_main
        return demo_main(rest)
    if args.cmd == "lm-realtext":
        from .examples.lm_realtext import main as lm_main
        lm_main(rest)
        return 0
    if rest:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.cmd == "env":
        from ._env import report
        print(report())
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
