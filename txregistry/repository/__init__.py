"""
What a request can ask of a registry (the repository interface), and the
pull-through implementation of it.
"""
