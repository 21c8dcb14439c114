"""Synthetic two-speaker conversations from espeak-ng, for training without a real corpus.

Each conversation is a stereo WAV at the codec's sample rate with one speaker per channel, the
layout hertz-dev's two-channel transformer trains on. Two distinct espeak-ng voices take turns
with gaps, sometimes talk over each other, and the listener drops short backchannels ("mm-hmm",
"yeah") while the other talks. Text comes from a small built-in grammar, so no corpus is needed.
Everything follows from a seed: the same seed gives the same text, voices, timing and samples.

    python -m hertz_agents.train.synth --out data/synth --train 300 --val 16

espeak-ng is a formant synthesizer: this data teaches turn-taking and channel behaviour, not
natural voice quality.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
from tqdm import tqdm

from hertz_agents.timing import SAMPLE_RATE

ESPEAK = "espeak-ng"

# --- the grammar ---------------------------------------------------------------------------------
# A template is filled slot by slot; every slot draws from its list. Topics keep the two sides of
# a conversation loosely on the same subject, so questions get plausible answers.

# fmt: off
SLOTS: dict[str, tuple[str, ...]] = {
    "name": ("Anna", "Ben", "Carla", "David", "Elena", "Frank", "Grace", "Hassan", "Irene",
             "James", "Kenji", "Laura", "Miguel", "Nora", "Oscar", "Priya", "Quentin", "Rosa",
             "Sam", "Tara"),
    "place": ("the office", "the station", "the airport", "the market", "the library", "downtown",
              "the clinic", "the hotel", "the park", "my sister's place", "the garage", "the bank"),
    "day": ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday",
            "tomorrow", "next week", "the weekend", "tonight", "this afternoon"),
    "time": ("eight", "nine thirty", "ten", "eleven fifteen", "noon", "two", "three forty five",
             "four", "six", "seven thirty"),
    "number": ("two", "three", "four", "five", "six", "ten", "twelve", "fifteen", "twenty",
               "forty"),
    "thing": ("the package", "the invoice", "my laptop", "the tickets", "the keys", "the report",
              "the new phone", "the contract", "the printer", "the order", "the camera",
              "the bill"),
    "food": ("pizza", "noodles", "a salad", "soup", "sandwiches", "curry", "tacos", "sushi",
             "pasta"),
    "past": ("weekend", "day", "trip", "morning", "holiday", "week", "evening"),
    "adj": ("great", "strange", "busy", "quiet", "expensive", "cheap", "slow", "fine", "terrible",
            "lovely", "complicated", "easy"),
    "verb": ("check", "fix", "send", "cancel", "move", "confirm", "pick up", "look at", "change"),
    "weather": ("raining", "sunny", "freezing", "really windy", "cloudy", "hot", "snowing"),
}

# Each topic: questions (q), statements (s) and answers (a). A turn after a question answers it.
TOPICS: dict[str, dict[str, tuple[str, ...]]] = {
    "appointment": {
        "q": ("Could we {verb} the meeting to {day}?", "Is {time} on {day} any good for you?",
              "Did {name} say anything about {day}?", "What time works best for you?",
              "Should I book the room at {place}?"),
        "s": ("I have a meeting at {place} around {time}.", "{day} is pretty {adj} for me.",
              "I told {name} we would be there by {time}.", "Let me just look at my calendar.",
              "I can probably move things around on {day}."),
        "a": ("Yes, {day} at {time} works.", "No, {day} is no good, sorry.",
              "I think {time} would be fine.", "Maybe, let me ask {name} first."),
    },
    "support": {
        "q": ("Have you tried to {verb} {thing}?", "When did you first notice the problem?",
              "Can you read me the number on {thing}?", "Is it still doing that now?",
              "Did you get an email about {thing}?"),
        "s": ("I called about {thing} last {day}.", "The screen keeps going {adj} after a minute.",
              "It worked fine until {day}.", "I already restarted it {number} times.",
              "{name} said someone would {verb} it for me."),
        "a": ("Yes, I did that twice.", "No, not yet.", "It started on {day}, I think.",
              "The number is {number} {number} {number}.", "It stopped for a bit, then came back."),
    },
    "food": {
        "q": ("Do you want to get {food} tonight?", "Have you been to the new place near {place}?",
              "How many people are coming?", "Should I order {food} for everyone?",
              "Is {name} still vegetarian?"),
        "s": ("I had {food} for lunch, so maybe not that.", "The place near {place} is {adj}.",
              "We need enough for about {number} people.", "{name} is bringing dessert.",
              "I could cook {food} if you want."),
        "a": ("Sure, {food} sounds good.", "About {number}, I think.",
              "No, let's try somewhere else.", "I think so, yes.",
              "Honestly, anything is fine with me."),
    },
    "travel": {
        "q": ("What time does your flight land?", "Do you need a ride from {place}?",
              "Is it {weather} over there?", "How long are you staying?",
              "Did you remember {thing}?"),
        "s": ("The train from {place} was {adj} today.", "I land around {time} on {day}.",
              "It has been {weather} all week here.", "I'm staying for {number} days.",
              "{name} is picking me up from {place}."),
        "a": ("Around {time}, if it's on time.", "That would be {adj}, thanks.",
              "No, it's actually {weather}.", "Just until {day}.", "Oh no, I forgot {thing}."),
    },
    "chat": {
        "q": ("How was your {past}?", "Did you talk to {name}?",
              "Are you still working at {place}?", "What are you doing on {day}?",
              "Have you seen the news?"),
        "s": ("Work has been really {adj} lately.", "I saw {name} at {place} the other day.",
              "We went to {place} and it was {adj}.", "I've been meaning to call you for ages.",
              "It's been {weather} here all morning."),
        "a": ("Pretty {adj}, to be honest.", "Yes, we spoke on {day}.", "Not much, just resting.",
              "Nothing special, really.", "No, what happened?"),
    },
}

FILLERS = ("Well,", "So,", "Um,", "Oh,", "Actually,", "Right,", "Okay,", "You know,")
# Backchannels: text, or espeak phoneme input in [[ ]] where the spelling would be read as letters.
BACKCHANNELS = ("[[m@m'h@m]]", "yeah", "right", "okay", "uh huh", "hmm", "sure", "I see",
                "oh really")
# fmt: on


def _fill(template: str, rng: random.Random) -> str:
    out = template
    while "{" in out:
        start = out.index("{")
        end = out.index("}", start)
        out = out[:start] + rng.choice(SLOTS[out[start + 1 : end]]) + out[end + 1 :]
    return out[0].upper() + out[1:]


def _turn_text(topic: str, kind: str, rng: random.Random) -> list[str]:
    """One turn: 1 to 3 sentences, ending in the turn's `kind` (q, s or a)."""
    table = TOPICS[topic]
    sentences = [_fill(rng.choice(table["s"]), rng) for _ in range(rng.choice((0, 0, 1, 1, 2)))]
    sentences.append(_fill(rng.choice(table[kind]), rng))
    if rng.random() < 0.3:
        sentences[0] = rng.choice(FILLERS) + " " + sentences[0][0].lower() + sentences[0][1:]
    return sentences


# --- voices --------------------------------------------------------------------------------------

ACCENTS = ("en-us", "en", "en-gb-x-rp", "en-gb-scotland", "en-029", "en-us-nyc", "en-gb-x-gbclan")
MALE_VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "Andy", "adam", "john", "max", "paul")
FEMALE_VARIANTS = ("f1", "f2", "f3", "f4", "f5", "Annie", "anika", "Alicia", "belinda", "linda")


@dataclass(frozen=True)
class Speaker:
    """One espeak-ng voice, with the settings that make it distinct."""

    voice: str  # espeak-ng voice, e.g. "en-us+f2"
    pitch: int  # -p, 0..99
    speed: int  # -s, words per minute
    amplitude: int  # -a, 0..200
    gain_db: float  # applied to the channel after synthesis

    @staticmethod
    def sample(rng: random.Random, female: bool, avoid: str = "") -> Speaker:
        """Draw a random espeak voice of the given sex, other than the variant ``avoid``."""
        variants = [v for v in (FEMALE_VARIANTS if female else MALE_VARIANTS) if v != avoid]
        voice = f"{rng.choice(ACCENTS)}+{rng.choice(variants)}"
        pitch = rng.randint(40, 80) if female else rng.randint(15, 55)
        return Speaker(
            voice, pitch, rng.randint(140, 200), rng.randint(80, 140), rng.uniform(-8.0, 0.0)
        )


def synthesize(text: str, speaker: Speaker) -> np.ndarray:
    """Speak `text` with espeak-ng; returns float32 mono at SAMPLE_RATE, silence trimmed, `[N]`."""
    cmd = [
        ESPEAK,
        "--stdout",
        "-v",
        speaker.voice,
        "-p",
        str(speaker.pitch),
        "-s",
        str(speaker.speed),
        "-a",
        str(speaker.amplitude),
        text,
    ]
    wav = subprocess.run(cmd, check=True, capture_output=True).stdout
    # espeak-ng streams its WAV with placeholder chunk sizes; libsndfile reads to the end anyway.
    audio, rate = sf.read(io.BytesIO(wav), dtype="float32")
    audio = soxr.resample(audio, rate, SAMPLE_RATE)
    loud = np.flatnonzero(np.abs(audio) > 1e-3)  # espeak pads with silence; timing is ours to set
    if loud.size == 0:
        return audio[:0]
    return np.ascontiguousarray(audio[loud[0] : loud[-1] + 1]) * 10 ** (speaker.gain_db / 20)


# --- conversations -------------------------------------------------------------------------------


@dataclass
class Utterance:
    """One stretch of speech on one channel, in samples at SAMPLE_RATE."""

    speaker: int  # channel: 0 or 1
    start: int
    end: int
    text: str
    kind: str  # "turn" or "backchannel"


@dataclass
class Conversation:
    """A generated conversation: the audio and how it was made."""

    audio: np.ndarray  # [2, N] float32, channel k is speaker k
    speakers: tuple[Speaker, Speaker]
    utterances: list[Utterance] = field(default_factory=list)
    topic: str = ""
    seed: int = 0

    def overlaps(self) -> list[tuple[Utterance, Utterance]]:
        """Pairs of utterances from different speakers that sound at the same time."""
        pairs = []
        for i, a in enumerate(self.utterances):
            for b in self.utterances[i + 1 :]:
                if a.speaker != b.speaker and a.start < b.end and b.start < a.end:
                    pairs.append((a, b))
        return pairs


def conversation_seed(seed: int, split: str, index: int) -> int:
    """A stable per-file seed, independent of worker count and generation order."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{split}/{index}".encode()).digest()[:8], "little")


def make_conversation(seed: int, seconds: tuple[float, float] = (20.0, 40.0)) -> Conversation:
    """Generate one conversation; the same seed always gives the same samples.

    Args:
        seed: Drives text, voices, timing and length.
        seconds: Range the target length is drawn from. Turns are added until the next one would
            run past the target, so a conversation ends up to one turn short of it; there are
            always at least two turns, one per speaker, even past the target.
    """
    rng = random.Random(seed)
    sr = SAMPLE_RATE
    target = int(rng.uniform(*seconds) * sr)
    first_female = rng.random() < 0.5
    a = Speaker.sample(rng, first_female)
    b = Speaker.sample(rng, rng.random() < 0.5, avoid=a.voice.split("+")[1])
    speakers = (a, b)
    topic = rng.choice(sorted(TOPICS))
    clips: list[tuple[Utterance, np.ndarray]] = []
    backchannel_cache: dict[tuple[int, str], np.ndarray] = {}

    who = rng.randint(0, 1)
    t = int(rng.uniform(0.2, 1.0) * sr)
    kind, turns = "q", 0
    while True:
        sentences = _turn_text(topic, kind, rng)
        parts = [synthesize(s, speakers[who]) for s in sentences]
        pauses = [int(rng.uniform(0.15, 0.5) * sr) for _ in parts[1:]]
        length = sum(len(p) for p in parts) + sum(pauses)
        if turns >= 2 and t + length > target:
            break
        turn = np.zeros(length, np.float32)
        pos, boundaries = 0, []
        for part, pause in zip(parts, pauses + [0], strict=True):
            turn[pos : pos + len(part)] = part
            pos += len(part) + pause
            boundaries.append(pos - pause)
        clips.append((Utterance(who, t, t + length, " ".join(sentences), "turn"), turn))
        turns += 1

        # The listener backchannels inside long turns, at a sentence end or mid-sentence.
        listener = 1 - who
        for _ in range(rng.choice((0, 1, 1, 2)) if length > 1.5 * sr else 0):
            word = rng.choice(BACKCHANNELS)
            key = (listener, word)
            if key not in backchannel_cache:
                backchannel_cache[key] = synthesize(word, speakers[listener])
            clip = backchannel_cache[key]
            at = (
                rng.choice(boundaries[:-1])
                if len(boundaries) > 1 and rng.random() < 0.5
                else rng.randint(int(0.5 * sr), max(int(0.5 * sr), length - int(0.5 * sr)))
            )
            start = t + at + int(rng.uniform(-0.1, 0.2) * sr)
            clips.append((Utterance(listener, start, start + len(clip), word, "backchannel"), clip))

        # Next turn: a gap, or (one time in four) a start over the end of this one.
        if rng.random() < 0.25:
            t += length - int(min(rng.uniform(0.2, 0.9) * sr, length // 2))
        else:
            t += length + int(rng.uniform(0.1, 1.2) * sr)
        kind = "a" if kind == "q" else rng.choice(("q", "q", "s"))
        who = listener

    # Backchannels of the listener must not collide with each other or its own turns.
    kept: list[tuple[Utterance, np.ndarray]] = []
    for utt, clip in sorted(clips, key=lambda c: (c[0].kind != "turn", c[0].start)):
        same = [u for u, _ in kept if u.speaker == utt.speaker]
        if utt.kind == "turn" or all(
            utt.end + sr // 10 <= u.start or u.end + sr // 10 <= utt.start for u in same
        ):
            kept.append((utt, clip))
    kept.sort(key=lambda c: c[0].start)

    end = max(u.end for u, _ in kept) + int(rng.uniform(0.3, 1.0) * sr)
    audio = np.zeros((2, end), np.float32)  # ends after the last word, not padded to the target
    for utt, clip in kept:
        audio[utt.speaker, utt.start : utt.end] += clip
    np.clip(audio, -1.0, 1.0, out=audio)
    return Conversation(audio, speakers, [u for u, _ in kept], topic, seed)


def write_conversation(conv: Conversation, path: Path) -> None:
    """Write `path` (16-bit stereo WAV) and its timeline beside it (`.json`), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "seed": conv.seed,
        "topic": conv.topic,
        "sample_rate": SAMPLE_RATE,
        "speakers": [asdict(s) for s in conv.speakers],
        "utterances": [asdict(u) for u in conv.utterances],
    }
    # Hidden temporary names: an interrupted run leaves nothing a dataset scan would pick up.
    tmp_json = path.with_name(f".{path.stem}.json.tmp")
    tmp_json.write_text(json.dumps(meta, indent=1))
    os.replace(tmp_json, path.with_suffix(".json"))
    tmp_wav = path.with_name(f".{path.name}.tmp")
    sf.write(tmp_wav, conv.audio.T, SAMPLE_RATE, subtype="PCM_16", format="WAV")
    os.replace(tmp_wav, path)  # the WAV last: its presence means the pair is complete


# --- a corpus ------------------------------------------------------------------------------------


def _generate_one(job: tuple[Path, int, tuple[float, float]]) -> float:
    path, seed, seconds = job
    conv = make_conversation(seed, seconds)
    write_conversation(conv, path)
    return conv.audio.shape[1] / SAMPLE_RATE


def generate_corpus(
    out_dir: str | os.PathLike[str],
    n_train: int,
    n_val: int,
    seed: int = 0,
    workers: int = 1,
    seconds: tuple[float, float] = (20.0, 40.0),
) -> dict[str, list[Path]]:
    """Write `out_dir/train/conv_NNNNN.wav` and `out_dir/val/conv_NNNNN.wav`, resumably.

    Files already present are kept, so an interrupted run picks up where it stopped. File k of
    a split is the same whatever the worker count or the order of generation.

    Args:
        out_dir: Corpus root.
        n_train: Conversations in `train/`.
        n_val: Conversations in `val/`.
        seed: Corpus seed; train and val draw from different per-file seeds.
        workers: Processes running espeak-ng (1 keeps a shared machine responsive).
        seconds: Range of conversation lengths.

    Returns:
        The WAV paths of each split, present and new.
    """
    if shutil.which(ESPEAK) is None:
        raise RuntimeError("espeak-ng not found: install it (apt-get install espeak-ng)")
    root = Path(out_dir)
    paths: dict[str, list[Path]] = {}
    jobs = []
    for split, count in (("val", n_val), ("train", n_train)):  # val first: small, needed early
        paths[split] = [root / split / f"conv_{i:05d}.wav" for i in range(count)]
        jobs += [
            (p, conversation_seed(seed, split, i), seconds)
            for i, p in enumerate(paths[split])
            if not p.exists()
        ]
    done = n_train + n_val - len(jobs)
    bar = tqdm(total=n_train + n_val, initial=done, unit="conv", desc=f"synth {root}")
    audio_seconds, started = 0.0, time.perf_counter()
    if workers <= 1:
        for s in map(_generate_one, jobs):
            audio_seconds += s
            bar.update()
    else:
        with get_context("spawn").Pool(workers) as pool:
            for s in pool.imap_unordered(_generate_one, jobs):
                audio_seconds += s
                bar.update()
    bar.close()
    if jobs:
        took = time.perf_counter() - started
        print(
            f"wrote {len(jobs)} conversations, {audio_seconds / 3600:.2f} h of audio in {took:.0f} "
            f"s ({took / len(jobs):.2f} s each, {audio_seconds / took:.0f}x real time)",
            file=sys.stderr,
        )
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: `python -m hertz_agents.train.synth --out data/synth --train 300 --val 16`."""
    p = argparse.ArgumentParser(
        prog="hertz_agents.train.synth", description=(__doc__ or "").split("\n\n")[0]
    )
    p.add_argument("--out", required=True, help="corpus root; writes OUT/train and OUT/val")
    p.add_argument("--train", type=int, default=300, help="training conversations")
    p.add_argument("--val", type=int, default=16, help="validation conversations")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1, help="parallel espeak-ng processes")
    p.add_argument("--min-seconds", type=float, default=20.0)
    p.add_argument("--max-seconds", type=float, default=40.0)
    args = p.parse_args(argv)
    generate_corpus(
        args.out,
        args.train,
        args.val,
        seed=args.seed,
        workers=args.workers,
        seconds=(args.min_seconds, args.max_seconds),
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
