"""Why the `color` task does not learn (issue 10): does the model see the colour, and does its option letter
follow from the options it was shown?

Greedy responses of one or more checkpoints (HF, the same prompt pipeline as training) on a run's held-out
`color` problems, split into the two halves of the task:
- `named_ok`: the colour named in the reasoning ("The shape is blue, …") is the one drawn (vision);
- `letter_follows_named`: the boxed letter is the one whose option is the named colour (the lookup);
- `letter_from_colour`: the share of answers that the most common letter *for the named colour* would
  give, i.e. how far the letter is a fixed function of the colour, blind to the shuffled options
  (1.0: fully blind; a model that reads the options scores about the accuracy it gets);
- under GRPO's sampling (temperature 1, `--samples` per prompt): `sampled_accuracy` and
  `informative_groups`, the share of prompts whose samples are not all right or all wrong — the only
  ones that give a policy gradient.

    python -m bench.color RUN_DIR/checkpoints/coldstart RUN_DIR/checkpoints/grpo --heldout RUN_DIR/data/heldout.parquet

Prints one row per checkpoint, then one JSON line.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter, defaultdict

import torch

from bench.learnability import Encoder
from reward.format_scorer import last_boxed
from services.data.loading import LETTERS, load_problems

NAMED = re.compile(r"The shape is (\w+)")


@torch.no_grad()
def probe(checkpoint: str, problems, samples: int, max_new_tokens: int = 40, batch: int = 64) -> dict:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(checkpoint)
    model = AutoModelForImageTextToText.from_pretrained(checkpoint, torch_dtype=torch.float32).eval()
    encoder = Encoder(processor)
    rows, groups = [], []
    for i in range(0, len(problems), batch):
        chunk = problems[i:i + batch]
        enc = encoder.prompts(chunk)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=encoder.eos,
                             pad_token_id=encoder.pad)
        for problem, text in zip(chunk, encoder.responses(out, enc["input_ids"].shape[1])):
            named = NAMED.search(text)
            letter = (last_boxed(text) or "").strip()
            truth = problem.options[LETTERS.index(problem.answer)]
            rows.append({"named": named.group(1) if named else None, "truth": truth, "letter": letter,
                         "answer": problem.answer, "options": problem.options})
        sampled = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=True, temperature=1.0, top_k=0,
                                 num_return_sequences=samples, eos_token_id=encoder.eos, pad_token_id=encoder.pad)
        texts = encoder.responses(sampled, enc["input_ids"].shape[1])
        for j, problem in enumerate(chunk):
            hits = [(last_boxed(t) or "").strip() == problem.answer for t in texts[j * samples:(j + 1) * samples]]
            groups.append(sum(hits) / samples)
    n = len(rows)
    by_colour: dict[str, Counter] = defaultdict(Counter)
    for r in rows:
        by_colour[r["named"]][r["letter"]] += 1
    follows = sum(r["named"] in r["options"] and r["letter"] == LETTERS[r["options"].index(r["named"])]
                  for r in rows)
    return {"checkpoint": checkpoint, "n": n,
            "accuracy": sum(r["letter"] == r["answer"] for r in rows) / n,
            "named_ok": sum(r["named"] == r["truth"] for r in rows) / n,
            "letter_follows_named": follows / n,
            "letter_from_colour": sum(c.most_common(1)[0][1] for c in by_colour.values()) / n,
            "sampled_accuracy": sum(groups) / n, "informative_groups": sum(0 < g < 1 for g in groups) / n,
            "letters_by_named_colour": {str(k): dict(v.most_common()) for k, v in by_colour.items()}}


def main(argv: list[str]) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--heldout", required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--samples", type=int, default=8, help="samples per prompt at temperature 1 (GRPO's n)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    problems = [p for p in load_problems(args.heldout).problems if p.subject == "color"]
    results = [probe(c, problems, args.samples) for c in args.checkpoints]
    print(f"{'checkpoint':<60}{'n':>5}{'accuracy':>10}{'named_ok':>10}{'follows':>9}{'from_colour':>13}{'sampled':>9}{'informative':>13}")
    for r in results:
        print(f"{r['checkpoint'][-60:]:<60}{r['n']:>5}{r['accuracy']:>10.3f}{r['named_ok']:>10.3f}"
              f"{r['letter_follows_named']:>9.3f}{r['letter_from_colour']:>13.3f}{r['sampled_accuracy']:>9.3f}"
              f"{r['informative_groups']:>13.3f}")
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
