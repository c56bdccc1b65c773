"""The embedded default dataset: a deterministic synthetic shop whose item text carries signal.

Items belong to a category and are described with that category's vocabulary, so a text
encoder can tell which items go together without seeing any interaction. Users have tastes that
are mixtures of a few categories and, for some users, drift to another mixture over their life.
Events come in sessions that stay within one category (so recent history predicts the next
item), have several types and timestamps. Everything is vectorised with numpy and written shard
by shard: 10^7 events take well under a minute and never sit in memory at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterator, List, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from components.data.schemas import EVENT_SCHEMA, ITEM_SCHEMA

# name: (nouns, adjectives, phrases). Words are chosen to be distinct across categories.
CATEGORIES: Dict[str, Tuple[List[str], List[str], List[str]]] = {
    "Hiking & Camping": (["tent", "backpack", "trail map", "sleeping bag", "trekking pole", "headlamp", "camp stove"],
                         ["ultralight", "waterproof", "rugged", "alpine", "packable"],
                         ["built for long trails and mountain nights", "keeps you dry at the campsite",
                          "made for backcountry adventures"]),
    "Cooking": (["chef knife", "cast iron skillet", "spice rack", "dutch oven", "cookbook", "saucepan"],
                ["seasoned", "nonstick", "handcrafted", "professional", "heirloom"],
                ["for simmering sauces and searing steaks", "brings restaurant flavour to your kitchen",
                 "loved by home cooks and bakers"]),
    "Jazz Music": (["saxophone record", "vinyl album", "trumpet songbook", "bebop anthology", "live club recording"],
                   ["smooth", "swinging", "improvised", "soulful", "late-night"],
                   ["featuring virtuoso horn solos and walking bass", "recorded live in a smoky club",
                    "a classic of modal and bebop jazz"]),
    "Science Fiction": (["space opera novel", "cyberpunk thriller", "starship saga", "time travel story", "android epic"],
                        ["interstellar", "dystopian", "futuristic", "galactic", "quantum"],
                        ["set among distant stars and alien empires", "where robots question their makers",
                         "a mind-bending voyage through time and space"]),
    "Gardening": (["seed kit", "pruning shears", "raised bed", "compost bin", "watering can", "trowel"],
                  ["organic", "heirloom", "perennial", "drought-tolerant", "blooming"],
                  ["for vegetables, herbs and flowering borders", "helps tomatoes and roses thrive",
                   "grow greener beds from spring to autumn"]),
    "Fitness": (["yoga mat", "kettlebell", "resistance band", "dumbbell set", "jump rope", "foam roller"],
                ["high-intensity", "ergonomic", "non-slip", "adjustable", "cardio"],
                ["for strength training and daily workouts", "tones muscles and builds endurance",
                 "a home gym essential for every athlete"]),
    "Baby & Toddler": (["stroller", "crib mobile", "teething toy", "diaper bag", "baby monitor", "sippy cup"],
                       ["gentle", "hypoallergenic", "cuddly", "bpa-free", "soothing"],
                       ["keeps infants calm through naps and nights", "designed for newborns and toddlers",
                        "a nursery favourite of new parents"]),
    "Photography": (["prime lens", "tripod", "camera bag", "flash unit", "light meter", "lens filter"],
                    ["full-frame", "mirrorless", "telephoto", "weather-sealed", "wide-angle"],
                    ["captures crisp portraits and landscapes", "for sharp shots at golden hour",
                     "trusted by wedding and wildlife photographers"]),
    "Board Games": (["strategy game", "card deck", "dice set", "cooperative puzzle game", "party game"],
                    ["competitive", "family-friendly", "tactical", "deck-building", "legacy"],
                    ["for game nights with friends and family", "plan, trade and outwit your rivals",
                     "roll the dice and conquer the board"]),
    "Coffee & Tea": (["espresso grinder", "pour-over kettle", "matcha whisk", "french press", "loose leaf tea"],
                     ["single-origin", "dark roast", "aromatic", "freshly ground", "ceremonial"],
                     ["brews a rich crema every morning", "for slow tea rituals and bold espresso",
                      "from bean to cup with barista precision"]),
    "Cycling": (["road bike helmet", "bike light", "chain lube", "saddle", "cycling jersey", "mini pump"],
                ["aerodynamic", "carbon", "reflective", "lightweight", "clipless"],
                ["for long rides, climbs and sprints", "keeps cyclists safe in traffic",
                 "tuned for road racing and gravel tours"]),
    "Pet Supplies": (["dog leash", "cat scratching post", "chew toy", "pet bed", "aquarium filter", "bird feeder"],
                     ["durable", "washable", "grain-free", "playful", "orthopedic"],
                     ["your dog or cat will love it", "keeps pets happy, healthy and busy",
                      "for puppies, kittens and senior companions"]),
    "Home Office": (["standing desk", "monitor arm", "mechanical keyboard", "desk lamp", "ergonomic chair"],
                    ["adjustable", "minimalist", "cable-managed", "quiet", "productive"],
                    ["makes remote work comfortable", "for long days of typing and video calls",
                     "organise your workspace and stay focused"]),
    "Skincare": (["moisturiser", "sunscreen", "serum", "face mask", "cleanser", "lip balm"],
                 ["hydrating", "fragrance-free", "vitamin c", "gentle", "spf 50"],
                 ["for radiant, hydrated skin", "soothes dry and sensitive complexions",
                  "a dermatologist-approved daily routine"]),
    "History Books": (["biography", "war chronicle", "ancient empire history", "medieval atlas", "revolution memoir"],
                      ["epic", "archival", "illustrated", "scholarly", "award-winning"],
                      ["retells the rise and fall of ancient empires", "from the pharaohs to the world wars",
                       "drawn from letters, battles and royal archives"]),
    "Video Games": (["open-world rpg", "racing game", "platformer", "shooter", "gaming headset", "controller"],
                    ["multiplayer", "pixel-art", "next-gen", "immersive", "retro"],
                    ["level up, loot and explore dungeons", "compete online with friends",
                     "hours of quests, boss fights and speedruns"]),
    "Knitting & Crafts": (["yarn bundle", "knitting needles", "embroidery hoop", "quilting fabric", "sewing kit"],
                          ["hand-dyed", "chunky", "merino", "pastel", "beginner-friendly"],
                          ["for cosy scarves, quilts and sweaters", "stitch, knit and crochet your own designs",
                           "a crafter's stash of colourful patterns"]),
    "Wine & Spirits": (["red wine", "whisky decanter", "cocktail shaker", "champagne flutes", "wine opener"],
                       ["aged", "oak-barrel", "vintage", "sparkling", "full-bodied"],
                       ["for tasting evenings and cocktail parties", "notes of cherry, oak and vanilla",
                        "pairs beautifully with cheese and dinner"]),
    "Kids Science": (["chemistry set", "telescope kit", "robotics kit", "microscope", "volcano experiment"],
                     ["educational", "hands-on", "stem", "curious", "build-your-own"],
                     ["sparks curiosity in young scientists", "experiments for kids aged eight and up",
                      "learn physics, coding and chemistry by playing"]),
    "Fishing": (["fly rod", "tackle box", "fishing reel", "lure set", "waders"],
                ["saltwater", "freshwater", "spinning", "baitcasting", "trout"],
                ["for bass, trout and salmon on the river", "cast farther and land the big catch",
                 "a weekend on the lake with rod and reel"]),
}
BRANDS = ["Northwind", "Acme", "Bluebird", "Oakridge", "Lumen", "Parallax", "Kestrel", "Harbor", "Solace", "Vantage"]
EVENT_MIX = (("view", 0.55), ("click", 0.25), ("cart", 0.09), ("purchase", 0.06), ("rate", 0.05))
T0_MS = 1_704_067_200_000  # 2024-01-01T00:00:00Z


@dataclass
class SyntheticWorld:
    """Items and user tastes; events are drawn from it shard by shard."""

    items: pa.Table
    item_cat: np.ndarray  # primary category per item
    cat_items: List[np.ndarray]  # item indices per category, by popularity
    cat_cdf: List[np.ndarray]  # cumulative popularity per category
    taste_a: np.ndarray  # users x categories
    taste_b: np.ndarray
    activity: np.ndarray  # events per user
    start_ms: np.ndarray


def sizes(num_events: int, num_users: int | None, num_items: int | None) -> Tuple[int, int]:
    users = num_users or max(50, num_events // 30)
    items = num_items or max(100, min(200_000, num_events // 60))
    return users, items


def build_world(cfg, seed: int) -> SyntheticWorld:
    """cfg: SyntheticConfig."""
    rng = np.random.default_rng(seed)
    n_users, n_items = sizes(cfg.num_events, cfg.num_users, cfg.num_items)
    names = list(CATEGORIES)[: max(2, min(cfg.num_categories, len(CATEGORIES)))]
    n_cat = len(names)
    item_cat = rng.integers(0, n_cat, n_items)
    second = np.where(rng.random(n_items) < 0.3, rng.integers(0, n_cat, n_items), -1)
    pop = 1.0 / (1.0 + rng.permutation(n_items)) ** 0.8
    cat_items, cat_cdf = [], []
    for c in range(n_cat):
        idx = np.flatnonzero(item_cat == c)
        idx = idx[np.argsort(-pop[idx], kind="stable")]
        cat_items.append(idx)
        cdf = np.cumsum(pop[idx])
        cat_cdf.append(cdf / cdf[-1] if len(cdf) else cdf)
    items = _catalog(rng, names, item_cat, second)

    k = min(3, n_cat)
    taste_a = _tastes(rng, n_users, n_cat, k)
    taste_b = np.where((rng.random(n_users) < cfg.drift)[:, None], _tastes(rng, n_users, n_cat, k), taste_a)
    act = rng.lognormal(0.0, 0.9, n_users)
    activity = np.maximum(3, np.round(act / act.sum() * cfg.num_events)).astype(np.int64)
    # Trim or pad so the total is exactly num_events (largest users absorb the difference).
    diff = int(cfg.num_events - activity.sum())
    order = np.argsort(-activity, kind="stable")
    i = 0
    while diff != 0:
        u = order[i % n_users]
        step = 1 if diff > 0 else -1
        if activity[u] + step >= 3:
            activity[u] += step
            diff -= step
        i += 1
    span = cfg.days * 86_400_000
    start = T0_MS + (rng.random(n_users) * span * 0.5).astype(np.int64)
    return SyntheticWorld(items, item_cat, cat_items, cat_cdf, taste_a, taste_b, activity, start)


def _tastes(rng, n_users: int, n_cat: int, k: int) -> np.ndarray:
    """Each user likes k categories with Dirichlet weights (plus a little of everything)."""
    t = np.full((n_users, n_cat), 0.02 / n_cat)
    picks = np.argsort(rng.random((n_users, n_cat)), axis=1)[:, :k]
    w = rng.dirichlet(np.full(k, 0.7), n_users)
    np.put_along_axis(t, picks, np.take_along_axis(t, picks, 1) + w, axis=1)
    return t / t.sum(1, keepdims=True)


def _catalog(rng, names: List[str], item_cat: np.ndarray, second: np.ndarray) -> pa.Table:
    ids, titles, texts, cats = [], [], [], []
    for i, (c, s) in enumerate(zip(item_cat, second)):
        nouns, adjs, phrases = CATEGORIES[names[c]]
        noun, adj = nouns[rng.integers(len(nouns))], adjs[rng.integers(len(adjs))]
        brand = BRANDS[rng.integers(len(BRANDS))]
        title = f"{brand} {adj.title()} {noun.title()} {rng.integers(2, 99)}"
        sentences = [f"A {adj} {noun} from {brand}, {phrases[rng.integers(len(phrases))]}."]
        adj2 = adjs[rng.integers(len(adjs))]
        sentences.append(f"{adj2.capitalize()} and {phrases[rng.integers(len(phrases))]} &amp; more.")
        cat_list = [names[c]]
        if s >= 0 and s != c:
            n2, a2, _ = CATEGORIES[names[s]]
            sentences.append(f"Pairs well with a {a2[rng.integers(len(a2))]} {n2[rng.integers(len(n2))]}.")
            cat_list.append(names[s])
        ids.append(f"i{i:06d}")
        titles.append(title)
        texts.append(" ".join(sentences))
        cats.append(cat_list)
    n = len(ids)
    updated = T0_MS - (rng.random(n) * 365 * 86_400_000).astype(np.int64)
    return pa.table(
        {"item_id": ids, "title": titles, "text": texts, "categories": cats,
         "updated_at": pa.array(updated).cast(pa.timestamp("ms", tz="UTC"))},
        schema=ITEM_SCHEMA,
    )


def generate_shards(world: SyntheticWorld, cfg, seed: int) -> Iterator[pa.Table]:
    """Yield event tables (EVENT_SCHEMA), one per shard; users are partitioned across shards."""
    n_users = len(world.activity)
    bounds = np.linspace(0, n_users, max(1, cfg.num_shards) + 1).astype(int)
    for s in range(len(bounds) - 1):
        users = np.arange(bounds[s], bounds[s + 1])
        if len(users):
            yield _events_for(world, users, cfg, np.random.default_rng([seed, s]))


def _events_for(world: SyntheticWorld, users: np.ndarray, cfg, rng) -> pa.Table:
    counts = world.activity[users]
    n = int(counts.sum())
    user = np.repeat(users, counts)
    first = np.zeros(n, dtype=bool)
    first[np.concatenate([[0], np.cumsum(counts)[:-1]])] = True
    pos = np.arange(n) - np.repeat(np.cumsum(counts) - counts, counts)
    frac = pos / np.repeat(np.maximum(counts - 1, 1), counts)
    new_session = first | (rng.random(n) < 1.0 / max(cfg.session_length, 1.0))
    session = np.cumsum(new_session) - 1
    s_idx = np.flatnonzero(new_session)
    s_user, s_frac = user[s_idx], frac[s_idx]
    mix = (1 - s_frac)[:, None] * world.taste_a[s_user] + s_frac[:, None] * world.taste_b[s_user]
    s_cat = (rng.random(len(s_idx))[:, None] > np.cumsum(mix, 1)).sum(1)
    s_cat = np.minimum(s_cat, mix.shape[1] - 1)
    cat = s_cat[session]
    item = np.empty(n, dtype=np.int64)
    u = rng.random(n)
    for c in np.unique(cat):
        m = cat == c
        if len(world.cat_items[c]) == 0:
            item[m] = rng.integers(0, len(world.item_cat), m.sum())
        else:
            item[m] = world.cat_items[c][np.searchsorted(world.cat_cdf[c], u[m], side="right").clip(0, len(world.cat_cdf[c]) - 1)]
    # Time: seconds to minutes inside a session, hours to days between sessions.
    life_sessions = np.bincount(np.searchsorted(users, s_user), minlength=len(users))
    between = (cfg.days * 86_400_000 * 0.5) / np.maximum(life_sessions, 1)
    gap = np.where(new_session, rng.exponential(1.0, n) * np.repeat(between, counts), rng.exponential(90_000, n))
    gap[first] = 0
    ts = np.cumsum(gap)
    ts = ts - np.repeat(ts[first], counts) + np.repeat(world.start_ms[users], counts)
    names, probs = zip(*EVENT_MIX)
    ev = rng.choice(len(names), n, p=np.array(probs) / sum(probs))
    value = np.where(np.array(names)[ev] == "rate", np.clip(np.round(rng.normal(4.0, 0.9, n)), 1, 5), np.nan)
    user_ids = pa.array([f"u{x:07d}" for x in users])
    user_col = pa.DictionaryArray.from_arrays(pa.array(np.repeat(np.arange(len(users)), counts)), user_ids)
    item_col = pc.take(world.items["item_id"], pa.array(item))
    user_str = user_col.cast(pa.string())
    session_id = pc.binary_join_element_wise(user_str, pa.array(session - session[np.repeat(np.flatnonzero(first), counts)]).cast(pa.string()), "-s")
    table = pa.table(
        {
            "user_id": user_str,
            "item_id": item_col,
            "ts": pa.array(ts.astype(np.int64)).cast(pa.timestamp("ms", tz="UTC")),
            "event": pa.DictionaryArray.from_arrays(pa.array(ev.astype(np.int32)), pa.array(names)).cast(pa.string()),
            "value": pa.array(value, mask=np.isnan(value)),
            "session_id": session_id,
            "context": pa.nulls(n, pa.string()),
        },
        schema=EVENT_SCHEMA,
    )
    # Logs arrive in time order within a shard.
    return table.take(pc.sort_indices(table, [("ts", "ascending"), ("user_id", "ascending")]))
