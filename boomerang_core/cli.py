"""The method's commands: sizes, distill, export, eval. Every command defaults to the demo family;
``--teacher``/``--student`` name another pair (HF directories, GGUF files or hub ids).

The ``boomerang`` console script is :mod:`server.cli`, which adds ``serve`` and ``config`` to this
parser: the method never imports the server."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from boomerang_core.errors import BoomerangError

DTYPES = ("bfloat16", "float16", "float32")  # torch dtype names; torch loads only when a command needs it


def _family_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", help="teacher: HF directory, .gguf file or hub id (default: the demo family)")
    p.add_argument("--student", help="distilled student directory with student_config.json")
    p.add_argument("--order", default=None, help="patch order: last, first, klpatch, or blocks like 3,1,2,0")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="serving dtype (default: float32)")


def _load_family(args: argparse.Namespace) -> Any:
    """The family the flags name (:meth:`Family.open`): ``--order`` builds every size of that
    order, else the sizes saved in the student's ``family.json``, else the ``last`` order."""
    from boomerang_core.family import Family

    return Family.open(
        args.teacher or None, args.student or None, order=_order(args.order), device=args.device, dtype=args.dtype
    )


def _order(text: str | None) -> str | list[int] | None:
    if text is None or text in ("last", "first", "klpatch"):
        return text
    try:
        return [int(b) for b in text.split(",")]
    except ValueError:
        raise BoomerangError(
            f"--order must be last, first, klpatch or a comma-separated block list, got {text!r}"
        ) from None


def cmd_sizes(args: argparse.Namespace) -> int:
    family = _load_family(args)
    print(f"family {family.name}: order {family.order}, store {family.store.resident_bytes():,} bytes resident")
    print(family.table())
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from boomerang_core.assemble import export

    family = _load_family(args)
    size = family.resolve(args.size)
    out = export(size.plan, family.store, args.out)
    print(f"exported {size.name} ({size.num_layers} layers, {size.params:,} params) to {out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from boomerang_core.quality import curve

    family = _load_family(args)
    result = curve.evaluate_cli(
        family,
        out_dir=Path(args.out),
        max_tokens=args.tokens,
        conversations=_heldout_conversations(args, family),
        questions=args.questions,
    )
    print(result)
    # Perplexities and dominated sizes go into family.json beside the student, so that
    # `boomerang sizes` and the server's /v1/models show them and the router skips dominated sizes.
    if args.teacher is None:
        from boomerang_core import demo

        home: Path | None = demo.ensure_demo(progress=False)
    else:
        home = Path(args.student) if args.student and Path(args.student).is_dir() else None
    if home is not None:
        print(f"saved sizes with perplexities to {family.save(home)}")
    return 0


def _heldout_conversations(args: argparse.Namespace, family: Any) -> list[dict[str, Any]] | None:
    """The teacher's held-out conversations for the chat KL (generated once, then cached), or None
    when not asked for or the teacher has no chat template."""
    if args.conversations <= 0 or not getattr(family.store.tokenizer, "chat_template", None):
        return None
    from boomerang_core.synth import teacher_conversations

    if args.teacher is None:
        from boomerang_core import demo

        teacher: str | Path = demo.ensure_teacher(progress=False)
    else:
        teacher = args.teacher
    return teacher_conversations(teacher, args.conversations, split="heldout")


def cmd_distill(args: argparse.Namespace) -> int:
    from boomerang_core import distill

    if not args.teacher:
        from boomerang_core import demo

        path = demo.ensure_demo(progress=True)
        print(f"demo family ready in {path}")
        return 0
    config = distill.DistillConfig(
        first_layers_to_keep=args.first,
        every_n=args.every,
        last_layers_to_keep=args.last,
        token_budget=args.tokens,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        learning_rate=args.lr,
        kl_weight=args.kl_weight,
        cosine_weight=args.cosine_weight,
        corpus=args.data,
        chat_fraction=args.chat_fraction,
        save_steps=args.save_steps,
        save_total_limit=args.keep_checkpoints,
    )
    out = distill.distill(args.teacher, Path(args.out), config, device=args.device)
    print(f"student written to {out}")
    return 0


def build_parser() -> tuple[argparse.ArgumentParser, Any]:
    """The parser and its subparsers object, so that the server can add its commands."""
    parser = argparse.ArgumentParser(prog="boomerang", description="Serve every size of a boomerang family.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("sizes", help="list every size of a family: k, layers, parameters, bytes")
    _family_args(p)
    p.set_defaults(func=cmd_sizes)

    p = sub.add_parser("export", help="write one size as a standard HF checkpoint")
    _family_args(p)
    p.add_argument("size", help="size name (k3), parameter label (96M) or fraction of the teacher (0.5)")
    p.add_argument("out", help="output directory")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "eval", help="held-out perplexity, chat KL and answer accuracy of every size, with baselines; table + PNG"
    )
    _family_args(p)
    p.add_argument("--out", default="eval-results", help="directory for curve.md and curve.png")
    p.add_argument(
        "--tokens", type=int, default=8192, help="held-out tokens of each text (Python docs, general) (default: 8192)"
    )
    p.add_argument(
        "--conversations",
        type=int,
        default=32,
        help="held-out teacher conversations for the chat KL, generated once and cached; 0: none (default: 32)",
    )
    p.add_argument(
        "--questions", type=int, default=None, help="first N questions of the easy question set (default: all; 0: none)"
    )
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("distill", help="prune-initialise and distil a student (default: build the demo family)")
    p.add_argument("--teacher", help="teacher: HF directory, .gguf file or hub id (default: the demo teacher)")
    p.add_argument("--out", default="student", help="output directory for the student")
    p.add_argument(
        "--data", default="pydoc", help="'pydoc' (Python's docs, offline), a text file or folder, or hf:DATASET"
    )
    p.add_argument(
        "--chat-fraction",
        type=float,
        default=0.0,
        help="share of the training tokens taken from the teacher's own conversations, generated first (cached, "
        "resumable) from its chat template; the --data corpus gives the rest (default 0: the corpus only)",
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--first", type=int, default=1, help="first teacher layers to keep (default 1)")
    p.add_argument("--every", type=int, default=2, help="keep one of every N middle layers (default 2)")
    p.add_argument("--last", type=int, default=2, help="last teacher layers to keep (default 2)")
    p.add_argument("--tokens", type=int, default=1_000_000, help="training token budget (default 1M)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per micro-step (default 8)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimizer step (default 1)")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (default 1e-4)")
    p.add_argument("--kl-weight", type=float, default=0.1, help="weight of KL(teacher||student) (default 0.1)")
    p.add_argument("--cosine-weight", type=float, default=2.0, help="weight of the cosine loss (default 2.0)")
    p.add_argument(
        "--save-steps", type=int, default=20, help="optimizer steps between resumable checkpoints (default 20)"
    )
    p.add_argument(
        "--keep-checkpoints", type=int, default=2, help="newest checkpoints kept in OUT/checkpoints (default 2)"
    )
    p.set_defaults(func=cmd_distill)
    return parser, sub


def run(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None = None,
    user_errors: tuple[type[Exception], ...] = (),
) -> int:
    """Parse and run a command; bad input (``BoomerangError`` and ``user_errors``) prints a clear
    message and exits 2, never a traceback."""
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except Exception as exc:
        if not isinstance(exc, (BoomerangError, *user_errors)):
            raise
        print(f"boomerang {args.command}: error: {exc}", file=sys.stderr)
        return 2


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser()[0], argv)


if __name__ == "__main__":
    sys.exit(main())
