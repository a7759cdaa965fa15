"""Ranking metrics and evaluation reports."""
