"""
The C{Accept} headers real clients send when they pull a tag, as they send
them: a list holds one value per header line.  Read from each client's
source, at the version named.
"""

from __future__ import annotations

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"
SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+json"

# skopeo, podman and buildah: containers/image v5.23.1 (skopeo 1.9.3's) and
# v5.36.1, manifest/manifest.go DefaultRequestedManifestMIMETypes, sent by
# docker/docker_client.go fetchManifest as one Accept line per type
# (makeRequest: req.Header.Add).  A GET of the tag, then of each
# platform's manifest by digest with the same header.
SKOPEO = [OCI_MANIFEST, DOCKER_MANIFEST, SCHEMA1_SIGNED, SCHEMA1, DOCKER_LIST, OCI_INDEX]

# containerd (and nerdctl, the CRI, and Docker with the containerd image
# store): core/remotes/docker/resolver.go NewResolver (v1.6.20 as
# remotes/docker/resolver.go, v2.0.0 and v2.3.4 the same), one line, sent
# with a HEAD of the tag first (resolve); then fetcher.go open GETs the
# manifest by digest with "<its media type>, */*".
CONTAINERD = f"{DOCKER_MANIFEST}, {DOCKER_LIST}, {OCI_MANIFEST}, {OCI_INDEX}, */*"


def containerd_fetch(media_type: str) -> str:
    """What containerd sends to GET a manifest it resolved, by digest."""
    return f"{media_type}, */*"


# Docker (moby v28.2.2, graph-driver image store): distribution/pull_v2.go
# pullTag calls the vendored docker/distribution registry/client
# repository.go tags.Get, a HEAD of the tag with one Accept line for each
# manifest schema registered (distribution.ManifestMediaTypes: schema2,
# manifestlist, ocischema, and schema1 with "application/json"), in Go's
# map order, which varies.  moby 29 registers schema1 no more, and sends the
# first four only.
DOCKER = [DOCKER_MANIFEST, DOCKER_LIST, OCI_INDEX, OCI_MANIFEST, SCHEMA1_SIGNED, "application/json"]

# curl's default.
CURL = "*/*"
