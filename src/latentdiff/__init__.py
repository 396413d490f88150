"""latentdiff."""
