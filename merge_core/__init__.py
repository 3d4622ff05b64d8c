"""Merging model weights: methods, recipes, I/O, plans and their execution.

Knows nothing of search or evaluation.
"""
