"""reward room."""
