"""The learner's end of weight sync: which parameter groups to send, and who packs bytes.

Only groups that can have changed since the last sync are sent: a group trainable now, or one that was
trainable at the previous sync (it may have trained after that sync and before it was frozen). A group
frozen since the engines loaded the checkpoint, or frozen and already sent unchanged, is skipped
(OpenRLHF syncs only `requires_grad` parameters; this keeps that right across stages that change the
trainable groups). Under ZeRO-3 every rank walks the same gathers; only rank 0 packs and sends.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass

import torch

from learner.types import GROUPS
from rollout.weight_transport import EngineLink, WeightTransport


@dataclass(frozen=True)
class SyncReport:
    """One sync as the learner saw it; nbytes and seconds give perf/sync_GB_per_s."""

    version: int
    groups: tuple[str, ...]
    tensors: int
    nbytes: int
    seconds: float


class WeightSender:
    """`stable`: the tensors `named_weights` yields stay valid for the whole sync (not ZeRO-3 gathers),
    so the transport may hold them instead of copying each as it arrives."""

    def __init__(self, transport: WeightTransport, rank: int, stable: bool = False):
        self.transport, self.rank, self.stable = transport, rank, stable
        self._trainable_at_last_sync: frozenset[str] = frozenset()

    def forget(self) -> None:
        """The engines are about to receive a whole new model: nothing earlier is owed to them."""
        self._trainable_at_last_sync = frozenset()

    def groups_to_send(self, trainable: Collection[str]) -> tuple[str, ...]:
        return tuple(sorted(set(trainable) | self._trainable_at_last_sync))

    def sync(self, version: int, trainable: Collection[str],
             named_weights: Callable[[Collection[str]], Iterable[tuple[str, torch.Tensor]]],
             link: EngineLink | None, everything: bool = False) -> SyncReport:
        """`named_weights(groups)` yields the groups' full tensors (each valid until the next, as under
        ZeRO-3); `link` reaches the engines and is needed on rank 0 only. `everything` sends every group
        (after a failed sync, when some engines may hold the new version and others not)."""
        report = self._send(version, GROUPS if everything else self.groups_to_send(trainable), named_weights, link)
        self._trainable_at_last_sync = frozenset(trainable)
        return report

    def push(self, version: int, named_weights: Callable[[Collection[str]], Iterable[tuple[str, torch.Tensor]]],
             link: EngineLink | None) -> SyncReport:
        """Every group, as the version the other engines hold, to engines that started from the run's base
        weights (a replaced rollout actor); the bookkeeping of what the other engines hold is untouched."""
        return self._send(version, GROUPS, named_weights, link)

    def _send(self, version, groups, named_weights, link) -> SyncReport:
        start = time.perf_counter()
        groups = tuple(groups)
        counted = _Counted(named_weights(groups))
        if self.rank == 0:
            if link is None:
                raise ValueError("rank 0 needs the engine link to send weights")
            try:
                self.transport.connect_sender(link)
                reported = self.transport.send(version, counted, link, stable=self.stable)
            except BaseException:  # the other ranks are in the gathers: take part in the rest, then fail
                for _ in counted:
                    pass
                raise
            if any(v != version for v in reported):
                raise RuntimeError(f"weight sync incomplete: sent version {version}, engines report {reported}")
        else:
            for _ in counted:  # take part in every gather; pack nothing
                pass
        return SyncReport(version, groups, counted.tensors, counted.nbytes, time.perf_counter() - start)


class _Counted:
    def __init__(self, items: Iterable[tuple[str, torch.Tensor]]):
        self._items, self.tensors, self.nbytes = items, 0, 0

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in self._items:
            self.tensors += 1
            self.nbytes += tensor.numel() * tensor.element_size()
            yield name, tensor
