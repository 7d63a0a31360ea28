"""Parsing names, tags and digests (spec: "Pulling")."""

import hashlib

import pytest

from txregistry.oci.errors import RegistryError
from txregistry.oci.reference import Digest, Tag, parse_reference, validate_name

HEX = "a" * 64


def test_digest_round_trip():
    digest = Digest.parse(f"sha256:{HEX}")
    assert (digest.algorithm, digest.hex, str(digest)) == ("sha256", HEX, f"sha256:{HEX}")


def test_digest_of_matches_hashlib():
    assert Digest.of(b"hello") == Digest("sha256", hashlib.sha256(b"hello").hexdigest())
    assert Digest.of(b"hello", "sha512").hex == hashlib.sha512(b"hello").hexdigest()


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("sha256:" + "a" * 63, "64 lowercase hex"),
        ("sha256:" + "A" * 64, "64 lowercase hex"),
        ("md5:" + "a" * 32, "unsupported digest algorithm"),
        ("sha256", "invalid digest"),
        ("sha256:../../etc/passwd", "invalid digest"),
        (":" + HEX, "invalid digest"),
        ("", "invalid digest"),
    ],
)
def test_bad_digests_are_digest_invalid(text, fragment):
    with pytest.raises(RegistryError) as caught:
        Digest.parse(text)
    assert (caught.value.status, caught.value.code) == (400, "DIGEST_INVALID")
    assert fragment in caught.value.message


@pytest.mark.parametrize("text", ["latest", "3.20", "17.2-alpine", "_x", "A" * 128])
def test_valid_tags(text):
    assert parse_reference(text, "library/alpine") == Tag(text) == Tag.parse(text)


@pytest.mark.parametrize(
    "text", ["-x", ".x", ".INVALID_MANIFEST_NAME", "a" * 129, "a/b", "a b", "ä"]
)
def test_a_reference_that_is_no_tag_names_an_unknown_manifest(text):
    # The spec: a manifest that is not found MUST get 404.
    with pytest.raises(RegistryError) as caught:
        parse_reference(text, "library/alpine")
    assert (caught.value.status, caught.value.code) == (404, "MANIFEST_UNKNOWN")
    assert "is unknown in library/alpine: it is neither a tag nor a digest" in caught.value.message
    # A tag given elsewhere (prefetch's argument) is still invalid as such.
    with pytest.raises(RegistryError) as caught:
        Tag.parse(text)
    assert (caught.value.status, caught.value.code) == (400, "TAG_INVALID")


def test_reference_with_colon_is_a_digest():
    assert parse_reference(f"sha256:{HEX}", "x") == Digest("sha256", HEX)
    with pytest.raises(RegistryError) as caught:
        parse_reference("v1:2", "x")
    assert (caught.value.status, caught.value.code) == (400, "DIGEST_INVALID")


@pytest.mark.parametrize(
    "name", ["alpine", "library/alpine", "a/b/c/d", "my-org/my_image", "a__b", "a.b/c-d", "x1/y2"]
)
def test_valid_names(name):
    assert validate_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "Alpine",
        "a//b",
        "/a",
        "a/",
        "..",
        "a/../b",
        "a/./b",
        "a%2fb",
        "-a",
        "a-",
        "a__",
        "a___b",
        "a:b",
        "",
    ],
)
def test_bad_names_are_name_invalid(name):
    with pytest.raises(RegistryError) as caught:
        validate_name(name)
    assert (caught.value.status, caught.value.code) == (400, "NAME_INVALID")


def test_overlong_name():
    with pytest.raises(RegistryError) as caught:
        validate_name("a/" * 127 + "ab")
    assert "longer than 255" in caught.value.message
