"""Ray actors of rlextra (rollout, learner, extrapolator) and the pure-torch algorithm core they share."""
