"""A synthetic VQAv2-format fixture that exercises every rule of the official metric.

``vqa_fixture(n_questions, seed)`` returns ``(questions, annotations, results)`` in
the official JSON layouts.  The first part of the fixture is a fixed catalogue of
hand-written cases (one or more per normalisation rule, see ``_core_cases``); the
rest is filled with random cases built from the same ingredients.  Everything is
drawn from ``random.Random(seed)`` only, so the output is a pure function of the
arguments.  With the default ``n_questions=120`` every core case is included; a
smaller ``n_questions`` keeps only the first ``n_questions`` core cases.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

# (answer_type, question_type, question, ten human answers, prediction)
Case = tuple[str, str, str, list[str], str]

# Same list (and order) as the official ``punct``.
PUNCTUATION = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-",
    ">", "<", "@", "`", ",", "?", "!",
)
# Characters the official script leaves alone.
NOT_PUNCTUATION = (":", "'", "#", "$", "%", "&", "*", "|", "~", "^")

YES_NO_TYPES = ("is the", "are there", "does the")
NUMBER_TYPES = ("how many", "what number is")
OTHER_TYPES = ("what color is the", "what is the", "what is")


def _answers(*groups: tuple[str, int]) -> list[str]:
    """Ten human answers from (answer, count) groups."""
    out = [answer for answer, count in groups for _ in range(count)]
    if len(out) != 10:
        raise ValueError(f"need 10 answers, got {len(out)}: {groups}")
    return out


def _k_of(answer: str, k: int, filler: tuple[str, ...]) -> list[str]:
    """``k`` copies of ``answer`` and ``10-k`` answers cycled from ``filler``."""
    return [answer] * k + [filler[i % len(filler)] for i in range(10 - k)]


def _core_cases() -> list[Case]:
    yn, num, oth = "yes/no", "number", "other"
    cases: list[Case] = [
        # --- contractions, with and without apostrophe -------------------------
        (yn, "does the", "Does the man look happy?",
         _answers(("don't", 4), ("dont", 3), ("no", 3)), "dont"),
        (yn, "is the", "Is the door open?",
         _answers(("isn't", 2), ("isnt", 1), ("no", 7)), "isnt"),
        (oth, "what is the", "What is the man thinking?",
         _answers(("would've", 2), ("would have", 8)), "wouldve"),
        # "let's" maps to itself; "lets" is not a key so it stays "lets"
        (oth, "what is", "What is written on the sign?",
         _answers(("let's", 1), ("lets", 9)), "Let's"),
        # capitalised keys ("Im") can never match after lower-casing
        (oth, "what is", "What is written on the shirt?",
         _answers(("I'm", 5), ("im", 5)), "Im"),
        # the reverse entry "somebody'd" -> "somebodyd"
        (oth, "what is", "What is the name of the shop?",
         _answers(("somebodyd", 3), ("someone", 7)), "somebody'd"),
        (oth, "what is the", "What is the question on the poster?",
         _answers(("what's", 1), ("whats", 1), ("nothing", 8)), "what's"),
        (oth, "what is", "What is on the banner?",
         _answers(("y'all'll", 4), ("yall'll", 2), ("you all", 4)), "yall'll"),
        (oth, "what is", "What is the slogan?",
         _answers(("don't!", 2), ("don't", 2), ("dont stop", 6)), "DON'T"),
        (oth, "what is the", "What is the time?",
         _answers(("3 o'clock", 3), ("three oclock", 3), ("3", 4)), "three o'clock"),
        (yn, "does the", "Does the dog want to play?",
         _answers(("wont", 3), ("won't", 3), ("no", 4)), "won't"),
        # --- number words --------------------------------------------------
        (num, "how many", "How many dogs are there?",
         _answers(("2", 6), ("two", 4)), "two"),
        (num, "how many", "How many people are in the water?",
         _answers(("0", 3), ("none", 3), ("zero", 2), ("no", 2)), "none"),
        (num, "how many", "How many cars are parked?",
         _answers(("0", 4), ("none", 2), ("1", 4)), "Zero"),
        (num, "how many", "How many birds are flying?",
         _answers(("10", 1), ("ten", 1), ("9", 8)), "Ten"),
        (num, "how many", "How many dogs are on the bed?",
         _answers(("1 dog", 3), ("one dog", 2), ("1", 5)), "one dog"),
        (num, "how many", "How many cats are visible?",
         _answers(("3", 2), ("three", 2), ("four", 3), ("4", 3)), "Four"),
        # number words are NOT mapped when the ten humans agree exactly
        (num, "how many", "How many wheels does the bike have?", ["2"] * 10, "two"),
        (num, "how many", "How many wheels are visible?", ["2"] * 10, "2"),
        # --- articles ------------------------------------------------------
        (oth, "what is", "What is the animal?",
         _answers(("dog", 4), ("a dog", 2), ("the dog", 1), ("puppy", 3)), "A Dog"),
        (oth, "what is the", "What is the man eating?",
         _answers(("apple", 2), ("an apple", 1), ("banana", 7)), "an apple"),
        (oth, "what is the", "What is the woman holding?",
         _answers(("the umbrella", 3), ("umbrella", 2), ("bag", 5)), "The Umbrella"),
        # --- periods -------------------------------------------------------
        (num, "what number is", "What number is on the scale?",
         _answers(("1.5", 3), ("15", 2), ("2", 5)), "1.5"),
        (num, "what number is", "What number is on the jersey?",
         _answers(("2", 4), ("2.", 2), ("3", 4)), "2."),
        (oth, "what is", "What is the last word?",
         _answers(("end", 2), ("the end", 2), ("end.", 1), ("stop", 5)), "The End."),
        (num, "what number is", "What number is on the board?",
         _answers(("3.14", 1), ("pi", 9)), "3.14."),
        # a leading period before a digit is kept
        (num, "what number is", "What number is written?",
         _answers(("0.5", 5), ("half", 5)), ".5"),
        (oth, "what is", "What is the abbreviation?",
         _answers(("eg", 2), ("e.g.", 2), ("for example", 6)), "e.g."),
        # only 32 periods are removed (re.UNICODE passed as ``count``)
        (yn, "is the", "Is the light on?",
         _answers(("no", 6), ("nope", 4)), "no" + "." * 32),
        (yn, "is the", "Is the oven on?",
         _answers(("no", 6), ("nope", 4)), "no" + "." * 40),
        # periods are kept verbatim when the humans agree
        (num, "how many", "How many legs does the table have?", ["4"] * 10, "4."),
        # --- commas --------------------------------------------------------
        (num, "how many", "How many bricks are there?",
         _answers(("1000", 3), ("1,000", 4), ("many", 3)), "1,000"),
        (num, "how many", "How many stars are there?",
         _answers(("1000000", 2), ("1,000,000", 1), ("lots", 7)), "1,000,000"),
        (oth, "what color is the", "What color is the flag?",
         _answers(("red white", 2), ("red, white", 1), ("red,white", 1), ("red", 6)),
         "red , white"),
        # a digit-comma-digit anywhere turns deletion on for ALL marks
        (oth, "what is", "What is the range?",
         _answers(("1000-2000", 4), ("10002000", 1), ("lots", 5)), "1,000-2,000"),
        (oth, "what is", "What is the fraction?",
         _answers(("1 2", 3), ("half", 4), ("1/2", 3)), "1/2"),
        (oth, "what is", "What is the score?",
         _answers(("1,5/2", 2), ("152", 1), ("1 5 2", 2), ("tie", 5)), "1, 5/2"),
        # --- marks outside the list are kept --------------------------------
        (oth, "what is the", "What is the time on the clock?",
         _answers(("10:30", 3), ("1030", 3), ("10 30", 4)), "10:30"),
        (oth, "what is the", "What is the price?",
         _answers(("$5", 2), ("5", 6), ("5 dollars", 2)), "$5"),
        (oth, "what is the", "What is the discount?",
         _answers(("50%", 3), ("50 %", 1), ("half", 6)), "50 %"),
        (oth, "what is", "What is the rank?",
         _answers(("1", 6), ("#1", 4)), "#1"),
        (oth, "what is", "What is the logo?",
         _answers(("at&t", 2), ("at t", 2), ("phone", 6)), "at&t"),
        (oth, "what is", "What is on the keyboard?",
         _answers(("*", 1), ("star", 5), ("asterisk", 4)), "*"),
        # --- newline / tab -------------------------------------------------
        (yn, "is the", "Is the sky clear?",
         _answers(("yes", 7), ("no", 3)), "yes\n"),
        (num, "how many", "How many dogs are running?",
         _answers(("2 dogs", 3), ("2", 5), ("two dogs", 2)), "\ttwo\tdogs\n"),
        (oth, "what color is the", "What color is the car?",
         _answers(("red\tcar", 2), ("red car", 2), ("red", 6)), "red car"),
        # after the clean-up these humans agree -> no further normalisation
        (yn, "is the", "Is the grass green?",
         _answers(("yes", 9), ("yes\n", 1)), "Yes"),
        (yn, "is the", "Is the water blue?",
         _answers(("yes", 8), ("\tyes", 1), (" yes ", 1)), " yes\t"),
        (yn, "are there", "Are there clouds?",
         _answers(("yes", 5), ("no", 5)), "\n"),
        (oth, "what is", "What is the text?",
         _answers(("", 2), ("nothing", 8)), "   "),
        # --- case ----------------------------------------------------------
        (yn, "is the", "Is the cat asleep?",
         _answers(("Yes", 5), ("yes", 4), ("no", 1)), "YES"),
        # case-sensitive comparison when the humans agree
        (yn, "is the", "Is the road wet?", ["Yes"] * 10, "yes"),
        (yn, "is the", "Is the road dry?", ["Yes"] * 10, "Yes"),
        (oth, "what is the", "What is the pet?", ["dog"] * 10, "a dog"),
        (oth, "what is the", "What is the animal on the sofa?", ["dog"] * 10, "Dog"),
        (oth, "what is the", "What is the animal on the rug?", ["dog"] * 10, "dog"),
        # --- mixed marks: the space test looks at the whole input ----------
        (oth, "what is the", "What is the man wearing?",
         _answers(("t shirt", 3), ("tshirt", 3), ("shirt", 4)), "t-shirt"),
        (oth, "what is the", "What is the boy wearing?",
         _answers(("t shirt black", 2), ("t-shirt, black", 2), ("tshirt black", 1),
                  ("shirt", 5)), "t-shirt, black"),
        (oth, "what is the", "What is on the sign?",
         _answers(("left right", 3), ("left - right", 2), ("arrow", 5)), "left-right"),
        (oth, "what is", "What is the hashtag?",
         _answers(("(hello)", 2), ("hello", 3), ("hi", 5)), "( hello)"),
    ]

    # --- every punctuation mark, both branches (next to a space or not) -------
    for i, mark in enumerate(PUNCTUATION):
        if i % 3 == 0:
            prediction = f"black{mark}white"  # mark -> space
        elif i % 3 == 1:
            prediction = f"black {mark}white"  # next to a space -> deleted
        else:
            prediction = f"{mark}black white{mark}"  # mark -> space, then split
        cases.append((
            oth, "what color is the", f"What color is the pattern {i}?",
            _answers(("black white", 3), (f"black{mark}white", 2), (f"black {mark} white", 1),
                     (f"Black{mark}", 1), ("gray", 3)),
            prediction,
        ))
    # and the non-listed marks, which are never touched
    for i, mark in enumerate(NOT_PUNCTUATION):
        cases.append((
            oth, "what is", f"What is symbol {i}?",
            _answers((f"a{mark}b", 3), ("a b", 3), ("ab", 4)), f"a{mark}b",
        ))

    # --- predictions matching 0..10 of the humans -------------------------------
    for k in range(11):
        humans = _k_of("red", k, ("blue", "green")) if k < 10 else ["red"] * 10
        cases.append((oth, "what color is the", f"What color is the ball {k}?", humans, "red"))
        humans = _k_of("2", k, ("3", "two birds")) if k < 10 else ["2"] * 10
        cases.append((num, "how many", f"How many birds are on the wire {k}?", humans, "Two."))
    # zero matches with unanimous humans
    cases.append((oth, "what color is the", "What color is the sky?", ["blue"] * 10, "red"))
    return cases


# ---------------------------------------------------------------------------
# Random filler built from the same ingredients
# ---------------------------------------------------------------------------

_CANONICAL = {
    "yes/no": ("yes", "no"),
    "number": ("0", "1", "2", "3", "4", "5", "10", "1,000", "1.5", "12"),
    "other": ("red", "white", "dog", "t-shirt", "don't know", "frisbee", "10:30",
              "3 o'clock", "isn't", "tennis racket", "let's go"),
}
_DIGIT_WORDS = {"0": ("zero", "none"), "1": ("one",), "2": ("two",), "3": ("three",),
                "4": ("four",), "5": ("five",), "10": ("ten",)}
_UNAPOSTROPHE = {"don't know": "dont know", "3 o'clock": "3 oclock", "isn't": "isnt"}


def _surface(rng: random.Random, canonical: str) -> str:
    """A random spelling of ``canonical`` that the metric may or may not undo."""
    text = canonical
    roll = rng.random()
    if text in _DIGIT_WORDS and roll < 0.35:
        text = rng.choice(_DIGIT_WORDS[text])
    elif text in _UNAPOSTROPHE and roll < 0.5:
        text = _UNAPOSTROPHE[text]
    if rng.random() < 0.2:
        text = rng.choice(("a ", "an ", "the ")) + text
    if rng.random() < 0.25:
        text = text.upper() if rng.random() < 0.3 else text.capitalize()
    if rng.random() < 0.3:
        mark = rng.choice(PUNCTUATION + (".", ".", ":"))
        text = text + mark if rng.random() < 0.6 else f"{mark} {text}"
    if rng.random() < 0.15:
        text = rng.choice(("\n", "\t", " ")) + text + rng.choice(("\n", "\t", "", " "))
    return text


def _random_case(rng: random.Random, index: int) -> Case:
    answer_type = rng.choice(("yes/no", "number", "other"))
    question_type = rng.choice(
        {"yes/no": YES_NO_TYPES, "number": NUMBER_TYPES, "other": OTHER_TYPES}[answer_type]
    )
    pool = _CANONICAL[answer_type]
    target = rng.choice(pool)
    others = [c for c in pool if c != target]
    if rng.random() < 0.15:  # unanimous humans
        humans = [_surface(rng, target)] * 10
        prediction = rng.choice((humans[0], _surface(rng, target)))
    else:
        k = rng.randint(0, 10)
        humans = [_surface(rng, target) for _ in range(k)]
        humans += [_surface(rng, rng.choice(others)) for _ in range(10 - k)]
        rng.shuffle(humans)
        prediction = _surface(rng, target if rng.random() < 0.85 else rng.choice(others))
    question = f"{question_type.capitalize()} thing number {index}?"
    return answer_type, question_type, question, humans, prediction


def vqa_fixture(
    n_questions: int = 120, seed: int = 0
) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    """(questions, annotations, results) in the official VQAv2 formats."""
    rng = random.Random(seed)
    cases = _core_cases()[:n_questions]
    while len(cases) < n_questions:
        cases.append(_random_case(rng, len(cases)))
    rng.shuffle(cases)

    image_ids = rng.sample(range(1, 600_000), len(cases))
    question_rows: list[dict[str, Any]] = []
    annotation_rows: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    for i, ((answer_type, question_type, question, humans, prediction), image_id) in enumerate(
        zip(cases, image_ids)
    ):
        question_id = image_id * 1000 + i % 1000
        humans = list(humans)
        rng.shuffle(humans)
        question_rows.append({"image_id": image_id, "question": question,
                              "question_id": question_id})
        annotation_rows.append({
            "question_id": question_id,
            "image_id": image_id,
            "question_type": question_type,
            "answer_type": answer_type,
            "answers": [
                {"answer": answer, "answer_confidence": rng.choice(("yes", "yes", "maybe", "no")),
                 "answer_id": answer_id}
                for answer_id, answer in enumerate(humans, start=1)
            ],
            "multiple_choice_answer": Counter(humans).most_common(1)[0][0],
        })
        results.append({"question_id": question_id, "answer": prediction})
    rng.shuffle(results)

    common = {
        "info": {"description": "synthetic VQAv2-style fixture", "version": "2.0",
                 "year": 2017, "contributor": "vlzoo tests", "date_created": "2017-04-26"},
        "license": {"name": "Creative Commons Attribution 4.0 International License",
                    "url": "http://creativecommons.org/licenses/by/4.0/"},
        "data_type": "mscoco",
        "data_subtype": "val2014",
    }
    questions = {**common, "task_type": "Open-Ended", "questions": question_rows}
    annotations = {**common, "annotations": annotation_rows}
    return questions, annotations, results


if __name__ == "__main__":
    import json

    from official_vqa import official_vqa_scores

    qs, anns, res = vqa_fixture()
    print(json.dumps(official_vqa_scores(qs, anns, res), indent=2, sort_keys=True))
