"""Post-training with verifiable rewards: rollouts from the engine, verifiers, GRPO/DAPO."""
