"""Evidence bundles: what an examiner takes away, checked offline."""
