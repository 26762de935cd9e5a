"""The training loop, its distributed process group and its pre-emption signals."""
