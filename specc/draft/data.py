"""Training data for EAGLE draft heads: diverse prompts, answered by the target itself.

The draft learns to predict the target, so the target writes every response (self-
distillation, EAGLE paper section 4) through specc's own compiled batched decode. Only the
prompts come from outside, and never from a set used for measuring: every prompt whose text
contains an MT-Bench turn, or is contained in one (exact substring after lower-casing and
collapsing whitespace), is dropped and counted.

Prompt sources (`SOURCES`; `mix_counts` turns a total into counts, `build_dataset` reports
what it kept):
  gsm8k               GSM8K training questions, as asked (reasoning, math)
  self_instruct_seed  the 175 self-instruct seed tasks, instruction plus their input, each
                      asked twice (once greedy, once sampled)
  self_written        new instructions the target writes itself (self-instruct): it continues a
                      plain-text numbered list of four random seed instructions at T=0.7; the
                      new lines that parse and are not duplicates (of each other or of a seed)
                      are then asked as chat prompts
  topic_chat          hand-written general topics (`TOPICS`) x chat/writing templates
                      ("Explain ... in simple terms", "Write a short poem about ...", ...) and
                      writing forms (`WRITING_FORMS`: "Write a limerick about ...", ...)
  persona             role play: a persona (`PERSONAS`) and a request (`PERSONA_REQUESTS`)
                      in one of `PERSONA_TEMPLATES` ("Pretend to be ... and ...")
  text_task           templates over text that is at hand: GSM8K questions and worked answers,
                      self-instruct instance texts, and the docstrings of Python's standard
                      library ("Summarize the following text: ...", "List the key points ...",
                      "Extract every number ...", "Check this solution step by step ...")
  code                the standard library's own small functions: "Explain what this Python
                      function does", "Write a docstring", "Write a {language} function that
                      {first docstring line}", "Write unit tests for ..."
  follow_up           a second user turn ("Can you make it shorter?", ...) after a finished
                      first answer, so the draft also sees multi-turn chats

Responses: greedy for about half the prompts and temperature 0.7 for the rest (the head is
used under both), up to `max_new_tokens`, stopped at the tokenizer's end of turn. All
generation runs at one batch size and one cache length, so specc builds two engines (greedy,
sampled) once and reuses them. Prompts are shuffled and greedy and sampled batches alternate,
so a `time_budget` that stops generation early keeps the planned mix.

Storage (`save_sequences` / `load_sequences`): `seqs-{tag}-{i:03d}.pt` files (torch, loadable
with weights_only=True), each under `max_shard_bytes` (12 MiB by default): int32 `tokens`
(prompt + response, concatenated), int32 `lengths`, int32 `response_start`, bool `greedy`,
uint8 `source` (an index into `sources`). `recipe.json` beside them records the counts, the
parameters and the filter results; `prompts.jsonl` the prompt texts.
"""

from __future__ import annotations

import inspect
import json
import math
import random
import re
import sys
import textwrap
import time
from collections import Counter
from itertools import zip_longest
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "data"
SOURCES = ("gsm8k", "self_instruct_seed", "self_written", "topic_chat", "text_task", "code", "follow_up", "persona")
# Shares of the first-turn prompts; self_instruct_seed is fixed (2 x 175) and gsm8k takes the rest.
# The shipped head (2026-12-01) was trained on self_written 0.20 and GSM8K taking the rest (about
# 0.30): its held-out accept length on that mix (2.67) far exceeded MT-Bench's (about 1.5), so the
# self-written chat instructions, the most varied source, now take more and GSM8K less; role
# play and writing forms ("persona", "topic_chat") stand in for the chat categories that the
# other sources lack.
MIX = {"self_written": 0.35, "topic_chat": 0.15, "text_task": 0.12, "code": 0.12, "persona": 0.1}
FOLLOW_UP_FRACTION = 0.15
SAMPLING_TEMPERATURE = 0.7
SEQ_FILE_GLOB = "seqs-*.pt"


# ----- the measuring sets stay out ------------------------------------------------------------
def normalize(text: str) -> str:
    return " ".join(text.lower().split())


class MTBenchFilter:
    """Exact-substring overlap with MT-Bench turns, either way round (after `normalize`).

    A prompt is dropped when it contains a whole MT-Bench turn, or when its own text (at least
    `min_chars` long, so that "Explain." alone does not match) lies inside one.
    """

    def __init__(self, turns: Sequence[str], min_chars: int = 24) -> None:
        self.turns = [normalize(t) for t in turns if t.strip()]
        self.min_chars = min_chars

    @classmethod
    def from_file(cls, path: str | Path | None = None) -> MTBenchFilter:
        path = Path(path) if path else ASSETS / "mt_bench_question.jsonl"
        turns = [turn for line in path.read_text().splitlines() if line.strip() for turn in json.loads(line)["turns"]]
        return cls(turns)

    def overlaps(self, text: str) -> bool:
        text = normalize(text)
        if any(turn in text for turn in self.turns):
            return True
        return len(text) >= self.min_chars and any(text in turn for turn in self.turns)


# ----- prompt sources --------------------------------------------------------------------------
@dataclass
class PromptItem:
    source: str
    messages: list[dict]  # the chat so far, ending with a user turn
    greedy: bool = True

    def user_text(self) -> str:
        return "\n".join(m["content"] for m in self.messages if m["role"] == "user")


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_gsm8k(path: Path | None = None) -> list[dict]:
    return _jsonl(path or ASSETS / "gsm8k_train.jsonl")


def load_seed_tasks(path: Path | None = None) -> list[dict]:
    return _jsonl(path or ASSETS / "self_instruct_seed_tasks.jsonl")


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def seed_task_text(task: dict) -> str:
    instance = task["instances"][0]
    return task["instruction"] + (f"\n\n{instance['input']}" if instance["input"].strip() else "")


def clean_gsm8k_answer(answer: str) -> str:
    """GSM8K's worked answer without calculator annotations, the result as a sentence."""
    text = re.sub(r"<<[^>]*>>", "", answer)
    return re.sub(r"\n?####\s*(.+)$", r"\nThe answer is \1.", text.strip())


# A plain-text list for the model to continue, as the self-instruct paper prompts a base model:
# the instruct model follows this far better than a chat request for "one new task" (tried on
# 24 samples: the chat form mostly gave replies such as "I'm ready to help. What's your task?").
SELF_INSTRUCT_HEADER = "Instructions that users gave to an AI assistant:\n\n"
SELF_INSTRUCT_SHOWN = 4


def self_instruct_requests(seeds: Sequence[dict], count: int, rng: random.Random) -> list[str]:
    """Raw-text prompts: SELF_INSTRUCT_SHOWN random seed instructions as a numbered list, then
    the next number for the target to continue."""
    requests = []
    for _ in range(count):
        shown = [" ".join(t["instruction"].split()) for t in rng.sample(list(seeds), SELF_INSTRUCT_SHOWN)]
        listed = "".join(f"{i + 1}. {text}\n" for i, text in enumerate(shown))
        requests.append(f"{SELF_INSTRUCT_HEADER}{listed}{SELF_INSTRUCT_SHOWN + 1}.")
    return requests


def parse_self_written(text: str, finished: bool) -> list[str]:
    """The usable instructions in the target's continuation of a numbered list: the first line,
    then every following "N. ..." line up to the first blank line; the last line is dropped
    when the generation was cut off (`finished` False), as it may be incomplete."""
    blocks = text.split("\n\n")
    lines = blocks[0].split("\n")
    if not finished and len(blocks) == 1:
        lines = lines[:-1]
    found = []
    for index, line in enumerate(lines):
        line = line.strip()
        if index > 0:
            numbered = re.match(r"^\d+[.)]\s+(.*)$", line)
            if not numbered:
                break
            line = numbered.group(1)
        line = line.strip().strip('"').strip()
        words = line.split()
        if 4 <= len(words) <= 80 and len(line) <= 500 and re.search(r"[a-zA-Z]", line):
            found.append(line)
    return found


TOPICS = (
    "photosynthesis", "the water cycle", "black holes", "volcanoes", "the human immune system",
    "climate change", "renewable energy", "electric cars", "the history of the printing press",
    "the Roman Empire", "ancient Egypt", "the Industrial Revolution", "the invention of the telephone",
    "machine learning", "the internet", "cloud computing", "cybersecurity", "smartphones",
    "recycling", "healthy sleep habits", "meditation", "learning a new language", "time management",
    "public speaking", "job interviews", "saving money", "personal budgeting", "starting a small business",
    "remote work", "teamwork", "gardening", "composting", "baking bread", "vegetarian cooking",
    "coffee", "tea ceremonies", "chess", "soccer", "marathon training", "yoga", "the Olympic Games",
    "jazz music", "classical music", "learning to play the guitar", "painting with watercolors",
    "photography", "writing a novel", "poetry", "libraries", "museums", "bees", "octopuses",
    "migratory birds", "rainforests", "deserts", "coral reefs", "the Moon", "Mars exploration",
    "the solar system", "earthquakes", "tides", "rainbows", "magnets", "electricity", "batteries",
    "bridges", "skyscrapers", "trains", "airplanes", "bicycles", "city parks", "friendship",
    "kindness", "curiosity", "homework", "online safety for children", "a rainy day", "winter holidays",
    "a visit to the dentist", "moving to a new city", "adopting a pet", "dogs", "cats", "volunteering",
    "the scientific method", "prime numbers", "probability", "fractions", "the Pythagorean theorem",
    "DNA", "vaccines", "nutrition", "drinking enough water", "first aid", "fire safety",
    "the French Revolution", "the Renaissance", "the Cold War", "the Silk Road", "the printing of newspapers",
    "democracy", "human rights", "supply and demand", "inflation", "the stock market", "universal basic income",
    "the theory of evolution", "Newton's laws of motion", "plate tectonics", "the periodic table", "thermodynamics",
    "quantum computing", "blockchain", "open-source software", "artificial intelligence in medicine",
    "social media", "video games", "e-books versus printed books", "public transport", "urban gardening",
    "Shakespeare's plays", "impressionist painting", "Greek mythology", "philosophy of happiness", "stoicism",
    "game theory", "statistics in everyday life", "the speed of light", "antibiotics", "the human brain",
    "ocean pollution", "wind turbines", "nuclear power", "space tourism", "self-driving cars", "3D printing",
)

# Writing forms for "Write a {form} about {topic}." (topic_chat)
WRITING_FORMS = (
    "persuasive essay", "product description", "short speech", "news article", "cover letter", "thank-you note",
    "limerick", "haiku", "dialogue between two friends", "radio advertisement", "diary entry", "movie plot summary",
    "restaurant review", "motivational message", "short fable with a moral", "letter to the editor",
    "five-question quiz with answers", "children's story", "social media post", "song chorus",
)

PERSONAS = (
    "a pirate captain", "a medieval knight", "a friendly librarian", "a tour guide in an old European city",
    "a personal fitness coach", "a detective in 1920s London", "a high school chemistry teacher",
    "a customer support agent for an internet provider", "a famous chef", "an astronaut on a space station",
    "a startup founder pitching to investors", "a museum guide", "a wise old wizard", "a sports commentator",
    "a career counselor", "a park ranger", "a nutritionist", "a job interviewer", "a Romantic-era poet",
    "a robot learning about human emotions", "a math tutor", "a history professor", "a village shopkeeper",
    "a family doctor", "a travel blogger", "a lawyer explaining a contract", "a farmer", "a ship's navigator",
    "a time traveller from the year 2300", "a kindergarten teacher", "a stand-up comedian", "a barista",
)

PERSONA_REQUESTS = (
    "introduce yourself to a new visitor.", "describe a typical day in your life.",
    "give advice to someone who is nervous about their first day at work.",
    "explain what you love most about your work.", "answer this question: what is the secret to a good life?",
    "tell me about the biggest challenge you have faced.", "convince me to try something new.",
    "describe your favourite place.", "give a short speech at a graduation ceremony.",
    "respond to a customer who is unhappy about a late delivery.", "share three tips for beginners in your field.",
    "explain a difficult idea from your work to a child.", "tell me a story from your past.",
    "answer my question: how do I stay motivated?", "describe the tools you use every day.",
    "write a short letter to your younger self.", "react to the news that it will rain all week.",
    "plan a weekend trip for me.", "teach me one useful skill.", "tell me what you think about modern technology.",
)

PERSONA_TEMPLATES = (
    "Pretend to be {persona} and {request}",
    "You are {persona}. Stay in character and {request}",
    "Act as {persona}. Please {request}",
    "Imagine you are {persona}. {Request}",
    "Role-play as {persona}: {request}",
)

TOPIC_TEMPLATES = (
    "Explain {topic} in simple terms.",
    "Write a short essay about {topic}.",
    "Write a short poem about {topic}.",
    "Give me five tips related to {topic}.",
    "What are the pros and cons of {topic}?",
    "Tell me a short story that involves {topic}.",
    "What are three interesting facts about {topic}?",
    "How would you explain {topic} to a ten-year-old?",
    "Write a friendly email to a colleague about {topic}.",
    "What are common misconceptions about {topic}?",
    "Write a short blog introduction about {topic}.",
    "Create a list of questions a student might ask about {topic}.",
    "Describe {topic} in one paragraph.",
    "Why is {topic} important?",
    "Compare {topic} with something similar, and explain the differences.",
    "What would the world be like without {topic}?",
    "Write a short lesson plan for teaching {topic}.",
    "Give a brief history of {topic}.",
    "What ethical questions does {topic} raise?",
    "Write a step-by-step guide for a beginner interested in {topic}.",
)

TEXT_TEMPLATES = (
    "Summarize the following text in one or two sentences:\n\n{text}",
    "Rewrite the following text in simpler words:\n\n{text}",
    "List the key points of this text as bullet points:\n\n{text}",
    "Write three questions that can be answered from this text:\n\n{text}",
    "What is the main idea of this text?\n\n{text}",
    "Give this text a short title.\n\n{text}",
    "Continue this text with one more paragraph:\n\n{text}",
    "Explain the following text to a beginner:\n\n{text}",
    "Rewrite this text in a more formal tone:\n\n{text}",
    "Extract every number in this text and say what each one refers to:\n\n{text}",
    "List the people, places and things named in this text, as JSON:\n\n{text}",
    "Turn this text into a table with two columns, item and detail:\n\n{text}",
    "Is the tone of this text positive, negative or neutral? Explain briefly.\n\n{text}",
)

SOLUTION_TEMPLATES = (
    "Check this solution step by step and say whether it is correct.\n\nProblem: {question}\n\nSolution: {answer}",
    "Explain the reasoning in this worked answer.\n\nProblem: {question}\n\nSolution: {answer}",
    "Write a similar word problem to this one, then solve it.\n\n{question}",
    "{question}\nLet's think step by step.",
)

CODE_TEMPLATES = (
    "Explain what this Python function does:\n\n```python\n{source}\n```",
    "Write a docstring for this Python function:\n\n```python\n{bare}\n```",
    "Write unit tests for this Python function:\n\n```python\n{source}\n```",
    "Are there any bugs or edge cases in this Python code?\n\n```python\n{source}\n```",
    "Rewrite this Python function to make it easier to read:\n\n```python\n{bare}\n```",
    "Write a {language} function named `{name}` that does the following: {doc}",
    "Write a Python function `{name}{signature}`. It should: {doc}",
)
CODE_LANGUAGES = ("Python", "Python", "JavaScript", "C", "Java", "Go", "Rust")

# Pure-Python standard-library modules whose small functions serve as code to talk about.
STDLIB_MODULES = (
    "base64", "bisect", "calendar", "colorsys", "configparser", "copy", "csv", "dataclasses", "difflib",
    "email.utils", "enum", "filecmp", "fnmatch", "fractions", "functools", "gettext", "glob", "graphlib",
    "heapq", "html", "ipaddress", "json.decoder", "json.encoder", "keyword", "mimetypes", "netrc",
    "numbers", "optparse", "plistlib", "posixpath", "pprint", "quopri", "random", "reprlib", "sched",
    "secrets", "shlex", "shutil", "statistics", "string", "tempfile", "textwrap", "timeit", "tokenize",
    "traceback", "urllib.parse", "uuid", "wave", "zipapp",
)

FOLLOW_UPS = (
    "Can you make it shorter?",
    "Can you explain that in more detail?",
    "Give me an example.",
    "Rewrite your answer as a bulleted list.",
    "Why?",
    "Thanks! Can you summarize your answer in one sentence?",
    "What would be a good next step?",
    "Can you explain it to a child?",
    "Are you sure? Please double-check your answer.",
    "Now write it in a more formal tone.",
    "What are the limitations of your answer?",
    "Can you give me two alternatives?",
)


@dataclass(frozen=True)
class CodeSnippet:
    name: str
    signature: str
    source: str
    bare: str  # the source without its docstring
    doc: str  # the docstring's first sentence


def stdlib_snippets(max_lines: int = 40, modules: Sequence[str] = STDLIB_MODULES) -> list[CodeSnippet]:
    """Small documented functions and methods of the running Python's standard library."""
    import importlib

    snippets = []
    for module_name in modules:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        candidates = []
        for _, obj in sorted(vars(module).items()):
            if inspect.isfunction(obj) and obj.__module__ == module.__name__:
                candidates.append(obj)
            elif inspect.isclass(obj) and obj.__module__ == module.__name__:
                candidates.extend(f for _, f in sorted(vars(obj).items()) if inspect.isfunction(f))
        for func in candidates:
            doc = inspect.getdoc(func)
            try:
                source = textwrap.dedent(inspect.getsource(func))
                signature = str(inspect.signature(func))
            except (OSError, TypeError, ValueError):
                continue
            lines = source.count("\n") + 1
            if not doc or not 3 <= lines <= max_lines or func.__name__.startswith("__"):
                continue
            first = " ".join(doc.split("\n\n")[0].split())
            first = first[0].lower() + first[1:] if first else first
            bare = re.sub(r'\n(\s*)(?:[rbu]?"""[\s\S]*?"""|[rbu]?\'\'\'[\s\S]*?\'\'\')\n', "\n", source, count=1)
            snippets.append(CodeSnippet(func.__qualname__, signature, source.rstrip(), bare.rstrip(), first))
    return snippets


def stdlib_doc_texts(modules: Sequence[str] = STDLIB_MODULES, max_chars: int = 1200) -> list[str]:
    """First paragraphs of the standard library's module and class docstrings, as plain text."""
    import importlib

    texts = []
    for module_name in modules:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        objects = [module] + [o for _, o in sorted(vars(module).items())
                              if inspect.isclass(o) and o.__module__ == module.__name__]
        for obj in objects:
            doc = inspect.getdoc(obj) or ""
            paragraphs = [" ".join(p.split()) for p in doc.split("\n\n") if p.strip()]
            text = "\n\n".join(paragraphs[:3])[:max_chars]
            if len(text) >= 150:
                texts.append(text)
    return texts


def mix_counts(n_prompts: int, n_seed_tasks: int = 175) -> dict[str, int]:
    """First-turn prompt counts per source for `n_prompts` in all, plus the follow-up count."""
    if n_prompts < 1:
        raise ValueError(f"n_prompts={n_prompts}; ask for at least one prompt")
    counts = {"self_instruct_seed": min(2 * n_seed_tasks, n_prompts // 10)}
    for source, share in MIX.items():
        counts[source] = int(n_prompts * share)
    counts["gsm8k"] = n_prompts - sum(counts.values())
    counts["follow_up"] = int(n_prompts * FOLLOW_UP_FRACTION)
    return {source: counts[source] for source in SOURCES}


def first_turn_prompts(counts: dict[str, int], self_written: Sequence[str], rng: random.Random,
                       seeds: Sequence[dict], gsm8k: Sequence[dict]) -> list[PromptItem]:
    """The first-turn prompts of every source but self_written's generation (given here)."""
    items: list[PromptItem] = []
    questions = [q["question"] for q in gsm8k]

    # gsm8k: plain questions, distinct
    for question in rng.sample(questions, min(counts["gsm8k"], len(questions))):
        items.append(PromptItem("gsm8k", _user(question)))

    # self-instruct seeds: each task greedy, then sampled, until the count is reached
    seed_texts = [seed_task_text(t) for t in seeds]
    for i in range(counts["self_instruct_seed"]):
        items.append(PromptItem("self_instruct_seed", _user(seed_texts[i % len(seed_texts)]),
                                greedy=(i // len(seed_texts)) % 2 == 0))

    for text in self_written[: counts["self_written"]]:
        items.append(PromptItem("self_written", _user(text)))

    topic_texts = [p.format(topic=t) for t in TOPICS for p in TOPIC_TEMPLATES]
    topic_texts += [f"Write a {form} about {topic}." for topic in TOPICS for form in WRITING_FORMS]
    for text in rng.sample(topic_texts, min(counts["topic_chat"], len(topic_texts))):
        items.append(PromptItem("topic_chat", _user(text)))

    persona_texts = [template.format(persona=persona, request=request, Request=request[0].upper() + request[1:])
                     for persona in PERSONAS for request in PERSONA_REQUESTS for template in PERSONA_TEMPLATES]
    for text in rng.sample(persona_texts, min(counts.get("persona", 0), len(persona_texts))):
        items.append(PromptItem("persona", _user(text)))

    # text tasks: a third over worked GSM8K solutions, the rest over passages of text
    passages = ([q for q in questions if len(q) >= 200]
                + [t["instances"][0][k] for t in seeds for k in ("input", "output") if len(t["instances"][0][k]) >= 150]
                + stdlib_doc_texts())
    for i in range(counts["text_task"]):
        if i % 3 == 0:
            row = rng.choice(list(gsm8k))
            text = rng.choice(SOLUTION_TEMPLATES).format(question=row["question"], answer=clean_gsm8k_answer(row["answer"]))
        else:
            text = rng.choice(TEXT_TEMPLATES).format(text=rng.choice(passages))
        items.append(PromptItem("text_task", _user(text)))

    snippets = stdlib_snippets()
    if snippets:
        for _ in range(counts["code"]):
            snippet = rng.choice(snippets)
            template = rng.choice(CODE_TEMPLATES)
            items.append(PromptItem("code", _user(template.format(
                source=snippet.source, bare=snippet.bare, name=snippet.name.split(".")[-1],
                signature=snippet.signature, doc=snippet.doc, language=rng.choice(CODE_LANGUAGES)))))
    return items


# ----- generation ------------------------------------------------------------------------------
@dataclass
class Sequences:
    """Token sequences (prompt + response) with where each response starts."""

    tokens: list[list[int]] = field(default_factory=list)
    response_start: list[int] = field(default_factory=list)
    greedy: list[bool] = field(default_factory=list)
    source: list[str] = field(default_factory=list)

    def add(self, tokens: list[int], response_start: int, greedy: bool, source: str) -> None:
        self.tokens.append(tokens)
        self.response_start.append(response_start)
        self.greedy.append(greedy)
        self.source.append(source)

    def __len__(self) -> int:
        return len(self.tokens)

    def extend(self, other: Sequences) -> None:
        for i in range(len(other)):
            self.add(other.tokens[i], other.response_start[i], other.greedy[i], other.source[i])


def _progress(iterable, total: int, desc: str, enabled: bool):
    if not enabled:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc=desc, mininterval=1.0 if sys.stderr.isatty() else 15.0)


def share_of_remaining(deadline: float | None, share: float) -> float | None:
    """A deadline (time.monotonic()) that leaves `share` of the time until `deadline` to spend now."""
    if deadline is None:
        return None
    now = time.monotonic()
    return now + max(0.0, deadline - now) * share


def generate_batched(
    compiled: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    greedy: Sequence[bool],
    *,
    max_new_tokens: int,
    stop_ids: Sequence[int],
    batch_size: int,
    max_seq_len: int,
    seed: int,
    compile: bool = True,
    cuda_graph: bool | None = None,
    progress: bool = True,
    desc: str = "generate",
    deadline: float | None = None,
    greedy_fallback: bool = False,
) -> list[list[int] | None]:
    """Responses for `prompts`, greedy or at T=0.7 per prompt, through specc.generate.

    Every call uses exactly `batch_size` prompts (the last batch of each kind is padded with
    copies of its first prompt, whose answers are dropped) and one `max_seq_len`, so specc
    builds one engine per sampling rule and reuses it. Greedy and sampled batches alternate, so
    that stopping at `deadline` (time.monotonic()) keeps both; prompts not reached get None.
    Sampled prompt i is seeded with `seed * 1_000_003 + i`. With `greedy_fallback`, a failing
    sampled engine does not end the run: its prompts are answered greedily, and `greedy` (a
    list) is updated in place to say which prompts were.
    """
    import specc

    responses: list[list[int] | None] = [None] * len(prompts)
    groups = []
    for want_greedy in (True, False):
        order = [i for i in range(len(prompts)) if bool(greedy[i]) == want_greedy]
        groups.append([(want_greedy, order[i:i + batch_size]) for i in range(0, len(order), batch_size)])
    batches = [b for pair in zip_longest(*groups) for b in pair if b is not None]
    sampling_failed = False
    for want_greedy, batch in _progress(batches, len(batches), desc, progress):
        if deadline is not None and time.monotonic() > deadline:
            break
        padded = batch + [batch[0]] * (batch_size - len(batch))

        def run(greedy_now: bool):
            return specc.generate(
                compiled, [list(prompts[i]) for i in padded], max_new_tokens=max_new_tokens,
                temperature=0.0 if greedy_now else SAMPLING_TEMPERATURE,
                seed=[seed * 1_000_003 + i for i in padded], stop_ids=list(stop_ids),
                max_seq_len=max_seq_len, compile=compile, cuda_graph=cuda_graph,
            )

        if not want_greedy and sampling_failed:
            want_greedy = True
        try:
            out = run(want_greedy)
        except Exception as error:  # noqa: BLE001 - only the sampled engine may fall back, and it says so
            if want_greedy or not greedy_fallback:
                raise
            print(f"sampled generation failed ({type(error).__name__}: {str(error)[:300]}); "
                  "answering the remaining sampled prompts greedily (their greedy flags say so)", file=sys.stderr)
            sampling_failed, want_greedy = True, True
            out = run(True)
        for index, tokens in zip(batch, out.tokens):
            responses[index] = list(tokens)
            if isinstance(greedy, list):
                greedy[index] = want_greedy
    return responses


@dataclass
class DataSummary:
    counts_requested: dict[str, int]
    counts_kept: dict[str, int]
    dropped_mt_bench: int
    dropped_too_long: int
    self_written_requests: int
    self_written_accepted: int
    sequences: int
    prompt_tokens: int
    response_tokens: int
    greedy_sequences: int
    finished_responses: int
    seconds: float
    stopped_early: bool
    files: list[str]

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def build_dataset(
    compiled: torch.nn.Module,
    tokenizer,
    out_dir: str | Path,
    n_prompts: int,
    *,
    seed: int = 0,
    batch_size: int = 64,
    max_new_tokens: int = 256,
    max_seq_len: int = 1024,
    greedy_fraction: float = 0.5,
    compile: bool = True,
    cuda_graph: bool | None = None,
    progress: bool = True,
    extra_prompts: Sequence[PromptItem] = (),
    mt_bench: MTBenchFilter | None = None,
    time_budget: float | None = None,
    log: Callable[[str], None] = print,
) -> DataSummary:
    """Build `n_prompts` first-turn prompts (plus follow-ups), let the target answer them and
    save the sequences under `out_dir` (see the module docstring). `extra_prompts` are added
    as they are (and filtered like the rest). `compile` and `cuda_graph` go to specc.generate:
    on a GPU, compile=False with cuda_graph=True replays the uncompiled step from a CUDA graph
    and spends none of Inductor's minutes of compilation. With `time_budget` (seconds), generation stops
    launching batches once it is spent, keeps what it has (in the planned mix, since prompts
    are shuffled) and still saves; the summary's `stopped_early` says so. The first-turn answers
    get the share of the budget left after self-instruct that their count has among all planned
    answers, so the follow-ups are not starved."""
    start = time.perf_counter()
    deadline = None if time_budget is None else time.monotonic() + time_budget
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    mt_bench = mt_bench or MTBenchFilter.from_file()
    seeds, gsm8k = load_seed_tasks(), load_gsm8k()
    counts = mix_counts(n_prompts, len(seeds))
    stop_ids = [tokenizer.eos_id]
    max_prompt_tokens = max_seq_len - max_new_tokens
    gen = dict(max_new_tokens=max_new_tokens, stop_ids=stop_ids, batch_size=batch_size, max_seq_len=max_seq_len,
               compile=compile, cuda_graph=cuda_graph, progress=progress, deadline=deadline, greedy_fallback=True)
    dropped = Counter()

    def encode(items: list[PromptItem]) -> tuple[list[PromptItem], list[list[int]]]:
        kept, ids = [], []
        for item in items:
            if mt_bench.overlaps(item.user_text()):
                dropped["mt_bench"] += 1
                continue
            tokens = tokenizer.encode_chat(item.messages)
            if len(tokens) > max_prompt_tokens:
                dropped["too_long"] += 1
                continue
            kept.append(item)
            ids.append(tokens)
        return kept, ids

    # 1. the target writes new instructions from seed examples (self-instruct)
    n_requests = math.ceil(counts["self_written"] / 2) + 8 if counts["self_written"] else 0
    requests = [r for r in self_instruct_requests(seeds, n_requests, rng) if not mt_bench.overlaps(r)]
    written: list[str] = []
    if requests:
        replies = generate_batched(compiled, [tokenizer.encode(r) for r in requests], [False] * len(requests),
                                   seed=seed + 1, desc="self-instruct", **{**gen, "max_new_tokens": min(96, max_new_tokens)})
        seen = {normalize(t["instruction"]) for t in seeds}
        for reply in filter(None, replies):
            finished = reply[-1] in stop_ids
            text = tokenizer.decode([t for t in reply if t not in stop_ids], skip_special_tokens=True)
            for instruction in parse_self_written(text, finished):
                if normalize(instruction) not in seen and not mt_bench.overlaps(instruction):
                    seen.add(normalize(instruction))
                    written.append(instruction)
    rng.shuffle(written)
    log(f"self-instruct: {len(written)} new instructions from {len(requests)} requests")
    # too few usable instructions: the gap goes to GSM8K (counts_kept shows it)
    shortfall = max(0, counts["self_written"] - len(written))
    filled = {**counts, "gsm8k": counts["gsm8k"] + shortfall}

    # 2. first-turn prompts, greedy or sampled, answered by the target
    items = first_turn_prompts(filled, written, rng, seeds, gsm8k)
    for item in items:
        if item.source != "self_instruct_seed":
            item.greedy = rng.random() < greedy_fraction
    items += list(extra_prompts)
    rng.shuffle(items)
    items, prompt_ids = encode(items)
    modes = [i.greedy for i in items]
    # the first turns may spend only their share of what is left of a time budget, so that the
    # follow-ups planned after them still get theirs (one budget spent on first turns alone
    # left a run without follow-ups)
    first_share = len(items) / max(1, len(items) + counts["follow_up"])
    responses = generate_batched(compiled, prompt_ids, modes, seed=seed + 2, desc="answers",
                                 **{**gen, "deadline": share_of_remaining(deadline, first_share)})
    for item, mode in zip(items, modes):
        item.greedy = mode
    answered = [i for i, r in enumerate(responses) if r is not None]
    items, prompt_ids, responses = ([x[i] for i in answered] for x in (items, prompt_ids, responses))
    sequences = Sequences()
    for item, ids, response in zip(items, prompt_ids, responses):
        sequences.add(ids + response, len(ids), item.greedy, item.source)

    # 3. second turns after finished first answers
    finished = [i for i, r in enumerate(responses) if r and r[-1] in stop_ids]
    follow_items = []
    for index in rng.sample(finished, min(counts["follow_up"], len(finished))):
        answer = tokenizer.decode([t for t in responses[index] if t not in stop_ids], skip_special_tokens=True)
        messages = items[index].messages + [{"role": "assistant", "content": answer.strip()},
                                            {"role": "user", "content": rng.choice(FOLLOW_UPS)}]
        follow_items.append(PromptItem("follow_up", messages, greedy=rng.random() < greedy_fraction))
    follow_items, follow_ids = encode(follow_items)
    if follow_items:
        modes = [i.greedy for i in follow_items]
        follow_responses = generate_batched(compiled, follow_ids, modes, seed=seed + 3, desc="follow-ups", **gen)
        for item, mode in zip(follow_items, modes):
            item.greedy = mode
        for item, ids, response in zip(follow_items, follow_ids, follow_responses):
            if response is not None:
                sequences.add(ids + response, len(ids), item.greedy, item.source)
                items.append(item)
    stopped_early = deadline is not None and time.monotonic() > deadline

    files = save_sequences(out_dir, sequences, tag=f"s{seed}")
    with (out_dir / f"prompts-s{seed}.jsonl").open("w") as handle:
        for item in items:
            handle.write(json.dumps({"source": item.source, "greedy": item.greedy, "messages": item.messages}) + "\n")
    kept = Counter(sequences.source)
    summary = DataSummary(
        counts_requested=counts,
        counts_kept={s: kept.get(s, 0) for s in SOURCES} | {s: n for s, n in kept.items() if s not in SOURCES},
        dropped_mt_bench=dropped["mt_bench"],
        dropped_too_long=dropped["too_long"],
        self_written_requests=len(requests),
        self_written_accepted=len(written),
        sequences=len(sequences),
        prompt_tokens=sum(sequences.response_start),
        response_tokens=sum(len(t) - r for t, r in zip(sequences.tokens, sequences.response_start)),
        greedy_sequences=sum(sequences.greedy),
        finished_responses=sum(1 for t, r in zip(sequences.tokens, sequences.response_start) if t[-1] in stop_ids),
        seconds=round(time.perf_counter() - start, 1),
        stopped_early=stopped_early,
        files=[f.name for f in files],
    )
    recipe = {
        "n_prompts": n_prompts, "seed": seed, "batch_size": batch_size, "max_new_tokens": max_new_tokens,
        "max_seq_len": max_seq_len, "greedy_fraction": greedy_fraction, "temperature": SAMPLING_TEMPERATURE,
        "python": sys.version.split()[0], "mt_bench_filter": "exact substring either way, lower-cased, whitespace collapsed",
        **summary.to_dict(),
    }
    (out_dir / f"recipe-s{seed}.json").write_text(json.dumps(recipe, indent=1))
    return summary


# ----- storage ---------------------------------------------------------------------------------
def save_sequences(out_dir: str | Path, sequences: Sequences, tag: str = "s0",
                   max_shard_bytes: int = 12 * 2**20) -> list[Path]:
    """Write `sequences` as `seqs-{tag}-{i:03d}.pt` shards, each under `max_shard_bytes`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(f"seqs-{tag}-*.pt"):
        stale.unlink()
    names = sorted(set(sequences.source) | set(SOURCES), key=lambda s: (s not in SOURCES, SOURCES.index(s) if s in SOURCES else s))
    max_tokens = max(1, (max_shard_bytes - 64 * 1024) // 4 - 16)
    paths, begin, shard = [], 0, 0
    while begin < len(sequences) or (begin == 0 and not paths):
        end, tokens = begin, 0
        while end < len(sequences) and (end == begin or tokens + len(sequences.tokens[end]) <= max_tokens):
            tokens += len(sequences.tokens[end])
            end += 1
        if end > begin and tokens > max_tokens:
            raise ValueError(f"sequence {begin} has {tokens} tokens, more than a shard of {max_shard_bytes} bytes holds")
        part = {
            "tokens": torch.tensor([t for seq in sequences.tokens[begin:end] for t in seq], dtype=torch.int32),
            "lengths": torch.tensor([len(s) for s in sequences.tokens[begin:end]], dtype=torch.int32),
            "response_start": torch.tensor(sequences.response_start[begin:end], dtype=torch.int32),
            "greedy": torch.tensor(sequences.greedy[begin:end], dtype=torch.bool),
            "source": torch.tensor([names.index(s) for s in sequences.source[begin:end]], dtype=torch.uint8),
            "sources": names,
        }
        path = out_dir / f"seqs-{tag}-{shard:03d}.pt"
        torch.save(part, path)
        paths.append(path)
        begin, shard = end, shard + 1
        if end >= len(sequences):
            break
    return paths


def load_sequences(data_dir: str | Path) -> Sequences:
    """Every `seqs-*.pt` shard in `data_dir`, in name order."""
    data_dir = Path(data_dir)
    paths = sorted(data_dir.glob(SEQ_FILE_GLOB))
    if not paths:
        raise FileNotFoundError(
            f"no {SEQ_FILE_GLOB} files in {data_dir}; generate them first with "
            f"`specc train-draft --generate-data N --data-dir {data_dir} --steps 0`"
        )
    sequences = Sequences()
    for path in paths:
        part = torch.load(path, weights_only=True)
        flat = part["tokens"].tolist()
        lengths = part["lengths"].tolist()
        offset = 0
        for i, length in enumerate(lengths):
            sequences.add(flat[offset:offset + length], int(part["response_start"][i]), bool(part["greedy"][i]),
                          part["sources"][int(part["source"][i])])
            offset += length
    return sequences
