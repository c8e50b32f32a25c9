"""Long-run machinery: fault tolerance (non-finite guard, RNG capture, atomic checkpoints, preemption)."""
