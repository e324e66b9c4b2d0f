"""The run layer: the training entry point and loop, checkpoints, preemption, step guard, health
monitors, stage hand-over and the batches the algorithm consumes."""
