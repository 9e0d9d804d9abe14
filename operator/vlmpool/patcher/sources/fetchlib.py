"""What every source's fetcher shares: an adapter's two files, read safely.

Only ``adapter_config.json`` and ``adapter_model.safetensors`` are ever read or downloaded: base
weights and everything else in the source are left alone. Pickle weights are refused (never
unpickled), archives with absolute or ``..`` paths, links or special files are refused, and every file
is size-limited while it streams (a lying Content-Length or zip header does not get past the limit).

The schemes (one module each beside this one: https, hf, s3, pvc, file) build their fetchers from
these primitives; the remote ones connect only where vlmpool.patcher.egress allows.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
import stat
import tarfile
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from vlmpool.patcher import egress
from vlmpool.patcher.errors import PatchError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
WANTED = (CONFIG_NAME, WEIGHTS_NAME)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")
CONFIG_MAX_BYTES = 1024 * 1024
MAX_ARCHIVE_MEMBERS = 10_000  # also the cap on the entries of a directory, hub or bucket listing
CHUNK = 1024 * 1024
# Archive metadata read before any member is looked at (Python's tarfile and zipfile read these whole):
# one tar extended header (pax 'x'/'g', GNU long name 'L'/'K') and all of them together; the pax global
# headers ('g', copied into every member after them) together; a zip's central directory.
MAX_TAR_EXTENDED_HEADER = 64 * 1024
MAX_TAR_EXTENDED_TOTAL = 16 * 1024 * 1024
MAX_TAR_GLOBAL_TOTAL = 1024
MAX_ZIP_CENTRAL_DIRECTORY = 16 * 1024 * 1024
# The bytes an archive may inflate to, skipped members included (a tar.gz is decompressed to walk it):
# this many times --max-file-bytes.
ARCHIVE_INFLATE_FACTOR = 2


@dataclass
class FetchedAdapter:
    """An adapter's two files, ready to read."""

    dir: Path
    uri: str
    scheme: str
    sha256: str                     # of the archive, or of adapter_model.safetensors
    sha256_of: str                  # "archive" | "adapter_model.safetensors"
    pinned: bool
    sizes: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def config_path(self) -> Path:
        return self.dir / CONFIG_NAME

    @property
    def weights_path(self) -> Path:
        return self.dir / WEIGHTS_NAME


def is_pickle(name: str) -> bool:
    return name.lower().endswith(PICKLE_SUFFIXES)


def human(n: int) -> str:
    return f"{n} bytes"


def choose_adapter_files(names: dict[str, int], where: str, max_file_bytes: int) -> tuple[str, list[str]]:
    """From a listing {relative posix path: size} pick the adapter's directory (relative, '' for the
    top). Refuses what is missing, ambiguous, pickle-only or too large. Returns (dir, warnings)."""
    configs = sorted(p for p in names if posixpath.basename(p) == CONFIG_NAME)
    if not configs:
        pickles = sorted(p for p in names if is_pickle(p))
        if pickles:
            raise PatchError("PickleWeights", f"{where} has pickle weights ({', '.join(pickles[:5])}) and no "
                             f"{CONFIG_NAME}; only safetensors adapters are accepted: re-save the adapter with "
                             "save_pretrained(safe_serialization=True)")
        raise PatchError("MissingConfig", f"{where} has no {CONFIG_NAME}: not a PEFT adapter directory")
    if len(configs) > 1:
        raise PatchError("AmbiguousSource", f"{where} holds several adapters ({', '.join(configs[:5])}); "
                         "point the source at exactly one adapter directory")
    top = posixpath.dirname(configs[0])
    here = {p: s for p, s in names.items() if posixpath.dirname(p) == top}
    weights = posixpath.join(top, WEIGHTS_NAME) if top else WEIGHTS_NAME
    warnings: list[str] = []
    pickles = sorted(p for p in here if is_pickle(p))
    if weights not in here:
        if pickles:
            raise PatchError("PickleWeights",
                             f"{where}: the adapter weights are pickle files ({', '.join(pickles[:5])}); "
                             "pickle is never loaded (it can run code): re-save the adapter with "
                             "save_pretrained(safe_serialization=True) to get adapter_model.safetensors")
        raise PatchError("MissingWeights", f"{where} has {CONFIG_NAME} but no {WEIGHTS_NAME}")
    if pickles:
        warnings.append(f"ignored pickle files beside the safetensors weights (never read): {', '.join(pickles[:5])}")
    for name in (configs[0], weights):
        size = here[name]
        limit = CONFIG_MAX_BYTES if name.endswith(CONFIG_NAME) else max_file_bytes
        if size is not None and size > limit:
            raise PatchError("FileTooLarge", f"{where}: {name} is {human(size)}, over the limit of {human(limit)}")
    return top, warnings


def copy_limited(src: IO[bytes], dst_path: Path, limit: int, what: str) -> tuple[int, str]:
    """Stream src into dst_path, refusing more than limit bytes. Returns (size, sha256 hex)."""
    return copy_chunks_limited(iter(lambda: src.read(CHUNK), b""), dst_path, limit, what)


def copy_chunks_limited(chunks: Iterable[bytes], dst_path: Path, limit: int, what: str) -> tuple[int, str]:
    """Write chunks into dst_path as they arrive, refusing more than limit bytes (FileTooLarge) and
    stopping at the fetch's deadline (FetchTimeout). Returns (size, sha256 hex)."""
    h = hashlib.sha256()
    n = 0
    with open(dst_path, "wb") as out:
        for chunk in chunks:
            egress.check_deadline()
            n += len(chunk)
            if n > limit:
                raise PatchError("FileTooLarge", f"{what} is larger than the limit of {human(limit)}")
            h.update(chunk)
            out.write(chunk)
    egress.check_deadline()  # a connection shut at the deadline may look like a short, complete answer
    return n, h.hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def check_pin(expected: str | None, actual: str, what: str, reveal: bool = True) -> None:
    """`reveal=False` for node files (file://): the digest of a file the tenant may not read is
    never put into a message they can read."""
    if expected is not None and expected.lower() != actual:
        if not reveal:
            raise PatchError("ChecksumMismatch", f"sha256 of {what} does not match the pin")
        raise PatchError("ChecksumMismatch", f"sha256 of {what} is {actual}, the pin says {expected.lower()}")


# ---------------------------------------------------------------- archives

def _safe_member_name(name: str, archive: str) -> str:
    """Normalise an archive member name; refuse absolute paths and '..' segments."""
    raw = name.replace("\\", "/")
    if raw.startswith("/") or re.match(r"^[A-Za-z]:", raw):
        raise PatchError("UnsafeArchive", f"{archive}: member {name!r} has an absolute path")
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise PatchError("UnsafeArchive", f"{archive}: member {name!r} escapes the extraction directory ('..')")
    return "/".join(parts)


def detect_archive(path: Path) -> str | None:
    """'zip' or 'tar' (plain, gzip, bzip2 or xz; tarfile.is_tarfile is not used: it reads the first
    header unbounded), or None."""
    with open(path, "rb") as f:
        head = f.read(512)
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return "zip"
    if head.startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")) or head[257:262] == b"ustar":
        return "tar"
    return None


def extract_adapter_archive(archive: Path, dest: Path, max_file_bytes: int, label: str) -> tuple[Path, list[str]]:
    """Validate every member of a tar/zip archive, then extract only the adapter's two files."""
    kind = detect_archive(archive)
    if kind is None:
        raise PatchError("InvalidSource", f"{label} is not a tar, tar.gz or zip archive")
    dest.mkdir(parents=True, exist_ok=True)
    if kind == "tar":
        return _extract_tar(archive, dest, max_file_bytes, label)
    return _extract_zip(archive, dest, max_file_bytes, label)


class _BoundedTarInfo(tarfile.TarInfo):
    """tarfile's TarInfo, held to the bounds above before tarfile reads an extended header (it reads
    one whole: a 6.9 MB tar.gz declaring a 1.6 GB pax header cost 1.6 GB of memory), and refusing
    GNU sparse members (their maps are read whole too, and an adapter file is never sparse)."""

    _EXTENDED = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE,
                 tarfile.SOLARIS_XHDTYPE)

    def _proc_member(self, tf: _BoundedTarFile) -> tarfile.TarInfo:
        if self.type in self._EXTENDED:
            tf.bounds.extended(self)
        elif self.type == tarfile.GNUTYPE_SPARSE:
            self._sparse()
        return super()._proc_member(tf)  # type: ignore[misc]  # tarfile's own, private

    def _sparse(self, *_: object) -> None:
        raise PatchError("UnsafeArchive", f"member {self.name!r} is a GNU sparse file; sparse members are refused")

    _proc_gnusparse_00 = _proc_gnusparse_01 = _proc_gnusparse_10 = _sparse


class _BoundedTarFile(tarfile.TarFile):
    tarinfo = _BoundedTarInfo
    bounds: _TarBounds  # set on a subclass per archive: the bounds reach every header read, open's too


@dataclass
class _TarBounds:
    label: str
    max_inflated: int
    extended_total: int = 0
    global_total: int = 0
    inflated: int = 0

    def extended(self, info: tarfile.TarInfo) -> None:
        kind = {tarfile.XGLTYPE: "pax global header"}.get(info.type, "pax extended header")
        if info.type in (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK):
            kind = "GNU long name header"
        if info.size > MAX_TAR_EXTENDED_HEADER:
            raise PatchError("UnsafeArchive", f"{self.label}: a {kind} of {human(info.size)} is over the limit "
                             f"of {human(MAX_TAR_EXTENDED_HEADER)}")
        self.extended_total += info.size
        if self.extended_total > MAX_TAR_EXTENDED_TOTAL:
            raise PatchError("UnsafeArchive", f"{self.label}: its extended headers add up to more than "
                             f"{human(MAX_TAR_EXTENDED_TOTAL)}")
        if info.type == tarfile.XGLTYPE:
            self.global_total += info.size
            if self.global_total > MAX_TAR_GLOBAL_TOTAL:
                raise PatchError("UnsafeArchive", f"{self.label}: its pax global headers add up to more than "
                                 f"{human(MAX_TAR_GLOBAL_TOTAL)}")
        self.inflate(info.size)

    def inflate(self, n: int) -> None:
        """Walking past n more bytes of the (decompressed) archive."""
        self.inflated += n + tarfile.BLOCKSIZE
        if self.inflated > self.max_inflated:
            raise PatchError("ArchiveTooLarge", f"{self.label}: its members inflate to more than "
                             f"{human(self.max_inflated)} ({ARCHIVE_INFLATE_FACTOR} x --max-file-bytes)")


def _extract_tar(archive: Path, dest: Path, max_file_bytes: int, label: str) -> tuple[Path, list[str]]:
    bounds = _TarBounds(label, ARCHIVE_INFLATE_FACTOR * max_file_bytes)
    Bounded: type[_BoundedTarFile] = type("Bounded", (_BoundedTarFile,), {"bounds": bounds})
    try:
        tf = Bounded.open(archive, "r:*")
    except (tarfile.TarError, OSError, EOFError) as e:
        raise PatchError("InvalidSource", f"{label}: unreadable tar archive: {e}") from e
    with tf:
        listing: dict[str, int] = {}
        members = {}
        try:
            for i, m in enumerate(tf):
                if i >= MAX_ARCHIVE_MEMBERS:
                    raise PatchError("UnsafeArchive", f"{label} has more than {MAX_ARCHIVE_MEMBERS} members")
                name = _safe_member_name(m.name, label)
                if m.size > max_file_bytes:  # each member is a file under the limit, skipped ones too
                    raise PatchError("FileTooLarge", f"{label}: {name} is {human(m.size)}, over the limit of "
                                     f"{human(max_file_bytes)}")
                bounds.inflate(m.size)  # before the next header: walking to it inflates this member
                if m.issym() or m.islnk():
                    raise PatchError("UnsafeArchive", f"{label}: member {m.name!r} is a link (to {m.linkname!r}); "
                                     "links are refused")
                if m.isdir():
                    continue
                if not m.isreg():
                    raise PatchError("UnsafeArchive", f"{label}: member {m.name!r} is not a regular file")
                if name in listing:
                    raise PatchError("UnsafeArchive", f"{label}: member {m.name!r} appears twice")
                listing[name] = m.size
                members[name] = m
        except (tarfile.TarError, EOFError, OSError) as e:
            raise PatchError("InvalidSource", f"{label}: corrupt tar archive: {e}") from e
        top, warnings = choose_adapter_files(listing, label, max_file_bytes)
        for wanted in WANTED:
            name = posixpath.join(top, wanted) if top else wanted
            src = tf.extractfile(members[name])
            assert src is not None
            limit = CONFIG_MAX_BYTES if wanted == CONFIG_NAME else max_file_bytes
            copy_limited(src, dest / wanted, limit, f"{label}: {name}")
    return dest, warnings


ZIP_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA)


def _check_zip_directory(archive: Path, label: str) -> None:
    """zipfile reads the central directory whole and makes one ZipInfo per entry: its size and entry
    count (the end record's, zip64 included) are checked first."""
    try:
        with open(archive, "rb") as f:
            end = zipfile._EndRecData(f)  # type: ignore[attr-defined]  # the end record, as ZipFile reads it
    except OSError as e:
        raise PatchError("InvalidSource", f"{label}: unreadable zip archive: {e}") from e
    if not end:
        raise PatchError("InvalidSource", f"{label}: unreadable zip archive: no end of central directory")
    entries, size = end[zipfile._ECD_ENTRIES_TOTAL], end[zipfile._ECD_SIZE]  # type: ignore[attr-defined]
    if entries > MAX_ARCHIVE_MEMBERS:
        raise PatchError("UnsafeArchive", f"{label} has more than {MAX_ARCHIVE_MEMBERS} members")
    if size > MAX_ZIP_CENTRAL_DIRECTORY:
        raise PatchError("UnsafeArchive", f"{label}: its central directory of {human(size)} is over the limit "
                         f"of {human(MAX_ZIP_CENTRAL_DIRECTORY)}")


def _extract_zip(archive: Path, dest: Path, max_file_bytes: int, label: str) -> tuple[Path, list[str]]:
    _check_zip_directory(archive, label)
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as e:
        raise PatchError("InvalidSource", f"{label}: unreadable zip archive: {e}") from e
    with zf:
        infos = zf.infolist()
        if len(infos) > MAX_ARCHIVE_MEMBERS:
            raise PatchError("UnsafeArchive", f"{label} has more than {MAX_ARCHIVE_MEMBERS} members")
        listing = {}
        by_name = {}
        for info in infos:
            name = _safe_member_name(info.filename, label)
            mode = (info.external_attr >> 16) & 0o177777
            if stat.S_ISLNK(mode):
                raise PatchError("UnsafeArchive",
                                 f"{label}: member {info.filename!r} is a symbolic link; links are refused")
            if info.is_dir():
                continue
            if stat.S_IFMT(mode) and not stat.S_ISREG(mode):  # no type bits: a plain file (zipfile, DOS)
                raise PatchError("UnsafeArchive", f"{label}: member {info.filename!r} is not a regular file")
            if name in listing:
                raise PatchError("UnsafeArchive", f"{label}: member {info.filename!r} appears twice")
            listing[name] = info.file_size
            by_name[name] = info
        top, warnings = choose_adapter_files(listing, label, max_file_bytes)
        for wanted in WANTED:
            name = posixpath.join(top, wanted) if top else wanted
            limit = CONFIG_MAX_BYTES if wanted == CONFIG_NAME else max_file_bytes
            info = by_name[name]
            if info.flag_bits & 0x1:
                raise PatchError("UnsupportedArchive", f"{label}: member {name} is encrypted")
            if info.compress_type not in ZIP_METHODS:
                raise PatchError("UnsupportedArchive", f"{label}: member {name} uses compression method "
                                 f"{info.compress_type}; only stored, deflate, bzip2 and lzma are read")
            try:
                with zf.open(info) as src:
                    copy_limited(src, dest / wanted, limit, f"{label}: {name}")
            except (zipfile.BadZipFile, OSError, EOFError) as e:
                raise PatchError("InvalidSource", f"{label}: corrupt zip member {name}: {e}") from e
            except (NotImplementedError, RuntimeError) as e:  # what zipfile says of what it cannot read
                raise PatchError("UnsupportedArchive", f"{label}: member {name}: {e}") from e
    return dest, warnings


# ---------------------------------------------------------------- local directories

def _list_local_dir(root: Path, label: str, max_depth: int = 3) -> dict[str, int | None]:
    """Relative paths of the files under root (links reported with size None, checked later)."""
    out: dict[str, int | None] = {}

    seen = 0

    def walk(d: Path, rel: str, depth: int) -> None:
        nonlocal seen
        try:
            with os.scandir(d) as it:
                entries = []
                for ent in it:  # counted as they are read: a huge directory is not listed whole first
                    seen += 1
                    if seen > MAX_ARCHIVE_MEMBERS:
                        raise PatchError("UnsafeSource", f"{label} has more than {MAX_ARCHIVE_MEMBERS} entries")
                    entries.append(ent)
        except OSError as e:
            raise PatchError("SourceUnavailable", f"{label}: cannot list {d}: {e}") from e
        for ent in entries:
            r = f"{rel}/{ent.name}" if rel else ent.name
            if ent.is_symlink():
                out[r] = None
            elif ent.is_dir(follow_symlinks=False):
                if depth < max_depth and not ent.name.startswith("."):
                    walk(Path(ent.path), r, depth + 1)
            elif ent.is_file(follow_symlinks=False):
                out[r] = ent.stat(follow_symlinks=False).st_size
            else:
                out[r] = -1
    walk(root, "", 0)
    return out


def _local_directory(root: Path, label: str, max_file_bytes: int) -> tuple[Path, list[str]]:
    listing = _list_local_dir(root, label)
    sizes = {p: (s if s is not None and s >= 0 else 0) for p, s in listing.items()}
    top, warnings = choose_adapter_files(sizes, label, max_file_bytes)
    adir = root / top if top else root
    for wanted in WANTED:
        rel = posixpath.join(top, wanted) if top else wanted
        if listing[rel] is None:
            raise PatchError("UnsafeSource", f"{label}: {rel} is a symbolic link; links are refused in sources "
                             "(copy the file itself)")
        if listing[rel] == -1:
            raise PatchError("UnsafeSource", f"{label}: {rel} is not a regular file")
    return adir, warnings


def local_path(path: Path, label: str, workdir: Path, sha256: str | None, max_file_bytes: int,
                reveal: bool = True) -> FetchedAdapter:
    try:
        st = path.lstat()
    except FileNotFoundError:
        raise PatchError("SourceNotFound", f"{label}: no such file or directory") from None
    except OSError as e:
        raise PatchError("SourceUnavailable", f"{label}: {e}") from e
    if stat.S_ISLNK(st.st_mode):
        raise PatchError("UnsafeSource", f"{label} is a symbolic link; point the source at the real path")
    if stat.S_ISDIR(st.st_mode):
        adir, warnings = _local_directory(path, label, max_file_bytes)
        digest = sha256_file(adir / WEIGHTS_NAME)
        check_pin(sha256, digest, f"{label}/{WEIGHTS_NAME}", reveal)
        return FetchedAdapter(adir, label, "file", digest, WEIGHTS_NAME, sha256 is not None,
                              sizes_of(adir), warnings)
    if not stat.S_ISREG(st.st_mode):
        raise PatchError("UnsafeSource", f"{label} is neither a directory nor a regular file")
    if st.st_size > max_file_bytes:
        raise PatchError("FileTooLarge", f"{label} is {human(st.st_size)}, over the limit of {human(max_file_bytes)}")
    if is_pickle(path.name):
        raise PatchError("PickleWeights", f"{label} is a pickle file; only safetensors adapters are accepted")
    digest = sha256_file(path)
    check_pin(sha256, digest, label, reveal)
    adir, warnings = extract_adapter_archive(path, workdir / "adapter", max_file_bytes, label)
    return FetchedAdapter(adir, label, "file", digest, "archive", sha256 is not None, sizes_of(adir), warnings)


def sizes_of(d: Path) -> dict[str, int]:
    return {n: (d / n).stat().st_size for n in WANTED}
