"""Generate the example datasets shipped with tauon (written for this project).

    python examples/data/make_data.py            # rewrites sentiment.jsonl and corpus.jsonl beside this file

Deterministic: the same script always writes the same files (fixed seed, no clock, no network).

- sentiment.jsonl: short English reviews of products, films, restaurants, apps and services, fields
  ``text`` and ``label`` (0 negative, 1 positive), balanced 50/50, shuffled, no exact duplicates.
  Built from hand-written phrase lists and sentence templates, with some negations ("not bad",
  "wasn't worth it") so a bag of single words is not enough.
- corpus.jsonl: field ``text``, short paragraphs for causal-lm fine-tuning (a tiny "field notes" corpus
  about gardening, cooking, cycling, weather and workshops).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 20261128
PER_CLASS = 260

# --- what is being reviewed -------------------------------------------------------------------
SUBJECTS = {
    "product": [
        "these headphones",
        "this blender",
        "the new laptop",
        "this backpack",
        "the coffee grinder",
        "this phone case",
        "the vacuum cleaner",
        "these running shoes",
        "the desk lamp",
        "this kettle",
        "the electric toothbrush",
        "this office chair",
        "the smart watch",
        "these kitchen knives",
        "the air fryer",
        "this rain jacket",
        "the bluetooth speaker",
        "this mattress",
    ],
    "movie": [
        "the movie",
        "this film",
        "the sequel",
        "the documentary",
        "this thriller",
        "the animated film",
        "the new series",
        "this comedy",
        "the season finale",
        "the horror movie",
        "this period drama",
        "the remake",
    ],
    "restaurant": [
        "the restaurant",
        "this cafe",
        "the pizza place",
        "the sushi bar",
        "this bakery",
        "the diner",
        "the food truck",
        "this noodle shop",
        "the steakhouse",
        "the brunch spot",
        "this taco stand",
    ],
    "app": [
        "the app",
        "this update",
        "the budgeting app",
        "the photo editor",
        "this game",
        "the music app",
        "the banking app",
        "this note-taking tool",
        "the fitness tracker app",
        "the map app",
    ],
    "service": [
        "the hotel",
        "the airline",
        "the delivery service",
        "the plumber",
        "customer support",
        "the car rental",
        "this gym",
        "the internet provider",
        "the moving company",
        "the dentist",
        "the repair shop",
        "the train company",
    ],
}

# --- domain phrases: (positive, negative) --------------------------------------------------------
POS = {
    "product": [
        "works perfectly",
        "feels solid and well made",
        "has amazing battery life",
        "was worth every penny",
        "exceeded my expectations",
        "is comfortable to use all day",
        "arrived quickly and works great",
        "is quiet and powerful",
        "still works like new after a year",
        "is easy to clean",
        "looks even better in person",
        "does exactly what it promises",
    ],
    "movie": [
        "kept me on the edge of my seat",
        "has a wonderful cast",
        "made me laugh out loud",
        "is beautifully shot",
        "has a clever and moving story",
        "was a joy to watch",
        "has a soundtrack I keep humming",
        "deserves every award",
        "got better with every scene",
        "had the whole theater cheering",
    ],
    "restaurant": [
        "served the best pasta in town",
        "had friendly and attentive staff",
        "was delicious from start to finish",
        "had generous portions",
        "made a dessert I still dream about",
        "had fresh and tasty food",
        "was cozy and welcoming",
        "had fair prices for great food",
        "brought our food hot and fast",
    ],
    "app": [
        "is fast and intuitive",
        "never crashes",
        "made my daily routine easier",
        "has a clean design",
        "syncs flawlessly across devices",
        "is genuinely useful",
        "loads instantly",
        "has helpful features without clutter",
        "keeps getting better with each update",
    ],
    "service": [
        "solved my problem in minutes",
        "was friendly and professional",
        "was on time and efficient",
        "went above and beyond",
        "made the whole process painless",
        "refunded me without any fuss",
        "was spotless and comfortable",
        "kept me informed the whole way",
        "was reliable as always",
    ],
}
NEG = {
    "product": [
        "broke after two days",
        "feels cheap and flimsy",
        "has terrible battery life",
        "was a waste of money",
        "stopped working within a week",
        "is uncomfortable to use",
        "arrived damaged",
        "is far too loud",
        "overheats constantly",
        "smells like burnt plastic",
        "looks nothing like the photos",
        "does not do what it promises",
    ],
    "movie": [
        "was painfully boring",
        "had a predictable plot",
        "dragged on for far too long",
        "had wooden acting",
        "made no sense at all",
        "was a complete letdown",
        "had an ending that ruined everything",
        "put half the audience to sleep",
        "felt like a cheap cash grab",
        "had jokes that fell flat",
    ],
    "restaurant": [
        "served cold and bland food",
        "had rude staff",
        "made us wait an hour for a table",
        "had tiny portions for the price",
        "gave me food poisoning",
        "had a dirty dining room",
        "got our order wrong twice",
        "charged us for dishes we never ordered",
        "had stale bread and soggy fries",
    ],
    "app": [
        "crashes every time I open it",
        "drains my battery",
        "is slow and confusing",
        "is full of annoying ads",
        "lost all my data",
        "logs me out constantly",
        "has a cluttered and ugly interface",
        "got worse after the update",
        "keeps freezing",
    ],
    "service": [
        "never showed up",
        "was rude and unhelpful",
        "lost my luggage",
        "kept me on hold for hours",
        "overcharged me",
        "ignored every email I sent",
        "was late and careless",
        "cancelled without warning",
        "made a simple task a nightmare",
    ],
}

# --- short generic verdicts -------------------------------------------------------------------
GEN_POS = [
    "Highly recommend.",
    "Five stars.",
    "Would buy again.",
    "I love it.",
    "Absolutely fantastic.",
    "Great value.",
    "Really impressed.",
    "A pleasant surprise.",
    "Couldn't be happier.",
    "Top notch.",
    "Totally worth it.",
    "Brilliant.",
    "I'm very satisfied.",
    "Will definitely come back.",
]
GEN_NEG = [
    "Do not recommend.",
    "One star.",
    "Never again.",
    "I hate it.",
    "Absolutely awful.",
    "Poor value.",
    "Really disappointed.",
    "A frustrating experience.",
    "Couldn't be more annoyed.",
    "Avoid.",
    "Not worth it.",
    "Terrible.",
    "I want my money back.",
    "Stay away.",
]
# negation: the literal words point the other way
NEGATED_POS = [
    "not bad at all",
    "not disappointing in the least",
    "nothing to complain about",
    "not as expensive as I feared",
    "never once let me down",
    "no problems whatsoever",
    "not boring for a second",
    "hard to fault",
]
NEGATED_NEG = [
    "not worth it",
    "not good at all",
    "not what I hoped for",
    "nothing special",
    "not something I would use again",
    "never worked properly",
    "no better than the cheap ones",
    "not even close to the reviews",
]
OPENERS = [
    "",
    "",
    "",
    "Honestly, ",
    "Well, ",
    "To be fair, ",
    "Overall, ",
    "I have to say ",
    "Wow, ",
    "Ok so ",
]
INTENS = ["", "", "really ", "truly ", "pretty ", "quite ", "so ", "absolutely "]
POS_ADJ = [
    "great",
    "excellent",
    "wonderful",
    "superb",
    "lovely",
    "fantastic",
    "impressive",
    "reliable",
    "delightful",
]
NEG_ADJ = [
    "awful",
    "horrible",
    "disappointing",
    "useless",
    "dreadful",
    "mediocre",
    "annoying",
    "unreliable",
    "poor",
]
TIMES = [
    "",
    "",
    "after a month",
    "on my first try",
    "last weekend",
    "this morning",
    "for years now",
    "so far",
]


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def review(rng: random.Random, positive: bool) -> str:
    domain = rng.choice(sorted(SUBJECTS))
    subj = rng.choice(SUBJECTS[domain])
    phrase = rng.choice((POS if positive else NEG)[domain])
    adj = rng.choice(POS_ADJ if positive else NEG_ADJ)
    verdict = rng.choice(GEN_POS if positive else GEN_NEG)
    negated = rng.choice(NEGATED_POS if positive else NEGATED_NEG)
    opener = rng.choice(OPENERS)
    inten = rng.choice(INTENS)
    when = rng.choice(TIMES)
    other_phrase = rng.choice((NEG if positive else POS)[domain])
    templates = [
        lambda: f"{opener}{subj} {phrase}.",
        lambda: f"{opener}{subj} {phrase}. {verdict}",
        lambda: f"{subj} is {inten}{adj}.",
        lambda: f"{subj} was {inten}{adj} {when}".rstrip() + ".",
        lambda: f"{verdict} {_cap(subj)} {phrase}.",
        lambda: f"{opener}{subj} was {negated}.",
        lambda: f"I expected {subj} to be {'bad' if positive else 'good'}, but it {phrase}.",
        lambda: f"Everyone said {subj} {other_phrase}, but honestly it {phrase}.",
        lambda: f"{subj}: {negated}. {verdict}",
        lambda: f"{subj} {phrase} and is {inten}{adj}.",
        lambda: (
            f"My {rng.choice(['partner', 'friend', 'sister', 'dad', 'roommate'])} thinks {subj} is {adj}, and I agree."
        ),
        lambda: f"{verdict}",
        lambda: f"{adj}!",
        lambda: f"Two words: {adj} and {rng.choice(POS_ADJ if positive else NEG_ADJ)}.",
    ]
    weights = [10, 9, 8, 6, 6, 7, 4, 3, 5, 5, 3, 1, 1, 2]
    text = rng.choices(templates, weights=weights)[0]()
    text = " ".join(text.split())
    return _cap(text)


CORPUS_TOPICS = {
    "garden": [
        "Tomatoes like full sun and steady water.",
        "Mulch keeps the soil cool in summer.",
        "Basil grows quickly when it is pinched back.",
        "Compost turns kitchen scraps into dark soil.",
        "Seedlings need light as soon as they sprout.",
        "Beans climb any string you give them.",
        "Water the roots in the morning, not the leaves.",
        "Bees visit the lavender every afternoon.",
    ],
    "kitchen": [
        "Bread dough rises faster in a warm kitchen.",
        "A sharp knife is safer than a dull one.",
        "Salt the pasta water until it tastes like the sea.",
        "Soup always tastes better the next day.",
        "Let the pan heat before the oil goes in.",
        "Rice needs a lid and a little patience.",
        "Lemon brightens almost any sauce.",
        "Onions turn sweet when they cook slowly.",
    ],
    "cycling": [
        "Check the tire pressure before every ride.",
        "A clean chain shifts smoothly.",
        "Climb hills in a low gear and keep a steady rhythm.",
        "Lights make you visible at dusk.",
        "Carry a spare tube and a small pump.",
        "Headwinds make the flat roads feel long.",
        "The river path is quiet early in the morning.",
        "Brakes squeal when the pads are worn.",
    ],
    "weather": [
        "Clouds gathered over the hills by noon.",
        "The wind shifted west before the rain.",
        "Fog lifted slowly from the valley.",
        "Frost covered the fields at dawn.",
        "Thunder rolled far away for an hour.",
        "The evening sky turned orange and pink.",
        "Snow melted quickly on the south slopes.",
        "A light drizzle fell all afternoon.",
    ],
    "workshop": [
        "Measure twice and cut once.",
        "Sand along the grain for a smooth finish.",
        "Clamp the pieces while the glue dries.",
        "A pilot hole keeps the wood from splitting.",
        "Sweep the floor before you start painting.",
        "Sharp chisels make clean joints.",
        "Oil the hinges so the door swings quietly.",
        "Label every jar of screws on the shelf.",
    ],
}
CONNECT = ["", "", "Then ", "After that, ", "Later, ", "Also, ", "In the end, ", "Meanwhile, "]


def paragraph(rng: random.Random) -> str:
    topic = rng.choice(sorted(CORPUS_TOPICS))
    n = rng.choice([1, 2, 2, 3, 3, 4])
    sents = rng.sample(CORPUS_TOPICS[topic], n)
    out = []
    for i, s in enumerate(sents):
        c = rng.choice(CONNECT) if i else ""
        out.append(c + (s[:1].lower() + s[1:] if c else s))
    return " ".join(out)


def make_sentiment(rng: random.Random) -> list[dict[str, object]]:
    seen: set[str] = set()
    rows: list[dict[str, object]] = []
    for label in (1, 0):
        count = 0
        while count < PER_CLASS:
            text = review(rng, positive=bool(label))
            if text.lower() in seen:
                continue
            seen.add(text.lower())
            rows.append({"text": text, "label": label})
            count += 1
    rng.shuffle(rows)
    return rows


def make_corpus(rng: random.Random, n: int = 200) -> list[dict[str, object]]:
    seen: set[str] = set()
    rows: list[dict[str, object]] = []
    while len(rows) < n:
        p = paragraph(rng)
        if p in seen:
            continue
        seen.add(p)
        rows.append({"text": p})
    return rows


def main() -> None:
    rng = random.Random(SEED)
    sentiment = make_sentiment(rng)
    corpus = make_corpus(rng)
    for name, rows in (("sentiment.jsonl", sentiment), ("corpus.jsonl", corpus)):
        with open(HERE / name, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        print(f"wrote {HERE / name}: {len(rows)} rows")


if __name__ == "__main__":
    main()
