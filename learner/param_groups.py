"""The three parameter groups the paper trains separately — vision, connector, llm — named once per
architecture (R1V3 §5.2: the connector must train during RL; §3.4: connector-only tuning after RL)."""
from __future__ import annotations

from collections.abc import Iterable

import torch

from learner.types import GROUPS

# HF state-dict prefixes per model_type; the first matching prefix wins (the Qwen2-VL connector, the
# patch merger, sits inside the vision module, so it is listed before the vision prefix).
PREFIXES: dict[str, list[tuple[str, str]]] = {
    "internvl": [("model.vision_tower.", "vision"), ("model.multi_modal_projector.", "connector"),
                 ("model.language_model.", "llm"), ("lm_head.", "llm")],
    "qwen2_vl": [("model.visual.merger.", "connector"), ("model.visual.", "vision"),
                 ("model.language_model.", "llm"), ("lm_head.", "llm")],
}
PREFIXES["qwen2_5_vl"] = PREFIXES["qwen2_vl"]


def group_of(model_type: str, name: str) -> str:
    if model_type not in PREFIXES:
        raise ValueError(f"no parameter groups for model_type {model_type!r}; known: {sorted(PREFIXES)}")
    for prefix, group in PREFIXES[model_type]:
        if name.startswith(prefix):
            return group
    raise ValueError(f"parameter {name!r} of {model_type} belongs to no group {GROUPS}")


def set_trainable(model: torch.nn.Module, trainable: Iterable[str]) -> dict[str, int]:
    """Freeze every group not in `trainable`; returns the parameter count per group that trains."""
    trainable = set(trainable)
    unknown = trainable - set(GROUPS)
    if unknown or not trainable:
        raise ValueError(f"trainable groups must be a non-empty subset of {GROUPS}, got {sorted(trainable)}")
    counts = {g: 0 for g in GROUPS}
    for name, param in model.named_parameters():
        group = group_of(model.config.model_type, name)
        param.requires_grad_(group in trainable)
        if group in trainable:
            counts[group] += getattr(param, "ds_numel", param.numel())  # a ZeRO-3 partition's whole size
    return counts
