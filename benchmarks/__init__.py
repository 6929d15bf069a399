"""Benchmarks of fisher-monitor (``make bench``): cost against a plain training step."""
