"""The package's public names: everything in ``__all__`` resolves, is listed by ``dir()``, and
the lazy subpackages import nothing heavy until used; ``python -m kfac_kernels --version``."""
import subprocess
import sys

import kfac_kernels as kk


def test_every_name_in_all_resolves():
    for name in kk.__all__:
        assert getattr(kk, name) is not None, name
    assert set(kk.__all__) <= set(dir(kk))
    for sub in ("optim", "integrations", "nn", "ops", "recipes"):
        assert sub in kk.__all__ and sub in dir(kk)
    assert kk.optim.SOAP is not None and kk.optim.Shampoo is not None
    for name in kk.optim.__all__:
        assert getattr(kk.optim, name) is not None, name
    for name in kk.ops.__all__:
        assert getattr(kk.ops, name) is not None, name


def test_subpackages_are_lazy():
    code = ("import sys, kfac_kernels as kk; "
            "early = [m for m in ('kfac_kernels.optim', 'kfac_kernels.integrations', "
            "'kfac_kernels.nn', 'kfac_kernels.optimizer', 'triton', 'transformers', "
            "'lightning') if m in sys.modules]; assert not early, early; "
            "kk.integrations; bad = [m for m in ('transformers', 'lightning') "
            "if m in sys.modules]; assert not bad, bad; kk.optim.SOAP; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_version_flag():
    out = subprocess.run([sys.executable, "-m", "kfac_kernels", "--version"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"kfac_kernels {kk.__version__}"
