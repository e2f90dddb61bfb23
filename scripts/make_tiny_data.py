"""Writes the bundled toy data the embedded tiny policy is built from:
prompts/tiny_sft.jsonl (prompt/response pairs of 1 to 6 sentences, for the warm-up that
teaches the tiny model to end its answers at varied lengths) and prompts/tiny_prompts.jsonl
(the default prompt set). Deterministic; re-run only to change the data:
    python scripts/make_tiny_data.py
"""

import json
import random
from pathlib import Path

TOPICS = ["cats", "dogs", "rain", "coffee", "tea", "the sea", "mountains", "trains", "books", "music",
          "gardens", "bread", "the moon", "rivers", "bicycles", "winter", "summer", "birds", "apples",
          "cities", "forests", "snow", "clocks", "bridges", "boats", "stars", "honey", "paper",
          "lamps", "maps", "shoes", "windows", "islands", "deserts", "tomatoes", "chess", "kites",
          "letters", "markets", "owls"]
ASKS = ["Tell me about {t}.", "What do you know about {t}?", "Describe {t}.", "Write a few words about {t}.",
        "Say something about {t}.", "Explain {t} to me."]
SENTENCES = ["{T} are a common sight.", "Many people like {t}.", "There is a lot to say about {t}.",
             "Some say {t} are calm and quiet.", "{T} can be found in many places.",
             "People have written about {t} for a long time.", "Children often ask about {t}.",
             "{T} change with the seasons.", "It is easy to learn more about {t}.",
             "A short walk is enough to see {t}.", "Old stories often mention {t}.",
             "{T} are simple and also surprising."]


def response(rng: random.Random, topic: str) -> str:
    n = rng.randint(1, 6)
    picks = rng.sample(SENTENCES, n)
    return " ".join(s.format(t=topic, T=topic[0].upper() + topic[1:]) for s in picks)


def main() -> None:
    rng = random.Random(0)
    out = Path(__file__).resolve().parent.parent / "prompts"
    with open(out / "tiny_sft.jsonl", "w") as f:
        for i in range(600):
            topic = rng.choice(TOPICS)
            row = {"messages": [{"role": "user", "content": rng.choice(ASKS).format(t=topic)},
                                {"role": "assistant", "content": response(rng, topic)}]}
            f.write(json.dumps(row) + "\n")
    with open(out / "tiny_prompts.jsonl", "w") as f:
        for i, topic in enumerate(TOPICS):
            for j, ask in enumerate(rng.sample(ASKS, 2)):
                row = {"id": f"p{2 * i + j:03d}", "messages": [{"role": "user", "content": ask.format(t=topic)}]}
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
