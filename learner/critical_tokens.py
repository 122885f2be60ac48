"""Critical reasoning markers ("Wait", "Alternatively", "Let me" …) mapped to token-id sequences, and the
entropy statistics measured at them (R1V3 §1/§5.1: their entropy separates models that reason from models
that imitate, and selects RL checkpoints).

The paper leaves the definition open; vireo's (README "Critical-token entropy"):
- variants: the word as given, lower-case and capitalised, each with and without a leading space; a variant
  is a marker (its whole token sequence) only when its first token spells the variant's whole first word,
  so a word the tokenizer splits into sub-word pieces maps to nothing rather than to a piece shared with
  other words;
- a position counts where a whole marker starts in a response, and only its first token; a marker that only
  punctuation separates from an earlier one ("let me" in "Wait, let me") continues that reflection and does
  not count (learner.algos.critical_masks);
- `critical_entropy`: the entropy of the next-token distribution the marker's first token was drawn from
  (the decision to start a reflection); `critical_entropy_after`: that of the token right after the marker;
- aggregation: the mean over all such positions of a batch (token-weighted, like `actor/entropy`).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from learner import algos
from learner.types import DEFAULT_CRITICAL_WORDS, DEFAULT_HIGH_ENTROPY

#: Punctuation that may stand between two markers of one reflection ("Wait, let me", "Hmm... wait").
SEPARATORS = (",", ".", "...", "…", "!", "?", ";", ":", "-", "—")
#: What entropy_stats returns per batch (and the caller all-reduces).
N_STATS = 7


def variants(word: str) -> list[str]:
    """Spellings a model may sample: as given, lower-case, capitalised; with and without a leading space."""
    forms = dict.fromkeys([word, word.lower(), word[:1].upper() + word[1:]])
    return [prefix + form for form in forms for prefix in ("", " ")]


def critical_markers(tokenizer, words: Iterable[str] = DEFAULT_CRITICAL_WORDS) -> dict[tuple[int, ...], str]:
    """token-id sequence -> the variant it spells, for every variant whose first token covers the variant's
    whole first word."""
    found: dict[tuple[int, ...], str] = {}
    for word in words:
        for variant in variants(word):
            ids = tokenizer.encode(variant, add_special_tokens=False)
            if not ids:
                continue
            first_word = variant.split(" ")[1] if variant.startswith(" ") else variant.split(" ")[0]
            text = tokenizer.decode(ids[:1])
            if text.strip() == first_word and (text.startswith(" ") == variant.startswith(" ")):
                found.setdefault(tuple(ids), variant)
    return found


def critical_token_ids(tokenizer, words: Iterable[str] = DEFAULT_CRITICAL_WORDS) -> dict[int, str]:
    """first token id -> a variant it starts (critical_markers' first tokens)."""
    found: dict[int, str] = {}
    for ids, variant in critical_markers(tokenizer, words).items():
        found.setdefault(ids[0], variant)
    return found


def separator_ids(tokenizer, separators: Iterable[str] = SEPARATORS) -> list[int]:
    """The ids of the separators the tokenizer spells as one token, with and without a leading space."""
    found = set()
    for sep in separators:
        for form in (sep, " " + sep):
            ids = tokenizer.encode(form, add_special_tokens=False)
            if len(ids) == 1:
                found.add(ids[0])
    return sorted(found)


def entropy_stats(entropy: torch.Tensor, token_ids: torch.Tensor, mask: torch.Tensor,
                  markers: Sequence[Sequence[int] | int], high_entropy: float = DEFAULT_HIGH_ENTROPY,
                  separators: Sequence[int] = ()) -> list[float]:
    """Local sums for one batch, to be all-reduced: [Σ entropy, #tokens, Σ entropy at critical tokens,
    #critical tokens, #tokens with entropy > high_entropy, Σ entropy right after a marker, #such tokens].
    `entropy[b, t]` is the entropy of the distribution that sampled `token_ids[b, t]`; only positions with
    mask > 0 count."""
    keep = mask > 0
    ent = entropy.to(torch.float64)
    first, after = algos.critical_masks(token_ids, keep, markers, separators)
    return [float(ent[keep].sum()), float(keep.sum()), float(ent[first].sum()), float(first.sum()),
            float((keep & (ent > high_entropy)).sum()), float(ent[after].sum()), float(after.sum())]


def entropy_metrics(sums: Sequence[float], prefix: str) -> dict[str, float]:
    """The figures from globally summed `entropy_stats`: mean entropy, critical-token entropy at the markers'
    first tokens and right after them (NaN when no marker was sampled), the critical-token rate and the
    high-entropy share, per response token."""
    ent, tokens, crit, crit_n, high, after, after_n = sums
    prefix = f"{prefix}/" if prefix else ""
    return {f"{prefix}entropy": ent / max(tokens, 1.0),
            f"{prefix}critical_entropy": crit / crit_n if crit_n else float("nan"),
            f"{prefix}critical_entropy_after": after / after_n if after_n else float("nan"),
            f"{prefix}critical_token_rate": crit_n / max(tokens, 1.0),
            f"{prefix}high_entropy_fraction": high / max(tokens, 1.0)}
