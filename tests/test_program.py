"""program.flatten_calls: an exported program called without torch.export's per-call wrapper
(pytree flattening of inputs and outputs, the forward hooks; issue 14) answers exactly as
torch.export's own module does, for every batch size, and falls back where its calling convention
does not fit."""

from __future__ import annotations

import pytest
import torch

from tinyserve.examples import encoder, mlp
from tinyserve.program import export_module, flatten_calls, load_export_program


def _exported(tmp_path, factory):
    module, example = factory() if callable(factory) else factory
    stored, _ = export_module(module, example, tmp_path)
    return module, example, stored


def _wrapped(tmp_path, stored) -> torch.nn.Module:
    """torch.export's own module over the same program and weights (the reference)."""
    ep = torch.export.load(tmp_path / "program.pt2")
    for table in (ep.state_dict, ep.constants):
        for name, value in list(table.items()):
            t = stored[name] if name in stored else None
            if t is None:
                continue
            table[name] = torch.nn.Parameter(t, requires_grad=True) if isinstance(value, torch.nn.Parameter) else t
    return ep.module()


@pytest.mark.parametrize("factory", [mlp, encoder], ids=["mlp", "encoder"])
def test_flat_module_answers_bit_identical_at_every_batch_size(tmp_path, factory):
    module, example, stored = _exported(tmp_path, factory)
    flat = load_export_program(tmp_path, stored, check_inputs=False,
                               input_shapes=[[-1, *x.shape[1:]] for x in example])
    ref = _wrapped(tmp_path, stored)
    code = flat.code
    assert "tree_flatten_spec" not in code and "tree_unflatten" not in code
    assert "_guards_fn" not in code  # the config's shapes pin what the graph fixes: the server checks
    assert not flat._forward_pre_hooks and not flat._forward_hooks
    torch.manual_seed(1)
    with torch.inference_mode():
        for batch in (1, 2, 3, 17, 64):
            args = []
            for x in example:
                shape = (batch, *x.shape[1:])
                args.append(torch.randint(0, 1000, shape, dtype=x.dtype) if not x.dtype.is_floating_point
                            else torch.randn(shape, dtype=x.dtype))
            got, want = flat(*args), ref(*args)
            assert type(got) is type(want)
            assert torch.equal(got, want), batch
            assert torch.equal(got, module(*args)), batch


def test_flat_module_keeps_guards_when_the_config_is_looser(tmp_path):
    _, _, stored = _exported(tmp_path, mlp)
    checked = load_export_program(tmp_path, stored)  # a direct user: the constraint hook and guards stay
    assert "_guards_fn" in checked.code and "tree_flatten_spec" not in checked.code
    loose = load_export_program(tmp_path, stored, check_inputs=False, input_shapes=[[-1, -1]])
    assert "_guards_fn" in loose.code
    with torch.inference_mode(), pytest.raises(Exception, match="Guard failed"):
        loose(torch.randn(2, 63))
    unknown = load_export_program(tmp_path, stored, check_inputs=False)  # no shapes given: guards stay
    assert "_guards_fn" in unknown.code
    rank = load_export_program(tmp_path, stored, check_inputs=False, input_shapes=[[-1, 64, 1]])
    assert "_guards_fn" in rank.code


class _TwoOut(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 4)

    def forward(self, x):
        y = self.lin(x)
        return y, y.relu()


class _DictOut(_TwoOut):
    def forward(self, x):
        y = self.lin(x)
        return {"b": y.relu(), "a": y}


def test_flat_module_keeps_a_tuple_of_outputs(tmp_path):
    torch.manual_seed(0)
    module, example, stored = _exported(tmp_path, (_TwoOut().eval(), (torch.randn(2, 8),)))
    flat = load_export_program(tmp_path, stored, check_inputs=False, input_shapes=[[-1, 8]])
    assert "tree_unflatten" not in flat.code
    x = torch.randn(5, 8)
    with torch.inference_mode():
        got, want = flat(x), _wrapped(tmp_path, stored)(x)
    assert type(got) is tuple and len(got) == 2
    assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_dict_outputs_keep_torch_exports_module(tmp_path):
    torch.manual_seed(0)
    module, example, stored = _exported(tmp_path, (_DictOut().eval(), (torch.randn(2, 8),)))
    ep = torch.export.load(tmp_path / "program.pt2")
    out = load_export_program(tmp_path, stored, check_inputs=False, input_shapes=[[-1, 8]])
    assert "tree_unflatten" in out.code  # not flattened: the dict comes back as the model returns it
    with torch.inference_mode():
        got = out(torch.randn(3, 8))
    assert isinstance(got, dict) and list(got) == ["b", "a"]
    assert flatten_calls(_wrapped(tmp_path, stored), ep) is False
