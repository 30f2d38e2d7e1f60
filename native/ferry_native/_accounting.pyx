# cython: language_level=3
"""placeholder until the native helper lands."""
