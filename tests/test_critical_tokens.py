"""Critical-token entropy: the word -> marker mapping on the real tokenizer, where a marker counts on
hand-made token sequences (only the first token of a whole marker that starts a reflection; the token right
after it for the "after" reading), and the figures on a batch whose entropies are known."""
from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoTokenizer

from learner.algos import critical_masks, critical_token_entropy
from learner.critical_tokens import (N_STATS, critical_markers, critical_token_ids, entropy_metrics, entropy_stats,
                                     separator_ids, variants)
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
    markers = critical_markers(tok)
    for ids, variant in markers.items():  # a marker is the variant's whole token sequence
        assert list(ids) == tok.encode(variant, add_special_tokens=False)
    assert {ids[0] for ids in markers} == set(mapping)
    assert tuple(tok.encode(" let me", add_special_tokens=False)) in markers


def _masks(text: str, tok):
    ids = tok.encode(text, add_special_tokens=False)
    first, after = critical_masks(torch.tensor([ids]), torch.ones(1, len(ids)), list(critical_markers(tok)),
                                  separator_ids(tok))
    return ([tok.decode([i]) for i, f in zip(ids, first[0].tolist()) if f],
            [tok.decode([i]) for i, a in zip(ids, after[0].tolist()) if a])


def test_only_a_reflection_start_counts_on_real_text(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir("internvl"))
    # " let me" right after "Wait," continues the reflection " Wait" started
    assert _masks(" I count 2 shapes. Wait, let me count again.", tok) == ([" Wait"], [","])
    # " let" without " me" is no marker; " Let me" starting a sentence is one, counted at " Let" only
    see = tok.decode(tok.encode(" see", add_special_tokens=False)[:1])
    assert _masks(" I let it go. Then I stop. Let me see.", tok) == ([" Let"], [see])


# hand-made ids: 5 " Wait", (7, 8) " let me", 1 "," (a separator), 3 and 4 plain words
MARKERS, SEPARATORS = [(5,), (7, 8)], [1]


@pytest.mark.parametrize("ids, mask, first, after", [
    ([3, 5, 1, 7, 8, 4], None, [1], [2]),         # "let me" after "Wait," continues it
    ([3, 5, 7, 8, 4], None, [1], [2]),            # ... also with nothing between
    ([5, 1, 5, 1, 7, 8, 3], None, [0], [1]),      # a chain of markers is one reflection start
    ([3, 7, 4, 7, 8, 4], None, [3], [5]),         # " let" without " me" is no marker (nor a chain's start)
    ([5, 3, 7, 8, 4], None, [0, 2], [1, 4]),      # a word between: two reflections
    ([3, 7, 8], None, [1], []),                   # a marker that ends the response has no "after"
    ([3, 3, 7, 8], [1, 1, 1, 0], [], []),         # a marker cut by the mask is not whole
    ([5, 1, 7, 8, 4], [0, 0, 1, 1, 1], [2], [4]),  # the prompt's marker is not the response's
])
def test_a_marker_counts_once_where_it_starts_a_reflection(ids, mask, first, after):
    mask = torch.tensor([mask if mask else [1] * len(ids)])
    got_first, got_after = critical_masks(torch.tensor([ids]), mask, MARKERS, SEPARATORS)
    assert got_first[0].nonzero().flatten().tolist() == first
    assert got_after[0].nonzero().flatten().tolist() == after


def test_the_two_readings_on_hand_values():
    ids = torch.tensor([[3, 5, 1, 7, 8, 4], [7, 8, 4, 3, 5, 3]])
    ent = torch.tensor([[0.1, 2.0, 0.3, 0.4, 0.05, 0.5], [1.5, 0.2, 0.7, 0.1, 3.0, 0.9]])
    mask = torch.ones_like(ids)
    s, c = critical_token_entropy(ent, ids, mask, MARKERS, SEPARATORS)  # " Wait", " let", " Wait"
    assert (float(c), float(s)) == pytest.approx((3.0, 2.0 + 1.5 + 3.0))
    s, c = critical_token_entropy(ent, ids, mask, MARKERS, SEPARATORS, positions="after")  # ",", 4, 3
    assert (float(c), float(s)) == pytest.approx((3.0, 0.3 + 0.7 + 0.9))
    with pytest.raises(ValueError, match="first, after"):
        critical_token_entropy(ent, ids, mask, MARKERS, SEPARATORS, positions="middle")


def test_figures_on_a_batch_with_known_entropies():
    critical = [7, 9]
    ids = torch.tensor([[1, 7, 2, 9, 0], [7, 3, 3, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]], dtype=torch.float32)
    ent = torch.tensor([[0.5, 2.0, 0.1, 1.5, 9.0], [3.0, 0.2, 1.2, 9.0, 9.0]])
    sums = entropy_stats(ent, ids, mask, critical, high_entropy=1.0)
    # response tokens: 7; critical positions (masked): 2.0, 1.5, 3.0; above 1.0: 2.0, 1.5, 3.0, 1.2;
    # right after a marker: 0.1, 0.2 ((0, 4) is padding)
    assert len(sums) == N_STATS
    assert sums == pytest.approx([0.5 + 2.0 + 0.1 + 1.5 + 3.0 + 0.2 + 1.2, 7.0, 6.5, 3.0, 4.0, 0.3, 2.0], rel=1e-6)
    figures = entropy_metrics(sums, "actor")
    assert math.isclose(figures["actor/critical_entropy"], 6.5 / 3)
    assert figures["actor/critical_entropy_after"] == pytest.approx(0.15)
    assert figures["actor/entropy"] == pytest.approx(8.5 / 7, rel=1e-6)
    assert math.isclose(figures["actor/critical_token_rate"], 3 / 7)
    assert math.isclose(figures["actor/high_entropy_fraction"], 4 / 7)
    none = entropy_metrics(entropy_stats(ent, ids, mask, [42]), "")
    assert math.isnan(none["critical_entropy"]) and math.isnan(none["critical_entropy_after"])
    assert none["critical_token_rate"] == 0.0
