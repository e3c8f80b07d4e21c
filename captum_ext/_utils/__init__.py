"""Private machinery shared by every captum-ext method (not public API)."""
