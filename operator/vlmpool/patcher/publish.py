"""Atomic publication of a patched adapter on the adapter volume.

Layout under ``root``::

    .staging/<adapter>+<version>+<random>/    files being written (same filesystem as the versions)
    <adapter>/.lock                            fcntl.flock: one publish of an adapter at a time
    <adapter>/versions/<version>/              immutable: adapter_config.json, adapter_model.safetensors,
                                               patch_report.json (files 0444)
    <adapter>/current -> versions/<version>    relative symlink, repointed by rename(2)

A version directory appears only by renaming a complete, fsynced staging directory, and ``current``
only changes by renaming a new symlink over it, so a crash at any point leaves either the old version
or the complete new one visible. Leftovers (staging directories and temporary links of this adapter)
are removed by the next publish under the lock.

This module is the one owner of that layout: the patch Job publishes with :func:`publish`, the prune
and cleanup Jobs run ``vlmpool patch prune`` / ``vlmpool patch cleanup`` (:func:`prune`, :func:`cleanup`,
under the same lock), and the operator checks a Job's reported path with :func:`check_version_path`.

For the crash tests, ``VLMPOOL_PATCH_CRASH_AT=<step>`` makes the process SIGKILL itself at that step
(one of STEPS).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import posixpath
import re
import secrets
import shutil
import signal
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from vlmpool.adminwire import VERSION_RE
from vlmpool.patcher.errors import PatchError
from vlmpool.patcher.sources.fetchlib import CONFIG_NAME, WEIGHTS_NAME

REPORT_NAME = "patch_report.json"
VERSION_FILES = (CONFIG_NAME, WEIGHTS_NAME, REPORT_NAME)
STAGING = ".staging"
STEPS = ("locked", "staging-created", "weights-partial", "files-written", "files-synced", "version-renamed",
         "link-created", "current-swapped", "done")
CRASH_ENV = "VLMPOOL_PATCH_CRASH_AT"
ADAPTER_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
STALE_STAGING_S = 24 * 3600


def _crash_point(step: str) -> None:
    if os.environ.get(CRASH_ENV) == step:
        os.kill(os.getpid(), signal.SIGKILL)


def validate_adapter_name(name: str) -> None:
    if not name or len(name) > 253 or not ADAPTER_NAME.fullmatch(name) or ".." in name:
        raise PatchError("InvalidAdapterName", f"adapter name {name!r} is not a valid Kubernetes object name "
                         "(lower-case letters, digits, '-' and '.', starting and ending with a letter or digit)")


@dataclass
class Published:
    version: str
    path: Path
    already_existed: bool
    previous: str | None  # version `current` pointed at before, if any
    cleaned: list[str]


def _fsync_path(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _lock(path: Path, timeout: float) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + timeout
    waiting = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
            if not waiting:
                waiting = True
                print(f"vlmpool: waiting for the publish lock {path}", file=sys.stderr, flush=True)
            if time.monotonic() >= deadline:
                os.close(fd)
                raise PatchError("LockTimeout",
                                 f"another publish of this adapter held {path} for over {timeout:g} s") from None
            time.sleep(0.1)


def version_path(root: str, adapter: str, version: str) -> str:
    """The path of a version as the engines see it (a POSIX path under the volume's mount path)."""
    return f"{root.rstrip('/')}/{adapter}/versions/{version}"


def check_version_path(root: str, adapter: str, version: str, path: str) -> str | None:
    """What is wrong with the path a patch Job reported for `version`, or None. It must be the immutable
    versions/<version> directory of this adapter under the volume root, never `current` (vLLM re-reads
    registered paths when its CPU LRU reloads an evicted adapter)."""
    if not version or "/" in version or version in (".", ".."):
        return f"invalid version {version!r} in the termination message"
    want = version_path(root, adapter, version)
    if posixpath.normpath(path) != want:
        return f"the reported path {path!r} is not {want!r}"
    return None


def current_version(adapter_dir: Path) -> str | None:
    try:
        target = os.readlink(adapter_dir / "current")
    except (FileNotFoundError, OSError):
        return None
    return Path(target).name


def is_complete(version_dir: Path) -> bool:
    return all((version_dir / n).is_file() for n in VERSION_FILES)


def clean_leftovers(root: Path, adapter: str) -> list[str]:
    """Remove this adapter's staging directories and temporary links (call under the adapter lock),
    and any staging entry older than a day (a crashed publish of an adapter never patched again)."""
    removed = []
    staging = root / STAGING
    if staging.is_dir():
        now = time.time()
        for entry in staging.iterdir():
            mine = entry.name.startswith(adapter + "+")
            try:
                old = now - entry.lstat().st_mtime > STALE_STAGING_S
            except FileNotFoundError:
                continue
            if mine or old:
                _rmtree(entry)
                removed.append(str(entry))
    adir = root / adapter
    if adir.is_dir():
        for entry in adir.iterdir():
            if entry.name.startswith(".current.tmp-"):
                entry.unlink(missing_ok=True)
                removed.append(str(entry))
    return removed


def _rmtree(path: Path) -> None:
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
        return

    def onerror(func, p, exc):  # read-only files inside: make writable and retry
        try:
            os.chmod(os.path.dirname(p), 0o755)
            os.chmod(p, 0o644)
            func(p)
        except OSError:
            pass
    shutil.rmtree(path, onerror=onerror)  # onerror: Python 3.11


def publish(root: Path | str, adapter: str, version: str, config_bytes: bytes, weights_bytes: bytes,
            report: dict, *, lock_timeout: float = 600.0) -> Published:
    """Publish one version and point ``current`` at it. Idempotent: an existing version is reused."""
    validate_adapter_name(adapter)
    if not VERSION_RE.fullmatch(version):
        raise PatchError("InternalError", f"bad version {version!r}")
    root = Path(root)
    adir = root / adapter
    versions = adir / "versions"
    staging_root = root / STAGING
    for d in (root, adir, versions, staging_root):
        d.mkdir(parents=True, exist_ok=True)
    fd = _lock(adir / ".lock", lock_timeout)
    try:
        _crash_point("locked")
        cleaned = clean_leftovers(root, adapter)
        previous = current_version(adir)
        final = versions / version
        already = final.exists()
        if already and not is_complete(final):  # pragma: no cover - only by hand-made damage
            raise PatchError("InternalError", f"{final} exists but is incomplete; remove it by hand")
        if not already:
            st = staging_root / f"{adapter}+{version}+{secrets.token_hex(4)}"
            st.mkdir()
            _crash_point("staging-created")
            report = dict(report, version=version, dst_dir=str(final.resolve()))
            files = {
                WEIGHTS_NAME: weights_bytes,
                CONFIG_NAME: config_bytes,
                REPORT_NAME: (json.dumps(report, indent=2, sort_keys=False) + "\n").encode(),
            }
            for name, data in files.items():
                with open(st / name, "wb") as f:
                    if name == WEIGHTS_NAME and os.environ.get(CRASH_ENV) == "weights-partial":
                        f.write(data[: len(data) // 2])
                        f.flush()
                        _crash_point("weights-partial")
                    f.write(data)
            _crash_point("files-written")
            for name in files:
                _fsync_path(st / name)
                os.chmod(st / name, 0o444)
            _fsync_path(st, directory=True)
            _crash_point("files-synced")
            os.rename(st, final)
            _crash_point("version-renamed")
            _fsync_path(versions, directory=True)
            _fsync_path(staging_root, directory=True)
        target = f"versions/{version}"
        cur = adir / "current"
        if cur.exists() and not cur.is_symlink():
            raise PatchError("InternalError", f"{cur} exists and is not a symlink; remove it by hand")
        if not cur.is_symlink() or os.readlink(cur) != target:
            tmp = adir / f".current.tmp-{secrets.token_hex(4)}"
            os.symlink(target, tmp)
            _fsync_path(adir, directory=True)  # the new link is durable before it replaces the old one
            _crash_point("link-created")
            os.rename(tmp, cur)
            _crash_point("current-swapped")
            _fsync_path(adir, directory=True)
        _crash_point("done")
        return Published(version, final, already, previous, cleaned)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


@dataclass
class Pruned:
    kept: list[str]
    removed: list[str]


def prune(root: Path | str, adapter: str, keep: Iterable[str], *, lock_timeout: float = 600.0) -> Pruned:
    """Remove the adapter's versions except `keep` and the one ``current`` points at, under the publish
    lock: a publish running at the same time is never cut, and its new version is ``current`` by the
    time the lock is free. Run once every pod confirmed it serves a kept version."""
    validate_adapter_name(adapter)
    adir = Path(root) / adapter
    versions = adir / "versions"
    if not versions.is_dir():
        return Pruned(sorted(keep), [])
    fd = _lock(adir / ".lock", lock_timeout)
    try:
        kept = set(keep)
        cur = current_version(adir)
        if cur:
            kept.add(cur)
        removed = []
        for v in sorted(p.name for p in versions.iterdir()):
            path = versions / v
            if v not in kept and path.is_dir() and not path.is_symlink():
                _rmtree(path)
                removed.append(v)
        clean_leftovers(Path(root), adapter)
        return Pruned(sorted(kept), removed)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def cleanup(root: Path | str, adapter: str, *, lock_timeout: float = 600.0) -> list[str]:
    """Remove everything of the adapter (``<root>/<adapter>`` and its staging entries), under the publish
    lock. Run after every pod confirmed its unload. Idempotent; other adapters are never touched."""
    validate_adapter_name(adapter)
    root = Path(root)
    adir = root / adapter
    if not adir.exists() and not adir.is_symlink():
        return clean_leftovers(root, adapter)
    if adir.is_symlink() or not adir.is_dir():
        adir.unlink()
        return [str(adir)] + clean_leftovers(root, adapter)
    fd = _lock(adir / ".lock", lock_timeout)
    try:
        removed = clean_leftovers(root, adapter)
        _rmtree(adir)
        return [*removed, str(adir)]
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
