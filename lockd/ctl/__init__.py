"""lockctl and the operator's tools: the CLI and its output, verify, metrics text, package hooks."""
