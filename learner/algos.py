"""GRPO building blocks: advantages, policy losses, KL estimators, off-policy corrections, entropy.

Modelled on verl's ``verl/trainer/ppo/core_algos.py``: every advantage estimator,
policy loss and KL estimator is a small, pure function registered by name, so a
config string picks the variant and a new one is one decorated function away.
Nothing here touches the network, the optimizer or ``torch.distributed``; the
learner does the all-reduces, these functions only return the *local* pieces
(sums and counts) that make a global reduction exact.

Recipe (Skywork-R1V3, arXiv 2507.06167, R1V3 §3.3 "RL Implementation Details"):
GRPO group-normalised advantages, PPO clipped surrogate with a symmetric clip of
0.2, no KL penalty, one gradient step per episode (strictly on-policy, ratio = 1).

Distributed loss normalisation (read this before calling :func:`ppo_clip`)
-------------------------------------------------------------------------
``ppo_clip`` divides the *local* masked sum of per-token losses by the *global*
normaliser (``loss_token_count`` = response tokens in the whole training batch
over all ranks and micro-batches, or ``loss_seq_count`` = sequences, for
"seq-mean-token-mean").  Hence the sum over every micro-batch on every rank of
the returned ``stats["pg_loss"]`` is exactly the full-batch loss, and the sum of
their gradients is exactly the full-batch gradient, however the batch is split.

The caller must make sure the optimizer sees that *sum*:

* plain ``loss.backward()`` per micro-batch accumulates (sums) gradients - good;
* DeepSpeed's ``engine.backward(loss)`` divides by ``gradient_accumulation_steps``
  unless called with ``scale_wrt_gas=False`` - call it that way (or multiply
  ``loss_scale`` by the number of accumulation steps);
* DeepSpeed / DDP all-reduce *averages* gradients over the data-parallel ranks
  (divides by ``dp_world_size``), so pass ``loss_scale=dp_world_size`` (the
  divisor the gradient all-reduce uses).

``loss_scale`` only scales the returned differentiable ``loss``; the logged
``stats["pg_loss"]`` stays unscaled so it can be summed across micro-batches and
ranks for logging.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Hashable, Sequence
from typing import Literal, TypeVar

import torch
from torch import Tensor

from common.registry import Registry
from learner.types import CRITICAL_POSITIONS

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "POLICY_LOSSES",
    "KL_ESTIMATORS",
    "OFFPOLICY_CORRECTIONS",
    "OFFPOLICY_THRESHOLDS",
    "LossAggMode",
    "LOSS_AGG_MODES",
    "StatPair",
    "register_advantage_estimator",
    "register_policy_loss",
    "register_kl_estimator",
    "register_offpolicy_correction",
    "get_advantage_estimator",
    "get_policy_loss",
    "get_kl_estimator",
    "get_offpolicy_correction",
    "offpolicy_correction",
    "behaviour_ratio",
    "tis",
    "mis",
    "icepop",
    "seq_mask_tis",
    "grpo",
    "expand_to_tokens",
    "ppo_clip",
    "sft",
    "aggregate_loss",
    "k1",
    "k2",
    "k3",
    "kl_penalty",
    "masked_sum",
    "masked_mean",
    "entropy_from_logits",
    "logprobs_from_logits",
    "critical_token_entropy",
    "critical_masks",
    "CRITICAL_POSITIONS",
]

F = TypeVar("F", bound=Callable[..., object])

#: A locally reducible statistic: (sum, count), both detached 0-d tensors.
#: Global value = all_reduce(sum) / all_reduce(count).
StatPair = tuple[Tensor, Tensor]

LossAggMode = Literal["token-mean", "seq-mean-token-mean"]
LOSS_AGG_MODES: tuple[str, ...] = ("token-mean", "seq-mean-token-mean")

# --------------------------------------------------------------------------- registries

ADVANTAGE_ESTIMATORS: Registry[Callable[..., Tensor]] = Registry("advantage estimator")
POLICY_LOSSES: Registry[Callable[..., tuple[Tensor, dict[str, Tensor | StatPair]]]] = Registry("policy loss")
KL_ESTIMATORS: Registry[Callable[[Tensor, Tensor], Tensor]] = Registry("KL estimator")
OFFPOLICY_CORRECTIONS: Registry[Callable[..., tuple[Tensor, Tensor]]] = Registry("off-policy correction")


def register_advantage_estimator(name: str) -> Callable[[F], F]:
    """Register ``fn(rewards, group_ids, **options) -> Tensor[N]`` under ``name``."""
    return ADVANTAGE_ESTIMATORS.register(name)


def register_policy_loss(name: str) -> Callable[[F], F]:
    """Register ``fn(logprobs, old_logprobs, advantages, response_mask, **options)
    -> (loss, stats)`` under ``name``.  A loss that off-policy corrections should apply to takes
    ``offpolicy_weights`` (the learner passes it only when ``offpolicy_correction`` is not ``none``)."""
    return POLICY_LOSSES.register(name)


def register_kl_estimator(name: str) -> Callable[[F], F]:
    """Register ``fn(logprobs, ref_logprobs) -> per-token Tensor`` under ``name``."""
    return KL_ESTIMATORS.register(name)


def register_offpolicy_correction(name: str) -> Callable[[F], F]:
    """Register ``fn(old_logprobs, behaviour_logprobs, response_mask, **thresholds) -> (weights, keep)``
    under ``name`` (see :func:`offpolicy_correction`)."""
    return OFFPOLICY_CORRECTIONS.register(name)


def get_advantage_estimator(name: str) -> Callable[..., Tensor]:
    """Look up an advantage estimator; ``ValueError`` listing known names if absent."""
    return ADVANTAGE_ESTIMATORS.lookup(name)


def get_policy_loss(name: str) -> Callable[..., tuple[Tensor, dict[str, Tensor | StatPair]]]:
    """Look up a policy loss; ``ValueError`` listing known names if absent."""
    return POLICY_LOSSES.lookup(name)


def get_kl_estimator(name: str) -> Callable[[Tensor, Tensor], Tensor]:
    """Look up a KL estimator; ``ValueError`` listing known names if absent."""
    return KL_ESTIMATORS.lookup(name)


def get_offpolicy_correction(name: str) -> Callable[..., tuple[Tensor, Tensor]]:
    """Look up an off-policy correction; ``ValueError`` listing known names if absent."""
    return OFFPOLICY_CORRECTIONS.lookup(name)


# --------------------------------------------------------------------------- masked reductions


def masked_sum(x: Tensor, mask: Tensor, dim: int | Sequence[int] | None = None) -> Tensor:
    """Sum of ``x * mask`` over ``dim`` (all dims if None).

    Positions where ``mask == 0`` are *selected away* (``torch.where``), not just
    multiplied by zero, so a padded ``inf``/``nan`` (e.g. a ``-inf`` logprob of a
    pad token) cannot poison the result as ``inf * 0 = nan`` would.
    """
    mask = mask.to(x.dtype) if mask.dtype != torch.bool else mask
    keep = mask if mask.dtype == torch.bool else mask != 0
    weighted = x if mask.dtype == torch.bool else x * mask
    vals = torch.where(keep, weighted, torch.zeros((), dtype=x.dtype, device=x.device))
    return vals.sum() if dim is None else vals.sum(dim=dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | Sequence[int] | None = None) -> Tensor:
    """Mean of ``x`` over the positions where ``mask`` is set (weighted by ``mask``).

    An all-zero mask gives 0 rather than NaN (numerator is 0 and the denominator
    is clamped to a tiny positive number).
    """
    num = masked_sum(x, mask, dim)
    den = masked_sum(torch.ones_like(x), mask, dim)
    return num / den.clamp(min=torch.finfo(num.dtype).tiny if num.is_floating_point() else 1)


# --------------------------------------------------------------------------- advantages


def _group_index(group_ids: Tensor | Sequence[Hashable], n: int, device: torch.device) -> tuple[Tensor, int]:
    """Map arbitrary group ids (tensor or hashables, any order) to 0..G-1."""
    if isinstance(group_ids, Tensor):
        if group_ids.shape != (n,):
            raise ValueError(f"group_ids must have shape ({n},), got {tuple(group_ids.shape)}")
        uniq, inverse = torch.unique(group_ids, return_inverse=True)
        return inverse.to(device), int(uniq.numel())
    ids = list(group_ids)
    if len(ids) != n:
        raise ValueError(f"group_ids has {len(ids)} entries, rewards has {n}")
    table: dict[Hashable, int] = {}
    index = [table.setdefault(g, len(table)) for g in ids]
    return torch.tensor(index, dtype=torch.long, device=device), len(table)


@register_advantage_estimator("grpo")
def grpo(
    rewards: Tensor,
    group_ids: Tensor | Sequence[Hashable],
    *,
    norm_by_std: bool = True,
    eps: float = 1e-6,
) -> Tensor:
    """GRPO group-relative advantage, one scalar per sequence.

    ``A_i = (r_i - mean_g(r)) / (std_g(r) + eps)`` over the responses sharing a
    prompt (R1V3 §3.3, following Shao et al. 2024).  With
    ``norm_by_std=False`` it is ``r_i - mean_g(r)`` (Dr. GRPO, Liu et al. 2025),
    which drops the difficulty re-weighting that std-normalisation introduces.

    * ``std`` is the **unbiased** sample std (divide by ``n - 1``), matching
      ``torch.std`` as used by verl.
    * A group of size 1 gets advantage 0 (verl instead returns the raw reward;
      a lone sample has no baseline, so it carries no group-relative signal).
    * A group whose rewards are all equal gets exactly 0 (no NaN and no
      ``tiny/(tiny+eps)`` residue from float rounding of the mean): these are
      R1V2's "vanishing advantage" groups (R1V2 §3.3.2, SSB).
    * Groups may have different sizes and appear in any order; ``group_ids`` is
      a ``Tensor[N]`` or a sequence of hashables (e.g. prompt uids).

    Computation is done in float64 and cast back to the reward dtype (float32
    for integer rewards). Broadcast to tokens with :func:`expand_to_tokens`.
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    n = rewards.shape[0]
    out_dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
    if n == 0:
        return torch.zeros(0, dtype=out_dtype, device=rewards.device)
    idx, g = _group_index(group_ids, n, rewards.device)
    r = rewards.detach().to(torch.float64)

    count = torch.zeros(g, dtype=torch.float64, device=r.device).index_add_(0, idx, torch.ones_like(r))
    mean = torch.zeros(g, dtype=torch.float64, device=r.device).index_add_(0, idx, r) / count
    centred = r - mean[idx]
    rmax = torch.full((g,), -math.inf, dtype=torch.float64, device=r.device).scatter_reduce(0, idx, r, "amax")
    rmin = torch.full((g,), math.inf, dtype=torch.float64, device=r.device).scatter_reduce(0, idx, r, "amin")
    degenerate = ((count < 2) | (rmax == rmin))[idx]

    if norm_by_std:
        sq = torch.zeros(g, dtype=torch.float64, device=r.device).index_add_(0, idx, centred * centred)
        std = torch.sqrt(sq / (count - 1).clamp(min=1))
        adv = centred / (std[idx] + eps)
    else:
        adv = centred
    adv = torch.where(degenerate, torch.zeros_like(adv), adv)
    return adv.to(out_dtype)


def expand_to_tokens(advantages: Tensor, response_mask: Tensor) -> Tensor:
    """Broadcast per-sequence advantages ``[B]`` to tokens ``[B, T]``, 0 on padding.

    GRPO gives every token of a response its sequence's advantage (outcome
    reward, no per-token credit assignment).
    """
    if advantages.dim() != 1 or response_mask.dim() != 2 or advantages.shape[0] != response_mask.shape[0]:
        raise ValueError(
            f"expected advantages [B] and response_mask [B, T], got {tuple(advantages.shape)}, "
            f"{tuple(response_mask.shape)}"
        )
    return advantages[:, None] * response_mask.to(advantages.dtype)


# --------------------------------------------------------------------------- loss aggregation


def _normaliser(count: float | Tensor, like: Tensor) -> Tensor:
    """Global count as a 0-d tensor in ``like``'s dtype/device (keeps the loss
    dtype; counts are exact in float32 up to 2**24).  Must be > 0."""
    c = torch.as_tensor(count, device=like.device).detach().to(like.dtype)
    if c.numel() != 1:
        raise ValueError("loss normaliser must be a scalar")
    return c.reshape(()).clamp(min=torch.finfo(like.dtype).tiny)


def aggregate_loss(
    per_token_loss: Tensor,
    response_mask: Tensor,
    loss_agg_mode: LossAggMode = "token-mean",
    *,
    loss_token_count: float | Tensor | None = None,
    loss_seq_count: float | Tensor | None = None,
) -> Tensor:
    """Reduce a ``[B, T]`` per-token loss to a scalar with a GLOBAL normaliser.

    * ``"token-mean"``: ``Σ mask·ℓ / loss_token_count`` - every token of the
      global batch weighs the same (verl / DAPO default).
    * ``"seq-mean-token-mean"``: ``Σ_i (Σ_t mask·ℓ / |y_i|) / loss_seq_count`` -
      per-sequence mean, then mean over sequences, as written in R1V3 Eq. 7
      (``1/M Σ_j 1/|y_j| Σ_t``, R1V3 §3.3).  ``|y_i|`` is local to the sequence,
      so it is exact as long as a sequence is never split across micro-batches.

    Because the normaliser is global, the losses of all micro-batches / ranks
    *sum* to the full-batch loss (see the module docstring).
    """
    if loss_agg_mode == "token-mean":
        if loss_token_count is None:
            raise ValueError("token-mean needs loss_token_count (global response-token count)")
        return masked_sum(per_token_loss, response_mask) / _normaliser(loss_token_count, per_token_loss)
    if loss_agg_mode == "seq-mean-token-mean":
        if loss_seq_count is None:
            raise ValueError("seq-mean-token-mean needs loss_seq_count (global sequence count)")
        seq_sum = masked_sum(per_token_loss, response_mask, dim=-1)
        seq_len = masked_sum(torch.ones_like(per_token_loss), response_mask, dim=-1)
        return (seq_sum / seq_len.clamp(min=1)).sum() / _normaliser(loss_seq_count, per_token_loss)
    raise ValueError(f"unknown loss_agg_mode {loss_agg_mode!r}; known: {', '.join(LOSS_AGG_MODES)}")


# --------------------------------------------------------------------------- policy loss


def _pair(s: Tensor, c: Tensor) -> StatPair:
    return s.detach(), c.detach()


@register_policy_loss("ppo_clip")
def ppo_clip(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    clip_ratio_c: float | None = None,
    loss_agg_mode: LossAggMode = "token-mean",
    loss_token_count: float | Tensor | None = None,
    loss_seq_count: float | Tensor | None = None,
    loss_scale: float = 1.0,
    offpolicy_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor | StatPair]]:
    """PPO clipped surrogate (the GRPO policy loss), all inputs ``[B, T]``.

    Per token, with ``ρ = exp(logprobs - old_logprobs)``::

        ℓ = max(-A·ρ, -A·clip(ρ, 1 - clip_low, 1 + clip_high))

    The R1V3 final recipe uses a symmetric 0.2 (R1V3 §3.3); ``clip_high >
    clip_low`` is DAPO's clip-higher, which R1V3 §5.5 found to cause instability
    and anomalous grad norms - kept only as an option.  ``clip_ratio_c`` (> 1)
    enables dual-clip (Ye et al. 2020): for ``A < 0`` the loss is additionally
    capped at ``-A·clip_ratio_c`` so a huge ratio on a bad token cannot blow up.

    ``offpolicy_weights`` (``[B, T]``, detached; from :func:`offpolicy_correction`) multiply ``ℓ``
    per token after the clip: the behaviour-policy correction ``w`` (0 on a masked token). The PPO
    ratio ``ρ`` stays ``π_θ / π_old`` with ``old_logprobs`` the learner's own (proximal) logprobs;
    ``w`` corrects from the engine's behaviour policy to ``π_old`` (decoupled PPO, Hilton et al.
    2021).  A masked token still counts in the global normaliser (it adds 0 to the sum), as in
    IcePop's ``1/Σ|y_i|``.  ``None`` (the default) leaves the loss untouched, bit for bit.

    Aggregation (:func:`aggregate_loss`) divides by the GLOBAL
    ``loss_token_count`` (token-mean) or ``loss_seq_count``
    (seq-mean-token-mean); see the module docstring for what the caller must do
    about gradient accumulation and the rank-averaging all-reduce
    (``loss_scale=dp_world_size`` for DeepSpeed/DDP).

    Returns ``(loss, stats)``; ``loss = loss_scale · aggregated`` is for
    ``backward``.  ``stats`` (all detached):

    * ``pg_loss``: unscaled aggregated loss - sums over micro-batches/ranks to the
      full-batch loss;
    * ``pg_clipfrac``: (#tokens where the clipped branch is strictly active, #tokens)
      - those tokens get zero gradient;
    * ``pg_clipfrac_lower``: (#tokens capped by dual-clip, #tokens) - 0 if off;
    * ``ppo_kl``: (Σ old - new, #tokens), the k1 estimate of KL(π_old‖π_θ);
    * ``ratio_mean``: (Σ ρ, #tokens).

    The ``*_pair`` stats are (sum, count) over the *local* response tokens: the
    global value is sum / count after an all-reduce of both entries.
    """
    if not (logprobs.shape == old_logprobs.shape == advantages.shape == response_mask.shape):
        raise ValueError(
            "logprobs, old_logprobs, advantages, response_mask must share a shape, got "
            f"{tuple(logprobs.shape)}, {tuple(old_logprobs.shape)}, {tuple(advantages.shape)}, "
            f"{tuple(response_mask.shape)}"
        )
    if offpolicy_weights is not None and offpolicy_weights.shape != logprobs.shape:
        raise ValueError(f"offpolicy_weights must have the shape {tuple(logprobs.shape)}, "
                         f"got {tuple(offpolicy_weights.shape)}")
    if clip_ratio_c is not None and clip_ratio_c <= 1.0:
        raise ValueError(f"clip_ratio_c must be > 1 (dual-clip lower bound), got {clip_ratio_c}")

    keep = response_mask != 0
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    # Zero the log-ratio on padding *before* exp so garbage there (−inf, nan)
    # yields neither a nan loss nor a nan gradient; clamp like verl for safety.
    log_ratio = torch.where(keep, logprobs - old_logprobs.detach(), zero).clamp(-20.0, 20.0)
    ratio = torch.exp(log_ratio)
    adv = torch.where(keep, advantages.detach(), zero)

    loss_unclipped = -adv * ratio
    loss_clipped = -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.maximum(loss_unclipped, loss_clipped)
    clipped = (loss_clipped > loss_unclipped) & keep

    if clip_ratio_c is not None:
        cap = -adv * clip_ratio_c
        dual = (adv < 0) & (per_token > cap) & keep
        per_token = torch.where(adv < 0, torch.minimum(per_token, cap), per_token)
    else:
        dual = torch.zeros_like(keep)
    if offpolicy_weights is not None:
        per_token = per_token * torch.where(keep, offpolicy_weights.detach().to(per_token.dtype), zero)

    agg = aggregate_loss(
        per_token,
        response_mask,
        loss_agg_mode,
        loss_token_count=loss_token_count,
        loss_seq_count=loss_seq_count,
    )
    n_tok = keep.sum().to(torch.float64)
    stats: dict[str, Tensor | StatPair] = {
        "pg_loss": agg.detach(),
        "pg_clipfrac": _pair(clipped.sum().to(torch.float64), n_tok),
        "pg_clipfrac_lower": _pair(dual.sum().to(torch.float64), n_tok),
        "ppo_kl": _pair(masked_sum(-log_ratio, keep).to(torch.float64), n_tok),
        "ratio_mean": _pair(masked_sum(ratio, keep).to(torch.float64), n_tok),
    }
    return agg * loss_scale, stats


@register_policy_loss("sft")
def sft(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    loss_agg_mode: LossAggMode = "token-mean",
    loss_token_count: float | Tensor | None = None,
    loss_seq_count: float | Tensor | None = None,
    loss_scale: float = 1.0,
    **_ratio_options: object,
) -> tuple[Tensor, dict[str, Tensor | StatPair]]:
    """Supervised negative log-likelihood of the response tokens (cold-start SFT, R1V3 §3.2; connector-only
    tuning, §3.4), registered as a policy loss so every stage trains through one ``train_step``.

    It ignores ``old_logprobs``, ``advantages`` and the ratio options (clip bounds) that PPO-style
    losses take; aggregation and the global normalisers are those of :func:`ppo_clip`.
    """
    if logprobs.shape != response_mask.shape:
        raise ValueError(f"logprobs and response_mask must share a shape, got {tuple(logprobs.shape)}, "
                         f"{tuple(response_mask.shape)}")
    agg = aggregate_loss(-logprobs, response_mask, loss_agg_mode, loss_token_count=loss_token_count,
                         loss_seq_count=loss_seq_count)
    zero = torch.zeros((), dtype=torch.float64, device=logprobs.device)
    n_tok = (response_mask != 0).sum().to(torch.float64)
    stats: dict[str, Tensor | StatPair] = {"pg_loss": agg.detach(), "pg_clipfrac": _pair(zero, n_tok),
                                           "ppo_kl": _pair(zero, n_tok)}
    return agg * loss_scale, stats


# --------------------------------------------------------------------------- off-policy corrections

#: The LossConfig fields that carry the corrections' thresholds, passed to every correction by name (each
#: takes the ones it uses and ignores the others).
OFFPOLICY_THRESHOLDS: tuple[str, ...] = ("offpolicy_is_cap", "offpolicy_low", "offpolicy_high",
                                         "offpolicy_seq_low", "offpolicy_seq_high")


def behaviour_ratio(old_logprobs: Tensor, behaviour_logprobs: Tensor, response_mask: Tensor) -> tuple[Tensor, Tensor]:
    """``(ρ_behav, keep)``: per token ``ρ_behav = exp(old_logprobs - behaviour_logprobs)`` =
    ``π_old / π_behav`` (detached; the log-ratio zeroed off the mask and clamped to [-20, 20] like the
    PPO ratio, so padding garbage cannot turn into inf/nan), and the boolean ``response_mask``."""
    keep = response_mask != 0
    zero = torch.zeros((), dtype=old_logprobs.dtype, device=old_logprobs.device)
    log_rho = torch.where(keep, old_logprobs.detach() - behaviour_logprobs.detach().to(old_logprobs.dtype), zero)
    return torch.exp(log_rho.clamp(-20.0, 20.0)), keep


def _weighted(rho: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
    return torch.where(keep, rho, torch.zeros_like(rho)), keep


@register_offpolicy_correction("none")
def no_correction(old_logprobs: Tensor, behaviour_logprobs: Tensor, response_mask: Tensor,
                  **_thresholds: float) -> tuple[Tensor, Tensor]:
    """No correction: ``w = 1`` on every response token (the engine's policy is taken to be ``π_old``)."""
    keep = response_mask != 0
    return keep.to(old_logprobs.dtype), keep


@register_offpolicy_correction("tis")
def tis(old_logprobs: Tensor, behaviour_logprobs: Tensor, response_mask: Tensor, *,
        offpolicy_is_cap: float = 2.0, **_thresholds: float) -> tuple[Tensor, Tensor]:
    """Truncated importance sampling (Yao et al. 2025, "Your efficient RL framework secretly brings you
    off-policy RL training"; verl ``rollout_is=token``): ``w = min(ρ_behav, C)``, ``C =
    offpolicy_is_cap``; nothing masked."""
    rho, keep = behaviour_ratio(old_logprobs, behaviour_logprobs, response_mask)
    return _weighted(rho.clamp(max=offpolicy_is_cap), keep)


@register_offpolicy_correction("mis")
def mis(old_logprobs: Tensor, behaviour_logprobs: Tensor, response_mask: Tensor, *,
        offpolicy_high: float = 2.0, **_thresholds: float) -> tuple[Tensor, Tensor]:
    """Token-level masked importance sampling (Liu, Li et al. 2025, "When Speed Kills Stability"):
    ``w = ρ_behav · 1[ρ_behav <= offpolicy_high]``, i.e. like TIS but a token above the cap is dropped
    instead of truncated. One-sided: only over-weighted tokens (the engine gave them far less probability
    than the learner) are masked; a small ``ρ_behav`` is kept and just weighs little."""
    rho, keep = behaviour_ratio(old_logprobs, behaviour_logprobs, response_mask)
    return _weighted(rho, keep & (rho <= offpolicy_high))


@register_offpolicy_correction("icepop")
def icepop(old_logprobs: Tensor, behaviour_logprobs: Tensor, response_mask: Tensor, *,
           offpolicy_low: float = 0.5, offpolicy_high: float = 2.0, **_thresholds: float) -> tuple[Tensor, Tensor]:
    """IcePop (inclusionAI Ling team, Ring-1T, 2025): ``w = M(ρ_behav)`` with ``M(k) = k`` for ``k`` in
    ``[offpolicy_low, offpolicy_high]`` and 0 outside. Two-sided: unlike ``mis``, a token the learner
    finds far *less* likely than the engine did (``ρ_behav < offpolicy_low``) is dropped as well.
    (The write-up's bounds are [0.5, 5.0].)"""
    rho, keep = behaviour_ratio(old_logprobs, behaviour_logprobs, response_mask)
    return _weighted(rho, keep & (rho >= offpolicy_low) & (rho <= offpolicy_high))


@register_offpolicy_correction("seq_mask_tis")
def seq_mask_tis(old_logprobs: Tensor, behaviour_logprobs: Tensor, response_mask: Tensor, *,
                 offpolicy_is_cap: float = 2.0, offpolicy_seq_low: float = 0.999, offpolicy_seq_high: float = 1.001,
                 **_thresholds: float) -> tuple[Tensor, Tensor]:
    """Sequence-level geometric rejection + token TIS (verl's Geo-RS, ``rollout_rs=geometric``, with
    ``rollout_is=token``): a response whose geometric-mean ratio ``ρ_geo = exp(mean_t log ρ_behav,t)``
    over its tokens lies outside ``[offpolicy_seq_low, offpolicy_seq_high]`` is masked whole; the tokens
    of the others get ``w = min(ρ_behav, offpolicy_is_cap)``. The geometric mean is length-normalised,
    hence verl's tight default bounds (±0.1%)."""
    rho, keep = behaviour_ratio(old_logprobs, behaviour_logprobs, response_mask)
    geo = torch.exp(masked_mean(torch.log(rho), keep, dim=-1))
    seq_ok = (geo >= offpolicy_seq_low) & (geo <= offpolicy_seq_high)
    return _weighted(rho.clamp(max=offpolicy_is_cap), keep & seq_ok[:, None])


def offpolicy_correction(
    name: str,
    old_logprobs: Tensor,
    behaviour_logprobs: Tensor,
    response_mask: Tensor,
    has_behaviour: Tensor | None = None,
    **thresholds: float,
) -> tuple[Tensor, dict[str, StatPair]]:
    """Per-token weights for :func:`ppo_clip`'s ``offpolicy_weights`` and the off-policy statistics.

    ``old_logprobs`` are the learner's (proximal) logprobs of the sampled tokens, ``behaviour_logprobs``
    the engine's as it sampled them (``TrainSample.rollout_logprobs``), ``has_behaviour`` (``[B, T]``
    or ``[B]`` bool) where the latter exist; all ``[B, T]``. The registered correction ``name`` gives the
    weights of the tokens that have behaviour logprobs; a response token without them (an SFT target,
    a reference solution) gets weight 1; padding 0. ``thresholds``: :data:`OFFPOLICY_THRESHOLDS`.

    Stats, ``(sum, count)`` over the response tokens that have behaviour logprobs (all-reduce both):

    * ``is_ratio``: Σ ρ_behav;
    * ``masked``: #tokens the correction masked (weight 0);
    * ``behaviour_kl``: Σ k3 = Σ (ρ - log ρ - 1), the k3 estimate of KL(π_behav ‖ π_old) on tokens
      sampled from π_behav (non-negative, low variance; verl's rollout-correction ``k3`` metric).
    """
    keep = response_mask != 0
    if has_behaviour is None:
        with_behaviour = keep
    else:
        has = has_behaviour.to(torch.bool)
        with_behaviour = keep & (has[:, None] if has.dim() == 1 else has)
    weights, kept = get_offpolicy_correction(name)(old_logprobs, behaviour_logprobs, with_behaviour, **thresholds)
    weights = torch.where(with_behaviour, weights.detach(), keep.to(weights.dtype))
    rho, _ = behaviour_ratio(old_logprobs, behaviour_logprobs, with_behaviour)
    log_rho = torch.log(rho)
    kl = torch.where(with_behaviour, rho - log_rho - 1.0, torch.zeros_like(rho))
    n = with_behaviour.sum().to(torch.float64)
    stats = {"is_ratio": _pair(masked_sum(rho, with_behaviour).to(torch.float64), n),
             "masked": _pair((with_behaviour & ~kept).sum().to(torch.float64), n),
             "behaviour_kl": _pair(kl.sum().to(torch.float64), n)}
    return weights, stats


# --------------------------------------------------------------------------- KL to a reference


@register_kl_estimator("k1")
def k1(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """``log π_θ - log π_ref``: unbiased for KL(π_θ‖π_ref) on π_θ samples but
    high-variance and can be negative per token.  The form written in R1V3 Eq. 7."""
    return logprobs - ref_logprobs


@register_kl_estimator("k2")
def k2(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """``½(log π_θ - log π_ref)²``: non-negative, biased, low variance (Schulman 2020)."""
    d = logprobs - ref_logprobs
    return 0.5 * d * d


@register_kl_estimator("k3")
def k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """``exp(ref - logp) - (ref - logp) - 1``: unbiased, non-negative, low variance
    (Schulman 2020; verl ``low_var_kl``, GRPO paper).  As in verl the log-ratio is
    clamped to [-20, 20] and the result to [-10, 10] so a single token where the
    policy has drifted far cannot produce inf/huge gradients."""
    d = (ref_logprobs - logprobs).clamp(-20.0, 20.0)
    return (torch.exp(d) - d - 1.0).clamp(-10.0, 10.0)


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, kind: str = "k3") -> Tensor:
    """Per-token KL(π_θ‖π_ref) estimate with the registered estimator ``kind``.

    The R1V3 final recipe applies **no** KL penalty (R1V3 §3.3); a
    coefficient of 0 (and skipping the reference forward) is the caller's call.
    Mask/aggregate the result with the same mode as the policy loss.
    """
    return get_kl_estimator(kind)(logprobs, ref_logprobs)


# --------------------------------------------------------------------------- logits -> logprobs / entropy


def _row_chunks(n: int, chunk_rows: int | None) -> list[slice]:
    step = n if not chunk_rows or chunk_rows <= 0 else chunk_rows
    return [slice(i, min(i + step, n)) for i in range(0, n, max(step, 1))]


def logprobs_from_logits(logits: Tensor, labels: Tensor, *, chunk_rows: int | None = 1024) -> Tensor:
    """``log softmax(logits)[label]`` for ``logits [..., V]``, ``labels [...]`` → ``[...]``.

    Computed as ``logits[label] - logsumexp(logits)`` in float32 (or float64 if
    given), never materialising the ``[..., V]`` log-softmax; rows are processed
    in chunks of ``chunk_rows`` so the float32 temporaries of a bf16 ``[B, T, V]``
    input stay bounded (V ≈ 152k for Qwen/InternVL vocabularies).  Differentiable.

    ``labels`` must be aligned with ``logits`` by the caller (position t of the
    logits predicts ``labels[t]``, i.e. logits already shifted by one).
    """
    v = logits.shape[-1]
    flat = logits.reshape(-1, v)
    lab = labels.reshape(-1, 1).to(torch.long)
    calc_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    parts = []
    for sl in _row_chunks(flat.shape[0], chunk_rows):
        chunk = flat[sl].to(calc_dtype)
        parts.append(chunk.gather(-1, lab[sl]).squeeze(-1) - torch.logsumexp(chunk, dim=-1))
    out = torch.cat(parts) if parts else flat.new_zeros(0, dtype=calc_dtype)
    return out.reshape(labels.shape)


def entropy_from_logits(logits: Tensor, *, chunk_rows: int | None = 1024) -> Tensor:
    """Token entropy ``H = logsumexp(l) - Σ softmax(l)·l`` (nats) of ``[..., V]`` → ``[...]``.

    The logsumexp form is exact and stable for large/shifted logits (no log of
    tiny probabilities).  Float32 math, row-chunked like
    :func:`logprobs_from_logits`; differentiable (for an entropy bonus), but call
    it under ``torch.no_grad()`` for monitoring to save memory.  R1V3 §6.5 defines
    token entropy this way (mean over vocabulary distribution at each step).
    """
    v = logits.shape[-1]
    flat = logits.reshape(-1, v)
    calc_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    parts = []
    for sl in _row_chunks(flat.shape[0], chunk_rows):
        chunk = flat[sl].to(calc_dtype)
        # Shift by the row max first: both terms are then O(log V) instead of
        # O(|logit|), so their difference does not cancel catastrophically.
        chunk = chunk - chunk.amax(dim=-1, keepdim=True).detach()
        p = torch.softmax(chunk, dim=-1)
        parts.append(torch.logsumexp(chunk, dim=-1) - (p * chunk).sum(-1))
    out = torch.cat(parts) if parts else flat.new_zeros(0, dtype=calc_dtype)
    return out.reshape(logits.shape[:-1])


Marker = Sequence[int] | int


def critical_masks(
    token_ids: Tensor,
    response_mask: Tensor,
    markers: Collection[Marker],
    separators: Collection[int] = (),
) -> tuple[Tensor, Tensor]:
    """(first, after): boolean masks of the positions where a critical marker starts a reflection, and of
    the positions right after such a marker's last token.

    A marker is a token-id sequence (a bare id is a one-token marker): one spelling of a critical word or
    phrase (" Wait", " let me", ...). It occurs at ``t`` when its *whole* sequence is found there, inside
    the response (``response_mask`` set at every token of it); a word whose first token appears without the
    rest of its marker does not count. Where several markers start at ``t`` the longest is the occurrence.
    An occurrence is a *continuation*, and does not count, when only ``separators`` (punctuation ids)
    stand between it and the end of an earlier occurrence: in "Wait, let me" only " Wait" starts the
    reflection. ``first`` marks the first token of every counted occurrence; ``after`` the position after
    its last token, when that position is still in the response.
    """
    if token_ids.shape != response_mask.shape or token_ids.dim() != 2:
        raise ValueError("token_ids and response_mask must share a (batch, length) shape")
    keep = response_mask != 0
    b, t = token_ids.shape
    if t == 0:
        return keep.clone(), keep.clone()
    seqs = {(int(m),) if isinstance(m, int) else tuple(int(i) for i in m) for m in markers}
    start_len = torch.zeros(b, t, dtype=torch.long, device=token_ids.device)
    covered = torch.zeros(b, t, dtype=torch.bool, device=token_ids.device)
    for seq in sorted(s for s in seqs if 0 < len(s) <= t):
        n, span = len(seq), t - len(seq) + 1
        hit = torch.ones(b, span, dtype=torch.bool, device=token_ids.device)
        for k, tok in enumerate(seq):
            hit &= (token_ids[:, k:k + span] == tok) & keep[:, k:k + span]
        hit = torch.nn.functional.pad(hit, (0, n - 1))
        start_len = torch.where(hit, start_len.clamp(min=n), start_len)
        for k in range(n):
            covered[:, k:] |= hit[:, :t - k]
    sep = keep & torch.isin(token_ids, torch.as_tensor(sorted({int(i) for i in separators}), dtype=token_ids.dtype,
                                                       device=token_ids.device))
    idx = torch.arange(t, device=token_ids.device).expand(b, t)
    none = torch.full_like(idx, -1)
    # the latest marker token and the latest position that is neither marker nor separator, before t
    last_covered = torch.where(covered, idx, none).cummax(dim=1).values
    last_break = torch.where(covered | sep, none, idx).cummax(dim=1).values
    last_covered = torch.nn.functional.pad(last_covered[:, :-1], (1, 0), value=-1)
    last_break = torch.nn.functional.pad(last_break[:, :-1], (1, 0), value=-1)
    first = (start_len > 0) & ~(last_covered > last_break)
    after = torch.zeros_like(first)
    for n in sorted(set(start_len[first].tolist())):
        if n < t:
            after[:, n:] |= (first & (start_len == n))[:, :t - n]
    return first, after & keep


def critical_token_entropy(
    entropy: Tensor,
    token_ids: Tensor,
    response_mask: Tensor,
    markers: Collection[Marker],
    separators: Collection[int] = (),
    positions: str = "first",
) -> StatPair:
    """(Σ entropy, count) over the reflection starts of critical reasoning markers (`critical_masks`).

    R1V3 §1/§5.1 monitors "entropy at critical reasoning initiation points like
    'Wait', 'Alternatively'" (and §6.2's 'Hmm') for checkpoint selection but does
    not say at which position.  ``positions="first"``: the entropy of the
    distribution **from which the marker's first token was sampled**, i.e. the
    decision to start a reflection - high when the model genuinely hesitates,
    ~0 when it recites a memorised pattern.  ``positions="after"``: that of the
    token right after the marker (what the reflection goes on with).  So
    ``entropy[b, t]`` must be aligned like ``logprobs_from_logits(logits, labels)``:
    computed from the logits row that scored ``token_ids[b, t]``.

    Only positions with ``response_mask`` set count.  Returns detached float64
    (sum, count) so the caller can all-reduce both and report the mean over all
    occurrences (sum / count).
    """
    if positions not in CRITICAL_POSITIONS:
        raise ValueError(f"positions must be one of {', '.join(CRITICAL_POSITIONS)}, got {positions!r}")
    if not (entropy.shape == token_ids.shape == response_mask.shape):
        raise ValueError("entropy, token_ids and response_mask must share a shape")
    first, after = critical_masks(token_ids, response_mask, markers, separators)
    hit = first if positions == "first" else after
    return _pair(masked_sum(entropy.to(torch.float64), hit), hit.sum().to(torch.float64))
