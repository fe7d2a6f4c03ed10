"""Test and benchmark support: random-weight checkpoints in the HF format at real model shapes."""
