"""Per-layer curvature blocks and the math they share (capture, adapters, factors, damping)."""
