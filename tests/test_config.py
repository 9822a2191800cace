"""tinyserve.config: round trips and every invalid field (docs/repository.md section 3)."""

from __future__ import annotations

import copy
import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyserve.config import (
    DEFAULT_WEIGHTS,
    BatchingConfig,
    ModelConfig,
    TensorSpec,
    name_problem,
)
from tinyserve.errors import ConfigError, TinyserveError
from tinyserve.spec import DTYPES


def base() -> dict:
    return {
        "name": "resnet18",
        "platform": "torch_export",
        "inputs": [{"name": "image", "dtype": "float32", "shape": [-1, 3, 224, 224]}],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": [-1, 1000]}],
        "batching": {"max_batch_size": 64, "preferred_batch_sizes": [8, 32], "max_queue_delay_us": 1000},
        "extra": {"k": [1, 2.5, None, True, {"n": "s"}]},
    }


def with_(path: str, value, d: dict | None = None) -> dict:
    """Copy of `d` (default base()) with the dotted path set; value DELETE removes the key."""
    d = copy.deepcopy(base() if d is None else d)
    *parents, last = path.split(".")
    node = d
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node[p]
    if isinstance(node, list):
        last = int(last)
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return d


DELETE = object()


# --- valid configs ---------------------------------------------------------------------------------
def test_defaults_and_round_trip():
    cfg = ModelConfig.from_dict(base())
    assert cfg.program == "program.pt2"
    assert cfg.weights == DEFAULT_WEIGHTS == "weights.tsw"
    assert cfg.inputs == (TensorSpec("image", "float32", (-1, 3, 224, 224)),)
    assert cfg.batching == BatchingConfig(64, (8, 32), 1000, 1024)
    assert cfg.batching_enabled
    d = cfg.to_dict()
    assert ModelConfig.from_dict(d) == cfg
    assert ModelConfig.from_dict(json.loads(json.dumps(d))) == cfg
    assert set(d) == {"name", "platform", "program", "weights", "inputs", "outputs", "batching", "extra"}
    hash(cfg)  # frozen and hashable despite the `extra` dict


def test_python_platform_default_program_and_minimal_config():
    d = {
        "name": "m",
        "platform": "python",
        "inputs": [{"name": "x", "dtype": "int64", "shape": []}],
        "outputs": [{"name": "y", "dtype": "bool", "shape": [-1, 2, -1]}],
    }
    cfg = ModelConfig.from_dict(d)
    assert cfg.program == "model.py"
    assert cfg.batching is None and not cfg.batching_enabled
    assert cfg.extra == {}
    assert cfg.to_dict()["batching"] is None
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_batching_defaults():
    b = BatchingConfig()
    assert (b.max_batch_size, b.preferred_batch_sizes, b.max_queue_delay_us, b.max_queue_size) == (
        32,
        (),
        500,
        1024,
    )
    assert BatchingConfig.from_dict({}) == b
    cfg = ModelConfig.from_dict(with_("batching", {}))
    assert cfg.batching == b


def test_preferred_sizes_sorted_and_limits_inclusive():
    b = BatchingConfig(max_batch_size=65536, preferred_batch_sizes=[65536, 1, 7], max_queue_delay_us=0)
    assert b.preferred_batch_sizes == (1, 7, 65536)
    BatchingConfig(max_batch_size=1, preferred_batch_sizes=(1,), max_queue_size=1 << 20)
    BatchingConfig(max_queue_delay_us=60_000_000)


def test_frozen_and_extra_is_copied():
    extra = {"a": [1, (2, 3)]}
    cfg = ModelConfig("m", "python", (TensorSpec("x", "float32", (2,)),), (TensorSpec("y", "float32", ()),), extra=extra)
    extra["a"].append(4)
    assert cfg.extra == {"a": [1, [2, 3]]}  # deep copied, tuples become lists
    with pytest.raises(AttributeError):
        cfg.name = "other"  # type: ignore[misc]


def test_dynamic_dims_anywhere_without_batching():
    cfg = ModelConfig.from_dict(with_("inputs.0.shape", [2, -1, 0, 2**48], with_("batching", DELETE)))
    assert cfg.inputs[0].shape == (2, -1, 0, 2**48)


def test_toml_style_dict_without_optional_keys():
    d = with_("batching", DELETE, with_("extra", DELETE))
    assert ModelConfig.from_dict(d).batching is None


# --- invalid configs: (dotted path, value, words the message must contain) ---------------------------
INVALID = [
    # top level
    ("name", "", ["name", "empty"]),
    ("name", "../x", ["name", "'/'"]),
    ("name", "a" * 129, ["name", "129", "128"]),
    ("name", ".hidden", ["name", "'.'"]),
    ("name", 7, ["name", "string", "int"]),
    ("name", DELETE, ["missing", "'name'"]),
    ("platform", "tensorflow", ["platform", "'tensorflow'", "torch_export", "python", "onnx"]),
    ("platform", None, ["platform", "string", "null"]),
    ("platform", DELETE, ["missing", "'platform'"]),
    ("program", "a/b.pt2", ["program", "'/'"]),
    ("program", "model.json", ["program", "reserved"]),
    ("program", "weights.tsw", ["program", "same file"]),
    ("program", 3, ["program", "string"]),
    ("weights", "", ["weights", "empty"]),
    ("weights", "model.toml", ["weights", "reserved"]),
    ("weights", "-w.tsw", ["weights", "'-'"]),
    ("weights", False, ["weights", "string", "bool"]),
    ("inputs", [], ["inputs", "0 tensors", "1..256"]),
    ("inputs", "image", ["inputs", "list", "str"]),
    ("inputs", DELETE, ["missing", "'inputs'"]),
    ("outputs", [], ["outputs", "0 tensors", "1..256"]),
    ("outputs", DELETE, ["missing", "'outputs'"]),
    ("batching", [], ["batching", "object", "list"]),
    ("batching", 5, ["batching", "object", "int"]),
    ("extra", [], ["extra", "object", "list"]),
    ("extra", {"x": math.nan}, ["extra['x']", "nan", "finite"]),
    ("extra", {"x": math.inf}, ["extra['x']", "inf"]),
    ("extra", {"x": {1, 2}}, ["extra['x']", "set", "not JSON"]),
    ("extra", {"x": {3: 1}}, ["extra['x']", "key 3", "strings"]),
    ("extra", {"x": "a" * (1 << 20)}, ["extra", "bytes", "1048576"]),
    ("mystery", 1, ["unknown key 'mystery'"]),
    # tensor specs
    ("inputs.0.name", "", ["inputs[0]", "empty"]),
    ("inputs.0.name", "a\x00b", ["inputs[0]", "NUL"]),
    ("inputs.0.name", "\u00e9" * 513, ["inputs[0]", "1026", "1024"]),
    ("inputs.0.name", 1, ["inputs[0]", "name", "string"]),
    ("inputs.0.dtype", "float128", ["inputs[0]", "'float128'", "float32"]),
    ("inputs.0.dtype", DELETE, ["inputs[0]", "missing", "'dtype'"]),
    ("inputs.0.shape", "1,2", ["inputs[0].shape", "list", "str"]),
    ("inputs.0.shape", [-1] + [1] * 8, ["inputs[0]", "9 dimensions", "limit 8"]),
    ("inputs.0.shape", [-1, -2], ["inputs[0]", "shape[1]", "-2", "-1"]),
    ("inputs.0.shape", [-1, 2**48 + 1], ["inputs[0]", "shape[1]", str(2**48)]),
    ("inputs.0.shape", [-1, 3.0], ["inputs[0]", "shape[1]", "integer", "float"]),
    ("inputs.0.shape", [-1, True], ["inputs[0]", "shape[1]", "integer", "bool"]),
    ("inputs.0.shape", [-1, "3"], ["inputs[0]", "shape[1]", "integer", "str"]),
    ("inputs.0.extra", 1, ["inputs[0]", "unknown key 'extra'"]),
    ("inputs.0", "image", ["inputs[0]", "object", "str"]),
    ("outputs.0.dtype", "complex64", ["outputs[0]", "complex64"]),
    # batching
    ("batching.max_batch_size", 0, ["batching.max_batch_size", "0", "1..65536"]),
    ("batching.max_batch_size", 65537, ["batching.max_batch_size", "65537", "1..65536"]),
    ("batching.max_batch_size", 8.0, ["batching.max_batch_size", "integer", "float"]),
    ("batching.max_batch_size", True, ["batching.max_batch_size", "integer", "bool"]),
    ("batching.preferred_batch_sizes", [8, 65], ["preferred_batch_sizes[1]", "65", "max_batch_size (64)"]),
    ("batching.preferred_batch_sizes", [0], ["preferred_batch_sizes[0]", "0", "1..max_batch_size"]),
    ("batching.preferred_batch_sizes", [8, 8], ["preferred_batch_sizes[1]", "repeats", "8"]),
    ("batching.preferred_batch_sizes", ["8"], ["preferred_batch_sizes[0]", "integer", "str"]),
    ("batching.preferred_batch_sizes", 8, ["preferred_batch_sizes", "list", "int"]),
    ("batching.max_queue_delay_us", -1, ["max_queue_delay_us", "-1", "0..60000000"]),
    ("batching.max_queue_delay_us", 60_000_001, ["max_queue_delay_us", "60000001", "0..60000000"]),
    ("batching.max_queue_size", 0, ["max_queue_size", "0", "1..1048576"]),
    ("batching.max_queue_size", 1 << 21, ["max_queue_size", str(1 << 21), "1..1048576"]),
    ("batching.max_queue_size", None, ["max_queue_size", "integer", "null"]),
    ("batching.burst", 1, ["batching", "unknown key 'burst'"]),
    # batch dimension must be -1 when batching is enabled
    ("inputs.0.shape", [1, 3, 224, 224], ["inputs[0]", "shape[0] is 1", "batch dimension"]),
    ("outputs.0.shape", [], ["outputs[0]", "scalar", "batch dimension"]),
]


@pytest.mark.parametrize("path,value,words", INVALID, ids=[f"{p}={v!r}"[:60] for p, v, _ in INVALID])
def test_invalid_field(path, value, words):
    with pytest.raises(ConfigError) as info:
        ModelConfig.from_dict(with_(path, value))
    msg = str(info.value)
    for w in words:
        assert w in msg, (w, msg)
    assert len(msg) < 400  # hostile values are shortened, never echoed whole


def test_duplicate_tensor_names():
    d = base()
    d["inputs"].append(dict(d["inputs"][0]))
    with pytest.raises(ConfigError, match=r"inputs\[1\].*'image'.*twice"):
        ModelConfig.from_dict(d)
    d = base()
    d["outputs"] = [d["outputs"][0]] * 2
    with pytest.raises(ConfigError, match=r"outputs\[1\].*twice"):
        ModelConfig.from_dict(d)
    # the same name may be both an input and an output
    d = base()
    d["outputs"][0]["name"] = "image"
    ModelConfig.from_dict(d)


def test_too_many_tensors():
    d = base()
    d["batching"] = None
    d["outputs"] = [{"name": f"o{i}", "dtype": "int8", "shape": [1]} for i in range(257)]
    with pytest.raises(ConfigError, match=r"outputs has 257 tensors; must be 1\.\.256"):
        ModelConfig.from_dict(d)


def test_python_program_must_be_py():
    d = with_("platform", "python", with_("program", "model.txt"))
    with pytest.raises(ConfigError, match=r"program 'model.txt'.*'\.py'"):
        ModelConfig.from_dict(d)


def test_extra_too_deep():
    deep: object = 1
    for _ in range(40):
        deep = [deep]
    with pytest.raises(ConfigError, match="32 levels"):
        ModelConfig.from_dict(with_("extra", {"d": deep}))


def test_not_a_mapping():
    for bad in ([], "x", None, 3):
        with pytest.raises(ConfigError, match="model config must be an object"):
            ModelConfig.from_dict(bad)


def test_direct_construction_checks_types():
    x = TensorSpec("x", "float32", [2, 3])
    assert x.shape == (2, 3)
    with pytest.raises(ConfigError, match=r"inputs\[0\] must be a TensorSpec, got dict"):
        ModelConfig("m", "python", ({"name": "x"},), (x,))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="batching must be a BatchingConfig"):
        ModelConfig("m", "python", (x,), (x,), batching={"max_batch_size": 2})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="shape must be a list"):
        TensorSpec("x", "float32", 3)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="lone surrogate"):
        TensorSpec("\ud800", "float32", ())
    assert issubclass(ConfigError, TinyserveError) and issubclass(ConfigError, ValueError)


# --- properties ------------------------------------------------------------------------------------
_name_chars = st.sampled_from("abcXYZ019_.-/\\ \x00\u00e9")


@settings(max_examples=300, deadline=None)
@given(st.text(_name_chars, max_size=140))
def test_name_rule_matches_spec(name):
    ok = (
        1 <= len(name) <= 128
        and all(c.isascii() and (c.isalnum() or c in "_.-") for c in name)
        and name[0] not in ".-"
    )
    assert (name_problem(name) is None) == ok


_specs = st.builds(
    TensorSpec,
    name=st.text(min_size=1, max_size=20).filter(lambda s: "\x00" not in s and not any(0xD800 <= ord(c) < 0xE000 for c in s)),
    dtype=st.sampled_from(sorted(DTYPES)),
    shape=st.lists(st.integers(-1, 2**48), max_size=8).map(lambda s: tuple([-1] + s[:7])),
)
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=10,
)


@settings(max_examples=40, deadline=None)
@given(
    inputs=st.lists(_specs, min_size=1, max_size=4, unique_by=lambda s: s.name),
    outputs=st.lists(_specs, min_size=1, max_size=4, unique_by=lambda s: s.name),
    platform=st.sampled_from(["torch_export", "python"]),
    batching=st.none() | st.builds(BatchingConfig, max_batch_size=st.integers(1, 65536)),
    extra=st.dictionaries(st.text(max_size=8), _json, max_size=4),
)
def test_round_trip_property(inputs, outputs, platform, batching, extra):
    cfg = ModelConfig("m-1", platform, tuple(inputs), tuple(outputs), batching=batching, extra=extra)
    d = cfg.to_dict()
    assert ModelConfig.from_dict(d) == cfg
    assert ModelConfig.from_dict(json.loads(json.dumps(d))) == cfg


# --- scheduler fields (issue 5): target_p99_us, buckets, placement ----------------------------------
def seq_model() -> dict:
    d = base()
    d["inputs"] = [{"name": "ids", "dtype": "int64", "shape": [-1, -1]},
                   {"name": "mask", "dtype": "int64", "shape": [-1, -1]}]
    d["outputs"] = [{"name": "h", "dtype": "float32", "shape": [-1, -1, 8]},
                    {"name": "pooled", "dtype": "float32", "shape": [-1, 8]}]
    d["batching"] = {"max_batch_size": 16, "target_p99_us": 20000,
                     "buckets": {"dim": 1, "sizes": [16, 32, 64, 128], "inputs": ["ids", "mask"],
                                 "trim_outputs": ["h"]}}
    d["placement"] = {"mode": "elastic", "devices": ["cuda:0", "cpu"], "min_instances": 1, "max_instances": 4,
                      "scale_up_queue_depth": 16, "pinned": True}
    return d


def test_scheduler_fields_round_trip():
    cfg = ModelConfig.from_dict(seq_model())
    b = cfg.batching
    assert b.target_p99_us == 20000 and b.buckets.sizes == (16, 32, 64, 128) and b.buckets.pad_value == 0
    assert [b.buckets.bucket(n) for n in (1, 16, 17, 128, 129)] == [16, 16, 32, 128, None]
    p = cfg.placement
    assert (p.mode, p.devices, p.pinned, p.max_instances, p.cooldown_ms) == ("elastic", ("cuda:0", "cpu"), True, 4, 5000)
    d = cfg.to_dict()
    assert ModelConfig.from_dict(json.loads(json.dumps(d))) == cfg
    assert d["placement"]["devices"] == ["cuda:0", "cpu"]
    # absent placement stays absent (the server's defaults); "devices" may be a single string
    assert "placement" not in ModelConfig.from_dict(base()).to_dict()
    assert ModelConfig.from_dict(with_("placement", {"devices": "cpu"})).placement.devices == ("cpu",)
    assert BatchingConfig().target_p99_us is None and BatchingConfig().buckets is None


SCHED_INVALID = [
    ("batching.target_p99_us", 0, ["batching.target_p99_us", "0", "1..600000000"]),
    ("batching.target_p99_us", 1.5, ["target_p99_us", "integer", "float"]),
    ("batching.buckets", [16], ["batching.buckets", "object", "list"]),
    ("batching.buckets.dim", 0, ["buckets.dim", "0", "batch dimension"]),
    ("batching.buckets.dim", 2, ["buckets.inputs[0]", "'ids'", "2 dimensions", "at least 3"]),
    ("batching.buckets.sizes", [], ["buckets.sizes", "0 sizes", "1..64"]),
    ("batching.buckets.sizes", [32, 16], ["buckets.sizes[1]", "16", "ascending", "32"]),
    ("batching.buckets.sizes", [16, 0], ["buckets.sizes[1]", "0", "1.."]),
    ("batching.buckets.sizes", ["16"], ["buckets.sizes[0]", "integer", "str"]),
    ("batching.buckets.inputs", [], ["buckets.inputs", "empty"]),
    ("batching.buckets.inputs", ["ids", "ids"], ["buckets.inputs[1]", "repeats", "'ids'"]),
    ("batching.buckets.inputs", ["nope"], ["buckets.inputs[0]", "'nope'", "not one of the model's inputs"]),
    ("batching.buckets.trim_outputs", ["pooled"], ["trim_outputs[0]", "'pooled'.shape[1] is 8", "must be -1"]),
    ("batching.buckets.trim_outputs", ["x"], ["trim_outputs[0]", "'x'", "outputs"]),
    ("batching.buckets.pad_value", "0", ["pad_value", "number", "str"]),
    ("batching.buckets.pad_value", math.inf, ["pad_value", "inf", "finite"]),
    ("batching.buckets.pad_value", 1 << 64, ["pad_value", "64 bits"]),
    ("batching.buckets.dims", 1, ["batching.buckets", "unknown key 'dims'"]),
    ("batching.buckets.dim", DELETE, ["batching.buckets", "missing", "'dim'"]),
    ("placement", "cpu", ["placement", "object", "str"]),
    ("placement.mode", "lazy", ["placement.mode", "'lazy'", "static, dynamic, elastic"]),
    ("placement.devices", ["gpu0"], ["placement.devices[0]", "'gpu0'", "cuda:N"]),
    ("placement.devices", ["cuda:01"], ["placement.devices[0]", "'cuda:01'"]),
    ("placement.devices", ["cpu", "cpu"], ["placement.devices[1]", "repeats"]),
    ("placement.devices", ["auto", "cpu"], ["'auto' must be the only"]),
    ("placement.devices", [], ["placement.devices", "0 entries", "1..64"]),
    ("placement.pinned", 1, ["placement.pinned", "true or false", "int"]),
    ("placement.min_instances", 0, ["placement.min_instances", "0", "1..256"]),
    ("placement.max_instances", 0, ["placement.max_instances", "0", "1..256"]),
    ("placement.min_instances", 5, ["max_instances is 4", "min_instances (5)"]),
    ("placement.mode", "static", ["max_instances (4) differs from min_instances (1)", "elastic"]),
    ("placement.scale_up_queue_depth", 0, ["scale_up_queue_depth", "0", "1..1048576"]),
    ("placement.cooldown_ms", -1, ["placement.cooldown_ms", "-1", "0..86400000"]),
    ("placement.scale_up_after_ms", None, ["scale_up_after_ms", "integer", "null"]),
    ("placement.zone", "x", ["placement", "unknown key 'zone'"]),
]


@pytest.mark.parametrize("path,value,words", SCHED_INVALID, ids=[f"{p}={v!r}"[:60] for p, v, _ in SCHED_INVALID])
def test_invalid_scheduler_field(path, value, words):
    with pytest.raises(ConfigError) as info:
        ModelConfig.from_dict(with_(path, value, seq_model()))
    msg = str(info.value)
    for w in words:
        assert w in msg, (w, msg)
    assert len(msg) < 400


def test_buckets_need_a_dynamic_dim():
    d = seq_model()
    d["inputs"][1]["shape"] = [-1, 64]
    with pytest.raises(ConfigError, match=r"buckets.inputs\[1\]: 'mask'.shape\[1\] is 64; must be -1"):
        ModelConfig.from_dict(d)


# --- warm-up (docs/repository.md section 3.6) --------------------------------------------------------
def warm_model() -> dict:
    return {"name": "seq", "platform": "python",
            "inputs": [{"name": "ids", "dtype": "int64", "shape": [-1, -1]},
                       {"name": "mask", "dtype": "bool", "shape": [-1, 16]}],
            "outputs": [{"name": "y", "dtype": "float32", "shape": [-1]}]}


def test_warmup_forms_and_round_trip():
    for warmup, stored in ((None, None), (True, None), (False, False)):
        d = warm_model() if warmup is None else {**warm_model(), "warmup": warmup}
        cfg = ModelConfig.from_dict(d)
        assert cfg.warmup is stored
        assert ModelConfig.from_dict(cfg.to_dict()) == cfg
        assert ("warmup" in cfg.to_dict()) is (stored is False)  # the default is not written
    d = {**warm_model(), "warmup": [{"name": "mask", "file": "mask.npy"},
                                    {"name": "ids", "shape": [2, 8], "dtype": "int64", "value": 7}]}
    cfg = ModelConfig.from_dict(d)
    assert [w.name for w in cfg.warmup] == ["mask", "ids"] and cfg.warmup[1].shape == (2, 8)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    values = {**warm_model(), "warmup": [{"name": "ids", "shape": [1, 2], "values": [1, 2]},
                                         {"name": "mask", "shape": [1, 16], "value": True}]}
    assert ModelConfig.from_dict(values).warmup[0].values == (1, 2)


WARM_OK_MASK = {"name": "mask", "shape": [1, 16]}
WARM_INVALID = [
    ("yes", ["warmup must be true, false or a list of inputs", "str"]),
    ([{"name": "ids", "shape": [1, 4]}], ["warmup gives no tensor for input 'mask'", "or set warmup to false"]),
    ([{"name": "ids", "shape": [1, 4]}, WARM_OK_MASK, {"name": "ids", "shape": [1, 4]}], ["warmup[2]", "given twice"]),
    ([{"name": "tokens", "shape": [1, 4]}, WARM_OK_MASK], ["warmup[0]", "'tokens' is not one of the model's inputs", "ids, mask"]),
    ([{"name": "ids", "shape": [1, -1]}, WARM_OK_MASK], ["warmup[0]", "shape[1] is -1", "no -1"]),
    ([{"name": "ids", "shape": [1, 4, 1]}, WARM_OK_MASK], ["warmup[0]", "[1, 4, 1] does not fit", "[-1, -1]"]),
    ([{"name": "ids", "shape": [1, 4]}, {"name": "mask", "shape": [1, 8]}], ["warmup[1]", "[1, 8] does not fit", "[-1, 16]"]),
    ([{"name": "ids", "shape": [1 << 13, 1 << 12]}, WARM_OK_MASK], ["warmup[0]", "33554432 elements", "limit 16777216"]),
    ([{"name": "ids", "shape": [1, 4], "dtype": "int32"}, WARM_OK_MASK], ["warmup[0]", "dtype is int32", "takes int64"]),
    ([{"name": "ids", "shape": [1, 4], "value": 1.5}, WARM_OK_MASK], ["warmup[0]", "1.5 is not a int64 value"]),
    ([{"name": "ids", "shape": [1, 4]}, {"name": "mask", "shape": [1, 16], "value": 2}], ["warmup[1]", "2 is not a bool value"]),
    ([{"name": "ids", "shape": [1, 4], "value": "one"}, WARM_OK_MASK], ["warmup[0]", "value must be a finite number"]),
    ([{"name": "ids", "shape": [1, 2], "values": [1, 2, 3]}, WARM_OK_MASK], ["values lists 3 numbers", "has 2 elements"]),
    ([{"name": "ids", "shape": [1, 2], "values": [1, 2], "value": 1}, WARM_OK_MASK], ["value", "or values, not both"]),
    ([{"name": "ids", "shape": [1, 70000], "values": [0] * 70000}, WARM_OK_MASK], ["70000 numbers, limit 65536", ".npy"]),
    ([{"name": "ids", "file": "ids.txt"}, WARM_OK_MASK], ["warmup[0]", "must be a .npy file"]),
    ([{"name": "ids", "file": "../ids.npy"}, WARM_OK_MASK], ["warmup[0]", "file name", "contains '/'"]),
    ([{"name": "ids", "file": "ids.npy", "shape": [1, 2]}, WARM_OK_MASK], ["file gives the whole tensor"]),
    ([{"name": "ids"}, WARM_OK_MASK], ["warmup[0]", "give shape (a list of sizes) or file"]),
    ([{"name": "ids", "shape": [1, 4], "fill": 1}, WARM_OK_MASK], ["warmup[0]", "unknown key 'fill'"]),
]


@pytest.mark.parametrize("warmup,words", WARM_INVALID, ids=[repr(w)[:60] for w, _ in WARM_INVALID])
def test_invalid_warmup(warmup, words):
    with pytest.raises(ConfigError) as info:
        ModelConfig.from_dict({**warm_model(), "warmup": warmup})
    msg = str(info.value)
    for w in words:
        assert w in msg, (w, msg)
    assert len(msg) < 400


def test_a_weights_only_model_has_no_warmup():
    d = {"name": "w", "platform": "weights", "inputs": [{"name": "x", "dtype": "float32", "shape": [1]}],
         "outputs": [], "warmup": [{"name": "x", "shape": [1]}]}
    with pytest.raises(ConfigError, match="weights-only model has nothing to run"):
        ModelConfig.from_dict(d)
