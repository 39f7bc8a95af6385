"""Outcomes: labels and realised values that arrive after the decision, kept append-only."""
