"""Training SAEs on activations from disk: one pass over the data can train several SAEs."""
