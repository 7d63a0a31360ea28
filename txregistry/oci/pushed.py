"""
Checking a pushed manifest before anything is stored or sent on: the field's
"unknown blob" becomes an answer that names what is missing.

A manifest must be at most L{MAX_MANIFEST_SIZE} bytes, be JSON of a media
type txregistry knows (the C{Content-Type} the client sent, which must agree
with the manifest's own C{mediaType} where it has one), and name its blobs
and manifests by valid digests.  Whether those exist is the target's to say
(L{txregistry.repository.push.IPushTarget}); L{parse_pushed} only lists them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from txregistry.oci.errors import RegistryError
from txregistry.oci.mediatypes import INDEX_TYPES, MANIFEST_TYPES, base_type
from txregistry.oci.reference import Digest

# distribution's own limit (registry/handlers/manifests.go, maxManifestBodySize).
MAX_MANIFEST_SIZE = 4 << 20


@dataclass(frozen=True)
class PushedManifest:
    """
    A manifest a client pushed, checked: valid JSON, a known media type, at
    most 4 MiB, and every blob and manifest it names present at the target
    (asked through the push target: L{txregistry.repository.push}).

    @ivar tag: the tag it was pushed under, or L{None} when pushed by digest.
    @ivar references: the digests of the blobs (config, layers) it names.
    @ivar manifests: the digests of the manifests it names (an index).
    @ivar subject: the manifest it refers to (C{subject}), for the
        referrers API and the C{OCI-Subject} answer header.
    @ivar artifact_type: its C{artifactType} (or its config's media type),
        for the referrers API.
    """

    digest: Digest
    media_type: str
    body: bytes
    tag: str | None
    references: tuple[Digest, ...] = ()
    manifests: tuple[Digest, ...] = ()
    subject: Digest | None = None
    artifact_type: str | None = None
    annotations: tuple[tuple[str, str], ...] = ()


def manifest_invalid(message: str) -> RegistryError:
    return RegistryError(400, "MANIFEST_INVALID", message)


def manifest_too_large(size: int | None) -> RegistryError:
    got = f"{size} bytes" if size is not None else "more"
    return RegistryError(
        413,
        "SIZE_INVALID",
        f"a manifest may be at most {MAX_MANIFEST_SIZE} bytes (4 MiB), this one is {got}",
    )


def manifest_blob_unknown(digest: Digest, repository: str, what: str = "blob") -> RegistryError:
    return RegistryError(
        400,
        "MANIFEST_BLOB_UNKNOWN",
        f"the manifest names {what} {digest}, which {repository} does not have:"
        f" push the {what} before the manifest",
        detail={"digest": str(digest)},
    )


def parse_pushed(body: bytes, content_type: str, tag: str | None) -> PushedManifest:
    """
    Check a pushed manifest's bytes and list what it names.

    @raise RegistryError: 400 C{MANIFEST_INVALID} for anything but a
        manifest of a known type, 413 for one over 4 MiB.
    """
    if len(body) > MAX_MANIFEST_SIZE:
        raise manifest_too_large(len(body))
    try:
        document: Any = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise manifest_invalid(f"the manifest is not valid JSON: {e}") from None
    except RecursionError:
        # Within 4 MiB, "[[[[..." nests deeper than Python's parser recurses.
        raise manifest_invalid("the manifest's JSON nests too deeply to be a manifest") from None
    if not isinstance(document, dict):
        raise manifest_invalid("the manifest is not a JSON object")
    declared = document.get("mediaType")
    media_type = base_type(content_type) if content_type else ""
    if not media_type or media_type == "application/json":
        media_type = declared if isinstance(declared, str) else ""
    if media_type not in MANIFEST_TYPES:
        raise manifest_invalid(
            f"unknown manifest media type {media_type[:200]!r}: txregistry takes"
            f" {', '.join(MANIFEST_TYPES)} (send it as the Content-Type)"
        )
    if isinstance(declared, str) and declared and declared != media_type:
        raise manifest_invalid(
            f"the manifest's mediaType {declared[:200]!r} is not its Content-Type {media_type!r}"
        )
    references: list[Digest] = []
    manifests: list[Digest] = []
    if media_type in INDEX_TYPES:
        manifests = [_digest(d, "manifests") for d in _descriptors(document, "manifests")]
    else:
        config = document.get("config")
        if not isinstance(config, dict):
            raise manifest_invalid("the manifest has no config descriptor")
        references.append(_digest(config, "config"))
        references.extend(_digest(d, "layers") for d in _descriptors(document, "layers"))
    subject: Digest | None = None
    if isinstance(document.get("subject"), dict):
        subject = _digest(document["subject"], "subject")
    artifact_type = document.get("artifactType")
    if not isinstance(artifact_type, str):
        config = document.get("config")
        artifact_type = config.get("mediaType") if isinstance(config, dict) else None
    annotations = document.get("annotations")
    pairs: tuple[tuple[str, str], ...] = ()
    if isinstance(annotations, dict):
        pairs = tuple((str(k), str(v)) for k, v in annotations.items())
    return PushedManifest(
        digest=Digest.of(body),
        media_type=media_type,
        body=body,
        tag=tag,
        references=tuple(dict.fromkeys(references)),
        manifests=tuple(dict.fromkeys(manifests)),
        subject=subject,
        artifact_type=artifact_type if isinstance(artifact_type, str) else None,
        annotations=pairs,
    )


def _descriptors(document: dict[str, Any], key: str) -> list[dict[str, Any]]:
    items = document.get(key, [])
    if not isinstance(items, list) or not all(isinstance(d, dict) for d in items):
        raise manifest_invalid(f"the manifest's {key} is not a list of descriptors")
    return items


def _digest(descriptor: dict[str, Any], where: str) -> Digest:
    text = descriptor.get("digest")
    if not isinstance(text, str):
        raise manifest_invalid(f"a descriptor in the manifest's {where} has no digest")
    try:
        return Digest.parse(text)
    except RegistryError as e:
        raise manifest_invalid(f"the manifest's {where}: {e.message}") from None
