"""Classical recommenders (baselines and the CF model behind the collaborative tools)."""
