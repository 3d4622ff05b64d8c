"""Scoring a live model on PT-BR suites; knows nothing of search."""
