"""The registry of source schemes: a new scheme is one module beside this one and one line below.

Everything that depends on the set of schemes derives from here: the VLMAdapter CRD (source.uri's
pattern and description, one CEL rule per scheme with a grammar), the patch Job (the source volume,
mount and arguments; the credential keys a Secret may set) and the patcher (its dispatch, and which
fetches run under the egress guard).
"""

from __future__ import annotations

from typing import Any

from vlmpool.patcher.sources import file, hf, https, pvc, s3
from vlmpool.patcher.sources.scheme import COMMON_RULES, URI_CHARS, JobSource, SourceScheme

SCHEMES: dict[str, SourceScheme] = {}


def register(scheme: SourceScheme) -> SourceScheme:
    if scheme.name in SCHEMES or any(s.prefix == scheme.prefix for s in SCHEMES.values()):
        raise ValueError(f"source scheme {scheme.name} ({scheme.prefix}) is registered already")
    SCHEMES[scheme.name] = scheme
    return scheme


# In this order the patch Job passes the schemes' credential keys.
for _scheme in (https.SCHEME, hf.SCHEME, s3.SCHEME, pvc.SCHEME, file.SCHEME):
    register(_scheme)


def scheme_for(uri: str) -> SourceScheme | None:
    return next((s for s in SCHEMES.values() if s.matches(uri)), None)


def listed() -> list[SourceScheme]:
    """The schemes in the order the CRD lists them."""
    return sorted(SCHEMES.values(), key=lambda s: (s.listed, s.name))


def uri_pattern() -> str:
    """The CRD's coarse pattern of source.uri: one of the schemes, no whitespace."""
    return "^(" + "|".join(s.head or s.prefix for s in listed()) + ")" + URI_CHARS + "$"


def uri_forms() -> str:
    """How the CRD's description of source.uri lists the schemes."""
    forms = [s.form for s in listed()]
    return ", ".join(forms[:-1]) + " or " + forms[-1] if len(forms) > 1 else "".join(forms)


def cel_rules() -> list[Any]:
    """The CRD's rules on source: each scheme's grammar (by scheme name: the generated CRD does not move
    when schemes register in another order), then the rules every source shares."""
    rules = [r for s in sorted(SCHEMES.values(), key=lambda s: s.name) if (r := s.cel_rule()) is not None]
    return [*rules, *COMMON_RULES]


def credential_keys() -> tuple[str, ...]:
    """The keys of a credentials Secret that reach the patch container, one by one."""
    return tuple(k for s in SCHEMES.values() for k in s.credential_keys)


def job_source(uri: str) -> JobSource | None:
    """What the patch Job needs for the source `uri` (a volume, its mount, arguments), or None."""
    scheme = scheme_for(uri)
    return scheme.job_source(uri) if scheme is not None else None


def prefixes() -> list[str]:
    return [s.prefix for s in SCHEMES.values()]
