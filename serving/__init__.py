"""The HTTP serving process."""
