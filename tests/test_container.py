"""``adamgen.runtime.container``: construction, access, structure helpers, printing, forwarding."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest

from adamgen.errors import AdamgenError
from adamgen.runtime.array import Array, array
from adamgen.runtime.container import Container, format_path, key_mismatch


def nested() -> Container:
    return Container({"a": array([1.0, 2.0, 3.0]), "b": {"c": array([4.0, 5.0])}})


# -- construction ---------------------------------------------------------------------------

def test_keyword_mapping_and_mixed_construction_agree() -> None:
    x, y = array([1.0]), array([2.0])
    by_keywords = Container(a=x, b=Container(c=y))
    by_mapping = Container({"a": x, "b": {"c": y}})
    mixed = Container({"a": x}, b={"c": y})
    for c in (by_keywords, by_mapping, mixed):
        assert list(c) == ["a", "b"]
        assert isinstance(c["b"], Container)
        assert c["a"] is x and c["b"]["c"] is y
    assert by_keywords == by_mapping == mixed


def test_keywords_win_over_the_mapping_and_order_is_kept() -> None:
    c = Container({"z": 1, "a": 2}, z=3, m=4)
    assert list(c.items()) == [("z", 3), ("a", 2), ("m", 4)]


def test_the_input_mapping_is_not_shared() -> None:
    source = {"a": 1}
    c = Container(source)
    source["b"] = 2
    assert list(c) == ["a"]


def test_ndarray_leaves_are_kept_as_given() -> None:
    plain = np.zeros(3, dtype=np.float64)
    mine = array([1.0])
    c = Container(a=plain, b=mine)
    assert c["a"] is plain and c["b"] is mine


def test_lists_and_tuples_become_arrays_with_ivy_defaults() -> None:
    c = Container(a=[1.0, 2.0], b=(1, 2), c={"d": [0.5]})
    assert type(c["a"]) is Array and c["a"].dtype == np.float32
    assert c["b"].dtype == np.int64
    assert c["c"]["d"].dtype == np.float32


def test_scalar_leaves_for_hyperparameter_containers() -> None:
    step = Container(a=1, b=np.int64(2))
    beta1 = Container(a=0.9, b=np.float64(0.8))
    assert step["a"] == 1 and type(step["a"]) is int
    assert type(beta1["b"]) is np.float64


def test_keys_must_be_strings() -> None:
    with pytest.raises(TypeError) as info:
        Container({1: array([1.0])})
    assert isinstance(info.value, AdamgenError)


# -- access ---------------------------------------------------------------------------------

def test_item_and_attribute_access() -> None:
    c = nested()
    assert c.a is c["a"]
    assert c.b.c is c["b"]["c"]
    assert "a" in c and "c" not in c
    assert len(c) == 2


@pytest.mark.parametrize("name", ["keys", "items", "values", "get", "adam_update",
                                  "leaves", "map_leaves", "1x", "with space", "_private", ""])
def test_any_string_is_a_key(name: str) -> None:
    leaf = array([1.0])
    c = Container({name: leaf, "other": 2})
    assert c[name] is leaf
    assert list(c) == [name, "other"]
    assert c.get(name) is leaf


def test_method_names_stay_methods() -> None:
    c = Container({"keys": 1, "adam_update": 2, "plain": 3})
    assert list(c.keys()) == ["keys", "adam_update", "plain"]
    assert callable(c.adam_update)
    assert c.plain == 3
    assert c["adam_update"] == 2


def test_missing_attribute_names_the_keys() -> None:
    with pytest.raises(AttributeError, match=r"'z'.*'a', 'b'"):
        _ = nested().z
    with pytest.raises(KeyError):
        _ = nested()["z"]


def test_dunder_names_are_never_leaves() -> None:
    c = Container({"__deepcopy__": 1, "__array__": 2})
    assert c["__array__"] == 2
    assert not hasattr(c, "__array__")
    assert copy.deepcopy(c) == c


def test_container_is_not_an_array() -> None:
    assert not hasattr(Container, "__array__")


def test_immutable() -> None:
    c = nested()
    with pytest.raises(AttributeError, match="immutable"):
        c.a = array([0.0])
    with pytest.raises(AttributeError, match="immutable"):
        del c.a
    with pytest.raises(TypeError):
        c["a"] = 1  # type: ignore[index]


def test_dir_lists_reachable_leaves() -> None:
    names = dir(Container({"alpha": 1, "with space": 2, "keys": 3}))
    assert "alpha" in names and "with space" not in names
    assert "leaf_paths" in names and names.count("keys") == 1


def test_pickle_and_copy_round_trip() -> None:
    c = nested()
    for other in (pickle.loads(pickle.dumps(c)), copy.deepcopy(c)):
        assert other == c
        assert other["a"] is not c["a"]
    shallow = copy.copy(c)
    assert shallow == c and shallow["a"] is c["a"]


# -- equality -------------------------------------------------------------------------------

def test_equality_compares_leaves_with_numpy_semantics() -> None:
    assert nested() == nested()
    assert nested() != Container(a=array([1.0, 2.0, 3.0]), b={"c": array([4.0, 6.0])})
    assert nested() != Container(a=array([1.0, 2.0, 3.0]))
    assert nested() != Container(a=array([1.0, 2.0, 3.0]), b=array([4.0, 5.0]))
    assert Container(a=1) == {"a": 1}
    assert Container(a=1) != {1: 1}
    assert Container(a=1) != 1


def test_equality_ignores_key_order_and_is_identity_safe() -> None:
    nan = array([np.nan])
    assert Container(a=1, b=2) == Container(b=2, a=1)
    c = Container(x=nan)
    assert c == Container(x=nan)  # the same NaN leaf: equal by identity


def test_unhashable() -> None:
    with pytest.raises(TypeError):
        hash(nested())


# -- structure helpers ----------------------------------------------------------------------

def deep() -> Container:
    return Container({"a": 1, "b": {"c": 2, "d": {"e": 3}}, "f": 4, "g": {}})


def test_leaves_are_depth_first_in_insertion_order() -> None:
    c = deep()
    assert c.leaves() == [(("a",), 1), (("b", "c"), 2), (("b", "d", "e"), 3), (("f",), 4)]
    assert c.leaf_paths() == [("a",), ("b", "c"), ("b", "d", "e"), ("f",)]


def test_from_leaves_round_trip() -> None:
    c = nested()
    rebuilt = Container.from_leaves(c.leaves())
    assert rebuilt == c
    assert rebuilt.structure_key() == c.structure_key()
    assert all(x is y for (_, x), (_, y) in zip(c.leaves(), rebuilt.leaves(), strict=True))


def test_from_leaves_keeps_values_as_given() -> None:
    rebuilt = Container.from_leaves([(("a",), [1.0]), (("b", "x"), {"k": 1})])
    assert rebuilt["a"] == [1.0]
    assert rebuilt["b"]["x"] == {"k": 1}


def test_from_leaves_drops_only_empty_subcontainers() -> None:
    rebuilt = Container.from_leaves(deep().leaves())
    assert list(rebuilt) == ["a", "b", "f"]


@pytest.mark.parametrize(("pairs", "message"), [
    ([((), 1)], "at least one key"),
    ([(("a",), 1), (("a",), 2)], "given twice"),
    ([(("a", "b"), 1), (("a",), 2)], "prefix"),
    ([(("a",), 1), (("a", "b"), 2)], "runs through the leaf a"),
])
def test_from_leaves_rejects_inconsistent_paths(pairs: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Container.from_leaves(pairs)


def test_structure_key_is_hashable_and_describes_nesting_and_order() -> None:
    c = deep()
    assert c.structure_key() == (("a", None), ("b", (("c", None), ("d", (("e", None),)))),
                                 ("f", None), ("g", ()))
    hash(c.structure_key())
    assert c.structure_key() is c.structure_key()
    assert nested().structure_key() == Container(a=0, b={"c": 0}).structure_key()
    assert nested().structure_key() != Container(b={"c": 0}, a=0).structure_key()


def test_map_leaves_keeps_the_structure() -> None:
    doubled = deep().map_leaves(lambda v: v * 2)
    assert doubled.leaves() == [(("a",), 2), (("b", "c"), 4), (("b", "d", "e"), 6), (("f",), 8)]
    assert doubled.structure_key() == deep().structure_key()


# -- key mismatch ---------------------------------------------------------------------------

def test_key_mismatch_none_when_keys_match() -> None:
    assert key_mismatch(nested(), nested()) is None
    assert key_mismatch(Container(a=1, b=2), Container(b=3, a=4)) is None


def test_key_mismatch_names_keys_missing_on_each_side() -> None:
    a = Container(a=1, b={"c": 2, "d": 3})
    b = Container(a=1, b={"d": 3, "e": 4}, f=5)
    assert key_mismatch(a, b) == ("Container keys differ between the first and the second: "
                                  "only in the first: b.c; only in the second: b.e, f")
    assert key_mismatch(b, a, names=("w", "dcdw")) == (
        "Container keys differ between w and dcdw: only in w: b.e, f; only in dcdw: b.c")


def test_key_mismatch_reports_a_missing_subtree_once() -> None:
    message = key_mismatch(Container(a=1), Container(a=1, b={"c": 1, "d": 2}))
    assert message is not None and message.endswith("only in the second: b")


def test_key_mismatch_leaf_against_container() -> None:
    message = key_mismatch(Container(a=1, b=2), Container(a=1, b={"c": 2}), names=("w", "m"))
    assert message == "Container keys differ between w and m: b is a leaf in w but a Container in m"


def test_key_mismatch_formats_odd_keys() -> None:
    message = key_mismatch(Container({"x": {"with space": 1, "1x": 2}}), Container(x={}))
    assert message is not None
    assert message.endswith("only in the first: x['with space'], x['1x']")


def test_format_path() -> None:
    assert format_path(("b", "c")) == "b.c"
    assert format_path(("1x",)) == "['1x']"
    assert format_path(("b", "with space", "c")) == "b['with space'].c"


# -- printing -------------------------------------------------------------------------------

def test_repr_of_the_seed_container() -> None:
    w = Container(a=array([1.0, 2.0, 3.0]), b=array([4.0, 5.0, 6.0]))
    assert repr(w) == ("{\n"
                       "    a: adamgen.array([1., 2., 3.]),\n"
                       "    b: adamgen.array([4., 5., 6.])\n"
                       "}")
    assert str(w) == repr(w)


def test_repr_of_the_seed_result_tuple() -> None:
    result = (Container(a=array([0.99936122, 1.99936116, 2.99936128]),
                        b=array([3.99936128, 4.99936104, 5.99936104])),
              Container(a=array([0.01, 0.03, 0.03]), b=array([0.03, 0.02, 0.02])),
              array([0.01024, 0.01003, 0.01015]))
    assert repr(result) == ("({\n"
                            "    a: adamgen.array([0.99936122, 1.99936116, 2.99936128]),\n"
                            "    b: adamgen.array([3.99936128, 4.99936104, 5.99936104])\n"
                            "}, {\n"
                            "    a: adamgen.array([0.01, 0.03, 0.03]),\n"
                            "    b: adamgen.array([0.03, 0.02, 0.02])\n"
                            "}, adamgen.array([0.01024, 0.01003, 0.01015]))")


def test_repr_of_nesting_and_multi_line_leaves() -> None:
    c = Container({"a": array([[1.0, 2.0], [3.0, 4.0]]),
                   "b": {"c": array([4.0, 5.0]), "deeper": {"m": array([[1, 2], [3, 4]])}},
                   "with space": 3, "empty": {}})
    assert repr(c) == ("{\n"
                       "    a: adamgen.array([[1., 2.],\n"
                       "                      [3., 4.]]),\n"
                       "    b: {\n"
                       "        c: adamgen.array([4., 5.]),\n"
                       "        deeper: {\n"
                       "            m: adamgen.array([[1, 2],\n"
                       "                              [3, 4]])\n"
                       "        }\n"
                       "    },\n"
                       "    'with space': 3,\n"
                       "    empty: {}\n"
                       "}")
    assert repr(Container()) == "{}"


# -- Ivy's methods --------------------------------------------------------------------------

def test_instance_method_forwards_self_as_w(recorded_calls: list) -> None:
    w = nested()
    assert w.adam_update("dcdw", "lr", "mw", "vw", 3, beta2=0.5, out="out") == "result"
    (args, kwargs), = recorded_calls
    assert args[0] is w and args[1:] == ("dcdw", "lr", "mw", "vw", 3)
    assert kwargs == {"beta1": 0.9, "beta2": 0.5, "epsilon": 1e-07,
                      "stop_gradients": True, "out": "out"}


def test_static_method_forwards_every_argument(recorded_calls: list) -> None:
    w, step = nested(), Container(a=1, b={"c": 2})
    result = Container.static_adam_update(w, 1, 2, 3, 4, step, beta1=0.8, epsilon=0.0,
                                          stop_gradients=False)
    assert result == "result"
    (args, kwargs), = recorded_calls
    assert args[0] is w and args[1:5] == (1, 2, 3, 4) and args[5] is step
    assert kwargs == {"beta1": 0.8, "beta2": 0.999, "epsilon": 0.0,
                      "stop_gradients": False, "out": None}
    assert w.static_adam_update is Container.static_adam_update


def test_methods_take_ivy_positional_and_keyword_only_arguments(recorded_calls: list) -> None:
    with pytest.raises(TypeError):
        nested().adam_update(1, 2, 3, 4, 5, 0.9)  # type: ignore[misc]
    with pytest.raises(TypeError):
        Container.static_adam_update(nested(), 1, 2, 3, 4, 5, 0.9)  # type: ignore[misc]
    assert recorded_calls == []
