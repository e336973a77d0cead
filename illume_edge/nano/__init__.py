"""ILLUME-nano: a procedural shapes world with exactly known truth, and its programmatic evaluator."""
