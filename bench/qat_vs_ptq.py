"""Compare fine-tuning modes under one budget on a GLUE task: float, QAT full, QAT LoRA,
QAT classifier-only, and PTQ (the float run quantised after training, no QAT).

    QAT_DATA_DIR=../shared/data/glue python bench/qat_vs_ptq.py --steps 200 --seeds 42 43

Prints a table (mean and spread over seeds) and writes results.json and a PNG into --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from qat.recipe import load_recipe  # noqa: E402

# mode -> overrides on top of the recipe; learning rates follow each mode's usual range
MODES = {
    "float (full FT)": ["--quant", "null"],
    "W4A4 QAT full": [],
    "W4A4 QAT LoRA": ["--finetune", "lora", "--learning_rate", "5e-4"],
    "W4A4 QAT classifier": ["--finetune", "classifier", "--learning_rate", "2e-3"],
}


def ptq_eval(float_dir: Path, recipe_path: str, overrides: list[str]) -> dict:
    """Quantise a trained float model with the recipe's quant config and evaluate it."""
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    from qat import quantize_model
    from qat.glue import get_task, load_glue, tokenize_glue
    from qat.models import load_sequence_classifier, load_tokenizer

    recipe = load_recipe(recipe_path, overrides)
    task = get_task(recipe.args.task_name)
    tok = load_tokenizer(str(float_dir))
    model = load_sequence_classifier(str(float_dir), task.num_labels)
    quantize_model(model, recipe.args.quant)
    data = tokenize_glue(load_glue(task.name, recipe.args.data_dir,
                                   splits=task.validation_splits), task, tok,
                         recipe.args.max_length)
    trainer = Trainer(model=model, args=TrainingArguments(
        output_dir=str(float_dir / "ptq"), per_device_eval_batch_size=128, report_to=[]),
        data_collator=DataCollatorWithPadding(tok), compute_metrics=task.trainer_metrics)
    return trainer.evaluate(data[task.validation_splits[0]])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default=str(REPO / "recipes/minilm_sst2.yaml"))
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--seeds", type=int, nargs="+", default=[42, 43])
    p.add_argument("--out", default=str(REPO / "outputs/bench_qat_vs_ptq"))
    p.add_argument("--metric", default="eval_accuracy")
    p.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES),
                   help="which fine-tuning runs (PTQ comes with the float run)")
    a = p.parse_args(argv)
    from qat.train import run

    out = Path(a.out)
    modes = {m: MODES[m] for m in a.modes}
    ptq = ["W4A4 PTQ of float"] if "float (full FT)" in modes else []
    results: dict[str, list[float]] = {m: [] for m in [*modes, *ptq]}
    for seed in a.seeds:
        common = ["--max_steps", str(a.steps), "--seed", str(seed), "--save_strategy", "no",
                  "--report_to", "none"]
        for mode, extra in modes.items():
            run_dir = out / f"{mode.replace(' ', '_').replace('(', '').replace(')', '')}_{seed}"
            metrics = run(load_recipe(a.recipe, [*common, *extra, "--output_dir", str(run_dir)]))
            results[mode].append(metrics[a.metric])
            print(f"[{mode} seed {seed}] {a.metric}={metrics[a.metric]:.4f}", flush=True)
            if mode.startswith("float"):
                ptq_metrics = ptq_eval(run_dir, a.recipe, common)
                results["W4A4 PTQ of float"].append(ptq_metrics[a.metric])
                print(f"[PTQ seed {seed}] {a.metric}={ptq_metrics[a.metric]:.4f}", flush=True)
    recipe = yaml.safe_load(Path(a.recipe).read_text())
    print(f"\n{Path(a.recipe).name}: {a.steps} steps x batch "
          f"{recipe.get('per_device_train_batch_size')}, seeds {a.seeds}, quant W4A4 = "
          f"{recipe['quant']['weight']}")
    print(f"{'mode':<24} {a.metric:>14} {'spread (min..max)':>20}  per-seed")
    for mode, vals in results.items():
        mean = statistics.mean(vals)
        print(f"{mode:<24} {mean:>14.4f} {min(vals):>9.4f}..{max(vals):.4f}  "
              + " ".join(f"{v:.4f}" for v in vals))
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"steps": a.steps, "seeds": a.seeds,
                                                  "results": results}, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = list(results)
    for i, name in enumerate(names):
        ax.scatter([i] * len(results[name]), results[name], color="tab:blue")
        ax.bar(i, statistics.mean(results[name]), color="tab:blue", alpha=0.3)
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(a.metric)
    ax.set_ylim(0.45, 1.0)
    ax.set_title(f"{Path(a.recipe).stem}: {a.steps} steps, seeds {a.seeds}")
    fig.tight_layout()
    fig.savefig(out / "qat_vs_ptq.png", dpi=120)
    print(f"wrote {out / 'results.json'} and {out / 'qat_vs_ptq.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
