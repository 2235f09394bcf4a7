"""Thin adapters to trainers (TRL, transformers)."""
