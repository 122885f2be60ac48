"""actors room."""
