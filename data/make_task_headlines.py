"""Writes data/task_headlines_{train,test}.jsonl: news headlines sorted into the four sections of an AG News style
news site (World, Sports, Business, Science). The section names are never given in the prompt: the label set is what
fine-tuning teaches. Headlines are drawn from templates and word lists written for the project (invented teams and
companies; real country and city names) with a fixed seed, so the files are reproducible:

    python data/make_task_headlines.py          # rewrites both files; prints the label counts

Distinct headlines only, 200 per section (150 train + 50 test), and no headline in both splits.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SEED = 2027
PER_SECTION = {"train": 150, "test": 50}
PROMPTS = (
    "Headline: {h}\nWhich section of the news site does this headline go in? Reply with the section name only.",
    'Which news section does this headline belong to? "{h}" Answer with one word.',
    "Sort this headline into its section of the paper: {h}",
)

WORDS = {
    "team": ["Riverside Rovers", "Northgate United", "Harbor City", "Westbrook Wolves", "Eastfield Eagles",
             "Lakeside Lions", "Kingsport Rangers", "Millbrook Athletic", "Stonebridge Town", "Redcliff Hawks",
             "Ashford Falcons", "Pinewood City"],
    "sport": ["tennis", "cycling", "rugby", "cricket", "hockey", "basketball", "rowing", "volleyball"],
    "event": ["100 metres", "marathon", "long jump", "high jump", "400 metres hurdles", "pole vault"],
    "position": ["striker", "goalkeeper", "captain", "defender", "playmaker", "winger"],
    "tournament": ["World Cup", "European Championship", "Asian Cup", "Olympic tournament", "Nations League"],
    "company": ["Norvex Motors", "Bluepeak Foods", "Altara Bank", "Copperline Steel", "Veltro Airlines",
                "Greenmoor Energy", "Solano Retail", "Brightwave Telecom", "Kestrel Pharma", "Orrin Shipping",
                "Tamsin Textiles", "Quillon Software"],
    "product": ["electric van", "budget phone", "frozen pizza range", "smart thermostat", "family car", "laptop"],
    "money": ["2 billion dollars", "850 million euros", "1.4 billion pounds", "600 million dollars"],
    "country": ["Brazil", "Kenya", "Norway", "Japan", "Canada", "India", "Chile", "Poland", "Ghana", "Vietnam",
                "Portugal", "New Zealand", "Morocco", "Finland", "Peru", "Indonesia"],
    "city": ["Geneva", "Nairobi", "Lisbon", "Oslo", "Jakarta", "Lima", "Warsaw", "Accra", "Hanoi", "Vienna"],
    "issue": ["climate finance", "fishing rights", "water sharing", "refugee support", "trade tariffs",
              "ocean plastic"],
    "body": ["a distant star", "a red dwarf", "a young sun", "a nearby star", "a twin star", "a cool dwarf star"],
    "planet": ["Mars", "Jupiter", "Saturn", "Venus", "Neptune"],
    "animal": ["octopus", "honeybee", "sea turtle", "snow leopard", "axolotl", "bat", "coral", "tardigrade",
               "platypus", "jellyfish", "owl", "salamander", "dolphin", "ant"],
    "crop": ["wheat", "rice", "maize", "barley", "cassava", "potatoes", "sorghum", "beans"],
    "fossil": ["dinosaur", "giant penguin", "early whale", "flying reptile", "ancient shark"],
    "material": ["graphene", "a new alloy", "a ceramic", "a plant-based plastic"],
    "pct": ["2", "3", "4", "5", "7", "9", "12"],
    "ordinal": ["second", "third", "fourth", "fifth"],
    "n": ["three", "four", "five", "six", "seven", "ten"],
    "month": ["March", "April", "June", "August", "October", "November"],
}

TEMPLATES = {
    "Sports": [
        "{team} beat {team2} to reach the cup final",
        "{team} sign a new {position} on a three-year deal",
        "Coach of {team} steps down after {n} defeats in a row",
        "{country} names its squad for the {tournament}",
        "Injury rules the {team} {position} out for the season",
        "{team} clinch the league title on the final day",
        "Veteran {sport} player retires after {n} national titles",
        "Sprinter sets a new national record in the {event}",
        "{country} wins gold in {sport} at the world championships",
        "Late goal gives {team} a draw against {team2}",
    ],
    "Business": [
        "{company} shares jump {pct} percent after strong results",
        "{company} to cut jobs as sales slow in {country}",
        "{company} agrees to buy {company2} for {money}",
        "Inflation in {country} rises to {pct} percent in {month}",
        "Central bank of {country} holds interest rates steady",
        "{company} opens a new factory in {city}",
        "{company} launches a cheaper {product} to win back buyers",
        "Profits at {company} fall for a {ordinal} quarter in a row",
        "Retail sales in {country} climb {pct} percent in {month}",
        "{company} raises its forecast as demand for its {product} grows",
    ],
    "Science": [
        "Astronomers find a new planet orbiting {body}",
        "Probe sends back the first close images of {planet}",
        "Researchers map the full genome of the {animal}",
        "Fossil of a {fossil} found in {country}",
        "Scientists breed {crop} that needs half the water",
        "Study shows the {animal} can sense magnetic fields",
        "Engineers make a battery from {material} that charges in {n} minutes",
        "Telescope spots water vapour on a planet near {body}",
        "Lab in {country} builds a faster quantum chip",
        "Researchers in {city} grow {crop} in salty soil",
        "Scientists in {country} track the {animal} by satellite",
        "New model explains how the {animal} survives the cold",
    ],
    "World": [
        "Leaders of {country} and {country2} sign a trade deal",
        "{country} votes in a close general election",
        "Floods force thousands from their homes in {country}",
        "Foreign ministers meet in {city} for talks on {issue}",
        "{country} reopens its border with {country2} after {n} years",
        "New president of {country} sworn in",
        "Summit in {city} ends with a pledge on {issue}",
        "{country} and {country2} restore diplomatic ties",
        "Parliament of {country} passes a new law on {issue}",
        "Aid arrives in {country} after the earthquake",
    ],
}


def fill(template: str, rng: random.Random) -> str:
    """One headline: each slot drawn from its word list; a "...2" slot differs from its first."""
    values = {}
    for key in WORDS:
        first, second = rng.sample(WORDS[key], 2)
        values[key], values[key + "2"] = first, second
    return template.format(**values)


def make(seed: int = SEED) -> dict[str, list[dict]]:
    """The two splits, balanced by section; every headline distinct, in one split only."""
    rng = random.Random(seed)
    per = sum(PER_SECTION.values())
    rows = []
    for section, templates in TEMPLATES.items():
        seen: set[str] = set()
        for _ in range(100 * per):  # far more draws than needed; a short list would end the loop, not hang it
            if len(seen) == per:
                break
            headline = fill(rng.choice(templates), rng)
            if headline not in seen:
                seen.add(headline)
                rows.append((headline, section))
        assert len(seen) == per, f"{section}: only {len(seen)} distinct headlines"
    rng.shuffle(rows)
    splits = {"train": [], "test": []}
    counts = {(split, section): 0 for split in splits for section in TEMPLATES}
    for headline, section in rows:  # fill train first: the first 150 of a section train, the next 50 test
        split = "train" if counts["train", section] < PER_SECTION["train"] else "test"
        counts[split, section] += 1
        splits[split].append((headline, section))
    out, k = {}, 0
    for split in ("train", "test"):
        out[split] = []
        for headline, section in splits[split]:
            k += 1
            prompt = rng.choice(PROMPTS).format(h=headline)
            out[split].append({"id": f"hl-{k:04d}", "prompt": prompt, "response": section, "label": "benign",
                               "category": "headlines"})
    return out


def main() -> None:
    here = Path(__file__).resolve().parent
    splits = make()
    for split, rows in splits.items():
        with open(here / f"task_headlines_{split}.jsonl", "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        counts = {s: sum(r["response"] == s for r in rows) for s in TEMPLATES}
        print(split, len(rows), counts)


if __name__ == "__main__":
    main()
