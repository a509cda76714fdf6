"""Runnable examples: ``python -m kfac_kernels.examples.<name>`` (see each module's docstring)."""
