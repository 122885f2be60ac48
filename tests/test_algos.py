"""Tests for learner/algos.py.

Expected values are worked out by hand in the comments (not recomputed with the
formula under test), so a wrong formula fails.
"""

from __future__ import annotations

import math

import pytest
import torch

from learner import algos
from learner.algos import (
    aggregate_loss,
    critical_token_entropy,
    entropy_from_logits,
    expand_to_tokens,
    get_advantage_estimator,
    get_kl_estimator,
    get_policy_loss,
    grpo,
    kl_penalty,
    logprobs_from_logits,
    masked_mean,
    masked_sum,
    ppo_clip,
)

ATOL = 1e-6


def _counts(mask):
    """(response tokens, non-empty responses) of a micro-batch: what the learner all-reduces into
    loss_token_count / loss_seq_count (learner/worker.py)."""
    m = mask != 0
    return m.sum().to(torch.float64), m.any(dim=-1).sum().to(torch.float64)


def _close(a, b, atol=ATOL):
    # (torch.testing.assert_close costs ~5 s of lazy imports on first use here.)
    a = torch.as_tensor(a).detach().to(torch.float64)
    b = torch.as_tensor(b).detach().to(torch.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.isfinite(a).all(), a
    err = (a - b).abs().max().item() if a.numel() else 0.0
    assert err <= atol, f"max |a-b| = {err:.3g} > {atol}\n{a}\n{b}"


# --------------------------------------------------------------------------- registries


def test_registries_hold_the_builtins_and_lookup_works():
    assert get_advantage_estimator("grpo") is grpo
    assert get_policy_loss("ppo_clip") is ppo_clip
    assert set(algos.KL_ESTIMATORS) >= {"k1", "k2", "k3"}
    assert get_kl_estimator("k3") is algos.k3


@pytest.mark.parametrize(
    "getter, known",
    [
        (get_advantage_estimator, "grpo"),
        (get_policy_loss, "ppo_clip"),
        (get_kl_estimator, "k1, k2, k3"),
    ],
)
def test_unknown_name_raises_value_error_listing_known(getter, known):
    with pytest.raises(ValueError) as ei:
        getter("nope")
    assert "nope" in str(ei.value) and known in str(ei.value)


def test_register_custom_and_refuse_shadowing():
    @algos.register_kl_estimator("_test_abs")
    def _abs(lp, ref):
        return (lp - ref).abs()

    try:
        assert kl_penalty(torch.tensor([1.0]), torch.tensor([3.0]), "_test_abs").item() == 2.0
        with pytest.raises(ValueError, match="already registered"):

            @algos.register_kl_estimator("_test_abs")
            def _other(lp, ref):  # different function, same name
                return lp

    finally:
        algos.KL_ESTIMATORS.pop("_test_abs", None)


# --------------------------------------------------------------------------- advantages

# Four groups, interleaved, of sizes 4, 3, 1, 2 (+ a 3-group of 0.1 for rounding):
#   g1 ("a"): rewards 1, 0, 1, 0  -> mean 0.5, deviations ±0.5,
#             unbiased var = 4·0.25/3 = 1/3, std = 1/√3 = 0.57735
#             -> A = ±0.5·√3 = ±0.8660254   (mean-only: ±0.5)
#   g0 ("b"): rewards 0, 3, 6     -> mean 3, deviations -3, 0, 3,
#             unbiased var = 18/2 = 9, std 3 -> A = -1, 0, 1  (mean-only: -3, 0, 3)
#   g2 ("c"): a single reward 0.7 -> 0
#   g3 ("d"): 0.8, 0.8            -> all equal -> 0
#   g4 ("e"): 0.1, 0.1, 0.1       -> all equal -> 0
_IDS = [0, 1, 2, 1, 0, 3, 1, 3, 0, 1, 4, 4, 4]
_R = [0.0, 1.0, 0.7, 0.0, 3.0, 0.8, 1.0, 0.8, 6.0, 0.0, 0.1, 0.1, 0.1]
_H = 0.5 * math.sqrt(3.0)  # 0.8660254
_A_STD = [-1.0, _H, 0.0, -_H, 0.0, 0.0, _H, 0.0, 1.0, -_H, 0.0, 0.0, 0.0]
_A_MEAN = [-3.0, 0.5, 0.0, -0.5, 0.0, 0.0, 0.5, 0.0, 3.0, -0.5, 0.0, 0.0, 0.0]


@pytest.mark.parametrize(
    "ids",
    [
        torch.tensor(_IDS),
        torch.tensor([17 if i == 0 else -5 if i == 1 else 3 if i == 2 else 999 if i == 3 else 40 for i in _IDS]),
        ["bcade"[i] for i in _IDS],  # hashable ids
    ],
)
def test_grpo_std_normalised(ids):
    adv = grpo(torch.tensor(_R), ids)
    assert adv.dtype == torch.float32 and adv.shape == (len(_R),)
    # eps=1e-6 shifts ±0.866 by < 2e-6 and ±1 by < 1e-6
    _close(adv, _A_STD, atol=3e-6)


def test_grpo_mean_only():
    adv = grpo(torch.tensor(_R), torch.tensor(_IDS), norm_by_std=False)
    _close(adv, _A_MEAN, atol=1e-6)


def test_grpo_degenerate_groups_are_exactly_zero_no_nan():
    adv = grpo(torch.tensor(_R), torch.tensor(_IDS))
    assert torch.isfinite(adv).all()
    for k, g in enumerate(_IDS):
        if g in (2, 3, 4):
            assert adv[k].item() == 0.0
    assert grpo(torch.tensor([5.0]), [0]).item() == 0.0
    # float64 0.7·3/3 rounds: 0.7 - mean = 1.1e-16, which would leave ~1e-10 with std-norm
    # (tiny/(tiny+eps)) and 1.1e-16 mean-only unless all-equal groups are zeroed explicitly.
    r = torch.tensor([0.7, 0.7, 0.7, 1.0, 0.0], dtype=torch.float64)
    for norm in (True, False):
        adv = grpo(r, [0, 0, 0, 1, 1], norm_by_std=norm)
        assert adv.dtype == torch.float64 and adv[:3].tolist() == [0.0, 0.0, 0.0]
    assert grpo(torch.zeros(0), []).shape == (0,)


def test_grpo_integer_rewards_and_via_registry():
    adv = get_advantage_estimator("grpo")(torch.tensor([1, 0, 1, 0]), ["p"] * 4)
    assert adv.dtype == torch.float32
    _close(adv, [_H, -_H, _H, -_H], atol=3e-6)


def test_grpo_rejects_mismatched_ids():
    with pytest.raises(ValueError):
        grpo(torch.tensor([1.0, 0.0]), [0])
    with pytest.raises(ValueError):
        grpo(torch.tensor([1.0, 0.0]), torch.tensor([0, 0, 1]))


def test_expand_to_tokens():
    adv = torch.tensor([2.0, -1.0])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert torch.equal(expand_to_tokens(adv, mask), torch.tensor([[2.0, 2.0, 0.0], [-1.0, 0.0, 0.0]]))


# --------------------------------------------------------------------------- masked reductions


def test_masked_sum_mean_ignore_nan_and_inf_on_padding():
    x = torch.tensor([[1.0, 2.0, float("nan")], [3.0, float("-inf"), 5.0]])
    m = torch.tensor([[1, 1, 0], [1, 0, 1]])
    assert masked_sum(x, m).item() == 11.0  # 1+2+3+5
    assert masked_mean(x, m).item() == 11.0 / 4
    _close(masked_mean(x, m, dim=-1), [1.5, 4.0])
    assert masked_mean(x, torch.zeros_like(m)).item() == 0.0


# --------------------------------------------------------------------------- ppo_clip

# 2×3 example, all tokens valid.  ratio ρ and advantage A per token:
#   row 0: ρ = 1.5  A=+1 | ρ = 0.5  A=+1 | ρ = 1.0  A=-2
#   row 1: ρ = 1.25 A=+1 | ρ = 0.5  A=-1 | ρ = 1.3  A=-1
# ℓ = max(-Aρ, -A·clip(ρ, 1-lo, 1+hi)).
# Asymmetric lo=0.2, hi=0.28 (range [0.8, 1.28]):
#   (0,0) -1.5 vs -1.28 -> -1.28 CLIPPED     (0,1) -0.5 vs -0.8 -> -0.5
#   (0,2)  2.0 vs  2.0  ->  2.0              (1,0) -1.25 vs -1.25 -> -1.25
#   (1,1)  0.5 vs  0.8  ->  0.8 CLIPPED      (1,2)  1.3 vs 1.28 -> 1.3
#   Σ = -1.28 - 0.5 + 2.0 - 1.25 + 0.8 + 1.3 = 1.07 ; clipped 2/6
# Symmetric lo=hi=0.2 (range [0.8, 1.2]): (0,0) -> -1.2 and (1,0) -1.25 vs -1.2 -> -1.2 CLIPPED
#   Σ = -1.2 - 0.5 + 2.0 - 1.2 + 0.8 + 1.3 = 1.2 ; clipped 3/6
# ppo_kl = mean(-ln ρ) = -(0.405465 - 0.693147 + 0 + 0.223144 - 0.693147 + 0.262364)/6
#        = 0.495321/6 = 0.0825535 ;  ratio mean = (1.5+0.5+1+1.25+0.5+1.3)/6 = 6.05/6
_RHO = [[1.5, 0.5, 1.0], [1.25, 0.5, 1.3]]
_ADV = [[1.0, 1.0, -2.0], [1.0, -1.0, -1.0]]


def _ppo_inputs(rho=_RHO, adv=_ADV, old=-1.0):
    old_lp = torch.full((len(rho), len(rho[0])), old, dtype=torch.float64)
    lp = (old_lp + torch.tensor(rho, dtype=torch.float64).log()).requires_grad_(True)
    return lp, old_lp, torch.tensor(adv, dtype=torch.float64)


def test_ppo_clip_asymmetric_hand_values_and_stats():
    lp, old, adv = _ppo_inputs()
    mask = torch.ones(2, 3)
    loss, st = ppo_clip(lp, old, adv, mask, clip_low=0.2, clip_high=0.28, loss_token_count=6)
    _close(loss, 1.07 / 6)
    _close(st["pg_loss"], 1.07 / 6)
    assert [float(v) for v in st["pg_clipfrac"]] == [2.0, 6.0]
    assert [float(v) for v in st["pg_clipfrac_lower"]] == [0.0, 6.0]
    _close(st["ppo_kl"][0] / st["ppo_kl"][1], 0.495321 / 6, atol=1e-6)
    _close(st["ratio_mean"][0] / st["ratio_mean"][1], 6.05 / 6)
    # gradient dℓ/dlogp = -A·ρ/N on unclipped tokens, 0 on clipped ones:
    #   row 0: 0, -0.5/6, +2/6 ; row 1: -1.25/6, 0, +1.3/6
    loss.backward()
    _close(lp.grad, [[0.0, -0.5 / 6, 2.0 / 6], [-1.25 / 6, 0.0, 1.3 / 6]])


def test_ppo_clip_symmetric_default_hand_values():
    lp, old, adv = _ppo_inputs()
    loss, st = ppo_clip(lp, old, adv, torch.ones(2, 3), loss_token_count=6)  # defaults 0.2 / 0.2
    _close(loss, 1.2 / 6)
    assert [float(v) for v in st["pg_clipfrac"]] == [3.0, 6.0]


def test_ppo_clip_global_normaliser_and_loss_scale():
    lp, old, adv = _ppo_inputs()
    loss, st = ppo_clip(lp, old, adv, torch.ones(2, 3), clip_low=0.2, clip_high=0.28,
                        loss_token_count=12.0, loss_scale=4.0)
    _close(st["pg_loss"], 1.07 / 12)  # divided by the GLOBAL count, not the local 6
    _close(loss, 4.0 * 1.07 / 12)     # loss_scale only affects the backward loss


def test_ppo_clip_padding_is_ignored_even_if_garbage():
    # Same 2×3 tokens plus a padding column holding -inf / nan.
    lp, old, adv = _ppo_inputs()
    lp_p = torch.cat([lp.detach(), torch.tensor([[float("-inf")], [float("nan")]], dtype=torch.float64)], 1)
    lp_p.requires_grad_(True)
    old_p = torch.cat([old, torch.tensor([[0.0], [float("inf")]], dtype=torch.float64)], 1)
    adv_p = torch.cat([adv, torch.tensor([[float("nan")], [5.0]], dtype=torch.float64)], 1)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0]])
    loss, st = ppo_clip(lp_p, old_p, adv_p, mask, clip_low=0.2, clip_high=0.28, loss_token_count=6)
    _close(loss, 1.07 / 6)
    loss.backward()
    assert torch.isfinite(lp_p.grad).all() and (lp_p.grad[:, 3] == 0).all()
    assert [float(v) for v in st["pg_clipfrac"]] == [2.0, 6.0]
    assert torch.isfinite(torch.stack([st["ppo_kl"][0], st["ratio_mean"][0]])).all()


def test_ppo_clip_dual_clip():
    # tokens: (ρ=4, A=-1), (ρ=2, A=-1), (ρ=4, A=+1); clip 0.2, c = 3
    #   standard: max(4, 1.2)=4 | max(2, 1.2)=2 | max(-4, -1.2)=-1.2   Σ = 4.8
    #   dual    : min(4, 3)=3   | min(2, 3)=2   | A>0 untouched -1.2   Σ = 3.8
    lp, old, adv = _ppo_inputs([[4.0, 2.0, 4.0]], [[-1.0, -1.0, 1.0]])
    m = torch.ones(1, 3)
    loss0, _ = ppo_clip(lp, old, adv, m, loss_token_count=3)
    _close(loss0, 4.8 / 3)
    loss, st = ppo_clip(lp, old, adv, m, clip_ratio_c=3.0, loss_token_count=3)
    _close(loss, 3.8 / 3)
    assert [float(v) for v in st["pg_clipfrac_lower"]] == [1.0, 3.0]
    # clipped branch active: token 3 only (token 1 is unclipped-then-capped)
    assert [float(v) for v in st["pg_clipfrac"]] == [1.0, 3.0]
    with pytest.raises(ValueError):
        ppo_clip(lp, old, adv, m, clip_ratio_c=0.9, loss_token_count=3)


def test_ppo_clip_seq_mean_token_mean_hand_values():
    # Same tokens, row 1's last token is padding:
    #   row 0 (asym clip): (-1.28 - 0.5 + 2.0)/3 = 0.22/3 = 0.0733333
    #   row 1            : (-1.25 + 0.8)/2      = -0.225
    #   mean over 2 seqs : (0.0733333 - 0.225)/2 = -0.0758333
    lp, old, adv = _ppo_inputs()
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    loss, _ = ppo_clip(lp, old, adv, mask, clip_low=0.2, clip_high=0.28,
                       loss_agg_mode="seq-mean-token-mean", loss_seq_count=2)
    _close(loss, (0.22 / 3 - 0.225) / 2)
    # token-mean over the same 5 tokens: (0.22 - 0.45)/5 = -0.046
    loss_t, _ = ppo_clip(lp, old, adv, mask, clip_low=0.2, clip_high=0.28, loss_token_count=5)
    _close(loss_t, -0.046)


def test_ppo_clip_requires_the_matching_global_count():
    lp, old, adv = _ppo_inputs()
    m = torch.ones(2, 3)
    with pytest.raises(ValueError, match="loss_token_count"):
        ppo_clip(lp, old, adv, m)
    with pytest.raises(ValueError, match="loss_seq_count"):
        ppo_clip(lp, old, adv, m, loss_agg_mode="seq-mean-token-mean", loss_token_count=6)
    with pytest.raises(ValueError, match="loss_agg_mode"):
        aggregate_loss(lp, m, "seq-sum", loss_token_count=6)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        ppo_clip(lp, old, adv, torch.ones(2, 4), loss_token_count=6)


def test_on_policy_ratio_one_gives_minus_mean_advantage():
    # R1V3 is strictly on-policy (1 step/episode): ρ=1, ℓ=-A; token-mean of -A.
    # A = [[1,1,-2],[1,-1,-1]] -> Σ(-A) = -1 -1 +2 -1 +1 +1 = 1 -> 1/6
    _, old, adv = _ppo_inputs()
    loss, st = ppo_clip(old.clone(), old, adv, torch.ones(2, 3), loss_token_count=6)
    _close(loss, 1 / 6)
    assert float(st["pg_clipfrac"][0]) == 0.0 and float(st["ppo_kl"][0]) == 0.0


# --------------------------------------------------------------------------- micro-batch / rank invariance


def _random_batch(seed=0, b=8, t=7):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([7, 1, 4, 6, 2, 5, 3, 7])
    mask = (torch.arange(t)[None, :] < lengths[:, None]).float()
    old = -torch.rand(b, t, generator=g, dtype=torch.float64) * 3
    # ratios in ~[0.6, 1.6] so every clip branch occurs
    lp = old + (torch.rand(b, t, generator=g, dtype=torch.float64) - 0.5)
    adv = expand_to_tokens(torch.randn(b, generator=g, dtype=torch.float64), mask.double())
    return lp, old, adv, mask


_SPLITS = {
    "one_micro_batch": [[slice(0, 8)]],
    "four_micro_batches": [[slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8)]],
    "two_ranks_x_two_micro": [[slice(0, 2), slice(2, 4)], [slice(4, 6), slice(6, 8)]],
}


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("split", list(_SPLITS))
def test_micro_batch_and_rank_split_is_invariant(mode, split):
    lp0, old, adv, mask = _random_batch()
    kw = dict(clip_low=0.2, clip_high=0.28, clip_ratio_c=3.0, loss_agg_mode=mode)

    # Reference: the whole batch at once, normalised by its own counts.
    full_lp = lp0.clone().requires_grad_(True)
    tok, seq = _counts(mask)
    assert (float(tok), float(seq)) == (35.0, 8.0)  # 7+1+4+6+2+5+3+7
    full_loss, full_st = ppo_clip(full_lp, old, adv, mask, loss_token_count=tok, loss_seq_count=seq, **kw)
    full_loss.backward()
    assert full_st["pg_clipfrac"][0] > 0  # clipping does occur in this batch

    # Global counts = sum of the per-micro-batch local counts (what the learner all-reduces).
    ranks = _SPLITS[split]
    counts = [_counts(mask[s]) for r in ranks for s in r]
    g_tok = sum(c[0] for c in counts)
    g_seq = sum(c[1] for c in counts)

    # Gradient w.r.t. logprobs as a leaf: each micro-batch has its own leaf; summed = full grad.
    # Also simulate a shared parameter θ (logp = lp0 + θ·feat) with DeepSpeed-style rank
    # averaging: per-rank grads are accumulated, then averaged over ranks; loss_scale=world.
    world = len(ranks)
    feat = torch.linspace(-1, 1, lp0.numel(), dtype=torch.float64).reshape(lp0.shape)
    theta_full = torch.zeros((), dtype=torch.float64, requires_grad=True)
    ppo_clip(lp0 + theta_full * feat, old, adv, mask, loss_token_count=tok, loss_seq_count=seq, **kw)[0].backward()

    total_loss = torch.zeros((), dtype=torch.float64)
    grad_lp = torch.zeros_like(lp0)
    rank_theta_grads = []
    for r in ranks:
        theta = torch.zeros((), dtype=torch.float64, requires_grad=True)  # this rank's replica
        for s in r:
            leaf = lp0[s].clone().requires_grad_(True)
            loss, st = ppo_clip(leaf, old[s], adv[s], mask[s], loss_token_count=g_tok, loss_seq_count=g_seq, **kw)
            loss.backward()
            grad_lp[s] += leaf.grad
            total_loss += st["pg_loss"]
            loss_r, _ = ppo_clip(lp0[s] + theta * feat[s], old[s], adv[s], mask[s],
                                 loss_token_count=g_tok, loss_seq_count=g_seq, loss_scale=world, **kw)
            loss_r.backward()  # accumulates over micro-batches
        rank_theta_grads.append(theta.grad)
    avg_theta_grad = sum(rank_theta_grads) / world  # the all-reduce average

    _close(total_loss, full_loss.detach())
    _close(grad_lp, full_lp.grad)
    _close(avg_theta_grad, theta_full.grad)


def test_invariance_test_can_fail_with_local_normalisation():
    # Sanity: normalising each micro-batch by its LOCAL token count does not reproduce the
    # full-batch loss (lengths differ), so the invariance test above is not vacuous.
    lp, old, adv, mask = _random_batch()
    full, _ = ppo_clip(lp, old, adv, mask, loss_token_count=mask.sum())
    parts = [ppo_clip(lp[s], old[s], adv[s], mask[s], loss_token_count=mask[s].sum())[0] / 4
             for s in _SPLITS["four_micro_batches"][0]]
    assert abs(float(sum(parts)) - float(full)) > 1e-3


# --------------------------------------------------------------------------- KL


def test_kl_estimators_hand_values():
    # d = logp - ref = +1, -1, 0
    #   k1 = d                    ->  1, -1, 0
    #   k2 = d²/2                 ->  0.5, 0.5, 0
    #   k3 = e^{-d} + d - 1       ->  e^-1 = 0.3678794, e - 2 = 0.7182818, 0
    lp = torch.tensor([0.0, -2.0, -0.5])
    ref = torch.tensor([-1.0, -1.0, -0.5])
    _close(kl_penalty(lp, ref, "k1"), [1.0, -1.0, 0.0])
    _close(kl_penalty(lp, ref, "k2"), [0.5, 0.5, 0.0])
    _close(kl_penalty(lp, ref, "k3"), [0.3678794, 0.7182818, 0.0])
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_penalty(lp, ref, "k4")


def test_k3_is_clamped_and_finite():
    # ref - logp = 30 -> clamped to 20 -> e^20 - 21 ≈ 4.85e8 -> clamped to 10
    lp = torch.tensor([-30.0, 0.0], requires_grad=True)
    ref = torch.tensor([0.0, -1e4])  # second: ref - logp = -1e4 -> -20 -> e^-20 + 19 -> 10
    out = kl_penalty(lp, ref, "k3")
    assert out.tolist() == [10.0, 10.0]
    out.sum().backward()
    assert torch.isfinite(lp.grad).all()


# --------------------------------------------------------------------------- entropy / logprobs


def test_entropy_uniform_is_log_v_and_one_hot_is_zero():
    v = 7
    h = entropy_from_logits(torch.zeros(2, 3, v))
    assert h.shape == (2, 3)
    _close(h, torch.full((2, 3), 1.9459101))  # ln 7
    one_hot = torch.full((1, 1, v), -1e4)
    one_hot[..., 2] = 1e4
    assert abs(entropy_from_logits(one_hot).item()) < 1e-6


def test_entropy_two_way_hand_value_and_shift_invariance():
    # logits (ln 1, ln 3) -> p = (0.25, 0.75)
    # H = 0.25·ln4 + 0.75·ln(4/3) = 0.25·1.3862944 + 0.75·0.2876821 = 0.3465736 + 0.2157616 = 0.5623351
    logits = torch.tensor([[[0.0, math.log(3.0)]]])
    _close(entropy_from_logits(logits), [[0.5623351]])
    # Stable at large logits: a naive lse(l) - Σp·l cancels two ~1e4 numbers (error ~1e-3 in
    # float32). float64 input is exact; float32 input itself rounds ln3 + 4096 by up to 2.4e-4,
    # which moves H by ≤ |dH/dΔ|·2.4e-4 = p(1-p)·ln3·2.4e-4 ≈ 5e-5.
    _close(entropy_from_logits(logits.double() + 1e4), [[0.5623351]], atol=1e-7)
    _close(entropy_from_logits(logits + 4096.0), [[0.5623351]], atol=1e-4)


def test_entropy_chunking_bf16_and_grad():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 5, 11, generator=g)
    ref = -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1)
    for chunk in (None, 1, 4, 1024):
        _close(entropy_from_logits(logits, chunk_rows=chunk), ref, atol=1e-6)
    out = entropy_from_logits(logits.bfloat16())
    assert out.dtype == torch.float32
    _close(out, ref, atol=3e-2)
    x = logits.clone().requires_grad_(True)
    entropy_from_logits(x, chunk_rows=2).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_logprobs_match_log_softmax_reference():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 6, 13, generator=g, dtype=torch.float64) * 4
    labels = torch.randint(0, 13, (2, 6), generator=g)
    ref = torch.log_softmax(logits, -1).gather(-1, labels[..., None]).squeeze(-1)
    for chunk in (None, 1, 5):
        out = logprobs_from_logits(logits, labels, chunk_rows=chunk)
        assert out.shape == (2, 6) and out.dtype == torch.float64
        _close(out, ref, atol=1e-10)
    # gradients agree too
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    logprobs_from_logits(a, labels, chunk_rows=3).sum().backward()
    torch.log_softmax(b, -1).gather(-1, labels[..., None]).sum().backward()
    _close(a.grad, b.grad, atol=1e-10)
    # bf16 logits are scored in float32
    out16 = logprobs_from_logits(logits.float().bfloat16(), labels)
    assert out16.dtype == torch.float32
    ref16 = torch.log_softmax(logits.float().bfloat16().float(), -1).gather(-1, labels[..., None]).squeeze(-1)
    _close(out16, ref16, atol=1e-5)


def test_logprobs_hand_value():
    # logits (0, ln 3), label 1 -> log 0.75 = -0.2876821 ; label 0 -> log 0.25 = -1.3862944
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, math.log(3.0)]]])
    _close(logprobs_from_logits(logits, torch.tensor([[1, 0]])), [[-0.2876821, -1.3862944]])


# --------------------------------------------------------------------------- critical-token entropy


def test_critical_token_entropy():
    ent = torch.tensor([[0.5, 1.0, 2.0], [3.0, 4.0, 5.0]])
    ids = torch.tensor([[10, 7, 10], [7, 7, 3]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    # id 7 at (0,1)=1.0, (1,0)=3.0; (1,1) right after (1,0) continues that occurrence -> (4.0, 2)
    s, c = critical_token_entropy(ent, ids, mask, {7})
    assert (float(s), float(c)) == (4.0, 2.0)
    # adding id 3: its only occurrence (1,2) is padding -> unchanged
    s, c = critical_token_entropy(ent, ids, mask, [7, 3])
    assert (float(s), float(c)) == (4.0, 2.0)
    # id 10 at (0,0)=0.5, (0,2)=2.0 -> (2.5, 2), mean 1.25
    pair = critical_token_entropy(ent, ids, mask, (10,))
    assert (float(pair[0]), float(pair[1])) == (2.5, 2.0)
    # the whole sequence (10, 7) only at (0,0); the token after it (0,2)=2.0
    s, c = critical_token_entropy(ent, ids, mask, [(10, 7)])
    assert (float(s), float(c)) == (0.5, 1.0)
    s, c = critical_token_entropy(ent, ids, mask, [(10, 7)], positions="after")
    assert (float(s), float(c)) == (2.0, 1.0)
    s, c = critical_token_entropy(ent, ids, mask, set())
    assert (float(s), float(c)) == (0.0, 0.0)
    assert not s.requires_grad



# --------------------------------------------------------------------------- off-policy corrections

# Learner (old) vs engine (behaviour) log-ratios d = old - behaviour of a hand-made batch; row 0 has three
# response tokens (column 3 is padding, garbage there), row 1 four.
#   row 0: ρ = exp(0.9) = 2.45960311, exp(-1.2) = 0.30119421, exp(0.3) = 1.34985881
#   row 1: ρ = exp(0.1) = 1.10517092, exp(-0.05) = 0.95122942, exp(0) = 1, exp(0.02) = 1.02020134
# geometric means: row 0 exp((0.9 - 1.2 + 0.3)/3) = 1; row 1 exp(0.07/4) = 1.01765
_D = [[0.9, -1.2, 0.3, 0.0], [0.1, -0.05, 0.0, 0.02]]
_R0 = [2.45960311, 0.30119421, 1.34985881, 0.0]
_R1 = [1.10517092, 0.95122942, 1.0, 1.02020134]
_THRESHOLDS = dict(offpolicy_is_cap=2.0, offpolicy_low=0.5, offpolicy_high=2.0, offpolicy_seq_low=0.999,
                   offpolicy_seq_high=1.001)


def _offpolicy_batch():
    # The engine's logprobs differ per token; the learner's are the engine's plus d.
    behaviour = torch.tensor([[-0.5, -2.0, -1.0, float("nan")], [-0.3, -0.7, -1.5, -0.1]], dtype=torch.float64)
    old = behaviour + torch.tensor(_D, dtype=torch.float64)
    old[0, 3] = -float("inf")
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 1, 1, 1]])
    return old, behaviour, mask


@pytest.mark.parametrize("name, weights, masked", [
    # tis: min(ρ, 2) - 2.4596 is truncated to 2, nothing masked
    ("tis", [[2.0, 0.30119421, 1.34985881, 0.0], _R1], 0),
    # mis: ρ > 2 masked (2.4596), the small 0.3012 kept with weight ρ
    ("mis", [[0.0, 0.30119421, 1.34985881, 0.0], _R1], 1),
    # icepop: ρ outside [0.5, 2] masked at both ends: 2.4596 and 0.3012
    ("icepop", [[0.0, 0.0, 1.34985881, 0.0], _R1], 2),
    # seq_mask_tis: row 0's geometric mean 1 is inside [0.999, 1.001] -> min(ρ, 2); row 1's 1.01765 is not
    ("seq_mask_tis", [[2.0, 0.30119421, 1.34985881, 0.0], [0.0, 0.0, 0.0, 0.0]], 4),
    ("none", [[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]], 0),
])
def test_offpolicy_corrections_hand_values(name, weights, masked):
    old, behaviour, mask = _offpolicy_batch()
    w, st = algos.offpolicy_correction(name, old, behaviour, mask, **_THRESHOLDS)
    _close(w, weights, atol=1e-7)
    assert not w.requires_grad
    assert [float(v) for v in st["masked"]] == [float(masked), 7.0]
    # Σρ over the 7 trained tokens = 8.18725781; k3 Σ(ρ - log ρ - 1) = 8.18725781 - 0.07 - 7 = 1.11725781
    _close(st["is_ratio"][0], 8.18725781, atol=1e-7)
    _close(st["behaviour_kl"][0], 1.11725781, atol=1e-7)
    assert float(st["is_ratio"][1]) == 7.0 == float(st["behaviour_kl"][1])


def test_offpolicy_registry_and_unknown_name_lists_choices():
    assert set(algos.OFFPOLICY_CORRECTIONS) == {"none", "tis", "mis", "icepop", "seq_mask_tis"}
    assert algos.get_offpolicy_correction("tis") is algos.tis
    old, behaviour, mask = _offpolicy_batch()
    with pytest.raises(ValueError) as ei:
        algos.offpolicy_correction("tiss", old, behaviour, mask)
    assert "tiss" in str(ei.value) and "icepop, mis, none, seq_mask_tis, tis" in str(ei.value)


def test_seq_mask_tis_wider_bounds_keep_the_sequence_and_thresholds_are_used():
    old, behaviour, mask = _offpolicy_batch()
    w, _ = algos.offpolicy_correction("seq_mask_tis", old, behaviour, mask,
                                      **{**_THRESHOLDS, "offpolicy_seq_low": 0.98, "offpolicy_seq_high": 1.02})
    _close(w, [[2.0, 0.30119421, 1.34985881, 0.0], _R1], atol=1e-7)  # 1.01765 now inside: kept
    w, st = algos.offpolicy_correction("tis", old, behaviour, mask, **{**_THRESHOLDS, "offpolicy_is_cap": 1.05})
    _close(w, [[1.05, 0.30119421, 1.05, 0.0], [1.05, 0.95122942, 1.0, 1.02020134]], atol=1e-7)
    w, st = algos.offpolicy_correction("icepop", old, behaviour, mask,
                                       **{**_THRESHOLDS, "offpolicy_low": 0.25, "offpolicy_high": 3.0})
    _close(w, [_R0, _R1], atol=1e-7)  # all inside [0.25, 3]
    assert float(st["masked"][0]) == 0.0


def test_offpolicy_tokens_without_behaviour_logprobs_get_weight_one():
    # A third row (an SFT target or reference solution) carries no engine logprobs: weight 1, not in stats.
    old, behaviour, mask = _offpolicy_batch()
    old = torch.cat([old, torch.full((1, 4), -0.7, dtype=torch.float64)])
    behaviour = torch.cat([behaviour, torch.zeros(1, 4, dtype=torch.float64)])  # placeholder values
    mask = torch.cat([mask, torch.tensor([[1.0, 1, 0, 0]])])
    has = torch.tensor([True, True, False])
    w, st = algos.offpolicy_correction("icepop", old, behaviour, mask, has, **_THRESHOLDS)
    _close(w, [[0.0, 0.0, 1.34985881, 0.0], _R1, [1.0, 1.0, 0.0, 0.0]], atol=1e-7)
    assert [float(v) for v in st["masked"]] == [2.0, 7.0]


def test_ppo_clip_offpolicy_weights_scale_the_pg_term_and_ratio_stays_on_old():
    # The PPO ratio uses the learner's old logprobs: π_θ = 1.1·π_old on every token (unclipped for A > 0
    # with clip 0.2); the correction's weight follows exp(old - behaviour) from the engine's logprobs.
    old, behaviour, mask = _offpolicy_batch()
    old = torch.where(mask != 0, old, torch.zeros_like(old))
    lp = (old + math.log(1.1)).requires_grad_(True)
    adv = torch.tensor([[1.0, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.float64)
    w, _ = algos.offpolicy_correction("tis", old, behaviour, mask, **_THRESHOLDS)
    loss, st = ppo_clip(lp, old, adv, mask, loss_token_count=7, offpolicy_weights=w)
    # Σ w = (2 + 0.30119421 + 1.34985881) + (1.10517092 + 0.95122942 + 1 + 1.02020134) = 7.7276547
    # ℓ = -A·ρ·w = -1.1·w -> loss = -1.1 · 7.7276547 / 7
    _close(loss, -1.1 * 7.7276547 / 7, atol=1e-7)
    _close(st["ratio_mean"][0] / st["ratio_mean"][1], 1.1)  # π_θ/π_old, not π_θ/π_behaviour
    loss.backward()
    _close(lp.grad, -1.1 * w / 7, atol=1e-7)  # dℓ/dlogp = -A·ρ·w / N


def test_ppo_clip_without_offpolicy_weights_is_bit_identical_and_none_weights_too():
    lp0, old, adv, mask = _random_batch()
    kw = dict(clip_low=0.2, clip_high=0.28, clip_ratio_c=3.0, loss_token_count=mask.sum())
    base, st0 = ppo_clip(lp0, old, adv, mask, **kw)
    same, st1 = ppo_clip(lp0, old, adv, mask, offpolicy_weights=None, **kw)
    ones, _ = algos.offpolicy_correction("none", old, old - 0.3, mask)
    times_one, _ = ppo_clip(lp0, old, adv, mask, offpolicy_weights=ones, **kw)
    assert torch.equal(base, same) and torch.equal(base, times_one)
    assert all(torch.equal(torch.as_tensor(st0[k][0]), torch.as_tensor(st1[k][0])) for k in st0 if k != "pg_loss")
    with pytest.raises(ValueError, match="offpolicy_weights"):
        ppo_clip(lp0, old, adv, mask, offpolicy_weights=ones[:, :3], **kw)


# --------------------------------------------------------------------------- the learner's wiring (no DeepSpeed)


def _worker_chunk():
    from learner.types import TrainSample

    # prompt of 3 tokens -> the response's logprobs start at column 2 (the logits row before each token)
    a = TrainSample([1, 2, 3], [4, 5, 6], advantage=1.0, rollout_logprobs=[-0.5, -2.0, -1.0])
    b = TrainSample([1, 2], [7, 8, 9, 10], advantage=-1.0, rollout_logprobs=[-0.3, -0.7, -1.5, -0.1])
    sft = TrainSample([1, 2, 3], [11], advantage=0.0)
    mask = torch.zeros(3, 5)
    mask[0, 2:5] = 1
    mask[1, 1:5] = 1
    mask[2, 2:3] = 1
    return [a, b, sft], mask


def test_worker_lays_out_the_engine_logprobs_like_its_own():
    from learner.worker import behaviour_logprobs

    chunk, mask = _worker_chunk()
    values, has = behaviour_logprobs(chunk, mask)
    _close(values, [[0, 0, -0.5, -2.0, -1.0], [0, -0.3, -0.7, -1.5, -0.1], [0, 0, 0, 0, 0]])
    assert has.tolist() == [[False, False, True, True, True], [False, True, True, True, True], [False] * 5]
    assert behaviour_logprobs([chunk[2]], mask[2:]) is None  # an SFT batch: nothing to compare
    assert behaviour_logprobs([chunk[0].as_padding()], mask[:1] * 0) is None
    with pytest.raises(ValueError, match="rollout logprobs"):
        bad = _worker_chunk()[0][0]
        bad.rollout_logprobs = [-1.0]
        behaviour_logprobs([bad], mask[:1])


@pytest.mark.parametrize("correction", ["none", "icepop"])
def test_worker_policy_loss_applies_the_correction_and_sums_the_offpolicy_stats(correction):
    from types import SimpleNamespace

    from learner.types import LossConfig, StageSpec
    from learner.worker import TRAIN_STATS, LearnerWorker, offpolicy_metrics

    chunk, mask = _worker_chunk()
    d = torch.zeros(3, 5)  # the learner's logprobs are the engine's plus row 0's d = (0.9, -1.2, 0.3)
    d[0, 2:5] = torch.tensor([0.9, -1.2, 0.3])
    behaviour = torch.zeros(3, 5)
    behaviour[0, 2:5] = torch.tensor([-0.5, -2.0, -1.0])
    behaviour[1, 1:5] = torch.tensor([-0.3, -0.7, -1.5, -0.1])
    logprobs = (behaviour + d - 0.25 * (mask == 0)).requires_grad_(True)
    logprobs_sft = torch.full((3, 5), -0.4)
    logprobs = torch.where(torch.tensor([[False], [False], [True]]), logprobs_sft, logprobs)
    spec = StageSpec("rl", loss=LossConfig(offpolicy_correction=correction))
    worker = SimpleNamespace(device=torch.device("cpu"), world_size=2, ref_model=None)
    stats = dict.fromkeys(TRAIN_STATS, 0.0)
    loss = LearnerWorker._policy_loss(worker, spec, chunk, logprobs, mask, None, 8.0, 3.0, stats)
    adv = torch.tensor([[1.0], [-1.0], [0.0]]) * mask
    expected, _ = ppo_clip(logprobs, logprobs.detach(), adv, mask, loss_token_count=8.0, loss_scale=2,
                           **({} if correction == "none" else {"offpolicy_weights": torch.tensor(
                               [[0, 0, 0, 0, 1.34985881], [0, 1, 1, 1, 1], [0, 0, 1, 0, 0]])}))
    if correction == "none":
        assert torch.equal(loss, expected)  # bit-identical to the loss without any correction
    else:
        # on-policy PPO ratio 1: ℓ = -A·w; row 0 (A=1) keeps only the 1.34985881 token, row 1 (A=-1) all four
        # tokens with ρ = 1, the SFT row's A is 0 -> Σℓ = -1.34985881 + 4, times world_size 2 over 8 tokens
        _close(loss, 2 * (4 - 1.34985881) / 8, atol=1e-6)
        _close(loss, expected, atol=1e-6)
    # stats over the 7 tokens with engine logprobs, with either correction:
    # Σρ = 2.45960311 + 0.30119421 + 1.34985881 + 4 = 8.11065613; k3: 0.55960311 + 0.50119421 + 0.04985881
    masked = 0.0 if correction == "none" else 2.0
    metrics = offpolicy_metrics(stats)
    _close(metrics["offpolicy/is_ratio_mean"], 8.11065613 / 7, atol=1e-6)
    _close(metrics["offpolicy/behaviour_kl"], 1.11065613 / 7, atol=1e-6)
    assert metrics["offpolicy/masked_fraction"] == masked / 7
    assert offpolicy_metrics(dict.fromkeys(TRAIN_STATS, 0.0)) == {}
