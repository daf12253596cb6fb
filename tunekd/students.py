"""Building a student from a teacher: depth S, random or copy init, and width projections."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from tunekd import mapping
from tunekd.errors import ConfigError
from tunekd.models import Family, stack_prefixes


@dataclass
class Student:
    model: nn.Module
    copied_layers: list[int] | None  # 0-based teacher module indices, or None for random init


def build_student(teacher: nn.Module, family: Family, spec, cfg, *, seed: int) -> Student:
    """`cfg` is a `study.StudentConfig`. The classification head always starts random."""
    t_layers = family.num_layers(teacher.config)
    mapping.validate_depths(t_layers, cfg.layers)
    t_width = family.hidden_size(teacher.config)
    copied = mapping.copy_layer_indices(cfg.copy_layers, t_layers, cfg.layers) if cfg.init == "copy" else None
    config = family.student_config(
        teacher.config, cfg.layers, hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads, intermediate_size=cfg.intermediate_size, copied=copied,
    )
    t_vocab, s_vocab = family.vocab_size(teacher.config), family.vocab_size(config)
    if t_vocab != s_vocab:
        raise ConfigError(f"teacher and student vocabularies differ ({t_vocab} vs {s_vocab} tokens): KD compares "
                          "their token distributions, so they must share one tokenizer and vocabulary")
    if cfg.init == "copy" and family.hidden_size(config) != t_width:
        raise ConfigError(
            f"student.init 'copy' needs the teacher's width: student hidden_size {family.hidden_size(config)} "
            f"!= teacher {t_width}; use init 'random' for a narrower student"
        )
    torch.manual_seed(seed)
    if cfg.lora is not None and cfg.init != "copy":
        raise ConfigError("student.lora adapts a copy-initialised student; with init 'random' its frozen "
                          "weights would be random: use init 'copy' or lora null")
    model = family.from_config(config, spec)
    if copied is not None:
        copy_weights(teacher, model, family, copied)
    model.config.tunekd_copied_layers = copied
    model.config.tunekd_init = cfg.init
    if cfg.lora is not None:
        apply_lora(model, family, cfg.lora)
    if getattr(cfg, "freeze_embeddings", False):
        freeze_embeddings(model, family)
    return Student(model=model, copied_layers=copied)


def freeze_embeddings(model: nn.Module, family: Family) -> list[str]:
    """`student.freeze_embeddings`: the family's embedding modules stop training (the paper's
    `--freeze_embeds` for BART and T5; a tied LM head freezes with them). Returns the frozen names."""
    frozen = []
    ids = {id(p) for m in family.embedding_modules(model) for p in m.parameters()}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in ids:
            p.requires_grad_(False)
            frozen.append(name)
    return frozen


def apply_lora(model: nn.Module, family: Family, lora) -> nn.Module:
    """Low-rank adapters (PEFT LoRA) injected in place into `model` (its class and layer stacks stay as
    they are); only the adapters and the task head train. `lora` is a `study.LoraConfig`."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as exc:  # pragma: no cover - it is a dependency
        raise ConfigError("student.lora needs the package peft") from exc
    targets = list(lora.target_modules or family.lora_targets)
    if not targets:
        raise ConfigError(f"student.lora: give target_modules for the {family.name} family")
    names = {n.rpartition(".")[2] for n, _ in model.named_modules()}
    if not set(targets) & names:
        raise ConfigError(f"student.lora.target_modules {targets} match no module of this model")
    heads = family.head_prefixes(model)
    config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=[t for t in targets if t in names])
    inject_adapter_in_model(config, model)
    # PEFT's own init: A ~ U(±1/sqrt(fan_in)) (kaiming_uniform with a = sqrt(5)), B = 0, so the adapted
    # student starts equal to the copied one. Redone with tensor methods because trials build students
    # inside `trainable.single_init()`, where the `torch.nn.init` functions do nothing.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_A." in name:
                bound = 1.0 / math.sqrt(p.shape[1])
                p.uniform_(-bound, bound)
            elif ".lora_B." in name:
                p.zero_()
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name or (bool(heads) and name.startswith(heads)))
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold injected LoRA adapters into their base weights and put the plain layers back."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, module.get_base_layer())
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def copy_weights(teacher: nn.Module, student: nn.Module, family: Family, copied: list[int]) -> None:
    """Student layer i of every stack ← teacher layer copied[i]; everything outside the stacks ←
    the teacher's same parameter; the task head is left as initialised."""
    t_state = teacher.state_dict()
    s_state = student.state_dict()
    prefixes = stack_prefixes(student, family)
    heads = family.head_prefixes(student)
    new_state = {}
    for key in s_state:
        if key.startswith(heads):
            continue
        source = key
        for prefix in prefixes.values():
            if key.startswith(prefix):
                index, _, rest = key[len(prefix):].partition(".")
                source = f"{prefix}{copied[int(index)]}.{rest}"
                break
        source = family.copy_source(key, source, t_state)
        if source not in t_state:
            raise ConfigError(f"copy init: the teacher has no parameter {source!r} for student {key!r}")
        if t_state[source].shape != s_state[key].shape:
            raise ConfigError(f"copy init: shape mismatch for {key!r}: {tuple(s_state[key].shape)} vs teacher "
                              f"{tuple(t_state[source].shape)}")
        new_state[key] = t_state[source]
    student.load_state_dict(new_state, strict=False)


def build_projections(layer_map, student_width: int, teacher_width: int, *, seed: int,
                      stacks: list[str] | tuple[str, ...] | None = None) -> nn.ModuleDict:
    """One trainable linear map per matched student state when the widths differ (else empty).

    With `stacks` (e.g. `list(family.stacks(model))`): {stack: {student index: Linear}}, each stack's
    states with their own independently initialised maps (docs/method.md: every matched state has its own
    projection; an encoder-decoder's encoder state i and decoder state i are two states). Without:
    a flat {student index: Linear}, which `distill.Distiller` turns into per-stack copies."""
    projections = nn.ModuleDict()
    if student_width == teacher_width:
        return projections
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed + 1)
    indices = sorted({s for s, _ in layer_map})
    if stacks is None:
        for s_idx in indices:
            projections[str(s_idx)] = nn.Linear(student_width, teacher_width)
    else:
        for stack in stacks:
            projections[stack] = nn.ModuleDict(
                {str(s_idx): nn.Linear(student_width, teacher_width) for s_idx in indices})
    torch.random.set_rng_state(gen_state)
    return projections


def export_student(state: dict[str, torch.Tensor], teacher_config, family: Family, spec, cfg, out_dir,
                   *, copied_layers=None, tokenizer_dir: str | None = None) -> None:
    """Write a trained student (its state dict) as a `transformers` model folder, with the teacher's
    tokenizer when given, so that `angles` and users can load it with `from_pretrained`."""
    config = family.student_config(
        teacher_config, cfg.layers, hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads, intermediate_size=cfg.intermediate_size,
        copied=copied_layers)
    model = family.from_config(config, spec)
    if cfg.lora is not None:  # the trained adapters are folded into the weights
        apply_lora(model, family, cfg.lora)
        model.load_state_dict(state)
        merge_lora(model)
    else:
        model.load_state_dict(state)
    model.config.tunekd_copied_layers = copied_layers
    model.config.tunekd_init = cfg.init
    model.save_pretrained(out_dir)
    if tokenizer_dir:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out_dir)
