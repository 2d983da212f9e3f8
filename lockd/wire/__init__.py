"""The wire codecs, sans-IO: Varlink and virtlockd's protocol (bytes in, calls out)."""
