"""Training: state, optimizer (parameter groups from the layers' tags), steps, checkpoints, loop."""
