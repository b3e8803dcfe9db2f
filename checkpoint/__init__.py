"""Device-agnostic checkpoints: save once, load into any layout."""
