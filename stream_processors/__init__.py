"""Stream processors: join calls with their (late) rewards per rollout into transitions."""
