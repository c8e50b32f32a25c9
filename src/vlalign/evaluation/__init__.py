"""Evaluation: retrieval scoring (ITC top-k, ITM re-ranking) and metrics as the field defines them."""
