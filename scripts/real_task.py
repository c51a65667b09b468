#!/usr/bin/env python3
"""The real tuning task: name the category of a word, in one lower-case word.

Five categories (fruit, animal, color, vehicle, instrument), each with a fixed list of
members; every member appears in one of two question phrasings. Members are split by a
seeded shuffle into training and held-out sets, so the held-out words are never seen in
training: the model must keep using what it knows about the words and learn only the task's
answer format and label set. Scored by exact match of the greedy answer (lower-cased,
surrounding whitespace and a final full stop removed) against the category.

SmolLM2-135M-Instruct answers such questions in sentences ("An apple is a fruit."), so its
exact-match accuracy before tuning is low; BENCHMARKS.md and README.md record it.

Writes data/real_task/train.jsonl and data/real_task/eval.jsonl ({"prompt","completion"}).
    python3 scripts/real_task.py
"""
import json
import pathlib
import random

CATEGORIES = {
    "fruit": "apple banana cherry grape lemon mango orange peach pear plum kiwi papaya apricot "
             "melon lime coconut fig guava lychee raspberry strawberry blueberry pineapple "
             "watermelon nectarine pomegranate tangerine cranberry date quince".split(),
    "animal": "dog cat horse cow sheep goat lion tiger bear wolf fox rabbit deer zebra giraffe "
              "elephant monkey kangaroo camel donkey otter beaver squirrel hedgehog leopard "
              "panda koala moose badger raccoon".split(),
    "color": "red blue green yellow purple pink brown black white gray violet indigo "
             "turquoise magenta cyan beige maroon navy olive teal crimson scarlet lavender "
             "amber ivory khaki coral lilac burgundy".split(),
    "vehicle": "car bus truck bicycle motorcycle train tram van taxi scooter tractor ambulance "
               "submarine helicopter airplane boat ship canoe yacht ferry jeep limousine minivan "
               "skateboard sled glider rocket trolley wagon forklift".split(),
    "instrument": "piano guitar violin drum flute trumpet cello harp clarinet saxophone trombone "
                  "banjo ukulele accordion harmonica oboe tuba xylophone mandolin bagpipes "
                  "viola bassoon cymbals tambourine sitar organ lute harpsichord triangle "
                  "synthesizer".split(),
}
PHRASINGS = [
    "Which category does the word '{w}' belong to: fruit, animal, color, vehicle or instrument?",
    "Classify '{w}' as fruit, animal, color, vehicle or instrument.",
]


def main():
    rng = random.Random(20261130)
    train, held_out = [], []
    for cat, words in CATEGORIES.items():
        words = sorted(set(words))
        rng.shuffle(words)
        cut = len(words) * 2 // 3
        for split, part in ((train, words[:cut]), (held_out, words[cut:])):
            for w in part:
                split.append({"prompt": rng.choice(PHRASINGS).format(w=w), "completion": cat})
    rng.shuffle(train)
    rng.shuffle(held_out)
    out = pathlib.Path(__file__).resolve().parents[1] / "data" / "real_task"
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train.jsonl", train), ("eval.jsonl", held_out)):
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"{out / name}: {len(rows)} examples")


if __name__ == "__main__":
    main()
