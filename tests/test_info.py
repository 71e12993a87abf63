"""``adamgen info``'s table of the loader's choices: one line per kernel, aligned however long the
kernel names, and every choice on request."""

from __future__ import annotations

from types import SimpleNamespace

from adamgen.info import choice_lines, size_ranges

LONG = "functional float64 exact const(beta1=0.9,beta2=0.999,epsilon=1e-07) scalar(lr,vw_tm1)"


def choice(problem: str, bucket: int, winner: str, source: str = "cache dir") -> SimpleNamespace:
    return SimpleNamespace(problem=problem, bucket=bucket, winner=winner, source=source,
                           seconds={"c": 1e-6, "c-omp": 2e-6, "numpy": 9e-6})


def many_choices() -> list[SimpleNamespace]:
    """120 choices, as a test suite leaves them: 8 kernels (one with a long name) x 15 sizes."""
    names = [f"functional float32 exact scalar(lr) #{i}" for i in range(7)] + [LONG]
    return [choice(name, bucket, "c" if bucket < 14 else "c-omp",
                   "measured" if bucket == 3 else "cache dir")
            for name in names for bucket in range(1, 16)]


def test_size_ranges_merge_neighbouring_choices_and_count_them():
    assert size_ranges([choice("k", 1, "c")]) == "c for N < 2^1"
    assert size_ranges([choice("k", 0, "numpy")]) == "numpy for N = 0"
    assert size_ranges([choice("k", b, w) for b, w in ((2, "c"), (5, "c"), (10, "c"),
                                                      (15, "c-omp"), (17, "c-omp"))]) == (
        "c for 3 buckets within 2^1 <= N < 2^10; c-omp for 2 buckets within "
        "2^14 <= N < 2^17")
    assert size_ranges([choice("k", 7, "c"), choice("k", 0, "c")]) == (
        "c for 2 buckets within N < 2^7")


def test_summary_has_one_line_per_kernel_aligned_with_long_names():
    lines = choice_lines(many_choices())
    assert lines[0] == ("variants chosen by measurement (ADAMGEN_VARIANT forces one): 120 "
                        "choices for 8 kernels, 112 read from the cache dir, 8 measured by "
                        "this process")
    rows = lines[2:-1]
    assert len(rows) == 8 and len(lines) == 11
    assert rows[-1].startswith(f"  {LONG}  ")
    column = lines[1].index("winner by size")
    assert all(row[column:].startswith("c for 13 buckets within N < 2^13; c-omp for 2 "
                                       "buckets within 2^13 <= N < 2^15") for row in rows)
    assert "adamgen info --all" in lines[-1]


def test_every_choice_on_request_with_aligned_columns():
    lines = choice_lines(many_choices(), every=True)
    rows = lines[2:]
    assert len(rows) == 120
    column = lines[1].index("winner")
    assert {row[column:column + 6].strip() for row in rows} == {"c", "c-omp"}
    assert rows[0].endswith("c 1.0 us, c-omp 2.0 us, numpy 9.0 us (cache dir)")


def test_no_choice_yet():
    assert choice_lines([])[1] == "  none yet: the loader measures on first use of each size bucket"


# -- one section per rule ------------------------------------------------------------------------

def test_rule_of_reads_kernel_labels_and_loader_problems():
    from adamgen.info import rule_of

    assert rule_of("numpy torch_adam(amsgrad=True, maximize=False) float32 exact") == "torch_adam"
    assert rule_of("c lion float64 exact [native, openmp]") == "lion"
    assert rule_of("numpy ivy_adam.vjp float64 exact") == "ivy_adam"
    assert rule_of("ivy_adam_vjp functional float64 exact scalar()", {"ivy_adam"}) == "ivy_adam"
    assert rule_of("ivy_adam_vjp functional float64 exact scalar()") == "ivy_adam_vjp"
    assert rule_of("adabelief multi-tensor param:e93f float32 exact x2^1") == "adabelief"
    assert rule_of("multi-tensor p:354fbdf0729dd4e7 float64 exact x2^1") == "?"  # older format
    assert rule_of("") == "?"


def test_options_read_default_first():
    from adamgen.info import option_text
    from adamgen.rules import BUILTINS

    texts = [option_text(o) for o in BUILTINS["torch_adam"].options]
    assert texts == ["amsgrad=False (or True)", "maximize=False (or True)",
                     "lr_dtype='float64' (or 'float32')",
                     "precision='native' (or 'bfloat16', 'float16')"]


def test_cached_kernels_come_from_the_manifests(tmp_path):
    import json

    from adamgen.cache import MANIFEST, SCHEMA
    from adamgen.info import cached_kernels

    for kind, key, variant in (("numpy", "a" * 64, "numpy lion float32 exact"),
                               ("c-kernel", "b" * 64, "c lion float32 exact [native]")):
        entry = tmp_path / str(SCHEMA) / kind / key
        entry.mkdir(parents=True)
        (entry / MANIFEST).write_text(json.dumps({"variant": variant}))
    broken = tmp_path / str(SCHEMA) / "numpy" / ("c" * 64)
    broken.mkdir()
    (broken / MANIFEST).write_text("{not json")  # being written: skipped
    assert cached_kernels(tmp_path) == [("numpy", "numpy lion float32 exact"),
                                        ("c-kernel", "c lion float32 exact [native]")]
    assert cached_kernels(tmp_path / "nowhere") == []


def test_a_rule_section_says_what_it_is_its_kernels_and_its_choices():
    from adamgen.info import HINT, rule_lines
    from adamgen.rules import BUILTINS

    lion = BUILTINS["lion"]
    lines = rule_lines("lion", summary=lion.summary, peer=lion.peer, options=lion.options,
                       spec_hash="7b7da8bf3935aa0d", process=["c lion float32: compiled in 1 s"],
                       cached=["c lion float32 exact", "numpy lion float32 exact",
                               "numpy lion mixed exact"],
                       choices=[choice("lion functional float32 exact scalar()", 3, "c")])
    assert lines[:4] == [f"rule lion: {lion.summary}", f"  peer:     {lion.peer}",
                         "  options:  none", "  spec:     hash 7b7da8bf3935aa0d (default options)"]
    assert lines[4] == ("  kernels:  3 in the cache (1 c, 2 numpy); 1 built or fetched by this "
                        "process")
    assert lines[5] == "    c lion float32: compiled in 1 s"
    assert "winner by size" in lines[7] and "c for 2^2 <= N < 2^3" in lines[8]
    assert not any(HINT in line for line in lines)  # said once, after every section
    user = rule_lines("plain_sgd")
    assert user == ["rule plain_sgd: a user's rule (adamgen.Rule(spec))",
                    "  kernels:  0 in the cache; 0 built or fetched by this process",
                    ("  variants: none yet (the loader measures on first use of each size "
                     "bucket)")]
    unrecorded = rule_lines("?", choices=[choice("multi-tensor p:35 float64 exact x2^1", 3, "c")])
    assert unrecorded[0].startswith("choices of kernels whose rule was not recorded")
