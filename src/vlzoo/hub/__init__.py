"""Weights on disk: safe loading and strict key checks (download and manifest come later)."""
