"""The `herd` command line."""
