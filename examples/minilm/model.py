"""all-MiniLM-L6-v2 as a tinyserve `python` model (docs/repository.md section 4.2): sentences in,
L2-normalised 384-float sentence embeddings out.

The encoder is BERT written here in plain torch (no `transformers` import: the server needs only torch
and `tokenizers`), laid out so that its `state_dict` keys are exactly those of the checkpoint's
`model.safetensors` and the weights bind with `load_state_dict(strict=True, assign=True)`:

    embeddings.{word,position,token_type}_embeddings, embeddings.LayerNorm, embeddings.position_ids
    encoder.layer.<i>.attention.self.{query,key,value}      (12 heads of 32)
    encoder.layer.<i>.attention.output.{dense,LayerNorm}     (post-norm residual)
    encoder.layer.<i>.intermediate.dense -> GELU (erf form)
    encoder.layer.<i>.output.{dense,LayerNorm}               (post-norm residual)
    pooler.dense                                             (in the checkpoint; unused)

What the sentence-transformers pipeline of this model does (its modules.json: Transformer -> Pooling ->
Normalize; 1_Pooling/config.json: mean over tokens; sentence_bert_config.json: max_seq_length 256),
and so what this file does:

* `preprocess({"text": [bytes, ...]})`: each item must be UTF-8; tokenised with `tokenizers` from the
  `tokenizer.json` shipped in the version directory (lower-casing WordPiece, [CLS] ... [SEP]),
  truncated to `max_seq_length` tokens, padded with [PAD] (id 0) to the longest sentence of the
  request; returns `input_ids` and `attention_mask`, int64 [n, L].  A request with anything else, a
  sentence that is not UTF-8, or more than `max_sentences` sentences is refused with
  `tinyserve.wire.InvalidInput`, which the server answers as INVALID_INPUT naming the input and the
  reason (the client's mistake: it does not count towards ejecting the model, docs/protocol.md 4).
* the module: encoder, then the mean of the token vectors over the attention mask, then division by
  the L2 norm (clamped at 1e-12, as torch.nn.functional.normalize does).  Returns `embedding` [n, 384].
* `postprocess`: `embedding` as contiguous float32.

`build(params)` receives the config's `extra`: `tokenizer` (a file name relative to this file's
directory, the version directory), `max_seq_length`, `max_sentences` and the architecture sizes (the
defaults are all-MiniLM-L6-v2's).  The tokenizer is kept in this module's globals for `preprocess`:
the server imports a fresh copy of this file for every version it loads, so versions do not share it.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from tinyserve.wire import InvalidInput  # refusals answer INVALID_INPUT: the client's mistake
import torch.nn.functional as F
from torch import nn

ARCH_DEFAULTS = {
    "vocab_size": 30522,
    "hidden_size": 384,
    "num_hidden_layers": 6,
    "num_attention_heads": 12,
    "intermediate_size": 1536,
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
    "layer_norm_eps": 1e-12,
}
INPUT = "text"

# set by build() for preprocess()
_tokenizer = None
_max_sentences = 1024


# --- the encoder -------------------------------------------------------------------------------------
class Embeddings(nn.Module):
    def __init__(self, vocab: int, hidden: int, max_pos: int, type_vocab: int, eps: float) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, hidden)
        self.position_embeddings = nn.Embedding(max_pos, hidden)
        self.token_type_embeddings = nn.Embedding(type_vocab, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)
        # in the checkpoint (0 .. max_pos-1), so a persistent buffer
        self.register_buffer("position_ids", torch.arange(max_pos, dtype=torch.int64).unsqueeze(0))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[1]
        positions = self.position_ids[:, :length]
        # one segment: every token has token type 0
        x = (self.word_embeddings(input_ids) + self.position_embeddings(positions)
             + self.token_type_embeddings.weight[0])
        return self.LayerNorm(x)


class SelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
        self.heads = heads
        self.head_dim = hidden // heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        n, length, hidden = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:  # [n, L, H] -> [n, heads, L, head_dim]
            return t.view(n, length, self.heads, self.head_dim).transpose(1, 2)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(self.head_dim)) + bias
        ctx = torch.matmul(torch.softmax(scores, dim=-1), v)
        return ctx.transpose(1, 2).reshape(n, length, hidden)


class AttentionOutput(nn.Module):
    def __init__(self, hidden: int, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, ctx: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(ctx) + residual)


class Attention(nn.Module):
    def __init__(self, hidden: int, heads: int, eps: float) -> None:
        super().__init__()
        self.self = SelfAttention(hidden, heads)
        self.output = AttentionOutput(hidden, eps)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x, bias), x)


class Intermediate(nn.Module):
    def __init__(self, hidden: int, inner: int) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden, inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))  # the exact (erf) GELU: config hidden_act "gelu"


class Output(nn.Module):
    def __init__(self, inner: int, hidden: int, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(inner, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(h) + residual)


class Layer(nn.Module):
    def __init__(self, hidden: int, heads: int, inner: int, eps: float) -> None:
        super().__init__()
        self.attention = Attention(hidden, heads, eps)
        self.intermediate = Intermediate(hidden, inner)
        self.output = Output(inner, hidden, eps)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        a = self.attention(x, bias)
        return self.output(self.intermediate(a), a)


class Encoder(nn.Module):
    def __init__(self, layers: int, hidden: int, heads: int, inner: int, eps: float) -> None:
        super().__init__()
        self.layer = nn.ModuleList(Layer(hidden, heads, inner, eps) for _ in range(layers))

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x, bias)
        return x


class Pooler(nn.Module):
    """BERT's [CLS] pooler: its weights are in the checkpoint, sentence-transformers does not use it."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)


class MiniLM(nn.Module):
    """BERT encoder + mean pooling over the attention mask + L2 normalisation."""

    def __init__(self, vocab_size: int, hidden_size: int, num_hidden_layers: int, num_attention_heads: int,
                 intermediate_size: int, max_position_embeddings: int, type_vocab_size: int,
                 layer_norm_eps: float) -> None:
        super().__init__()
        self.embeddings = Embeddings(vocab_size, hidden_size, max_position_embeddings, type_vocab_size,
                                     layer_norm_eps)
        self.encoder = Encoder(num_hidden_layers, hidden_size, num_attention_heads, intermediate_size,
                               layer_norm_eps)
        self.pooler = Pooler(hidden_size)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
            raise ValueError(f"input_ids {list(input_ids.shape)} and attention_mask "
                             f"{list(attention_mask.shape)} must both be [n, L]")
        x = self.embeddings(input_ids)
        keep = attention_mask.to(x.dtype)
        # additive key mask [n, 1, 1, L]: 0 where attended, the dtype's minimum where padded (finite, so a
        # row with no token at all stays finite)
        bias = ((1.0 - keep) * torch.finfo(x.dtype).min)[:, None, None, :]
        x = self.encoder(x, bias)
        weights = keep.unsqueeze(-1)
        summed = (x * weights).sum(dim=1)
        counts = weights.sum(dim=1).clamp(min=1e-9)
        return F.normalize(summed / counts, p=2.0, dim=1)


# --- the python-platform hooks -----------------------------------------------------------------------
def _arch(params: dict) -> dict:
    arch = {}
    for key, default in ARCH_DEFAULTS.items():
        value = params.get(key, default)
        if isinstance(value, bool) or not isinstance(value, type(default)) or value <= 0:
            raise ValueError(f"extra.{key} must be a positive {type(default).__name__}, got {value!r}")
        arch[key] = value
    return arch


def _load_tokenizer(params: dict):
    try:
        from tokenizers import Tokenizer
    except ImportError as exc:
        raise ImportError(f"the minilm example tokenizes with the tokenizers package ({exc}): "
                          "pip install 'tinyserve[minilm]'") from None

    here = Path(__file__).resolve().parent
    name = params.get("tokenizer", "tokenizer.json")
    if not isinstance(name, str) or not (here / name).resolve().is_relative_to(here):
        raise ValueError(f"extra.tokenizer must name a file inside the version directory, got {name!r}")
    max_len = params.get("max_seq_length", 256)
    if isinstance(max_len, bool) or not isinstance(max_len, int) or not 2 <= max_len <= params.get(
            "max_position_embeddings", ARCH_DEFAULTS["max_position_embeddings"]):
        raise ValueError(f"extra.max_seq_length must be an integer 2 .. max_position_embeddings, got {max_len!r}")
    tok = Tokenizer.from_file(str(here / name))
    # tokenizer.json ships fixed padding to 128 and truncation at 128; sentence-transformers pads to the
    # longest sentence of the batch and truncates at max_seq_length
    pad = tok.padding or {}
    tok.no_padding()
    tok.enable_truncation(max_length=max_len)
    tok.enable_padding(pad_id=pad.get("pad_id", 0), pad_type_id=pad.get("pad_type_id", 0),
                       pad_token=pad.get("pad_token", "[PAD]"), direction="right")
    return tok


def build(params: dict) -> nn.Module:
    global _tokenizer, _max_sentences
    max_sentences = params.get("max_sentences", 1024)
    if isinstance(max_sentences, bool) or not isinstance(max_sentences, int) or max_sentences < 1:
        raise ValueError(f"extra.max_sentences must be a positive integer, got {max_sentences!r}")
    _tokenizer = _load_tokenizer(params)
    _max_sentences = max_sentences
    # on the meta device: every parameter and buffer is replaced by the weights file's tensor
    # (load_state_dict(strict=True, assign=True)), so nothing is allocated or initialised twice
    with torch.device("meta"):
        return MiniLM(**_arch(params))


def _decode(items: list) -> list[str]:
    texts = []
    for i, item in enumerate(items):
        try:
            texts.append(bytes(item).decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise InvalidInput(f"model minilm: input {INPUT!r}: sentence {i} is not UTF-8 ({exc.reason} at byte "
                               f"{exc.start})") from None
    return texts


def preprocess(inputs: dict) -> dict:
    if set(inputs) != {INPUT}:
        raise InvalidInput(f"model minilm takes one input {INPUT!r} (a bytes tensor of UTF-8 sentences), "
                           f"got {sorted(inputs)}")
    items = inputs[INPUT]
    if not isinstance(items, list):
        raise InvalidInput(f"model minilm: input {INPUT!r} must have dtype bytes (UTF-8 sentences), got a "
                           f"{getattr(items, 'dtype', type(items).__name__)} tensor")
    if len(items) > _max_sentences:
        raise InvalidInput(f"model minilm: input {INPUT!r}: {len(items)} sentences, at most {_max_sentences} "
                           "per request")
    texts = _decode(items)
    if not texts:
        empty = torch.zeros((0, 0), dtype=torch.int64)
        return {"input_ids": empty, "attention_mask": empty.clone()}
    encodings = _tokenizer.encode_batch(texts)
    return {"input_ids": torch.tensor([e.ids for e in encodings], dtype=torch.int64),
            "attention_mask": torch.tensor([e.attention_mask for e in encodings], dtype=torch.int64)}


def postprocess(outputs: dict) -> dict:
    return {"embedding": outputs["embedding"].to(torch.float32).contiguous()}
