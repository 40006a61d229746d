"""Evaluation: retrieval recall, compositional accuracy, zero-shot classification."""
