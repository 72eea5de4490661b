"""Draft-head training on the CPU: the training-time test means what decoding does, the loss
falls when overfitting, checkpoints resume exactly, and the data pipeline runs end to end
with MT-Bench kept out."""

from __future__ import annotations

import json
import random
import types
import zlib

import pytest
import torch

import specc
import specc.draft.train as train_module
from specc.draft import data as draft_data
from specc.draft.data import MTBenchFilter, PromptItem, Sequences, build_dataset, load_sequences, save_sequences
from specc.draft.eagle import DraftConfig, EagleDraft, load_draft
from specc.draft.train import (
    BatchOrder,
    TrainConfig,
    distill_loss,
    evaluate,
    load_checkpoint,
    make_batch,
    make_optimizer,
    read_checkpoint,
    save_checkpoint,
    step0_features,
    target_states,
    train,
    unroll,
)
from specc.models.llama import LlamaConfig
from specc.passes.pipeline import causal_mask
from tests.models_factory import reference_llama

TINY = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=8)


def _target(seed: int = 0):
    return reference_llama(TINY, seed=seed)


def _random_sequences(count: int, length: int, prompt: int, seed: int = 0) -> Sequences:
    gen = torch.Generator().manual_seed(seed)
    sequences = Sequences()
    for i in range(count):
        tokens = torch.randint(3, TINY.vocab_size, (length - i % 3,), generator=gen).tolist()
        sequences.add(tokens, prompt, greedy=True, source="gsm8k")
    return sequences


def _greedy_sequences(target, count: int, prompt: int, new: int, seed: int = 0) -> Sequences:
    """Sequences whose responses are the target's own greedy tokens (what data.py produces)."""
    gen = torch.Generator().manual_seed(seed)
    sequences = Sequences()
    for _ in range(count):
        ids = torch.randint(3, TINY.vocab_size, (1, prompt), generator=gen)
        full = torch.cat([ids, target.greedy_reference(ids, new)], dim=1)[0].tolist()
        sequences.add(full, prompt, greedy=True, source="gsm8k")
    return sequences


def _draft(target, kind: str, seed: int = 0) -> EagleDraft:
    torch.manual_seed(seed)
    return EagleDraft(DraftConfig.for_target(target.config, kind)).attach_to(target)


# ----- the unroll means what decoding does ------------------------------------------------------
@pytest.mark.parametrize("kind", ["eagle", "eagle3"])
def test_unroll_step0_equals_draft_forward(kind):
    target = _target()
    draft = _draft(target, kind)
    ids = torch.randint(0, TINY.vocab_size, (2, 12))
    final, layers = target_states(target, ids, draft.config.feature_layers)
    features = step0_features(draft, final, layers)[:, :-1]
    with torch.no_grad():
        (h0,) = unroll(draft, ids, features, steps=1)
        expected = draft(ids[:, 1:], features)
    torch.testing.assert_close(h0, expected, rtol=0, atol=1e-6)


def test_target_states_match_the_model():
    target = _target()
    ids = torch.randint(0, TINY.vocab_size, (2, 9))
    final, layers = target_states(target, ids, (0, 2))
    torch.testing.assert_close(target.lm_head(final), target(ids), rtol=0, atol=1e-5)
    assert [t.shape for t in layers] == [(2, 9, TINY.hidden_size)] * 2


@pytest.mark.parametrize("kind", ["eagle", "eagle3"])
def test_training_time_test_equals_speculative_drafting(kind):
    """Step k of the unroll at chain start s is what EagleDraft.decode computes when the draft
    cache holds positions <= s from true features and the chain's k earlier drafts follow."""
    target = _target(seed=1)
    draft = _draft(target, kind, seed=3)
    length, steps = 14, 4
    ids = torch.randint(0, TINY.vocab_size, (1, length))
    final, layers = target_states(target, ids, draft.config.feature_layers)
    with torch.no_grad():
        features = step0_features(draft, final, layers)[:, :-1]
        hidden = unroll(draft, ids, features, steps)
        for s in (0, 3, 8):
            k_cache, v_cache = draft.new_cache(1, 32, torch.float32, "cpu")
            zero = torch.zeros(1, dtype=torch.long)
            catch_up = draft.decode(ids[:, 1:s + 2], features[:, :s + 1], torch.arange(s + 1)[None], zero,
                                    causal_mask(1, s + 1, "cpu"), k_cache, v_cache)
            chain = [catch_up[:, s]]
            torch.testing.assert_close(chain[0], hidden[0][:, s], rtol=0, atol=1e-5)
            for k in range(1, steps):
                out = draft.decode(ids[:, s + 2:s + k + 2], torch.stack(chain, dim=1),
                                   (s + 1 + torch.arange(k))[None], torch.tensor([s + 1]),
                                   causal_mask(1, k, "cpu"), k_cache, v_cache)
                chain.append(out[:, -1])
                torch.testing.assert_close(chain[k], hidden[k][:, s], rtol=0, atol=1e-5)


# ----- training -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["eagle", "eagle3"])
def test_loss_falls_when_overfitting_a_few_sequences(kind, tmp_path):
    target = _target()
    sequences = _greedy_sequences(target, count=5, prompt=4, new=16)
    config = TrainConfig(kind=kind, steps=50, batch_size=4, lr=3e-3, warmup_steps=5, eval_every=25,
                         ckpt_every=1000, log_every=5, eval_sequences=1)
    result = train(target, tmp_path, tmp_path / "run", config, sequences=sequences, progress=False, log=lambda _: None)
    train_records = [r for r in result.metrics if r["kind"] == "train"]
    assert result.finished and result.step == 50
    # the CE is bounded below by the target's entropy; what the draft can remove is the KL
    kl = [r["kl_0"] for r in train_records]
    assert kl[-1] < 0.3 * kl[0], kl
    losses = [r["loss"] for r in train_records]
    assert losses[-1] < losses[0], losses
    evals = [r for r in result.metrics if r["kind"] == "eval"]
    assert 1.0 <= evals[-1]["accept_length"] <= 1.0 + config.eval_depth
    for name in ("draft-best.safetensors", "loss.png", "accept_length.png", "summary.json", "metrics.jsonl"):
        assert (tmp_path / "run" / name).exists(), name
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["finished"] and summary["best_accept_length"] == result.best_accept_length
    loaded = load_draft(tmp_path / "run" / "draft-best.safetensors", target)
    assert loaded.config.kind == kind and next(loaded.parameters()).dtype == torch.float32
    from safetensors import safe_open

    with safe_open(str(tmp_path / "run" / "draft-best.safetensors"), framework="pt") as handle:
        assert {handle.get_tensor(k).dtype for k in handle.keys()} == {torch.bfloat16}
        assert json.loads(handle.metadata()["specc_training"])["kind"] == kind


def test_accept_length_proxy_is_full_for_a_perfect_draft_and_near_one_for_a_random_one(monkeypatch):
    target = _target()
    sequences = _greedy_sequences(target, count=3, prompt=4, new=12)
    config = TrainConfig(kind="eagle", eval_depth=3)
    draft = _draft(target, "eagle")
    assert 1.0 <= evaluate(target, draft, sequences, [0, 1, 2], config)["accept_length"] < 1.5

    # A perfect draft: its "hidden state" at chain step k carries the target's greedy token at
    # position s + k + 1, and its logits peak there.
    def oracle_unroll(draft_, input_ids, features, steps):
        length = input_ids.shape[1] - 1
        greedy = target.lm_head(target_states(target, input_ids)[0]).argmax(-1)
        padded = torch.nn.functional.pad(greedy, (0, steps + 1))
        return [padded[:, k + 1: k + 1 + length, None].float() for k in range(steps)]

    monkeypatch.setattr(train_module, "unroll", oracle_unroll)
    monkeypatch.setattr(draft, "logits", lambda h: torch.nn.functional.one_hot(h[..., 0].long(), TINY.vocab_size).float())
    perfect = evaluate(target, draft, sequences, [0, 1, 2], config)
    assert perfect["accept_length"] == pytest.approx(1.0 + config.eval_depth)
    assert perfect["accept_rate_by_depth"] == [1.0] * config.eval_depth


def _train_steps(target, draft, optimizer, scheduler, sequences, config, generator, order, first, last):
    losses = []
    for step in range(first, last):
        batch = make_batch(sequences, order(step), config.max_len, "cpu")
        loss, _ = distill_loss(target, draft, batch, config, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(draft.parameters(), config.grad_clip)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    return losses


def _fresh(target, config):
    draft = _draft(target, config.kind, seed=11)
    optimizer, scheduler = make_optimizer(draft, config)
    generator = torch.Generator().manual_seed(5)
    return draft, optimizer, scheduler, generator


@pytest.mark.parametrize("moments", ["fp32", "bf16"])
def test_checkpoint_round_trips(moments, tmp_path):
    """fp32 moments: resuming reproduces the uninterrupted run bit for bit; bf16 moments (the
    default, to keep files small): the same weights and the same next-step loss."""
    target = _target()
    sequences = _random_sequences(6, 20, prompt=5)
    config = TrainConfig(kind="eagle3", steps=10, batch_size=3, lr=1e-3, warmup_steps=2, ttt_steps=3,
                         moments_dtype=moments)
    order = BatchOrder(list(range(len(sequences))), config.batch_size, config.seed)

    draft, optimizer, scheduler, generator = _fresh(target, config)
    _train_steps(target, draft, optimizer, scheduler, sequences, config, generator, order, 0, 4)
    paths = save_checkpoint(tmp_path / "ckpt", draft, optimizer, scheduler, {"step": 4}, generator, moments,
                            max_bytes=2**20 + 60_000)
    assert len(paths) > 1 and all(p.stat().st_size < 2**20 + 60_000 for p in paths)
    reference = _train_steps(target, draft, optimizer, scheduler, sequences, config, generator, order, 4, 7)

    resumed, optimizer2, scheduler2, generator2 = _fresh(target, config)
    torch.rand(10, generator=generator2)  # a different RNG position, which the checkpoint must undo
    state = load_checkpoint(tmp_path / "ckpt", resumed, optimizer2, scheduler2, generator2)
    assert state == {"step": 4}
    tensors, _ = read_checkpoint(tmp_path / "ckpt")
    for name, param in resumed.named_parameters():
        assert torch.equal(param, tensors[f"param/{name}"])
    assert scheduler2.get_last_lr() == pytest.approx(scheduler.get_last_lr()) or scheduler2.last_epoch == 4
    again = _train_steps(target, resumed, optimizer2, scheduler2, sequences, config, generator2, order, 4, 7)
    assert again[0] == reference[0]
    if moments == "fp32":
        assert again == reference
        for (name, a), b in zip(draft.named_parameters(), resumed.parameters()):
            assert torch.equal(a, b), name


@pytest.mark.parametrize("batch_tokens", [None, 40])
def test_train_resume_after_time_budget_equals_uninterrupted_run(tmp_path, batch_tokens):
    target = _target()
    sequences = _random_sequences(8, 18, prompt=4, seed=2)
    common = dict(kind="eagle", steps=6, batch_size=2, batch_tokens=batch_tokens, max_len=18, lr=1e-3,
                  warmup_steps=2, moments_dtype="fp32", eval_every=3, ckpt_every=100, log_every=1, eval_sequences=1)
    quiet = dict(sequences=sequences, progress=False, log=lambda _: None)
    whole = train(target, tmp_path, tmp_path / "whole", TrainConfig(**common), **quiet)
    paused = train(target, tmp_path, tmp_path / "chunks", TrainConfig(**common, time_budget=0.0), **quiet)
    assert not paused.finished and paused.step == 1
    done = train(target, tmp_path, tmp_path / "chunks", TrainConfig(**common), resume=True, **quiet)
    assert done.finished and whole.finished
    a, _ = read_checkpoint(tmp_path / "whole" / "ckpt")
    b, _ = read_checkpoint(tmp_path / "chunks" / "ckpt")
    for name in a:
        if name.startswith(("param/", "optim/")):
            assert torch.equal(a[name], b[name]), name
    losses = lambda r: [m["loss"] for m in r.metrics if m["kind"] == "train"]  # noqa: E731
    assert losses(done) == losses(whole)


class TickingClock:
    """A clock that reads 0.05 s later at every reading: training's time budget then runs out
    after the same steps however busy the machine is (on the wall clock, a loaded CPU spent the
    2 s budget before the rate was measured)."""

    def __init__(self) -> None:
        self.now = 0.0

    def read(self) -> float:
        self.now += 0.05
        return self.now


def test_fit_steps_to_time_sets_the_schedule_end_from_the_measured_rate(tmp_path, monkeypatch):
    target = _target()
    sequences = _random_sequences(8, 18, prompt=4, seed=2)
    clock = TickingClock()
    monkeypatch.setattr(train_module, "time", types.SimpleNamespace(monotonic=clock.read, perf_counter=clock.read))
    monkeypatch.setattr(train_module, "FIT_SKIP_STEPS", 2)
    monkeypatch.setattr(train_module, "FIT_PROBE_STEPS", 3)
    monkeypatch.setattr(train_module, "FIT_RESERVE_SECONDS", 0.0)
    lines = []
    config = TrainConfig(kind="eagle", steps=10**6, batch_size=2, max_len=18, warmup_steps=2, eval_every=10**6,
                         ckpt_every=10**6, eval_sequences=1, time_budget=2.0, fit_steps_to_time=True)
    result = train(target, tmp_path, tmp_path / "run", config, sequences=sequences, progress=False, log=lines.append)
    fitted = [line for line in lines if "the schedule now ends at step" in line]
    assert len(fitted) == 1, lines
    end = int(fitted[0].rsplit(" ", 1)[1])
    assert 5 < end < 10**6 and result.step <= end
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == end and summary["config"]["steps"] == end


# ----- data ---------------------------------------------------------------------------------------
class WordTokenizer:
    """A stand-in for the real tokenizer with a tiny vocabulary: one token per word."""

    eos_id = 2

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        return [3 + zlib.crc32(word.encode()) % (self.vocab_size - 3) for word in text.split()]

    def encode_chat(self, messages, add_generation_prompt: bool = True) -> list[int]:
        ids = []
        for message in messages:
            ids += [1] + self.encode(message["role"] + " " + message["content"]) + [2]
        return ids + ([1] + self.encode("assistant") if add_generation_prompt else [])

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return " ".join(f"w{i}" for i in ids if not (skip_special_tokens and i < 3))


def test_first_turn_prompts_give_every_template_source_its_count_and_stay_off_mt_bench():
    counts = draft_data.mix_counts(3000)
    written = [f"Describe place number {i} in three sentences." for i in range(counts["self_written"])]
    items = draft_data.first_turn_prompts(counts, written, random.Random(1), draft_data.load_seed_tasks(),
                                          draft_data.load_gsm8k())
    got = {source: sum(1 for i in items if i.source == source) for source in draft_data.SOURCES}
    for source in ("gsm8k", "self_instruct_seed", "self_written", "topic_chat", "text_task", "code", "persona"):
        assert got[source] == counts[source] > 0, (source, got, counts)
    texts = [i.user_text() for i in items]
    assert len(set(t for i, t in zip(items, texts) if i.source in ("topic_chat", "persona"))) == \
        counts["topic_chat"] + counts["persona"]  # drawn without repeats
    keep_out = MTBenchFilter.from_file()
    assert not any(keep_out.overlaps(t) for t in texts)


def test_mt_bench_filter_catches_overlap_both_ways():
    turns = ["Compose an engaging travel blog post about a recent trip to Hawaii."]
    keep_out = MTBenchFilter(turns)
    assert keep_out.overlaps("Please: compose an engaging   travel blog post about a recent trip to HAWAII. Thanks")
    assert keep_out.overlaps("travel blog post about a recent trip")
    assert not keep_out.overlaps("trip")  # too short to count as a quote
    assert not keep_out.overlaps("Write a travel blog post about Norway.")
    real = MTBenchFilter.from_file()
    first = json.loads((draft_data.ASSETS / "mt_bench_question.jsonl").read_text().splitlines()[0])["turns"][0]
    assert real.overlaps(first)


def test_sequences_round_trip_through_shards(tmp_path):
    sequences = _random_sequences(40, 30, prompt=7)
    sequences.greedy[3] = False
    sequences.source[5] = "code"
    paths = save_sequences(tmp_path, sequences, tag="t", max_shard_bytes=64 * 1024 + 4 * 400)
    assert len(paths) > 1
    loaded = load_sequences(tmp_path)
    assert loaded.tokens == sequences.tokens and loaded.response_start == sequences.response_start
    assert loaded.greedy == sequences.greedy and loaded.source == sequences.source
    assert all(torch.load(p, weights_only=True)["tokens"].dtype == torch.int32 for p in paths)


def test_data_pipeline_end_to_end_keeps_mt_bench_out(tmp_path):
    config = LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    target = reference_llama(config, seed=4)
    with torch.no_grad():
        target.lm_head.weight[WordTokenizer.eos_id] *= 3  # so that some answers finish and get follow-ups
    tokenizer = WordTokenizer(config.vocab_size)
    mt_turn = json.loads((draft_data.ASSETS / "mt_bench_question.jsonl").read_text().splitlines()[2])["turns"][0]
    injected = [PromptItem("gsm8k", [{"role": "user", "content": "Please answer: " + mt_turn}]),
                PromptItem("gsm8k", [{"role": "user", "content": "A harmless extra question about tea?"}])]
    compiled = torch.compile(target, backend=specc.backend())
    summary = build_dataset(compiled, tokenizer, tmp_path, n_prompts=24, seed=3, batch_size=8, max_new_tokens=16,
                            max_seq_len=512, compile=False, progress=False, extra_prompts=injected,
                            log=lambda _: None)
    assert summary.dropped_mt_bench >= 1
    loaded = load_sequences(tmp_path)
    assert len(loaded) == summary.sequences > 24
    assert summary.counts_kept["follow_up"] > 0 and summary.counts_kept["code"] > 0
    assert 0 < summary.counts_kept["self_written"] <= summary.self_written_accepted
    assert 0 < sum(loaded.greedy) < len(loaded)
    prompts = [json.loads(line) for line in (tmp_path / "prompts-s3.jsonl").read_text().splitlines()]
    assert not any(mt_turn in m["content"] for p in prompts for m in p["messages"])
    assert any("harmless extra question" in m["content"] for p in prompts for m in p["messages"])
    mt_ids = tokenizer.encode(mt_turn)
    for tokens, start in zip(loaded.tokens, loaded.response_start):
        assert 0 < start < len(tokens) <= start + 16
        assert mt_ids[:12] not in [tokens[i:i + 12] for i in range(len(tokens) - 11)]
    # greedy responses are the target's own greedy continuation
    index = loaded.greedy.index(True)
    prompt = torch.tensor([loaded.tokens[index][:loaded.response_start[index]]])
    response = loaded.tokens[index][loaded.response_start[index]:]
    assert response == target.greedy_reference(prompt, len(response))[0].tolist()
    recipe = json.loads((tmp_path / "recipe-s3.json").read_text())
    assert recipe["sequences"] == summary.sequences and recipe["dropped_mt_bench"] == summary.dropped_mt_bench


def test_data_generation_stops_at_its_time_budget_and_still_saves(tmp_path):
    target = reference_llama(TINY, seed=2)
    compiled = torch.compile(target, backend=specc.backend())
    summary = build_dataset(compiled, WordTokenizer(TINY.vocab_size), tmp_path, n_prompts=8, batch_size=4,
                            max_new_tokens=4, max_seq_len=512, compile=False, progress=False, time_budget=0.0,
                            log=lambda _: None)
    assert summary.stopped_early and summary.sequences == 0
    assert len(load_sequences(tmp_path)) == 0
    assert json.loads((tmp_path / "recipe-s0.json").read_text())["stopped_early"]


def test_init_from_starts_training_at_the_saved_heads_weights(tmp_path):
    target = _target()
    sequences = _greedy_sequences(target, count=4, prompt=4, new=12)
    saved = _draft(target, "eagle3", seed=7)
    saved.save(tmp_path / "head.safetensors")
    seen = {}

    def spy(draft, path):
        original(draft, path)
        seen.update({k: v.clone() for k, v in draft.state_dict().items()})

    original = train_module._init_weights
    train_module._init_weights = spy
    try:
        config = TrainConfig(kind="eagle3", steps=1, batch_size=2, eval_every=1000, ckpt_every=1000,
                             eval_sequences=1, init_from=str(tmp_path / "head.safetensors"))
        train(target, tmp_path, tmp_path / "run", config, sequences=sequences, progress=False, log=lambda _: None)
    finally:
        train_module._init_weights = original
    expected = saved.state_dict()
    assert seen and all(torch.equal(seen[k], expected[k].float()) for k in expected)
    other = TrainConfig(kind="eagle", steps=1, batch_size=2, eval_sequences=1, init_from=str(tmp_path / "head.safetensors"))
    with pytest.raises(ValueError, match="differs from this run"):
        train(target, tmp_path, tmp_path / "run2", other, sequences=sequences, progress=False, log=lambda _: None)


def test_a_failing_sampled_engine_falls_back_to_greedy_and_says_so(tmp_path, monkeypatch):
    target = reference_llama(TINY, seed=2)
    compiled = torch.compile(target, backend=specc.backend())
    real_generate = specc.generate

    def greedy_only(*args, temperature=0.0, **kwargs):
        if temperature > 0:
            raise RuntimeError("sampled engine broken")
        return real_generate(*args, temperature=temperature, **kwargs)

    monkeypatch.setattr(specc, "generate", greedy_only)
    summary = build_dataset(compiled, WordTokenizer(TINY.vocab_size), tmp_path, n_prompts=8, batch_size=4,
                            max_new_tokens=4, max_seq_len=512, compile=False, progress=False, log=lambda _: None)
    sequences = load_sequences(tmp_path)
    assert summary.sequences == len(sequences) > 0
    assert all(sequences.greedy)  # every answer was greedy, and the flags say so


def test_batch_width_is_rounded_to_few_shapes_and_padding_never_reaches_the_loss():
    target = _target()
    sequences = _greedy_sequences(target, count=3, prompt=4, new=9)
    narrow = make_batch(sequences, [0, 1, 2], max_len=200, device="cpu")
    assert narrow.input_ids.shape[1] == 64 and narrow.tokens == sum(len(t) for t in sequences.tokens)
    assert make_batch(sequences, [0], max_len=10, device="cpu").input_ids.shape[1] == 10  # never past max_len
    config = TrainConfig(kind="eagle3", steps=1, noise=0.0)
    draft = _draft(target, "eagle3")
    tight = train_module.WIDTH_MULTIPLE
    try:
        train_module.WIDTH_MULTIPLE = 1
        exact = make_batch(sequences, [0, 1, 2], max_len=200, device="cpu")
    finally:
        train_module.WIDTH_MULTIPLE = tight
    loss_padded, _ = distill_loss(target, draft, narrow, config)
    loss_exact, _ = distill_loss(target, draft, exact, config)
    torch.testing.assert_close(loss_padded, loss_exact)


def test_token_budget_batches_fit_the_budget_cover_each_epoch_once_and_depend_only_on_seed_and_step():
    lengths = [random.Random(i).randint(5, 300) for i in range(400)]
    train_indices = list(range(0, 400, 2))
    config = TrainConfig(kind="eagle3", batch_tokens=1024, max_len=256, seed=4)
    order = train_module.TokenBudgetOrder(train_indices, lengths, config.batch_tokens, config.max_len, config.seed, pool=64)
    seen, step = [], 0
    while len(seen) < 3 * len(train_indices):
        batch = order(step)
        width = train_module.padded_width(max(min(lengths[i], 256) for i in batch), 256)
        assert width * len(batch) <= 1024, (step, batch)
        seen += batch
        step += 1
    for epoch in range(3):
        assert sorted(seen[epoch * len(train_indices):(epoch + 1) * len(train_indices)]) == train_indices
    # the same batches whatever order the steps are asked in (resuming asks for step N first)
    fresh = train_module.TokenBudgetOrder(train_indices, lengths, 1024, 256, 4, pool=64)
    assert [fresh(s) for s in reversed(range(step))] == [order(s) for s in reversed(range(step))]
    other_seed = train_module.TokenBudgetOrder(train_indices, lengths, 1024, 256, 5, pool=64)
    assert [other_seed(s) for s in range(5)] != [order(s) for s in range(5)]
    # similar lengths share a batch: far less padding than batches of random sequences
    padded = sum(train_module.padded_width(max(min(lengths[i], 256) for i in order(s)), 256) * len(order(s))
                 for s in range(step))
    real = sum(min(lengths[i], 256) for i in seen)
    assert padded < 1.3 * real, (padded, real)
    with pytest.raises(ValueError, match="batch_tokens"):
        TrainConfig(kind="eagle3", batch_tokens=100, max_len=256)


def test_profile_steps_reports_the_costliest_ops():
    target = _target()
    sequences = _greedy_sequences(target, count=6, prompt=4, new=10)
    table = train_module.profile_steps(target, "unused", TrainConfig(kind="eagle3", batch_size=2, eval_sequences=1),
                                       steps=2, warmup=1, sequences=sequences)
    assert "steps/s" in table and "aten::mm" in table


def test_a_time_budget_leaves_the_follow_ups_their_share(monkeypatch):
    from specc.draft import data as draft_data

    clock = [100.0]
    monkeypatch.setattr(draft_data.time, "monotonic", lambda: clock[0])
    assert draft_data.share_of_remaining(None, 0.5) is None
    assert draft_data.share_of_remaining(140.0, 0.75) == pytest.approx(130.0)
    clock[0] = 150.0  # past the deadline: nothing left to share
    assert draft_data.share_of_remaining(140.0, 0.75) == pytest.approx(150.0)
