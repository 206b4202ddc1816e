"""rlextra test suite."""
