"""`voicectl`: the operations console script (run the stack, inspect and steer the fleet)."""
