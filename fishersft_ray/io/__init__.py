"""Where data comes from and goes to: storage locations and corpus readers."""
