"""Builds the embedded demo corpus, deterministically, in the MRAMG-Bench on-disk layout (`generate(out)`).

The command is `python -m m2io_jax.data.demo.generate [--out DIR]` (default: m2io_jax/data/demo/corpus); this
module defines no flags, so that `demo_root()` can build the corpus inside any other command.

Three datasets, each `doc_{name}.jsonl` (array form), `{name}_mqa.jsonl`,
`images_info/{name}_imgs_collection.json` and `images/{NAME}/*.png` (96x96 PNG drawn with PIL):

  demo_web     60 single-image documents: 20 made-up towns with three landmarks each (an object of some
               colour in some scene). Questions: what a landmark looks like (1 image), which landmarks a
               town has (2-3 images, from 2-3 documents, in the answer's order), when it was made (no image).
               A town's other landmarks are the distractors.
  demo_recipe  30 recipes, 6 images each: ingredients, two mixing-bowl stages, cooking (pan, oven or
               tossing), the finished dish, and a plain-serving distractor. Questions: how to make it (4 step
               images, in order), what the finished dish looks like (1), which ingredients go in (1; half the
               recipes) or how long it cooks (no image; the other half).
  demo_manual  12 device manuals (assembly, safety, use, cleaning, troubleshooting and warranty sections;
               14 images each, two or more 256-token chunks per manual). Questions: how to assemble it (4 images in
               order),
               how to switch it on (2), how to clean it (3 of the section's 4 images), what a red light means
               (1), what is in the box (2), how long the warranty lasts (no image). Within a manual, the
               other sections' pictures are the distractors.

Gold answers write `<PIC>` right after the sentence an image illustrates; the k-th `<PIC>` is the k-th entry
of the question's `images_list`. Everything derives from one seeded `random.Random`, so two runs write the
same bytes (`tests/data` checks it).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil

from PIL import Image, ImageDraw

from m2io_jax.data.demo import CORPUS_DIR

SIZE = 96
SEED = 20250808

COLOURS = {
    "red": (214, 39, 40), "orange": (255, 127, 14), "yellow": (240, 210, 30), "green": (44, 160, 44),
    "blue": (31, 119, 180), "purple": (148, 103, 189), "pink": (247, 129, 191), "brown": (140, 86, 75),
    "black": (30, 30, 30), "white": (250, 250, 250), "teal": (23, 190, 207), "grey": (127, 127, 127),
}
SCENES = {
    "meadow": ("on a green meadow under a clear blue sky", (135, 206, 235), (96, 180, 75)),
    "beach": ("on a sandy beach by the sea", (150, 210, 240), (238, 214, 160)),
    "night": ("under a starry night sky", (20, 24, 60), (40, 60, 40)),
    "snow": ("in a snowy field under a grey sky", (190, 195, 205), (245, 245, 250)),
    "desert": ("in a hot orange desert", (250, 200, 120), (214, 140, 60)),
    "city": ("between tall grey buildings in the city", (170, 190, 210), (90, 90, 90)),
}
OBJECTS = ("house", "tree", "boat", "balloon", "car", "fish", "flower", "kite")
SYLLABLES = ("al", "bor", "cal", "dun", "el", "fen", "gar", "hol", "ir", "kes", "lin", "mor", "nor", "os",
             "pem", "quin", "ros", "sel", "tor", "ul", "vel", "wen", "yar", "zan")
TOWN_KINDS = ("harbour town", "mountain village", "market town", "river village", "island town")


@dataclasses.dataclass
class _Writer:
    """Accumulates one dataset and writes it in the MRAMG layout."""

    name: str
    out: str
    docs: list = dataclasses.field(default_factory=list)
    questions: list = dataclasses.field(default_factory=list)
    images: dict = dataclasses.field(default_factory=dict)

    def image(self, name: str, caption: str, picture: Image.Image) -> str:
        rel = f"{name}.png"
        folder = os.path.join(self.out, "images", self.name.upper())
        os.makedirs(folder, exist_ok=True)
        picture.save(os.path.join(folder, rel), format="PNG", optimize=True)
        self.images[name] = {"image_caption": caption, "image_path": rel}
        return name

    def doc(self, doc_id: int, sentences: list[tuple[str, list[str]]]) -> None:
        """sentences: (sentence, images shown right after it)."""
        content = " ".join(s + "<PIC>" * len(imgs) for s, imgs in sentences)
        self.docs.append([doc_id, content, [i for _, imgs in sentences for i in imgs]])

    def question(self, question: str, provenance: list[int], answer: list[tuple[str, list[str]]]) -> None:
        qid = f"{self.name}_{len(self.questions):04d}"
        text = " ".join(s + "<PIC>" * len(imgs) for s, imgs in answer)
        gold = [i for _, imgs in answer for i in imgs]
        self.questions.append({"id": qid, "question": question, "provenance": provenance,
                               "ground_truth": text, "images_list": gold})

    def write(self) -> None:
        with open(os.path.join(self.out, f"doc_{self.name}.jsonl"), "w", encoding="utf-8") as f:
            for d in self.docs:
                f.write(json.dumps(d, ensure_ascii=False) + "\n")
        with open(os.path.join(self.out, f"{self.name}_mqa.jsonl"), "w", encoding="utf-8") as f:
            for q in self.questions:
                f.write(json.dumps(q, ensure_ascii=False) + "\n")
        os.makedirs(os.path.join(self.out, "images_info"), exist_ok=True)
        with open(
            os.path.join(self.out, "images_info", f"{self.name}_imgs_collection.json"), "w", encoding="utf-8"
        ) as f:
            json.dump(self.images, f, ensure_ascii=False, indent=1, sort_keys=True)
            f.write("\n")


# ----------------------------------------------------------------------------------------------- drawing


def _canvas(sky, ground, horizon: int = 62) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    img = Image.new("RGB", (SIZE, SIZE), sky)
    d = ImageDraw.Draw(img)
    d.rectangle([0, horizon, SIZE, SIZE], fill=ground)
    return img, d


def _draw_object(d: ImageDraw.ImageDraw, kind: str, c) -> None:
    dark = tuple(max(0, v - 90) for v in c)
    if kind == "house":
        d.rectangle([28, 44, 68, 76], fill=c, outline=dark)
        d.polygon([(22, 46), (48, 22), (74, 46)], fill=dark)
        d.rectangle([44, 60, 52, 76], fill=(60, 40, 20))
    elif kind == "tree":
        d.rectangle([44, 50, 52, 80], fill=(110, 70, 30))
        d.ellipse([24, 14, 72, 58], fill=c, outline=dark)
    elif kind == "boat":
        d.polygon([(18, 62), (78, 62), (68, 76), (28, 76)], fill=c, outline=dark)
        d.line([(48, 62), (48, 20)], fill=(60, 40, 20), width=3)
        d.polygon([(50, 22), (50, 58), (74, 58)], fill=(245, 245, 245), outline=dark)
    elif kind == "balloon":
        d.ellipse([30, 12, 66, 52], fill=c, outline=dark)
        d.line([(40, 50), (44, 66)], fill=dark)
        d.line([(56, 50), (52, 66)], fill=dark)
        d.rectangle([42, 66, 54, 74], fill=(120, 80, 40))
    elif kind == "car":
        d.rectangle([18, 54, 78, 70], fill=c, outline=dark)
        d.polygon([(30, 54), (36, 42), (60, 42), (66, 54)], fill=c, outline=dark)
        d.ellipse([24, 64, 38, 78], fill=(20, 20, 20))
        d.ellipse([58, 64, 72, 78], fill=(20, 20, 20))
    elif kind == "fish":
        d.ellipse([24, 38, 64, 62], fill=c, outline=dark)
        d.polygon([(62, 50), (80, 38), (80, 62)], fill=dark)
        d.ellipse([32, 44, 38, 50], fill=(0, 0, 0))
    elif kind == "flower":
        d.line([(48, 50), (48, 82)], fill=(40, 130, 40), width=3)
        for dx, dy in ((0, -12), (12, 0), (0, 12), (-12, 0), (8, -8), (8, 8), (-8, 8), (-8, -8)):
            d.ellipse([40 + dx, 30 + dy, 56 + dx, 46 + dy], fill=c, outline=dark)
        d.ellipse([42, 32, 54, 44], fill=(250, 220, 60))
    elif kind == "kite":
        d.polygon([(48, 10), (68, 32), (48, 58), (28, 32)], fill=c, outline=dark)
        d.line([(48, 58), (40, 70), (52, 80), (44, 92)], fill=dark, width=2)


def draw_landmark(kind: str, colour: str, scene: str) -> Image.Image:
    _, sky, ground = SCENES[scene]
    img, d = _canvas(sky, ground)
    if scene == "night":
        for x, y in ((10, 8), (30, 20), (70, 10), (86, 30), (58, 26)):
            d.point([(x, y), (x + 1, y), (x, y + 1)], fill=(255, 255, 200))
    if scene == "city":
        for x0, h in ((0, 30), (76, 40)):
            d.rectangle([x0, 62 - h, x0 + 20, 62], fill=(110, 110, 120))
    _draw_object(d, kind, COLOURS[colour])
    return img


def _plate(d, fill, garnish=None):
    d.ellipse([14, 30, 82, 82], fill=(245, 245, 245), outline=(170, 170, 170))
    d.ellipse([28, 42, 68, 70], fill=fill)
    if garnish:
        for x, y in ((38, 48), (54, 52), (46, 60)):
            d.ellipse([x, y, x + 6, y + 6], fill=garnish)


def draw_recipe_step(stage: str, colours: list, k: int = 0) -> Image.Image:
    """stage: ingredients | bowl | pan | oven | toss | plate | variant; colours: the dish's ingredient colours."""
    img, d = _canvas((235, 225, 205), (170, 120, 80), horizon=70)
    if stage == "ingredients":
        for i, c in enumerate(colours):
            x = 8 + i * (80 // max(1, len(colours)))
            d.ellipse([x, 46, x + 16, 62], fill=c, outline=(60, 60, 60))
    elif stage == "bowl":
        d.chord([16, 30, 80, 86], 0, 180, fill=(200, 200, 220), outline=(90, 90, 110))
        for i, c in enumerate(colours[: max(1, k)]):
            d.ellipse([26 + i * 12, 50 + (i % 2) * 6, 38 + i * 12, 62 + (i % 2) * 6], fill=c)
    elif stage == "pan":
        for x in (30, 44, 58):
            d.polygon([(x, 86), (x + 6, 72), (x + 12, 86)], fill=(255, 120, 0))
        d.ellipse([16, 50, 72, 74], fill=(60, 60, 60))
        d.ellipse([22, 54, 66, 70], fill=colours[0])
        d.rectangle([72, 58, 92, 64], fill=(40, 40, 40))
    elif stage == "oven":
        d.rectangle([14, 14, 82, 86], fill=(90, 90, 95), outline=(30, 30, 30))
        d.rectangle([24, 34, 72, 74], fill=(255, 170, 60))
        d.ellipse([32, 48, 64, 66], fill=colours[0])
    elif stage == "toss":
        d.chord([16, 30, 80, 86], 0, 180, fill=(200, 200, 220), outline=(90, 90, 110))
        for i, c in enumerate(colours):
            d.ellipse([24 + i * 10, 56, 36 + i * 10, 66], fill=c)
        d.line([(30, 20), (46, 60)], fill=(150, 100, 50), width=4)
        d.line([(66, 20), (52, 60)], fill=(150, 100, 50), width=4)
    elif stage == "plate":
        _plate(d, colours[0], colours[-1])
    elif stage == "variant":
        _plate(d, colours[0], None)
        d.rectangle([74, 20, 90, 60], fill=(200, 230, 250), outline=(120, 120, 140))
    return img


def draw_device(parts: list, shown: int, highlight: int | None, exploded: bool = False) -> Image.Image:
    """A device as a stack of coloured parts (base at the bottom); `highlight` gets a thick outline and arrow."""
    img, d = _canvas((242, 242, 245), (210, 210, 215), horizon=84)
    n = len(parts)
    h = 60 // n
    for i in range(shown):
        c = COLOURS[parts[i][1]]
        if exploded:
            x0, y0 = 6 + (i % 2) * 46, 8 + (i // 2) * 26
            d.rectangle([x0, y0, x0 + 38, y0 + 18], fill=c, outline=(40, 40, 40))
            continue
        w = 56 - i * 6
        y1 = 84 - i * h
        d.rectangle([48 - w // 2, y1 - h + 2, 48 + w // 2, y1], fill=c,
                    outline=(0, 0, 0), width=3 if i == highlight else 1)
        if i == highlight:
            d.line([(90, y1 - h // 2), (48 + w // 2 + 4, y1 - h // 2)], fill=(220, 0, 0), width=3)
            d.polygon([(48 + w // 2 + 4, y1 - h // 2 - 5), (48 + w // 2 + 4, y1 - h // 2 + 5),
                       (48 + w // 2 - 3, y1 - h // 2)], fill=(220, 0, 0))
    return img


def draw_icon(kind: str, c=(31, 119, 180)) -> Image.Image:
    """Manual pictures: unplug | open | wipe | rinse | light_red | power | dial | warning."""
    img, d = _canvas((242, 242, 245), (210, 210, 215), horizon=84)
    if kind == "unplug":
        d.rectangle([14, 40, 44, 60], fill=(60, 60, 60))
        d.rectangle([58, 40, 84, 60], fill=(240, 240, 240), outline=(60, 60, 60))
        d.line([(44, 45), (54, 45)], fill=(160, 160, 160), width=3)
        d.line([(30, 20), (66, 76)], fill=(220, 0, 0), width=4)
    elif kind == "open":
        d.rectangle([20, 30, 76, 80], fill=c, outline=(30, 30, 30))
        d.polygon([(20, 30), (76, 30), (88, 12), (32, 12)], fill=(200, 200, 200), outline=(30, 30, 30))
    elif kind == "wipe":
        d.rectangle([20, 40, 76, 80], fill=c, outline=(30, 30, 30))
        d.rectangle([34, 22, 62, 38], fill=(250, 240, 120), outline=(120, 110, 40))
        for x in (36, 48, 60):
            d.arc([x - 6, 8, x + 6, 20], 0, 180, fill=(100, 100, 100), width=2)
    elif kind == "rinse":
        d.rectangle([30, 50, 66, 80], fill=c, outline=(30, 30, 30))
        for x in (38, 48, 58):
            d.ellipse([x - 3, 24, x + 3, 34], fill=(80, 160, 255))
        d.rectangle([36, 8, 60, 16], fill=(160, 160, 170))
    elif kind == "light_red":
        d.rectangle([20, 30, 76, 80], fill=c, outline=(30, 30, 30))
        d.ellipse([40, 44, 56, 60], fill=(230, 0, 0), outline=(80, 0, 0))
        for dx, dy in ((-14, 0), (14, 0), (0, -14)):
            d.line([(48 + dx * 0.7, 52 + dy * 0.7), (48 + dx * 1.3, 52 + dy * 1.3)], fill=(230, 0, 0), width=2)
    elif kind == "power":
        d.rectangle([20, 30, 76, 80], fill=c, outline=(30, 30, 30))
        d.ellipse([36, 42, 60, 66], fill=(250, 250, 250), outline=(0, 0, 0), width=2)
        d.arc([41, 47, 55, 61], -60, 240, fill=(0, 150, 0), width=2)
        d.line([(48, 44), (48, 54)], fill=(0, 150, 0), width=2)
    elif kind == "dial":
        d.rectangle([20, 30, 76, 80], fill=c, outline=(30, 30, 30))
        d.ellipse([34, 40, 62, 68], fill=(60, 60, 60))
        d.line([(48, 54), (58, 44)], fill=(250, 250, 250), width=3)
        for x, y in ((30, 36), (48, 32), (66, 36)):
            d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=(0, 0, 0))
    elif kind == "warning":
        d.polygon([(48, 10), (86, 78), (10, 78)], fill=(250, 210, 0), outline=(0, 0, 0))
        d.rectangle([45, 32, 51, 60], fill=(0, 0, 0))
        d.rectangle([45, 66, 51, 72], fill=(0, 0, 0))
    return img


# ----------------------------------------------------------------------------------------------- datasets


def _town_names(rng: random.Random, n: int) -> list[str]:
    names: list[str] = []
    while len(names) < n:
        name = "".join(rng.sample(SYLLABLES, 2)).capitalize() + rng.choice(
            ("ton", "by", "mere", "ford", "wick", "haven")
        )
        if name not in names:
            names.append(name)
    return names


def build_web(rng: random.Random, out: str, scale: int = 1) -> _Writer:
    w = _Writer("demo_web", out)
    towns = _town_names(rng, 20 * scale)
    doc_id = 1000
    for town in towns:
        kind_of_town = rng.choice(TOWN_KINDS)
        objects = rng.sample(OBJECTS, 3)
        landmarks = []
        for obj in objects:
            colour = rng.choice(list(COLOURS))
            scene = rng.choice(list(SCENES))
            year = rng.randrange(1820, 2015)
            maker = rng.choice(
                ("a local carpenter", "the town council", "a travelling artist", "two sisters", "the school children")
            )
            where, _, _ = SCENES[scene]
            name = w.image(f"web_{doc_id}", f"A {colour} {obj} {where}.", draw_landmark(obj, colour, scene))
            look = f"The {obj} is painted {colour} and stands {where}."
            w.doc(doc_id, [
                (f"{town} is a small {kind_of_town} whose best-known sight is its {colour} {obj}.", []),
                (f"The {obj} was made in {year} by {maker}.", []),
                (look, [name]),
                (f"Visitors to {town} often photograph the {obj} at sunset.", []),
                (f"Local guides tell the story of the {obj} to every group.", []),
            ])
            landmarks.append((doc_id, obj, colour, where, year, maker, name))
            doc_id += 1
        for did, obj, colour, where, year, maker, name in landmarks:
            w.question(rng.choice((f"What does the {obj} in {town} look like?",
                                   f"Can you describe the {obj} of {town}?")), [did], [
                (f"The {obj} of {town} is painted {colour}.", []),
                (f"It stands {where}.", [name]),
                ("Many visitors photograph it at sunset.", []),
            ])
        did, obj, colour, where, year, maker, name = landmarks[rng.randrange(3)]
        w.question(f"When was the {obj} in {town} made, and by whom?", [did],
                   [(f"The {obj} in {town} was made in {year} by {maker}.", [])])
        chosen = rng.sample(landmarks, rng.choice((2, 3)))
        answer = [(f"{town} has several sights worth a visit.", [])]
        for i, (did, obj, colour, where, _, _, name) in enumerate(chosen):
            lead = "First, there is" if i == 0 else ("There is also" if i < len(chosen) - 1 else "Finally, there is")
            answer.append((f"{lead} the {colour} {obj}, which stands {where}.", [name]))
        w.question(f"Which sights can a visitor see in {town}?", [c[0] for c in chosen], answer)
    return w


DISHES = {
    "soup": ("pan", "simmer", "minutes"), "stew": ("pan", "simmer", "minutes"), "curry": ("pan", "simmer", "minutes"),
    "tart": ("oven", "bake", "minutes"), "pie": ("oven", "bake", "minutes"), "bread": ("oven", "bake", "minutes"),
    "pancakes": ("pan", "fry", "minutes"), "omelette": ("pan", "fry", "minutes"), "salad": ("bowl", "toss", "minutes"),
    "risotto": ("pan", "stir", "minutes"),
}
FLAVOURS = {
    "tomato": "red", "pumpkin": "orange", "lemon": "yellow", "spinach": "green", "blueberry": "blue",
    "beetroot": "purple", "mushroom": "brown", "coconut": "white", "raspberry": "pink",
}
EXTRAS = {"onion": "white", "garlic": "white", "carrot": "orange", "pepper": "red", "herbs": "green",
          "butter": "yellow", "cream": "white", "flour": "white", "egg": "yellow", "rice": "white", "cheese": "yellow"}
GARNISH = {"parsley": "green", "chilli": "red", "basil": "green", "pepper flakes": "black", "cream": "white"}


def build_recipe(rng: random.Random, out: str, scale: int = 1) -> _Writer:
    w = _Writer("demo_recipe", out)
    combos = [(f, d) for f in FLAVOURS for d in DISHES]
    rng.shuffle(combos)
    cooks = _town_names(rng, 30 * scale)
    for n, (flavour, dish) in enumerate(combos[:30 * scale]):
        doc_id = 2000 + n
        title = f"{cooks[n]} {flavour} {dish}"
        method, verb, _ = DISHES[dish]
        extras = rng.sample(list(EXTRAS), 3)
        cols = [COLOURS[FLAVOURS[flavour]]] + [COLOURS[EXTRAS[e]] for e in extras]
        garnish = rng.choice(list(GARNISH))
        cols_g = cols + [COLOURS[GARNISH[garnish]]]
        minutes = rng.choice((10, 15, 20, 25, 30, 40, 45, 60))
        pref = f"rcp_{doc_id}"
        img_ing = w.image(f"{pref}_ingredients", f"The ingredients for {title}: {flavour}, {', '.join(extras)}.",
                          draw_recipe_step("ingredients", cols))
        img_mix = w.image(f"{pref}_mix", f"{flavour.capitalize()} and {extras[0]} combined in a mixing bowl.",
                          draw_recipe_step("bowl", cols, 2))
        img_add = w.image(f"{pref}_add", f"All the ingredients of the {dish} together in the bowl.",
                          draw_recipe_step("bowl", cols, 4))
        img_cook = w.image(
            f"{pref}_cook",
            f"The {dish} cooking ({verb}) "
            f"{'in the oven' if method == 'oven' else 'on the stove' if method == 'pan' else 'in the bowl'}.",
            draw_recipe_step(method if method != "bowl" else "toss", cols, 4),
        )
        img_done = w.image(f"{pref}_served", f"The finished {title} on a plate with {garnish}.",
                           draw_recipe_step("plate", cols_g))
        img_var = w.image(f"{pref}_variant", f"A plain serving of {dish} with a glass of water.",
                          draw_recipe_step("variant", cols))
        cook_place = {"oven": "in a hot oven", "pan": "in a pan over medium heat", "bowl": "gently with two spoons"}[
            method
        ]
        w.doc(
            doc_id,
            [
                (
                    f"This is the family recipe for {title}, a {FLAVOURS[flavour]} {dish} "
                    f"from the village of {cooks[n]}.",
                    [],
                ),
                (f"You need {flavour}, {extras[0]}, {extras[1]} and {extras[2]}.", [img_ing]),
                (f"Start by combining the {flavour} with the {extras[0]} in a large bowl.", [img_mix]),
                (f"Add the {extras[1]} and the {extras[2]} and mix everything well.", [img_add]),
                (f"{verb.capitalize()} the mixture {cook_place} for {minutes} minutes.", [img_cook]),
                (f"Serve the {dish} on a warm plate and top it with {garnish}.", [img_done]),
                ("Some people prefer it plain, with just a glass of water on the side.", [img_var]),
                (f"Leftover {dish} keeps for two days in the fridge.", []),
            ],
        )
        w.question(rng.choice((f"How do I make the {title}?", f"What are the steps to cook {title}?")), [doc_id], [
            (f"Combine the {flavour} and the {extras[0]} in a large bowl.", [img_mix]),
            (f"Then add the {extras[1]} and the {extras[2]} and mix well.", [img_add]),
            (f"{verb.capitalize()} it {cook_place} for {minutes} minutes.", [img_cook]),
            (f"Finally, serve it on a warm plate topped with {garnish}.", [img_done]),
        ])
        w.question(f"What does the finished {title} look like?", [doc_id], [
            (f"The finished {title} is served on a warm plate.", []),
            (f"It is topped with {garnish}.", [img_done]),
        ])
        if n % 2 == 0:
            w.question(f"How long does the {title} need to {verb}?", [doc_id],
                       [(f"It needs to {verb} for {minutes} minutes.", [])])
        else:
            w.question(f"Which ingredients go into the {title}?", [doc_id], [
                (f"You need {flavour}, {extras[0]}, {extras[1]} and {extras[2]}.", [img_ing]),
                (f"The dish is topped with {garnish} when served.", []),
            ])
    return w


DEVICES = {
    "desk lamp": ("base", "stem", "arm", "shade"),
    "electric kettle": ("base plate", "body", "handle", "lid"),
    "air purifier": ("stand", "housing", "filter", "top grille"),
    "coffee grinder": ("base", "motor unit", "burr", "hopper"),
    "bookshelf": ("plinth", "bottom shelf", "middle shelf", "top board"),
    "ceiling fan": ("mount", "motor", "blade hub", "light cover"),
    "humidifier": ("base", "tank", "mist nozzle", "cap"),
    "printer": ("tray", "body", "ink cartridge", "cover"),
    "blender": ("motor base", "jug", "blade", "lid"),
    "vacuum cleaner": ("floor head", "tube", "dust bin", "handle"),
    "bird feeder": ("pole", "tray", "seed tube", "roof"),
    "water filter": ("stand", "lower tank", "cartridge", "upper tank"),
}
BRANDS = (
    "Aurora",
    "Brightly",
    "Cobalt",
    "Dawnfield",
    "Everline",
    "Fjordic",
    "Glimmer",
    "Harbin",
    "Iskra",
    "Juniper",
    "Kestrel",
    "Lumo",
)


def build_manual(rng: random.Random, out: str, scale: int = 1) -> _Writer:
    w = _Writer("demo_manual", out)
    titles: set[str] = set()
    for doc_id, (n, (device, parts)) in enumerate(
            ((n, item) for _ in range(scale) for n, item in enumerate(DEVICES.items())), start=3000):
        title = ""
        while not title or title in titles:  # a later round draws a new model code for the same brand
            model = f"{BRANDS[n]} {rng.choice('KLMRSTVX')}-{rng.randrange(10, 99)}"
            title = f"{model} {device}"
        titles.add(title)
        colours = rng.sample([c for c in COLOURS if c not in ("white",)], 4)
        coloured = list(zip(parts, colours))
        warranty = rng.choice((1, 2, 3, 5))
        pref = f"man_{doc_id}"
        body = COLOURS[colours[1]]
        img_box = w.image(
            f"{pref}_contents",
            f"Package contents of the {title}: {', '.join(parts)}.",
            draw_device(coloured, 4, None, exploded=True),
        )
        img_warn = w.image(f"{pref}_warning", f"Warning label on the {title}.", draw_icon("warning"))
        steps = [w.image(f"{pref}_step{i + 1}", f"Assembly step {i + 1}: the {colours[i]} {parts[i]} of the {title}.",
                         draw_device(coloured, i + 1, i)) for i in range(4)]
        clean = [w.image(f"{pref}_clean{i + 1}", cap, draw_icon(kind, body)) for i, (kind, cap) in enumerate((
            ("unplug", f"Unplug the {title} before cleaning."),
            ("open", f"The {parts[3]} of the {title} opened for cleaning."),
            ("wipe", f"Wiping the {parts[1]} of the {title} with a dry cloth."),
            ("rinse", f"Rinsing the {parts[2]} of the {title} under running water."),
        ))]
        img_red = w.image(f"{pref}_redlight", f"The red indicator light of the {title}.", draw_icon("light_red", body))
        img_done = w.image(f"{pref}_assembled", f"The fully assembled {title}.", draw_device(coloured, 4, None))
        img_power = w.image(
            f"{pref}_power", f"The power button on the {parts[1]} of the {title}.", draw_icon("power", body)
        )
        img_dial = w.image(f"{pref}_dial", f"The setting dial of the {title}.", draw_icon("dial", body))
        setting = rng.choice(("low", "medium", "high", "eco", "night"))
        sentences = [
            (f"Thank you for choosing the {title}.", []),
            (f"Please read this manual before you use the {device} for the first time.", [img_warn]),
            (
                f"The box of the {title} contains the {parts[0]}, the {parts[1]}, the {parts[2]} and the {parts[3]}.",
                [img_box],
            ),
            (f"Assembly of the {title}.", []),
            (f"Place the {colours[0]} {parts[0]} on a flat, dry surface.", [steps[0]]),
            (f"Fit the {colours[1]} {parts[1]} onto the {parts[0]} until it clicks.", [steps[1]]),
            (f"Attach the {colours[2]} {parts[2]} to the {parts[1]}.", [steps[2]]),
            (f"Put the {colours[3]} {parts[3]} on top and turn it clockwise to lock it.", [steps[3]]),
            (f"Your {device} is now ready to use.", [img_done]),
            (f"Safety instructions for the {title}.", []),
            (f"Keep the {device} away from children and pets.", []),
            (f"Do not use the {device} near a bath, shower or swimming pool.", []),
            (f"Never cover the {parts[3]} while the {device} is switched on.", []),
            (f"Use only the {parts[2]} supplied by {BRANDS[n]} or an approved replacement.", []),
            (f"Using the {title}.", []),
            (f"Press the power button on the {parts[1]} to switch the {device} on.", [img_power]),
            (f"Turn the dial to choose a setting; {setting} suits most rooms.", [img_dial]),
            ("Press the power button again to switch it off.", []),
            (f"Cleaning the {title}.", []),
            (f"Always unplug the {device} before cleaning it.", [clean[0]]),
            (f"Open the {parts[3]} by turning it anticlockwise.", [clean[1]]),
            (f"Wipe the {parts[1]} with a soft, dry cloth.", [clean[2]]),
            (f"Rinse the {parts[2]} under running water and let it dry completely.", [clean[3]]),
            (f"Troubleshooting the {title}.", []),
            (f"If the indicator light turns red, the {parts[2]} is not seated correctly.", [img_red]),
            (f"Remove the {parts[2]} and attach it again until it clicks.", []),
            (f"If the {device} still does not work, contact customer service.", []),
            ("Warranty.", []),
            (f"The {title} is covered by a {warranty}-year warranty from the date of purchase.", []),
            ("The warranty does not cover damage caused by misuse.", []),
        ]
        w.doc(doc_id, sentences)
        w.question(
            rng.choice((f"How do I assemble the {title}?", f"What are the assembly steps for the {title}?")),
            [doc_id],
            [
                (f"First place the {parts[0]} on a flat, dry surface.", [steps[0]]),
                (f"Next, fit the {parts[1]} onto the {parts[0]} until it clicks.", [steps[1]]),
                (f"Then attach the {parts[2]} to the {parts[1]}.", [steps[2]]),
                (f"Finally, put the {parts[3]} on top and turn it clockwise to lock it.", [steps[3]]),
            ],
        )
        w.question(f"How should I clean the {title}?", [doc_id], [
            (f"Unplug the {device} first.", [clean[0]]),
            (f"Open the {parts[3]} by turning it anticlockwise.", []),
            (f"Wipe the {parts[1]} with a soft, dry cloth.", [clean[2]]),
            (f"Rinse the {parts[2]} under running water and let it dry.", [clean[3]]),
        ])
        w.question(f"What does a red indicator light on the {title} mean?", [doc_id], [
            (f"A red light means the {parts[2]} is not seated correctly.", [img_red]),
            (f"Remove the {parts[2]} and attach it again until it clicks.", []),
        ])
        w.question(f"How do I switch on the {title} and choose a setting?", [doc_id], [
            (f"Press the power button on the {parts[1]} to switch it on.", [img_power]),
            (f"Then turn the dial to choose a setting; {setting} suits most rooms.", [img_dial]),
        ])
        w.question(f"How long is the warranty on the {title}?", [doc_id],
                   [(f"The {title} has a {warranty}-year warranty from the date of purchase.", [])])
        w.question(f"What comes in the box with the {title}?", [doc_id], [
            (f"The box contains the {parts[0]}, the {parts[1]}, the {parts[2]} and the {parts[3]}.", [img_box]),
            ("Read the safety warnings before first use.", [img_warn]),
        ])
    return w


MAX_SCALE = 3
"""The largest `scale`: the recipes use up their 90 flavour-dish pairs at 90 recipes."""


def generate(out: str = CORPUS_DIR, scale: int = 1) -> list[str]:
    """Writes the three demo datasets under `out` (replacing what is there); returns their names.

    `scale` multiplies the towns, recipes and manuals (a later round of manuals gives the same devices new model
    codes): 1 is the embedded corpus (262 questions); the learning experiment (`m2io_jax.experiments.learning`)
    generates a larger one at run time rather than committing it. The same `scale` writes the same bytes.
    """
    if not 1 <= scale <= MAX_SCALE:
        raise ValueError(f"demo corpus scale={scale}: expected 1..{MAX_SCALE}")
    for sub in ("images", "images_info"):
        shutil.rmtree(os.path.join(out, sub), ignore_errors=True)
    os.makedirs(out, exist_ok=True)
    rng = random.Random(SEED)
    names = []
    for build in (build_web, build_recipe, build_manual):
        writer = build(rng, out, scale)
        writer.write()
        names.append(writer.name)
    return names
