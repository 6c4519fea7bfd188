"""Training methods (the inner maximisation) and the epoch loop around them."""
