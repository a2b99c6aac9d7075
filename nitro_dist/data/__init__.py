"""Training data: prompts with (offline mode) the teacher's x0 for a stored noise seed."""
