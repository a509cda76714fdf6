"""K-FAC in Hugging Face's ``transformers.Trainer``.

:class:`KFACTrainer` is a ``transformers.Trainer`` whose optimiser is a :class:`kfac_kernels.KFAC`
(built by ``create_optimizer`` from ``kfac_kwargs``) and which runs the curvature passes that
``curvature="fisher"`` / ``"ggn"`` need::

    trainer = KFACTrainer(model=model, args=TrainingArguments(..., learning_rate=0.05),
                          train_dataset=ds,
                          kfac_kwargs=dict(curvature="fisher", likelihood="categorical",
                                           damping=1e-2, kl_clip=1e-3, skip=["transformer.wpe"]))
    trainer.train()
    trainer.kfac_optimizer.engine.factor_updates

How the backward pass is split. ``opt.backward(loss, out)`` is the curvature passes from ``out``
followed by ``loss.backward()``. ``KFACTrainer.compute_loss`` runs the first half right after the
forward pass of a training step (only there: not in evaluation, not between factor steps), from
the logits the loss was computed from; Trainer's own ``training_step`` then does the second half
as usual (``accelerator.backward(loss)``: its division by the gradient-accumulation steps, its
GradScaler). The curvature passes do not depend on the loss or its scale, so this is
``opt.backward(loss, out)`` exactly, with everything Trainer does to the loss left in place.

The output given to the curvature passes (:func:`curvature_output`): ``outputs.logits``; for a
causal language model (the models Trainer itself shifts labels for) ``logits[:, :-1]``, the
positions that predict a next token; positions whose label is ``-100`` (padding, prompt tokens)
are cut out of the metric (their logits are detached there, so their passes contribute nothing).
Half-precision logits are upcast to float32 for the passes, as HF's loss does. Pass
``kfac_output_fn=lambda outputs, inputs: ...`` for anything else.

Scale of the metric. HF's language-model loss is a mean over the predicted tokens of the batch
(``sum / num_items_in_batch``), so this trainer passes ``loss_reduction="token_mean"`` unless
``kfac_kwargs`` says otherwise: the metric is then per position (docs/math.md), the curvature of
the loss being minimised, for every curvature. T, the positions per sequence K-FAC divides by, is
read off the output the curvature passes start from (``logits[:, :-1]``: L - 1 for sequences of
L tokens), while Trainer divides by its token count: the two differ by the fraction of positions
labelled -100, and (transformers 5.24, GPT-2's ``loss_type=None``) by L / (L - 1), because
Trainer counts the labels before the shift. That residual is a constant rescaling of G (a slightly
different damping), not a change of the metric. ``loss_reduction="mean"`` (per-sequence sums) is
the other choice; its fisher/ggn metric is then T times larger.

What is supported, and what is refused with an error: see :class:`KFACTrainer`.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn as nn
import transformers

from ..optimizer import KFAC

__all__ = ["KFACTrainer", "curvature_output", "kfac_param_groups"]

IGNORE_INDEX = -100


def _is_causal_lm(model: nn.Module) -> bool:
    """Whether Trainer treats ``model`` as a causal LM (the test its ``compute_loss`` uses to shift
    labels), looking through accelerate / PEFT wrappers."""
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:  # pragma: no cover - very old or very new transformers
        return False
    m = model
    while hasattr(m, "module") and isinstance(m.module, nn.Module):   # DDP and friends
        m = m.module
    base = getattr(getattr(m, "base_model", None), "model", None)    # PEFT
    names = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    return type(m).__name__ in names or (base is not None and type(base).__name__ in names)


def curvature_output(outputs: Any, labels: Optional[torch.Tensor], *,
                     causal_lm: bool) -> torch.Tensor:
    """The model output the curvature passes start from (see the module docstring).

    ``outputs``: what the model returned (a ``ModelOutput`` or dict with ``"logits"``);
    ``labels``: the batch's labels (``-100`` = ignored) or None; ``causal_lm``: shift by one
    position, as HF's causal-LM loss does."""
    if isinstance(outputs, Mapping) and "logits" in outputs:
        logits = outputs["logits"]
    elif hasattr(outputs, "logits"):
        logits = outputs.logits
    else:
        raise TypeError("KFACTrainer: the model's outputs have no 'logits'; pass "
                        "kfac_output_fn=lambda outputs, inputs: <the tensor the loss was "
                        "computed from> (return_dict=False models return tuples)")
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"KFACTrainer: outputs['logits'] is a {type(logits).__name__}, not a tensor")
    if causal_lm:
        if logits.dim() < 3:
            raise ValueError(f"KFACTrainer: a causal LM's logits are [N, T, V], got "
                             f"{tuple(logits.shape)}")
        logits = logits[:, :-1]
        if labels is not None:
            labels = labels[:, 1:]
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    if (labels is not None and isinstance(labels, torch.Tensor)
            and not labels.is_floating_point() and tuple(labels.shape) == tuple(logits.shape[:-1])):
        keep = labels != IGNORE_INDEX
        # positions without a target: detached, so their curvature passes contribute nothing
        logits = torch.where(keep.unsqueeze(-1).to(logits.device), logits, logits.detach())
    return logits


def kfac_param_groups(model: nn.Module, decay_names: List[str],
                      weight_decay: float) -> List[Dict[str, Any]]:
    """Trainer's two param groups (weight decay on ``decay_names``, none on the rest) with each
    module's ``weight`` and ``bias`` kept in one group (K-FAC preconditions them as one block):
    a bias goes where its weight is, so a decayed layer's bias is decayed too."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if weight_decay == 0:
        return [{"params": [p for _, p in params], "weight_decay": 0.0}]
    decay = {id(p) for n, p in params if n in set(decay_names)}
    for module in model.modules():
        w, b = getattr(module, "weight", None), getattr(module, "bias", None)
        if isinstance(w, nn.Parameter) and isinstance(b, nn.Parameter):
            if id(w) in decay:
                decay.add(id(b))
            else:
                decay.discard(id(b))
    groups = [{"params": [p for _, p in params if id(p) in decay], "weight_decay": weight_decay},
              {"params": [p for _, p in params if id(p) not in decay], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


class KFACTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` that trains with :class:`kfac_kernels.KFAC`.

    ``kfac_kwargs``: options of ``kk.KFAC`` (``curvature``, ``likelihood``, ``damping``,
    ``kl_clip``, ``factor_every``, ``skip``, ...). Defaults taken from the TrainingArguments:
    ``lr = args.learning_rate`` (Trainer's scheduler then drives it), ``weight_decay =
    args.weight_decay`` (on Trainer's decay group, with each layer's bias joining its weight:
    :func:`kfac_param_groups`), ``grad_scaler`` = accelerate's GradScaler when ``fp16=True``;
    ``loss_reduction="token_mean"`` (HF's loss is a per-token mean; see the module docstring).
    ``kfac_recipe="transformer"``: start from :func:`kfac_kernels.recipes.transformer` (with
    ``lr = args.learning_rate``); ``kfac_kwargs`` override its entries (docs/transformers.md).
    ``kfac_output_fn(outputs, inputs) -> tensor``: the output the curvature passes start from
    (default :func:`curvature_output`). An optimiser passed as ``optimizers=(opt, sched)`` must
    be a ``kk.KFAC``.

    Supported: a single process on CPU or one GPU, multi-process DDP as accelerate / torchrun
    launch it (K-FAC averages its factors over the ranks; not run by the tests here), bf16/fp16
    mixed precision through accelerate, Trainer's lr schedules, evaluation (run under
    ``torch.no_grad()`` by Trainer, so nothing of it enters the factors), gradient clipping
    (``max_grad_norm`` clips the raw gradient before K-FAC preconditions it; K-FAC's own bound
    is ``kl_clip``), and ``gradient_accumulation_steps > 1`` with every curvature: Trainer divides
    each micro-batch's summed loss by the step's token count, so the gradient is the whole
    batch's, and K-FAC combines the micro-batches into the factors of one step on the whole
    batch (docs/robustness.md, section 5).

    Refused with an error naming the alternative: DeepSpeed and FSDP through accelerate,
    SageMaker model parallelism, torch.nn.DataParallel (several GPUs in one process), an
    optimiser that is not ``kk.KFAC`` (``KFACPreconditioner`` needs a second optimiser, which
    Trainer does not step).
    """

    def __init__(self, *args, kfac_kwargs: Optional[Dict[str, Any]] = None,
                 kfac_output_fn: Optional[Callable[[Any, Any], torch.Tensor]] = None,
                 kfac_recipe: Optional[str] = None, **kwargs):
        if kfac_recipe not in (None, "transformer"):
            raise ValueError(f"kfac_recipe must be None or 'transformer' "
                             f"(kfac_kernels.recipes), got {kfac_recipe!r}")
        self.kfac_recipe = kfac_recipe
        self.kfac_kwargs = dict(kfac_kwargs or {})
        self.kfac_output_fn = kfac_output_fn
        self._kfac_in_training_step = False
        super().__init__(*args, **kwargs)
        self._kfac_check_supported()
        self.kfac_optimizer      # noqa: B018 - type check of an optimiser given to Trainer

    # ------------------------------------------------------------------ checks
    @property
    def kfac_curvature(self) -> str:
        opt = self.kfac_optimizer
        if opt is not None:
            return opt.opts.curvature
        return self.kfac_kwargs.get("curvature", "empirical")

    def _kfac_check_supported(self) -> None:
        args = self.args
        if getattr(self, "is_deepspeed_enabled", False):
            raise NotImplementedError(
                "KFACTrainer does not support DeepSpeed (it owns the optimiser step and shards "
                "the optimiser state): drop the deepspeed config; for several GPUs launch with "
                "torchrun / accelerate launch (DDP), which KFACTrainer supports")
        if getattr(self, "is_fsdp_enabled", False) or getattr(self, "is_fsdp_xla_enabled", False):
            raise NotImplementedError(
                "KFACTrainer does not support FSDP through accelerate/Trainer (fsdp=...): use DDP "
                "(torchrun / accelerate launch without fsdp), or shard the model yourself with "
                "torch.distributed.fsdp.fully_shard and train it with kk.KFAC in your own loop "
                "(README, 'Several processes'; python -m kfac_kernels.examples.fsdp)")
        try:
            from transformers.utils import is_sagemaker_mp_enabled
            smp = is_sagemaker_mp_enabled()
        except ImportError:  # pragma: no cover
            smp = False
        if smp:
            raise NotImplementedError("KFACTrainer does not support SageMaker model parallelism")
        if getattr(args, "n_gpu", 1) > 1:
            raise NotImplementedError(
                f"KFACTrainer does not support torch.nn.DataParallel ({args.n_gpu} GPUs in one "
                f"process: K-FAC's hooks do not see the replicas): launch one process per GPU "
                f"with torchrun / accelerate launch (DDP), or set CUDA_VISIBLE_DEVICES to one GPU")

    @property
    def kfac_optimizer(self) -> Optional[KFAC]:
        """The ``kk.KFAC`` Trainer steps (under accelerate's ``AcceleratedOptimizer`` wrapper),
        or None before it is created."""
        opt = self.optimizer
        while opt is not None and not isinstance(opt, KFAC) and hasattr(opt, "optimizer"):
            opt = opt.optimizer
        if opt is None:
            return None
        if not isinstance(opt, KFAC):
            raise TypeError(f"KFACTrainer trains with kfac_kernels.KFAC; its optimiser is a "
                            f"{type(opt).__name__}: pass kfac_kwargs= and no optimizers=, or use "
                            f"transformers.Trainer for another optimiser")
        return opt

    # ------------------------------------------------------------------ optimiser
    def create_optimizer(self, model=None):
        """Build the ``kk.KFAC`` (see the class docstring for the defaults it takes)."""
        self._kfac_check_supported()
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            kw = dict(self.kfac_kwargs)
            if self.kfac_recipe == "transformer":
                from .. import recipes
                kw = {**recipes.transformer(lr=self.args.learning_rate), **kw}
            kw.setdefault("lr", self.args.learning_rate)
            kw.setdefault("weight_decay", self.args.weight_decay)
            kw.setdefault("loss_reduction", "token_mean")
            if "params" not in kw:
                kw["params"] = kfac_param_groups(opt_model,
                                                 self.get_decay_parameter_names(opt_model),
                                                 kw["weight_decay"])
            scaler = getattr(self.accelerator, "scaler", None)
            if scaler is not None:
                kw.setdefault("grad_scaler", scaler)
            self.optimizer = KFAC(opt_model, **kw)
        self.kfac_optimizer      # noqa: B018 - type check of a user-given optimiser
        return self.optimizer

    # ------------------------------------------------------------------ training step
    def training_step(self, model, inputs, num_items_in_batch=None):
        self._kfac_in_training_step = True
        try:
            return super().training_step(model, inputs, num_items_in_batch)
        finally:
            self._kfac_in_training_step = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        opt = self.kfac_optimizer
        # on a factor step of training: the curvature passes ("fisher"/"ggn"; with "empirical"
        # the call only reads the positions token_mean divides by)
        if not (self._kfac_in_training_step and opt is not None and opt.engine.capturing
                and torch.is_grad_enabled()):
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        labels = inputs.get("labels") if isinstance(inputs, Mapping) else None
        orig = dict(inputs) if isinstance(inputs, Mapping) else inputs   # compute_loss may pop
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                             num_items_in_batch=num_items_in_batch)
        if self.kfac_output_fn is not None:
            out = self.kfac_output_fn(outputs, orig)
        else:
            out = curvature_output(outputs, labels, causal_lm=_is_causal_lm(model))
        # the first half of opt.backward(loss, out); training_step's accelerator.backward(loss)
        # is the second (module docstring)
        opt.engine.curvature_backward(out)
        return (loss, outputs) if return_outputs else loss
