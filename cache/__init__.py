"""harmonia-cache: a harmonia-compatible Nix binary cache server on trio."""

__version__ = "0.1.0"
