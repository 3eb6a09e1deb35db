"""Bench stage: each measurement in a fresh worker process, under an optional memory cap; reports and plots."""
