"""Train the bundled demo Idefics3 from scratch on the synthetic shapes task (CPU, minutes).

    python -m jobs.train_demo --out demo/model --steps 1500 --threads 1
    python -m jobs.train_demo --out demo/model --init-from demo/model --steps 700 --lr 3e-4 --threads 1
    python -m jobs.train_demo --out demo/model --init-from demo/model --steps 1200 --lr 3e-4 --threads 1 \
        --focus-images 3000
    python -m jobs.train_demo --out demo/model --init-from demo/model --steps 2000 --lr 3e-4 --threads 1 \
        --focus-images 10000 --focus-kinds where
    python -m jobs.train_demo --out demo/model --init-from demo/model --steps 1500 --lr 7e-4 --threads 1 \
        --focus-only --focus-images 4000 --focus-kinds colour-count-balanced name-colour
    python -m jobs.train_demo --out demo/model --init-from demo/model --steps 2000 --lr 3e-4 --threads 1 \
        --focus-images 4000 --focus-kinds where where-colour colour-count-balanced name-colour
    python -m jobs.train_demo --out demo/model --init-from demo/model --steps 1000 --lr 1e-4 --threads 1 \
        --focus-images 4000 --focus-kinds where where-colour colour-count-balanced name-colour

(the bundled model: 1.39M parameters, held-out exact-match 0.84, 0.88, 0.92, 0.944, 0.23, 0.982 and
0.989 after the seven commands; the third adds 15k where/count rows to the mix, the fourth 22k where
rows. About 17 + 4 + 13 minutes on one contended core for the first three, 9 minutes for the fourth
on an uncontended one (0.24 s/step), 6 + 9 + 4.5 minutes for the last three on one core each.

Colour lookups. After the fourth stage the model never found a shape by its colour: "How many
<colour> shapes?" was always "0" and "Where is the <colour> <shape>?" failed beside another shape of
that kind; training on those questions alone did not move them (colour counts stayed at chance for
1000-1500 steps, from scratch as from the fourth stage, and so did "where is the <shape>?" from
scratch). Finding a shape by colour needs two links learned together: the question's colour word
routed to the answer position, and a head whose query is the colour matching the image tokens of that
colour. Neither gets a gradient while the other is missing. The training-only kind "Name the <colour>
shape." -> "<colour> <shape>" (name-colour) supervises the second link one hop from its query: the
shape is predicted right after the colour token. It is learned in ~400 steps, and with it the colour
counts go from chance to 0.99 within ~1100 steps (probe on held-out scenes). The fifth stage trains
those two kinds alone (the other kinds are forgotten: 0.23 overall, colour counts 49/55), the sixth
restores the whole mix: 0.982 (where 0.95, counts 0.98, captions 0.97), and the seventh, the same at
a third of the rate, polishes: 0.989 (where 0.98, counts 0.99, captions 0.97; the 16 sample captions
all right, 15 after the sixth). The same sixth stage from the fourth, without the fifth, gives 0.940
at lr 3e-4 and 0.951 at lr 7e-4 (2500 steps).

Tried before, without gain: on top of the fourth (2000 steps, lr 3e-4, --focus-images 10000):
--focus-kinds where colour-count (0.944), where colour-count-balanced (0.91 at step 1500);
--focus-only with where colour-count-balanced at lr 5e-4, 1500 steps (colour counts still "0"); on top
of the third, the default focus kinds with --focus-images 6000 (0.916). From scratch (on a GPU, 3000
steps, --focus-images 3000): 6 or 8 decoder layers, 8 heads, text hidden 192, scale_factor 1, batch
64: 0.59-0.91. On top of the fourth with "Where is the <colour> shape?" (where-colour): 0.944; with
where where-colour colour-count-balanced: 0.947.)

Writes a complete Hugging Face layout folder: tokenizer (byte-level BPE trained here), chat template,
processor configs (image splitting on: 2x2 tiles of 32 px + a global frame), generation config and the
weights through our `save_pretrained`. Ends with greedy exact-match on the held-out split.
"""
from __future__ import annotations

import argparse
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from demo import assets, shapes

# Vision: 32-px tiles in 8-px patches (4x4 grid) -> pixel shuffle 2 -> 4 tokens per frame.
VISION = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
              image_size=assets.TILE, patch_size=8, layer_norm_eps=1e-6)
TEXT = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-5, max_position_embeddings=512,
            rope_theta=10000.0)
TOP = dict(scale_factor=2)


@dataclass
class Encoded:
    """One row ready for the model: prompt ids (single BOS), target ids, the image's frames."""
    prompt: list[int]
    target: list[int]
    frames: torch.Tensor  # float32 (n_frames, 3, m, m), normalised
    answer: str


def backends():
    """Our model and processor; transformers' only where ours has not landed (prototyping)."""
    try:
        from model import Idefics3Config, Idefics3ForConditionalGeneration
        ours_model = True
    except ImportError:
        from transformers import Idefics3Config, Idefics3ForConditionalGeneration
        ours_model = False
    return Idefics3Config, Idefics3ForConditionalGeneration, ours_model


def load_processor(path: Path):
    """Our Idefics3Processor; transformers' while ours is not importable yet."""
    try:
        from processing import Idefics3Processor
        return Idefics3Processor.from_pretrained(path), "ours"
    except ImportError:
        from transformers import Idefics3Processor
        return Idefics3Processor.from_pretrained(path), "transformers"


def apply_overrides(settings: list[str]) -> None:
    """`vision.patch_size=4`-style edits of the model sizes (for sweeps)."""
    for item in settings:
        key, value = item.split("=", 1)
        part, name = key.split(".", 1)
        table = {"vision": VISION, "text": TEXT, "top": TOP}[part]
        table[name] = type(table[name])(value) if name in table else int(value)


def image_seq_len() -> int:
    return (VISION["image_size"] // VISION["patch_size"]) ** 2 // TOP["scale_factor"] ** 2


def write_assets(out: Path, train_rows: list[dict]) -> dict[str, int]:
    """Tokenizer (trained on the training questions and answers), processor files, generation config."""
    corpus = [f"{r['question']} {r['answers'][0]}" for r in train_rows]
    corpus += list(shapes.CAPTION_PROMPTS)
    assets.build_tokenizer(out, corpus + ["User: Assistant:\n\n"])
    assets.write_processor_files(out, image_seq_len())
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    ids = {name: tok.token_to_id(t) for name, t in
           [("bos", assets.BOS), ("eos", assets.EOS), ("pad", assets.PAD), ("image", assets.IMAGE),
            ("eou", assets.EOU)]}
    ids["vocab"] = tok.get_vocab_size()
    assets.write_generation_config(out, ids["bos"], ids["eos"], ids["eou"], ids["pad"])
    return ids


def config_dict(ids: dict[str, int]) -> dict:
    vocab = math.ceil(ids["vocab"] / 64) * 64
    text = dict(TEXT, model_type="llama", vocab_size=vocab, bos_token_id=ids["bos"],
                eos_token_id=ids["eos"], pad_token_id=ids["pad"])
    return dict(vision_config=dict(VISION), text_config=text, scale_factor=TOP["scale_factor"],
                image_token_id=ids["image"], pad_token_id=ids["pad"], tie_word_embeddings=False)


def encode_rows(processor, rows: list[dict], eou: int) -> list[Encoded]:
    """Processor outputs computed once per row: the training set is cached as tensors."""
    from PIL import Image
    import io

    out, frames = [], {}  # rows of one image share its frames tensor (memory: ~60 KB per image)
    for r in rows:
        image = Image.open(io.BytesIO(r["image"]))
        prompt = assets.chat_text(r["question"])
        enc = processor(text=[prompt], images=[[image]], add_special_tokens=False, return_tensors="pt")
        answer = r["answers"][0]
        target = processor.tokenizer(" " + answer, add_special_tokens=False)["input_ids"] + [eou]
        pixels = frames.setdefault(r["image"], enc["pixel_values"][0])
        out.append(Encoded(enc["input_ids"][0].tolist(), target, pixels, answer))
    return out


def train_batch(items: list[Encoded], pad: int) -> dict[str, torch.Tensor]:
    """Right-padded batch; labels only on the answer tokens (and the closing <end_of_utterance>)."""
    length = max(len(e.prompt) + len(e.target) for e in items)
    ids = torch.full((len(items), length), pad)
    labels = torch.full((len(items), length), -100)
    mask = torch.zeros((len(items), length), dtype=torch.long)
    for i, e in enumerate(items):
        seq = e.prompt + e.target
        ids[i, :len(seq)] = torch.tensor(seq)
        labels[i, len(e.prompt):len(seq)] = torch.tensor(e.target)
        mask[i, :len(seq)] = 1
    pixel_values = torch.cat([e.frames for e in items])  # flat (n_frames, 3, m, m): every frame is real
    return dict(input_ids=ids, attention_mask=mask, labels=labels, pixel_values=pixel_values[None])


def init_weights(model: torch.nn.Module, std: float = 0.02) -> None:
    """Small normal init for every matrix (PyTorch's defaults give N(0, 1) embeddings: too large)."""
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Embedding)):
            torch.nn.init.normal_(module.weight, std=std)
            if getattr(module, "bias", None) is not None:
                torch.nn.init.zeros_(module.bias)


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * progress))


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def train(model, data: list[Encoded], steps: int, batch_size: int, lr: float, pad: int, seed: int,
          probe=None, probe_every: int = 0) -> None:
    """AdamW with warmup + cosine; `probe(step)` (a held-out evaluation) every `probe_every` steps."""
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    order: list[int] = []
    model.train()
    start, running = time.time(), None
    for step in range(steps):
        if len(order) < batch_size:
            order += rng.sample(range(len(data)), len(data))
        batch = to_device(train_batch([data[i] for i in order[:batch_size]], pad), model.device)
        del order[:batch_size]
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup=min(100, steps // 10))
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step:5d}  loss {running:.4f}  lr {opt.param_groups[0]['lr']:.2e}  "
                  f"{time.time() - start:6.0f}s", flush=True)
        if probe and probe_every and (step + 1) % probe_every == 0 and step + 1 < steps:
            model.eval()
            probe(step + 1)
            model.train()
    model.eval()


@torch.no_grad()
def greedy_answers(model, items: list[Encoded], pad: int, stops: set[int], max_new: int = 48) -> list[list[int]]:
    """Greedy answers through the model's `generate` (left-padded prompts, KV cache)."""
    length, device = max(len(e.prompt) for e in items), model.device
    ids = torch.tensor([[pad] * (length - len(e.prompt)) + e.prompt for e in items], device=device)
    mask = (ids != pad).long()
    n_frames = max(len(e.frames) for e in items)
    pixel_values = torch.zeros(len(items), n_frames, *items[0].frames.shape[1:])
    for i, e in enumerate(items):
        pixel_values[i, :len(e.frames)] = e.frames
    out = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixel_values.to(device),
                         max_new_tokens=max_new, do_sample=False, eos_token_id=sorted(stops), pad_token_id=pad)
    return [[t for t in row if t != pad] for row in out[:, length:].tolist()]


def question_kind(question: str) -> str:
    return "caption" if question in shapes.CAPTION_PROMPTS else " ".join(question.split()[:2])


def evaluate(model, items: list[Encoded], rows: list[dict], tokenizer, pad: int, stops: set[int],
             batch_size: int = 64, show: int = 12) -> float:
    """Greedy exact-match (stripped, lower-cased) over `items`; prints misses and accuracy per kind."""
    hits: dict[str, list[bool]] = {}
    shown = 0
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        for e, r, gen in zip(chunk, rows[start:], greedy_answers(model, chunk, pad, stops)):
            text = tokenizer.decode(gen, skip_special_tokens=True).strip()
            ok = text.lower() == e.answer.lower()
            hits.setdefault(question_kind(r["question"]), []).append(ok)
            if not ok and shown < show:
                print(f"  miss: {r['question']!r} -> {text!r} (expected {e.answer!r})")
                shown += 1
    print("  " + ", ".join(f"{k}: {sum(v) / len(v):.2f}" for k, v in sorted(hits.items())))
    return sum(sum(v) for v in hits.values()) / len(items)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="demo/model")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=7e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--train-images", type=int, default=None, help="fewer training images (quick runs)")
    ap.add_argument("--focus-images", type=int, default=0,
                    help="extra training images asked only where/count questions (shapes.focus_rows)")
    ap.add_argument("--focus-kinds", nargs="+", default=list(shapes.FOCUS_KINDS[:4]), choices=shapes.FOCUS_KINDS,
                    help="which questions the focus images are asked (default: all)")
    ap.add_argument("--focus-only", action="store_true", help="train on the focus rows alone (no base mix)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--init-from", default=None, help="start from this saved checkpoint instead of scratch")
    ap.add_argument("--set", nargs="*", default=[], metavar="vision.KEY=VALUE",
                    help="override a model size, e.g. text.num_hidden_layers=6 vision.patch_size=4")
    ap.add_argument("--heldout-rows", type=int, default=None, help="evaluate on the first N held-out rows")
    ap.add_argument("--eval-every", type=int, default=0, help="also evaluate on the held-out rows every N steps")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    apply_overrides(args.set)
    Config, Model, ours = backends()
    out = Path(args.out)
    t0 = time.time()
    train_rows = shapes.build_split("train")
    if args.train_images:
        train_rows = [r for r in train_rows if int(r["id"].split("-")[1]) < args.train_images]
    heldout_rows = shapes.build_split("heldout")[:args.heldout_rows]
    ids = write_assets(out, train_rows)  # tokenizer from the base rows only: --init-from stays valid
    if args.focus_only:
        train_rows = []
    train_rows += shapes.focus_rows(args.focus_images, tuple(args.focus_kinds))
    processor, processor_kind = load_processor(out)
    train_data = encode_rows(processor, train_rows, ids["eou"])
    heldout = encode_rows(processor, heldout_rows, ids["eou"])
    print(f"encoded {len(train_data)} train / {len(heldout)} held-out rows in {time.time() - t0:.0f}s "
          f"(model: {'ours' if ours else 'transformers'}, processor: {processor_kind})", flush=True)
    cfg = config_dict(ids)
    if args.init_from:  # continue training a saved demo checkpoint (same tokenizer: same corpus)
        model = Model.from_pretrained(args.init_from)
    else:
        model = Model(Config.from_dict(cfg) if ours else Config(**cfg))
        init_weights(model)
    model.to(args.device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"parameters: {n_params / 1e6:.2f}M", flush=True)
    t1 = time.time()
    stops = {ids["eou"], ids["eos"]}

    def probe(step: int) -> None:
        em = evaluate(model, heldout, heldout_rows, processor.tokenizer, ids["pad"], stops, show=0)
        print(f"step {step}: held-out exact-match {em:.4f}", flush=True)

    train(model, train_data, args.steps, args.batch_size, args.lr, ids["pad"], args.seed, probe, args.eval_every)
    print(f"trained {args.steps} steps in {time.time() - t1:.0f}s", flush=True)
    model.save_pretrained(out)
    em = evaluate(model, heldout, heldout_rows, processor.tokenizer, ids["pad"], stops)
    print(f"held-out exact-match {em:.4f} on {len(heldout)} rows; total {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
