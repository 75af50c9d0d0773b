"""Benchmark: the loop guard's cost per token, and its false alarms on real text.

The corpus is this Python's standard library: every .py file under sysconfig's stdlib folder
(site-packages excluded), every module docstring on its own (prose, via ast), and each topic of the
reference documentation (pydoc_data.topics). Each document is tokenized with the real Qwen3 tokenizer
and fed to a fresh guard as if it were one thought. The test suites (folders named test, tests or
idle_test) are counted apart: they hold deliberately repeated data (long literal strings and tables made
to exercise parsers) that no defaults can pass without missing real loops.

Prints one JSON object: tokens, documents, fires per million tokens at the default settings and at
looser ones, the first few fires (document, kind, period, the repeated text), and microseconds per
token of `feed` (the median over blocks of 1,024 tokens of the corpus, and over random ids).

    python scripts/bench_loop_guard.py [--tokenizer ../shared/qwen3-tokenizer] [--limit N] [--show 5]
"""

import argparse
import ast
import json
import os
import random
import statistics
import sysconfig
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mlx_qwen3.errors import UserError
from mlx_qwen3.loop_guard import LoopGuard, LoopSettings, ending_ids
from mlx_qwen3.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
LOOSER = {"repeats=2": dict(repeats=2), "min_tokens=128": dict(min_tokens=128), "recurring=16": dict(recurring=16),
          "recurring=24,min_line=10": dict(recurring=24, min_line=10)}
TEST_DIRS = {"test", "tests", "idle_test"}
BLOCK = 1024


def documents(limit=None) -> tuple:
    """(name, text) for every .py file of the standard library, its module docstrings and its docs
    topics; and apart, the same for the test suites' files."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.rglob("*.py") if "site-packages" not in p.parts)[:limit]
    library, tests = [], []
    for path in files:
        text = path.read_bytes().decode("utf-8", errors="replace")
        name = str(path.relative_to(stdlib))
        docs = tests if TEST_DIRS & set(path.relative_to(stdlib).parts[:-1]) else library
        docs.append((name, text))
        try:
            doc = ast.get_docstring(ast.parse(text))
        except (SyntaxError, ValueError):  # the test suites hold deliberately broken files
            doc = None
        if doc:
            docs.append((name + ":docstring", doc))
    from pydoc_data.topics import topics

    library += [(f"pydoc_data.topics[{k!r}]", v) for k, v in sorted(topics.items())][:limit]
    return library, tests


def tokenize(tokenizer, docs) -> list:
    with ThreadPoolExecutor(os.cpu_count()) as pool:  # encode lets go of the GIL
        return list(pool.map(lambda d: tokenizer.encode(d[1]), docs))


def run(endings, docs, ids, settings, show=0, tokenizer=None, timing=False) -> dict:
    fires, examples, blocks = 0, [], []
    guard = LoopGuard(endings, settings)
    for (name, _), seq in zip(docs, ids):
        guard.reset()
        for start in range(0, len(seq), BLOCK):
            block = seq[start:start + BLOCK]
            tic = time.perf_counter()
            for token in block:
                loop = guard.feed(token)
                if loop is not None:
                    fires += 1
                    if len(examples) < show:
                        end = loop.second + loop.period  # one copy; or the recurring line, to its end
                        if loop.kind == "recurring":
                            end = next(i for i in range(loop.second, loop.position + 1) if guard.ids[i] in endings) + 1
                        examples.append({"document": name, "kind": loop.kind, "period": loop.period,
                                         "position": loop.position,
                                         "text": tokenizer.decode(guard.ids[loop.second:end])[:300]})
            if timing and len(block) == BLOCK:
                blocks.append((time.perf_counter() - tic) / BLOCK * 1e6)
    tokens = sum(map(len, ids))
    out = {"fires": fires, "fires_per_million_tokens": round(fires / max(tokens, 1) * 1e6, 3)}
    if show:
        out["first_fires"] = examples
    if timing:
        out["us_per_token_median"] = round(statistics.median(blocks), 3)
    return out


def random_timing(endings, n=200_000) -> float:
    rng = random.Random(0)
    ids = [rng.randrange(151_000) for _ in range(n)]
    guard = LoopGuard(endings)
    times = []
    for start in range(0, n, BLOCK):
        tic = time.perf_counter()
        for token in ids[start:start + BLOCK]:
            guard.feed(token)
        times.append((time.perf_counter() - tic) / BLOCK * 1e6)
    return round(statistics.median(times), 3)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", default=str(ROOT.parent / "shared" / "qwen3-tokenizer"))
    ap.add_argument("--limit", type=int, default=None, help="only the first N files and topics (for trying)")
    ap.add_argument("--show", type=int, default=5, help="how many fires to show per setting")
    args = ap.parse_args()
    try:
        tokenizer = Tokenizer.from_folder(args.tokenizer)
    except UserError as e:
        raise SystemExit(f"bench_loop_guard: {e} (--tokenizer names the folder)")
    endings = ending_ids(tokenizer)
    library, tests = documents(args.limit)
    tic = time.perf_counter()
    ids, test_ids = tokenize(tokenizer, library), tokenize(tokenizer, tests)
    tokenize_s = time.perf_counter() - tic
    default = run(endings, library, ids, LoopSettings(), args.show, tokenizer, timing=True)
    looser = {name: run(endings, library, ids, LoopSettings(**fields), args.show, tokenizer)
              for name, fields in LOOSER.items()}
    print(json.dumps({
        "corpus": "stdlib .py files (site-packages and test suites excluded), module docstrings, pydoc topics",
        "files": sum(1 for name, _ in library if name.endswith(".py")),
        "documents": len(library),
        "tokens": sum(map(len, ids)),
        "tokenize_s": round(tokenize_s, 1),
        "endings": len(endings),
        "us_per_token_median": default.pop("us_per_token_median"),
        "us_per_token_random_ids": random_timing(endings),
        "defaults": {**LoopSettings().__dict__, **default},
        "looser": looser,
        "test_suites_at_defaults": {"files": sum(1 for name, _ in tests if name.endswith(".py")),
                                    "documents": len(tests), "tokens": sum(map(len, test_ids)),
                                    **run(endings, tests, test_ids, LoopSettings(), args.show, tokenizer)},
    }, indent=1))

if __name__ == "__main__":
    main()
