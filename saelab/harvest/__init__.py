"""Corpus → tokens → activations on disk."""
