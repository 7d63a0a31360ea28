"""
The OCI distribution spec's vocabulary: references and digests, media
types, manifests, and the error model.
"""
