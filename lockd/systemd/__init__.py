"""systemd glue: readiness, watchdog, the fd store, re-exec in place."""
