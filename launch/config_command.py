"""`perennial config [CONFIG] [key=value ...]`: every config key with its value (after the
config file and the overrides), its default when that differs, and what it means."""

from __future__ import annotations

import json

from trainer.args import parse_job_args
from trainer.config_doc import config_keys
from trainer.config_loader import load_config


def config_command(argv: list[str]) -> int:
    args = parse_job_args(argv, prog="perennial config")
    cfg = load_config(args.config, args.overrides)
    for key in config_keys(cfg):
        changed = "" if key.value == key.default else f"   (default: {_show(key.default)})"
        print(f"{key.key} = {_show(key.value)}{changed}")
        if key.doc:
            print(f"    {key.doc}")
    return 0


def _show(value) -> str:
    if isinstance(value, list) and value and hasattr(value[0], "__dataclass_fields__"):
        value = [vars(item) for item in value]
    return json.dumps(value) if isinstance(value, (list, dict, str)) else str(value)
