"""Storage, safe image decode/encode, identity discovery and the output manifest (no Ray, no torch)."""
