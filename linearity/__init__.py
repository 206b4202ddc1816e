"""Pure tensor math for the linearity of RLVR trajectories (projection, trend fits, R²)."""
