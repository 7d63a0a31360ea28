"""The C{txregistry} command."""
