"""Average the weights of released demo checkpoints (demo/release.py) of one architecture, e.g.
a leg's release and the release it started from: weights on one path from a shared start
often generalise better averaged than either alone.

  python -m demo.average demo/.cache/checkpoint-a demo/.cache/checkpoint-b --out demo/.cache/checkpoint-ab

Everything but the two weight files is copied from the first checkpoint (config, tokenizer,
reply set); the checkpoints must agree on every tensor's name and shape.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from listenloop.export.checkpoint import ENCODER_FILES, SINGLE

ENCODER_FILE, DECODER_FILE = ENCODER_FILES[0], SINGLE  # the names demo/release.py writes


def average_states(states: list[dict[str, torch.Tensor]], source: str) -> dict[str, torch.Tensor]:
    """The element-wise mean of state dicts that agree on names and shapes."""
    first = states[0]
    for n, state in enumerate(states[1:], 2):
        if state.keys() != first.keys():
            raise SystemExit(f"{source}: checkpoint {n} has other tensors than checkpoint 1 "
                             f"({sorted(state.keys() ^ first.keys())[:3]})")
        for name, tensor in state.items():
            if tensor.shape != first[name].shape:
                raise SystemExit(f"{source}: {name} is {tuple(tensor.shape)} in checkpoint {n}, "
                                 f"{tuple(first[name].shape)} in checkpoint 1")
    return {name: torch.stack([s[name].float() for s in states]).mean(0).to(first[name].dtype) for name in first}


def average_checkpoints(checkpoints: list[Path], out: Path) -> None:
    shutil.copytree(checkpoints[0], out, dirs_exist_ok=True)
    encoders = [torch.load(c / ENCODER_FILE, map_location="cpu", weights_only=True) for c in checkpoints]
    torch.save(average_states(encoders, ENCODER_FILE), out / ENCODER_FILE)
    decoders = [load_file(c / DECODER_FILE) for c in checkpoints]
    save_file(average_states(decoders, DECODER_FILE), out / DECODER_FILE)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", type=Path, nargs="+")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if len(args.checkpoints) < 2:
        raise SystemExit("give two or more checkpoints to average")
    if args.out.resolve() in {c.resolve() for c in args.checkpoints}:
        raise SystemExit(f"--out {args.out} is one of the checkpoints averaged")
    average_checkpoints(args.checkpoints, args.out)
    print(args.out)


if __name__ == "__main__":
    main()
