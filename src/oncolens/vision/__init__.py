"""Image bytes -> model input -> model outputs: decode, prepare, heat-maps, out-of-domain and quality checks."""
