"""[storage] and [storage.s3]: the backend, the bucket, and where the keys come from."""

from __future__ import annotations

import os

import pytest

from txregistry.config import ConfigError, S3Config, parse_config

ENV = {"AWS_ACCESS_KEY_ID": "AKIDENV", "AWS_SECRET_ACCESS_KEY": "secret-from-env", "HOME": "/h"}


def s3(**keys: object) -> dict[str, object]:
    table: dict[str, object] = {"endpoint": "http://127.0.0.1:9000", "bucket": "txregistry"}
    table.update(keys)
    return {"storage": {"backend": "s3", "s3": table}}


def test_disk_is_the_default() -> None:
    config = parse_config({}, environ=ENV)
    assert config.storage.backend == "disk" and config.storage.s3 is None


def test_s3_with_keys_from_the_default_variables() -> None:
    config = parse_config(s3(prefix="cache", region="eu-west-1"), environ=ENV)
    bucket = config.storage.s3
    assert isinstance(bucket, S3Config)
    assert (bucket.endpoint, bucket.bucket, bucket.prefix, bucket.region) == (
        "http://127.0.0.1:9000",
        "txregistry",
        "cache/",
        "eu-west-1",
    )
    assert bucket.path_style is True, "path style for a non-AWS endpoint"
    assert bucket.access_key.reveal() == "AKIDENV"
    assert bucket.secret_key_source == "$AWS_SECRET_ACCESS_KEY"
    assert "secret-from-env" not in repr(config)


def test_aws_endpoints_default_to_virtual_hosts() -> None:
    config = parse_config(s3(endpoint="https://s3.eu-west-1.amazonaws.com"), environ=ENV)
    assert config.storage.s3 is not None and config.storage.s3.path_style is False


def test_keys_from_files_private_to_their_owner(tmp_path) -> None:
    access, secret = tmp_path / "access", tmp_path / "secret"
    for path, value in ((access, "AKIDFILE\n"), (secret, "secret-from-file\n")):
        path.write_text(value)
        os.chmod(path, 0o600)
    config = parse_config(s3(access_key_file=str(access), secret_key_file=str(secret)), environ={})
    assert config.storage.s3 is not None
    assert config.storage.s3.secret_key.reveal() == "secret-from-file"
    os.chmod(secret, 0o640)
    with pytest.raises(ConfigError) as error:
        parse_config(s3(access_key_file=str(access), secret_key_file=str(secret)), environ={})
    assert error.value.where == "storage.s3.secret_key_file"
    assert "readable by its group" in error.value.problem


@pytest.mark.parametrize(
    ("keys", "where", "problem"),
    [
        ({"bucket": ""}, "storage.s3.bucket", "is required"),
        ({"bucket": "Not_A_Bucket"}, "storage.s3.bucket", "is not an S3 bucket name"),
        ({"endpoint": "s3.example"}, "storage.s3.endpoint", "is not an http:// or https:// URL"),
        ({"access_key_env": "NOPE"}, "storage.s3.access_key_env", "$NOPE is not set"),
        ({"endpoint": "http://k:s@h:9000"}, "storage.s3.endpoint", "must not hold credentials"),
        ({"sekret": 1}, "storage.s3.sekret", "unknown key"),
    ],
)
def test_mistakes_name_the_key(keys, where, problem) -> None:
    with pytest.raises(ConfigError) as error:
        parse_config(s3(**keys), environ=ENV)
    assert error.value.where == where and problem in error.value.problem
    assert "secret-from-env" not in str(error.value)


def test_an_unknown_backend_names_the_key() -> None:
    with pytest.raises(ConfigError) as error:
        parse_config({"storage": {"backend": "ceph"}}, environ=ENV)
    assert error.value.where == "storage.backend"
