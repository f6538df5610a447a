"""Model loading: SD 2.1 parts through `from_pretrained`, the style network, the tiny test model."""
