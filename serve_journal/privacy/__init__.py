"""Privacy: canonical feature encoding, keys, subject tokens, crypto-shredding."""
