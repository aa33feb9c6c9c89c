"""orbcast."""
