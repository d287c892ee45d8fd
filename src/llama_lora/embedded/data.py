"""A seeded generator of small Alpaca-format instruction data sets.

Two disjoint sets of task families:

* FINETUNE_TASKS: what the offline quickstart fine-tunes on. Answers are checkable by
  exact string match, and inputs are short so that a tiny model learns them in minutes.
* PRETRAIN_TASKS: used only to pre-train the embedded base model. They teach the chat
  format, character handling (copying, case, positions, digits) and the families' skills
  under other instructions or notations, never a fine-tune family itself, so a fine-tune
  visibly teaches something new: to follow new instructions with skills the base has.

Everything is driven by ``random.Random(seed)``: same seed -> same records.
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Callable, Sequence
from pathlib import Path

# Short common words; random letter strings are mixed in so the space of inputs is large.
WORDS = """
able acid aged also area army away baby back ball band bank base bath bear beat bell
belt best bird blow blue boat body bone book born boss both bowl burn bush busy cake
call calm camp card care cart case cash cast cell chat chip city clay club coal coat
code cold cook cool copy core corn cost crew crop dark data date dawn deal dear deep
desk diet dirt dish door dose down draw drop drum duck dust duty earn east easy edge
else even ever face fact fair fall farm fast fear feed feel file fill film find fine
fire firm fish five flag flat flow food foot form fort four free frog fuel full fund
gain game gate gift girl give glad goal gold golf good gray grow hair half hall hand
hard harm head hear heat help hero high hill hold hole home hope horn host hour huge
idea iron item jazz join joke jump jury just keep kind king kiss knee lady lake lamp
land lane last late lead leaf left lens life lift line lion list live load loan lock
long look loud love luck mail main make male mall many mark mask meal meat milk mind
mine miss mode moon more most move much must name navy near neck need nest news next
nice nine node none nose note okay once only open oven pace pack page pain pair palm
park part pass past path peak pick pile pine pink pipe plan play plot plus poem pole
pool poor port post pull pump pure push race rain rank rate read real rest rice rich
ride ring rise risk road rock role roof room root rope rose rule rush safe sail salt
sand save seat seed self sell ship shoe shop shot show sick side sign silk sing site
size skin slip slow snow soft soil song soon sort soul soup spin spot star stay step
stop suit sure swim tail take talk tall tank tape task team tell tent term test text
than that then thin tide time tiny tone tool tour town tree trip true tube tune turn
type unit upon used user vast very view vote wage wait wake walk wall want warm wash
wave weak wear week well west wide wife wild will wind wine wing wire wise wish wolf
wood word work yard year zero zone
act age air apple arm art bag bed big box boy bus car cat cow cup cut day dog dry ear
egg end eye fan fly fox fun gas hat hot ice ink jam jar key kid leg lip map mix mud
net oil owl pan pen pet pig pin pot red rug run sad sea sky sun tea toy van war web
anger beach bread brick cabin candy chair chalk cloud coast crane dance dream eagle
earth field flame frost fruit ghost glass grape grass heart honey horse house juice
knife lemon light magic mango metal money mouse music night ocean onion paint paper
party peace piano pizza plant queen radio river robot salad sheep shirt smile snake
space spoon stone storm sugar table tiger toast tooth torch train truck water whale
wheel world zebra bridge butter camera candle carpet castle cherry circle copper
dragon flower forest garden ginger guitar hammer island jacket jungle kitten ladder
letter market mirror monkey orange pencil pepper planet pocket rabbit rocket silver
spider summer tomato tunnel turtle violin window winter yellow balloon blanket cabbage
chicken diamond dolphin feather kitchen lantern library morning oatmeal octopus
penguin picture pumpkin rainbow sandwich teacher thunder tractor unicorn volcano
""".split()
WORDS = [w for w in dict.fromkeys(WORDS) if 3 <= len(w) <= 7]

Record = dict[str, str]
# A task family: phrasings of its instruction and a function rng -> (input, output).
Task = tuple[Sequence[str], Callable[[random.Random], tuple[str, str]]]


def _word(rng: random.Random, lo: int = 3, hi: int = 7) -> str:
    """A real word half of the time, else random lowercase letters (3-7 characters)."""
    if rng.random() < 0.5:
        return rng.choice(WORDS)
    return "".join(rng.choices(string.ascii_lowercase, k=rng.randint(lo, hi)))


def _digits(rng: random.Random) -> str:
    return "".join(rng.choices(string.digits, k=rng.randint(3, 6)))


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = _addends(rng)
    return f"{a} + {b}", str(a + b)


def _addends(rng: random.Random) -> tuple[int, int]:
    """A number below 100 and a digit: 1,000 sums, carries in 45% of them."""
    return rng.randrange(100), rng.randrange(10)


def _plus_in_words(rng: random.Random) -> tuple[str, str]:
    a, b = _addends(rng)
    return f"{a} and {b}", str(a + b)


def _sort(rng: random.Random) -> tuple[str, str]:
    s = _digits(rng)  # digits only: 10 symbols are learnable in minutes, 26 letters much less so
    return s, "".join(sorted(s))


def _upper(rng: random.Random) -> tuple[str, str]:
    w = _word(rng)
    return w, w.upper()


def _reverse(rng: random.Random) -> tuple[str, str]:
    w = _word(rng)
    return w, w[::-1]


FINETUNE_TASKS: dict[str, Task] = {
    "uppercase": (
        ["Uppercase the word.", "Write it in capitals.", "Uppercase:"],
        _upper,
    ),
    "reverse": (
        ["Reverse the word.", "Spell it backwards.", "Reverse:"],
        _reverse,
    ),
    "add": (
        ["Add the numbers.", "What is the sum?", "Sum:"],
        _add,
    ),
    "sort": (
        ["Sort the digits.", "Put the digits in order.", "Sort:"],
        _sort,
    ),
}


def _pre(fn: Callable[[str], str], make: Callable[[random.Random], str] = _word):
    """Adapt a string function into a generator rng -> (input, output)."""

    def gen(rng: random.Random) -> tuple[str, str]:
        x = make(rng)
        return x, fn(x)

    return gen


def _word_or_digits(rng: random.Random) -> str:
    return _word(rng) if rng.random() < 0.75 else _digits(rng)


def _upper_word(rng: random.Random) -> str:
    return _word(rng).upper()


def _number(rng: random.Random) -> str:
    return str(rng.randrange(1, 100))


# Building blocks of the fine-tune families and each family's skill on other inputs or in other
# words, never a family itself: copying, character positions and reversing digit strings (for
# reversing words), case mapping (for uppercase), smallest/largest digit and sorting letters (for
# sorting digits), next/previous number and sums written "12 and 7" (for "12 + 7"). So the base
# has the skills a real pre-trained model has, and a fine-tune teaches it new instructions and
# notations, as instruction tuning does; none of its phrasings is a fine-tune phrasing (the base
# scores 1.5% on the fine-tune families: README, quickstart). Short phrasings: sequence length is
# what the CPU pays for.
PRETRAIN_TASKS: dict[str, Task] = {
    "copy": (["Copy the word.", "Copy:"], _pre(lambda w: w)),
    "lowercase": (["Lowercase the word.", "Lowercase:"], _pre(str.lower, _upper_word)),
    "capitalize": (["Capitalize the word.", "Capitalize:"], _pre(str.capitalize)),
    "first_letter": (["First letter?", "First:"], _pre(lambda w: w[0])),
    "last_letter": (["Last letter?", "Last:"], _pre(lambda w: w[-1])),
    "length": (["How many letters?", "Count the letters."], _pre(lambda w: str(len(w)))),
    "spell": (["Spell it with spaces.", "Spell:"], _pre(" ".join)),
    "join": (["Remove the spaces.", "Join:"], _pre(lambda s: s.replace(" ", ""), lambda r: " ".join(_word(r)))),
    "double": (["Write the word twice.", "Double:"], _pre(lambda w: w + w)),
    "next_number": (["What comes next?", "Next:"], _pre(lambda n: str(int(n) + 1), _number)),
    "previous_number": (["What comes before?", "Previous:"], _pre(lambda n: str(int(n) - 1), _number)),
    "min_digit": (["Smallest digit?", "Smallest:"], _pre(min, _digits)),
    "max_digit": (["Largest digit?", "Largest:"], _pre(max, _digits)),
    "from_the_end": (["Read it from the end.", "From the end:"], _pre(lambda s: s[::-1], _word_or_digits)),
    "smallest_first": (["Arrange from smallest to largest.", "Smallest first:"], _pre(lambda s: "".join(sorted(s)), _digits)),
    "total": (["What do they make together?", "Total:"], _plus_in_words),
}
# The skills closest to a fine-tune family take longest to learn: they get this many shares of the mix.
PRETRAIN_WEIGHTS = {"from_the_end": 2, "smallest_first": 2, "total": 4}

assert not set(FINETUNE_TASKS) & set(PRETRAIN_TASKS), "fine-tune and pre-train families must be disjoint"


def make_record(rng: random.Random, task: str, tasks: dict[str, Task]) -> Record:
    phrasings, gen = tasks[task]
    x, y = gen(rng)
    return {"instruction": rng.choice(phrasings), "input": x, "output": y, "task": task}


def generate_records(n: int, seed: int = 0, tasks: dict[str, Task] = PRETRAIN_TASKS,
                     weights: dict[str, int] | None = None) -> list[Record]:
    """n records cycling over the task families, `weights[name]` times each per cycle (default once);
    duplicates allowed: used for pre-training."""
    rng = random.Random(seed)
    names = [name for name in sorted(tasks) for _ in range((weights or {}).get(name, 1))]
    return [make_record(rng, names[i % len(names)], tasks) for i in range(n)]


def generate_splits(
    seed: int = 0,
    n_train: int = 2000,
    n_validation: int = 200,
    n_test: int = 200,
    tasks: dict[str, Task] = FINETUNE_TASKS,
) -> dict[str, list[Record]]:
    """Train/validation/test splits, balanced over task families.

    Each (task, input) pair appears at most once over all splits, so no test question
    (whatever its phrasing) was seen in training.
    """
    rng = random.Random(seed)
    names = sorted(tasks)
    total = n_train + n_validation + n_test
    seen: set[tuple[str, str]] = set()
    records: list[Record] = []
    attempts = 0
    while len(records) < total:
        attempts += 1
        if attempts > 100 * total:
            raise ValueError(f"cannot draw {total} distinct records from tasks {names}")
        rec = make_record(rng, names[len(records) % len(names)], tasks)
        key = (rec["task"], rec["input"])
        if key not in seen:
            seen.add(key)
            records.append(rec)
    rng.shuffle(records)
    return {
        "train": records[:n_train],
        "validation": records[n_train : n_train + n_validation],
        "test": records[n_train + n_validation :],
    }


def write_jsonl(splits: dict[str, list[Record]], out_dir: str | Path) -> dict[str, Path]:
    """Write ``<split>.jsonl`` files (one record per line) and return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, records in splits.items():
        path = out_dir / f"{name}.jsonl"
        with path.open("w", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        paths[name] = path
    return paths


def to_messages(record: Record) -> list[dict[str, str]]:
    """Render an Alpaca record as a user/assistant chat (the input goes below the instruction)."""
    user = record["instruction"] if not record.get("input") else record["instruction"] + "\n\n" + record["input"]
    return [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]
