"""adamgen's version; part of every cache key, so a new release never loads an old artifact."""

__version__ = "0.1.0"
