"""Pruning: physical model surgery (``surgery``) and, on top of it, the methods' criteria."""
