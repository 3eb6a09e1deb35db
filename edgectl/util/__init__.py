"""Helpers every stage may use: errors, terminal output, atomic files, process settings; imports no stage."""
