"""Generate the example datasets shipped with tauon (written for this project).

    python examples/data/make_data.py            # rewrites every dataset below, beside this file

Deterministic: the same script always writes the same files (fixed seed, no clock, no network).

- sentiment.jsonl: short English reviews of products, films, restaurants, apps and services, fields
  ``text`` and ``label`` (0 negative, 1 positive), balanced 50/50, shuffled, no exact duplicates.
  Built from hand-written phrase lists and sentence templates, with some negations ("not bad",
  "wasn't worth it") so a bag of single words is not enough.
- corpus.jsonl: field ``text``, short paragraphs for causal-lm fine-tuning (a tiny "field notes" corpus
  about gardening, cooking, cycling, weather and workshops).
- chat.jsonl: field ``messages`` (OpenAI-shaped ``[{role, content}]``), short multi-turn conversations
  with "Fern", the help desk of a small houseplant shop: an optional system message, then 1-3
  user/assistant exchanges about watering, light, pets, humidity and repotting, answered from one fact
  table, so a small model can learn the facts and the turn format (dataset.type chat).
- prompt_completion.jsonl: fields ``prompt`` and ``completion``: unit conversions and plant-care
  questions with short exact answers (dataset.type prompt-completion).

chat.jsonl and prompt_completion.jsonl use their own random generators, so adding them left the first
two files byte-for-byte unchanged.
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


# --- chat and prompt-completion: a houseplant shop's help desk ---------------------------------
# name: (watering, light, pets, humidity, repotting)
PLANTS: dict[str, tuple[str, str, str, str, str]] = {
    "snake plant": (
        "every two to three weeks, once the soil is completely dry",
        "low to bright indirect light",
        "toxic to cats and dogs if chewed",
        "normal room humidity is fine",
        "every three years",
    ),
    "pothos": (
        "when the top two centimeters of soil are dry, about weekly",
        "medium indirect light",
        "toxic to cats and dogs",
        "likes some extra humidity but copes without it",
        "every two years",
    ),
    "monstera": (
        "when the top half of the soil is dry, about every ten days",
        "bright indirect light",
        "toxic to cats and dogs",
        "prefers humid air, mist or use a tray of pebbles",
        "every two years",
    ),
    "spider plant": (
        "weekly, keeping the soil lightly moist",
        "bright indirect light",
        "safe for cats and dogs",
        "normal room humidity is fine",
        "every year in spring",
    ),
    "peace lily": (
        "when the leaves start to droop slightly, about weekly",
        "low to medium indirect light",
        "toxic to cats and dogs",
        "likes humid air",
        "every year or two",
    ),
    "zz plant": (
        "every three weeks, it stores water in its roots",
        "low to bright indirect light",
        "toxic to cats and dogs",
        "normal room humidity is fine",
        "every three years",
    ),
    "boston fern": (
        "often, the soil should stay evenly moist",
        "medium indirect light",
        "safe for cats and dogs",
        "needs high humidity, a bathroom is ideal",
        "every year",
    ),
    "aloe vera": (
        "every three weeks, less in winter",
        "bright light with some direct sun",
        "toxic to cats and dogs",
        "dry air is fine",
        "every two to three years",
    ),
    "calathea": (
        "weekly with filtered or rain water, never letting it dry out",
        "medium indirect light",
        "safe for cats and dogs",
        "needs high humidity",
        "every year",
    ),
    "rubber plant": (
        "when the top few centimeters are dry, about every ten days",
        "bright indirect light",
        "toxic to cats and dogs",
        "normal room humidity is fine",
        "every two years",
    ),
    "parlor palm": (
        "when the top of the soil is dry, about weekly",
        "low to medium indirect light",
        "safe for cats and dogs",
        "likes some extra humidity",
        "every two to three years",
    ),
    "jade plant": (
        "every two to three weeks, when the soil is dry",
        "bright light with some direct sun",
        "toxic to cats and dogs",
        "dry air is fine",
        "every three years",
    ),
    "string of pearls": (
        "every two weeks, from below if possible",
        "bright indirect light",
        "toxic to cats and dogs",
        "dry air is fine",
        "every two years",
    ),
    "african violet": (
        "weekly from below, keeping water off the leaves",
        "bright indirect light",
        "safe for cats and dogs",
        "likes some extra humidity",
        "every year",
    ),
}
TOPICS = ("water", "light", "pets", "humidity", "repot")
QUESTIONS = {
    "water": [
        "How often should I water my {p}?",
        "how much water does {a} {p} need?",
        "When do I water the {p}?",
        "My {p} looks thirsty, how often should it get water?",
    ],
    "light": [
        "Where should I put my {p}?",
        "How much light does {a} {p} need?",
        "Can {a} {p} live in a dark corner?",
        "what kind of light is best for the {p}?",
    ],
    "pets": [
        "Is {a} {p} safe for my cat?",
        "I have a dog, is the {p} a problem?",
        "Are {ps} toxic to pets?",
        "can my kitten chew on {a} {p}?",
    ],
    "humidity": [
        "Does {a} {p} need humid air?",
        "My flat has dry air, is that ok for {a} {p}?",
        "Should I mist my {p}?",
    ],
    "repot": [
        "When should I repot my {p}?",
        "How often does {a} {p} need a bigger pot?",
        "is it time to repot the {p}?",
    ],
}
FOLLOW_UPS = ["And what about {t}?", "What about {t}?", "Thanks! And {t}?", "ok. and {t}?"]
TOPIC_WORDS = {
    "water": "watering",
    "light": "light",
    "pets": "pets",
    "humidity": "humidity",
    "repot": "repotting",
}
SYSTEMS = [
    "You are Fern, the help desk of a small houseplant shop. Answer briefly and kindly.",
    "You are Fern, a plant care assistant. Keep answers short.",
    "Answer houseplant questions in one or two sentences.",
]
THANKS = ["Thank you!", "thanks, that helps", "Great, thanks.", "Perfect, thank you"]
CLOSINGS = [
    "You're welcome, happy growing!",
    "Glad to help. Enjoy your plant!",
    "Any time, good luck with it!",
]


def article(plant: str) -> str:
    return "an" if plant[0] in "aeiou" else "a"


def plural(plant: str) -> str:
    return plant.replace("string of", "strings of") if plant.startswith("string of") else plant + "s"


def ask(template: str, plant: str) -> str:
    a = article(plant)
    return template.format(p=plant, a=a, A=a.capitalize(), ps=plural(plant))


def plant_answer(rng: random.Random, plant: str, topic: str) -> str:
    water, light, pets, humidity, repot = PLANTS[plant]
    p = plant[:1].upper() + plant[1:]
    a = article(plant)
    ps = plural(plant)
    ps = ps[:1].upper() + ps[1:]
    options = {
        "water": [f"Water {a} {plant} {water}.", f"{p}: water {water}."],
        "light": [f"{a.capitalize()} {plant} does best in {light}.", f"Give your {plant} {light}."],
        "pets": [f"{a.capitalize()} {plant} is {pets}.", f"{ps} are {pets}."],
        "humidity": [f"Humidity for {a} {plant}: {humidity}.", f"{p}: {humidity}."],
        "repot": [f"Repot {a} {plant} {repot}.", f"{a.capitalize()} {plant} needs a bigger pot {repot}."],
    }
    return rng.choice(options[topic])


def make_chat(rng: random.Random, n: int = 220) -> list[dict[str, object]]:
    seen: set[str] = set()
    rows: list[dict[str, object]] = []
    names = sorted(PLANTS)
    while len(rows) < n:
        plant = rng.choice(names)
        topics = rng.sample(TOPICS, rng.choice([1, 2, 2, 3]))
        msgs: list[dict[str, str]] = []
        if rng.random() < 0.5:
            msgs.append({"role": "system", "content": rng.choice(SYSTEMS)})
        for i, t in enumerate(topics):
            if i == 0:
                q = ask(rng.choice(QUESTIONS[t]), plant)
            else:
                q = rng.choice(FOLLOW_UPS).format(t=TOPIC_WORDS[t])
            msgs.append({"role": "user", "content": q})
            msgs.append({"role": "assistant", "content": plant_answer(rng, plant, t)})
        if rng.random() < 0.3:
            msgs.append({"role": "user", "content": rng.choice(THANKS)})
            msgs.append({"role": "assistant", "content": rng.choice(CLOSINGS)})
        key = json.dumps(msgs)
        if key in seen:
            continue
        seen.add(key)
        rows.append({"messages": msgs})
    return rows


# (from, to, factor)
UNITS = [
    ("kilometers", "meters", 1000),
    ("meters", "centimeters", 100),
    ("kilograms", "grams", 1000),
    ("liters", "milliliters", 1000),
    ("hours", "minutes", 60),
    ("minutes", "seconds", 60),
    ("days", "hours", 24),
    ("weeks", "days", 7),
]


def make_prompt_completion(rng: random.Random, n: int = 160) -> list[dict[str, object]]:
    seen: set[str] = set()
    rows: list[dict[str, object]] = []
    names = sorted(PLANTS)
    while len(rows) < n:
        if rng.random() < 0.5:
            src, dst, f = rng.choice(UNITS)
            k = rng.randint(1, 12)
            prompt = f"Convert {k} {src} to {dst}.\nAnswer:"
            completion = f" {k * f} {dst}"
        else:
            plant, t = rng.choice(names), rng.choice(TOPICS)
            prompt = "Question: " + ask(rng.choice(QUESTIONS[t]), plant) + "\nAnswer:"
            completion = " " + plant_answer(rng, plant, t)
        if prompt in seen:
            continue
        seen.add(prompt)
        rows.append({"prompt": prompt, "completion": completion})
    return rows


def write_jsonl(name: str, rows: list[dict[str, object]]) -> None:
    with open(HERE / name, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"wrote {HERE / name}: {len(rows)} rows")


def main() -> None:
    rng = random.Random(SEED)
    sentiment = make_sentiment(rng)
    corpus = make_corpus(rng)
    write_jsonl("sentiment.jsonl", sentiment)
    write_jsonl("corpus.jsonl", corpus)
    write_jsonl("chat.jsonl", make_chat(random.Random(SEED + 1)))
    write_jsonl("prompt_completion.jsonl", make_prompt_completion(random.Random(SEED + 2)))


if __name__ == "__main__":
    main()
