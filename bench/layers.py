"""Parameter shapes of transformer layers, for the weight-sync benchmarks (no Ray here: the GPU bench's
machine has none)."""
from __future__ import annotations

import math


def layer_shapes(total_bytes: int, hidden: int, element_size: int) -> list[tuple[int, ...]]:
    """Parameters of as many transformer layers (4 attention, 2 MLP matrices, 4 vectors) as fit."""
    layer = [(hidden, hidden)] * 4 + [(4 * hidden, hidden), (hidden, 4 * hidden)] + [(hidden,)] * 4
    per_layer = sum(math.prod(s) for s in layer) * element_size
    return layer * max(1, round(total_bytes / per_layer))
