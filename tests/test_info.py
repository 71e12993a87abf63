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
