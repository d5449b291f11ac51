"""Evaluation: reconstruction and sparsity metrics, CE loss recovered, and synthetic feature recovery."""
