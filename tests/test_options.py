"""options.py: the typed attributes of ``Options`` and the ``OPTIONS`` table name the same set."""
import kfac_kernels as kk
from kfac_kernels import options


def test_options_annotations_match_the_table():
    declared = set(options.Options.__annotations__) - {"owner"}
    table = set(options.OPTION)
    assert declared == table, (f"annotated but not in OPTIONS: {sorted(declared - table)}; "
                               f"in OPTIONS but not annotated: {sorted(table - declared)}")


def test_every_option_an_owner_takes_is_an_attribute():
    import torch
    for owner, cls in (("KFAC", kk.KFAC), ("KFACPreconditioner", kk.KFACPreconditioner)):
        opt = cls(torch.nn.Linear(3, 2))
        for name in options.names(owner):
            assert hasattr(opt.opts, name), (owner, name)
        assert opt.opts.owner == owner
        opt.close()
