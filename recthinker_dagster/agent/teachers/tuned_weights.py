"""Tuned ``score_candidates`` weights of the scripted teacher (``agent/teachers/fusion.py``).

Written by ``scripts/evaluate_teachers.py --profile full --tune --write-weights``: tuned on
the train and valid tasks of each dataset (never eval), per history regime.
"""

TUNED: dict[str, dict[str, dict[str, float]]] = {
    "amazon-cds": {
        "any": {
            "bprmf": 2.0,
            "itemknn": 1.5,
            "recent": 1.2,
            "sasrec": 3.0,
            "popularity": -0.6,
            "neighbours": 0.4
        },
        "short": {
            "bprmf": 2.0,
            "itemknn": 1.5,
            "recent": 1.2,
            "sasrec": 3.0,
            "popularity": -0.6,
            "neighbours": 0.4
        }
    },
    "ml-1m": {
        "any": {
            "bprmf": 1.1,
            "itemknn": 0.1,
            "recent": 0.4,
            "sasrec": 3.0,
            "popularity": -0.7,
            "neighbours": 0.6
        },
        "short": {
            "bprmf": 1.5,
            "itemknn": -0.2,
            "recent": 0.4,
            "sasrec": 3.0,
            "popularity": -0.7,
            "neighbours": 0.4
        },
        "long": {
            "bprmf": 0.7,
            "itemknn": 0.2,
            "recent": 0.5,
            "sasrec": 3.0,
            "popularity": -1.0,
            "neighbours": 1.2
        }
    }
}
