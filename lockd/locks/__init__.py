"""What a lock and a lease are: OFD locks, lockspaces, owner processes, the lease state machine."""
