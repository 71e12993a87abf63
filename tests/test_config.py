"""``adamgen.config``: parsing ``ADAMGEN_*`` variables (the thread count's digits, issue 13 D8)."""

from __future__ import annotations

import pytest

from adamgen.config import environment
from adamgen.errors import ConfigError


@pytest.mark.parametrize("raw", ["²", "١٢", "3²", "0", "-1", "1.5", "two"])
def test_a_thread_count_is_ascii_digits_or_a_config_error(raw):
    """``str.isdigit()`` accepts ``'²'``, which ``int()`` refuses with a bare ValueError, and
    ``'١٢'``, which ``int()`` reads as 12: only ASCII digits are a count."""
    with pytest.raises(ConfigError, match=f"ADAMGEN_NUM_THREADS={raw!r} is not valid"):
        environment({"ADAMGEN_NUM_THREADS": raw})


def test_good_thread_counts_and_foreign_omp_values():
    assert environment({"ADAMGEN_NUM_THREADS": " 4 "}).num_threads == 4
    assert environment({"OMP_NUM_THREADS": "3"}).num_threads == 3
    for foreign in ("²", "4,2", "abc"):  # OpenMP's own syntax or not understood: ignored
        assert environment({"OMP_NUM_THREADS": foreign}).num_threads is None
