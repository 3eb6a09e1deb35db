"""Shard stage: one program per layer at several precisions, measured, with a manifest."""
