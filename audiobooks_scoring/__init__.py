"""Nightly scoring of audiobook customers' chance to buy again."""

__version__ = "0.1.0"
