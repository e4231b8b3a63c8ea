"""Measured figures the package reads (copies of bench/results files; tests check they match)."""
