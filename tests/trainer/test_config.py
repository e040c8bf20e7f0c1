import pytest
from omegaconf import OmegaConf

from trainer.config_loader import DEFAULT_CONFIG, load_config, to_yaml, validate_layout


def test_default_yaml_is_the_embedded_default():
    assert to_yaml(load_config(DEFAULT_CONFIG)) == to_yaml(load_config(None))


def test_overrides_and_derived_defaults(tmp_path):
    source = str(tmp_path)
    cfg = load_config(None, ["run.dir=/tmp/x", "train.max_steps=70", f"init.from={source}"])
    assert cfg.schedule.total_steps == 70  # the schedule defaults to the run's length
    assert cfg.checkpoint.dir == "/tmp/x/checkpoints"
    assert cfg.init.from_ == source
    assert OmegaConf.create(to_yaml(cfg))["init"]["from"] == source


def test_yaml_file_with_init_from_and_sources(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(
        f"init:\n  from: {tmp_path}\ndata:\n  sources:\n"
        "    - {name: a, path: 'stdlib:prose', weight: 0.75}\n"
        "    - {name: b, path: 'stdlib:code', weight: 0.25}\n"
    )
    cfg = load_config(path, ["data.sources.1.weight=0.5"])
    assert cfg.init.from_ == str(tmp_path)
    assert [s.weight for s in cfg.data.sources] == [0.75, 0.5]


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["train.bogus=1"], "train.bogus"),
        (["train.max_steps=abc"], "train.max_steps"),
        (["model.n_heads=8", "model.n_kv_heads=4", "parallel.tp=3"], "model.n_heads"),
        (["parallel.tp=2", "parallel.strategy=ddp"], "parallel.strategy"),
        (["parallel.strategy=zero"], "parallel.strategy"),
        (["optim.lr=-1"], "optim.lr"),
        (["data.seq_len=4096"], "data.seq_len"),
        (["schedule.name=triangle"], "schedule.name"),
        (["data.sources.0.path=/nope.jsonl"], "data.sources[0].path"),
        (["train.max_steps"], "train.max_steps"),
        (["init.from=/no/such/run"], "init.from"),
    ],
)
def test_bad_config_names_the_key(overrides, key):
    with pytest.raises(ValueError, match=key.replace("[", r"\[").replace(".", r"\.")):
        load_config(None, overrides)


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ValueError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_layout_checks_name_batch_and_tp():
    cfg = load_config(None, ["train.global_batch_size=12", "train.micro_batch_size=2"])
    for world in (1, 2, 3, 6):
        validate_layout(cfg, world)
    with pytest.raises(ValueError, match="train.global_batch_size"):
        validate_layout(cfg, 4)
    with pytest.raises(ValueError, match=r"^train.global_batch_size \(12\) is not divisible by "
                       r"data-parallel size \(4\) × train.micro_batch_size \(2\)$"):
        validate_layout(cfg, 4)
    tp_cfg = load_config(None, ["parallel.tp=2"])
    with pytest.raises(ValueError, match="parallel.tp"):
        validate_layout(tp_cfg, 3)


@pytest.mark.parametrize("world, micro", [(1, 8), (2, 6), (3, 8), (4, 6), (8, 3)])
def test_default_job_fits_every_documented_nproc(world, micro):
    """README: --nproc 1, 2, 3, 4 and 8 run the default job as written (micro batch auto)."""
    cfg = load_config(None)
    validate_layout(cfg, world)
    assert cfg.train.micro_batch_size == 0 and cfg.train.micro_batch_for(world) == micro


def test_auto_micro_batch_refuses_an_indivisible_global_batch():
    with pytest.raises(ValueError, match=r"^train.global_batch_size \(24\) is not divisible by "
                       r"data-parallel size \(5\)$"):
        validate_layout(load_config(None), 5)
    cfg = load_config(None, ["train.global_batch_size=14", "parallel.tp=2"])
    validate_layout(cfg, 4)  # dp 2: 7 per rank, micro 7
    assert cfg.train.micro_batch_for(2) == 7 and cfg.train.micro_batch_for(1) == 7
    with pytest.raises(ValueError, match="train.micro_batch_size must be >= 0"):
        load_config(None, ["train.micro_batch_size=-1"])
