"""Answer extraction and Hendrycks-MATH normalisation: the pure-Python half of answer checking.

Everything here is linear in its input and needs no third-party package, so it runs in the calling process: the
original's strict string reward (``mode="strict_string"``, see ``docs/algorithm.md`` section "Reward"), the box
extraction that feeds math-verify, the lenient fallback for tiny models, and the brace depth used by the pre-filters.
"""

from __future__ import annotations

import re

# pre-filter defaults: no real final answer is longer or deeper
MAX_ANSWER_CHARS = 1000
MAX_BRACE_DEPTH = 32


# ----------------------------------------------------------------------------------------------------------------
# Hendrycks MATH normalisation (the original's strict string reward), written from its published definition
# ----------------------------------------------------------------------------------------------------------------

def last_boxed_only_string(string: str) -> str | None:
    """The last ``\\boxed{...}`` / ``\\fbox{...}`` substring (braces matched), or ``"\\boxed x"`` form, or None.

    As the original: if ``"\\boxed "`` (with a space) occurs anywhere, the text after its last occurrence up to the
    next ``$`` wins, even when a later ``\\boxed{`` exists.
    """
    idx = string.rfind("\\boxed")
    if "\\boxed " in string:
        return "\\boxed " + string.split("\\boxed ")[-1].split("$")[0]
    if idx < 0:
        idx = string.rfind("\\fbox")
        if idx < 0:
            return None
    end = _closing_brace(string, idx)
    return None if end is None else string[idx:end + 1]


def _closing_brace(s: str, start: int) -> int | None:
    """The index of the ``}`` at which the brace depth, counted from ``start``, first returns to 0 after a ``}``;
    None if it never does."""
    depth = 0
    for i in range(start, len(s)):
        c = s[i]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i
    return None


def remove_boxed(s: str) -> str | None:
    """``\\boxed{x}`` / ``\\fbox{x}`` / ``\\boxed x`` -> ``x``; None if ``s`` has none of these shapes.

    (The original's ``remove_boxed`` asserts on ``\\fbox{`` and so scores every ``\\fbox`` answer 0; here ``\\fbox``
    is unwrapped like ``\\boxed``, as ``docs/algorithm.md`` (section "Reward") describes the intent.)
    """
    for left in ("\\boxed ",):
        if s.startswith(left):
            return s[len(left):]
    for left in ("\\boxed{", "\\fbox{"):
        if s.startswith(left) and s.endswith("}"):
            return s[len(left):-1]
    return None


def _fix_fracs(string: str) -> str:
    substrs = string.split("\\frac")
    new_str = substrs[0]
    for substr in substrs[1:]:
        new_str += "\\frac"
        if substr and substr[0] == "{":
            new_str += substr
            continue
        if len(substr) < 2:
            return string
        a, b = substr[0], substr[1]
        if b != "{":
            new_str += "{" + a + "}{" + b + "}" + substr[2:]
        else:
            new_str += "{" + a + "}" + b + substr[2:]
    return new_str


def _fix_a_slash_b(string: str) -> str:
    parts = string.split("/")
    if len(parts) != 2:
        return string
    try:
        a, b = int(parts[0]), int(parts[1])
    except ValueError:
        return string
    if string != f"{a}/{b}":
        return string
    return "\\frac{" + str(a) + "}{" + str(b) + "}"


def _remove_right_units(string: str) -> str:
    # "\text{ " only ever occurs (in the MATH answers) when describing units
    if "\\text{ " in string:
        splits = string.split("\\text{ ")
        if len(splits) != 2:  # the original asserts here; is_equiv then falls back to raw equality
            raise ValueError("more than one '\\text{ ' in answer")
        return splits[0]
    return string


def _fix_sqrt(string: str) -> str:
    if "\\sqrt" not in string:
        return string
    splits = string.split("\\sqrt")
    new_string = splits[0]
    for split in splits[1:]:
        if not split:  # the original indexes split[0] and raises; is_equiv then falls back to raw equality
            raise ValueError("dangling \\sqrt")
        if split[0] != "{":
            new_string += "\\sqrt{" + split[0] + "}" + split[1:]
        else:
            new_string += "\\sqrt" + split
    return new_string


def strip_string(string: str) -> str:
    """Hendrycks-MATH answer normalisation (``math_equivalence.strip_string``)."""
    string = string.replace("\n", "")
    string = string.replace("\\!", "")
    string = string.replace("\\\\", "\\")
    string = string.replace("tfrac", "frac").replace("dfrac", "frac")
    string = string.replace("\\left", "").replace("\\right", "")
    string = string.replace("^{\\circ}", "").replace("^\\circ", "")
    string = string.replace("\\$", "")
    string = _remove_right_units(string)
    string = string.replace("\\%", "")
    string = string.replace(" .", " 0.").replace("{.", "{0.")
    if not string:
        return string
    if string[0] == ".":
        string = "0" + string
    # "k = 3" -> "3" when the left side is short
    if len(string.split("=")) == 2 and len(string.split("=")[0]) <= 2:
        string = string.split("=")[1]
    string = _fix_sqrt(string)
    string = string.replace(" ", "")
    string = _fix_fracs(string)
    if string == "0.5":
        string = "\\frac{1}{2}"
    string = _fix_a_slash_b(string)
    return string


def is_equiv(str1: str | None, str2: str | None) -> bool:
    """The original's comparison: equal after :func:`strip_string`; raw equality if normalisation raises."""
    if str1 is None and str2 is None:
        return True
    if str1 is None or str2 is None:
        return False
    try:
        return strip_string(str1) == strip_string(str2)
    except Exception:  # noqa: BLE001 - the original's behaviour
        return str1 == str2


def strict_string_reward(completion: str, gold: str) -> float:
    """``docs/algorithm.md``, section "Reward": 1.0 iff the last box, Hendrycks-normalised, equals the normalised gold."""
    boxed = last_boxed_only_string(completion)
    if boxed is None:
        return 0.0
    answer = remove_boxed(boxed)
    return 1.0 if answer is not None and is_equiv(answer, str(gold)) else 0.0


# ----------------------------------------------------------------------------------------------------------------
# Robust extraction (math_verify mode and answer voting)
# ----------------------------------------------------------------------------------------------------------------

_NUMBER_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")


def extract_lenient_answer(text: str) -> str | None:
    """The last ``\\boxed{}`` if there is one, else the last number in the text (commas dropped).

    The fallback is for tiny models (the embedded SmolLM2-135M rarely writes a box); the seed's reward has no such
    fallback. Only the last 2000 characters are searched, so the cost is bounded."""
    boxed = extract_boxed_answer(text)
    if boxed is not None:
        return boxed
    nums = _NUMBER_RE.findall(text[-2000:])
    return nums[-1].replace(",", "") if nums else None


def extract_boxed_answer(text: str) -> str | None:
    """Content of the *last* ``\\boxed{...}`` / ``\\fbox{...}`` (or ``\\boxed x``) in ``text``; None if there is none
    or its braces never close.  Linear time."""
    i_boxed, i_fbox = text.rfind("\\boxed"), text.rfind("\\fbox")
    idx = max(i_boxed, i_fbox)
    if idx < 0:
        return None
    j = idx + (len("\\boxed") if idx == i_boxed else len("\\fbox"))
    if j < len(text) and text[j] == " ":  # "\boxed 5" form: up to "$" or end of line
        rest = text[j + 1:]
        end = min((k for k in (rest.find("$"), rest.find("\n")) if k >= 0), default=len(rest))
        return rest[:end].strip() or None
    if j >= len(text) or text[j] != "{":
        return None
    end = _closing_brace(text, j)
    return None if end is None else text[j + 1:end]


def brace_depth(s: str) -> int:
    depth = best = 0
    for c in s:
        if c == "{":
            depth += 1
            best = max(best, depth)
        elif c == "}":
            depth -= 1
    return best

