"""Critical reasoning tokens ("Wait", "Alternatively", "Hmm" …) mapped to token ids, and the entropy
statistics measured at them (R1V3 §1/§5.1: their entropy separates models that reason from models that
imitate, and selects RL checkpoints).

The paper leaves the definition open; vireo's (README "Critical-token entropy"):
- a critical word counts where its *first* token was sampled in a response; the entropy is that of the
  next-token distribution the token was drawn from (the decision to start a reflection);
- variants: the word as given, lower-case and capitalised, each with and without a leading space; a variant
  maps to its first token only when that token spells the variant's whole first word, so a word the
  tokenizer splits into sub-word pieces maps to nothing rather than to a piece shared with other words;
- aggregation: the mean over all such positions of a batch (token-weighted, like `actor/entropy`).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from learner import algos
from learner.types import DEFAULT_CRITICAL_WORDS, DEFAULT_HIGH_ENTROPY


def variants(word: str) -> list[str]:
    """Spellings a model may sample: as given, lower-case, capitalised; with and without a leading space."""
    forms = dict.fromkeys([word, word.lower(), word[:1].upper() + word[1:]])
    return [prefix + form for form in forms for prefix in ("", " ")]


def critical_token_ids(tokenizer, words: Iterable[str] = DEFAULT_CRITICAL_WORDS) -> dict[int, str]:
    """token id -> the variant whose first token it is, for every variant the tokenizer spells with a
    first token covering the variant's whole first word."""
    found: dict[int, str] = {}
    for word in words:
        for variant in variants(word):
            ids = tokenizer.encode(variant, add_special_tokens=False)
            if not ids:
                continue
            first_word = variant.split(" ")[1] if variant.startswith(" ") else variant.split(" ")[0]
            text = tokenizer.decode(ids[:1])
            if text.strip() == first_word and (text.startswith(" ") == variant.startswith(" ")):
                found.setdefault(ids[0], variant)
    return found


def entropy_stats(entropy: torch.Tensor, token_ids: torch.Tensor, mask: torch.Tensor,
                  critical_ids: Sequence[int], high_entropy: float = DEFAULT_HIGH_ENTROPY) -> list[float]:
    """Local sums for one batch, to be all-reduced: [Σ entropy, #tokens, Σ entropy at critical tokens,
    #critical tokens, #tokens with entropy > high_entropy]. `entropy[b, t]` is the entropy of the
    distribution that sampled `token_ids[b, t]`; only positions with mask > 0 count."""
    keep = mask > 0
    ent = entropy.to(torch.float64)
    crit_sum, crit_n = algos.critical_token_entropy(entropy, token_ids, keep.to(entropy.dtype), critical_ids)
    return [float(ent[keep].sum()), float(keep.sum()), float(crit_sum), float(crit_n),
            float((keep & (ent > high_entropy)).sum())]


def entropy_metrics(sums: Sequence[float], prefix: str) -> dict[str, float]:
    """The figures from globally summed `entropy_stats`: mean entropy, critical-token entropy (NaN when no
    critical token was sampled), the critical-token rate and the high-entropy share, per response token."""
    ent, tokens, crit, crit_n, high = sums
    prefix = f"{prefix}/" if prefix else ""
    return {f"{prefix}entropy": ent / max(tokens, 1.0),
            f"{prefix}critical_entropy": crit / crit_n if crit_n else float("nan"),
            f"{prefix}critical_token_rate": crit_n / max(tokens, 1.0),
            f"{prefix}high_entropy_fraction": high / max(tokens, 1.0)}
