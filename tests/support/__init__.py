"""Helpers the test modules share, each defined once: no test module imports another test module."""
