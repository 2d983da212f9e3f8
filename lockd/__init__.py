"""lockd: a crash-safe lock manager for virtualization hosts (see README.md)."""

__version__ = "0.1.0"
