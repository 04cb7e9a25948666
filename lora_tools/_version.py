"""The package version: a leaf module, so records can name it without importing the public API."""

__version__ = "0.1.0"
