"""The distillation teacher: checked against the student's config before any weights load, then
built beside the student.

- ``teacher: self`` with ``finetune: lora``: the student itself with its LoRA adapters and every
  fake quantiser switched off, run under ``no_grad`` in eval mode (``AdapterOffTeacher``). The
  base weights are frozen under LoRA, so this *is* the float model the run started from, and it
  costs no memory: no second copy of any weight or module.
- ``teacher: self`` otherwise (``full``; ``classifier``, whose head trains): the weights change
  as the student trains, so a frozen float copy of them is taken before training
  (``FrozenTeacher``: quantisers off, eval mode, ``requires_grad`` False; it follows the
  student's device at the first batch).
- a model folder or Hub id: loaded as ``model_name_or_path`` is (same head kind, the student's
  dtype), float and frozen (``FrozenTeacher``).

``check_distill`` refuses, before loading anything: a teacher path that does not exist, a
teacher of another ``model_type`` or vocabulary size than the student (a GGUF student's config
is read from the file's metadata for this), a teacher folder whose weight file is truncated or
corrupt, and ``self`` where the student's classification head is freshly initialised (the float
"teacher" would predict with that same untrained head).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from qat import models
from qat.errors import ConfigError, QatError
from qat.quant.ste import FakeQuantizer
from qat.runs.checkpoints import CheckpointError, check_safetensors, check_torch_zip, read_json


@contextlib.contextmanager
def quantizers_off(model: nn.Module) -> Iterator[None]:
    """Switch every enabled ``FakeQuantizer`` of ``model`` off, and back on afterwards."""
    switched = [m for m in model.modules() if isinstance(m, FakeQuantizer) and m.enabled]
    for m in switched:
        m.enabled = False
    try:
        yield
    finally:
        for m in switched:
            m.enabled = True


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) for the teacher's forward; the previous mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _logits(outputs: Any) -> Tensor:
    return outputs["logits"] if isinstance(outputs, Mapping) else outputs[0]


def _first_tensor(inputs: Mapping[str, Any]) -> Tensor:
    return next(v for v in inputs.values() if isinstance(v, Tensor))


class AdapterOffTeacher:
    """``teacher: self`` under LoRA: the student's own PEFT model, adapters and quantisers off."""

    def __init__(self, peft_model: nn.Module) -> None:
        if not hasattr(peft_model, "disable_adapter"):
            raise TypeError("AdapterOffTeacher needs a peft model (finetune: lora)")
        self.model = peft_model

    def logits(self, model: nn.Module, inputs: Mapping[str, Any]) -> Tensor:
        """Teacher logits for ``inputs`` (no labels), run through ``model``, the possibly
        wrapped (DDP / FSDP) student, so a sharded model gathers its weights as it does for
        the student."""
        with (
            torch.no_grad(),
            eval_mode(self.model),
            self.model.disable_adapter(),
            quantizers_off(self.model),
        ):
            return _logits(model(**inputs))


class FrozenTeacher:
    """A separate float model, frozen: ``self`` under full fine-tuning, or a teacher path."""

    def __init__(self, model: nn.Module) -> None:
        for m in model.modules():
            if isinstance(m, FakeQuantizer):
                m.enabled = False
        for p in model.parameters():
            p.requires_grad_(False)
        self.model = model.eval()

    def logits(self, model: nn.Module, inputs: Mapping[str, Any]) -> Tensor:
        del model  # the student: a frozen teacher has its own weights
        device = _first_tensor(inputs).device
        if next(self.model.parameters()).device != device:
            self.model.to(device)  # once: the Trainer places the student, the teacher follows
        with torch.no_grad():
            return _logits(self.model(**inputs))


Teacher = AdapterOffTeacher | FrozenTeacher


def make_teacher(distill: Any, model: nn.Module, finetune: str) -> Teacher:
    """The teacher ``distill.teacher`` names, for the student ``model`` (already prepared for
    ``finetune``; call before training starts, so a ``self`` copy holds the initial weights)."""
    if distill.teacher != "self":
        # the recipe's checks for a teacher handed over from Python (QATTrainer(distill=...)):
        # architecture, vocabulary, whole weight files, before it loads
        base = models.base_model(model)
        causal = type(base).__name__.endswith("ForCausalLM")
        labels = None if causal else base.config.num_labels
        check_distill(distill, base.config, causal=causal, num_labels=labels, finetune=finetune)
        return FrozenTeacher(load_teacher(distill.teacher, model))
    if finetune == "lora":
        return AdapterOffTeacher(model)
    return FrozenTeacher(copy.deepcopy(model))


_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def load_teacher(path: str, student: nn.Module) -> nn.Module:
    """The teacher at ``path``, loaded with the student's head kind and dtype."""
    base = models.base_model(student)
    param = next(base.parameters())
    dtype = _DTYPE_NAMES.get(param.dtype)
    if type(base).__name__.endswith("ForCausalLM"):
        teacher = models.load_causal_lm(path, torch_dtype=dtype)
    else:
        teacher = models.load_sequence_classifier(
            path,
            base.config.num_labels,
            torch_dtype=dtype,
            pad_token_id=getattr(base.config, "pad_token_id", None),
        )
    return teacher.to(param.device)


def has_trained_head(config: Any, num_labels: int) -> bool:
    """Whether the checkpoint ``config`` describes holds a sequence-classification head of
    ``num_labels`` outputs (otherwise loading it as a classifier initialises the head)."""
    archs = getattr(config, "architectures", None) or []
    return (
        any(a.endswith("ForSequenceClassification") for a in archs)
        and getattr(config, "num_labels", None) == num_labels
    )


def check_teacher_weights(folder: Path, teacher: str) -> None:
    """The weight files of a local teacher folder are whole (a truncated download or copy is
    one line naming the file, not a traceback from the loader)."""
    index = folder / "model.safetensors.index.json"
    try:
        if index.is_file():
            for shard in sorted(set(read_json(index).get("weight_map", {}).values())):
                check_safetensors(folder / shard)
        elif (folder / "model.safetensors").exists():
            check_safetensors(folder / "model.safetensors")
        elif (folder / "pytorch_model.bin").exists():
            check_torch_zip(folder / "pytorch_model.bin")
    except CheckpointError as e:
        raise ConfigError(f"distill.teacher {teacher!r}: {e}") from None


def check_distill(
    distill: Any,
    student_config: Any,
    *,
    causal: bool,
    num_labels: int | None = None,
    finetune: str = "full",
    gguf: tuple[str, str] | None = None,
) -> None:
    """Refuse a ``distill`` section that cannot work with this student, from configs and file
    headers only. ``student_config`` is None for a GGUF student: ``gguf`` (its
    ``model_name_or_path`` and ``gguf_file``) then names the file whose metadata gives the
    config to compare a teacher folder with (a GGUF file holds no classification head)."""
    if distill is None:
        return
    if (
        not causal
        and distill.teacher == "self"
        and (student_config is None or not has_trained_head(student_config, num_labels))
    ):
        raise ConfigError(
            f"distill.teacher self with a freshly initialised classification head (finetune: "
            f"{finetune}): the float teacher would predict with the same untrained head, so "
            "there is nothing to distil; give distill.teacher a fine-tuned float classifier "
            "(or start from one)"
        )
    if distill.teacher == "self":
        return
    teacher = distill.teacher
    resolved = teacher
    try:
        resolved = models.resolve_model_path(teacher)
    except QatError as e:
        raise ConfigError(f"distill.teacher: {e}") from None
    if not Path(resolved).expanduser().exists() and models.looks_local(resolved):
        raise ConfigError(
            f"distill.teacher {teacher!r} does not exist (expected a model folder, "
            "a Hub id, or self)"
        )
    try:
        config = models.load_config(resolved)
    except QatError as e:
        raise ConfigError(f"distill.teacher {teacher!r}: {e}") from None
    if student_config is None and gguf is not None:
        student_config = models.gguf_config(*gguf)  # the file's metadata: no weights read
    if student_config is not None:
        for key, what in (("model_type", "architecture"), ("vocab_size", "vocabulary size")):
            mine, theirs = getattr(student_config, key, None), getattr(config, key, None)
            if mine != theirs:
                raise ConfigError(
                    f"distill.teacher {teacher!r} has another {what} than the model "
                    f"({key} {theirs!r}, the model's {mine!r}); the teacher must "
                    "share the student's architecture and vocabulary"
                )
    if Path(resolved).expanduser().is_dir():
        check_teacher_weights(Path(resolved).expanduser(), teacher)
    if not causal and not has_trained_head(config, num_labels):
        raise ConfigError(
            f"distill.teacher {teacher!r} holds no trained classification head "
            f"of {num_labels} labels (its architectures: "
            f"{getattr(config, 'architectures', None)}); give a float classifier "
            "fine-tuned on this task"
        )
