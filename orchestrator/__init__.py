"""The driver: Hydra entry points, the controller loop, tracking, checkpoints."""
