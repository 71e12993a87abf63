"""The nested mapping of arrays under ``adamgen.Container``, and the structure helpers the API needs.

:class:`Tree` is the structure alone; :class:`adamgen.Container` adds Ivy's methods. The split
keeps the dependencies one way: the generic runtime works on any :class:`Tree` (it takes the
caller's class to rebuild results), and only the Ivy bindings, which ``Tree``'s methods
call, know the Tree class.

A Tree is immutable: inner nodes are Trees, leaves are arrays (or, for
hyperparameter Trees such as ``step``, Python or NumPy scalars). The API works on the
flat form: :meth:`Tree.leaves` lists ``(path, leaf)`` pairs depth first, the kernel runs
leaf by leaf, and :meth:`Tree.from_leaves` rebuilds the tree. :func:`key_mismatch` names
the keys two Trees do not share, which Ivy silently mixes up and adamgen refuses.

Keys are strings. Any string is a valid key, including one that clashes with a method
(``"keys"``, ``"adam_update"``): ``c["keys"]`` always reaches the leaf, and ``c.name`` reaches
it whenever ``name`` is not an attribute of the class.

This module is part of the runtime: it imports NumPy and the standard library only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np

from ..errors import ArgumentTypeError, ArgumentValueError

__all__ = ["Path", "Tree", "format_path", "key_mismatch"]

Path = tuple[str, ...]
_INDENT = "    "
_MISSING = object()


class Tree(Mapping[str, Any]):
    """A nested, insertion-ordered, immutable mapping of arrays, as ``ivy.Container``.

    Construction: ``Tree(a=x, b=Tree(c=y))``, ``Tree({"a": x, "b": {"c": y}})``
    or both (keyword leaves come after, and win over, the mapping's, as with ``dict``). Nested
    mappings become Trees; lists and tuples become arrays as :func:`adamgen.array` makes
    them (Python floats give float32); ndarrays, scalars and other leaves are kept as given, not
    copied, so adamgen's ``out=`` writes into a leaf array reach the caller's buffer.

    Equality compares keys (in any order) and leaves with ``np.array_equal`` (a leaf is always
    equal to itself, even holding NaN), so ``==`` never raises on array leaves.
    """

    __slots__ = ("_data", "_structure")

    def __init__(self, data: Mapping[str, Any] | Iterable[tuple[str, Any]] = (), /,
                 **leaves: Any) -> None:
        items = dict(data)
        items.update(leaves)
        for key in items:
            if not isinstance(key, str):
                raise ArgumentTypeError(f"Container keys must be strings, got {key!r}")
        object.__setattr__(self, "_data", {k: self._as_node(v) for k, v in items.items()})
        object.__setattr__(self, "_structure", None)

    @staticmethod
    def leaf_from_sequence(value: Any) -> Any:
        """A list or tuple leaf as an array (``adamgen.Container`` uses Ivy's dtype rules)."""
        return np.asarray(value)

    def _as_node(self, value: Any) -> Any:
        """Convert one constructor value: mappings nest, lists and tuples become arrays."""
        if isinstance(value, Tree):
            return value
        if isinstance(value, Mapping):
            return type(self)(value)
        if isinstance(value, (list, tuple)):
            return self.leaf_from_sequence(value)
        return value

    @classmethod
    def _wrap(cls, data: dict[str, Any]) -> Tree:
        """A Tree over ``data`` as it is: no key checks, no leaf conversion, no copy."""
        self = object.__new__(cls)
        object.__setattr__(self, "_data", data)
        object.__setattr__(self, "_structure", None)
        return self

    # -- the Mapping interface --------------------------------------------------------------

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def __getattr__(self, name: str) -> Any:
        """``c.a`` for a leaf ``a``; only reached when ``a`` is not an attribute of the class."""
        # Dunders stay attribute errors so that copy, pickle and NumPy's protocol probes never
        # mistake a leaf for a protocol method; "_data" may be unset during unpickling.
        if name.startswith("__") or name in self.__slots__:
            raise AttributeError(name)
        try:
            return self._data[name]
        except KeyError:
            raise AttributeError(f"Container has no leaf or attribute {name!r} "
                                 f"(keys: {', '.join(map(repr, self._data))})") from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Container is immutable; build a new one (for example with "
                             "map_leaves or from_leaves)")

    def __delattr__(self, name: str) -> None:
        self.__setattr__(name, None)

    def __dir__(self) -> list[str]:
        """Class attributes, plus the keys that ``c.key`` reaches (for tab completion)."""
        names = set(super().__dir__())
        return sorted(names | {k for k in self._data if k.isidentifier() and k not in names})

    def __reduce__(self) -> tuple[type[Tree], tuple[dict[str, Any]]]:
        return type(self), (self._data,)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Mapping):
            return NotImplemented
        if not isinstance(other, Tree):
            try:
                other = Tree(other)
            except TypeError:  # a key that is not a string
                return False
        if self._data.keys() != other._data.keys():
            return False
        for key, mine in self._data.items():
            theirs = other._data[key]
            if isinstance(mine, Tree) != isinstance(theirs, Tree):
                return False
            if isinstance(mine, Tree):
                if mine != theirs:
                    return False
            elif mine is not theirs and not np.array_equal(mine, theirs):
                return False
        return True

    __hash__ = None  # type: ignore[assignment]  # leaves are mutable arrays

    # -- printing ---------------------------------------------------------------------------

    def __repr__(self) -> str:
        """The nesting as Ivy prints it: braces, ``key: leaf`` lines, 4 spaces a level."""
        return "\n".join(self._repr_lines(""))

    def _repr_lines(self, indent: str) -> list[str]:
        if not self._data:
            return ["{}"]
        inner = indent + _INDENT
        lines = ["{"]
        for n, (key, value) in enumerate(self._data.items()):
            head = f"{inner}{_format_key(key)}: "
            if isinstance(value, Tree):
                body = value._repr_lines(inner)
                body[0] = head + body[0]
            else:
                # Continuation lines of a multi-line leaf shift right by the head's width, so
                # an array's rows stay aligned under its opening bracket.
                first, *rest = repr(value).split("\n")
                body = [head + first] + [" " * len(head) + line for line in rest]
            if n < len(self._data) - 1:
                body[-1] += ","
            lines.extend(body)
        lines.append(indent + "}")
        return lines

    # -- structure --------------------------------------------------------------------------

    def leaves(self) -> list[tuple[Path, Any]]:
        """Every ``(path, leaf)`` pair, depth first, in insertion order.

        Empty sub-Trees have no leaves and so do not appear.
        """
        out: list[tuple[Path, Any]] = []
        self._collect(out, ())
        return out

    def _collect(self, out: list[tuple[Path, Any]], prefix: Path) -> None:
        for key, value in self._data.items():
            if isinstance(value, Tree):
                value._collect(out, (*prefix, key))
            else:
                out.append(((*prefix, key), value))

    def leaf_paths(self) -> list[Path]:
        """The path of every leaf, in the order of :meth:`leaves`."""
        return [path for path, _ in self.leaves()]

    @classmethod
    def from_leaves(cls, paths_and_values: Iterable[tuple[Path, Any]]) -> Tree:
        """Rebuild a Tree from ``(path, leaf)`` pairs, the inverse of :meth:`leaves`.

        Leaves are kept as given (no conversion, no copy); keys keep first-seen order.

        Raises:
            ValueError: for an empty or repeated path, or a path that runs through a leaf.
        """
        root: dict[str, Any] = {}
        for path, value in paths_and_values:
            if not path:
                raise ArgumentValueError("a leaf path must have at least one key")
            node = root
            for depth, key in enumerate(path[:-1]):
                node = node.setdefault(key, {})
                if not isinstance(node, dict):
                    raise ArgumentValueError(f"path {format_path(path)} runs through the leaf "
                                             f"{format_path(path[:depth + 1])}")
            if path[-1] in node:
                raise ArgumentValueError(f"path {format_path(path)} is given twice or is a "
                                         "prefix of another path")
            node[path[-1]] = _Leaf(value)
        return cls._from_tree(root)

    @classmethod
    def _from_tree(cls, tree: dict[str, Any]) -> Tree:
        return cls._wrap({k: v.value if isinstance(v, _Leaf) else cls._from_tree(v)
                          for k, v in tree.items()})

    def structure_key(self) -> tuple[tuple[str, Any], ...]:
        """A hashable description of the nesting: keys, order and depth, not the leaves.

        Two Trees with equal keys give equal ``structure_key()``, and then their
        :meth:`leaves` line up position by position. The same keys in another order give a
        different key, yet :func:`key_mismatch` finds nothing: pair such leaves by path.
        Computed once per Tree (the structure never changes).
        """
        if self._structure is None:
            key = tuple((k, v.structure_key() if isinstance(v, Tree) else None)
                        for k, v in self._data.items())
            object.__setattr__(self, "_structure", key)
        return self._structure

    def map_leaves(self, fn: Callable[[Any], Any]) -> Tree:
        """A Tree of the same structure with ``fn(leaf)`` for every leaf."""
        return self._wrap({k: v.map_leaves(fn) if isinstance(v, Tree) else fn(v)
                           for k, v in self._data.items()})

class _Leaf:
    """Marks a leaf inside :meth:`Tree.from_leaves`'s scratch tree, so that a leaf that is
    itself a dict is never mistaken for a branch."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


def _format_key(key: str) -> str:
    """A key as printed: bare when it is an identifier (as Ivy prints), else quoted."""
    return key if key.isidentifier() else repr(key)


def format_path(path: Path) -> str:
    """A path as messages show it: ``b.c``, or ``b['with space']`` for a non-identifier key."""
    text = ""
    for key in path:
        if not key.isidentifier():
            text += f"[{key!r}]"
        else:
            text += f".{key}" if text else key
    return text


def key_mismatch(a: Tree, b: Tree, *,
                 names: tuple[str, str] = ("the first", "the second")) -> str | None:
    """Name the keys in one Tree but not the other, or return ``None`` if they match.

    Differences are reported at the shallowest level: a whole missing subtree is one path.
    A key that holds a leaf in one and a sub-Tree in the other is a mismatch too. Key
    order is not compared (pair leaves by path).

    Args:
        a, b: the Trees to compare.
        names: what to call ``a`` and ``b`` in the message, e.g. ``("w", "dcdw")``.
    """
    only_a = _only_in(a, b, ())
    only_b = _only_in(b, a, ())
    kinds = _kind_clashes(a, b, ())
    if not (only_a or only_b or kinds):
        return None
    name_a, name_b = names
    parts = []
    if only_a:
        parts.append(f"only in {name_a}: {', '.join(map(format_path, only_a))}")
    if only_b:
        parts.append(f"only in {name_b}: {', '.join(map(format_path, only_b))}")
    for path, nested_in_a in kinds:
        kind_a, kind_b = ("a Container", "a leaf") if nested_in_a else ("a leaf", "a Container")
        parts.append(f"{format_path(path)} is {kind_a} in {name_a} but {kind_b} in {name_b}")
    return f"Container keys differ between {name_a} and {name_b}: " + "; ".join(parts)


def _only_in(x: Tree, y: Tree, prefix: Path) -> list[Path]:
    """Paths of ``x``'s keys that ``y`` lacks, depth first in ``x``'s order."""
    found: list[Path] = []
    for key, value in x.items():
        other = y.get(key, _MISSING)
        if other is _MISSING:
            found.append((*prefix, key))
        elif isinstance(value, Tree) and isinstance(other, Tree):
            found += _only_in(value, other, (*prefix, key))
    return found


def _kind_clashes(a: Tree, b: Tree, prefix: Path) -> list[tuple[Path, bool]]:
    """``(path, nested in a)`` for keys that hold a leaf on one side and a Tree on the other.
    """
    found: list[tuple[Path, bool]] = []
    for key, value in a.items():
        if key not in b:
            continue
        nested_a, nested_b = isinstance(value, Tree), isinstance(b[key], Tree)
        if nested_a and nested_b:
            found += _kind_clashes(value, b[key], (*prefix, key))
        elif nested_a != nested_b:
            found.append(((*prefix, key), nested_a))
    return found
