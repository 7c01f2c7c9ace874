"""The four papers' headline experiments, run as far as this machine allows: one JSON per paper.

    export QAT_WIKITEXT_DIR=../shared/data/wikitext-2-raw QAT_DATA_DIR=../shared/data/glue
    python bench/papers.py --paper bof4                 # every row not yet in docs/papers/bof4.json
    python bench/papers.py --paper lobcq --rows all-lobcq fit-codebooks
    python bench/papers.py --paper bfp --list           # row ids, done or not
    python bench/papers.py --paper bfp --table          # markdown tables from the JSON
    python bench/papers.py --plot                       # docs/papers/*.png from the JSONs

Papers (docs/papers.md): ``bfp`` (Zhang et al., EMNLP 2023: BFP W8A8 / W6A6 / W4A4 PTQ across
block sizes and exponent widths, memory density, 4-bit fine-tuning of MiniLM on SST-2),
``bof4`` (Blumenberg et al.: NF4 / AF4 / BOF4 / BOF4-S +- OPQ, weight error and the model's
score, on SmolLM2 as shipped, after a float fine-tune, and on MiniLM), ``lobcq`` (Elangovan et
al.: W4A4 with default and fitted codebooks against BFP / MXFP4 / NVFP4, then QAT), ``qdec``
(perplexity against k_chunk and decode speed).

Resumable: a row already in ``<out>/<paper>.json`` is skipped; each row is written as soon as
it ends, with the command that reruns it, its budget and seeds. Models the rows share (the
float fine-tuned MiniLM and SmolLM2) are trained once into ``--work`` (git-ignored) and reused.
Settings are chosen on validation data (WikiText-2 validation chunk 0; LO-BCQ calibration
reads validation chunks 1.., never the test chunks that are reported).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

PAPERS = ("bfp", "bof4", "lobcq", "qdec")
EXCLUDE_LM = ["lm_head"]
EXCLUDE_GLUE = ["score", "classifier", "lm_head"]


class Row(NamedTuple):
    """One measurement: ``kind`` picks the runner, ``spec`` is all it needs."""

    id: str
    name: str
    kind: str
    spec: dict[str, Any] = {}  # never mutated


# --------------------------------------------------------------------------- formats


def bfp(width: int, exponent_width: int = 8, block_size: int = 16) -> dict[str, Any]:
    return {
        "format": "bfp",
        "width": width,
        "exponent_width": exponent_width,
        "block_size": block_size,
    }


def quant(w: dict | None, a: dict | None = None, mm: dict | None = None, exclude=None) -> dict:
    return {"weight": w, "activation": a, "matmul": mm, "exclude": exclude or EXCLUDE_LM}


def codebook_formats(cb: str) -> dict[str, tuple[str, dict[str, Any]]]:
    """BOF4 paper's 4-bit formats, blocks of 64: id -> (display name, format spec). The MAE
    tables are fitted by ``qat codebook`` into the folder ``cb`` (``ensure_mae_tables``)."""
    out: dict[str, tuple[str, dict[str, Any]]] = {
        "nf4": ("NF4", {"format": "nf4"}),
        "af4": ("AF4", {"format": "af4"}),
        "bof4-mse": ("BOF4 (MSE)", {"format": "bof4"}),
        "bof4-mae": ("BOF4 (MAE)", {"format": "bof4", "metric": "mae"}),
        "bof4s-mse": ("BOF4-S (MSE)", {"format": "bof4s"}),
        "bof4s-mae": ("BOF4-S (MAE)", {"format": "bof4s", "metric": "mae"}),
    }
    for key, (name, spec) in list(out.items()):
        if spec.get("metric") == "mae":
            spec["codebook_file"] = f"{cb}/{spec['format']}_mae_b64.json"
        out[f"{key}-opq"] = (f"{name} + OPQ", {**spec, "outliers": "opq"})
    out["bfp4-b64"] = ("BFP4 (E8, B64)", bfp(4, 8, 64))
    return out


def lobcq_spec(role: str | None = None, cb: str = "") -> dict[str, Any]:
    """LO-BCQ (16 codebooks, blocks of 8, arrays of 64): the default tables, or the ones fitted
    on this model's ``role`` (weight / activation / matmul) by the ``fit-codebooks`` row into
    the folder ``cb``."""
    spec: dict[str, Any] = {"format": "lobcq"}
    if role:
        spec["codebook_file"] = f"{cb}/smollm2_lobcq_{role}.json"
    return spec


W4A4 = {  # about 4.5 bits: id -> (name, format)
    "bfp4": ("BFP4 (E8, B16)", bfp(4)),
    "mxfp4": ("MXFP4", {"format": "mxfp4"}),
    "nvfp4": ("NVFP4", {"format": "nvfp4"}),
    "lobcq": ("LO-BCQ (default codebooks)", lobcq_spec()),
}
FITTED = {  # which roles take fitted LO-BCQ codebooks
    "fit-w": ("LO-BCQ, fitted W", ("weight",)),
    "fit-wa": ("LO-BCQ, fitted W + A", ("weight", "activation")),
    "fit-wam": ("LO-BCQ, fitted W + A + matmul", ("weight", "activation", "matmul")),
    # fitted weights scored worse than the defaults on validation: the same without them
    "fit-am": ("LO-BCQ, fitted A + matmul", ("activation", "matmul")),
    "fit-m": ("LO-BCQ, fitted matmul", ("matmul",)),
}
SEEDS = (42, 43, 44)
LOBCQ_RECIPE = "recipes/smollm2_wikitext_lobcq_w4a4.yaml"
# LO-BCQ every role behind block rotation 16: the best W4A4 PTQ on validation (issue #30)
BEST_RECIPE = "recipes/smollm2_wikitext_w4a4_best.yaml"


def fitted_quant(fitted: tuple[str, ...], cb: str, matmul: bool = True) -> dict:
    roles = ("weight", "activation", "matmul")
    spec = {r: lobcq_spec(r if r in fitted else None, cb) for r in roles}
    return quant(spec["weight"], spec["activation"], spec["matmul"] if matmul else None)


# --------------------------------------------------------------------------- the rows


def rows_bfp(cb: str) -> list[Row]:
    rows = [Row("float", "float", "ppl", {"quant": None})]
    for width in (8, 6, 4):
        for e in (8, 4):
            for b in (8, 16, 32, 64):
                f = bfp(width, e, b)
                rows.append(
                    Row(f"w{width}a{width}-e{e}-b{b}", f"BFP W{width}A{width} E{e} B{b}", "ppl",
                        {"quant": quant(f, f, f), "width": width, "exponent_width": e,
                         "block_size": b})
                )  # fmt: skip
    for seed in SEEDS[:2]:  # a MiniLM run takes ~1 h of the shared CPU: seed 43 for the
        # float, QAT full and PTQ rows only
        rows.append(Row(f"minilm-float-s{seed}", "MiniLM float FT", "glue_float", {"seed": seed}))
        for mode in ("qat-full", "qat-lora", "qat-classifier")[: 3 if seed == 42 else 1]:
            rows.append(
                Row(f"minilm-w4a4-{mode[4:]}-s{seed}", f"W4A4 BFP B16 QAT {mode[4:]}",
                    "glue_train", {"seed": seed, "mode": mode})
            )  # fmt: skip
        f8 = bfp(4, 8, 8)
        if seed == 42:  # the classifier-only row's float reference: the same head, float body
            rows.append(
                Row(f"minilm-float-classifier-s{seed}", "MiniLM float, classifier only",
                    "glue_train", {"seed": seed, "mode": "qat-classifier", "float": True})
            )  # fmt: skip
            rows.append(
                Row(f"minilm-w4a4-b8-full-s{seed}", "W4A4 BFP B8 QAT full", "glue_train",
                    {"seed": seed, "mode": "qat-full", "quant": quant(f8, f8, f8, EXCLUDE_GLUE)})
            )  # fmt: skip
        f = bfp(4)
        rows.append(
            Row(f"minilm-w4a4-ptq-s{seed}", "W4A4 BFP B16 PTQ of float", "glue_ptq",
                {"seed": seed, "quant": quant(f, f, f, EXCLUDE_GLUE)})
        )  # fmt: skip
    return rows


def rows_bof4(cb: str) -> list[Row]:
    fmts = codebook_formats(cb)
    rows = [Row("smollm2-float", "float", "ppl", {"quant": None})]
    rows += [
        Row(f"smollm2-{k}", name, "ppl", {"quant": quant(spec), "format": k})
        for k, (name, spec) in fmts.items()
    ]
    for seed in SEEDS[:2]:
        rows.append(Row(f"minilm-float-s{seed}", "float", "glue_float", {"seed": seed}))
        rows += [
            Row(f"minilm-{k}-s{seed}", name, "glue_ptq",
                {"seed": seed, "quant": quant(spec, exclude=EXCLUDE_GLUE), "format": k})
            for k, (name, spec) in fmts.items()
        ]  # fmt: skip
    rows.append(Row("smollm2-ft-grid-s42", "Q4_1 grid after float FT", "grid", {"seed": 42}))
    rows.append(Row("smollm2-ft-float-s42", "float FT", "ppl", {"quant": None, "base": "ft-s42"}))
    rows += [
        Row(f"smollm2-ft-{k}-s42", name, "ppl",
            {"quant": quant(spec), "format": k, "base": "ft-s42"})
        for k, (name, spec) in fmts.items()
    ]  # fmt: skip
    return rows


def rows_lobcq(cb: str) -> list[Row]:
    rows = [Row("float", "float", "ppl", {"quant": None})]
    default = quant(lobcq_spec(), lobcq_spec(), lobcq_spec())  # the QAT rows before fitting
    for k, (name, f) in W4A4.items():
        if k != "lobcq":
            rows.append(Row(f"wa-{k}", f"{name}, W + A", "ppl", {"quant": quant(f, f)}))
    rows.append(Row("fit-codebooks", "LO-BCQ codebooks fitted on SmolLM2", "fit_lobcq"))
    rows.append(Row("wa-lobcq", f"{W4A4['lobcq'][0]}, W + A", "ppl",
                    {"quant": quant(lobcq_spec(), lobcq_spec())}))  # fmt: skip
    wa = fitted_quant(("weight", "activation"), cb, matmul=False)
    rows.append(Row("wa-lobcq-fit-wa", "LO-BCQ, fitted W + A, W + A", "ppl", {"quant": wa}))
    for k, (name, f) in W4A4.items():
        rows.append(Row(f"all-{k}", f"{name}, every role", "ppl", {"quant": quant(f, f, f)}))
    for k, (name, fitted) in FITTED.items():
        rows.append(Row(f"all-lobcq-{k}", f"{name}, every role", "ppl",
                        {"quant": fitted_quant(fitted, cb)}))  # fmt: skip
    # the decoder QAT budget (--steps x --batch x --block_size, first --eval_chunks test chunks)
    budget_rows = [
        ("qat-float-before", "float, before FT", {"float": True, "train": False}),
        ("qat-float-after-s42", "float, after FT", {"float": True, "train": True, "seed": 42}),
        ("qat-lobcq-ptq", "LO-BCQ W4A4 PTQ",
         {"recipe": LOBCQ_RECIPE, "train": False, "quant": default}),
    ]  # fmt: skip
    for seed in SEEDS:
        budget_rows.append(
            (f"qat-lobcq-full-s{seed}", "LO-BCQ W4A4 QAT full",
             {"recipe": LOBCQ_RECIPE, "train": True, "seed": seed, "quant": default})
        )  # fmt: skip
    # the recipe's codebooks: fitted activation and matmul tables, the best on validation
    budget_rows.append(
        ("qat-lobcq-fit-ptq", "LO-BCQ W4A4 (fitted A + matmul) PTQ",
         {"recipe": LOBCQ_RECIPE, "train": False})
    )  # fmt: skip
    for seed in SEEDS:
        budget_rows.append(
            (f"qat-lobcq-fit-full-s{seed}", "LO-BCQ W4A4 (fitted A + matmul) QAT full",
             {"recipe": LOBCQ_RECIPE, "train": True, "seed": seed})
        )  # fmt: skip
    budget_rows.append(
        ("qat-lobcq-rot16-ptq", "LO-BCQ W4A4 + rotation 16 PTQ",
         {"recipe": BEST_RECIPE, "train": False})
    )  # fmt: skip
    for seed in SEEDS:
        budget_rows.append(
            (f"qat-lobcq-rot16-full-s{seed}", "LO-BCQ W4A4 + rotation 16 QAT full",
             {"recipe": BEST_RECIPE, "train": True, "seed": seed})
        )  # fmt: skip
    budget_rows.append(
        ("qat-bfp-full-s42", "BFP W4A4 QAT full", {"train": True, "seed": 42})
    )  # the README recipe, same budget: the reference the LO-BCQ rows are read against
    rows += [Row(i, n, "lm_train", s) for i, n, s in budget_rows]
    return rows


QDEC_FORMATS = ("BFP W3", "BFP W4", "BOF4-S B64")
QDEC_K = (0, 8, 16, 32, 64, 128)


def rows_qdec(cb: str) -> list[Row]:
    rows = [Row("float", "float", "qdec_ppl", {"format": None})]
    for f in QDEC_FORMATS:
        slug = f.lower().replace(" ", "-")
        rows += [Row(f"{slug}-k{k}", f, "qdec_ppl", {"format": f, "k_chunk": k}) for k in QDEC_K]
        rows.append(Row(f"{slug}-speed", f, "qdec_speed", {"format": f, "k_chunk": 32}))
    return rows


ROWS: dict[str, Callable[[str], list[Row]]] = {  # paper -> rows (given the codebook folder)
    "bfp": rows_bfp,
    "bof4": rows_bof4,
    "lobcq": rows_lobcq,
    "qdec": rows_qdec,
}


# --------------------------------------------------------------------------- the JSON store


def load_results(path: Path) -> list[dict[str, Any]]:
    return json.loads(path.read_text())["rows"] if path.is_file() else []


def write_results(path: Path, paper: str, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"paper": paper, "rows": rows}, indent=1) + "\n")
    tmp.replace(path)  # a run killed mid-write leaves the last complete file


def run_rows(
    path: Path,
    paper: str,
    rows: list[Row],
    execute: Callable[[Row], dict[str, Any]],
    command: Callable[[Row], str],
) -> list[dict[str, Any]]:
    """Run each of ``rows`` not yet in ``path`` and write the file after every one (re-read
    first, so rows another process wrote meanwhile stay); returns every stored row. A row's
    record: its id, name, kind, spec, the command that reruns it, what ``execute`` measured
    (budget and seeds among it) and the seconds it took."""
    done = load_results(path)
    have = {r["id"] for r in done}
    for row in rows:
        if row.id in have:
            print(f"[{paper}] {row.id}: in {path}, skipped", flush=True)
            continue
        print(f"[{paper}] {row.id}: {row.name} ...", flush=True)
        t0 = time.time()
        measured = execute(row)
        record = {
            "id": row.id,
            "name": row.name,
            "kind": row.kind,
            "spec": row.spec,
            "command": command(row),
            **measured,
            "seconds": round(time.time() - t0, 1),
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        # another process may have written rows to the file since: keep them (re-read, add)
        done = [r for r in load_results(path) if r["id"] != row.id] + [record]
        have = {r["id"] for r in done}
        write_results(path, paper, done)
        shown = {k: v for k, v in measured.items() if isinstance(v, (int, float))}
        print(f"[{paper}] {row.id}: {shown} ({record['seconds']} s)", flush=True)
    return done


# --------------------------------------------------------------------------- measuring


def weight_error(model: Any) -> dict[str, float]:
    """Relative squared error of every quantised linear's weight, pooled:
    ``sum (w - Q(w))^2 / sum w^2``, and the number of weights it covers."""
    import torch

    from qat.quant.modules import QuantConv1D, QuantLinear

    err = ref = 0.0
    n = 0
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (QuantLinear, QuantConv1D)) and m.weight_quantizer is not None:
                w, q = m.weight_quantizer.error_pair(m.weight.float())
                err += float((w - q).double().square().sum())
                ref += float(w.double().square().sum())
                n += w.numel()
    return {"weight_rel_mse": err / ref if ref else math.nan, "weights": n}


def bits(model: Any) -> dict[str, Any]:
    """What ``qat``'s density report says (``qat.quant.density``)."""
    from qat.quant.density import density_report

    d = density_report(model).to_dict()
    out = {"quantized_linears": d["quantized_linears"], "model": d["model"]}
    acts = {x["activation_bits"] for x in d["layers"] if x["activation_format"] != "float"}
    if acts:
        out["activation_bits"] = max(acts)
    return out


class Lab:
    """Models, data and trained folders the rows share, loaded or trained once per process."""

    def __init__(self, a: argparse.Namespace, paper: str) -> None:
        self.a, self.paper = a, paper
        self.work = Path(a.work)
        self._lm: tuple[str, Any, Any] | None = None
        self._tok: Any = None
        self._chunks: dict[tuple, list] = {}
        self._qdec: tuple[str, Any] | None = None

    # ----- SmolLM2
    def lm(self, base: str = "gguf") -> tuple[Any, Any]:
        """The float causal LM ``base`` (``gguf``: the recipe's; ``ft-sN``: fine-tuned float,
        seed N) and its tokenizer; one held at a time (memory)."""
        if self._lm is None or self._lm[0] != base:
            from qat.runs.build import build_model

            self._lm = None
            src = self.a.recipe if base == "gguf" else str(self.lm_ft_dir(int(base[4:])))
            built = build_model(src, ["--quant", "null"], head="causal_lm", device="cpu")
            self._lm = (base, built.model.eval(), built.tokenizer)
            self._tok = self._tok or built.tokenizer  # one tokenizer for every base
        return self._lm[1], self._lm[2]

    def chunks(self, split: str, size: int, n: int, skip: int = 0) -> list:
        key = (split, size, n, skip)
        if key not in self._chunks:
            from qat.tasks.language_modeling import chunk_ids, load_wikitext

            if self._tok is None:
                self.lm()
            enc = self._tok(load_wikitext(split), return_tensors="pt", verbose=False)
            ids = enc["input_ids"][0]
            self._chunks[key] = chunk_ids(ids, size, n + skip)[skip:]
        return self._chunks[key]

    def lm_budget(self, seed: int) -> list[str]:
        a = self.a
        return [
            "--max_steps", str(a.steps), "--block_size", str(a.block_size),
            "--per_device_train_batch_size", str(a.batch), "--seed", str(seed),
            "--eval_split", "test", "--max_eval_samples", str(a.eval_chunks),
            "--save_strategy", "no", "--report_to", "none", "--overwrite_output_dir", "true",
        ]  # fmt: skip

    def lm_budget_record(self, seed: int | None, train: bool) -> dict[str, Any]:
        a = self.a
        out: dict[str, Any] = {
            "eval": f"WikiText-2 test, first {a.eval_chunks} x {a.block_size} tokens",
        }
        if train:
            out.update(
                steps=a.steps,
                batch=a.batch,
                block_size=a.block_size,
                training_tokens=a.steps * a.batch * a.block_size,
                train_split="validation",
            )
        return {"budget": out, "seeds": [] if seed is None else [seed]}

    def lm_ft_dir(self, seed: int) -> Path:
        """The float SmolLM2 fine-tuned under the QAT budget (trained here if absent)."""
        out = self.work / f"smollm2-float-ft-s{seed}"
        if not (out / "model.safetensors").is_file():
            from qat.runs.recipe.load import load_recipe
            from qat.training.run import run

            over = [*self.lm_budget(seed), "--quant", "null", "--output_dir", str(out)]
            run(load_recipe(self.a.recipe, over))
        return out

    # ----- MiniLM
    def glue_common(self, seed: int) -> list[str]:
        return [
            "--max_steps", str(self.a.glue_steps), "--seed", str(seed),
            "--save_strategy", "no", "--report_to", "none", "--overwrite_output_dir", "true",
        ]  # fmt: skip

    def glue_budget_record(self, seed: int) -> dict[str, Any]:
        import yaml

        r = yaml.safe_load(Path(self.a.glue_recipe).read_text())
        return {
            "budget": {
                "steps": self.a.glue_steps,
                "batch": r.get("per_device_train_batch_size"),
                "max_length": r.get("max_length"),
                "eval": "SST-2 validation (872 sentences), accuracy",
            },
            "seeds": [seed],
        }

    def glue_float_dir(self, seed: int) -> Path:
        out = self.work / f"minilm-float-s{seed}"
        if not (out / "model.safetensors").is_file():
            from qat.runs.recipe.load import load_recipe
            from qat.training.run import run

            over = [*self.glue_common(seed), "--quant", "null", "--output_dir", str(out)]
            run(load_recipe(self.a.glue_recipe, over))
        return out


def run_ppl(lab: Lab, row: Row) -> dict[str, Any]:
    """PTQ of a SmolLM2 (as shipped, or float fine-tuned): perplexity on the first
    ``--test_chunks`` test chunks and ``--val_chunks`` validation chunks, weight error, bits."""
    from qat.quant.quantize import quantize_model
    from qat.tasks.language_modeling import perplexity

    a = lab.a
    q = row.spec.get("quant")
    if q is None and "base" not in row.spec:  # the float model: measured once for every paper
        stored = float_row(a, lab.paper)
        if stored is not None:
            return stored
    base, _ = lab.lm(row.spec.get("base", "gguf"))
    model = base if q is None else quantize_model(copy.deepcopy(base), q)
    out: dict[str, Any] = {}
    if q is not None:
        out["bits"] = bits(model)
        if q.get("weight"):
            out.update(weight_error(model))
    for split, n in (("validation", a.val_chunks), ("test", a.test_chunks)):
        if n:
            out[f"{split}_ppl"] = perplexity(model, lab.chunks(split, a.chunk_size, n))[0]
    out["budget"] = ppl_budget(a)
    out["seeds"] = [int(row.spec["base"][4:])] if "base" in row.spec else []
    del model
    return out


def ppl_budget(a: argparse.Namespace) -> dict[str, str]:
    return {
        "test": f"WikiText-2 test, first {a.test_chunks} x {a.chunk_size} tokens",
        "validation": f"WikiText-2 validation, first {a.val_chunks} x {a.chunk_size} tokens",
    }


def float_row(a: argparse.Namespace, paper: str) -> dict[str, Any] | None:
    """The float model's perplexities as another paper's JSON in ``--out`` holds them, run
    with the same options (model, chunks; ``reused_from`` says where), else None."""
    for other in PAPERS:
        if other == paper:
            continue
        for r in load_results(Path(a.out) / f"{other}.json"):
            same = r["command"].split(f" --rows {r['id']}")[-1].strip() == options_of(a)
            if r["kind"] == "ppl" and r["spec"] == {"quant": None} and same:
                keep = ("validation_ppl", "test_ppl", "budget", "seeds")
                return {**{k: r[k] for k in keep}, "reused_from": f"{other}.json#{r['id']}"}
    return None


def run_lm_train(lab: Lab, row: Row) -> dict[str, Any]:
    """A row of the decoder QAT budget: train (or only evaluate) a recipe, score the test
    chunks the recipe's evaluation scores (``eval_perplexity``)."""
    from qat.runs.recipe.load import load_recipe
    from qat.training.run import run

    s = row.spec
    seed = s.get("seed")
    if s.get("float") and s.get("train"):
        folder = lab.lm_ft_dir(seed)  # shared with the bof4 rows
        metrics = json.loads((folder / "all_results.json").read_text())
    else:
        over = [*lab.lm_budget(seed or 42), "--output_dir", str(lab.work / lab.paper / row.id)]
        if s.get("float"):
            over += ["--quant", "null"]
        if s.get("quant"):
            over += ["--quant", json.dumps(s["quant"])]
        if not s.get("train"):
            over += ["--do_train", "false", "--do_eval", "true"]
        metrics = run(load_recipe(s.get("recipe") or lab.a.recipe, over))
    return {
        "perplexity": metrics["eval_perplexity"],
        "eval_loss": metrics["eval_loss"],
        "train_loss": metrics.get("train_loss"),
        "recipe": s.get("recipe") or os.path.relpath(lab.a.recipe, REPO),
        **({"quant": s["quant"]} if s.get("quant") else {}),
        **lab.lm_budget_record(seed if s.get("train") else None, bool(s.get("train"))),
    }


def run_glue_float(lab: Lab, row: Row) -> dict[str, Any]:
    folder = lab.glue_float_dir(row.spec["seed"])
    metrics = json.loads((folder / "all_results.json").read_text())
    return {"accuracy": metrics["eval_accuracy"], **lab.glue_budget_record(row.spec["seed"])}


def run_glue_train(lab: Lab, row: Row) -> dict[str, Any]:
    """QAT of MiniLM on SST-2 in one fine-tuning mode (``qat_vs_ptq.MODES``: learning rates)."""
    from qat_vs_ptq import MODES

    from qat.runs.recipe.load import load_recipe
    from qat.training.run import run

    s = row.spec
    over = [*lab.glue_common(s["seed"]), *MODES[s["mode"]][1]]
    if s.get("quant"):
        over += ["--quant", json.dumps(s["quant"])]
    if s.get("float"):
        over += ["--quant", "null"]
    over += ["--output_dir", str(lab.work / lab.paper / row.id)]
    metrics = run(load_recipe(lab.a.glue_recipe, over))
    return {"accuracy": metrics["eval_accuracy"], **lab.glue_budget_record(s["seed"])}


def run_glue_ptq(lab: Lab, row: Row) -> dict[str, Any]:
    """The float fine-tuned MiniLM quantised (no training): weight error, SST-2 accuracy."""
    from qat.runs.build import build_model
    from qat.tasks.glue import evaluate_split, get_task, glue_splits

    s = row.spec
    built = build_model(lab.glue_float_dir(s["seed"]), {"quant": s["quant"]})
    args = built.recipe.args
    task = get_task(args.task_name)
    split = task.validation_splits[0]
    data = glue_splits(task, args.data_dir, (split,)).tokenize(built.tokenizer, args.max_length)
    metrics = evaluate_split(built.model, built.tokenizer, task, data[split], batch_size=128)
    out = {"accuracy": metrics["accuracy"], "bits": bits(built.model)}
    if s["quant"].get("weight"):
        out.update(weight_error(built.model))
    return {**out, **lab.glue_budget_record(s["seed"])}


def q41_grid_distance(before: Any, after: Any, block: int = 32) -> dict[str, float]:
    """How far ``after`` sits from the Q4_1 grid ``before`` lies on (blocks of ``block`` along
    the last dim; ``before`` must be on it: ``min + d k``, ``d = (max - min) / 15``,
    ``k`` in 0..15). Distances are in grid steps (0 .. 0.5; uniform noise would average 0.25);
    a weight is off the grid beyond 1e-3 of a step."""
    import torch

    b = before.double().reshape(-1, block)
    x = after.double().reshape(-1, block)
    lo, hi = b.amin(-1, keepdim=True), b.amax(-1, keepdim=True)
    d = torch.where(hi > lo, (hi - lo) / 15, torch.ones_like(hi))

    def dist(v):
        k = ((v - lo) / d).clamp(0, 15)
        return (k - k.round()).abs()

    db, da = dist(b), dist(x)
    off = da > 1e-3
    return {
        "before_max_distance": float(db.max()),
        "off_grid_weights": float(off.double().mean()),
        "off_grid_blocks": float(off.any(-1).double().mean()),
        "mean_distance": float(da.mean()),
        "median_distance": float(da.median()),
        "sum_sq_change": float((x - b).square().sum()),
        "sum_sq": float(b.square().sum()),
        "n": b.numel(),
    }


def run_grid(lab: Lab, row: Row) -> dict[str, Any]:
    """SmolLM2's linears before (the Q4_1 GGUF, dequantised) and after a float fine-tune:
    how far the fine-tune moves them off the Q4_1 grid."""
    from torch import nn

    seed = row.spec["seed"]
    folder = lab.lm_ft_dir(seed)
    before, _ = lab.lm("gguf")
    w0 = {n: m.weight.detach().clone() for n, m in before.named_modules() if _is_linear(m, n)}
    after, _ = lab.lm(f"ft-s{seed}")
    parts = []
    for n, m in after.named_modules():
        if n in w0 and isinstance(m, nn.Linear):
            parts.append(q41_grid_distance(w0[n], m.weight.detach()))
    del w0
    tot = sum(p["n"] for p in parts)

    def mean(key: str) -> float:
        return sum(p[key] * p["n"] for p in parts) / tot

    return {
        "linears": len(parts),
        "weights": tot,
        "before_max_distance": max(p["before_max_distance"] for p in parts),
        "off_grid_weights": mean("off_grid_weights"),
        "off_grid_blocks": mean("off_grid_blocks"),
        "mean_distance": mean("mean_distance"),
        "median_distance_max": max(p["median_distance"] for p in parts),
        "relative_change": math.sqrt(
            sum(p["sum_sq_change"] for p in parts) / sum(p["sum_sq"] for p in parts)
        ),
        "folder": os.path.relpath(folder, REPO),
        **lab.lm_budget_record(seed, True),
    }


def _is_linear(m: Any, name: str) -> bool:
    from torch import nn

    return isinstance(m, nn.Linear) and not name.endswith("lm_head")


def calibration_arrays(lab: Lab, per_tensor: int, seed: int) -> dict[str, Any]:
    """Block arrays ``[R, 64]`` of SmolLM2's own operands per role, float (quantisers off):
    every linear's weight; linear inputs and the attention operands Q, K, V and P on
    ``--calib_chunks`` validation chunks after chunk 0 (where settings are chosen). Up to
    ``per_tensor`` rows are drawn from each tensor; P rows are recomputed from the captured
    Q and K (``softmax(Q K^T / sqrt(d))``, causal), one array per 64 keys, all-zero arrays
    (keys past the query) dropped."""
    import torch

    from qat.quant.modules import MatmulQuantizer, QuantLinear
    from qat.quant.quantize import quantize_model
    from qat.quant.ste import FakeQuantizer
    from qat.tasks.language_modeling import perplexity

    a = lab.a
    base, _ = lab.lm("gguf")
    lb = lobcq_spec()
    model = quantize_model(copy.deepcopy(base), quant(lb, lb, lb))
    gen = torch.Generator().manual_seed(seed)
    got: dict[str, list] = {"weight": [], "activation": [], "matmul": []}

    def take(role: str, x, dim: int = -1) -> None:
        x = x.detach().float().movedim(dim, -1)
        x = x.reshape(-1, x.shape[-1])
        if x.shape[-1] % 64:  # arrays run along the last dim; pad as the format does
            x = torch.nn.functional.pad(x, (0, 64 - x.shape[-1] % 64))
        x = x.reshape(-1, 64)
        x = x[x.abs().amax(-1) > 0]
        if x.shape[0] > per_tensor:
            x = x[torch.randperm(x.shape[0], generator=gen)[:per_tensor]]
        got[role].append(x)

    last: list[Any] = [None]  # q, k, v (gate, up) read one input, one after the other

    def act_hook(mod, args):
        if args[0] is not last[0]:
            last[0] = args[0]
            take("activation", args[0])

    last_q: dict[int, Any] = {}

    def mm_hook(which: str, owner: int):
        def hook(mod, args):
            x = args[0]
            take("matmul", x, mod.dim)
            if which == "q":
                last_q[owner] = x.detach().float()
            elif which == "k":
                q = last_q.pop(owner)
                rows = torch.randperm(q.shape[-2], generator=gen)[: max(1, per_tensor // 64)]
                s = (q[..., rows, :] @ x.detach().float().transpose(-1, -2)) * q.shape[-1] ** -0.5
                causal = torch.arange(x.shape[-2])[None, :] > rows[:, None]
                p = torch.softmax(s.masked_fill(causal, float("-inf")), dim=-1)
                take("matmul", p)

        return hook

    handles = []
    for m in model.modules():
        if isinstance(m, FakeQuantizer):
            m.enabled = False
        if isinstance(m, QuantLinear):
            take("weight", m.weight)
            handles.append(m.activation_quantizer.register_forward_pre_hook(act_hook))
        if isinstance(m, MatmulQuantizer):
            for which in ("q", "k", "v"):
                sub = getattr(m, which)
                handles.append(sub.register_forward_pre_hook(mm_hook(which, id(m))))
    chunks = lab.chunks("validation", a.chunk_size, a.calib_chunks, skip=1)
    for chunk in chunks:
        perplexity(model, [chunk])
    last[0] = None
    for h in handles:
        h.remove()
    del model
    return {k: torch.cat(v) for k, v in got.items()}


def run_fit_lobcq(lab: Lab, row: Row) -> dict[str, Any]:
    """Fit LO-BCQ codebooks per role on SmolLM2's calibration arrays and write the better of
    two fits to ``<out>/codebooks``: ``qat fit-lobcq``'s (``fit_lobcq``: quantile start, 1/16
    grid warm-up, integer Lloyd) and the same warm-up and Lloyd started from the default
    tables (an integer Lloyd alone cannot leave them: every entry's cell mean rounds back to
    it). Records the relative error of default and fitted tables on the calibration arrays
    (choices on calibration data, never the test chunks)."""
    import torch

    from qat.formats import make_format
    from qat.formats.fit.lobcq import _blocks, fit_lobcq, lloyd, save_codebooks
    from qat.formats.lobcq import DEFAULT_CODEBOOKS

    a = lab.a
    seed = 0
    cb = codebook_dir(a)
    arrays = calibration_arrays(lab, a.calib_rows, seed)
    out: dict[str, Any] = {"roles": {}}
    Path(cb).mkdir(parents=True, exist_ok=True)
    default = make_format(lobcq_spec())

    def rel_mse(fmt: Any, x: Any) -> float:
        with torch.no_grad():
            return float((x - fmt.quantize(x)).double().square().sum() / x.double().square().sum())

    for role, x in arrays.items():
        t0 = time.time()
        path = lobcq_spec(role, cb)["codebook_file"]
        fits = {"fit_lobcq": fit_lobcq(x, 16, 8, 64, iters=30, seed=seed, warm_iters=20)}
        y = _blocks(x, 8, 64)
        if y.shape[0] > 1 << 18:  # fit_lobcq's subsample, same seed
            y = y[torch.randperm(y.shape[0], generator=torch.Generator().manual_seed(seed))]
            y = y[: 1 << 18]
        cbs, _ = lloyd(y, torch.tensor(DEFAULT_CODEBOOKS, dtype=torch.float32), 20, res=16)
        cbs, hist = lloyd(y, cbs, 30)
        fits["lloyd_from_default"] = (cbs.sort(dim=-1).values, hist)
        errors = {}
        for method, (cbs, hist) in fits.items():
            save_codebooks(
                path, cbs, 8, 64, history=hist, iters=30, seed=seed, method=method,
                source=f"SmolLM2-135M {role} arrays: {x.shape[0]} x 64 from WikiText-2 "
                f"validation chunks 1..{a.calib_chunks} of {a.chunk_size} tokens "
                "(bench/papers.py --paper lobcq --rows fit-codebooks)",
            )  # fmt: skip
            errors[method] = rel_mse(make_format(lobcq_spec(role, cb)), x)
        best = min(errors, key=errors.get)
        if best != method:  # the file holds the last fit; rewrite the better one
            cbs, hist = fits[best]
            save_codebooks(
                path, cbs, 8, 64, history=hist, iters=30, seed=seed, method=best,
                source=f"SmolLM2-135M {role} arrays: {x.shape[0]} x 64 from WikiText-2 "
                f"validation chunks 1..{a.calib_chunks} of {a.chunk_size} tokens "
                "(bench/papers.py --paper lobcq --rows fit-codebooks)",
            )  # fmt: skip
        out["roles"][role] = {
            "arrays": int(x.shape[0]),
            "rel_mse_default": rel_mse(default, x),
            "rel_mse_fitted": errors,
            "chosen": best,
            "codebook_file": path,
            "fit_seconds": round(time.time() - t0, 1),
        }
    out["budget"] = {
        "calibration": f"WikiText-2 validation chunks 1..{a.calib_chunks} of {a.chunk_size} "
        f"tokens; up to {a.calib_rows} arrays per tensor",
    }
    out["seeds"] = [seed]
    return out


def run_qdec_ppl(lab: Lab, row: Row) -> dict[str, Any]:
    """QDEC (bench/qdec.py's setup): weight-only quantised SmolLM2, perplexity at one
    k_chunk on the first --qdec_chunks x --qdec_chunk_size test tokens."""
    from qat.tasks.language_modeling import perplexity

    a = lab.a
    chunks = lab.chunks("test", a.qdec_chunk_size, a.qdec_chunks)
    out: dict[str, Any] = {
        "budget": {
            "test": f"WikiText-2 test, first {a.qdec_chunks} x {a.qdec_chunk_size} tokens",
            "residual_bits": 4,
            "prefill": "token",
        },
        "seeds": [],
    }
    if row.spec["format"] is None:
        base, _ = lab.lm()
        return {"perplexity": perplexity(base, chunks)[0], **out}
    from qat.quant.qdec.attach import set_k_chunk

    model = qdec_model(lab, row.spec["format"])
    set_k_chunk(model, row.spec["k_chunk"])
    return {"perplexity": perplexity(model, chunks)[0], **out}


def qdec_model(lab: Lab, name: str) -> Any:
    """SmolLM2 with ``name``'s weights baked in and QDEC residuals attached (kept for the next
    row of the same format)."""
    if lab._qdec is None or lab._qdec[0] != name:
        from qdec import FORMATS, bake

        from qat.quant.qdec.attach import attach_qdec, set_default_prefill
        from qat.quant.quantize import quantize_model

        lab._qdec = None
        base, _ = lab.lm()
        model = copy.deepcopy(base)
        q = {"weight": FORMATS[name], "exclude": EXCLUDE_LM, "backend": "reference"}
        quantize_model(model, q)
        attach_qdec(model, {"k_chunk": 0, "residual_bits": 4})
        set_default_prefill(model, "token")
        bake(model)
        lab._qdec = (name, model)
    return lab._qdec[1]


def run_qdec_speed(lab: Lab, row: Row) -> dict[str, Any]:
    """Greedy decode speed, plain and QDEC at k_chunk 32, alternated in one run (medians)."""
    import torch
    from qdec import decode_speed

    from qat.quant.qdec.attach import set_k_chunk

    a = lab.a
    model = qdec_model(lab, row.spec["format"])
    _, tok = lab.lm()
    set_k_chunk(model, row.spec["k_chunk"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as docs/qdec.md measured it
    try:
        plain, with_qdec = decode_speed(model, tok, a.decode_tokens, a.repeats)
    finally:
        torch.set_num_threads(threads)
    return {
        "decode_tps_plain": plain,
        "decode_tps_qdec": with_qdec,
        "ratio": with_qdec / plain,
        "budget": {"decode_tokens": a.decode_tokens, "repeats": a.repeats, "threads": 1},
        "seeds": [],
    }


RUNNERS: dict[str, Callable[[Lab, Row], dict[str, Any]]] = {
    "ppl": run_ppl,
    "lm_train": run_lm_train,
    "glue_float": run_glue_float,
    "glue_train": run_glue_train,
    "glue_ptq": run_glue_ptq,
    "grid": run_grid,
    "fit_lobcq": run_fit_lobcq,
    "qdec_ppl": run_qdec_ppl,
    "qdec_speed": run_qdec_speed,
}


def ensure_mae_tables(cb: str) -> None:
    """BOF4 / BOF4-S MAE levels for blocks of 64 (not built in): ``qat codebook``'s fit."""
    from qat.formats.fit.codebook import fit_codebook, write_codebook

    Path(cb).mkdir(parents=True, exist_ok=True)
    for kind in ("bof4", "bof4s"):
        path = f"{cb}/{kind}_mae_b64.json"
        if not Path(path).is_file():
            levels, done = fit_codebook(kind, "mae", 64)
            write_codebook(path, kind, "mae", 64, levels, "integral", None, done, None)


# --------------------------------------------------------------------------- tables, plots


def by_id(path: Path) -> dict[str, dict[str, Any]]:
    return {r["id"]: r for r in load_results(path)}


def mean_sd(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.4f}" if values else "-"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def table(paper: str, out: Path) -> None:
    """Print docs/papers.md's tables of one paper from its JSON (every row, then the raw list
    of rows with their seconds); a cell whose row has not run yet reads "-"."""
    rows = by_id(out / f"{paper}.json")
    if not rows:
        print(f"no rows in {out / f'{paper}.json'}")
        return
    {"bfp": _md_bfp, "bof4": _md_bof4, "lobcq": _md_lobcq, "qdec": _md_qdec}[paper](rows)
    print("\n| row | name | seconds |\n| --- | --- | ---: |")
    for r in rows.values():
        print(f"| {r['id']} | {r['name']} | {r['seconds']:.0f} |")


def _ppl(r: dict | None, key: str = "test_ppl", ref: float | None = None) -> str:
    if not r or key not in r:
        return "-"
    rel = "" if ref is None else f" ({r[key] / ref - 1:+.1%})"
    return f"{r[key]:.2f}{rel}"


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def _acc(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def _md_bfp(rows: dict[str, dict]) -> None:
    ref = rows.get("float", {}).get("test_ppl")
    vref = rows.get("float", {}).get("validation_ppl")
    print(f"SmolLM2-135M, BFP PTQ of every role; test PPL (vs float {ref:.2f})\n" if ref else "")
    blocks = (8, 16, 32, 64)
    print("| format | " + " | ".join(f"B{b}" for b in blocks) + " |")
    print("| --- |" + " ---: |" * len(blocks))
    for w in (8, 6, 4):
        for e in (8, 4):
            cells = [_ppl(rows.get(f"w{w}a{w}-e{e}-b{b}"), ref=ref) for b in blocks]
            print(f"| W{w}A{w} E{e} | " + " | ".join(cells) + " |")
    print(f"\nthe same on validation (float {vref:.2f})\n" if vref else "")
    print("| format | " + " | ".join(f"B{b}" for b in blocks) + " |")
    print("| --- |" + " ---: |" * len(blocks))
    for w in (8, 6, 4):
        for e in (8, 4):
            cells = [_ppl(rows.get(f"w{w}a{w}-e{e}-b{b}"), "validation_ppl", vref) for b in blocks]
            print(f"| W{w}A{w} E{e} | " + " | ".join(cells) + " |")
    print("\nmemory density of the quantised weights (qat.quant.density): bits, x fp32, x int8\n")
    print("| format | " + " | ".join(f"B{b}" for b in blocks) + " |")
    print("| --- |" + " ---: |" * len(blocks))
    for w in (8, 6, 4):
        for e in (8, 4):
            cells = []
            for b in blocks:
                r = rows.get(f"w{w}a{w}-e{e}-b{b}")
                if r and "bits" in r:
                    q = r["bits"]["quantized_linears"]
                    cells.append(
                        f"{q['bits_per_element']:g} b, {q['density_vs_fp32']:.2f}x, "
                        f"{q['density_vs_int8']:.2f}x"
                    )
                else:
                    cells.append("-")
            print(f"| W{w}A{w} E{e} | " + " | ".join(cells) + " |")
    print("\nMiniLM on SST-2 (validation accuracy; seeds 42, 43)\n")
    print("| mode | seed 42 | seed 43 | mean ± s.d. |\n| --- | ---: | ---: | ---: |")
    for key, name in (
        ("float", "float, full FT"),
        ("w4a4-full", "W4A4 BFP B16, QAT full"),
        ("w4a4-b8-full", "W4A4 BFP B8, QAT full"),
        ("w4a4-lora", "W4A4 BFP B16, QAT LoRA"),
        ("w4a4-classifier", "W4A4 BFP B16, QAT classifier-only"),
        ("float-classifier", "float, classifier-only"),
        ("w4a4-ptq", "W4A4 BFP B16, PTQ of the float run"),
    ):
        vals = {s: rows.get(f"minilm-{key}-s{s}", {}).get("accuracy") for s in (42, 43)}
        cells = [f"{v:.4f}" if v is not None else "-" for v in vals.values()]
        mean = _acc([v for v in vals.values() if v is not None])
        print(f"| {name} | {' | '.join(cells)} | {mean} |")


def _md_bof4(rows: dict[str, dict]) -> None:
    fmts = codebook_formats("")
    f0 = rows.get("smollm2-float", {}).get("test_ppl")
    f1 = rows.get("smollm2-ft-float-s42", {}).get("test_ppl")
    m = {s: rows.get(f"minilm-float-s{s}", {}).get("accuracy") for s in (42, 43)}
    print(
        f"float: SmolLM2 {_num(f0)}, after float FT {_num(f1)}; MiniLM SST-2 "
        f"{' / '.join(f'{v:.4f}' if v else '-' for v in m.values())} (seeds 42 / 43)\n"
    )
    print(
        "| format | bits | SmolLM2 weight MSE | SmolLM2 val PPL | SmolLM2 test PPL | "
        "after FT: weight MSE | after FT: test PPL | MiniLM weight MSE | "
        "MiniLM SST-2 acc (s42 / s43) |"
    )
    print("| --- |" + " ---: |" * 8)
    for k, (name, _) in fmts.items():
        a, b = rows.get(f"smollm2-{k}"), rows.get(f"smollm2-ft-{k}-s42")
        c = {s: rows.get(f"minilm-{k}-s{s}") for s in (42, 43)}
        r = a or b or c[42]
        nbits = f"{r['bits']['quantized_linears']['bits_per_element']:.3f}" if r else "-"

        def mse(x):
            return f"{x['weight_rel_mse']:.5f}" if x else "-"

        accs = " / ".join(f"{x['accuracy']:.4f}" if x else "-" for x in c.values())
        print(
            f"| {name} | {nbits} | {mse(a)} | {_ppl(a, 'validation_ppl')} | {_ppl(a)} | "
            f"{mse(b)} | {_ppl(b)} | "
            f"{mse(c[42])} | {accs} |"
        )
    print("\nSpearman rank correlation of weight MSE with the score, over the 12 codebooks:")
    for pat, key in (
        ("smollm2-{k}", "validation_ppl"),
        ("smollm2-{k}", "test_ppl"),
        ("smollm2-ft-{k}-s42", "test_ppl"),
        ("minilm-{k}-s42", "accuracy"),
        ("minilm-{k}-s43", "accuracy"),
    ):
        pts = [rows.get(pat.format(k=k)) for k in fmts if not k.startswith("bfp")]
        pts = [(r["weight_rel_mse"], r[key]) for r in pts if r and key in r]
        if len(pts) > 2:
            print(f"- {pat.format(k='*')} {key}: {spearman(pts):+.2f} ({len(pts)} formats)")
    g = rows.get("smollm2-ft-grid-s42")
    if g:
        print(
            f"\nQ4_1 grid after the float FT (seed 42): {g['off_grid_weights']:.2%} of the "
            f"weights and {g['off_grid_blocks']:.2%} of the blocks of 32 off the grid; mean "
            f"distance {g['mean_distance']:.4f} of a grid step (uniform: 0.25); relative "
            f"change |W' - W| / |W| = {g['relative_change']:.5f}; before the FT the largest "
            f"distance was {g['before_max_distance']:.1e}"
        )


def spearman(pts: list[tuple[float, float]]) -> float:
    """Spearman's rank correlation of the pairs (average ranks for ties)."""

    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=v.__getitem__)
        r = [0.0] * len(v)
        i = 0
        while i < len(v):
            j = i
            while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    x, y = ranks([p[0] for p in pts]), ranks([p[1] for p in pts])
    mx, my = statistics.mean(x), statistics.mean(y)
    cov = sum((a - mx) * (b - my) for a, b in zip(x, y))
    return cov / math.sqrt(sum((a - mx) ** 2 for a in x) * sum((b - my) ** 2 for b in y))


def _md_lobcq(rows: dict[str, dict]) -> None:
    fl = rows.get("float", {})
    print(
        f"SmolLM2-135M W4A4 PTQ, float {_ppl(fl, 'validation_ppl')} validation / {_ppl(fl)} test\n"
    )
    print(
        "| format | bits (W) | W + A: validation | W + A: test | every role: validation "
        "| every role: test |"
    )
    print("| --- |" + " ---: |" * 5)
    names = {k: n for k, (n, _) in W4A4.items()} | {f"lobcq-{k}": n for k, (n, _) in FITTED.items()}
    for k, name in names.items():
        wa, al = rows.get(f"wa-{k}"), rows.get(f"all-{k}")
        r = wa or al
        nbits = f"{r['bits']['quantized_linears']['bits_per_element']:.3f}" if r else "-"
        v0, v1 = fl.get("validation_ppl"), fl.get("test_ppl")
        print(
            f"| {name} | {nbits} | {_ppl(wa, 'validation_ppl', v0)} | {_ppl(wa, ref=v1)} | "
            f"{_ppl(al, 'validation_ppl', v0)} | {_ppl(al, ref=v1)} |"
        )
    fit = rows.get("fit-codebooks")
    if fit:
        print("\ncalibration arrays: relative squared error, default vs fitted codebooks\n")
        print("| role | arrays | default | fit_lobcq | Lloyd from default | kept |")
        print("| --- | ---: | ---: | ---: | ---: | --- |")
        for role, r in fit["roles"].items():
            e = r["rel_mse_fitted"]
            print(
                f"| {role} | {r['arrays']} | {r['rel_mse_default']:.5f} | "
                f"{e['fit_lobcq']:.5f} | {e['lloyd_from_default']:.5f} | {r['chosen']} |"
            )
    _md_lobcq_qat(rows)


# The README's decoder rows (bench/decoder_qat.py, same recipe, budget and test chunks): the
# float fine-tune and W4A4 BFP QAT the LO-BCQ QAT rows are read against, where this paper's
# JSON has not run its own (``qat-float-after-s42``, ``qat-bfp-full-s42``).
DECODER_QAT = {
    ("float, before FT", None): ("docs/decoder_qat/results_40steps_a.json", "float-before"),
    ("float, after FT", 42): ("docs/decoder_qat/results_40steps_a.json", "float-after"),
    ("BFP W4A4 QAT full", 42): ("docs/decoder_qat/results_40steps_a.json", "qat-full"),
    ("BFP W4A4 QAT full", 43): ("docs/decoder_qat/results_40steps_seed43.json", "qat-full"),
    ("BFP W4A4 QAT full", 44): ("docs/decoder_qat/results_40steps_seed44.json", "qat-full"),
}
TARGET = 1.25  # the decoder target: test PPL within +25% of the float model fine-tuned alike


def decoder_qat_rows(root: Path = REPO) -> list[dict[str, Any]]:
    """``DECODER_QAT``'s rows as this bench's QAT rows (name, seeds, perplexity, train loss,
    ``source``: file#id); files that are missing are left out."""
    out = []
    for (name, seed), (file, rid) in DECODER_QAT.items():
        path = root / file
        if not path.is_file():
            continue
        r = next(x for x in json.loads(path.read_text())["results"] if x["id"] == rid)
        out.append(
            {
                "name": name,
                "seeds": [] if seed is None else [seed],
                "perplexity": r["perplexity"],
                "train_loss": r.get("train_loss"),
                "source": f"{file}#{rid}",
            }
        )
    return out


def _md_lobcq_qat(rows: dict[str, dict]) -> None:
    """The decoder-budget table: each seed, mean ± s.d. per model, % against the float
    fine-tune, and whether LO-BCQ QAT reaches ``TARGET``."""
    own = [r for i, r in rows.items() if i.startswith("qat-")]
    have = {(r["name"], tuple(r.get("seeds", []))) for r in own}
    # the same names as this JSON's rows: a row run here replaces the README's
    ref = [r for r in decoder_qat_rows() if (r["name"], tuple(r["seeds"])) not in have]
    every = own + ref
    after = next((r["perplexity"] for r in every if r["name"] == "float, after FT"), None)
    print("\nthe decoder QAT budget (test PPL, first 16 x 256 test tokens)\n")
    print("| model | seed | test PPL | vs float after FT | train loss | from |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    groups: dict[str, list[dict]] = {}
    for r in every:
        groups.setdefault(r["name"], []).append(r)
    order = ["float, before FT", "float, after FT", "BFP W4A4 QAT full", "LO-BCQ W4A4 PTQ"]
    for name in sorted(groups, key=lambda n: order.index(n) if n in order else len(order)):
        rs = groups[name]
        for r in rs:
            seed = str(r["seeds"][0]) if r.get("seeds") else ""
            rel = f"{r['perplexity'] / after - 1:+.1%}" if after else ""
            tl = f"{r['train_loss']:.3f}" if r.get("train_loss") else ""
            src = r.get("source") or f"lobcq.json#{r['id']}"
            print(f"| {name} | {seed} | {r['perplexity']:.2f} | {rel} | {tl} | {src} |")
        if len(rs) > 1:
            v = [r["perplexity"] for r in rs]
            rel = f"{statistics.mean(v) / after - 1:+.1%}" if after else ""
            print(
                f"| **{name}, mean ± s.d.** | {len(v)} seeds | **{statistics.mean(v):.2f} ± "
                f"{statistics.stdev(v):.2f}** | **{rel}** | | |"
            )
    if not after:
        return
    bound = TARGET * after
    print(f"\ntarget: <= {bound:.2f} (float after FT {after:.2f} + {TARGET - 1:.0%})")
    for name in ("LO-BCQ W4A4 QAT full", "LO-BCQ W4A4 + rotation 16 QAT full"):
        ppl = [r["perplexity"] for r in groups.get(name, [])]
        if ppl:
            hit = sum(p <= bound for p in ppl)
            print(
                f"- {name}: {hit} of {len(ppl)} seeds reach it "
                f"(best {min(ppl):.2f}, {min(ppl) / after - 1:+.1%})"
            )


def _md_qdec(rows: dict[str, dict]) -> None:
    fl = rows.get("float", {}).get("perplexity")
    print(f"SmolLM2-135M, weight-only, float {fl:.2f}\n" if fl else "")
    print(
        "| format | "
        + " | ".join(f"k_chunk {k}" for k in QDEC_K)
        + " | decode tok/s plain / QDEC 32 | ratio |"
    )
    print("| --- |" + " ---: |" * (len(QDEC_K) + 2))
    for f in QDEC_FORMATS:
        slug = f.lower().replace(" ", "-")
        cells = [_ppl(rows.get(f"{slug}-k{k}"), "perplexity") for k in QDEC_K]
        sp = rows.get(f"{slug}-speed")
        speed = (
            f"{sp['decode_tps_plain']:.1f} / {sp['decode_tps_qdec']:.1f} | {sp['ratio']:.3f}x"
            if sp
            else "- | -"
        )
        print(f"| {f} | " + " | ".join(cells) + f" | {speed} |")


def plot_all(out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    for paper, fn in (("bfp", _plot_bfp), ("bof4", _plot_bof4), ("lobcq", _plot_lobcq)):
        rows = by_id(out / f"{paper}.json")
        if rows:
            path = out / f"{paper}.png"
            fn(rows, path)
            print(f"drew {path}")
    rows = by_id(out / "qdec.json")
    if rows:
        _plot_qdec(rows, out / "qdec.png")
        print(f"drew {out / 'qdec.png'}")


def _plot_bfp(rows: dict[str, dict], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.6), gridspec_kw={"width_ratios": [3, 2]})
    blocks = (8, 16, 32, 64)
    for i, width in enumerate((8, 6, 4)):
        for e, ls in ((8, "-"), (4, "--")):
            pts = [(b, rows.get(f"w{width}a{width}-e{e}-b{b}")) for b in blocks]
            pts = [(b, r["test_ppl"]) for b, r in pts if r and "test_ppl" in r]
            if pts:
                ax.plot(*zip(*pts), ls, marker="o", color=f"C{i}", label=f"W{width}A{width} E{e}")
    if "float" in rows:
        ax.axhline(rows["float"]["test_ppl"], color="k", lw=1, ls=":", label="float")
    ax.set_xscale("log", base=2)
    ax.set_xticks(blocks, [str(b) for b in blocks])
    ax.set_yscale("log")
    ax.set_xlabel("block size (elements sharing one exponent)")
    ax.set_ylabel("WikiText-2 test perplexity (log)")
    ax.set_title("SmolLM2-135M, BFP PTQ, every role (2 x 2048 test tokens)", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, ncol=2)
    modes = [
        ("float", "float FT"),
        ("w4a4-full", "W4A4 QAT full"),
        ("w4a4-b8-full", "W4A4 B8 QAT full"),
        ("w4a4-lora", "W4A4 QAT LoRA"),
        ("w4a4-classifier", "W4A4 QAT classifier"),
        ("w4a4-ptq", "W4A4 PTQ of float"),
    ]
    names = []
    for key, name in modes:
        vals = [r["accuracy"] for i, r in rows.items() if i.startswith(f"minilm-{key}-s")]
        if vals:
            bx.scatter([len(names)] * len(vals), vals, color="C0", zorder=3)
            bx.bar(len(names), statistics.mean(vals), color="C0", alpha=0.3)
            names.append(name)
    bx.set_xticks(range(len(names)), names, rotation=25, ha="right", fontsize=8)
    bx.set_ylim(0.45, 0.95)
    bx.set_ylabel("SST-2 validation accuracy")
    bx.set_title("MiniLM on SST-2, BFP W4A4 (dots: seeds)", fontsize=10)
    bx.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_bof4(rows: dict[str, dict], path: Path) -> None:
    import matplotlib.pyplot as plt

    fmts = codebook_formats("")
    panels = [
        ("smollm2-{k}", "test_ppl", "SmolLM2 as shipped (Q4_1 weights)", "test perplexity"),
        ("smollm2-ft-{k}-s42", "test_ppl", "SmolLM2 after float FT", "test perplexity"),
        ("minilm-{k}-s42", "accuracy", "MiniLM FT on SST-2 (seed 42)", "SST-2 accuracy"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8))
    for ax, (pat, metric, title, ylabel) in zip(axes, panels):
        for i, (k, (name, _)) in enumerate(fmts.items()):
            r = rows.get(pat.format(k=k))
            if r and metric in r:
                mark = "s" if "opq" in k else "o"
                ax.scatter(r["weight_rel_mse"], r[metric], marker=mark, color=f"C{i % 6}")
                ax.annotate(name, (r["weight_rel_mse"], r[metric]), fontsize=7,
                            xytext=(3, 2), textcoords="offset points")  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel("relative weight MSE, all linears (log)")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, which="both")
    fig.suptitle("4-bit weight-only codebooks, blocks of 64 (squares: + OPQ)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_lobcq(rows: dict[str, dict], path: Path) -> None:
    import matplotlib.pyplot as plt

    ptq = [r for i, r in rows.items() if i.startswith(("wa-", "all-")) and "test_ppl" in r]
    qat_rows = [r for i, r in rows.items() if i.startswith("qat-") and "perplexity" in r]
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.9 + 0.36 * max(len(ptq), len(qat_rows), 4)))
    for ax, rs, key, title in (
        (axes[0], ptq, "test_ppl", "W4A4 PTQ, 2 x 2048 test tokens"),
        (axes[1], qat_rows, "perplexity", "QAT budget: 40 steps, 16 x 256 test tokens"),
    ):
        if not rs:
            ax.set_visible(False)
            continue
        names = [r["name"] + (f" s{r['seeds'][0]}" if r.get("seeds") else "") for r in rs]
        vals = [r[key] for r in rs]
        colours = ["#55a868" if "LO-BCQ" in r["name"] else "#4c72b0" for r in rs]
        bars = ax.barh(names[::-1], vals[::-1], color=colours[::-1])
        for bar, v in zip(bars, vals[::-1]):
            ax.text(bar.get_width() * 1.01, bar.get_y() + bar.get_height() / 2, f"{v:.1f}",
                    va="center", fontsize=8)  # fmt: skip
        after = [r["perplexity"] for r in rs if r["id"].startswith("qat-float-after")]
        if key == "perplexity" and after:
            ax.axvline(after[0] * 1.25, color="grey", ls="--", lw=1)
        ax.set_xlim(0, max(vals) * 1.15)
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="y", labelsize=8)
        ax.set_xlabel("WikiText-2 test perplexity (green: LO-BCQ; dashed: float FT + 25%)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_qdec(rows: dict[str, dict], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for f in QDEC_FORMATS:
        slug = f.lower().replace(" ", "-")
        pts = [(k, rows[f"{slug}-k{k}"]["perplexity"]) for k in QDEC_K if f"{slug}-k{k}" in rows]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=f)
    if "float" in rows:
        ax.axhline(rows["float"]["perplexity"], color="k", ls="--", lw=1, label="float")
    ax.set_xscale("symlog", linthresh=8)
    ax.set_xticks(QDEC_K, [str(k) for k in QDEC_K])
    ax.set_yscale("log")
    ax.set_xlabel("k_chunk (channels compensated per 1024 inputs)")
    ax.set_ylabel("WikiText-2 test perplexity (log)")
    ax.set_title("QDEC on SmolLM2-135M, weight-only, 4-bit residual", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- command line


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--paper", choices=PAPERS)
    p.add_argument("--rows", nargs="+", default=None, help="row ids (default: every row)")
    p.add_argument("--list", action="store_true", help="list the paper's rows and stop")
    p.add_argument("--table", action="store_true", help="print the paper's JSON as markdown")
    p.add_argument("--plot", action="store_true", help="draw docs/papers/*.png from the JSONs")
    p.add_argument("--out", default="docs/papers", help="folder of the JSONs and pictures")
    p.add_argument("--work", default="outputs/papers", help="trained models (git-ignored)")
    p.add_argument("--recipe", default="recipes/smollm2_wikitext_w4a4.yaml")
    p.add_argument("--glue_recipe", default="recipes/minilm_sst2.yaml")
    # PTQ chunks (decoder_levers.py's): reported test chunks, validation chunks for choices
    p.add_argument("--chunk_size", type=int, default=2048)
    p.add_argument("--test_chunks", type=int, default=2)
    p.add_argument("--val_chunks", type=int, default=1)
    p.add_argument("--calib_chunks", type=int, default=2, help="validation chunks 1..N")
    p.add_argument("--calib_rows", type=int, default=256, help="arrays drawn per tensor")
    # the README decoder budget
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--block_size", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--eval_chunks", type=int, default=16)
    p.add_argument("--glue_steps", type=int, default=400)
    # QDEC (docs/qdec.md's setup)
    p.add_argument("--qdec_chunk_size", type=int, default=512)
    p.add_argument("--qdec_chunks", type=int, default=2)
    p.add_argument("--decode_tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default torch's)")
    return p


def options_of(a: argparse.Namespace) -> str:
    """The options of ``a`` that differ from the defaults, as a command line."""
    skip = {"help", "paper", "rows", "list", "table", "plot"}
    extra = []
    for act in parser()._actions:
        if act.dest in skip or not act.option_strings:
            continue
        v = getattr(a, act.dest)
        if v != act.default:
            extra += [act.option_strings[0], str(v)]
    return " ".join(extra)


def command_of(a: argparse.Namespace, paper: str, row: Row) -> str:
    """The command that reruns ``row`` (options that differ from the defaults included)."""
    env = [f"{k}={os.environ[k]}" for k in ("QAT_WIKITEXT_DIR", "QAT_DATA_DIR") if k in os.environ]
    cmd = [*env, "python bench/papers.py --paper", paper, "--rows", row.id, options_of(a)]
    return " ".join(cmd).strip()


def codebook_dir(a: argparse.Namespace) -> str:
    """Where fitted tables go: ``<out>/codebooks`` (relative to the repository root, where the
    bench runs, so recipes can name the committed files)."""
    return str(Path(a.out) / "codebooks")


def main(argv: list[str] | None = None) -> int:
    p = parser()
    a = p.parse_args(argv)
    out = Path(a.out)
    if a.plot:
        plot_all(out)
        return 0
    if not a.paper:
        p.error("--paper is required (or --plot)")
    rows = ROWS[a.paper](codebook_dir(a))
    known = {r.id for r in rows}
    unknown = [r for r in a.rows or [] if r not in known]
    if unknown:
        p.error(f"unknown row(s) for --paper {a.paper}: {', '.join(unknown)}")
    if a.list:
        have = by_id(out / f"{a.paper}.json")
        for r in rows:
            print(f"{'done' if r.id in have else '    '}  {r.id:<28} {r.name}")
        return 0
    if a.table:
        table(a.paper, out)
        return 0
    if a.rows:  # in the order given
        rows = [next(r for r in rows if r.id == i) for i in a.rows]
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    if a.paper == "bof4":
        ensure_mae_tables(codebook_dir(a))
    lab = Lab(a, a.paper)
    run_rows(
        out / f"{a.paper}.json",
        a.paper,
        rows,
        lambda row: RUNNERS[row.kind](lab, row),
        lambda row: command_of(a, a.paper, row),
    )
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
