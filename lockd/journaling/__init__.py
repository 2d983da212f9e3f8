"""The journal: SQLite, its migrations, the group commit."""
