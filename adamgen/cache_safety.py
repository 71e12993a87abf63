"""What may be trusted in a cache directory: the ownership rule, private directories, hashes.

Stdlib only (a cache hit must not import SymPy, Jinja or cffi).

**The rule.** A path adamgen loads code from, or the chain of directories leading to it, must be
owned by this user and writable by nobody else: whoever can write a directory can replace what is
below it. So the root, ``root/<schema>``, ``root/<schema>/<kind>``, the entry, its manifest and
its files are each checked, and the intermediate directories must be real directories (no
symlink). A violation raises :class:`CacheUnsafeError`, which the runtime answers the same way
wherever it is found: one warning, and nothing more is loaded from that cache in this process.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from pathlib import Path

from .errors import CacheError, CacheUnsafeError

SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")

# (device, inode, size, mtime_ns, ctime_ns) -> sha256: a hit re-hashes a file only if it changed.
_hash_memo: dict[tuple[int, int, int, int, int], str] = {}


def unsafe_reason(st: os.stat_result) -> str | None:
    """Why a path with this stat must not be trusted, or None if it is ours alone."""
    if st.st_uid != os.geteuid():
        return f"it is owned by uid {st.st_uid}, not by this user (uid {os.geteuid()})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"it is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def require_safe(path: Path, *, follow_symlinks: bool = True, what: str = "cache path",
                 directory: bool = False) -> os.stat_result:
    """Stat ``path``; raise :class:`CacheUnsafeError` if another user could have written it
    (or, with ``directory``, if it is not a real directory)."""
    st = os.stat(path, follow_symlinks=follow_symlinks)
    if directory and not stat.S_ISDIR(st.st_mode):
        reason: str | None = ("it is a symlink, not a directory" if stat.S_ISLNK(st.st_mode)
                              else "it is not a directory")
    else:
        reason = unsafe_reason(st)
    if reason is not None:
        raise CacheUnsafeError(f"refusing to use {what} {path}: {reason}")
    return st


def require_safe_chain(root: Path, below: Path) -> bool:
    """Check ``root`` (symlinks followed, as when the cache was opened) and every directory
    from it down to ``below`` (symlinks refused). False when one of them does not exist."""
    try:
        require_safe(root, directory=True)
        path = root
        for part in below.relative_to(root).parts:
            path = path / part
            require_safe(path, follow_symlinks=False, directory=True)
    except FileNotFoundError:
        return False
    return True


def make_private_dir(path: Path) -> None:
    """Create ``path`` (0700) if missing; an existing directory is checked, never loosened."""
    try:
        os.makedirs(path, mode=0o700)
        os.chmod(path, 0o700)  # makedirs' mode is filtered by the umask
    except FileExistsError:
        pass
    if not path.is_dir():
        raise CacheError(f"cache path {path} exists but is not a directory")
    require_safe(path)


def why_not_writable(directory: Path) -> str:
    """Why this process cannot create files in ``directory``, or "" when it can. A read-only
    mount says no even to root; as root without ``CAP_DAC_OVERRIDE``, mode bits count too."""
    if os.access in os.supports_effective_ids:
        allowed = os.access(directory, os.W_OK | os.X_OK, effective_ids=True)
    else:
        allowed = os.access(directory, os.W_OK | os.X_OK)
    if allowed:
        return ""
    try:
        if os.statvfs(directory).f_flag & os.ST_RDONLY:
            return "it is on a read-only file system"
        return f"this user cannot write it (mode {stat.S_IMODE(os.stat(directory).st_mode):04o})"
    except (OSError, AttributeError) as exc:
        return f"it cannot be examined ({exc})"


def file_sha256(path: Path, st: os.stat_result) -> str:
    """The file's sha256, memoised by its identity and change times."""
    memo_key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    digest = _hash_memo.get(memo_key)
    if digest is None:
        sha = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                sha.update(block)
        digest = _hash_memo[memo_key] = sha.hexdigest()
    return digest


def check_name(what: str, name: str) -> None:
    """Kinds and keys become path components: only plain names, never ``..`` or ``/``."""
    if not SAFE_NAME.match(name):
        raise CacheError(f"invalid cache {what} {name!r}: use letters, digits, '_', '-', '.'")
