"""The trainer: consumes transitions and improves the policy that serves the agents."""
