"""
Push-through: what clients push to a C{push = true} registry goes on to its
origin, in chunks that a CDN's body limit lets through, and a failure says
which step failed and why.

 - L{origin}: the upload protocol against the origin (L{OriginPusher});
 - L{body}: the chunk bodies, streamed from the blob with flow control;
 - L{diagnosis}: the error a failure becomes, with its likely cause.
"""

from txregistry.upstream.push.body import ChunkProducer, PushSource
from txregistry.upstream.push.diagnosis import OriginAnswer, PushFailed
from txregistry.upstream.push.origin import OriginPusher, push_scope

__all__ = [
    "ChunkProducer",
    "OriginAnswer",
    "OriginPusher",
    "PushFailed",
    "PushSource",
    "push_scope",
]
