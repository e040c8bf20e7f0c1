"""The `perennial` command line: flags and overrides in any order, one-line user errors."""

import pytest
from omegaconf import OmegaConf

from launch.cli import main
from launch.train_command import torchrun_command
from trainer.args import UsageError, parse_job_args


def test_flags_and_overrides_in_any_order():
    def flags(parser):
        parser.add_argument("--nproc", type=int, default=1)
        parser.add_argument("--dry-run", action="store_true")

    args = parse_job_args(["job.yaml", "a.b=1", "--nproc", "2", "c=x", "--dry-run"], "t", flags)
    assert args.config == "job.yaml" and args.overrides == ["a.b=1", "c=x"]
    assert args.flags.nproc == 2 and args.flags.dry_run
    with pytest.raises(UsageError, match="--bogus"):
        parse_job_args(["--bogus"], "t", flags)
    with pytest.raises(UsageError, match="other.yaml"):
        parse_job_args(["job.yaml", "a=1", "other.yaml"], "t", flags)


def test_dry_run_prints_the_resolved_config(capsys):
    assert main(["train", "model.dim=64", "--dry-run", "train.max_steps=90"]) == 0
    printed = OmegaConf.create(capsys.readouterr().out)
    assert printed.model.dim == 64 and printed.schedule.total_steps == 90


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["train", "--dry-run", "train.nope=1"], "train.nope"),
        (["train", "--nproc", "3", "--dry-run"], "train.global_batch_size"),
        (["train", "missing.yaml", "--dry-run"], "missing.yaml"),
        (["frobnicate"], "frobnicate"),
    ],
)
def test_user_errors_are_one_line(capsys, argv, fragment):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and fragment in err and "Traceback" not in err


def test_torchrun_command_single_and_multi_node():
    class Flags:
        nproc, max_restarts, nnodes, rdzv_endpoint = 4, 3, "1", ""

    cmd = torchrun_command(Flags, ["job.yaml", "a=1"])
    assert cmd[1:3] == ["-m", "launch.torchrun"] and "--standalone" in cmd
    assert cmd[-4:] == ["-m", "trainer", "job.yaml", "a=1"]
    Flags.nnodes, Flags.rdzv_endpoint = "2", "head:29500"
    cmd = torchrun_command(Flags, [])
    assert cmd[cmd.index("--rdzv-endpoint") + 1] == "head:29500" and "--standalone" not in cmd
