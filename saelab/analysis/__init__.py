"""Feature analysis: per-latent statistics, top and sampled contexts and logit effects, written to a feature store."""
