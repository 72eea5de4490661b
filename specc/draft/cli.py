"""`specc train-draft`: generate self-distillation data and train an EAGLE draft head.

    specc train-draft --generate-data 8000 --data-dir D --steps 0          # data only
    specc train-draft --kind eagle3 --data-dir D --out-dir R --steps 5000 --time-budget 360 --resume
    specc train-draft --plot-only --out-dir R                               # redraw the plots
    specc train-draft --profile 5 --data-dir D                              # where a training step's time goes

`add_train_draft_parser(subparsers)` adds the subcommand to specc's command line; `main()`
runs it alone (`python -m specc.draft.cli ...`), which is what the GPU commands in
specc/draft/train.py use. The full recipe is in that module's docstring.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch


def add_train_draft_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "train-draft", help="generate self-distillation data and train an EAGLE draft head",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(parser)
    parser.set_defaults(func=cmd_train_draft)
    return parser


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kind", choices=["eagle", "eagle3"], default="eagle3")
    parser.add_argument("--data-dir", default=".ckpt/data", help="where the generated sequences are (or go)")
    parser.add_argument("--out-dir", default=".ckpt/run", help="checkpoints, best draft, metrics, plots")
    parser.add_argument("--generate-data", type=int, default=0, metavar="N",
                        help="first generate N first-turn prompts' answers (plus follow-ups) into --data-dir")
    parser.add_argument("--steps", type=int, default=3000, help="training steps in the schedule; 0: no training")
    parser.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                        help="stop, evaluate and checkpoint after this long (from the start of training); resume later")
    parser.add_argument("--resume", action="store_true", help="continue from --out-dir/ckpt when there is one")
    parser.add_argument("--fit-steps-to-time", action="store_true",
                        help="with --time-budget: time the first steps, then set --steps so that the learning-rate "
                             "schedule ends when the budget does")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batch-tokens", type=int, default=None, metavar="N",
                        help="batches of similar-length sequences, as many as fit N padded tokens (replaces --batch-size)")
    parser.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (AdamW, warmup then cosine to 10%%)")
    parser.add_argument("--max-len", type=int, default=768, help="training sequences are cut to this many tokens")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--model", default=None, help="target GGUF (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--init-from", default=None, metavar="HEAD",
                        help="start from this saved head's weights (fresh optimiser); ignored when resuming")
    parser.add_argument("--ttt-steps", type=int, default=None, help="unrolled draft steps (default: 1 eagle, 5 eagle3)")
    parser.add_argument("--noise", type=float, default=0.05, help="feature noise U(-a, a) x per-token RMS")
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--ckpt-every", type=int, default=500)
    parser.add_argument("--moments-dtype", choices=["bf16", "fp32"], default="bf16",
                        help="AdamW moments in the checkpoint (fp32: bit-exact resume, larger files)")
    parser.add_argument("--gen-batch-size", type=int, default=64, help="prompts per specc.generate call")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="response length cap when generating")
    parser.add_argument("--gen-max-seq-len", type=int, default=1024, help="cache length of the generation engines")
    parser.add_argument("--gen-time-budget", type=float, default=None, metavar="SECONDS",
                        help="stop generating after this long and save what there is (in the planned mix)")
    parser.add_argument("--no-compile", action="store_true",
                        help="generate without Inductor: on a GPU the uncompiled step replays from a CUDA graph "
                             "(no compile minutes)")
    parser.add_argument("--plot-only", action="store_true", help="only redraw the plots of --out-dir")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="only profile STEPS training steps on --data-dir and print the costliest ops")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def cmd_train_draft(args: argparse.Namespace) -> int:
    from specc.draft.train import TrainConfig, plot_metrics, train

    if args.plot_only:
        paths = plot_metrics(Path(args.out_dir) / "metrics.jsonl", args.out_dir)
        print("\n".join(str(p) for p in paths))
        return 0 if paths else 1
    if args.profile > 0:
        from specc.draft.train import profile_steps
        from specc.models.load import load_llama

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        model, _ = load_llama(args.model, dtype=torch.bfloat16 if device.startswith("cuda") else torch.float32,
                              device=device)
        config = TrainConfig(kind=args.kind, batch_size=args.batch_size, batch_tokens=args.batch_tokens,
                             max_len=args.max_len, lr=args.lr,
                             ttt_steps=args.ttt_steps, noise=args.noise, seed=args.seed)
        print(profile_steps(model, args.data_dir, config, steps=args.profile))
        return 0
    if args.generate_data <= 0 and args.steps <= 0:
        print("nothing to do: pass --generate-data N and/or --steps N", file=sys.stderr)
        return 2
    import specc
    from specc.models.load import load_llama

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
    model, tokenizer = load_llama(args.model, dtype=dtype, device=device)
    progress = not args.no_progress

    if args.generate_data > 0:
        from specc.draft.data import build_dataset

        compiled = torch.compile(model, backend=specc.backend())
        summary = build_dataset(
            compiled, tokenizer, args.data_dir, args.generate_data, seed=args.seed, batch_size=args.gen_batch_size,
            max_new_tokens=args.max_new_tokens, max_seq_len=args.gen_max_seq_len, compile=not args.no_compile,
            cuda_graph=device.startswith("cuda") or None, progress=progress, time_budget=args.gen_time_budget,
        )
        print(f"data: {summary.sequences} sequences ({summary.prompt_tokens} prompt + {summary.response_tokens} "
              f"response tokens) in {summary.seconds:.0f} s; kept {summary.counts_kept}; "
              f"dropped {summary.dropped_mt_bench} for MT-Bench overlap, {summary.dropped_too_long} too long; "
              f"{'stopped early (time budget); ' if summary.stopped_early else ''}files {summary.files}")
        del compiled
        torch._dynamo.reset()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()

    if args.steps > 0:
        config = TrainConfig(
            kind=args.kind, steps=args.steps, batch_size=args.batch_size, batch_tokens=args.batch_tokens,
            max_len=args.max_len, lr=args.lr,
            warmup_steps=args.warmup_steps, ttt_steps=args.ttt_steps, noise=args.noise, seed=args.seed,
            moments_dtype=args.moments_dtype, time_budget=args.time_budget, eval_every=args.eval_every,
            ckpt_every=args.ckpt_every, init_from=args.init_from, fit_steps_to_time=args.fit_steps_to_time,
        )
        via_module = Path(sys.argv[0]).name == "cli.py"
        command = shlex.join((["python", "-m", "specc.draft.cli"] if via_module else ["specc"]) + sys.argv[1:])
        train(model, args.data_dir, args.out_dir, config, resume=args.resume, progress=progress, command=command)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="specc train-draft", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(parser)
    return cmd_train_draft(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
