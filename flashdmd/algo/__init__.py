"""The algorithm: stage-1 (timestep-aware distillation) and stage-2 (joint preference RL) steps."""
