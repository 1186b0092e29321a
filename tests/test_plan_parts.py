"""The parts of a plan (parallel/plan/), each alone on a toy module; and parallel/ imports in no circle.

The batch part and the cfg pairs on 2 gloo ranks against one process (whole branches per rank, 3 over
2 included; dict, list and per-sample list inputs and outputs; pairs whose outputs are longer than what is
read); the counted part's split of a group from a forward argument; the residual part's rule for residuals
whose token group is split only inside forward; the grid part's whole-row split, row argument and
stand-in; the sequence part's input split (joint tensors, lengths that disagree). The parts that only
run on a sequence split need no process group for that: a mesh whose sp coordinate is 1 of 2 does.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from tests.harness import run_distributed

PARALLEL = Path(__file__).resolve().parents[1] / "parallel"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PARALLEL).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The modules of parallel/ that `path` imports (TYPE_CHECKING imports included: any import node)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".") if package else []
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, *([node.module] if node.module else [])])
            elif node.module and node.module.split(".")[0] == "shardiff_parallel":
                target = node.module.partition(".")[2]
            else:
                continue
            for alias in node.names:  # `from . import x`: the module x
                sub = f"{target}.{alias.name}" if target else alias.name
                out.add(sub if sub in modules else target)
        elif isinstance(node, ast.Import):
            out |= {a.name.partition(".")[2] for a in node.names if a.name.split(".")[0] == "shardiff_parallel"}
    return out & modules - {name}


def test_parallel_has_no_import_circle():
    files = sorted(PARALLEL.rglob("*.py"))
    modules = {_module_name(f) for f in files}
    graph = {_module_name(f): _imports(f, modules) for f in files}
    assert graph["plan.apply"] >= {"plan.batch", "plan.sequence", "plan.context"}  # the walk sees imports
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            assert state.get(n) != 1, "import circle: " + " -> ".join([*path[path.index(n):], n])
            if n not in state:
                visit(n)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def _fake_mesh(**degrees):
    """A mesh whose last coordinate of each axis is this rank's, with no process groups (no collective)."""
    from shardiff_parallel.config import AXES, ParallelConfig
    from shardiff_parallel.mesh import FLAT_AXES, Mesh

    config = ParallelConfig(**degrees)
    coords = {a: getattr(config, a) - 1 for a in AXES}
    return Mesh(config, tuple(range(config.world_size)), 0, torch.device("cpu"), coords,
                {a: None for a in (*AXES, *FLAT_AXES)})


# ------------------------------------------------------------------ batch and cfg pairs, 2 gloo ranks


class _Branches(torch.nn.Module):
    """Per-sample work on a dict and a list input; returns a tensor or (`per_sample`) a list of samples."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(4, 3)

    def forward(self, hidden_states, cond=None, samples=None, timestep=None, per_sample=False):
        out = self.lin(hidden_states) * cond["scale"][:, None, None] + timestep
        out = out + torch.stack([s.sum() for s in samples])[:, None, None]
        return (list(out.unbind(0)) if per_sample else out,)


class _Pair(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, hidden_states, shift=0.0, return_dict=False):
        self.calls += 1
        return (hidden_states * 2 + shift,)


def _branch_inputs(batch: int, per_sample: bool = False) -> dict:
    g = torch.Generator().manual_seed(batch)
    return dict(hidden_states=torch.randn(batch, 5, 4, generator=g), cond={"scale": torch.rand(batch, generator=g)},
                samples=[torch.randn(2, generator=g) for _ in range(batch)], timestep=torch.tensor(0.5),
                per_sample=per_sample)


def _batch_and_pairs() -> dict:
    from shardiff_parallel.config import ParallelConfig
    from shardiff_parallel.mesh import Mesh
    from shardiff_parallel.plan import BatchSplit, CfgPairs, ModelPlan, apply_plan

    torch.set_grad_enabled(False)  # inference, as the engine runs
    mesh = Mesh.build(ParallelConfig(cfg=2), torch.device("cpu"))
    out = {}
    model = _Branches()
    plan = ModelPlan(batch=BatchSplit({"hidden_states": 0, "cond": 0, "samples": 0, "timestep": 0}))
    for branches, batch in ((None, 4), (2, 4), (3, 3), (3, 6)):
        for per_sample in (False, True):
            kw = _branch_inputs(batch, per_sample)
            ref = model(**kw)
            applied = apply_plan(model, plan, mesh, None)
            state = applied.parts["batch"]
            state.branches = branches
            got = model(**kw)
            applied.remove()
            ref, got = (torch.stack(x[0]) if per_sample else x[0] for x in (ref, got))
            out[(branches, batch, per_sample)] = ((got - ref).abs().max().item(), state.branch_range, state.rows)
    applied = apply_plan(model, plan, mesh, None)
    applied.parts["batch"].branches = 1
    with pytest.raises(ValueError, match="--cfg 2 needs at least 2 guidance branches, but this call runs 1"):
        model(**_branch_inputs(2))
    applied.remove()
    assert not model._forward_hooks and not model._forward_pre_hooks

    # Two sequential calls, one per cfg rank: each rank computes one and gets both.
    pair = _Pair()
    x = torch.randn(1, 3, 2)
    applied = apply_plan(pair, ModelPlan(cfg_pairs=CfgPairs()), mesh, None)
    first = pair(x, shift=1.0)[0]
    second = pair(x, shift=-1.0)[0]
    out["pairs"] = (torch.equal(first, x * 2 + 1), torch.equal(second, x * 2 - 1), pair.calls)
    applied.remove()
    out["pairs removed"] = torch.equal(pair(x, shift=3.0)[0], x * 2 + 3)

    # A model returning more tokens than the pipeline reads (a prefix of its own length per call): the pair
    # exchanges the last `tail` tokens, and the placeholder's last ones hold the other rank's.
    long = _LongPair()
    applied = apply_plan(long, ModelPlan(cfg_pairs=CfgPairs(tail=lambda a: a["hidden_states"].shape[1])), mesh, None)
    first = long(x, prefix=4, shift=1.0)[0]
    second = long(x, prefix=2, shift=-1.0)[0]
    out["tail"] = (torch.equal(first[:, -3:], x * 2 + 1), torch.equal(second[:, -3:], x * 2 - 1), long.calls)
    applied.remove()
    return out


class _LongPair(_Pair):
    def forward(self, hidden_states, prefix=0, shift=0.0, return_dict=False):
        self.calls += 1
        return (torch.cat([torch.full((1, prefix, 2), 7.0), hidden_states * 2 + shift], 1),)


def test_batch_and_pairs_split_whole_branches_over_cfg():
    ranks = run_distributed(_batch_and_pairs, 2)
    for rank, out in enumerate(ranks):
        for (branches, batch, per_sample), (err, branch_range, rows) in ((k, v) for k, v in out.items()
                                                                       if isinstance(k, tuple)):
            where = f"rank {rank}, branches {branches}, batch {batch}, per-sample {per_sample}"
            assert err <= 1e-6, f"{where}: {err:.2e}"
            per_rank = [2, 1] if branches == 3 else [1, 1]
            start = sum(per_rank[:rank])
            assert branch_range == (start, start + per_rank[rank]), where
            assert rows == (batch, batch // sum(per_rank) * per_rank[rank]), where
        # Each rank ran the model on its own call only.
        assert out["pairs"] == (True, True, 1), (rank, out["pairs"])
        assert out["pairs removed"]
        assert out["tail"] == (True, True, 1), (rank, out["tail"])


# ------------------------------------------------------------------ residuals, grids, sequence: in process


def test_residuals_wait_for_their_group_and_are_cut_or_kept():
    from shardiff_parallel.plan import Residuals, SeqContext, SeqDim

    ctx = SeqContext(_fake_mesh(ulysses=2))  # this rank: piece 1 of 2
    part = Residuals({"samples": SeqDim("image", 1), "lone": SeqDim("image", 1)})
    state = part.install(torch.nn.Identity(), ctx, None, {})
    whole, mine = torch.randn(2, 9, 3), torch.randn(2, 4, 3)  # 9 tokens: pieces [5, 4]

    # The group is split only inside forward: the list waits, and is filled in in place.
    ctx.begin()
    args = {"samples": [whole, mine]}
    state.before(args)
    waiting = args["samples"]
    assert isinstance(waiting, list) and waiting[0] is whole and list(state.waiting) == ["samples"]
    ctx.group_sizes("image", 9, "in a test")
    assert torch.equal(waiting[0], whole[:, 5:]) and waiting[1] is mine and not state.waiting
    assert state.after("out") == "out"
    # A group split before the residuals arrive: cut at once (a tuple stays a tuple).
    ctx.begin()
    ctx.set_sizes("image", [5, 4])
    args = {"samples": (whole, mine)}
    state.before(args)
    assert isinstance(args["samples"], tuple) and torch.equal(args["samples"][0], whole[:, 5:])
    with pytest.raises(ValueError, match=r"samples has 7 'image' tokens: neither all 9 nor this rank's 4"):
        state.before({"samples": [torch.randn(2, 7, 3)]})
    # What the rule refuses: a lone tensor cannot wait; a list whose tokens never came.
    ctx.begin()
    with pytest.raises(AssertionError, match="lone: a lone residual tensor cannot wait"):
        state.before({"lone": whole})
    ctx.begin()
    state.before({"samples": [whole]})
    with pytest.raises(AssertionError, match=r"residual inputs \['samples'\] were never split"):
        state.after("out")
    # A new call forgets what waited in the last one (which raised before its tokens came).
    stale = {"samples": [whole]}
    state.before(stale)
    ctx.begin()
    state.before({})
    ctx.set_sizes("image", [5, 4])
    assert stale["samples"][0] is whole and not state.waiting


def test_counted_part_splits_its_group_from_an_argument():
    """A group counted by a forward argument gets its split before the sequence part splits the tensors that
    hold it beside another group; the argument becomes this rank's share; calls that carry none get none."""
    from shardiff_parallel.plan import CountedTokens, JointSeqDim, SeqContext, SeqDim, SequenceSplit

    ctx = SeqContext(_fake_mesh(ring=2))  # this rank: piece 1 of 2
    counted = CountedTokens(tokens="reference", count="n_refs", when={"mode": "extract"}, each_rank=True)
    state = counted.install(torch.nn.Identity(), ctx, None, {})
    split = SequenceSplit(inputs={"stream": JointSeqDim(("reference", "image"), 1)}, output=SeqDim("image", 1))
    seq = split.install(torch.nn.Identity(), ctx, None, {})
    stream = torch.arange(12.0).reshape(1, 12, 1)  # 5 references, then 7 image tokens
    ctx.begin()
    args = {"stream": stream, "n_refs": 5, "mode": "extract"}
    state.before(args)
    seq.before(args)
    assert ctx.sizes == {"reference": [3, 2], "image": [4, 3]} and args["n_refs"] == 2
    assert args["stream"].flatten().tolist() == [3.0, 4.0, 9.0, 10.0, 11.0]  # its references, then its image
    # A call whose count is not read (another mode): no reference tokens, the argument left alone.
    ctx.begin()
    args = {"stream": stream[:, 5:], "n_refs": 5, "mode": "cached"}
    state.before(args)
    seq.before(args)
    assert ctx.sizes == {"reference": [0, 0], "image": [4, 3]} and args["n_refs"] == 5
    ctx.begin()
    with pytest.raises(ValueError, match="1 reference tokens cannot give each of the 2 sequence-parallel ranks one"):
        state.before({"n_refs": 1, "mode": "extract"})
    assert counted.install(torch.nn.Identity(), SeqContext(_fake_mesh(tp=2)), None, {}) is None  # no sp: nothing


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x, height=None):
        return x, height


def test_grid_part_splits_whole_rows():
    from shardiff_parallel.halo import RowConv2d
    from shardiff_parallel.plan import RowGrids, RowsArg, SeqContext, grid_conv

    model = torch.nn.Module()
    model.blocks = torch.nn.ModuleList([_Block()])
    conv = model.blocks[0].conv
    ctx = SeqContext(_fake_mesh(ring=2))
    grids = RowGrids(shapes={"image": lambda m, arguments: arguments["hidden_states"].shape[-2:]},
                     row_args={"blocks.*": RowsArg("height", "image")}, stand_ins={"blocks.*.conv": grid_conv("image")})
    state = grids.install(model, ctx, None, {})
    assert isinstance(model.blocks[0].conv, RowConv2d) and model.blocks[0].conv.weight is conv.weight
    ctx.begin()
    state.before({"hidden_states": torch.zeros(1, 2, 5, 7)})  # 5 rows of 7: 3 | 2 rows
    assert ctx.sizes["image"] == [21, 14] and state.rows["image"].split.units == (3, 2)
    assert model.blocks[0](torch.zeros(1), height=5)[1] == 2  # this rank's rows
    with pytest.raises(AssertionError, match="'height' is 4, not the 5 rows of 'image'"):
        model.blocks[0](torch.zeros(1), height=4)
    state.after(None)
    assert state.rows["image"].split is None and model.blocks[0](torch.zeros(1), height=5)[1] == 5
    with pytest.raises(ValueError, match="1 rows of 'image' tokens cannot be split over 2 sequence-parallel ranks"):
        state.before({"hidden_states": torch.zeros(1, 2, 1, 7)})
    state.remove()
    assert model.blocks[0].conv is conv and not model.blocks[0]._forward_pre_hooks


def test_sequence_part_splits_inputs_by_group():
    from shardiff_parallel.plan import JointSeqDim, SeqContext, SeqDim, SequenceSplit

    ctx = SeqContext(_fake_mesh(ulysses=2))
    split = SequenceSplit(inputs={"image": SeqDim("image", 1), "ids": SeqDim("image", 0),
                                  "rotary": JointSeqDim(("text", "image"), 0)}, output=SeqDim("image", 1))
    model = torch.nn.Identity()
    state = split.install(model, ctx, None, {})
    ctx.begin()
    image, ids, rotary = torch.randn(2, 7, 3), torch.arange(7), torch.arange(10)  # 3 text + 7 image entries
    args = {"image": image, "ids": ids, "rotary": rotary}
    state.before(args)
    assert ctx.sizes == {"image": [4, 3], "text": [2, 1]}
    assert torch.equal(args["image"], image[:, 4:]) and torch.equal(args["ids"], ids[4:])
    assert torch.equal(args["rotary"], torch.cat([rotary[2:3], rotary[3 + 4:]]))  # each group's own piece
    ctx.begin()
    with pytest.raises(ValueError, match=r"inputs of token group 'image' disagree in length \(6 tokens in 'ids', 7"):
        state.before({"image": image, "ids": torch.arange(6)})
    state.remove()


def test_sequence_part_splits_module_inputs_by_keyword_or_position():
    """A module input is split whether the caller passes it by keyword or by position (HunyuanImage's
    blocks get their text stream positionally); an input left None stays None."""
    from shardiff_parallel.plan import SeqContext, SeqDim, SequenceSplit

    class Block(torch.nn.Module):
        def forward(self, hidden_states, text=None, mask=None):
            return hidden_states, text, mask

    model = torch.nn.Module()
    model.block = Block()
    ctx = SeqContext(_fake_mesh(ring=2))
    split = SequenceSplit(module_inputs={"block": {"text": SeqDim("text", 1), "mask": SeqDim("text", 0)}})
    state = split.install(model, ctx, None, {})
    text, mask = torch.randn(2, 5, 3), torch.arange(5)
    for call in (lambda: model.block(None, text, mask), lambda: model.block(None, text=text, mask=mask),
                 lambda: model.block(None, text, mask=mask)):
        ctx.begin()
        _, got_text, got_mask = call()
        assert ctx.sizes == {"text": [3, 2]}
        assert torch.equal(got_text, text[:, 3:]) and torch.equal(got_mask, mask[3:])
    ctx.begin()
    assert model.block(None)[1:] == (None, None)
    state.remove()
    assert model.block(None, text)[1] is text
