"""Sweeps (lists of dotted config overrides), a resumable local launcher and report builder."""
