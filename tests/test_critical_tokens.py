"""Critical-token entropy: the word -> token-id mapping on the real tokenizer, and the figures on a batch
whose entropies are known."""
from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoTokenizer

from learner.critical_tokens import critical_token_ids, entropy_metrics, entropy_stats, variants
from learner.types import DEFAULT_CRITICAL_WORDS


def test_every_spelled_variant_is_found_and_no_other_id(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir("internvl"))
    mapping = critical_token_ids(tok)
    wanted = {}
    for word in DEFAULT_CRITICAL_WORDS:
        for variant in variants(word):
            first = variant.split(" ")[1] if variant.startswith(" ") else variant.split(" ")[0]
            wanted[(" " if variant.startswith(" ") else "") + first] = variant
    # brute force over the whole vocabulary: the ids that decode to exactly a variant's first word
    brute = {i for i in range(len(tok)) if tok.decode([i]) in wanted}
    assert set(mapping) == brute
    assert {tok.decode([i]) for i in mapping} >= {" Wait", " Hmm", " Let", " But", " However", " Actually",
                                                   " Alternatively", " Check"}
    for i, variant in mapping.items():  # the id is the first token of the variant as the tokenizer spells it
        assert tok.encode(variant, add_special_tokens=False)[0] == i
    text_ids = tok.encode(" I count 2 shapes. Wait, let me count again.", add_special_tokens=False)
    assert [i for i in text_ids if i in mapping] == [tok.encode(" Wait", add_special_tokens=False)[0],
                                                     tok.encode(" let", add_special_tokens=False)[0]]


def test_figures_on_a_batch_with_known_entropies():
    critical = [7, 9]
    ids = torch.tensor([[1, 7, 2, 9, 0], [7, 3, 3, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]], dtype=torch.float32)
    ent = torch.tensor([[0.5, 2.0, 0.1, 1.5, 9.0], [3.0, 0.2, 1.2, 9.0, 9.0]])
    sums = entropy_stats(ent, ids, mask, critical, high_entropy=1.0)
    # response tokens: 7; critical positions (masked): 2.0, 1.5, 3.0; above 1.0: 2.0, 1.5, 3.0, 1.2
    assert sums == pytest.approx([0.5 + 2.0 + 0.1 + 1.5 + 3.0 + 0.2 + 1.2, 7.0, 6.5, 3.0, 4.0], rel=1e-6)
    figures = entropy_metrics(sums, "actor")
    assert math.isclose(figures["actor/critical_entropy"], 6.5 / 3)
    assert figures["actor/entropy"] == pytest.approx(8.5 / 7, rel=1e-6)
    assert math.isclose(figures["actor/critical_token_rate"], 3 / 7)
    assert math.isclose(figures["actor/high_entropy_fraction"], 4 / 7)
    none = entropy_metrics(entropy_stats(ent, ids, mask, [42]), "")
    assert math.isnan(none["critical_entropy"]) and none["critical_token_rate"] == 0.0
