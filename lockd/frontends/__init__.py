"""The front ends: sockets, connections and the calls of each protocol, on one lock service."""
