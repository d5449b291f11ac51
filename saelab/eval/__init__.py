"""Evaluating SAEs: the synthetic feature-recovery benchmark and metrics on trained dictionaries."""
