"""The runtime's per-process memory of kernels and choices, forgotten between tests that must
meet a cold loader (``fresh_loader`` in conftest.py) or start again mid-test."""

from __future__ import annotations

import adamgen.runtime.ivy
from adamgen.runtime import c_kernels, dispatch, kernel_store, numpy_kernels, variant_choice


def forget_everything() -> None:
    """Forget the loader's decisions, dispatch memos, loaded C kernels and the cache handle."""
    variant_choice.forget()
    dispatch.forget()
    c_kernels.clear_memo()
    kernel_store.forget_cache()


def forget_loaded_modules() -> None:
    """Forget the NumPy kernel modules loaded in this process too, so kernels really load from
    the cache again (a cache moved or damaged under the runtime)."""
    for memo in (getattr(numpy_kernels, "_modules", None),
                 getattr(getattr(adamgen.runtime.ivy, "_JIT", None), "_modules", None)):
        if hasattr(memo, "clear"):
            memo.clear()
