"""Name registries for the pure algorithm functions (advantage estimators, policy losses, KL kinds,
loss-aggregation modes).

Pattern: verl ``core_algos.register_adv_est`` / ``get_adv_estimator_fn``. Where we differ: an
unknown name is a ``ValueError`` that names the closest valid name (difflib), registering a name
twice is an error instead of a silent overwrite, and one function can carry aliases
(``"k3"`` / ``"low_var_kl"``).

The registries are filled once, at import time, by decorators in this package. Users may add their
own entries (``ADV_ESTIMATORS.register("my_est")``) before the trainer starts; nothing in mtprl
mutates them afterwards.
"""

from __future__ import annotations

import difflib
from typing import Callable, Generic, Iterable, TypeVar

F = TypeVar("F", bound=Callable)

__all__ = ["Registry", "unknown_name_message"]


def unknown_name_message(kind: str, name: object, valid: Iterable[str]) -> str:
    """Error text for an unknown ``name`` of the given ``kind``: the closest valid name and all of them.

    >>> unknown_name_message("advantage estimator", "grop", ["grpo", "rloo"])
    "unknown advantage estimator 'grop'; did you mean 'grpo'? Valid names: grpo, rloo"
    """
    valid = sorted(valid)
    close = difflib.get_close_matches(str(name), valid, n=1, cutoff=0.0) if valid else []
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown {kind} {name!r}{hint} Valid names: {', '.join(valid)}"


class Registry(Generic[F]):
    """A name -> function table with aliases and closest-name errors.

    ``kind`` is the human name used in error messages ("advantage estimator", "KL penalty", ...).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, F] = {}

    def register(self, name: str, *aliases: str) -> Callable[[F], F]:
        """Decorator registering ``fn`` under ``name`` and every alias; a taken name is a ValueError."""

        def decorator(fn: F) -> F:
            for key in (name, *aliases):
                if not isinstance(key, str) or not key:
                    raise ValueError(f"{self.kind} names must be non-empty strings, got {key!r}")
                if key in self._entries and self._entries[key] is not fn:
                    raise ValueError(
                        f"{self.kind} {key!r} is already registered to {self._entries[key].__qualname__}; "
                        "pick another name"
                    )
                self._entries[key] = fn
            return fn

        return decorator

    def get(self, name: str) -> F:
        """The function registered under ``name``; unknown names raise ValueError with the closest one."""
        if name not in self._entries:
            raise ValueError(unknown_name_message(self.kind, name, self._entries))
        return self._entries[name]

    def names(self) -> tuple[str, ...]:
        """All registered names (aliases included), sorted."""
        return tuple(sorted(self._entries))

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, names={list(self.names())})"
