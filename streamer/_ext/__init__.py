"""Compiled hot path of the matcher (Cython); see ``_core.pyx``."""
