"""``optimizer.state`` that says when it was changed: the O(1) per-step check behind adoption.

torch keeps per-parameter state in ``optimizer.state``, a ``defaultdict(dict)`` that anyone may
write: ``load_state_dict``, ZeroRedundancyOptimizer (``self.optim.state[param] = ...``, then
``self.optim.state[param][name] = ...``), a user resetting one parameter (``del opt.state[p]``,
``opt.state[p].clear()``). torch reads it afresh at every step, so it follows all of these. A
step that writes through pointer tables gathered once must notice them, and checking every
entry at every step would cost a Python loop over the parameters.

So the mapping and every per-parameter dict count their own mutations in one shared counter,
:data:`VERSION`. A step compares one integer with the value it saw when it last gathered
pointers; any difference sends it through the (rare) re-adoption path. The counter is global,
not per optimizer, so that pickling needs no back references; a change in another optimizer's
state costs this one a re-check, never a wrong result.

What is not seen: changes inside a state tensor (``opt.state[p]["exp_avg"].mul_(0)`` is seen by
the kernel anyway: it reads the same memory) and storage swaps of a state tensor
(``set_``/``.data =``): those leave the optimizer's own buffer, which keeps being updated.

``state_dict()`` must hold plain dicts (``torch.load(weights_only=True)`` refuses other
classes): :func:`plain` converts.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # typing.Self needs Python 3.11; annotations are not evaluated
    from typing_extensions import Self

#: Bumped by every mutation of any tracked state: ``VERSION[0]``.
VERSION = [0]


def _bump() -> None:
    VERSION[0] += 1


class _Counted:
    """The mutations a dict and a defaultdict share, each bumping :data:`VERSION` first."""

    def __delitem__(self, key: Any) -> None:
        _bump()
        super().__delitem__(key)  # type: ignore[misc]

    def clear(self) -> None:
        _bump()
        super().clear()  # type: ignore[misc]

    def pop(self, *args: Any) -> Any:
        _bump()
        return super().pop(*args)  # type: ignore[misc]

    def popitem(self) -> Any:
        _bump()
        return super().popitem()  # type: ignore[misc]


class ParamState(_Counted, dict):
    """One parameter's state (``{"step": ..., "exp_avg": ...}``): a dict that bumps
    :data:`VERSION` on every mutation."""

    def __setitem__(self, key: Any, value: Any) -> None:
        _bump()
        super().__setitem__(key, value)

    def __ior__(self, other: Any) -> Self:  # type: ignore[misc]
        _bump()
        super().update(other)
        return self

    def setdefault(self, key: Any, default: Any = None) -> Any:
        _bump()
        return super().setdefault(key, default)

    def update(self, *args: Any, **kwargs: Any) -> None:
        _bump()
        super().update(*args, **kwargs)


def _tracked(value: Any) -> Any:
    """A mapping stored as a parameter's state becomes a :class:`ParamState` (same items)."""
    if isinstance(value, Mapping) and not isinstance(value, ParamState):
        return ParamState(value)
    return value


class TrackedState(_Counted, defaultdict):
    """``optimizer.state``: a ``defaultdict(ParamState)`` that bumps :data:`VERSION` on every
    mutation and stores any mapping assigned to it as a :class:`ParamState`."""

    def __init__(self, items: Iterable[tuple[Any, Any]] | Mapping[Any, Any] = ()) -> None:
        super().__init__(ParamState)
        pairs = items.items() if isinstance(items, Mapping) else items
        for key, value in pairs:
            dict.__setitem__(self, key, _tracked(value))
        _bump()

    def __reduce__(self) -> Any:
        # defaultdict's reduce passes default_factory to __init__; ours takes the items
        return (TrackedState, (list(self.items()),))

    def __missing__(self, key: Any) -> ParamState:
        _bump()
        value = ParamState()
        dict.__setitem__(self, key, value)
        return value

    def __setitem__(self, key: Any, value: Any) -> None:
        _bump()
        super().__setitem__(key, _tracked(value))

    def __ior__(self, other: Any) -> Self:  # type: ignore[misc]
        self.update(other)
        return self

    def setdefault(self, key: Any, default: Any = None) -> Any:
        _bump()
        return super().setdefault(key, _tracked(default))

    def update(self, *args: Any, **kwargs: Any) -> None:
        _bump()
        for key, value in dict(*args, **kwargs).items():
            super().__setitem__(key, _tracked(value))


def plain(state_dict: Any) -> Any:
    """``state_dict`` with each per-parameter :class:`ParamState` as a plain dict (the tensors
    themselves are shared, as torch's ``state_dict()`` shares them)."""
    if isinstance(state_dict, dict) and isinstance(state_dict.get("state"), dict):
        state_dict = dict(state_dict)
        state_dict["state"] = {key: dict(value) if isinstance(value, ParamState) else value
                               for key, value in state_dict["state"].items()}
    return state_dict
