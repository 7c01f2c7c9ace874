#!/usr/bin/env python
"""Write GLUE and WikiText-2 from the Hugging Face Hub into the offline layout qat reads.

Run it once on a machine with internet, copy the folder to the cluster, and point qat at it:

    python data/prepare.py --out /shared/qat-data              # all nine GLUE tasks + WikiText-2
    python data/prepare.py --out /shared/qat-data --tasks sst2 rte --no-wikitext
    export QAT_DATA_DIR=/shared/qat-data/glue QAT_WIKITEXT_DIR=/shared/qat-data/wikitext-2-raw

Layout (see data/README.md): ``glue/<task>/{train,validation}.tsv`` (MNLI:
``validation_matched.tsv`` and ``validation_mismatched.tsv``) with the Hub's column names and
label ids, and ``wikitext-2-raw/{train,validation,test}.txt`` with one Hub row per line, which
gives back the original ``wiki.*.raw`` files byte for byte. Existing files are never replaced
unless ``--overwrite`` is given; the check runs before anything is downloaded.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if (REPO / "qat" / "__init__.py").is_file() and str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # run from a checkout: use its qat (the task table)

WIKITEXT_HUB = ("Salesforce/wikitext", "wikitext-2-raw-v1")
WIKITEXT_SPLITS = ("train", "validation", "test")
PROG = "prepare.py"


class PrepareError(ValueError):
    """Bad input or an unexpected Hub dataset; printed as one line, exit 2."""


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Write GLUE (nyu-mll/glue) and WikiText-2 (raw v1) from the "
        "Hugging Face Hub into the offline layout qat reads (QAT_DATA_DIR, QAT_WIKITEXT_DIR).",
    )
    p.add_argument(
        "--out",
        required=True,
        type=Path,
        help="output folder; gets glue/<task>/*.tsv and wikitext-2-raw/*.txt",
    )
    p.add_argument(
        "--tasks",
        nargs="+",
        metavar="TASK",
        help="GLUE tasks to write (default: all nine: cola sst2 mrpc qqp stsb mnli qnli rte wnli)",
    )
    p.add_argument("--no-glue", action="store_true", help="skip GLUE")
    p.add_argument("--no-wikitext", action="store_true", help="skip WikiText-2")
    p.add_argument("--overwrite", action="store_true", help="replace files that already exist")
    return p


def glue_targets(out: Path, task_names: Iterable[str]) -> list[tuple[str, str, Path]]:
    """(task, split, file) for every GLUE file to write: train + the task's validation
    split(s); the test splits are left out (their labels are hidden: all -1)."""
    from qat.tasks.glue import get_task

    return [
        (t, split, out / "glue" / t / f"{split}.tsv")
        for t in task_names
        for split in ("train", *get_task(t).validation_splits)
    ]


def wikitext_targets(out: Path) -> list[tuple[str, Path]]:
    return [(split, out / "wikitext-2-raw" / f"{split}.txt") for split in WIKITEXT_SPLITS]


def _write_atomic(path: Path, write: Callable) -> None:
    """Write through a temporary file, so an interrupted run leaves no half-written split."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    with tmp.open("w", encoding="utf-8", newline="") as f:
        write(f)
    os.replace(tmp, path)


def write_glue_split(task_name: str, split, path: Path) -> int:
    """One Hub split -> TSV: the task's text columns, ``label`` (class id; STS-B a float) and
    ``idx`` when the Hub has it, in the Hub's order. Returns the row count."""
    import numpy as np

    from qat.tasks.glue import get_task

    task = get_task(task_name)
    have = list(split.column_names)
    missing = [c for c in task.columns if c not in have]
    if missing:
        raise PrepareError(
            f"{task_name}: the Hub split lacks column(s) {', '.join(missing)}; "
            f"it has {', '.join(have)}"
        )
    cols = [*task.columns, *(["idx"] if "idx" in have else [])]

    def label(v) -> str:
        # float32 shortest repr: 3.8, not float(np.float32(3.8)) = 3.799999952316284
        return str(np.float32(v)) if task.is_regression else str(int(v))

    def write(f) -> None:
        w = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_MINIMAL, lineterminator="\n")
        w.writerow(cols)
        for row in split.select_columns(cols):
            w.writerow([label(row[c]) if c == "label" else row[c] for c in cols])

    _write_atomic(path, write)
    return len(split)


def write_wikitext_split(texts: Iterable[str], path: Path) -> int:
    """One Hub row per line. The Hub turns the raw files' blank lines (a single space) into
    empty rows; writing them back as ``" \\n"`` restores the original ``wiki.*.raw`` bytes,
    which is what qat's perplexity reads."""
    n = 0

    def write(f) -> None:
        nonlocal n
        for text in texts:
            line = text if text else " \n"
            f.write(line if line.endswith("\n") else line + "\n")
            n += 1

    _write_atomic(path, write)
    return n


def _check_tasks(names: list[str] | None) -> list[str]:
    from qat.errors import did_you_mean
    from qat.tasks.glue import GLUE_TASKS

    if names is None:
        return list(GLUE_TASKS)
    for name in names:
        if name not in GLUE_TASKS:
            raise PrepareError(
                f"--tasks: unknown GLUE task {name!r}"
                f"{did_you_mean(name, GLUE_TASKS)}; valid tasks: "
                f"{', '.join(GLUE_TASKS)}"
            )
    return list(dict.fromkeys(names))


def run(args: argparse.Namespace) -> list[Path]:
    """Check everything, then download and write; returns the files written."""
    if args.no_glue and args.no_wikitext:
        raise PrepareError("--no-glue and --no-wikitext together leave nothing to do")
    tasks = [] if args.no_glue else _check_tasks(args.tasks)
    glue = glue_targets(args.out, tasks)
    wiki = [] if args.no_wikitext else wikitext_targets(args.out)
    existing = [p for *_, p in glue + wiki if p.exists()]
    if existing and not args.overwrite:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise PrepareError(f"{existing[0]} already exists{more}; pass --overwrite to replace")

    import datasets
    from tqdm.auto import tqdm

    from qat.tasks.glue import HUB_DATASET

    written: list[Path] = []
    # a context manager, so a failure closes the bar before the error line is printed
    with tqdm(total=len(glue) + len(wiki), unit="file", desc="preparing") as bar:
        for task in tasks:
            ds = datasets.load_dataset(HUB_DATASET, task)
            for t, split, path in glue:
                if t != task:
                    continue
                if split not in ds:
                    raise PrepareError(
                        f"{HUB_DATASET}/{task} has no split {split!r}; it has {', '.join(ds)}"
                    )
                bar.set_postfix_str(f"{task}/{split}")
                write_glue_split(task, ds[split], path)
                written.append(path)
                bar.update()
        if wiki:
            ds = datasets.load_dataset(*WIKITEXT_HUB)
            for split, path in wiki:
                bar.set_postfix_str(f"wikitext/{split}")
                write_wikitext_split(ds[split]["text"], path)
                written.append(path)
                bar.update()
    return written


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        written = run(args)
    except PrepareError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    out = args.out.resolve()
    print(f"{PROG}: wrote {len(written)} files under {out}")
    if not args.no_glue:
        print(f"  export QAT_DATA_DIR={out / 'glue'}")
    if not args.no_wikitext:
        print(f"  export QAT_WIKITEXT_DIR={out / 'wikitext-2-raw'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
