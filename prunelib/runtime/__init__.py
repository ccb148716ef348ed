"""Runtimes other than PyTorch: export a (pruned) model to an engine's format, check it, time it there."""
