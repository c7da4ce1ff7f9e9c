"""The project's own prompt sets, generated deterministically (no external data needed).

``python -m rtdmd.data.builtin --out data/prompts [--params params/data.yaml]`` writes, in the
reference layout (data_and_eval.md §1):

==================  ==========================================  ===================================
dataset             files                                        what
==================  ==========================================  ===================================
mini_geneval        train_metadata.jsonl, test_metadata.jsonl    GenEval-style compositional prompts
                                                                 from the COCO-80 names: all six tags
mini_geneval2       train.jsonl, test.jsonl                      GenEval2-style prompts + vqa_list
mini_ocr            train.txt, test.txt                          short scenes with one quoted text
mini_general        train.txt, test.txt                          general subject/setting/style
                                                                 prompts (cold-start training)
mini_drawbench      test.txt                                     ~60 hand-written DrawBench-like
                                                                 challenge prompts
toy2d               train.txt, test.txt                          the toy2d class names (one prompt
                                                                 per class, same in both splits)
digits              train.txt, test.txt                          digit prompts: every phrasing of
                                                                 0-9 (train), one per digit (test)
==================  ==========================================  ===================================

Everything here was written for this project (templates, word lists, the hand-written prompts);
nothing is copied from an upstream benchmark. Train and test are disjoint by construction (OCR
train and test also use disjoint quoted phrases). The output is a pure function of the
``builtin`` params (seed and sizes): same params, byte-identical files.
"""
from __future__ import annotations

import argparse
import random
import shutil
import sys
import uuid
from pathlib import Path

from rtdmd.backbones import digits_data
from rtdmd.data import formats, schema
from rtdmd.data.params import BuiltinParams, load_data_params

COUNT_WORDS = ("one", "two", "three", "four")
RELATIONS = schema.GENEVAL_RELATIONS
COLORS = schema.GENEVAL_COLORS

_PLURAL = {
    "person": "people",
    "bus": "buses",
    "bench": "benches",
    "sheep": "sheep",
    "skis": "skis",
    "knife": "knives",
    "sandwich": "sandwiches",
    "couch": "couches",
    "wine glass": "wine glasses",
    "computer mouse": "computer mice",
    "scissors": "scissors",
    "toothbrush": "toothbrushes",
    "broccoli": "broccoli",
    "tv": "tvs",
}
# Classes that can sensibly carry a verb in GenEval2-style prompts.
ANIMATE = ("person", "bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe")
VERBS = ("sitting", "running", "sleeping", "jumping", "standing", "walking")


def plural(name: str) -> str:
    return _PLURAL.get(name, name + "s")


def article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def a(word: str) -> str:
    return f"{article(word)} {word}"


# ----------------------------------------------------------------------------- GenEval style
def _geneval_one(tag: str, rng: random.Random, classes: tuple[str, ...]) -> dict:
    def two():
        x, y = rng.sample(classes, 2)
        return x, y

    if tag == "single_object":
        c = rng.choice(classes)
        return {"tag": tag, "include": [{"class": c, "count": 1}], "prompt": f"a photo of {a(c)}"}
    if tag == "two_object":
        x, y = two()
        return {"tag": tag, "include": [{"class": x, "count": 1}, {"class": y, "count": 1}],
                "prompt": f"a photo of {a(x)} and {a(y)}"}
    if tag == "counting":
        c = rng.choice(classes)
        n = rng.randint(1, 4)
        noun = c if n == 1 else plural(c)
        return {"tag": tag, "include": [{"class": c, "count": n}], "exclude": [{"class": c, "count": n + 1}],
                "prompt": f"a photo of {COUNT_WORDS[n - 1]} {noun}"}
    if tag == "colors":
        c, col = rng.choice(classes), rng.choice(COLORS)
        return {"tag": tag, "include": [{"class": c, "count": 1, "color": col}], "prompt": f"a photo of {a(col)} {c}"}
    if tag == "position":
        x, y = two()
        rel = rng.choice(RELATIONS)
        return {"tag": tag,
                "include": [{"class": y, "count": 1}, {"class": x, "count": 1, "position": [rel, 0]}],
                "prompt": f"a photo of {a(x)} {rel} {a(y)}"}
    if tag == "color_attr":
        x, y = two()
        c1, c2 = rng.sample(COLORS, 2)
        return {"tag": tag,
                "include": [{"class": x, "count": 1, "color": c1}, {"class": y, "count": 1, "color": c2}],
                "prompt": f"a photo of {a(c1)} {x} and {a(c2)} {y}"}
    raise ValueError(tag)


def geneval_sets(p: BuiltinParams) -> tuple[list[dict], list[dict]]:
    """(train, test): per tag, unique prompts; the first ``test_per_tag`` go to test."""
    rng = random.Random(f"geneval:{p.seed}")
    classes = schema.coco80()
    train, test = [], []
    for tag in schema.GENEVAL_TAGS:
        want = p.geneval_train_per_tag + p.geneval_test_per_tag
        seen: dict[str, dict] = {}
        for _ in range(want * 200):
            if len(seen) == want:
                break
            row = _geneval_one(tag, rng, classes)
            seen.setdefault(row["prompt"], row)
        if len(seen) < want:
            raise ValueError(f"cannot draw {want} distinct {tag} prompts")
        rows = list(seen.values())
        test += rows[: p.geneval_test_per_tag]
        train += rows[p.geneval_test_per_tag:]
    # Interleave tags (file order matters for the first-N eval cap: mixed tags, as the reference).
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


# ----------------------------------------------------------------------------- GenEval2 style
_REL_TEXT = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}


def _geneval2_one(rng: random.Random, classes: tuple[str, ...]) -> dict:
    subj = rng.choice(ANIMATE if rng.random() < 0.5 else classes)
    n = rng.randint(1, 4)
    color = rng.choice(COLORS) if rng.random() < 0.6 else None
    verb = rng.choice(VERBS) if subj in ANIMATE and rng.random() < 0.7 else None
    second = rng.choice([c for c in classes if c != subj]) if rng.random() < 0.8 else None
    color2 = rng.choice(COLORS) if second and rng.random() < 0.5 else None
    rel = rng.choice(RELATIONS) if second and rng.random() < 0.7 else None

    noun = subj if n == 1 else plural(subj)
    be, the = ("Is", f"the {noun}") if n == 1 else ("Are", f"the {noun}")
    words = [COUNT_WORDS[n - 1] if n > 1 else article(color or subj)]
    words += [color] if color else []
    words.append(noun)
    if verb:
        words.append(verb)
    vqa = [[f"Are there any {plural(subj)}?", "Yes"], [f"How many {plural(subj)} are there?", COUNT_WORDS[n - 1]]]
    skills = ["object", "count"]
    if color:
        vqa.append([f"{be} {the} {color}?", "Yes"])
        skills.append("attribute")
    if verb:
        vqa.append([f"{be} {the} {verb}?", "Yes"])
        skills.append("verb")
    if second:
        obj2 = f"{color2} {second}" if color2 else second
        words.append((_REL_TEXT[rel] + " " if rel else "and ") + a(obj2))
        vqa.append([f"Are there any {plural(second)}?", "Yes"])
        skills.append("object")
        if color2:
            vqa.append([f"Is the {second} {color2}?", "Yes"])
            skills.append("attribute")
        if rel:
            vqa.append([f"{be} {the} {_REL_TEXT[rel]} the {second}?", "Yes"])
            skills.append("position")
    prompt = " ".join(words)
    return {"prompt": prompt, "atom_count": len(vqa), "vqa_list": vqa, "skills": skills}


def geneval2_sets(p: BuiltinParams) -> tuple[list[dict], list[dict]]:
    rng = random.Random(f"geneval2:{p.seed}")
    classes = schema.coco80()
    want = p.geneval2_train + p.geneval2_test
    seen: dict[str, dict] = {}
    for _ in range(want * 200):
        if len(seen) == want:
            break
        row = _geneval2_one(rng, classes)
        if row["atom_count"] >= 3:  # the official benchmark has 3..10 atoms per prompt
            seen.setdefault(row["prompt"], row)
    rows = list(seen.values())
    return rows[p.geneval2_test:], rows[: p.geneval2_test]


# ----------------------------------------------------------------------------- OCR style
OCR_TEMPLATES = (
    'a hand-painted wooden sign by a country road that reads "{t}"',
    'a glowing neon sign above a bar door spelling "{t}"',
    'a ceramic coffee mug printed with the words "{t}"',
    'a cafe chalkboard menu with "{t}" written in white chalk',
    'a vintage poster on a brick wall with the headline "{t}"',
    'a birthday cake decorated with icing that says "{t}"',
    'a street protest placard held up high reading "{t}"',
    'a movie theater marquee announcing "{t}"',
    'a cotton t-shirt with "{t}" printed across the chest',
    'a paperback book cover titled "{t}"',
    'a highway billboard at sunset showing "{t}"',
    'a sticky note on a laptop screen saying "{t}"',
    'a shop window decal in gold letters: "{t}"',
    'a child\'s drawing with the crayon caption "{t}"',
    'a graffiti mural on a train car spelling "{t}"',
    'an embroidered pillow with the phrase "{t}"',
)
OCR_PHRASES_TRAIN = (
    "Open Late", "Fresh Bread Daily", "Welcome Home", "No Parking", "Good Vibes Only", "Hello World",
    "Free Wifi Inside", "Lost Cat", "Summer Sale", "Keep Calm", "Mind the Gap", "Best Coffee in Town",
    "Gone Fishing", "Happy Birthday Mia", "Back in Five", "Stay Curious", "The Last Chapter",
    "Sunrise Diner", "Rock and Roll", "Quiet Please", "Under Construction", "Trust the Process",
    "Moon Bakery", "Exit Only", "Save the Bees", "Night Owl", "Cold Drinks", "Pizza Palace",
    "Ride Safe", "Dream Big",
)
OCR_PHRASES_TEST = (
    "Grand Opening", "Closed on Sunday", "Salt and Pepper", "Think Different", "Blue Harbor",
    "Do Not Disturb", "Hot Soup Today", "Green Valley Farm", "Made with Love", "Caution Wet Floor",
    "Starlight Cinema", "Vote Tomorrow", "Bike Repair", "Pancake House", "Hold the Door",
    "Rainy Day Books", "Call Me Maybe", "Lemonade 50 Cents", "Into the Woods", "Happy Trails",
)


def _ocr(rng: random.Random, phrases: tuple[str, ...], n: int) -> list[str]:
    pool = [t.format(t=ph) for ph in phrases for t in OCR_TEMPLATES]
    if n > len(pool):
        raise ValueError(f"asked for {n} OCR prompts, only {len(pool)} combinations")
    return rng.sample(pool, n)


def ocr_sets(p: BuiltinParams) -> tuple[list[str], list[str]]:
    rng = random.Random(f"ocr:{p.seed}")
    return _ocr(rng, OCR_PHRASES_TRAIN, p.ocr_train), _ocr(rng, OCR_PHRASES_TEST, p.ocr_test)


# ----------------------------------------------------------------------------- general
GENERAL_SUBJECTS = (
    "a red fox", "an old lighthouse", "a tiny robot", "a cup of matcha tea", "a sleeping kitten",
    "a steam locomotive", "a bowl of ramen", "a hot air balloon", "a knight in silver armor",
    "a koi pond", "a vintage typewriter", "a snowy owl", "a glass greenhouse", "a street musician",
    "a paper boat", "a giant sunflower", "an astronaut", "a wooden cabin", "a jellyfish",
    "a city tram", "a stack of pancakes", "a grand piano", "a mountain goat", "a lantern festival",
    "a sailboat", "a bonsai tree", "a fire-breathing dragon", "a bicycle courier", "a desert cactus",
    "a chess board",
)
GENERAL_SETTINGS = (
    "on a foggy morning", "under a starry sky", "in a bustling market", "at golden hour",
    "beside a frozen lake", "in a rainy alley", "on a sunny beach", "in an overgrown garden",
    "on a kitchen table", "in a snowy forest", "on a rooftop at night", "in a quiet library",
    "at the edge of a cliff", "inside a cozy living room", "in a field of wildflowers",
    "floating in outer space", "in a neon-lit city", "next to a waterfall", "in autumn leaves",
    "on a windowsill",
)
GENERAL_STYLES = (
    "watercolor painting", "studio photograph", "oil painting", "pencil sketch", "35mm film photo",
    "isometric 3d render", "ukiyo-e woodblock print", "pixel art", "cinematic lighting",
    "children's book illustration", "low-poly render", "macro photograph", "impressionist painting",
    "claymation still", "art deco poster", "charcoal drawing",
)


def general_sets(p: BuiltinParams) -> tuple[list[str], list[str]]:
    rng = random.Random(f"general:{p.seed}")
    want = p.general_train + p.general_test
    pool = len(GENERAL_SUBJECTS) * len(GENERAL_SETTINGS) * len(GENERAL_STYLES)
    if want > pool:
        raise ValueError(f"asked for {want} general prompts, only {pool} combinations")
    seen: dict[str, None] = {}
    while len(seen) < want:
        s, where, style = rng.choice(GENERAL_SUBJECTS), rng.choice(GENERAL_SETTINGS), rng.choice(GENERAL_STYLES)
        seen.setdefault(f"{s} {where}, {style}", None)
    rows = list(seen)
    return rows[p.general_test:], rows[: p.general_test]


# ----------------------------------------------------------------------------- DrawBench-like
# Written for this project: short challenge prompts in the spirit of DrawBench's categories
# (colours, counting, spatial relations, text, rare words, unusual combinations, long
# descriptions, misspellings, conflicting attributes).
DRAWBENCH_LIKE = (
    "a green banana next to a yellow cucumber",
    "a purple giraffe eating leaves from a blue tree",
    "an orange traffic cone on top of a white refrigerator",
    "a black umbrella and a pink suitcase in the rain",
    "a brown teddy bear wearing a red scarf",
    "three cups of coffee on a wooden table",
    "five birds sitting on a power line",
    "two dogs and one cat sharing a blanket",
    "seven colorful balloons tied to a mailbox",
    "four apples arranged in a square",
    "a laptop to the left of a potted plant",
    "a clock above a fireplace",
    "a cat hiding below a dining table",
    "a bicycle leaning to the right of a red door",
    "a bowl of soup in front of a stack of books",
    'a storefront sign that says "Bakery"',
    'a road sign reading "Slow Down"',
    'a notebook with "Ideas" written on the cover',
    'a flag with the word "Peace" on it',
    'a cake with "Congrats" written in blue icing',
    "an axolotl swimming in an aquarium",
    "a pangolin curled up on a rock",
    "a narwhal breaching in icy water",
    "a quokka smiling at the camera",
    "a tardigrade under a microscope, scientific illustration",
    "a horse riding an astronaut",
    "a fish flying over a mountain range",
    "a snowman relaxing on a tropical beach",
    "a teapot made of clouds",
    "a library inside a giant seashell",
    "a small yellow house with a round blue door, two square windows, a chimney with smoke, and a garden of tulips",
    "an elderly woman with silver hair reading a newspaper on a park bench while pigeons gather at her feet",
    "a busy train station at rush hour with commuters, a large analog clock and sunlight through glass ceilings",
    "a cozy reading nook with a knitted blanket, a mug of cocoa and rain on the window",
    "a mountain village at dusk with lanterns strung between wooden houses",
    "a photo of a elefant standing in the savana",
    "a bowl of spagetti with meatbals",
    "a girafe next to a zebbra",
    "a portrait of a bulldog wearing sunglases",
    "a bycicle parked beside a fountian",
    "a square wheel on a race car",
    "a transparent wooden chair",
    "a dry waterfall pouring sand",
    "a hot snowball in a frying pan",
    "a round cube on a triangular table",
    "a red cube on top of a blue sphere",
    "a triangle inside a circle inside a square",
    "a white cat and a black dog facing each other",
    "a tall thin vase beside a short wide bowl",
    "a pair of red shoes under a green chair",
    "an oil painting of a lighthouse in a storm",
    "a pencil sketch of a hummingbird",
    "a pixel art castle on a hill",
    "a low-poly fox in a forest",
    "a watercolor of a city skyline at night",
    "a close-up of a dewdrop on a spider web",
    "an aerial view of a winding river through a forest",
    "a reflection of mountains in a still lake",
    "a silhouette of a tree against a full moon",
    "a shadow of a cat on a sunlit wall",
)


# ----------------------------------------------------------------------------- toy2d
# The class names of the toy2d backbone (rtdmd.backbones.toy2d.CLASS_NAMES; a test keeps them in
# sync). Written here so data/prompts is complete without importing the backbone layer.
TOY2D_CLASSES = ("ring", "square", "triangle")


# ----------------------------------------------------------------------------- writer
def build(out: str | Path, p: BuiltinParams) -> dict[str, int]:
    """Write all sets under ``out`` (atomically: temp dir + rename). Returns line counts."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    gv_train, gv_test = geneval_sets(p)
    g2_train, g2_test = geneval2_sets(p)
    ocr_train, ocr_test = ocr_sets(p)
    gen_train, gen_test = general_sets(p)
    assert len(set(DRAWBENCH_LIKE)) == len(DRAWBENCH_LIKE)
    files = {
        "mini_geneval/train_metadata.jsonl": (formats.write_geneval_jsonl, gv_train),
        "mini_geneval/test_metadata.jsonl": (formats.write_geneval_jsonl, gv_test),
        "mini_geneval2/train.jsonl": (formats.write_geneval2_jsonl, g2_train),
        "mini_geneval2/test.jsonl": (formats.write_geneval2_jsonl, g2_test),
        "mini_ocr/train.txt": (formats.write_text, ocr_train),
        "mini_ocr/test.txt": (formats.write_text, ocr_test),
        "mini_general/train.txt": (formats.write_text, gen_train),
        "mini_general/test.txt": (formats.write_text, gen_test),
        "mini_drawbench/test.txt": (formats.write_text, list(DRAWBENCH_LIKE)),
        "toy2d/train.txt": (formats.write_text, list(TOY2D_CLASSES)),
        "toy2d/test.txt": (formats.write_text, list(TOY2D_CLASSES)),
        "digits/train.txt": (formats.write_text, digits_data.all_prompts()),
        "digits/test.txt": (formats.write_text, digits_data.eval_prompts()),
    }
    counts = {}
    try:
        for rel, (writer, rows) in files.items():
            writer(tmp / rel, rows)
            counts[rel] = len(rows)
        (tmp / "README.md").write_text(_readme(p, counts), encoding="utf-8")
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            out.rename(old)
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return counts


def _readme(p: BuiltinParams, counts: dict[str, int]) -> str:
    lines = [
        "# Built-in prompt sets (generated; do not edit by hand)",
        "",
        "Generated by `python -m rtdmd.data.builtin --out data/prompts` (DVC stage `builtin_prompts`)",
        f"with seed {p.seed}. Written for this project (Apache-2.0, like the repository); no upstream",
        "benchmark text is included. See `rtdmd/data/builtin.py` for the templates.",
        "",
        "| file | prompts |",
        "|---|---|",
    ]
    lines += [f"| `{rel}` | {n} |" for rel, n in counts.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rtdmd.data.builtin", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output directory (e.g. data/prompts)")
    ap.add_argument("--params", default=None, help="params file with a `builtin` section (params/data.yaml)")
    args = ap.parse_args(argv)
    params = load_data_params(args.params).builtin
    counts = build(args.out, params)
    print(f"wrote {sum(counts.values())} prompts in {len(counts)} files under {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
