"""Runnable examples: ``python -m kfac_kernels.examples.<name>``.

* ``transformer_lm``: a small GPT-style character model (embeddings, LayerNorm, attention and MLP
  Linears all preconditioned) on a generated arithmetic corpus, K-FAC against AdamW.
* ``rnn_lm``: the same task with a GRU or LSTM built from :mod:`kfac_kernels.nn` cells (tied-weight
  K-FAC over time steps).
* ``ddp``: distributed K-FAC with torchrun (docs/distributed.md).

The language-model examples write a loss-curve PNG and a results table (markdown + JSON) to
``--out``. See each module's docstring.
"""
