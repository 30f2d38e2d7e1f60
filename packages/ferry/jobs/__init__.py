"""Ferry."""
