"""
Upload sessions: a blob being pushed, across the requests that send it.

An upload starts with a C{POST}, receives its bytes in order from one or
more C{PATCH}es or a C{PUT}, and ends with the C{PUT ?digest=} that names
what it must be, or a C{DELETE}, or by expiring after C{expire_after}
seconds without a request.  Its bytes go into a staged blob of the storage
as they arrive (written and hashed off the reactor thread), never into
memory, so a 1 GiB layer costs what a 1 KiB one does.

Sessions live in memory: a restart loses uploads in progress, which the
clients then start again, and nothing of them is stored.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from txregistry.oci.errors import RegistryError
from txregistry.oci.reference import Digest
from txregistry.repository.interface import Route
from txregistry.repository.push import VerifiedBlob
from txregistry.storage.interface import IStagedBlob, IStorage

# Uploads are hashed with SHA-256 unless the first request names another
# algorithm (a single POST ?digest=): every client pushes sha256 digests.
UPLOAD_ALGORITHM = "sha256"
_PLACEHOLDER_HEX = {"sha256": "0" * 64, "sha512": "0" * 128}


def blob_upload_unknown(upload_id: str) -> RegistryError:
    return RegistryError(
        404,
        "BLOB_UPLOAD_UNKNOWN",
        f"no upload {upload_id[:100]!r} in progress: it finished, was cancelled or expired"
        " (or txregistry restarted); start the push again",
    )


@dataclass(eq=False)
class Upload:
    """
    One upload in progress.

    @ivar received: how many bytes have been appended, in order.
    @ivar busy: whether a request is sending it bytes now; a second one is
        refused, and it does not expire meanwhile.
    """

    id: str
    route: Route
    staged: IStagedBlob
    algorithm: str
    started_at: float
    received: int = 0
    busy: bool = False
    timer: IDelayedCall | None = field(default=None, repr=False)

    @property
    def repository(self) -> str:
        return f"{self.route.registry.name}/{self.route.repository}"


class Uploads:
    """The upload sessions in progress, by id, and their expiry."""

    log = Logger()

    def __init__(
        self,
        storage: IStorage,
        clock: IReactorTime,
        expire_after: float = 1800.0,
        new_id: Callable[[], str] = lambda: str(uuid.uuid4()),
        max_uploads: int = 128,
    ) -> None:
        """
        @param max_uploads: how many uploads may be in progress at once: each
            holds a staged file open, and its writer's threads.
        """
        self._storage = storage
        self._clock = clock
        self.expire_after = expire_after
        self._new_id = new_id
        self.max_uploads = max_uploads
        self._uploads: dict[str, Upload] = {}
        self.expired = 0

    def __len__(self) -> int:
        return len(self._uploads)

    def start(self, route: Route, algorithm: str = UPLOAD_ALGORITHM) -> Upload:
        """
        A new upload to C{route}'s repository.

        @raise RegistryError: 503 when the storage cannot stage anything.
        """
        if len(self._uploads) >= self.max_uploads:
            raise RegistryError(
                429,
                "TOOMANYREQUESTS",
                f"{len(self._uploads)} uploads are in progress, the most txregistry keeps:"
                " finish or cancel some, or wait for abandoned ones to expire",
                headers={"Retry-After": "10"},
            )
        if not self._storage.can_stage(None):
            raise _cannot_store(self._storage.problem or "the cache is not open")
        try:
            staged = self._storage.stage_blob(Digest(algorithm, _PLACEHOLDER_HEX[algorithm]))
        except OSError as e:
            raise _cannot_store(e.strerror or str(e)) from None
        upload = Upload(self._new_id(), route, staged, algorithm, self._clock.seconds())
        self._uploads[upload.id] = upload
        self.touch(upload)
        return upload

    def find(self, route: Route, upload_id: str) -> Upload:
        """
        The upload C{upload_id} of C{route}'s repository.

        @raise RegistryError: 404 C{BLOB_UPLOAD_UNKNOWN}, also for an upload
            of another repository: its id is no key to other repositories.
        """
        upload = self._uploads.get(upload_id)
        if upload is None or (upload.route.registry, upload.route.repository) != (
            route.registry,
            route.repository,
        ):
            raise blob_upload_unknown(upload_id)
        return upload

    def touch(self, upload: Upload) -> None:
        """Something happened to C{upload}: its expiry starts again."""
        if upload.timer is not None and upload.timer.active():
            upload.timer.cancel()
        upload.timer = self._clock.callLater(self.expire_after, self._expire, upload)

    def _expire(self, upload: Upload) -> None:
        upload.timer = None
        if upload.busy:
            # A body is still arriving (slowly): the request's own timeouts
            # deal with that.
            self.touch(upload)
            return
        self.expired += 1
        self.log.info(
            "upload {id} to {repository} expired after {idle:.0f}s without a request;"
            " {received} bytes dropped",
            id=upload.id,
            repository=upload.repository,
            idle=self.expire_after,
            received=upload.received,
        )
        self.drop(upload)

    def append(self, upload: Upload, data: bytes) -> None:
        upload.staged.append(data)
        upload.received += len(data)

    async def complete(self, upload: Upload, digest: Digest) -> VerifiedBlob:
        """
        Seal C{upload} and check it is C{digest}.  The upload is no longer
        in progress whatever the outcome; on success, its caller hands the
        blob on and then calls L{release}.

        @raise RegistryError: 400 C{DIGEST_INVALID} when the bytes are not
            C{digest}; nothing of them is kept.
        """
        self._forget(upload)
        if digest.algorithm != upload.algorithm:
            self.release(upload)
            raise RegistryError.digest_invalid(
                f"upload {upload.id} was hashed with {upload.algorithm}, not"
                f" {digest.algorithm}: push {upload.algorithm} digests"
            )
        try:
            hex_digest = await upload.staged.seal()
        except Exception:
            self.release(upload)
            raise
        failure = upload.staged.failure
        if failure is not None:
            self.release(upload)
            raise _cannot_store(failure.strerror or str(failure))
        if hex_digest != digest.hex:
            self.release(upload)
            raise RegistryError.digest_invalid(
                f"the {upload.received} bytes uploaded to {upload.repository} have digest"
                f" {upload.algorithm}:{hex_digest}, not {digest}: nothing was stored;"
                " the client sent other bytes than it meant to (push again)",
            )
        return VerifiedBlob(digest, upload.received, upload.staged)

    def release(self, upload: Upload) -> None:
        """Let go of a finished upload's staged bytes (a no-op for committed ones)."""
        upload.staged.abort()
        upload.staged.close()

    def drop(self, upload: Upload) -> None:
        """Cancel an upload: nothing of it is ever stored."""
        self._forget(upload)
        self.release(upload)

    def _forget(self, upload: Upload) -> None:
        self._uploads.pop(upload.id, None)
        if upload.timer is not None and upload.timer.active():
            upload.timer.cancel()
        upload.timer = None

    def drop_all(self) -> None:
        """At stop: every upload in progress is dropped."""
        for upload in list(self._uploads.values()):
            self.drop(upload)


def _cannot_store(problem: str) -> RegistryError:
    return RegistryError(
        503,
        "UNAVAILABLE",
        f"txregistry cannot store the upload: {problem}; check the cache directory"
        " (disk space, permissions) and /health",
    )
