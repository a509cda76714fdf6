"""The real-text transformer benchmark (issue 23): kfac_kernels/examples/lm_realtext.py, with its
results written under benchmarks/results/ unless ``--out`` says otherwise.

    python benchmarks/lm_realtext.py [options]        (--help lists them)
"""
import os
import sys

from kfac_kernels.examples.lm_realtext import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    if not any(a == "--out" or a.startswith("--out=") for a in argv):
        argv += ["--out", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")]
    main(argv)
