"""The run layer's helpers: batches for the algorithm, stage hand-over, monitoring during training."""
