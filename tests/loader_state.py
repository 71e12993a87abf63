"""The runtime's per-process memory of kernels and choices, forgotten between tests that must
meet a cold loader (``fresh_loader`` in conftest.py) or start again mid-test."""

from __future__ import annotations

from adamgen.runtime import c_kernels, dispatch, kernel_store, variant_choice


def forget_everything() -> None:
    """Forget the loader's decisions, dispatch memos, loaded C kernels and the cache handle."""
    variant_choice.forget()
    dispatch.forget()
    c_kernels.clear_memo()
    kernel_store.forget_cache()
