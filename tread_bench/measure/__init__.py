"""Measurement: sample-quality metrics (FID, KID, precision/recall, IS) and result records."""
