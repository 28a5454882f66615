"""Deterministic synthetic data with learnable structure: `python -m jobs.synth OUT_DIR [--seed N]`.

Everything the tests and the tiny examples train on comes from here, so that nothing needs the network:

- `corpus.txt`: pre-training text, one document per line. A small "world" of people, cities, companies and
  objects with fixed facts (each person lives in one city and works for one company), told in templated
  sentences. A masked word is predictable from its context, so MLM loss falls far below the unigram level.
- `sentiment-{train,validation,test}.jsonl`: `text`, `label` (positive / negative) reviews.
- `ner-{train,validation,test}.jsonl`: `tokens`, `tags` with BIO tags for PER, LOC, ORG.
- `qa-{train,validation,test}.jsonl`: SQuAD-style `id`, `question`, `context`, `answers`.

The same seed always writes byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

FIRST = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy", "mallory", "oscar",
         "peggy", "rupert", "sybil", "trent", "victor", "walter", "xena", "yusuf", "zoe", "liam", "mia", "noah"]
LAST = ["smith", "jones", "brown", "miller", "davis", "garcia", "wilson", "moore", "taylor", "clark"]
CITIES = ["paris", "rome", "berlin", "madrid", "vienna", "oslo", "lisbon", "dublin", "prague", "warsaw",
          "new york", "los angeles", "hong kong", "buenos aires", "cape town", "tokyo"]
ORGS = ["acme corp", "globex", "initech", "umbrella labs", "stark industries", "wayne enterprises", "hooli",
        "vandelay imports", "soylent", "tyrell systems"]
NOUNS = ["film", "book", "phone", "laptop", "coffee", "hotel", "game", "album", "camera", "chair", "pizza", "car"]
POS = ["great", "excellent", "wonderful", "superb", "delightful", "fantastic", "brilliant", "lovely"]
NEG = ["terrible", "awful", "horrible", "dreadful", "boring", "disappointing", "poor", "useless"]
NEUTRAL = ["new", "old", "red", "small", "large", "cheap", "modern", "famous"]
VERBS = ["bought", "sold", "liked", "used", "borrowed", "painted", "reviewed", "found"]


class World:
    """People with fixed facts: a person always lives in the same city and works for the same company."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.people = [f"{f} {l}" for f in FIRST for l in LAST]
        self.home = {p: rng.choice(CITIES) for p in self.people}
        self.job = {p: rng.choice(ORGS) for p in self.people}
        self.hq = {o: rng.choice(CITIES) for o in ORGS}

    def fact(self, person: str) -> str:
        r = self.rng.random()
        if r < 0.4:
            return f"{person} lives in {self.home[person]} ."
        if r < 0.8:
            return f"{person} works for {self.job[person]} ."
        org = self.job[person]
        return f"{org} is based in {self.hq[org]} ."

    def object_sentence(self) -> str:
        rng = self.rng
        noun = rng.choice(NOUNS)
        return f"the {rng.choice(NEUTRAL)} {noun} {rng.choice(VERBS)} by {rng.choice(FIRST)} was {rng.choice(POS + NEG)} ."

    def document(self) -> str:
        rng = self.rng
        person = rng.choice(self.people)
        sentences = [f"this is a story about {person} ."]
        for _ in range(rng.randint(4, 10)):
            if rng.random() < 0.7:
                sentences.append(self.fact(person if rng.random() < 0.7 else rng.choice(self.people)))
            else:
                sentences.append(self.object_sentence())
        return " ".join(sentences)


def sentiment_example(world: World) -> dict:
    rng = world.rng
    label = rng.choice(["positive", "negative"])
    adj = rng.choice(POS if label == "positive" else NEG)
    person = rng.choice(world.people)
    noun = rng.choice(NOUNS)
    templates = [
        f"{person} said the {noun} was {adj} .",
        f"the {rng.choice(NEUTRAL)} {noun} from {rng.choice(ORGS)} is {adj} .",
        f"i {rng.choice(VERBS)} a {noun} in {rng.choice(CITIES)} and it was {adj} .",
        f"what a {adj} {noun} , wrote {person} .",
    ]
    return {"text": rng.choice(templates), "label": label}


def _tagged(words: str, tag: str | None) -> list[tuple[str, str]]:
    parts = words.split()
    if tag is None:
        return [(w, "O") for w in parts]
    return [(w, ("B-" if i == 0 else "I-") + tag) for i, w in enumerate(parts)]


def ner_example(world: World) -> dict:
    rng = world.rng
    person = rng.choice(world.people)
    short = person.split()[0] if rng.random() < 0.3 else person
    city, org = rng.choice(CITIES), rng.choice(ORGS)
    choice = rng.randrange(4)
    if choice == 0:
        pieces = [(short, "PER"), ("lives in", None), (city, "LOC"), (".", None)]
    elif choice == 1:
        pieces = [(short, "PER"), ("works for", None), (org, "ORG"), ("in", None), (city, "LOC"), (".", None)]
    elif choice == 2:
        pieces = [("yesterday", None), (org, "ORG"), ("hired", None), (short, "PER"), (".", None)]
    else:
        pieces = [("the", None), (rng.choice(NOUNS), None), ("from", None), (city, "LOC"), ("was", None),
                  (rng.choice(POS + NEG), None), (".", None)]
    pairs = [p for words, tag in pieces for p in _tagged(words, tag)]
    return {"tokens": [w for w, _ in pairs], "tags": [t for _, t in pairs]}


def qa_example(world: World, idx: int, split: str) -> dict:
    rng = world.rng
    people = rng.sample(world.people, 3)
    facts = []
    for p in people:
        facts.append((p, "home", f"{p} lives in {world.home[p]} ."))
        facts.append((p, "job", f"{p} works for {world.job[p]} ."))
    rng.shuffle(facts)
    context = " ".join(f[2] for f in facts)
    person, kind, _ = rng.choice(facts)
    if kind == "home":
        question, answer = f"where does {person} live ?", world.home[person]
        sentence = f"{person} lives in {answer} ."
    else:
        question, answer = f"who does {person} work for ?", world.job[person]
        sentence = f"{person} works for {answer} ."
    start = context.index(sentence) + sentence.index(answer, len(person))
    assert context[start:start + len(answer)] == answer
    return {"id": f"{split}-{idx}", "question": question, "context": context,
            "answers": {"text": [answer], "answer_start": [start]}}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=True) + "\n")


SIZES = {"train": 1600, "validation": 200, "test": 200}


def generate(out: Path, seed: int = 0, documents: int = 5000) -> None:
    out.mkdir(parents=True, exist_ok=True)
    world = World(random.Random(seed))
    (out / "corpus.txt").write_text("\n".join(world.document() for _ in range(documents)) + "\n")
    for split, n in SIZES.items():
        write_jsonl(out / f"sentiment-{split}.jsonl", [sentiment_example(world) for _ in range(n)])
        write_jsonl(out / f"ner-{split}.jsonl", [ner_example(world) for _ in range(n)])
        write_jsonl(out / f"qa-{split}.jsonl", [qa_example(world, i, split) for i in range(n)])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--documents", type=int, default=5000)
    args = parser.parse_args(argv)
    generate(args.out_dir, args.seed, args.documents)
    total = sum(p.stat().st_size for p in args.out_dir.iterdir() if p.is_file())
    print(f"wrote {args.out_dir} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
