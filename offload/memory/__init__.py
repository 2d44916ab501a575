"""Where bytes live: budgets, pinned host memory, link bandwidths, the planner and the pool."""
