"""`perennial grow`: both commands write loadable checkpoints; user errors are one line."""

from dataclasses import replace

import pytest

from checkpointing.format import read_index
from launch.cli import main
from tests.trainer.growth.helpers import TINY, save_source
from trainer.model.config import MoEConfig


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("grow")
    moe = replace(TINY, moe=MoEConfig(num_experts=2, top_k=1))
    return save_source(root / "dense"), save_source(root / "moe", moe), root


def test_upcycle_and_stack_commands(sources, capsys):
    dense, _, root = sources
    argv = [
        "grow",
        "upcycle",
        str(dense.parent),
        str(root / "up"),
        "--num-experts",
        "4",
        "--top-k",
        "2",
        "--granularity",
        "2",
        "--optimizer",
        "reset",
    ]
    assert main(argv) == 0
    assert "init.from=" in capsys.readouterr().out
    index = read_index(root / "up" / dense.name)
    assert index.tensors["model.layers.0.feed_forward.experts.w1"].shape == (8, 24, 32)
    argv = [
        "grow",
        "stack",
        str(dense),
        str(root / "deep"),
        "--method",
        "interleave-identity",
        "--every",
        "3",
        "--freeze-old",
    ]
    assert main(argv) == 0
    assert "model.layers.3.attention.wo.weight" in read_index(root / "deep" / dense.name).tensors


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["upcycle", "{root}/missing", "{root}/o1", "--num-experts", "2", "--top-k", "1"], "SRC"),
        (
            ["upcycle", "{moe}", "{root}/o2", "--num-experts", "2", "--top-k", "1"],
            "already an MoE model",
        ),
        (["stack", "{dense}", "{root}/o3", "--method", "dus", "--layers", "0:2,5:9"], "--layers"),
        (["stack", "{dense}", "{root}/o4", "--method", "dus"], "--layers"),
        (["stack", "{dense}", "{root}/o5", "--method", "wider"], "--method"),
        (["upcycle", "{dense}", "{root}/o6", "--top-k", "1"], "--num-experts"),
    ],
)
def test_user_errors_are_one_line(sources, capsys, argv, fragment):
    dense, moe, root = sources
    argv = [a.format(root=root, dense=dense, moe=moe) for a in argv]
    assert main(["grow", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and fragment in err and err.count("\n") == 1


def test_existing_out_is_refused(sources, capsys):
    dense, _, root = sources
    argv = ["grow", "stack", str(dense), str(dense.parent), "--method", "gstack"]
    assert main(argv) == 2
    assert "already holds checkpoints" in capsys.readouterr().err
