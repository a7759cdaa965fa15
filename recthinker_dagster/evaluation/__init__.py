"""What the evaluation stage is made of: per-task rows of recommenders and agents, summaries
with bootstrap intervals, the LLM systems, results tables and plots (``stages/evaluation.py``
puts them together)."""
