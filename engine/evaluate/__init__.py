"""Evaluation: metrics, retraining ground truth and peer-library adapters."""
