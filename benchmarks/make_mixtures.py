"""Build a five-domain alpaca corpus of real prompt/response pairs for the mixture benchmarks (issue 26).

One JSONL file, one row per line: ``{"instruction", "input", "output", "domain"}``. Every row is a
genuine prompt/response pair taken from real text; nothing is generated. The script is seeded
and deterministic: the same sources, options and seed give the same file byte for byte.

Domains and how their rows are made
-----------------------------------
``math``
    GSM8K train (``/work/shared/data/gsm8k_train_alpaca.json``, 7,473 rows of
    instruction/input/output). Rows are taken as they are.
``shakespeare``
    tinyshakespeare (``/work/shared/data/tinyshakespeare.txt``), speeches separated by blank
    lines, each ``SPEAKER:`` then its lines. Speeches with at least ``--min-speech-lines`` lines
    of verse are used. instruction = "Continue this speech from a Shakespeare play.", input =
    the speaker line plus the first ``--prompt-lines`` lines, output = the rest of the speech.
``code``
    The Python standard library of the interpreter running this script
    (``sysconfig.get_paths()["stdlib"]``; run it with the project's ``.venv/bin/python``).
    Every public function and every public method of a public class that has a docstring,
    parsed with ``ast``. Skipped: tests/, idlelib, turtledemo, lib2to3, ensurepip, pydoc_data,
    site-packages, private modules and packages (a leading underscore) and private names.
    instruction = "Write a Python function `name(args)` (standard library module `mod`) that:
    <first paragraph of the docstring>" (for a method: "Write the Python method
    `Class.name(args)` ..."), output = the function's own source lines (decorators included)
    with the docstring (and blank lines right after it) removed, dedented. Kept when the code
    is 3-40 lines, the paragraph is 30-600 characters and the row fits the length caps below.
``general``
    General instructions from Stanford Alpaca: ``data/alpaca_5000.json``, a 5,000-row random
    subset of ``alpaca_data.json`` committed in
    github.com/tatsu-lab/stanford_alpaca history at commit
    5e69c50054c48cd3b919c46d13bb2d92a62f4498 ("get subset from alpaca data", from the fork
    khaidoan25/stanford_alpaca; git blob c7575709e3ab7761acdc77f1ed6b0e05ee7c2ba5, 2,044,701 bytes).
    Data license: CC BY-NC 4.0 (the repository's DATA_LICENSE); research use only. Rows are
    taken as they are (instruction/input/output). The Alpaca responses were written by
    text-davinci-003 (the public data set, not text made for this benchmark).
    ``--alpaca`` takes either a JSON file or ``GITDIR@COMMIT:PATH`` read with ``git show``
    (default: the fetched mirror at /work/.mirror/tatsu-lab+stanford_alpaca/repo).
``debian``
    Debian package descriptions written by the packages' maintainers, read from dpkg's status
    file (``/var/lib/dpkg/status``, the installed packages). instruction = "Describe the
    Debian package `NAME`.", input = "Summary: <the one-line description>", output = the long
    description (dpkg's leading space removed, " ." lines turned into blank lines). Packages
    whose long description is shorter than 150 characters, or repeats another package's, are
    skipped. The set depends on the machine's installed packages; the output records the
    counts, so rerun the script (do not copy the file) when the machine changes.

Length caps (SmolLM2, about 512 tokens per row at ~4 characters per token): a row is skipped,
never truncated, when its output is over ``--max-output-chars`` (1,500) or prompt + output is
over ``--max-row-chars`` (2,000; ``--max-code-row-chars``, 1,600, for ``code``, whose text runs
nearer 3.4 characters per token). Measured with SmolLM2's tokenizer on the default corpus, no
row's prompt + response is over 512 tokens (before the chat template's few tokens).

Deduplication uses the key the corpus index uses (NFKC, whitespace runs collapsed, stripped) on
the rendered prompt ("instruction\\n\\ninput") and the output, across the whole corpus, so
``index_corpus`` keeps every row. In ``code`` and ``debian`` a repeated output (the same
function body or description under another name) is dropped too.

Each domain's candidates are listed in a fixed order, shuffled with a per-domain seed, and the
first ``--rows-per-domain`` distinct rows are kept; the whole corpus is then shuffled with
``--seed``. A domain with too few candidates is an error unless ``--allow-short``.

Mixtures evaluated from this corpus (``evaluate --group-field domain --pool-shares ...``; the
shares are applied by evaluate to its pool, after test 80 and validation 25 per domain):

(A) math-majority:
    ``--pool-shares math=0.89,code=0.0275,shakespeare=0.0275,general=0.0275,debian=0.0275``
(B) code-majority:
    ``--pool-shares code=0.89,math=0.0275,shakespeare=0.0275,general=0.0275,debian=0.0275``
(C) balanced control:
    ``--pool-shares math=0.2,code=0.2,shakespeare=0.2,general=0.2,debian=0.2``

With the default sizes (math 1,800, code 1,800, the others 500): after test and validation,
math and code keep 1,695 rows (a 1,600-row majority pool fits), the others 395 (about 50
minority rows each at a 1,800-row pool with 0.0275 shares, and 350 each for a balanced pool).

Usage::

    .venv/bin/python benchmarks/make_mixtures.py --out out/mixtures/mix5.jsonl
"""
from __future__ import annotations

import argparse
import ast
import inspect
import json
import os
import random
import re
import subprocess
import sys
import sysconfig
import textwrap
import time
import unicodedata
from pathlib import Path

SHARED = Path("/work/shared/data")
DEFAULT_ALPACA = ("/work/.mirror/tatsu-lab+stanford_alpaca/repo"
                  "@5e69c50054c48cd3b919c46d13bb2d92a62f4498:data/alpaca_5000.json")
DEFAULT_ROWS = "math=1800,code=1800,shakespeare=500,general=500,debian=500"
DOMAINS = ("math", "shakespeare", "code", "general", "debian")
SKIP_DIRS = {"test", "tests", "idlelib", "turtledemo", "lib2to3", "ensurepip", "pydoc_data",
             "site-packages", "dist-packages", "__pycache__", "config-3.11-x86_64-linux-gnu"}
SHAKESPEARE_INSTRUCTION = "Continue this speech from a Shakespeare play."


def normalise(text: str) -> str:
    """The corpus index's duplicate key of a field: NFKC, whitespace runs collapsed, stripped."""
    return " ".join(unicodedata.normalize("NFKC", text).split())


def row(instruction: str, input_: str, output: str, domain: str) -> dict:
    return {"instruction": instruction.strip(), "input": input_.strip(), "output": output.rstrip(),
            "domain": domain}


# ---------------------------------------------------------------- sources

def math_rows(path: Path) -> list[dict]:
    return [row(r["instruction"], r.get("input", ""), r["output"], "math")
            for r in json.loads(path.read_text(encoding="utf-8"))]


def shakespeare_rows(path: Path, prompt_lines: int, min_lines: int) -> list[dict]:
    rows = []
    for block in re.split(r"\n\s*\n", path.read_text(encoding="utf-8")):
        lines = [line.rstrip() for line in block.strip().splitlines()]
        if len(lines) < 2 or not lines[0].endswith(":"):
            continue
        speaker, verse = lines[0], [line for line in lines[1:] if line.strip()]
        if len(verse) < max(min_lines, prompt_lines + 2):
            continue
        rows.append(row(SHAKESPEARE_INSTRUCTION, "\n".join([speaker] + verse[:prompt_lines]),
                        "\n".join(verse[prompt_lines:]), "shakespeare"))
    return rows


def _first_paragraph(doc: str) -> str:
    return " ".join(inspect.cleandoc(doc).split("\n\n")[0].split())


def _function_row(lines: list[str], node, module: str, owner: str | None) -> dict | None:
    doc = ast.get_docstring(node, clean=False)
    if doc is None or len(node.body) < 2:
        return None
    para = _first_paragraph(doc)
    if not 30 <= len(para) <= 600:
        return None
    first = min([node.lineno] + [d.lineno for d in node.decorator_list])
    doc_node = node.body[0]
    if doc_node.lineno == node.lineno:
        return None                                   # docstring on the def line
    after = doc_node.end_lineno                       # 0-based index of the line after the docstring
    while after < node.end_lineno and not lines[after].strip():
        after += 1                                    # and the blank lines that followed it
    keep = [lines[i] for i in range(first - 1, node.end_lineno) if not doc_node.lineno - 1 <= i < after]
    code = textwrap.dedent("\n".join(keep)).strip("\n")
    n_lines = code.count("\n") + 1
    if not 3 <= n_lines <= 40 or "\t" in code:
        return None
    signature = f"{node.name}({ast.unparse(node.args)})"
    if owner is None:
        instruction = f"Write a Python function `{signature}` (standard library module `{module}`) that: {para}"
    else:
        instruction = (f"Write the Python method `{owner}.{signature}` (standard library module "
                       f"`{module}`) that: {para}")
    return row(instruction, "", code, "code")


def code_rows(stdlib: Path) -> list[dict]:
    rows = []
    for dirpath, dirnames, filenames in os.walk(stdlib):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("_"))
        rel = Path(dirpath).relative_to(stdlib)
        for filename in sorted(filenames):
            if not filename.endswith(".py") or filename.startswith("_") and filename != "__init__.py":
                continue
            parts = list(rel.parts) + ([] if filename == "__init__.py" else [filename[:-3]])
            if not parts:
                continue
            module = ".".join(parts)
            try:
                source = (Path(dirpath) / filename).read_text(encoding="utf-8")
                tree = ast.parse(source)
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            lines = source.splitlines()
            for node in tree.body:
                functions = (ast.FunctionDef, ast.AsyncFunctionDef)
                if isinstance(node, functions) and not node.name.startswith("_"):
                    rows.append(_function_row(lines, node, module, None))
                elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                    rows.extend(_function_row(lines, item, module, node.name) for item in node.body
                                if isinstance(item, functions) and not item.name.startswith("_"))
    return [r for r in rows if r is not None]


def read_alpaca(source: str) -> list:
    match = re.fullmatch(r"(.+)@([0-9a-fA-F]{7,40}):(.+)", source)
    if match and not Path(source).exists():
        gitdir, commit, path = match.groups()
        text = subprocess.run(["git", "-C", gitdir, "show", f"{commit}:{path}"], check=True,
                              capture_output=True).stdout.decode("utf-8")
    else:
        text = Path(source).read_text(encoding="utf-8")
    return json.loads(text)


def general_rows(source: str) -> list[dict]:
    return [row(r["instruction"], r.get("input", ""), r["output"], "general") for r in read_alpaca(source)]


def debian_rows(status: Path, min_chars: int = 150) -> list[dict]:
    rows = []
    for entry in status.read_text(encoding="utf-8", errors="replace").split("\n\n"):
        name = re.search(r"^Package: (\S+)", entry, re.M)
        desc = re.search(r"^Description: (.*)\n((?: .*(?:\n|$))*)", entry, re.M)
        if not name or not desc:
            continue
        body = [line[1:] for line in desc.group(2).splitlines()]
        long = "\n".join("" if line.strip() == "." else line for line in body).strip()
        if len(long) < min_chars:
            continue
        rows.append(row(f"Describe the Debian package `{name.group(1)}`.", f"Summary: {desc.group(1).strip()}",
                        long, "debian"))
    return sorted(rows, key=lambda r: r["instruction"])


# ---------------------------------------------------------------- assembly

def prompt_of(r: dict) -> str:
    return f"{r['instruction']}\n\n{r['input']}" if r["input"].strip() else r["instruction"]


def parse_sizes(text: str) -> dict[str, int]:
    sizes = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        if name.strip() not in DOMAINS:
            raise SystemExit(f"--rows-per-domain: unknown domain {name!r} (known: {', '.join(DOMAINS)})")
        sizes[name.strip()] = int(value)
    return sizes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="out/mixtures/mix5.jsonl", help="output JSONL (keep it out of git)")
    parser.add_argument("--rows-per-domain", default=DEFAULT_ROWS,
                        help=f"DOMAIN=ROWS,... (default {DEFAULT_ROWS}); a domain left out is not written")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gsm8k", type=Path, default=SHARED / "gsm8k_train_alpaca.json")
    parser.add_argument("--shakespeare", type=Path, default=SHARED / "tinyshakespeare.txt")
    parser.add_argument("--stdlib", type=Path, default=Path(sysconfig.get_paths()["stdlib"]),
                        help="Python standard library to mine for code (default: this interpreter's)")
    parser.add_argument("--alpaca", default=DEFAULT_ALPACA, help="Alpaca JSON file, or GITDIR@COMMIT:PATH")
    parser.add_argument("--dpkg-status", type=Path, default=Path("/var/lib/dpkg/status"))
    parser.add_argument("--prompt-lines", type=int, default=2, help="shakespeare: verse lines in the prompt")
    parser.add_argument("--min-speech-lines", type=int, default=5, help="shakespeare: shortest speech used")
    parser.add_argument("--max-output-chars", type=int, default=1500)
    parser.add_argument("--max-row-chars", type=int, default=2000, help="prompt + output characters")
    parser.add_argument("--max-code-row-chars", type=int, default=1600, help="the same for the code domain")
    parser.add_argument("--allow-short", action="store_true", help="write a domain with fewer rows than asked")
    args = parser.parse_args(argv)
    sizes = parse_sizes(args.rows_per_domain)
    started = time.perf_counter()

    builders = {
        "math": lambda: math_rows(args.gsm8k),
        "shakespeare": lambda: shakespeare_rows(args.shakespeare, args.prompt_lines, args.min_speech_lines),
        "code": lambda: code_rows(args.stdlib),
        "general": lambda: general_rows(args.alpaca),
        "debian": lambda: debian_rows(args.dpkg_status),
    }
    seen: set[tuple[str, str]] = set()
    corpus, report = [], []
    for domain in DOMAINS:
        if domain not in sizes:
            continue
        candidates = builders[domain]()
        rng = random.Random(f"{args.seed}:{domain}")
        rng.shuffle(candidates)
        kept, outputs, too_long, dup = [], set(), 0, 0
        max_row = args.max_code_row_chars if domain == "code" else args.max_row_chars
        for r in candidates:
            if len(kept) == sizes[domain]:
                break
            prompt = prompt_of(r)
            if not normalise(prompt) or not normalise(r["output"]):
                continue
            if len(r["output"]) > args.max_output_chars or len(prompt) + len(r["output"]) > max_row:
                too_long += 1
                continue
            key = (normalise(prompt), normalise(r["output"]))
            if key in seen or (domain in ("code", "debian") and key[1] in outputs):
                dup += 1
                continue
            seen.add(key)
            outputs.add(key[1])
            kept.append(r)
        if len(kept) < sizes[domain] and not args.allow_short:
            raise SystemExit(f"{domain}: only {len(kept)} rows of {sizes[domain]} asked "
                             f"({len(candidates)} candidates, {too_long} too long, {dup} duplicates); "
                             f"lower --rows-per-domain or pass --allow-short")
        report.append((domain, len(candidates), too_long, dup, kept))
        corpus.extend(kept)

    random.Random(args.seed).shuffle(corpus)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for r in corpus:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")

    print(f"{'domain':<12} {'rows':>5} {'cands':>6} {'long':>5} {'dups':>5} {'prompt_ch':>9} "
          f"{'resp_ch':>8} {'max_row_ch':>10}")
    for domain, n_cand, too_long, dup, kept in report:
        p = [len(prompt_of(r)) for r in kept]
        o = [len(r["output"]) for r in kept]
        print(f"{domain:<12} {len(kept):>5} {n_cand:>6} {too_long:>5} {dup:>5} {sum(p) / len(p):>9.0f} "
              f"{sum(o) / len(o):>8.0f} {max(a + b for a, b in zip(p, o)):>10}")
    print(f"wrote {len(corpus)} rows to {out} in {time.perf_counter() - started:.1f} s "
          f"(seed {args.seed}, python {sys.version.split()[0]}, stdlib {args.stdlib})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
