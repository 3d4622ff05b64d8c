"""Merge-search campaigns and the ``brmerge`` command line."""
