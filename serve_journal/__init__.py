"""serve_journal: a prediction journal for Ray Serve."""
