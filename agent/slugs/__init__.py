"""Slugs: the store (directories, tarballs, downloads, cache) and the roots a local slug must lie
under.
"""
