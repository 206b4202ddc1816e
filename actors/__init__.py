"""Ray actors of rlextra: rollout (vLLM), learner (DeepSpeed ZeRO rank), extrapolator (RL-Extra)."""
