"""Hugging Face model directories, platform ``hf`` (docs/repository.md section 4.8; the ``tinyserve[hf]``
extra: transformers and tokenizers).

Pack (``tinyserve pack DIR --task feature-extraction|text-classification``): DIR holds ``config.json`` and
``model.safetensors`` (and, for text input, ``tokenizer.json``).  The model is built with
``transformers.AutoModel`` (or ``AutoModelForSequenceClassification``) ``from_config`` with its parameters on the meta device; the checkpoint's tensors
are matched to its state dict (a name that carries the model's ``base_model_prefix`` + ``.`` is taken
without it, or one without it with it, when that is what the model has; tensors that are the model's non-persistent buffers are left out) and every mismatch
(missing, unexpected, other shape or dtype) is refused, naming them.  The matched tensors go into the
weights file; ``config.json``, ``tokenizer.json`` and the sentence-transformers files present are
copied as version files; the pooling (mean or cls, from ``1_Pooling/config.json``, default mean),
whether to L2-normalise (a ``Normalize`` module in ``modules.json``) and the token limit go into
the config's ``extra``.

Load: the same construction (parameters on the meta device, under ``program.import_guard``), the
weights tinyserve mapped or decoded bound with ``load_state_dict(assign=True, strict=True)``, eval
mode.  The request sends ``text`` (bytes, [-1]: UTF-8 strings); ``preprocess`` tokenizes them
(truncation at the token limit, padding to the longest of the request) into ``input_ids`` and
``attention_mask``; the module returns ``embedding`` float32 [-1, hidden] (pooled) or ``logits``
float32 [-1, num_labels].
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch

from tinyserve import errors
from tinyserve.program import import_guard
from tinyserve.weights import TORCH_DTYPES

_EXTRA = "pip install 'tinyserve[hf]'"
TASKS = ("feature-extraction", "text-classification")
# task -> (transformers auto class, output name)
AUTO = {"feature-extraction": ("AutoModel", "embedding"), "text-classification": ("AutoModelForSequenceClassification", "logits")}
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
TOKENIZER = "tokenizer.json"
# copied into the version when present (provenance; the load reads config.json and tokenizer.json)
COPIED = (CONFIG, TOKENIZER, "tokenizer_config.json", "special_tokens_map.json", "modules.json",
          "sentence_bert_config.json", "config_sentence_transformers.json")
POOLINGS = ("mean", "cls")
INPUT = "text"
MAX_TEXTS = 1024  # per request (extra.max_texts)
MAX_SHOWN = 8


def _transformers():
    try:
        with import_guard("importing transformers"):
            import transformers
    except ImportError as exc:
        raise errors.ConfigError(f"the hf platform needs transformers ({exc}): {_EXTRA}") from None
    return transformers


def _tokenizers():
    try:
        import tokenizers
    except ImportError as exc:
        raise errors.ConfigError(f"the hf platform needs tokenizers ({exc}): {_EXTRA}") from None
    return tokenizers


@contextlib.contextmanager
def _params_on_meta():
    """Parameters made while inside are moved to the meta device as they are registered (no memory,
    no initialisation); buffers stay real (non-persistent ones such as position ids are computed)."""
    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def _read_json(path: Path, what: str) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise errors.FormatError(f"{path}: unreadable {what} ({exc})") from None
    if not isinstance(value, dict) and not isinstance(value, list):
        raise errors.FormatError(f"{path}: {what} is not a JSON object")
    return value


def build(config_path: Path, task: str, where: str):
    """The model of `task` for config.json at `config_path`, parameters on meta, in eval mode."""
    transformers = _transformers()
    try:
        with import_guard(f"building {where}"):
            hf_config = transformers.AutoConfig.from_pretrained(str(config_path.parent), local_files_only=True)
            with _params_on_meta():
                model = getattr(transformers, AUTO[task][0]).from_config(hf_config)
    except errors.TinyserveError:
        raise
    except Exception as exc:  # transformers raises ValueError, KeyError, OSError for unknown or bad configs
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise errors.FormatError(f"{where}: transformers cannot build a model from config.json "
                                 f"({first[:300]})") from None
    return model.eval(), hf_config


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError as exc:
        raise errors.ConfigError(f"the hf platform reads model.safetensors with safetensors ({exc}): {_EXTRA}") from None
    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises its own error types
        raise errors.FormatError(f"{path}: not a readable safetensors file ({str(exc)[:300]})") from None


def _pooling(src: Path) -> tuple[str, bool]:
    """(pooling, normalize) from the sentence-transformers files of a directory (mean, False when
    there are none)."""
    pooling, normalize = "mean", False
    modules_file = src / "modules.json"
    if not modules_file.is_file():
        return pooling, normalize
    modules = _read_json(modules_file, "modules.json")
    if not isinstance(modules, list):
        raise errors.FormatError(f"{modules_file}: not a list of modules")
    for m in modules:
        kind = str(m.get("type", "")) if isinstance(m, dict) else ""
        if kind.endswith(".Normalize"):
            normalize = True
        elif kind.endswith(".Pooling"):
            pcfg_path = src / str(m.get("path", "")) / "config.json"
            if not pcfg_path.resolve().is_relative_to(src.resolve()):
                raise errors.FormatError(f"{modules_file}: pooling path {m.get('path')!r} leaves the directory")
            pcfg = _read_json(pcfg_path, "pooling config")
            modes = [k[len("pooling_mode_"):] for k, v in pcfg.items() if k.startswith("pooling_mode_") and v is True]
            modes = ["mean" if k == "mean_tokens" else "cls" if k == "cls_token" else k for k in modes]
            if len(modes) != 1 or modes[0] not in POOLINGS:
                raise errors.UnsupportedError(f"{pcfg_path}: pooling modes {modes}; tinyserve's hf platform pools "
                                              f"with exactly one of {', '.join(POOLINGS)}")
            pooling = modes[0]
        elif not kind.endswith(".Transformer"):
            raise errors.UnsupportedError(f"{modules_file}: module {kind!r}; tinyserve's hf platform runs "
                                          "Transformer, Pooling and Normalize")
    return pooling, normalize


def _max_length(src: Path, hf_config) -> int:
    limit = int(getattr(hf_config, "max_position_embeddings", 512) or 512)
    st = src / "sentence_bert_config.json"
    if st.is_file():
        n = _read_json(st, "sentence_bert_config.json").get("max_seq_length")
        if isinstance(n, int) and not isinstance(n, bool) and 2 <= n <= limit:
            return n
    tc = src / "tokenizer_config.json"
    if tc.is_file():
        n = _read_json(tc, "tokenizer_config.json").get("model_max_length")
        if isinstance(n, int) and not isinstance(n, bool) and 2 <= n <= limit:
            return n
    return limit


def match_weights(model: torch.nn.Module, tensors: Mapping[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under the model's state-dict names; refuses every mismatch."""
    want = model.state_dict(keep_vars=True)
    prefix = getattr(model, "base_model_prefix", "") or ""
    transient = {n for n, _ in model.named_buffers()} - set(want)
    out: dict[str, torch.Tensor] = {}
    unexpected = []
    for name, t in tensors.items():
        key = name
        if name not in want and prefix and name.startswith(prefix + ".") and name[len(prefix) + 1:] in want:
            key = name[len(prefix) + 1:]  # a task model's checkpoint for the bare encoder
        elif name not in want and prefix and f"{prefix}.{name}" in want:
            key = f"{prefix}.{name}"  # a bare encoder's checkpoint for a task model
        if key in want:
            out[key] = t
        elif key not in transient and not (prefix and f"{prefix}.{key}" in transient):
            unexpected.append(name)
    problems = [f"missing {k!r} ({TORCH_DTYPES.get(w.dtype)} {list(w.shape)})" for k, w in want.items() if k not in out]
    n_missing = len(problems)
    problems += [f"unexpected {k!r}" for k in unexpected]
    for k, t in out.items():
        w = want[k]
        if tuple(t.shape) != tuple(w.shape) or (t.dtype.is_floating_point != w.dtype.is_floating_point):
            problems.append(f"{k!r} is {TORCH_DTYPES.get(t.dtype)} {list(t.shape)} in {WEIGHTS}, the model has "
                            f"{TORCH_DTYPES.get(w.dtype)} {list(w.shape)}")
    if problems:
        more = f"; ... and {len(problems) - MAX_SHOWN} more" if len(problems) > MAX_SHOWN else ""
        raise errors.ModelError(
            f"{where}: the weights do not fit the model config.json describes ({len(problems)} mismatch"
            f"{'es' if len(problems) != 1 else ''}: {n_missing} missing, {len(unexpected)} unexpected, "
            f"{len(problems) - n_missing - len(unexpected)} of another shape): " + "; ".join(problems[:MAX_SHOWN]) + more)
    return out


def pack_hf(path: str, out_dir: str | os.PathLike, cfg: dict, limit: int, task: str | None = None) -> dict[str, torch.Tensor]:
    """Tensors for the weights file of the Hugging Face directory `path`; copies config.json and the
    tokenizer files into out_dir and fills cfg (platform hf, inputs, outputs, request sides, extra)."""
    src = Path(path)
    if task is None:
        raise errors.ConfigError(f"{path}: a Hugging Face model directory needs --task (one of {', '.join(TASKS)})")
    if task not in TASKS:
        raise errors.UnsupportedError(f"{path}: task {task!r}; the hf platform packs --task {', '.join(TASKS)}")
    for need in (CONFIG, WEIGHTS, TOKENIZER):
        if not (src / need).is_file():
            extra = " (sharded checkpoints, model.safetensors.index.json, are not supported)" \
                if need == WEIGHTS and (src / "model.safetensors.index.json").exists() else ""
            raise errors.FormatError(f"{path}: a Hugging Face model directory needs {need}; there is none{extra}")
    if (src / WEIGHTS).stat().st_size > limit:
        raise errors.LimitError(f"{src / WEIGHTS}: more than {limit} bytes (the source limit, --max-source-bytes)")
    _read_json(src / CONFIG, "config.json")
    model, hf_config = build(src / CONFIG, task, path)
    pooling, normalize = _pooling(src) if task == "feature-extraction" else ("mean", False)
    max_length = _max_length(src, hf_config)
    tensors = match_weights(model, _read_safetensors(src / WEIGHTS), path)
    out_dir = Path(out_dir)
    for name in COPIED:
        if (src / name).is_file():
            shutil.copyfile(src / name, out_dir / name)
    out_name = AUTO[task][1]
    width = int(hf_config.hidden_size) if task == "feature-extraction" else int(hf_config.num_labels)
    cfg["platform"] = "hf"
    cfg["program"] = CONFIG
    cfg["inputs"] = [{"name": "input_ids", "dtype": "int64", "shape": [-1, -1]},
                     {"name": "attention_mask", "dtype": "int64", "shape": [-1, -1]}]
    cfg["outputs"] = [{"name": out_name, "dtype": "float32", "shape": [-1, width]}]
    cfg["request_inputs"] = [{"name": INPUT, "dtype": "bytes", "shape": [-1]}]
    cfg["request_outputs"] = [{"name": out_name, "dtype": "float32", "shape": [-1, width]}]
    extra = dict(cfg.get("extra") or {})
    extra.update({"task": task, "tokenizer": TOKENIZER, "max_length": max_length})
    if task == "feature-extraction":
        extra.update({"pooling": pooling, "normalize": normalize})
    extra.setdefault("max_texts", MAX_TEXTS)
    cfg["extra"] = extra
    return tensors


class EmbeddingModel(torch.nn.Module):
    """The transformers encoder, then the pooling (mean over the attention mask, or the first token),
    then, when the directory says Normalize, division by the L2 norm (clamped at 1e-12)."""

    def __init__(self, encoder: torch.nn.Module, pooling: str, normalize: bool) -> None:
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling
        self.normalize = normalize

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if input_ids.numel() == 0:
            return torch.zeros((input_ids.shape[0], self.encoder.config.hidden_size), dtype=torch.float32,
                               device=input_ids.device)
        x = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "cls":
            pooled = x[:, 0]
        else:
            w = attention_mask.unsqueeze(-1).to(x.dtype)
            pooled = (x * w).sum(dim=1) / w.sum(dim=1).clamp(min=1e-9)
        if self.normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2.0, dim=1)
        return pooled.to(torch.float32)


class ClassifierModel(torch.nn.Module):
    """The transformers sequence classifier; returns its logits as float32."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if input_ids.numel() == 0:
            return torch.zeros((input_ids.shape[0], self.model.config.num_labels), dtype=torch.float32,
                               device=input_ids.device)
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits.to(torch.float32)


class TextHooks:
    """preprocess / postprocess of a text model (docs/repository.md section 4.2's calling convention)."""

    def __init__(self, tokenizer, max_texts: int, name: str, output: str = "embedding") -> None:
        self.output = output
        self.tokenizer = tokenizer
        self.max_texts = max_texts
        self.name = name

    def preprocess(self, inputs: dict) -> dict:
        if set(inputs) != {INPUT}:
            raise errors.InvalidInput(f"model {self.name}: takes one input {INPUT!r} (a bytes tensor of UTF-8 texts), "
                                      f"got {sorted(inputs)}")
        items = inputs[INPUT]
        if not isinstance(items, list):
            raise errors.InvalidInput(f"model {self.name}: input {INPUT!r} must have dtype bytes (UTF-8 texts), got a "
                                      f"{getattr(items, 'dtype', type(items).__name__)} tensor")
        if len(items) > self.max_texts:
            raise errors.InvalidInput(f"model {self.name}: input {INPUT!r}: {len(items)} texts, at most "
                                      f"{self.max_texts} per request (extra.max_texts)")
        texts = []
        for i, item in enumerate(items):
            try:
                texts.append(bytes(item).decode("utf-8"))
            except UnicodeDecodeError as exc:
                raise errors.InvalidInput(f"model {self.name}: input {INPUT!r}: text {i} is not UTF-8 ({exc.reason} at "
                                          f"byte {exc.start})") from None
        if not texts:
            empty = torch.zeros((0, 0), dtype=torch.int64)
            return {"input_ids": empty, "attention_mask": empty.clone()}
        enc = self.tokenizer.encode_batch(texts)
        return {"input_ids": torch.tensor([e.ids for e in enc], dtype=torch.int64),
                "attention_mask": torch.tensor([e.attention_mask for e in enc], dtype=torch.int64)}

    def postprocess(self, outputs: dict) -> dict:
        return {self.output: outputs[self.output].to(torch.float32).contiguous()}


def load_tokenizer(path: Path, max_length: int):
    tok = _tokenizers().Tokenizer.from_file(str(path))
    pad = tok.padding or {}
    tok.no_padding()
    tok.enable_truncation(max_length=max_length)
    tok.enable_padding(pad_id=pad.get("pad_id", 0), pad_type_id=pad.get("pad_type_id", 0),
                       pad_token=pad.get("pad_token", "[PAD]"), direction="right")
    return tok


def load_hf(version_dir: str | os.PathLike, weights: Mapping[str, torch.Tensor], program: str = CONFIG,
            config=None, device="cpu", **_):
    """(module, hooks) of an hf version: the model built from config.json with `weights` bound
    (load_state_dict(assign=True, strict=True)), and the tokenizing hooks."""
    version_dir = Path(version_dir)
    extra = dict(config.extra) if config is not None else {}
    task, pooling = extra.get("task"), extra.get("pooling", "mean")
    max_length, max_texts = extra.get("max_length"), extra.get("max_texts", MAX_TEXTS)
    if task not in TASKS or pooling not in POOLINGS or not isinstance(max_length, int) or not isinstance(max_texts, int):
        raise errors.ModelError(f"{version_dir}: extra must give task ({', '.join(TASKS)}), pooling "
                                f"({', '.join(POOLINGS)}), max_length and max_texts (integers); got {extra}")
    try:
        model, _cfg = build(version_dir / program, task, str(version_dir))
        model.load_state_dict(dict(weights), strict=True, assign=True)
    except errors.FormatError as exc:
        raise errors.ModelError(str(exc)) from None
    except RuntimeError as exc:  # load_state_dict's missing / unexpected / size mismatch
        raise errors.ModelError(f"{version_dir}: the weights do not fit config.json: {str(exc)[:600]}") from None
    if device != "cpu":
        model = model.to(device)
    tok_name = str(extra.get("tokenizer", TOKENIZER))
    tok_path = version_dir / tok_name
    if not tok_path.resolve().is_relative_to(version_dir.resolve()) or not tok_path.is_file():
        raise errors.ModelError(f"{version_dir}: extra.tokenizer {tok_name!r} is not a file of the version")
    hooks = TextHooks(load_tokenizer(tok_path, max_length), max_texts, config.name if config is not None else "hf",
                      AUTO[task][1])
    if task == "text-classification":
        return ClassifierModel(model).eval(), hooks
    return EmbeddingModel(model, pooling, bool(extra.get("normalize"))).eval(), hooks
