"""
Where content is kept: the storage interface, the staging of downloads in
progress, and the backends.
"""
