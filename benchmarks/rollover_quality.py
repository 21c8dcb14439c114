r"""Validation loss across the rollover point: today's refill against a ring KV cache.

When a call fills the context ``C``, the engine's default ("refill") re-prefills its last
``K = 3C/4`` latents at positions 0..K-1 and goes on; a ring cache instead keeps every key at its
absolute position and drops the oldest, optionally pinning the call's first ``P`` positions (an
attention sink). The two see different context after the first rollover, so this measures what
that does to the model's teacher-forced losses, as ``NextStepObjective`` defines them (ce of the
next FSQ token and GMM nll per dim of the next latent, averaged over both channels), per
position, on long held-out conversations:

* refill: segment ``s`` covers latents ``[s(C-K), s(C-K)+C)`` at positions 0..C-1; a latent is
  scored in the segment that first predicts it past the kept part (as the engine does).
* ring (sink ``P``, 0 for none): one pass over the whole call at absolute positions, query ``i``
  seeing key ``j`` when ``j <= i`` and (``i - j < C - P`` or ``j < P``).

The conversations are the training recipe's espeak-ng ones (``hertz_agents.train.synth``) drawn
from a split name training never used, minutes long instead of 20-40 s; their latents are cached
under ``--cache``. The command behind docs/rollover_quality.json (its defaults; 13 minutes on
one thread of this project's shared 2-core machine, 4 of them making and encoding the calls):

    .venv/bin/python benchmarks/rollover_quality.py --conversations 6 --seconds 540 600 \
        --contexts 128 256 2048 --sinks 4 16 64

It writes the means as JSON (``--json``: overall, before the first rollover, after it, per call,
and each ring's gap to refill with its standard error over calls), the per-position curves as a
picture (``--png``), and prints a table. Before the first rollover every policy sees the same
context, so only the after-rollover gap compares policies; before and after differ in content
(a call opens with easy silence) as well as in context.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hertz_agents.checkpoint import load_model  # noqa: E402
from hertz_agents.model.hertz import HertzModel  # noqa: E402
from hertz_agents.model.resynthesizer import gmm_nll  # noqa: E402
from hertz_agents.timing import SAMPLES_PER_STEP, STEPS_PER_SECOND  # noqa: E402
from hertz_agents.train.ar_trainer import NextStepObjective  # noqa: E402
from hertz_agents.train.latents import codec_fingerprint, encode_audio  # noqa: E402
from hertz_agents.train.small import run_small  # noqa: E402
from hertz_agents.train.synth import (  # noqa: E402
    conversation_seed,
    generate_corpus,
    make_conversation,
)

HELD_OUT_SPLIT = "rollover"  # generate_corpus names its splits "train" and "val"


@dataclass(frozen=True)
class HeldOutCall:
    """One held-out call: its latents and, per channel, each latent's FSQ token and code."""

    seed: int
    latents: Tensor  # [1, N, channels*32]
    tokens: Tensor  # [channels, 1, N]
    codes: Tensor  # [channels, 1, N, qdim]

    @property
    def length(self) -> int:
        """Latents in the call (positions)."""
        return self.latents.shape[1]


def training_seeds() -> set[int]:
    """Per-file seeds of the corpus ``hertz-agents train small`` makes (its own defaults)."""
    corpus_seed = inspect.signature(generate_corpus).parameters["seed"].default
    defaults = inspect.signature(run_small).parameters
    counts = {"train": defaults["synth_train"].default, "val": defaults["synth_val"].default}
    return {conversation_seed(corpus_seed, s, i) for s, n in counts.items() for i in range(n)}


def held_out(
    model: HertzModel, index: int, seconds: tuple[float, float], cache: Path
) -> HeldOutCall:
    """Conversation ``index`` of the held-out split, encoded by the model's codec (cached)."""
    corpus_seed = inspect.signature(generate_corpus).parameters["seed"].default
    seed = conversation_seed(corpus_seed, HELD_OUT_SPLIT, index)
    if seed in training_seeds():
        raise RuntimeError(f"held-out seed {seed} is a training seed")
    key = {"seed": seed, "seconds": list(seconds), "codec": codec_fingerprint(model.codec)}
    path = cache / f"{HELD_OUT_SPLIT}_{index:03d}.pt"
    saved = torch.load(path, weights_only=False) if path.exists() else None
    if saved is not None and saved["key"] == key:
        latents = saved["latents"]
    else:
        audio = torch.from_numpy(make_conversation(seed, seconds).audio)  # [2, samples]
        steps = audio.shape[-1] // SAMPLES_PER_STEP
        latents = encode_audio(model.codec, audio[None, :, : steps * SAMPLES_PER_STEP])
        cache.mkdir(parents=True, exist_ok=True)
        torch.save({"key": key, "latents": latents}, path)
    quantizer = model.resynthesizer.quantizer
    with torch.no_grad():
        coded = [quantizer(ch) for ch in latents.chunk(model.channels, dim=-1)]
    codes = torch.stack([c for c, _ in coded])
    return HeldOutCall(seed, latents, torch.stack([t for _, t in coded]), codes)


@torch.no_grad()
def next_step_losses(
    model: HertzModel, conv: HeldOutCall, start: int, stop: int, visible: Tensor | None
) -> tuple[Tensor, Tensor]:
    """(ce, nll) [stop - start] of queries ``start..stop-1`` run as one window at 0..T-1.

    Query ``i`` predicts latent ``i + 1``; its resynthesizer code is that latent's own (teacher
    forcing, the code ``NextStepObjective`` rolls in), also at the window's last position.
    """
    window = conv.latents[:, start:stop]
    logits = model.ar(window, visible=visible)
    codes = conv.codes[:, :, start + 1 : stop + 1]
    mixtures = model.resynthesizer(window, None, codes=codes, visible=visible)
    targets = conv.latents[:, start + 1 : stop + 1].chunk(model.channels, dim=-1)
    ce, nll = [], []
    for c, target in enumerate(targets):
        token = conv.tokens[c, :, start + 1 : stop + 1]
        ce.append(F.cross_entropy(logits[c].float().transpose(1, 2), token, reduction="none"))
        locs, scales, weights = (p.float() for p in mixtures[c])
        nll.append(gmm_nll(target.float(), (locs, scales, weights)) / target.shape[-1])
    return (sum(ce) / len(ce))[0], (sum(nll) / len(nll))[0]  # type: ignore[index]


def check_against_objective(model: HertzModel, conv: HeldOutCall, length: int) -> float:
    """Largest gap between :func:`next_step_losses` and ``NextStepObjective`` on a window."""
    ce, nll = next_step_losses(model, conv, 0, length, None)
    with torch.no_grad():
        ref_ce, ref_nll, _ = NextStepObjective(model)(conv.latents[:, : length + 1])
    return max(float((ce - ref_ce[0]).abs().max()), float((nll - ref_nll[0]).abs().max()))


def refill_losses(
    model: HertzModel, conv: HeldOutCall, context: int, keep: int
) -> tuple[Tensor, Tensor]:
    """Per-query (ce, nll) [N-1] when the call rolls over by re-prefilling ``keep`` latents."""
    queries, stride = conv.length - 1, context - keep
    ce, nll = torch.empty(queries), torch.empty(queries)
    segment = 0
    while segment == 0 or segment * stride + keep < queries:
        start = segment * stride
        stop = min(start + context, queries)
        first = start if segment == 0 else start + keep  # the kept part was scored before
        seg_ce, seg_nll = next_step_losses(model, conv, start, stop, None)
        ce[first:stop], nll[first:stop] = seg_ce[first - start :], seg_nll[first - start :]
        segment += 1
    return ce, nll


def ring_visible(length: int, context: int, sink: int) -> Tensor:
    """[length, length]: key j visible to query i in a ring of ``context`` with ``sink`` pinned."""
    i, j = torch.arange(length)[:, None], torch.arange(length)[None, :]
    return (j <= i) & ((i - j < context - sink) | (j < sink))


def ring_losses(
    model: HertzModel, conv: HeldOutCall, context: int, sink: int
) -> tuple[Tensor, Tensor]:
    """Per-query (ce, nll) [N-1] with a ring cache: one pass at absolute positions."""
    queries = conv.length - 1
    for rotary in (model.ar.rotary, model.resynthesizer.rotary):
        rotary.extend(queries)  # absolute positions run past the trained table
    return next_step_losses(model, conv, 0, queries, ring_visible(queries, context, sink))


def policy_name(sink: int | None) -> str:
    """The policy's label: refill, ring (no sink) or ring+sinkP."""
    return "refill" if sink is None else ("ring" if sink == 0 else f"ring+sink{sink}")


def summarize(curves: dict[str, list[tuple[Tensor, Tensor]]], context: int) -> dict:
    """Means overall, before the first rollover (queries < C) and after, per policy."""
    out: dict = {}
    refill: dict | None = None  # refill's entry, the baseline of the others
    for name, per_conv in curves.items():
        entry: dict = {}
        for m, metric in enumerate(("ce", "nll")):
            every = torch.cat([pair[m] for pair in per_conv])
            before = torch.cat([pair[m][:context] for pair in per_conv])
            after = torch.cat([pair[m][context:] for pair in per_conv])
            per_call = [float(pair[m][context:].mean()) for pair in per_conv]
            entry[metric] = {
                "overall": float(every.mean()),
                "before": float(before.mean()),
                "after": float(after.mean()),
                "after_per_conversation": per_call,
            }
            if name == "refill":
                continue
            if refill is None:
                raise ValueError("refill must be summarized first")
            base = refill[metric]
            diffs = np.array(per_call) - np.array(base["after_per_conversation"])
            gap = float(after.mean()) - base["after"]
            entry[metric]["after_vs_refill"] = {
                "difference": gap,
                "relative": gap / base["after"],
                "stderr_over_conversations": float(diffs.std(ddof=1) / np.sqrt(len(diffs)))
                if len(diffs) > 1
                else None,
                "conversations_better": int((diffs < 0).sum()),
            }
            refs = curves["refill"]
            entry[metric]["before_max_abs_diff_vs_refill"] = max(
                float((pair[m][:context] - ref[m][:context]).abs().max())
                for pair, ref in zip(per_conv, refs, strict=True)
            )
        if name == "refill":
            refill = entry
        out[name] = entry
    return out


def trailing_mean(values: np.ndarray, width: int) -> np.ndarray:
    """Mean of each position's last ``width`` values (fewer at the start).

    Trailing, not centred: a policy's curve leaves refill's exactly where its context does.
    """
    sums = np.cumsum(np.concatenate(([0.0], values)))
    ends = np.arange(1, len(values) + 1)
    starts = np.maximum(ends - width, 0)
    return (sums[ends] - sums[starts]) / (ends - starts)


def plot(results: dict, curves: dict, png: Path, smooth_seconds: float, trained: int) -> None:
    """Per-position ce and nll per policy, and each policy minus refill, one column per context.

    Per position: the mean over calls (cut to the shortest), then a trailing moving average.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contexts = list(curves)
    fig, axes = plt.subplots(4, len(contexts), figsize=(6 * len(contexts), 12), squeeze=False)
    width = max(1, round(smooth_seconds * STEPS_PER_SECOND))
    minutes = 60 * STEPS_PER_SECOND
    labels = ("ce (nats)", "ce − refill", "nll per dim", "nll − refill")
    for col, context in enumerate(contexts):
        keep = results["contexts"][str(context)]["keep"]
        shortest = min(len(pair[0]) for pair in curves[context]["refill"])
        means = {
            name: [np.mean([pair[m][:shortest].numpy() for pair in per_conv], 0) for m in (0, 1)]
            for name, per_conv in curves[context].items()
        }
        x = np.arange(shortest) / minutes
        for name, (ce, nll) in means.items():
            style = {"color": "black", "linewidth": 1.6} if name == "refill" else {"linewidth": 1}
            base_ce, base_nll = means["refill"]
            for row, values in enumerate((ce, ce - base_ce, nll, nll - base_nll)):
                axes[row, col].plot(x, trailing_mean(values, width), label=name, **style)
        for row, label in enumerate(labels):
            ax = axes[row, col]
            for point in range(context + context - keep, shortest, context - keep):
                ax.axvline(point / minutes, color="0.85", linewidth=0.5)
            ax.axvline(context / minutes, color="black", linestyle="--", linewidth=0.8)
            ax.axvline(trained / minutes, color="tab:purple", linestyle=":", linewidth=0.8)
            ax.set_ylabel(label)
        axes[0, col].set_title(f"C = {context}, K = {keep}")
        axes[-1, col].set_xlabel("minutes into the call")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(
        f"hertz-small, {len(curves[contexts[0]]['refill'])} held-out calls, teacher-forced: "
        f"mean over calls, {smooth_seconds:g} s trailing moving average. Dashed: first rollover; "
        f"grey: later refill rollovers; dotted: training length ({trained} positions)",
        fontsize=9,
    )
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)


def training_positions(model_dir: str) -> int | None:
    """Positions per training sequence of the AR phase, from the checkpoint's recipe."""
    from hertz_agents.checkpoint import resolve_model_dir

    config = json.loads((resolve_model_dir(model_dir)[0] / "config.json").read_text())
    phases = config.get("training", {}).values()
    seconds = [  # the AR phases' recipes: those with an "ar" block (the codec's has none)
        p["config"]["data"]["segment_seconds"]
        for p in phases
        if isinstance(p, dict) and "ar" in p.get("config", {})
    ]
    return int(max(seconds) * STEPS_PER_SECOND) if seconds else None


def main() -> None:
    """Parse the arguments, score every policy on every call, write JSON and picture."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="default")
    p.add_argument("--conversations", type=int, default=6)
    p.add_argument("--seconds", type=float, nargs=2, default=(540.0, 600.0), metavar=("MIN", "MAX"))
    p.add_argument("--contexts", type=int, nargs="+", default=[128, 256, 2048])
    p.add_argument("--sinks", type=int, nargs="+", default=[4, 16, 64])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--smooth-seconds", type=float, default=16.0)
    p.add_argument("--cache", type=Path, default=Path("runs/rollover_quality"))
    p.add_argument("--json", type=Path, default=Path("docs/rollover_quality.json"))
    p.add_argument("--png", type=Path, default=Path("docs/img/rollover_quality.png"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    began = time.perf_counter()

    def progress(text: str) -> None:
        print(f"\r[{time.perf_counter() - began:6.0f} s] {text:<70}", end="", file=sys.stderr)

    model = load_model(args.model, device="cpu", dtype=torch.float32).eval()
    for rotary in (model.ar.rotary, model.resynthesizer.rotary):  # contexts past seq_len
        rotary.extend(max(args.contexts))
    calls = []
    for n in range(args.conversations):
        progress(f"held-out call {n + 1}/{args.conversations}: synthesis and encoding")
        calls.append(held_out(model, n, tuple(args.seconds), args.cache))
    check = check_against_objective(model, calls[0], min(args.contexts))
    sinks = [None, 0, *args.sinks]
    curves: dict[int, dict[str, list]] = {
        c: {policy_name(s): [] for s in sinks} for c in args.contexts
    }
    for context in args.contexts:
        keep = context * 3 // 4  # the Stepper's default
        for n, conv in enumerate(calls):
            for sink in sinks:
                if sink is not None and not sink < context - 1:
                    continue  # a sink that fills the ring leaves no window to slide
                progress(f"C={context} call {n + 1}/{len(calls)} {policy_name(sink)}")
                score = (
                    refill_losses(model, conv, context, keep)
                    if sink is None
                    else ring_losses(model, conv, context, sink)
                )
                curves[context][policy_name(sink)].append(score)
        curves[context] = {k: v for k, v in curves[context].items() if v}
    print(file=sys.stderr)

    trained = training_positions(args.model)
    results = {
        "command": " ".join(["benchmarks/rollover_quality.py", *sys.argv[1:]]),
        "model": args.model,
        "training_sequence_positions": trained,
        "data": {
            "source": "hertz_agents.train.synth.make_conversation, espeak-ng, 2 speakers",
            "seeds": f"conversation_seed(corpus seed, {HELD_OUT_SPLIT!r}, 0..{len(calls) - 1}),"
            " checked against every train and val seed of `hertz-agents train small`",
            "conversations": [
                {"seed": c.seed, "positions": c.length, "seconds": c.length / STEPS_PER_SECOND}
                for c in calls
            ],
        },
        "losses": "NextStepObjective's ce (nats) and nll (per latent dim), mean of 2 channels",
        "check_max_abs_diff_vs_NextStepObjective": check,
        "contexts": {
            str(c): {"keep": c * 3 // 4, "policies": summarize(curves[c], c)} for c in args.contexts
        },
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1) + "\n")
    plot(results, curves, args.png, args.smooth_seconds, trained or 0)
    print(table(results))
    print(f"wrote {args.json} and {args.png} in {time.perf_counter() - began:.0f} s")


def table(results: dict) -> str:
    """A Markdown table of the means, and the gap to refill after the first rollover."""
    lines = [
        "| C | policy | ce before | ce after | Δce after vs refill | nll before | nll after "
        "| Δnll after vs refill |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for context, entry in results["contexts"].items():
        for name, r in entry["policies"].items():
            gaps = []
            for metric in ("ce", "nll"):
                v = r[metric].get("after_vs_refill")
                gaps.append(
                    "" if v is None else f"{v['difference']:+.4f} ({100 * v['relative']:+.2f}%)"
                )
            lines.append(
                f"| {context} | {name} | {r['ce']['before']:.4f} | {r['ce']['after']:.4f} | "
                f"{gaps[0]} | {r['nll']['before']:.4f} | {r['nll']['after']:.4f} | {gaps[1]} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
