"""`specc` command line: generate, chat, dump, bench.

    specc generate "What is the capital of France?"     # embedded SmolLM2, prints tokens/s
    specc chat                                           # interactive ChatML chat
    specc dump --out specc_dump                          # pass dumps for the default model
    specc bench plain --out plain.json                   # HF eager vs specc plain decode (GPU)
    specc bench spec --out spec.json --plots plots       # speculative vs plain vs HF, each tree (GPU)
    specc bench systems --out systems.json               # Llama-3-8B shapes: step vs floor, verify cost (GPU)
    specc bench sampling --out sampling.json             # sampled accept length: true q vs q = 1 (GPU)
    specc bench gap --out gap.json                       # real accept lengths vs the teacher-forced draft's, per implementation
    specc bench profile --out profile.json               # the kernels of one step, plain and per tree (GPU)
    specc train-draft --help                             # train an EAGLE head (GPU)

generate and chat draft with the EAGLE head that specc trained for the embedded model
(specc/assets/draft/); --no-draft decodes plainly.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _device(name: str | None) -> str:
    return name or ("cuda" if torch.cuda.is_available() else "cpu")


def _load(args):
    import specc
    from specc.models.load import load_hf_llama, load_llama

    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if _device(args.device) == "cuda" else torch.float32)
    loader = load_hf_llama if args.hf else load_llama
    model, tokenizer = loader(args.model, dtype=dtype, device=_device(args.device))
    draft = None
    draft_path = _draft_path(args)
    tree = getattr(args, "tree", None)
    if draft_path is not None:
        from specc.draft import SHIPPED_HEAD, SHIPPED_HEAD_TREES
        from specc.draft.eagle import load_draft

        draft = load_draft(draft_path, model, draft_vocab=getattr(args, "draft_vocab", None))
        if tree is None and Path(draft_path).resolve() == SHIPPED_HEAD:
            tree = SHIPPED_HEAD_TREES  # the trees measured best for this head, per batch size
    compiled = torch.compile(model, backend=specc.backend(draft=draft, tree=tree,
                                                          dump=getattr(args, "out", None),
                                                          verify_rule=getattr(args, "verify_rule", None)))
    return compiled, tokenizer


def _draft_path(args):
    """--draft if given; else the shipped head when the model is the embedded default (the head
    was trained for it alone); none with --no-draft."""
    from specc.draft import default_draft_path

    if getattr(args, "no_draft", False):
        return None
    if getattr(args, "draft", None):
        return args.draft
    return default_draft_path() if args.model is None else None


def _sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-seq-len", type=int, default=4096,
                        help="KV-cache positions per sequence (prompt + new tokens, more with a draft)")


def _model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="a Llama GGUF file (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--hf", action="store_true", help="build HF LlamaForCausalLM instead of specc's reference Llama")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--no-compile", action="store_true", help="run the rewritten programs without Inductor")
    parser.add_argument("--draft", default=None,
                        help="an EAGLE draft head (.safetensors from `specc train-draft`); default: the shipped "
                             "head for the embedded model, none for a --model of your own")
    parser.add_argument("--no-draft", action="store_true", help="plain decode, no speculation")
    parser.add_argument("--draft-vocab", type=int, default=None, metavar="K",
                        help="the draft proposes from the K tokens its training data used most (0: the whole "
                             "vocabulary; default: the head file's own choice); lossless either way")
    from specc.draft import SHIPPED_HEAD_TREES

    parser.add_argument("--tree", default=None,
                        help='draft tree: "eagle" (the default static tree), "tuned:N,D" (the shipped head\'s '
                             'static trees tuned on its training mix), "tuned-chat:N,D" (tuned on chat prompts; '
                             f'with that head the default is {SHIPPED_HEAD_TREES[1]} at batch 1), "tuned:N,D,TABLE.json" '
                             '(another tune-tree file), "chain:5", "full", or "dynamic[:top_k,depth,size]"')
    parser.add_argument("--verify-rule", choices=["rrs", "q_one"], default=None,
                        help="sampled verification: default the tree's exact rule (rrs on static trees, "
                             "q_one on dynamic); q_one treats draft probabilities as 1")


def _generate(compiled, tokenizer, messages, args, max_new_tokens: int | None = None) -> tuple[str, object]:
    import specc

    prompt = tokenizer.encode_chat(messages)
    result = specc.generate(
        compiled, [prompt], max_new_tokens=max_new_tokens or args.max_new_tokens, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop_ids=[tokenizer.eos_id],
        compile=not args.no_compile, max_seq_len=args.max_seq_len,
    )
    tokens = [t for t in result.tokens[0] if t != tokenizer.eos_id]
    return tokenizer.decode(tokens), result


def _stats(result) -> str:
    return (f"[{result.new_tokens} tokens, {result.tokens_per_second:.1f} tokens/s "
            f"({result.decode_tokens_per_second:.1f} decode), {result.mean_accept_length:.2f} tokens per step]")


def cmd_generate(args) -> int:
    compiled, tokenizer = _load(args)
    if not args.no_warmup:
        # compile prefill and step on a two-token run first, so the printed speed is decoding's
        print("warming up (the first run compiles) ..." if not args.no_compile else "warming up ...", file=sys.stderr)
        _generate(compiled, tokenizer, [{"role": "user", "content": args.prompt}], args, max_new_tokens=2)
    text, result = _generate(compiled, tokenizer, [{"role": "user", "content": args.prompt}], args)
    print(text)
    print(_stats(result), file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    compiled, tokenizer = _load(args)
    messages = []
    print("specc chat: empty line or Ctrl-D to quit", file=sys.stderr)
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            break
        if not line:
            break
        messages.append({"role": "user", "content": line})
        text, result = _generate(compiled, tokenizer, messages, args)
        messages.append({"role": "assistant", "content": text})
        print(text)
        print(_stats(result), file=sys.stderr)
    return 0


def cmd_dump(args) -> int:
    from specc.generate import target_program

    compiled, _ = _load(args)
    program, _ = target_program(compiled)
    print(f"pass dumps written to {program.dump_dir}")
    for name, summary in program.summaries.items():
        print(f"  {name}: {summary}")
    return 0


def cmd_bench_plain(args) -> int:
    from specc.bench.plain_decode import run, summary_table

    report = run(max_new_tokens=args.max_new_tokens, hf_prompts_per_category=args.hf_per_category,
                 prompt_file=args.prompts, out=args.out)
    print(summary_table(report))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="specc", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="answer one prompt with the embedded default model")
    gen.add_argument("prompt")
    gen.add_argument("--no-warmup", action="store_true",
                     help="skip the short compile run before the timed one (the printed speed then includes compilation)")
    _model_args(gen)
    _sampling_args(gen)
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="interactive chat with the embedded default model")
    _model_args(chat)
    _sampling_args(chat)
    chat.set_defaults(func=cmd_chat)

    dump = sub.add_parser("dump", help="write every pass's graph before/after and its summary")
    dump.add_argument("--out", default="specc_dump")
    _model_args(dump)
    dump.set_defaults(func=cmd_dump)

    bench = sub.add_parser("bench", help="benchmarks (GPU)")
    benches = bench.add_subparsers(dest="which", required=True)
    plain = benches.add_parser("plain", help="HF eager vs specc plain decode")
    plain.add_argument("--max-new-tokens", type=int, default=128)
    plain.add_argument("--hf-per-category", type=int, default=2, help="MT-Bench prompts per category for HF eager")
    plain.add_argument("--prompts", default=None, help="JSONL with `turns` (default: MT-Bench)")
    plain.add_argument("--out", default=None, help="write the full JSON report here")
    plain.set_defaults(func=cmd_bench_plain)
    from specc.bench import accept_compare, acceptance_gap, end_to_end, sampling_rules, step_diff, step_profile, systems

    end_to_end.add_parser(benches)
    systems.add_parser(benches)
    sampling_rules.add_parser(benches)
    acceptance_gap.add_parser(benches)
    step_diff.add_parser(benches)
    step_profile.add_parser(benches)
    accept_compare.add_parser(benches)

    from specc.draft.cli import add_train_draft_parser

    add_train_draft_parser(sub)

    from specc.draft import tree_tuning

    tree_tuning.add_parser(sub)

    from specc.draft import vocab

    vocab.add_parser(sub)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
