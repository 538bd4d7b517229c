"""Captions for labelled motion: natural paraphrases of (content, style) in HumanML3D's text format.

The templates live in one readable file, ``caption_templates.json`` beside this module. Each clip gets
``count`` distinct captions drawn from every phrasing of its (content, style) pair, seeded by the clip id
(the same clip always gets the same captions). A line of ``texts/ID.txt`` is ``caption#tokens#start#end``
with tokens ``word/POS`` and start = end = 0.0 (the caption covers the whole clip), as in HumanML3D.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

TEMPLATES_FILE = Path(__file__).with_name("caption_templates.json")


@lru_cache(maxsize=4)
def load_templates(path: Path = TEMPLATES_FILE) -> dict[str, Any]:
    """The caption templates (see the file's ``about``)."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def label_key(label: str) -> str:
    """A label's template key: without Bandai's dataset prefix (``dataset-2_walk`` -> ``walk``), aliases resolved
    (``masculinity`` -> ``masculine``)."""
    key = re.sub(r"^dataset-\d+_", "", label.strip())
    return load_templates()["aliases"].get(key, key)


def stable_seed(text: str) -> int:
    """A seed that is the same in every process and Python version (unlike ``hash``)."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")


def phrasings(content: str, style: str, templates: dict[str, Any] | None = None) -> list[list[str]]:
    """Every caption the templates can make for (content, style), one list per sentence form.

    Raises ValueError for a content or style the templates do not know.
    """
    t = templates or load_templates()
    content, style = label_key(content), label_key(style)
    if content not in t["contents"]:
        raise ValueError(f"no caption templates for content {content!r}; add it to {TEMPLATES_FILE.name}")
    if style not in t["styles"]:
        raise ValueError(f"no caption templates for style {style!r}; add it to {TEMPLATES_FILE.name}")
    slots = {"subject": t["styles"][style]["subjects"], "neutral": t["neutral"],
             "manner": t["styles"][style]["manners"], "action": t["contents"][content]}
    forms = []
    for sentence in t["sentences"]:
        texts = [sentence]
        for slot, values in slots.items():
            if "{" + slot + "}" in sentence:
                texts = [x.replace("{" + slot + "}", v) for x in texts for v in values]
        forms.append(list(dict.fromkeys(re.sub(r"\s+", " ", x).strip() for x in texts)))
    return forms


def tokens(caption: str, templates: dict[str, Any] | None = None) -> str:
    """HumanML3D-style ``word/POS`` tokens (lower-case words; POS from the templates' small lexicon)."""
    t = templates or load_templates()
    lexicon = {w: pos for pos, words in t["pos"].items() for w in words}
    verbs = {a.split()[0] for actions in t["contents"].values() for a in actions}
    words = re.findall(r"[a-z][a-z'-]*", caption.lower())
    tagged = []
    for w in words:
        pos = "VERB" if w in verbs or w.endswith("ing") else lexicon.get(w, "NOUN")
        tagged.append(f"{w}/{pos}")
    return " ".join(tagged)


def make_captions(clip_id: str, content: str, style: str, count: int = 4) -> list[str]:
    """``count`` distinct captions for a clip, taken in turn from each sentence form, seeded by its id."""
    rng = random.Random(stable_seed(clip_id))
    forms = [rng.sample(texts, len(texts)) for texts in phrasings(content, style)]
    picked: list[str] = []
    while len(picked) < count and any(forms):
        for texts in forms:
            if texts and len(picked) < count:
                picked.append(texts.pop())
    return picked


def caption_lines(captions: list[str]) -> str:
    """The text of ``texts/ID.txt``: one ``caption#tokens#0.0#0.0`` line per caption."""
    return "".join(f"{c}#{tokens(c)}#0.0#0.0\n" for c in captions)


def parse_caption_file(text: str) -> list[dict[str, Any]]:
    """Parse a HumanML3D ``texts/ID.txt``: [{caption, tokens, start, end}]; ValueError on a malformed line."""
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("#")
        if len(parts) != 4:
            raise ValueError(f"line {n}: expected 'caption#tokens#start#end', got {line!r}")
        caption, toks, start, end = parts
        start_f, end_f = float(start or 0.0), float(end or 0.0)
        out.append({"caption": caption, "tokens": toks.split(), "start": start_f, "end": end_f})
    return out
