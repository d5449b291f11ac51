"""saelab: harvest activations, train sparse autoencoders, evaluate and browse their features."""

__version__ = "0.1.0"
