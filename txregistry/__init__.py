"""txregistry: a Docker/OCI registry pull-through cache on Twisted."""

__version__ = "0.1.0"
