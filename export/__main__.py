"""python -m listenloop.export CHECKPOINT_DIR OUT_DIR [--precision P] ... (also `listenloop export`)."""
from __future__ import annotations

import argparse
import sys
import time

from listenloop.errors import Error
from listenloop.package import ATTENTIONS
from listenloop.protocol import PRECISIONS


def build_parser(prog: str = "python -m listenloop.export") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Export a checkpoint (release layout) to a model package.")
    parser.add_argument("checkpoint_dir", help="checkpoint folder (model_config.yaml, shards, encoder .pth, ...)")
    parser.add_argument("out_dir", help="model package folder to create")
    parser.add_argument("--precision", choices=PRECISIONS, default="int4", help="default precision of both graphs")
    parser.add_argument("--encoder-precision", choices=PRECISIONS, help="override for the encoder graph")
    parser.add_argument("--decoder-precision", choices=PRECISIONS, help="override for the decoder graph")
    parser.add_argument("--max-context", type=int, default=4096, help="KV cache capacity recorded in the manifest")
    parser.add_argument("--attention", choices=ATTENTIONS, default="grouped",
                        help="decoder attention: grouped (CPUs; default) or gqa (GroupQueryAttention, GPUs: "
                             "fixed step shapes for CUDA graphs)")
    parser.add_argument("--kv-dtype", choices=("float32", "float16"),
                        help="decoder KV cache, embeddings and activations (default float16 for fp16, else float32; "
                             "int4 takes float16 too, which GPUs want)")
    parser.add_argument("--reply-set", metavar="FILE",
                        help="JSON list of {\"emotion\", \"text\"}: the only replies the package may decode")
    parser.add_argument("--slots", action="store_true",
                        help="also write the slot decoder, which runs many streams' steps in one call (GPUs; "
                             "profiles with \"slots\"); fp32, fp16 and int4 only")
    parser.add_argument("--verify", action="store_true", help="run the parity report against PyTorch; fail if off")
    parser.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    return parser


def main(argv=None, prog: str = "python -m listenloop.export") -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        from .package import export_package

        start = time.perf_counter()
        out = export_package(args.checkpoint_dir, args.out_dir, precision=args.precision,
                             encoder_precision=args.encoder_precision, decoder_precision=args.decoder_precision,
                             max_context=args.max_context, force=args.force, attention=args.attention,
                             kv_dtype=args.kv_dtype, reply_set=args.reply_set, slots=args.slots)
        print(f"wrote {out} in {time.perf_counter() - start:.1f} s")
        if args.verify:
            from .parity import parity_report

            report = parity_report(args.checkpoint_dir, out)
            print(report.table())
            if not report.passed:
                print(f"parity check FAILED: {'; '.join(report.failures)}", file=sys.stderr)
                return 1
    except Error as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
