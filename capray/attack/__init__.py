"""The protection engine (pure torch: no Ray, storage or HTTP code here)."""
