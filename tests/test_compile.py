"""``torch.compile`` of the losses and of a whole training step, and no host reads on the hot path.

Compiled results are compared with eager ones on the same inputs. The compile tests use the ``aot_eager`` backend:
it runs Dynamo (which must capture one graph: ``fullgraph=True``) and AOTAutograd (which traces the backward
through the fused op's fake implementation and autograd formula), without spending a minute of C++ code
generation per graph on a small CPU; ``dualobj bench step --compile`` runs the default inductor backend.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dualobj import DualObjError
from dualobj._errors import validation
from dualobj.models import Transformer, TransformerConfig
from dualobj.objectives import ARObjective, BlockDiffusionObjective, DualObjective, MDObjective, cross_entropy
from dualobj.objectives import _fused as fused_module

MASK, V, H = 3, 40, 16


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def objectives() -> dict[str, object]:
    md = MDObjective(MASK, num_special=4, z_loss=1e-3)
    return {"ar": ARObjective(z_loss=1e-3), "md": md, "dual": DualObjective(0.5, md=md, split="rows", z_loss=1e-3)}


@pytest.mark.parametrize("path", ["logits", "fused"])
@pytest.mark.parametrize("name", ["ar", "md", "dual"])
def test_loss_compiles_in_one_graph_and_equals_eager(name, path):
    torch._dynamo.reset()
    objective = objectives()[name]
    batch = objective.prepare(torch.randint(4, V, (4, 11), generator=gen(7)), generator=gen(1))
    head = torch.nn.Linear(H, V)
    hidden = torch.randn(4, 11, H, generator=gen(2), requires_grad=True)

    def loss(hidden, batch):
        out = objective.loss(hidden, batch, head=head, chunk_size=8) if path == "fused" else \
            objective.loss(head(hidden), batch)
        return out.loss, out.total, out.count, out.metrics

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")(hidden, batch)
    eager = loss(hidden, batch)
    for got, want in zip(compiled[:3], eager[:3]):
        torch.testing.assert_close(got, want)
    assert compiled[3].keys() == eager[3].keys() and "z_loss" in eager[3]
    for key in eager[3]:
        torch.testing.assert_close(compiled[3][key], eager[3][key], msg=key)
    params = (hidden, head.weight, head.bias)
    grads = torch.autograd.grad(compiled[0], params)
    for got, want in zip(grads, torch.autograd.grad(eager[0], params)):
        torch.testing.assert_close(got, want)
        assert want.abs().max() > 0


def test_whole_training_step_compiles_in_one_graph():
    """prepare -> model -> fused loss in one graph, whose backward AOTAutograd compiles (the row split's AR share
    α·B is whole, and no ``torch.Generator`` is passed: a generator breaks the graph at each draw)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(vocab_size=V, dim=H, layers=1, heads=2, max_len=16, backend="math"))
    objective = objectives()["dual"]
    tokens = torch.randint(4, V, (4, 12), generator=gen(3))

    def step(tokens):
        batch = objective.prepare(tokens)
        hidden = model(batch.input_ids, causal=batch.causal)
        out = objective.loss(hidden, batch, head=model.lm_head)
        return out.loss, batch.input_ids, batch.labels, batch.weights, batch.causal

    loss, input_ids, labels, weights, causal = torch.compile(step, fullgraph=True, backend="aot_eager")(tokens)
    loss.backward()
    compiled_grads = [p.grad.clone() for p in model.parameters()]
    assert causal.sum() == 2 and (~causal).sum() == 2  # two AR rows, two MD rows
    model.zero_grad()
    batch = objective.prepare(tokens)  # the same batch in eager mode, with the compiled draw's fields
    batch.input_ids, batch.labels, batch.weights, batch.causal = input_ids, labels, weights, causal
    eager = objective.loss(model(input_ids, causal=causal), batch, head=model.lm_head)
    eager.loss.backward()
    torch.testing.assert_close(loss.detach(), eager.loss.detach())
    for got, p in zip(compiled_grads, model.parameters()):
        torch.testing.assert_close(got, p.grad)


# ------------------------------------------------------------------------------------------- no host reads

_HOST_READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__", "nonzero")
_DATA_DEPENDENT_OPS = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "repeat_interleave")


class _Recorder(TorchDispatchMode):
    """Records ATen ops whose output size or value must be read back on the host (a sync on an accelerator)."""

    def __init__(self, calls: list[str]) -> None:
        super().__init__()
        self.calls = calls

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name in _DATA_DEPENDENT_OPS:
            self.calls.append(f"aten.{name}")
        elif name in ("index", "index_put", "index_put_") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]
        ):
            self.calls.append(f"aten.{name} with a bool mask")  # the mask's nonzero runs inside the kernel
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def host_reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Every tensor counts as an accelerator tensor: record each call that reads its values or its data-dependent
    size back to the host. Python-level reads are caught by wrapping ``Tensor`` methods (also inside the fused
    op's own implementation), C++-level ones by a dispatch mode. The fused sweep is set to its accelerator
    behaviour (no row gathering)."""
    calls: list[str] = []
    for method in _HOST_READS:
        original = getattr(torch.Tensor, method)

        def wrapped(self, *args, _original=original, _method=method, **kwargs):
            calls.append(f"Tensor.{_method}")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, method, wrapped)
    monkeypatch.setattr(fused_module, "SELECT_ROWS_ON", set())
    with _Recorder(calls):
        yield calls


def _ar_step(z_loss: float) -> None:
    objective = ARObjective(z_loss=z_loss)
    batch = objective.prepare(torch.randint(0, V, (3, 9), generator=gen(0)))
    batch.labels[0, 2:] = -100  # some ignored targets
    hidden = torch.randn(3, 9, H, generator=gen(1), requires_grad=True)
    head = torch.nn.Linear(H, V)
    fused = objective.loss(hidden, batch, head=head, chunk_size=4)
    logits = cross_entropy(head(hidden), batch, z_loss=z_loss)
    (fused.loss + logits.loss).backward()


@pytest.mark.parametrize("z_loss", [0.0, 1e-3])
def test_ar_prepare_and_both_losses_make_no_host_reads_with_validation_off(monkeypatch, z_loss):
    with validation(False), host_reads(monkeypatch) as calls:
        _ar_step(z_loss)
    assert calls == []


@pytest.mark.parametrize("name", ["md", "dual", "bd", "md complementary"])
def test_md_dual_and_bd_steps_make_no_host_reads_with_validation_off(monkeypatch, name):
    md = MDObjective(3, num_special=4)
    objective = {"md": md, "dual": DualObjective(0.5, md=md), "bd": BlockDiffusionObjective(3, 3, num_special=4),
                 "md complementary": MDObjective(3, num_special=4, complementary=True)}[name]
    tokens = torch.randint(4, V, (4, 9), generator=gen(0))
    with validation(False), host_reads(monkeypatch) as calls:
        batch = objective.prepare(tokens, generator=gen(2))  # the split's draws stay on the host generator
        hidden = torch.randn(*batch.shape, H, generator=gen(1), requires_grad=True)
        head = torch.nn.Linear(H, V)
        fused = objective.loss(hidden, batch, head=head, chunk_size=4)
        logits = cross_entropy(head(hidden), batch)
        (fused.loss + logits.loss).backward()
    assert calls == []


def test_the_host_read_detector_sees_reads(monkeypatch):
    """The detector is not blind: with validation on, the value checks read back; gathering rows calls nonzero."""
    with host_reads(monkeypatch) as calls:
        _ar_step(0.0)
    assert "Tensor.__bool__" in calls
    with validation(False), host_reads(monkeypatch) as calls:
        monkeypatch.setattr(fused_module, "SELECT_ROWS_ON", {"cpu"})  # the CPU default: gather labelled rows
        _ar_step(0.0)
    assert "Tensor.nonzero" in calls
    with validation(False), host_reads(monkeypatch) as calls:
        torch.ones(2).sum().item()
        torch.arange(4)[torch.tensor([True, False, True, False])]
    assert calls == ["Tensor.item", "aten._local_scalar_dense", "aten.index with a bool mask"]


def test_validation_off_skips_value_checks_but_not_structural_ones():
    batch = ARObjective().prepare(torch.randint(0, V, (2, 5), generator=gen(0)))
    with validation(False), pytest.raises(DualObjError, match=r"^logits: expected"):
        cross_entropy(torch.randn(2, 4, V), batch)  # a shape is still checked
    with validation(False), pytest.raises(DualObjError, match=r"^z_loss: expected"):
        cross_entropy(torch.randn(2, 5, V), batch, z_loss=float("nan"))  # so is a Python scalar
