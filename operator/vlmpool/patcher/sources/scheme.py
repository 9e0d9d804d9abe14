"""What a source scheme declares: the one shape every scheme module (https, hf, s3, pvc, file) fills in.

A scheme is one module holding everything vlmpool knows about it, and one line in registry.py; the
VLMAdapter CRD (its CEL rules and URI pattern), the patch Job (its volumes, mounts, arguments and the
credential keys it passes) and the patcher (its dispatch and egress guard) all derive from the
registry. Declarations only: nothing here imports the API, the manifests or the controller.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmpool.patcher.sources.fetchlib import FetchedAdapter

# Where the patch Job mounts a source that is a volume (pvc://<claim>/ as <SOURCES_ROOT>/<claim>): the
# manifests' mount path, the Job's --pvc-root and the patcher's default --pvc-root.
SOURCES_ROOT = "/mnt/sources"
# What every source URI is made of after its scheme (the CRD's source.uri pattern): no whitespace.
URI_CHARS = r"[^\s]+"


def well_formed(grammar: str | None, uri: str) -> bool:
    """Whether `uri` is a source URI as the CRD accepts it: no whitespace, and matching its scheme's
    grammar (a whole match: no trailing newline slips past a '$')."""
    return re.fullmatch(URI_CHARS, uri) is not None and (grammar is None or re.fullmatch(grammar, uri) is not None)


@dataclass(frozen=True)
class FetchRequest:
    """What a scheme's fetcher gets: the URI, scratch space (the caller removes it), the pin, the
    per-file bound, and where volume sources are mounted."""

    uri: str
    workdir: Path
    sha256: str | None
    max_file_bytes: int
    pvc_root: Path


@dataclass(frozen=True)
class JobSource:
    """What a source adds to the patch Job: one volume named "source", its mount in the patch
    container, and the patcher options (name, value) that say where it is."""

    volume: dict[str, Any]
    mount: dict[str, Any]
    options: tuple[tuple[str, str], ...] = ()


def _no_job_source(uri: str) -> JobSource | None:
    return None


@dataclass(frozen=True)
class SourceScheme:
    """One source scheme.

    name:            short name (the FetchedAdapter's scheme, the report's).
    prefix:          what a URI of this scheme starts with (dispatch).
    form:            how the CRD's source.uri description lists it.
    listed:          its place in the CRD's listing of schemes (source.uri's pattern and description):
                     the CRD is generated text, kept stable whatever order the schemes register in.
    head:            what the CRD's coarse source.uri pattern accepts it by (default: prefix).
    grammar:         the regular expression a URI of this scheme must match (RE2 and Python alike: the
                     CRD's CEL rule carries it, the patcher's parse uses it), or None.
    grammar_message: the CEL rule's message when a URI does not match it.
    credential_keys: the keys of a credentials Secret the fetcher reads (as environment variables).
    remote:          the egress policy: a remote fetch runs under vlmpool.patcher.egress (no internal
                     addresses unless allow-listed, redirects held to https and the URI's origin, the
                     whole-fetch deadline); a local one (a mounted volume, a node path) does not.
    job_source:      the volume, mount and arguments the patch Job needs for a URI of this scheme.
    fetch:           the fetcher: the adapter's two files, readable under a directory.
    """

    name: str
    prefix: str
    form: str
    listed: int
    fetch: Callable[[FetchRequest], FetchedAdapter]
    grammar: str | None = None
    grammar_message: str = ""
    head: str = ""
    credential_keys: tuple[str, ...] = ()
    remote: bool = False
    job_source: Callable[[str], JobSource | None] = _no_job_source

    def matches(self, uri: str) -> bool:
        return uri.startswith(self.prefix)

    def well_formed(self, uri: str) -> bool:
        return well_formed(self.grammar, uri)

    def cel_rule(self) -> dict[str, Any] | None:
        """The CRD's rule on source for this scheme's grammar, or None."""
        if self.grammar is None:
            return None
        return {"rule": f"!self.uri.startsWith('{self.prefix}') || self.uri.matches('{self.grammar}')",
                "message": self.grammar_message, "fieldPath": ".uri", "reason": "FieldValueInvalid"}


# The rule every source shares (the patcher refuses '..' whatever the scheme too).
COMMON_RULES: list[dict[str, Any]] = [
    {
        "rule": "!self.uri.contains('/../') && !self.uri.endsWith('/..')",
        "message": "source.uri must not contain '..' path segments",
        "fieldPath": ".uri",
        "reason": "FieldValueInvalid",
    },
]
