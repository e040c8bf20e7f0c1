"""`perennial grow`: turn a universal checkpoint into a bigger model's checkpoint.

    perennial grow upcycle SRC OUT --num-experts E --top-k K [--granularity G] [--every n]
        [--router-init auto|normal|virtual-group] [--optimizer copy|reset]
    perennial grow stack SRC OUT --method {gstack,interleave-identity,dus} [--factor g]
        [--every n] [--layers 0:24,8:32] [--freeze-old] [--optimizer keep|reset]

OUT is a new checkpoint root; train from it with `init.from=OUT`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from trainer.args import Parser
from trainer.growth import stack, upcycle
from trainer.growth.stack import METHODS


def _parser() -> argparse.ArgumentParser:
    parser = Parser(prog="perennial grow")
    commands = parser.add_subparsers(dest="kind", required=True)
    up = commands.add_parser("upcycle", help="dense -> MoE: every expert a copy of the MLP")
    _add_paths(up)
    up.add_argument("--num-experts", type=int, required=True, help="copies of each dense MLP")
    up.add_argument("--top-k", type=int, required=True, help="experts per token")
    up.add_argument("--granularity", type=int, default=1, help="split each MLP into G experts")
    up.add_argument("--router-init", default="auto", choices=("auto", "normal", "virtual-group"))
    up.add_argument("--router", default="softmax_topk_renorm")
    up.add_argument("--every", type=int, default=1, help="layer i is MoE when (i+1) %% n == 0")
    up.add_argument("--seed", type=int, default=0, help="seeds the router init")
    up.add_argument("--optimizer", default="copy", choices=("copy", "reset"))
    st = commands.add_parser("stack", help="deeper model from copies of the layers")
    _add_paths(st)
    st.add_argument("--method", required=True, choices=METHODS)
    st.add_argument("--factor", type=int, default=2, help="gstack: repeat the stack g times")
    st.add_argument("--every", type=int, default=1, help="interleave-identity: every n blocks")
    st.add_argument("--layers", default="", help="dus: source layer ranges, e.g. 0:24,8:32")
    st.add_argument("--freeze-old", action="store_true", help="interleave-identity only")
    st.add_argument("--optimizer", default="keep", choices=("keep", "reset"))
    return parser


def _add_paths(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="SRC", help="checkpoint dir, checkpoint root or run dir")
    parser.add_argument("out", metavar="OUT", help="new checkpoint root to write")


def grow_command(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if not Path(args.src).exists():
        raise ValueError(f"SRC {args.src} does not exist")
    if args.kind == "upcycle":
        path = upcycle(
            args.src,
            args.out,
            num_experts=args.num_experts,
            top_k=args.top_k,
            granularity=args.granularity,
            router_init=args.router_init,
            optimizer=args.optimizer,
            every_n_layers=args.every,
            router=args.router,
            seed=args.seed,
        )
    else:
        path = stack(
            args.src,
            args.out,
            method=args.method,
            factor=args.factor,
            every=args.every,
            layers=args.layers,
            freeze_old=args.freeze_old,
            optimizer=args.optimizer,
        )
    print(f"wrote {path} (train from it with init.from={args.out})")
    return 0
