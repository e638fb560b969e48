"""The training pipeline: prompts -> rollouts -> rewards -> advantages -> updates, stage after stage."""
