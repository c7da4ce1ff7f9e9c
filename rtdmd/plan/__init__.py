"""Will it fit? Simulate the training step at real sizes on fake tensors (``python -m rtdmd.plan``)."""
