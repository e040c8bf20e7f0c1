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
        (["train", "--nproc", "5", "--dry-run"], "train.global_batch_size"),
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
        nproc, max_restarts, nnodes, rdzv_endpoint, rdzv_conf = 4, 3, "1", "", ""

    cmd = torchrun_command(Flags, ["job.yaml", "a=1"])
    assert cmd[1:3] == ["-m", "launch.torchrun"] and "--standalone" in cmd
    assert cmd[-4:] == ["-m", "trainer", "job.yaml", "a=1"]
    Flags.nnodes, Flags.rdzv_endpoint = "2", "head:29500"
    cmd = torchrun_command(Flags, [])
    assert cmd[cmd.index("--rdzv-endpoint") + 1] == "head:29500" and "--standalone" not in cmd


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    usage = capsys.readouterr().out
    for command in ("train", "config", "ckpt {inspect,verify,export,import}", "grow", "schedule",
                    "slurm"):
        assert f"  {command}" in usage, command


def test_train_help_hides_the_test_only_flags(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "--nproc" in out and "--verbose" in out and "--simulated-nodes" not in out


def test_ckpt_export_help_shows_both_formats(capsys):
    with pytest.raises(SystemExit):
        main(["ckpt", "export", "--help"])
    out = capsys.readouterr().out
    assert "--format {safetensors,hf}" in out and "--dtype" in out


@pytest.mark.parametrize("typo, meant", [("optim.lrr", "optim.lr"), ("train.lr", "optim.lr"),
                                         ("model.moe.num_expert", "model.moe.num_experts")])
def test_an_unknown_key_suggests_the_closest(capsys, typo, meant):
    assert main(["train", "--dry-run", f"{typo}=1"]) == 2
    assert f"unknown config key '{typo}'; did you mean {meant}?" in capsys.readouterr().err


def test_config_lists_every_key_with_default_and_doc(capsys):
    from trainer.config_doc import config_keys

    assert main(["config", "optim.lr=1e-3"]) == 0
    out = capsys.readouterr().out
    keys = list(config_keys())
    assert len(keys) > 90 and all(k.doc for k in keys)
    for key in keys:
        assert f"\n{key.key} = " in "\n" + out, key.key
    assert "optim.lr = 0.001   (default: 0.003)\n    Peak learning rate" in out
    assert "init.from = " in out and "grow.at_step = " in out


def test_validation_messages_are_separated(capsys):
    assert main(["train", "--dry-run", "schedule.warmup_steps=-1", "schedule.min_lr=-1"]) == 2
    err = capsys.readouterr().err
    assert "must be >= 0; schedule.min_lr" in err, err


def test_nproc_above_the_cores_warns(capsys):
    main(["train", "--dry-run", "--nproc", "4096", "train.global_batch_size=4096",
          "train.micro_batch_size=1"])
    assert "warning: --nproc 4096 exceeds the" in capsys.readouterr().err
