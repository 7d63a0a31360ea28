"""
The HTTP face of txregistry: the site, routing, and one resource per kind
of request.
"""
