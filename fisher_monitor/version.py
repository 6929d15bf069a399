"""The package's version (importable without anything else of the package)."""

__version__ = "0.1.0.dev0"

__all__ = ["__version__"]
