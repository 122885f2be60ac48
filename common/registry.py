"""Name -> implementation registries (stage kinds, losses, schedules, transports, rewards, trackers...).

A top-level leaf package, not a module of one room: every room registers things by name, and a helper in
services/ or learner/ would make the others import that room (and its torch) just to register.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class Registry(dict[str, T]):
    """A dict of named choices that refuses a second entry under a taken name and whose lookup of an
    unknown name lists the choices, so a typo in a config names what it could have been."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def register(self, name: str) -> Callable[[T], T]:
        def deco(entry: T) -> T:
            if name in self:
                raise ValueError(f"{self.kind} {name!r} is already registered; known: {self.choices()}")
            self[name] = entry
            return entry

        return deco

    def lookup(self, name: str) -> T:
        if name not in self:
            raise ValueError(f"unknown {self.kind} {name!r}; known: {self.choices()}")
        return self[name]

    def choices(self) -> str:
        return ", ".join(sorted(self)) or "<none>"
