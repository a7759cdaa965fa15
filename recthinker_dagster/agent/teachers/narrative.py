"""The scripted investigator's words: "Analysis: ... Plan: ..." text that cites its evidence.

Every function reads an :class:`~recthinker_dagster.agent.teachers.evidence.Evidence` and
returns sentences; ``rng`` picks among equivalent phrasings so that trajectories do not all
read alike (seeded per task and sample, so the text is reproducible).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from recthinker_dagster.agent.teachers.evidence import Evidence, FusionWeights, zscore

TITLE_CHARS = 36


def pick(rng: np.random.Generator, *options: str) -> str:
    return options[int(rng.integers(len(options)))]


def name(ev: Evidence, k: int) -> str:
    """``C3 (Die Hard)``, or ``C3 (unknown title)``."""
    return f"{ev.labels[k]} ({ev.catalog.title(ev.items[k], TITLE_CHARS)})"


def join(parts: Sequence[str], last: str = "and") -> str:
    parts = [p for p in parts if p]
    if len(parts) <= 1:
        return "".join(parts)
    return f"{', '.join(parts[:-1])} {last} {parts[-1]}"


def pct(x: float) -> str:
    return f"{math.floor(100 * x + 0.5)}%"


# --------------------------------------------------------------------------- turn 1
def prompt_assessment(ev: Evidence, rng: np.random.Generator) -> str:
    """What the prompt alone says: recent taste, recurring creators, unknown candidates."""
    n = len(ev.labels)
    parts = []
    if ev.n_prompt == 0:
        parts.append("The prompt shows no history for this user, so I know nothing about their taste yet.")
    else:
        top = ev.recent_categories.most_common(3)
        taste = join([f"{c} ({k} of {ev.n_prompt})" for c, k in top]) or "no known categories"
        parts.append(pick(rng, f"The prompt lists the user's {ev.n_prompt} most recent items; their categories are "
                               f"mostly {taste}.",
                          f"From the {ev.n_prompt} recent items in the prompt, the user's current taste leans to "
                          f"{taste}."))
        creators = [(c, k) for c, k in ev.recent_creators.most_common(2) if k >= 2]
        if creators:
            parts.append("Recurring creators: " + join([f"{c} ({k} items)" for c, k in creators]) + ".")
        if top:
            lead = top[0][0]
            match = [ev.labels[k] for k, item in enumerate(ev.items) if lead in ev.catalog.categories_of(item)]
            if match:
                parts.append(f"{len(match)} of {n} candidates are {lead} ({', '.join(match[:6])}"
                             f"{', ...' if len(match) > 6 else ''}).")
    unknown = unknown_candidates(ev)
    if unknown:
        parts.append(f"{len(unknown)} of {n} candidates have no metadata or no title "
                     f"({', '.join(ev.labels[k] for k in unknown[:8])}{', ...' if len(unknown) > 8 else ''}), "
                     "so the prompt cannot tell me what they are.")
    else:
        parts.append(f"All {n} candidates have titles and categories.")
    parts.append(pick(rng, "Missing: how long the user's history is, their long-term taste, and any collaborative "
                           "signal about the candidates.",
                      "I do not know yet how much history the user has, what they liked over the long run, or "
                      "how collaborative filtering rates the candidates."))
    return " ".join(parts)


def unknown_candidates(ev: Evidence) -> list[int]:
    return [k for k, item in enumerate(ev.items) if not ev.known_metadata(item)]


# --------------------------------------------------------------------------- turn 2
def history_regime_text(ev: Evidence, regime: str) -> str:
    if ev.profile is None:
        return "I could not read the profile, so the length of the history is unknown."
    p = ev.profile
    cats = join([f"{c} {pct(s)}" for c, s in p["top_categories"][:4]]) or "unknown categories"
    text = f"Profile: {p['n_items']} items in the history ({regime}); top categories {cats}"
    if p.get("rating_mean") is not None:
        text += f"; mean rating {p['rating_mean']:.2f}"
    drift = p.get("drift", "")
    if drift.startswith(("shifting", "moving")):
        text += f"; {drift}"
    return text + "."


def cf_text(ev: Evidence, rng: np.random.Generator) -> str:
    if "cf" not in ev.raw:
        return "The BPR-MF scores are not available." if "score_candidates" in ev.failed else ""
    cf = ev.raw["cf"]
    known = [k for k in np.argsort(-np.nan_to_num(cf, nan=-np.inf), kind="stable") if np.isfinite(cf[k])]
    if not known:
        return "BPR-MF knows none of the candidates."
    top = join([f"{name(ev, k)} {cf[k]:.2f}" for k in known[:3]])
    margin = cf_margin(ev)
    confident = pick(rng, "a clear leader", "a confident top pick") if margin >= 0.5 else \
        pick(rng, "no clear leader", "a close race at the top")
    text = f"BPR-MF ranks {top} highest (lowest {ev.labels[known[-1]]} {cf[known[-1]]:.2f}): {confident}"
    text += f" (top-two gap {margin:.2f} standard deviations)."
    unknown = [ev.labels[k] for k in range(len(cf)) if not np.isfinite(cf[k])]
    if unknown:
        text += f" It has no data on {', '.join(unknown)}."
    return text


def cf_margin(ev: Evidence) -> float:
    if "cf" not in ev.raw:
        return 0.0
    z = np.sort(zscore(ev.raw["cf"]))[::-1]
    return float(z[0] - z[1]) if len(z) > 1 else 0.0


def item_info_text(ev: Evidence) -> str:
    if "popularity" not in ev.raw:
        return ""
    pop = ev.raw["popularity"]
    parts = []
    for k in [k for k in range(len(pop)) if np.isfinite(pop[k])][:5]:
        code = ev.catalog.code(ev.items[k])
        n, avg = int(ev.catalog.popularity[code]), ev.catalog.avg_rating[code]
        parts.append(f"{ev.labels[k]} has {n} ratings" + (f" (avg {avg:.2f})" if n else ""))
    return ("Item info: " + "; ".join(parts) + ".") if parts else ""


# --------------------------------------------------------------------------- turn 3
def neighbour_text(ev: Evidence) -> str:
    if "neighbours" not in ev.raw:
        return "The similar-users lookup failed." if "find_similar_users" in ev.failed else ""
    if not ev.neighbours:
        return "No other user shares items with this user."
    hits = ev.raw["neighbour_count"]
    ranked = [k for k in np.argsort(-hits, kind="stable") if hits[k] > 0]
    n = len(ev.neighbours)
    best = ev.neighbours[0]
    head = f"The {n} most similar users (best cosine {best[1]:.2f}, {best[2]} shared items)"
    if not ranked:
        return head + " have none of the candidates."
    return head + " have " + join([f"{ev.labels[k]} ({int(hits[k])} of {n})" for k in ranked[:4]]) + \
        (f" and {len(ranked) - 4} more candidates" if len(ranked) > 4 else "") + "."


def query_text(ev: Evidence) -> str:
    if not ev.queries:
        return ""
    return " ".join(f"{m} of the user's {ev.n_history} items match '{q}'." for q, m in ev.queries)


def contenders_text(ev: Evidence, order: Sequence[int], w: FusionWeights, k: int) -> str:
    score = ev.stage1(w)
    shown = join([f"{name(ev, i)} {score[i]:.2f}" for i in order[:k]])
    return f"Fusing the evidence so far, the leading candidates are {shown}."


# --------------------------------------------------------------------------- answer
def probe_text(ev: Evidence) -> str:
    """What the related items of the probed history items said about the candidates."""
    if not ev.probed:
        return ""
    titles = join([ev.catalog.title(item, TITLE_CHARS) for item in ev.probed])
    found = sorted(ev.history_links, key=lambda k: -max(link.cosine for link in ev.history_links[k]))
    if not found:
        return f"None of the candidates is among the items most often consumed with {titles}."
    shown = join([f"{ev.labels[k]} (cosine {max(link.cosine for link in ev.history_links[k]):.2f})" for k in found[:4]])
    return f"Items most often consumed with {titles} include {shown}."


def links_text(ev: Evidence, w: FusionWeights) -> str:
    parts = []
    for k, links in ev.links.items():  # the investigated candidates' own related items
        if not links:
            parts.append(f"{ev.labels[k]} co-occurs with none of the user's items")
            continue
        best = max(links, key=lambda link: link.cosine * w.decay ** link.age)
        title = ev.catalog.title(best.item_id, TITLE_CHARS)
        when = "the latest item" if best.age == 0 else f"{best.age} items ago"
        faded = " - all long ago" if ev.link_strength(k, w.decay) < 0.05 else ""
        parts.append(f"{ev.labels[k]} co-occurs with {len(links)} of the user's items (strongest: {title}, "
                     f"cosine {best.cosine:.2f}, {when}{faded})")
    return ("Related items: " + "; ".join(parts) + ".") if parts else ""


def reasons_for(ev: Evidence, k: int) -> str:
    """Why candidate ``k`` ranks where it does, from the evidence gathered."""
    reasons = []
    cf = ev.raw.get("cf")
    if cf is not None and np.isfinite(cf[k]):
        rank = int(np.sum(np.nan_to_num(cf, nan=-np.inf) > cf[k])) + 1
        reasons.append(f"BPR-MF {cf[k]:.2f} (#{rank})")
    if "neighbour_count" in ev.raw and ev.neighbours:
        reasons.append(f"{int(ev.raw['neighbour_count'][k])} of {len(ev.neighbours)} similar users")
    if ev.profile is not None:
        shares = dict(ev.profile["top_categories"])
        cats = [c for c in ev.catalog.categories_of(ev.items[k]) if c in shares]
        if cats:
            reasons.append(f"{cats[0]} ({pct(shares[cats[0]])} of the profile)")
    recent = [(ev.recent_categories[c], c) for c in ev.catalog.categories_of(ev.items[k])
              if ev.recent_categories.get(c)]
    if recent:
        count, cat = max(recent)
        reasons.append(f"{cat} like {count} of the {ev.n_prompt} recent items")
    creator = ev.creator(ev.items[k])
    if creator and ev.recent_creators.get(creator):
        reasons.append(f"by {creator}, like {ev.recent_creators[creator]} recent items")
    if k in ev.links or k in ev.history_links:
        n = len(ev.links_of(k))
        reasons.append(f"{n} history link{'s' if n != 1 else ''}")
    return ", ".join(reasons) or "little evidence either way"


def ranking_text(ev: Evidence, order: Sequence[int], rng: np.random.Generator) -> str:
    top = "; ".join(f"{name(ev, k)}: {reasons_for(ev, k)}" for k in order[:3])
    last = order[-1]
    return (pick(rng, "Final ranking. Top: ", "Ranking by the fused evidence. Best: ") + top
            + f". Last: {name(ev, last)} ({reasons_for(ev, last)}).")
