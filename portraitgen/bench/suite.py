"""PortraitBench's prompt suite: portrait prompts tagged by category, versioned in the package.

    python -m portraitgen.bench.suite --write portraitgen/bench/data/portraitbench_v1.jsonl   # regenerate v1
    python -m portraitgen.bench.suite --summary                                                # tag counts

A suite is a JSONL file, one prompt per line::

    {"id": "pb1-007", "prompt": "a close-up headshot photo of ...", "categories": ["people:1", "shot:headshot", ...],
     "subsets": ["cpu"]}

- ``id``: unique, stable across versions of the code (it seeds the prompt's start noise, see run.py);
- ``categories``: ``axis:level`` tags; a group photo carries one ``age``/``gender``/``skin`` tag per
  distinct level among its people;
- ``subsets`` (optional): named subsets the prompt belongs to besides ``full`` (every prompt).

``builtin:v1`` is :func:`build_suite_v1`'s output, written once to ``data/portraitbench_v1.jsonl`` and
never changed (a test checks that the file and the function agree; a new suite is a new version). It
crosses the category axes of docs/design.md §6 — shot, age, gender presentation, skin tone, lighting,
setting, one stressor (freckles, wrinkles, glasses, beard, hands near the face, open smile, curly hair,
or none) and the number of people (1, 2 or 3) — into 300 prompts. Levels are assigned greedily: each
prompt takes, axis by axis, the compatible level used least so far (ties broken by a hash of the
prompt's index, axis and level, so no random generator and no library version is involved). The
marginals are therefore balanced up to the compatibility rules (a beard goes with a man, wrinkles with
middle or old age, golden-hour sun with outdoor settings, studio lighting with the studio, a home or an
office). The ``cpu`` subset (22 single portraits, 3 pairs, 3 trios: 28 prompts) is chosen greedily so
that every level of every axis appears in it, as evenly as 28 prompts allow.
"""
from __future__ import annotations

import argparse
import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Sequence


class BenchError(ValueError):
    """PortraitBench input is unusable (suite file, models, reference set, part files)."""


@dataclass(frozen=True)
class SuitePrompt:
    id: str
    prompt: str
    categories: tuple[str, ...]
    subsets: tuple[str, ...] = field(default=())

    @property
    def categories_str(self) -> str:
        """The comma-separated form used in scores.parquet."""
        return ",".join(self.categories)

    def to_json(self) -> str:
        return json.dumps({"id": self.id, "prompt": self.prompt, "categories": list(self.categories),
                           "subsets": list(self.subsets)}, ensure_ascii=False)


# ---------------------------------------------------------------------------------------------- v1
SUITE_V1_SIZE = {1: 240, 2: 36, 3: 24}  # prompts per number of people
CPU_SUBSET = {1: 22, 2: 3, 3: 3}  # prompts per number of people in the cpu subset (28)

SHOTS = {"headshot": "a close-up headshot photo", "half_body": "a half-body portrait photo",
         "full_body": "a full-body photo"}
GROUP_SHOTS = {"half_body": "a half-body group portrait photo", "full_body": "a full-body group photo"}
AGES = {"young_adult": "young", "middle_aged": "middle-aged", "elderly": "elderly"}
GENDERS = {"woman": "woman", "man": "man", "androgynous": "androgynous person"}
SKINS = {"fair": "fair", "olive": "olive", "brown": "brown", "dark": "dark"}
LIGHTS = {"studio": "soft studio lighting", "daylight": "natural daylight", "golden_hour": "warm golden hour sunlight",
          "low_light": "dim evening low light", "backlit": "strong backlight"}
SETTINGS = {"studio": "in a photo studio in front of a plain grey backdrop", "street": "on a city street",
            "home": "in a living room", "office": "in an office", "park": "in a park", "cafe": "in a cafe"}
# A stressor's clause follows "with <skin> skin": "and ..." clauses join that list, ", ..." ones stand alone.
STRESSORS = {"freckles": " and freckles", "wrinkles": " and deep wrinkles", "glasses": ", wearing glasses",
             "beard": " and a full beard", "hands_near_face": ", resting one hand against the cheek",
             "open_smile": ", laughing with an open smile", "curly_hair": " and curly hair", "none": ""}
OUTDOOR = {"street", "park"}  # where golden-hour sun goes
STUDIO_LIT = {"studio", "home", "office"}  # where studio lighting goes
NUMBERS = {2: "two", 3: "three"}


def _tie(*key) -> str:
    return hashlib.sha256(":".join(map(str, key)).encode()).hexdigest()


def _pick(counts: Counter, axis: str, levels, index: int, allowed=lambda level: True) -> str:
    """The allowed level of ``axis`` used least so far (ties: a hash of index, axis, level)."""
    options = [lv for lv in levels if allowed(lv)]
    best = min(options, key=lambda lv: (counts[(axis, lv)], _tie(index, axis, lv)))
    counts[(axis, best)] += 1
    return best


def _person(counts: Counter, index: int, k: int) -> dict[str, str]:
    gender = _pick(counts, "gender", GENDERS, index * 10 + k)
    age = _pick(counts, "age", AGES, index * 10 + k)
    skin = _pick(counts, "skin", SKINS, index * 10 + k)
    return {"gender": gender, "age": age, "skin": skin}


def _stress_allowed(person: dict[str, str]):
    def ok(level: str) -> bool:
        if level == "beard":
            return person["gender"] == "man"
        if level == "wrinkles":
            return person["age"] in ("middle_aged", "elderly")
        return True
    return ok


def _describe(person: dict[str, str], stress: str = "none") -> str:
    adj = AGES[person["age"]]
    article = "an" if adj[0] in "aeiou" else "a"
    return f"{article} {adj} {GENDERS[person['gender']]} with {SKINS[person['skin']]} skin{STRESSORS[stress]}"


def build_suite_v1() -> list[SuitePrompt]:
    """The 300 prompts of PortraitBench v1 (deterministic; see the module docstring)."""
    counts: Counter = Counter()
    rows = []
    index = 0
    for people, n in SUITE_V1_SIZE.items():
        for _ in range(n):
            shots = SHOTS if people == 1 else GROUP_SHOTS
            shot = _pick(counts, "shot", shots, index)
            persons = [_person(counts, index, k) for k in range(people)]
            light = _pick(counts, "light", LIGHTS, index)
            setting = _pick(counts, "setting", SETTINGS, index,
                            lambda s: (s in OUTDOOR) if light == "golden_hour" else
                            (s in STUDIO_LIT) if light == "studio" else True)
            stress = _pick(counts, "stress", STRESSORS, index, _stress_allowed(persons[0]))
            if people == 1:
                subject = _describe(persons[0], stress)
                text = f"{shots[shot]} of {subject}, {SETTINGS[setting]}, {LIGHTS[light]}"
            else:
                described = [_describe(persons[0], stress)] + [_describe(p) for p in persons[1:]]
                who = described[0] + " and " + described[1] if people == 2 else \
                    f"{described[0]}; {described[1]}; and {described[2]}"
                text = f"{shots[shot]} of {NUMBERS[people]} people: {who}, {SETTINGS[setting]}, {LIGHTS[light]}"
            tags = [f"people:{people}", f"shot:{shot}"]
            for axis in ("age", "gender", "skin"):
                tags += [f"{axis}:{lv}" for lv in dict.fromkeys(p[axis] for p in persons)]
            tags += [f"light:{light}", f"setting:{setting}", f"stress:{stress}"]
            rows.append(SuitePrompt(f"pb1-{index:03d}", text, tuple(tags)))
            index += 1
    cpu = set(_balanced_subset(rows, CPU_SUBSET))
    return [SuitePrompt(r.id, r.prompt, r.categories, ("cpu",) if r.id in cpu else ()) for r in rows]


def _balanced_subset(rows: Sequence[SuitePrompt], quota: dict[int, int]) -> list[str]:
    """Greedy: ``quota[k]`` prompts of k people; each step takes the prompt whose levels are rarest in the
    subset so far (per axis, the mean of 1/(1+count)^2 over the prompt's levels, summed over axes, so a
    group photo's several age/gender/skin tags do not outweigh a single portrait's one)."""
    chosen: list[str] = []
    counts: Counter = Counter()
    left = list(rows)
    step = 0
    for people, n in quota.items():
        for _ in range(n):
            def gain(r: SuitePrompt) -> float:
                by_axis: dict[str, list[float]] = {}
                for t in r.categories:
                    by_axis.setdefault(t.split(":")[0], []).append(1.0 / (1 + counts[t]) ** 2)
                return sum(sum(v) / len(v) for v in by_axis.values())

            pool = [r for r in left if f"people:{people}" in r.categories]
            best = max(pool, key=lambda r: (gain(r), _tie(step, r.id)))
            chosen.append(best.id)
            counts.update(best.categories)
            left.remove(best)
            step += 1
    return chosen


# ---------------------------------------------------------------------------------------------- loading
BUILTIN = {"v1": "portraitbench_v1.jsonl"}


def suite_name(source: str, subset: str) -> str:
    """A short label for reports and metrics.json: ``portraitbench-v1/cpu`` or ``<file stem>/<subset>``."""
    name = f"portraitbench-{source.split(':', 1)[1]}" if source.startswith("builtin:") else Path(source).stem
    return f"{name}/{subset}"


def _parse_categories(value, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [v for v in value.split(",") if v.strip()]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BenchError(f"{where}: 'categories' must be a list of 'axis:level' strings "
                         "(or one comma-separated string)")
    tags = tuple(v.strip() for v in value)
    bad = [t for t in tags if t.count(":") != 1 or "," in t or not all(t.split(":"))]
    if bad:
        raise BenchError(f"{where}: category {bad[0]!r} is not of the form 'axis:level'")
    if "all" in tags:
        raise BenchError(f"{where}: 'all' is reserved for the whole suite")
    return tags


def parse_suite(lines: Sequence[str], origin: str) -> list[SuitePrompt]:
    """Rows of a suite file; errors name ``origin`` and the line."""
    out: list[SuitePrompt] = []
    seen: dict[str, int] = {}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{origin}:{n}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BenchError(f"{where}: not valid JSON ({exc.msg})") from None
        if not isinstance(rec, dict):
            raise BenchError(f"{where}: expected a JSON object with id, prompt, categories")
        unknown = sorted(set(rec) - {"id", "prompt", "categories", "subsets"})
        if unknown:
            raise BenchError(f"{where}: unknown field {unknown[0]!r} (fields: id, prompt, categories, subsets)")
        pid, prompt = rec.get("id"), rec.get("prompt")
        if not isinstance(pid, str) or not pid.strip() or not all(c.isalnum() or c in "-_." for c in pid):
            raise BenchError(f"{where}: 'id' must be a non-empty string of letters, digits, '-', '_' or '.' "
                             f"(it names the image files), got {pid!r}")
        if pid in seen:
            raise BenchError(f"{where}: duplicate id {pid!r} (first on line {seen[pid]})")
        seen[pid] = n
        if not isinstance(prompt, str) or not prompt.strip():
            raise BenchError(f"{where}: 'prompt' must be a non-empty string")
        cats = _parse_categories(rec.get("categories", []), where)
        subsets = rec.get("subsets", [])
        if not isinstance(subsets, list) or not all(isinstance(s, str) and s for s in subsets):
            raise BenchError(f"{where}: 'subsets' must be a list of names")
        out.append(SuitePrompt(pid, prompt.strip(), cats, tuple(subsets)))
    if not out:
        raise BenchError(f"{origin}: the suite holds no prompts")
    return out


def load_suite(source: str = "builtin:v1", subset: str = "full") -> list[SuitePrompt]:
    """The prompts of ``bench.suite`` in ``bench.subset`` (``full`` = all), in file order."""
    if source.startswith("builtin:"):
        version = source.split(":", 1)[1]
        if version not in BUILTIN:
            raise BenchError(f"bench.suite: unknown built-in suite {source!r} (available: "
                             f"{', '.join('builtin:' + v for v in BUILTIN)})")
        res = resources.files("portraitgen.bench").joinpath("data", BUILTIN[version])
        rows = parse_suite(res.read_text(encoding="utf-8").splitlines(), f"{source} ({BUILTIN[version]})")
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise BenchError(f"bench.suite: suite file not found: {path}")
        if path.suffix != ".jsonl":
            raise BenchError(f"bench.suite: {path} must be a .jsonl file (id, prompt, categories, subsets)")
        rows = parse_suite(path.read_text(encoding="utf-8").splitlines(), str(path))
    if subset == "full":
        return rows
    picked = [r for r in rows if subset in r.subsets]
    if not picked:
        names = sorted({s for r in rows for s in r.subsets})
        raise BenchError(f"bench.subset: no prompt of {source} is in subset {subset!r} "
                         f"(subsets there: {', '.join(['full', *names])})")
    return picked


def tag_counts(rows: Sequence[SuitePrompt]) -> dict[str, int]:
    return dict(sorted(Counter(t for r in rows for t in r.categories).items()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Write or summarise PortraitBench v1")
    ap.add_argument("--write", metavar="FILE", help="write build_suite_v1() as JSONL")
    ap.add_argument("--summary", action="store_true", help="print tag counts of the full suite and the cpu subset")
    args = ap.parse_args(argv)
    rows = build_suite_v1()
    if args.write:
        Path(args.write).write_text("".join(r.to_json() + "\n" for r in rows), encoding="utf-8")
    if args.summary or not args.write:
        cpu = [r for r in rows if "cpu" in r.subsets]
        full, sub = tag_counts(rows), tag_counts(cpu)
        for tag, n in full.items():
            print(f"{tag:28s} {n:4d} {sub.get(tag, 0):4d}")
        print(f"{'prompts':28s} {len(rows):4d} {len(cpu):4d}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
