"""The lock service: acquire, release, owners, fencing, recovery, counters, shared storage."""
