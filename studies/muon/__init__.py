"""Muon's equilibrium angular update: the memory-factor table and its validation."""
