"""Training callbacks, one concern per file."""
