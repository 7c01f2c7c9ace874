"""Packed export: exact pack/unpack, round trips (torch.equal logits) with and without
``import qat`` (transformers' trust_remote_code), loading refused rather than random, file
size, and destinations that are never overwritten unasked nor inside the source."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tiny import REPO, error_lines, tiny_recipe, tree_hashes
from transformers import AutoModelForSequenceClassification

import qat  # noqa: F401 - registers the qat_packed model type
from qat.cli.export import main
from qat.errors import ExportError
from qat.export.modeling_qat_packed import unpack_bits
from qat.export.packed import _packers, pack_bits, pack_weight, unpack_weight, write_packed
from qat.formats import make_format
from qat.quant.modules import QuantLinear
from qat.runs.build import build_model


def test_bit_packing_round_trips():
    for bits in (2, 3, 4, 6, 8):
        codes = torch.randint(0, 2**bits, (101,))
        stream = pack_bits(codes, bits)
        assert stream.dtype == torch.uint8 and stream.numel() == -(-101 * bits // 8)
        assert torch.equal(unpack_bits(stream, bits, 101), codes)


def _specs() -> list[dict]:
    specs = [{"format": "bfp", "width": w} for w in (2, 4, 6, 8)]
    specs += [{"format": n} for n in sorted(_packers()) if n != "bfp"]
    if "bof4s" in _packers():
        specs.append({"format": "bof4s", "outliers": "opq"})
    return specs


@pytest.mark.parametrize("spec", _specs(), ids=lambda s: "-".join(map(str, s.values())))
@pytest.mark.parametrize("dim", [-1, 0])
def test_unpack_is_bit_identical_to_fake_quantisation(spec, dim):
    torch.manual_seed(0)
    w = torch.randn(24, 70) * 0.05  # 70: a ragged last block for every block size
    w[2, 3] = 1.5  # an outlier
    fmt = make_format(spec)
    tensors, meta = pack_weight(fmt, w, dim)
    assert torch.equal(unpack_weight(json.loads(json.dumps(meta)), tensors), fmt.quantize(w, dim))


def test_unsupported_format_and_float_model_fail_clearly():
    with pytest.raises(ExportError, match="packed export not supported for format 'int'"):
        pack_weight(make_format({"format": "int", "width": 4}), torch.randn(4, 8), -1)
    from tiny import tiny_model

    with pytest.raises(ExportError, match="not quantised"):
        qat.export_model(tiny_model("bert"), "/tmp/never-written")
    with pytest.raises(qat.QatError, match="a Linear is not a transformers model"):
        qat.export_model(torch.nn.Linear(4, 4), "/tmp/never-written")
    with pytest.raises(qat.QatError, match="a model in memory is built already"):
        qat.build_model(tiny_model("bert"))


def _batch(tok):
    return tok(["a gripping, funny film", "flat"], return_tensors="pt", padding=True)


@pytest.mark.parametrize(
    "weight",
    [{"format": "bfp", "width": 4}, {"format": "mxfp4"}, {"format": "nf4", "block_size": 32}],
    ids=str,
)
def test_from_pretrained_rebuilds_identical_logits(tmp_path, weight):
    if weight["format"] not in _packers():
        pytest.skip(f"{weight['format']} not registered")
    recipe = tiny_recipe(tmp_path)
    built = build_model(recipe, ["--quant.weight", json.dumps(weight)], num_labels=2)
    model, tok = built.model, built.tokenizer
    out = write_packed(model, tmp_path / "export", tok)
    cfg = json.loads((out / "config.json").read_text())
    assert (
        cfg["model_type"] == "qat_packed"
        and "AutoModelForSequenceClassification" in cfg["auto_map"]
    )
    assert cfg["qat_packing"]["quant"]["weight"]["format"] == weight["format"]
    assert not (out / "model.safetensors").exists()
    loaded = AutoModelForSequenceClassification.from_pretrained(out)
    assert isinstance(loaded.bert.encoder.layer[1].output.dense, QuantLinear)
    assert loaded.config._attn_implementation == "qat"
    batch = _batch(tok)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)


def _sizes(model, path: Path) -> tuple[float, float, int, int]:
    """(expected packed bytes, expected file bytes, packed bytes written, file bytes).

    expected packed = sum over quantised linears of bits_per_element x weight numel / 8;
    expected file   = expected packed + sum over all other state tensors (tied ones once)
                      of numel x element_size (biases, norms, embeddings, the float head).
    """
    packed = {
        f"{n}.weight": m.weight_quantizer.fmt.bits_per_element * m.weight.numel() / 8
        for n, m in model.named_modules()
        if isinstance(m, QuantLinear) and m.weight_quantizer is not None
    }
    seen, other = set(), 0
    for key, t in model.state_dict().items():
        if key not in packed and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            other += t.numel() * t.element_size()
    with safe_open(str(path), "pt") as f:
        written = sum(
            f.get_tensor(k).numel() * f.get_tensor(k).element_size()
            for k in f.keys()
            if ".weight_" in k
        )
    exp_packed = sum(packed.values())
    return exp_packed, exp_packed + other, written, path.stat().st_size


def test_tiny_export_size(tmp_path):
    built = build_model(tiny_recipe(tmp_path), [], num_labels=2)
    model, tok = built.model, built.tokenizer
    out = write_packed(model, tmp_path / "export", tok)
    exp_packed, exp_file, written, size = _sizes(model, out / "qat_packed.safetensors")
    assert written == pytest.approx(exp_packed, rel=1e-3)  # BFP: exactly W + E/B bits
    assert size == pytest.approx(exp_file, rel=0.05)


def test_export_command(tmp_path, capsys):
    recipe = tiny_recipe(tmp_path)
    assert main([recipe, "--out", str(tmp_path / "e"), "--quant.weight.width", "6"]) == 0
    info = json.loads((tmp_path / "e" / "qat_export.json").read_text())
    assert info["density"]["quantized_linears"]["bits_per_element"] == pytest.approx(6.5)
    assert main([recipe]) == 2
    assert "--out DIR is required" in capsys.readouterr().err
    assert (
        main([recipe, "--out", str(tmp_path / "f"), "--quant.weight", "{format: int, width: 4}"])
        == 2
    )
    assert "packed export not supported" in capsys.readouterr().err


@pytest.mark.slow
def test_real_minilm_export(tmp_path):
    built = build_model(str(REPO / "recipes" / "minilm_sst2.yaml"), [], num_labels=2)
    model, tok = built.model, built.tokenizer
    out = write_packed(model, tmp_path / "minilm", tok)
    exp_packed, exp_file, written, size = _sizes(model, out / "qat_packed.safetensors")
    assert written == pytest.approx(exp_packed, rel=1e-3)  # 10764288 x 4.5 / 8 bytes
    assert size == pytest.approx(exp_file, rel=0.05)
    loaded = AutoModelForSequenceClassification.from_pretrained(out)
    batch = _batch(tok)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)


# --- loading without `import qat` (fresh interpreters) ----------------------------------------

_LOADER = r"""
import json, sys
import torch
if sys.argv[2] == "block-qat":
    sys.modules["qat"] = None  # as if qat were not installed
from transformers import AutoModelForSequenceClassification, AutoTokenizer
out = {}
def attempt(name, fn):
    try:
        out[name] = fn()
    except Exception as e:
        out[name] = f"{type(e).__name__}: {e}"
d = sys.argv[1]
tok = AutoTokenizer.from_pretrained(d, trust_remote_code=True)  # it reads config.json too
batch = tok(["a gripping, funny film", "flat"], return_tensors="pt", padding=True)
def logits(**kw):
    m = AutoModelForSequenceClassification.from_pretrained(d, **kw)
    with torch.no_grad():
        return m(**batch).logits.tolist()
if sys.argv[2] == "block-qat":
    attempt("plain", logits)
    def direct():
        from transformers import BertForSequenceClassification
        BertForSequenceClassification.from_pretrained(d)
        return "loaded"
    attempt("direct", direct)
attempt("remote", lambda: logits(trust_remote_code=True))
out["qat_imported"] = "qat.quant.quantize" in sys.modules
print("RESULT " + json.dumps(out))
"""


def _load_in_fresh_python(export: Path, mode: str) -> dict:
    """Load ``export`` in a new interpreter that never imports qat itself."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-c", _LOADER, str(export), mode],
        env=env,
        capture_output=True,
        text=True,
        cwd=export.parent,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    # (transformers' "run the custom code? [y/N]" prompt may precede it on the same line)
    lines = [ln.split("RESULT ", 1)[1] for ln in proc.stdout.splitlines() if "RESULT " in ln]
    assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads(lines[-1])


def _logits(model, tok) -> list:
    with torch.no_grad():
        return model(**_batch(tok)).logits.tolist()


def test_export_loads_with_trust_remote_code_without_importing_qat(tmp_path):
    """W4A4 (activations and attention quantised): the export's own modelling file imports the
    installed qat for the quantisers; the caller never does. Logits are bit-identical."""
    built = build_model(tiny_recipe(tmp_path), [], num_labels=2)
    model, tok = built.model, built.tokenizer
    out = write_packed(model, tmp_path / "export", tok)
    got = _load_in_fresh_python(out, "qat-installed")
    assert got["remote"] == _logits(model, tok)
    assert got["qat_imported"]


def test_export_without_qat_loads_exactly_or_refuses(tmp_path):
    """qat not importable at all: no trust_remote_code -> transformers' error saying to pass
    it; the base class directly -> no weights file; trust_remote_code on a weights-only
    export -> identical logits from the carried unpacking code; on a W4A4 export -> an
    ImportError saying to install qat. Never a random model."""
    w_only = [
        "--quant.activation",
        "null",
        "--quant.matmul",
        "null",
        "--quant.weight",
        "{format: mxfp4}",
    ]
    built = build_model(tiny_recipe(tmp_path), w_only, num_labels=2)
    model, tok = built.model, built.tokenizer
    out = write_packed(model, tmp_path / "w-only", tok)
    got = _load_in_fresh_python(out, "block-qat")
    assert got["plain"].startswith("ValueError") and "trust_remote_code=True" in got["plain"]
    assert got["direct"].startswith("OSError"), got["direct"]
    assert got["remote"] == _logits(model, tok)
    assert not got["qat_imported"]
    built = build_model(tiny_recipe(tmp_path), [], num_labels=2)
    model, tok = built.model, built.tokenizer
    out = write_packed(model, tmp_path / "w4a4", tok)
    got = _load_in_fresh_python(out, "block-qat")
    assert got["remote"].startswith("ImportError") and "pip install qat" in got["remote"]
    assert "trust_remote_code=True" in got["plain"]


# --- destinations: never overwritten unasked, never the source, written atomically ------------


def test_self_export_is_refused_and_the_run_survives(finished_run, capsys, tmp_path):
    from qat.cli.eval import main as eval_main

    before = tree_hashes(finished_run)
    cases = [
        (str(finished_run), "is the source checkpoint"),
        (str(finished_run / "exported"), "lies inside the source checkpoint"),
        (str(finished_run.parent), "contains the source checkpoint"),
    ]
    for out, what in cases:
        for extra in ([], ["--overwrite"]):
            capsys.readouterr()
            assert main([str(finished_run), "--out", out, *extra]) == 2
            err = error_lines(capsys)
            assert len(err) == 1 and what in err[0], err
            assert tree_hashes(finished_run) == before
    assert not (finished_run / "exported").exists()
    link = tmp_path / "link"
    link.symlink_to(finished_run)  # a symlink to the source is the source
    assert main([str(finished_run), "--out", str(link), "--overwrite"]) == 2
    assert "is the source checkpoint" in error_lines(capsys)[0]
    assert tree_hashes(finished_run) == before
    assert eval_main([str(finished_run), "--output", str(tmp_path / "eval.json")]) == 0


def test_non_empty_out_needs_overwrite_and_is_replaced_atomically(
    finished_run, capsys, tmp_path, monkeypatch
):
    out = tmp_path / "export"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main([str(finished_run), "--out", str(out)]) == 2
    err = error_lines(capsys)
    assert err == [
        f"qat export: error: --out {str(out)!r} is not empty (1 entries); pass "
        "--overwrite to replace it, or choose a new folder"
    ]
    assert (out / "notes.txt").read_text() == "mine"
    # --overwrite replaces only an export: a folder of notes, or another run, stays
    other_run = tmp_path / "other_run"
    shutil.copytree(finished_run, other_run)
    for folder in (out, other_run):
        before = tree_hashes(folder)
        assert main([str(finished_run), "--out", str(folder), "--overwrite"]) == 2
        assert error_lines(capsys) == [
            f"qat export: error: --out {str(folder)!r} is not empty and holds no qat export "
            "(qat_export.json beside its weights); --overwrite replaces "
            "only an export: choose a new folder"
        ]
        assert tree_hashes(folder) == before
    shutil.rmtree(other_run)
    (out / "notes.txt").unlink()
    assert main([str(finished_run), "--out", str(out)]) == 0  # an export, then a note in it
    (out / "notes.txt").write_text("mine")
    before = tree_hashes(out)
    # A failure while writing leaves the old folder untouched and no temporary folder behind.
    import safetensors.torch

    def broken(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="No space left"):
        main([str(finished_run), "--out", str(out), "--overwrite"])
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    assert tree_hashes(out) == before
    assert main([str(finished_run), "--out", str(out), "--overwrite"]) == 0
    assert not (out / "notes.txt").exists() and (out / "qat_packed.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    info = json.loads((out / "qat_export.json").read_text())
    assert info["weight_file_bytes"] == (out / "qat_packed.safetensors").stat().st_size
    # an empty folder is fine without --overwrite; a file is not a folder
    (tmp_path / "empty").mkdir()
    assert main([str(finished_run), "--out", str(tmp_path / "empty")]) == 0
    (tmp_path / "file").write_text("x")
    assert main([str(finished_run), "--out", str(tmp_path / "file"), "--overwrite"]) == 2
    assert error_lines(capsys) == [
        f"qat export: error: --out {str(tmp_path / 'file')!r} exists and is not a directory"
    ]
    assert (tmp_path / "file").read_text() == "x"


def test_out_holding_the_recipe_model_or_cwd_is_refused(tmp_path, capsys, monkeypatch):
    recipe = tiny_recipe(tmp_path)
    before = tree_hashes(tmp_path)
    assert main([recipe, "--out", str(tmp_path), "--overwrite"]) == 2
    assert "contains the recipe" in error_lines(capsys)[0]
    model_dir = tmp_path / "tiny-bert"
    assert main([recipe, "--out", str(model_dir), "--overwrite"]) == 2
    assert "contains the model" in error_lines(capsys)[0]
    work = tmp_path / "work"
    work.mkdir()
    (work / "x").write_text("x")
    monkeypatch.chdir(work)
    assert main([recipe, "--out", str(work), "--overwrite"]) == 2
    assert "contains the current directory" in error_lines(capsys)[0]
    assert tree_hashes(tmp_path) == {**before, "work/x": hashlib.sha256(b"x").hexdigest()}


def test_tampered_export_fails_naming_what(tmp_path):
    """A config from another packing version, or a packed tensor of the wrong size, is an error
    that names the file and layer, not a model with garbage weights."""
    from safetensors.torch import load_file, save_file

    built = build_model(tiny_recipe(tmp_path), [], num_labels=2)
    model, tok = built.model, built.tokenizer
    out = write_packed(model, tmp_path / "export", tok)
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["qat_packing"]["version"] = 1
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="qat_packing version 1 is not 2"):
        AutoModelForSequenceClassification.from_pretrained(out)
    cfg["qat_packing"]["version"] = 2
    cfg_path.write_text(json.dumps(cfg))
    state = load_file(out / "qat_packed.safetensors")
    key = "bert.encoder.layer.0.output.dense.weight_codes"
    state[key] = state[key][:-5].clone()
    save_file(state, str(out / "qat_packed.safetensors"), metadata={"format": "pt"})
    with pytest.raises(
        ValueError, match="layer bert.encoder.layer.0.output.dense: packed tensor 'codes' has shape"
    ):
        AutoModelForSequenceClassification.from_pretrained(out)
    with pytest.raises(TypeError, match="take no device_map 'auto'"):
        AutoModelForSequenceClassification.from_pretrained(out, device_map="auto")


@pytest.mark.parametrize("field, value", [("width", 3), ("exponent_width", 7)])
def test_edited_codec_fields_are_refused_by_the_checksum(tmp_path, field, value):
    """Width 4 -> 3 or exponent width 8 -> 7 in config.json would unpack the same
    bytes into other weights (or NaNs); the packing table carries a checksum."""
    built = build_model(tiny_recipe(tmp_path), [], num_labels=2)
    out = write_packed(built.model, tmp_path / "export", built.tokenizer)
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    codec = next(iter(cfg["qat_packing"]["codecs"].values()))
    assert codec["family"] == "bfp" and codec[field] != value
    codec[field] = value
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="qat_packing does not match its checksum"):
        AutoModelForSequenceClassification.from_pretrained(out)
    del cfg["qat_packing"]["checksum"]  # dropping the checksum does not help
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="qat_packing does not match its checksum"):
        AutoModelForSequenceClassification.from_pretrained(out)


def test_a_packed_stream_must_have_exactly_its_size():
    codes = torch.randint(0, 16, (101,))
    stream = pack_bits(codes, 4)
    with pytest.raises(ValueError, match="packed stream holds 52 bytes, 51 expected"):
        unpack_bits(torch.cat([stream, stream[:1]]), 4, 101)
    with pytest.raises(ValueError, match="38 expected for 101 codes of 3 bits"):
        unpack_bits(stream, 3, 101)  # the same bytes read as another width


def test_overwrite_replaces_an_export_of_any_target_and_nothing_else(tmp_path, capsys):
    """--overwrite replaces an earlier qat export whatever its target (GGUF, compressed-tensors,
    packed, in any order: each writes qat_export.json), and still never a folder that only
    looks like one: a stray model.gguf, or a qat_export.json whose weight file is missing."""
    from tiny import lm_recipe

    recipe = lm_recipe(tmp_path, quant={"weight": {"format": "mxfp4"}, "exclude": ["lm_head"]})
    out = tmp_path / "export"
    weights = {"gguf": "model.gguf", "compressed-tensors": "model.safetensors"}
    for to in ("gguf", "compressed-tensors", "packed", "gguf"):
        argv = [recipe, "--to", to, "--out", str(out), "--overwrite", "--device", "cpu"]
        assert main(argv) == 0, error_lines(capsys)
        info = json.loads((out / "qat_export.json").read_text())
        assert info["to"] == to and info["weights"] == weights.get(to, "qat_packed.safetensors")
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    lookalikes = {"model.gguf": b"GGUF", "qat_export.json": b'{"to": "gguf", "weights": "x"}'}
    for name, data in lookalikes.items():
        other = tmp_path / f"other_{name}"
        other.mkdir()
        (other / name).write_bytes(data)
        before = tree_hashes(other)
        assert main([recipe, "--to", "gguf", "--out", str(other), "--overwrite"]) == 2
        assert "holds no qat export" in error_lines(capsys)[0]
        assert tree_hashes(other) == before


def test_a_quantised_tied_head_loads_back_as_trained(tmp_path):
    """A tied lm_head quantised with the rest is packed as its own tensor and untied in the
    export's config; tied on loading, it would be the float embeddings again (logits off by
    as much as the head's quantisation moves them)."""
    from tiny import make_tiny_causal_lm_dir
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(make_tiny_causal_lm_dir(tmp_path, tied=True))
    bfp4 = {"format": "bfp", "width": 4, "block_size": 16}
    qat.quantize_model(model, {"weight": bfp4, "exclude": []})
    assert model.lm_head.weight is model.model.embed_tokens.weight
    out = write_packed(model, tmp_path / "export")
    loaded = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert torch.equal(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight)
