"""Small helpers shared across layers (collectives)."""
