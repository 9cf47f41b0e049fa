"""The user documentation against the code: every setting, flag and default the docs state exists as stated.

Setting names, flags and defaults in README.md and docs/ are a contract with users' scripts, so drift between the
two fails here: the settings tables of docs/training.md and docs/distributed.md (names and defaults, and that every
setting is in one of them), every ``section.key[=value]`` the docs mention (exists, value accepted), every
``gemma3vl ...`` command line in them (subcommand and flags exist, values of choice flags allowed), and the README's
CLI reference (flags of each command's section, synopsis defaults, option tables' defaults, choices). No model is
built: this reads Markdown and the argparse / dataclass definitions only.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
from pathlib import Path

import pytest

from gemma3vl.cli import build_parser, parse_size
from gemma3vl.errors import Gemma3VLError
from gemma3vl.train.config import RECIPES, TrainConfig, recipe, set_value

ROOT = Path(__file__).resolve().parents[1]
DOCS = {name: (ROOT / name).read_text() for name in
        ("README.md", "docs/training.md", "docs/data.md", "docs/distributed.md")}
SECTIONS = tuple(f.name for f in dataclasses.fields(TrainConfig) if dataclasses.is_dataclass(getattr(TrainConfig(), f.name)))
SETTING = re.compile(rf"^({'|'.join(SECTIONS)})\.([a-z_0-9]+)(?:=(.*))?$")
# Mentioned on purpose though not settings: the example of a misplaced key, and a file name.
NOT_SETTINGS = {"train.lr"}
FILE_SUFFIXES = {"json", "jsonl", "safetensors", "png", "yaml", "yml", "py", "md", "parquet", "sbatch"}


# ---------------------------------------------------------------------------------------------- helpers
def all_settings() -> dict[str, object]:
    """Every ``section.key`` (and top-level ``out``) with its default in a config built without a recipe."""
    cfg = TrainConfig()
    found = {}
    for section in SECTIONS:
        for f in dataclasses.fields(getattr(cfg, section)):
            found[f"{section}.{f.name}"] = getattr(getattr(cfg, section), f.name)
    found["out"] = cfg.out
    return found


def default_of(name: str, cfg: TrainConfig | None = None):
    cfg = cfg or TrainConfig()
    if "." not in name:
        return getattr(cfg, name)
    section, key = name.split(".")
    return getattr(getattr(cfg, section), key)


def table_rows(text: str, heading: str) -> list[list[str]]:
    """The body rows of the first Markdown table after ``heading``, as lists of cells."""
    start = text.index(heading)
    rows, started = [], False
    for line in text[start:].splitlines()[1:]:
        if line.startswith("|"):
            started = True
            cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            if set("".join(cells)) <= set("-: "):
                continue  # the separator row
            rows.append(cells)
        elif started:
            break
    return rows[1:]  # without the header row


def same(documented: str, actual) -> bool:
    """A literal default as the docs write it (``true``, ``5e-5``, ``auto``, empty for unset) against the code's."""
    text = documented.strip()
    if isinstance(actual, bool):
        return text == str(actual).lower()
    if text == "":
        return actual in (None, "")
    if isinstance(actual, (int, float)):
        try:
            return math.isclose(float(text), actual)
        except ValueError:
            return False
    return text == str(actual)


def check_default(name: str, cell: str) -> list[str]:
    """Problems with ``cell`` as the documented default of setting ``name`` (the special forms the tables use)."""
    base = default_of(name)
    if m := re.fullmatch(r"recipe \((\S+) without one\)", cell):  # recipe-dependent, with the recipe-less value
        return [] if same(m.group(1), base) else [f"{name}: documented {m.group(1)!r} without a recipe, code {base!r}"]
    if cell == "recipe":
        return []
    if m := re.fullmatch(r"(\S+) SFT, (\S+) LoRA", cell):  # optim.lr
        sft, lora = default_of(name, recipe("gemma3_vl_4b_sft")), default_of(name, recipe("gemma3_vl_4b_peft"))
        ok = same(m.group(1), sft) and same(m.group(2), lora) and same(m.group(1), base)
        return [] if ok else [f"{name}: documented {cell!r}, code {sft!r} (SFT) / {lora!r} (LoRA) / {base!r}"]
    if m := re.fullmatch(r"(\S+) / (\S+)", cell):  # peft.method: none, lora in the PEFT recipes
        lora = default_of(name, recipe("gemma3_vl_4b_peft"))
        ok = same(m.group(1), base) and same(m.group(2), lora)
        return [] if ok else [f"{name}: documented {cell!r}, code {base!r} / {lora!r} (PEFT recipes)"]
    if m := re.fullmatch(r"([a-z,]+) (_[a-z]+)", cell):  # peft.targets: q,k,v,... _proj
        expanded = [part + m.group(2) for part in m.group(1).split(",")]
        return [] if expanded == list(base) else [f"{name}: documented {expanded}, code {base!r}"]
    return [] if same(cell, base) else [f"{name}: documented default {cell!r}, code {base!r}"]


def settings_table(doc: str) -> dict[str, str]:
    """``name -> documented default`` from a doc's ``## Settings`` table."""
    documented = {}
    for cells in table_rows(DOCS[doc], "## Settings"):
        names = [name for name in re.findall(r"`([^`]+)`", cells[0]) if not name.endswith(".*")]
        if not names:
            continue
        parts = cells[1].split(", ") if len(names) > 1 else [cells[1]]
        if len(names) > 1 and len(parts) == 1:
            parts = parts * len(names)  # one value for all of them
        assert len(parts) == len(names), f"{doc}: row {cells[0]} has {len(names)} settings but defaults {cells[1]!r}"
        documented.update(zip(names, parts))
    return documented


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def command_parser(words: list[str]) -> tuple[argparse.ArgumentParser, str] | None:
    """The parser of ``gemma3vl WORDS...`` (nested: ``convert import``) and the command's name."""
    parser, name = build_parser(), []
    for word in words:
        children = subcommands(parser)
        if word not in children:
            break
        parser, name = children[word], [*name, word]
    return (parser, " ".join(name)) if name else None


def options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {flag: action for action in parser._actions for flag in action.option_strings}


def command_lines(text: str) -> list[str]:
    """Every ``gemma3vl CMD ...`` command line: backticked spans, headings, and lines of fenced blocks (with their
    ``\\`` continuations joined)."""
    lines = [span for span in re.findall(r"`([^`\n]+)`", text) if re.search(r"(^|\s)gemma3vl \w", span)]
    for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if re.search(r"(^|\s)gemma3vl \w", line):
                lines.append(line.split("#", 1)[0] if not line.lstrip().startswith("#") else "")
    return [line for line in lines if line]


def choices_of(text: str) -> set[str]:
    return {part.strip() for part in text.replace("\\", "").split("|")}


# ---------------------------------------------------------------------------------------------- settings
@pytest.mark.parametrize("doc", ["docs/training.md", "docs/distributed.md"])
def test_settings_tables_name_real_settings_with_their_defaults(doc):
    known = all_settings()
    documented = settings_table(doc)
    assert documented, f"{doc}: no settings table found"
    unknown = sorted(set(documented) - set(known))
    assert not unknown, f"{doc} documents settings the config does not have: {unknown}"
    problems = [problem for name, cell in documented.items() for problem in check_default(name, cell)]
    assert not problems, f"{doc}: " + "; ".join(problems)


def test_every_setting_is_documented():
    documented = set(settings_table("docs/training.md")) | set(settings_table("docs/distributed.md"))
    missing = sorted(set(all_settings()) - documented)
    assert not missing, f"settings in the config but in no settings table of docs/: {missing}"


def test_every_setting_the_docs_mention_exists_and_takes_the_value_shown():
    problems, known = [], all_settings()
    for doc, text in DOCS.items():
        spans = re.findall(r"`([^`\n]+)`", text)
        spans += [line for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S) for line in block.splitlines()]
        for span in spans:
            for token in span.split():
                m = SETTING.match(token.rstrip(",;"))
                if not m or f"{m.group(1)}.{m.group(2)}" in NOT_SETTINGS:
                    continue
                key, value = f"{m.group(1)}.{m.group(2)}", m.group(3)
                if key not in known:
                    if m.group(2) not in FILE_SUFFIXES:  # (train.jsonl is a file)
                        problems.append(f"{doc}: `{token}`: no such setting")
                    continue
                if value is not None and (re.fullmatch(r"[A-Za-z]|N", value) or "<" in value):
                    value = None  # a placeholder (parallel.cp=C, data.columns=messages=<col>)
                cfg = TrainConfig()
                try:
                    set_value(cfg, key, value if value is not None else default_of(key))
                    if value is not None:
                        cfg.validate()
                except Gemma3VLError as exc:
                    problems.append(f"{doc}: `{token}`: {exc}")
    assert not problems, "\n".join(problems)


def test_recipes_have_the_documented_defaults():
    readme = DOCS["README.md"]
    assert "`gemma3_vl_{4b,12b,27b}_{sft,peft}` (global batch 32, sequence 4096,\nLR 5e-5 full SFT / 2e-4 LoRA r16, " \
           "10 warmup steps)" in readme
    for size in ("4b", "12b", "27b"):
        for mode in ("sft", "peft"):
            cfg = recipe(f"gemma3_vl_{size}_{mode}")
            assert (cfg.train.global_batch_size, cfg.train.seq_length, cfg.optim.warmup_steps) == (32, 4096, 10)
            assert cfg.optim.lr == (5e-5 if mode == "sft" else 2e-4)
            assert (cfg.peft.method, cfg.peft.rank) == (("none", 16) if mode == "sft" else ("lora", 16))
    assert {"tiny_sft", "tiny_peft"} <= set(RECIPES)


# ---------------------------------------------------------------------------------------------- CLI
def test_command_lines_in_the_docs_use_real_commands_and_flags():
    problems = []
    for doc, text in DOCS.items():
        for line in command_lines(text):
            words = line.split()
            start = max(i for i, word in enumerate(words) if word == "gemma3vl") + 1
            found = command_parser(words[start:])
            if found is None:
                problems.append(f"{doc}: `{line}`: no such command")
                continue
            parser, name = found
            flags = options(parser)
            tokens = [w.strip("[]`,") for w in words[start:]]
            for i, token in enumerate(tokens):
                if not token.startswith("--"):
                    continue
                if token not in flags:
                    problems.append(f"{doc}: `{line}`: gemma3vl {name} has no {token}")
                    continue
                action = flags[token]
                value = tokens[i + 1] if i + 1 < len(tokens) else ""
                if action.choices and value and not value.startswith("-") and value != "...":
                    stated = choices_of(value)
                    if "|" in value and stated != set(action.choices):
                        problems.append(f"{doc}: `{line}`: {token} choices {sorted(stated)}, code {action.choices}")
                    elif "|" not in value and value not in action.choices:
                        problems.append(f"{doc}: `{line}`: {token} {value} is not one of {action.choices}")
    assert not problems, "\n".join(problems)


def readme_sections() -> list[tuple[str, str]]:
    """``(heading, body)`` of each ``### `gemma3vl ...` `` section of the README's CLI reference."""
    parts = re.split(r"^### `(gemma3vl [^`]+)`\n", DOCS["README.md"], flags=re.M)
    sections = []
    for heading, body in zip(parts[1::2], parts[2::2]):
        sections.append((heading, re.split(r"^#{2,3} ", body, flags=re.M)[0]))
    return sections


# Flags a section names that belong to another command (a cross-reference).
CROSS_REFERENCES = {("convert import", "--adapter"), ("plan", "--nproc-per-node"),
                    ("serve", "--model"), ("serve", "--tasks")}  # serve: lm_eval's command line, for /v1/completions


def literal_default(text: str, action: argparse.Action) -> bool | None:
    """Whether a documented default ``text`` (``8``, ``5GB``, ``./gemma3vl-eval``) is the flag's; None when
    ``text`` is a placeholder, not a value."""
    text = text.strip()
    if action.default is None or text in ("...", "") or re.fullmatch(r"[A-Z][A-Z0-9_]*", text):
        return None
    if re.fullmatch(r"\d+(\.\d+)?(B|KB|MB|GB|KiB|MiB|GiB)", text):
        return parse_size(text) == action.default
    if re.fullmatch(r"-?\d+(\.\d+)?(e-?\d+)?", text):
        return isinstance(action.default, (int, float)) and math.isclose(float(text), action.default)
    return text.removeprefix("./") == str(action.default).removeprefix("./")


def test_readme_cli_reference_matches_the_parsers():
    sections = readme_sections()
    assert len(sections) >= 10
    problems = []
    for heading, body in sections:
        found = command_parser(heading.split()[1:])
        assert found is not None, f"README: no command for heading {heading!r}"
        parser, name = found
        flags = options(parser)
        # 1. every flag the section names exists
        for flag in sorted(set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", heading + "\n" + body))):
            if flag not in flags and (name, flag) not in CROSS_REFERENCES:
                problems.append(f"README {heading!r}: gemma3vl {name} has no {flag}")
        # 2. synopsis defaults: [--flag VALUE]
        for flag, value in re.findall(r"\[(--[a-z-]+) ([^\]\[ ]+)\]", heading):
            action = flags.get(flag)
            if action is None:
                continue
            if "|" in value:
                if action.choices and choices_of(value) != set(action.choices):
                    problems.append(f"README {heading!r}: {flag} choices {value}, code {action.choices}")
            elif literal_default(value, action) is False:
                problems.append(f"README {heading!r}: {flag} default {value}, code {action.default!r}")
        # 3. "default `--flag VALUE`" and "`--flag` defaults to VALUE" in the prose
        for flag, value in re.findall(r"default `(--[a-z-]+) ([^`]+)`", body) + \
                re.findall(r"`(--[a-z-]+)` defaults to ([^\s),;]+)", body):
            if flag in flags and literal_default(value, flags[flag]) is False:
                problems.append(f"README {heading!r}: {flag} default {value}, code {flags[flag].default!r}")
        # 4. option tables: | `--flag ARG` | meaning (DEFAULT) |, and choices written a\|b\|c
        for line in body.splitlines():
            if not line.startswith("| `--"):
                continue
            cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]]
            spans = re.findall(r"`(--[a-z-]+)(?: ([^`]+))?`", cells[0])
            for flag, arg in spans:
                if flag in flags and "|" in arg and flags[flag].choices and \
                        choices_of(arg) != set(flags[flag].choices):
                    problems.append(f"README {heading!r}: {flag} choices {arg}, code {flags[flag].choices}")
            if len(spans) == 1 and spans[0][0] in flags:
                flag = spans[0][0]
                values = [group.split(";")[0] for group in re.findall(r"\(([^()]*)\)", cells[1])]
                literal = [v for v in values if literal_default(v, flags[flag]) is not None
                           and re.match(r"[\d.]", v.strip())]
                if len(literal) == 1 and not literal_default(literal[0], flags[flag]):
                    problems.append(f"README {heading!r}: {flag} default ({literal[0]}), code {flags[flag].default!r}")
    assert not problems, "\n".join(problems)


def test_the_top_level_help_names_every_command():
    parser = build_parser()
    described = parser.description
    missing = [name for name in subcommands(parser) if name not in described]
    assert not missing, f"`gemma3vl --help` does not name {missing}"


# ---------------------------------------------------------------------------------------------- checked up front
@pytest.mark.parametrize("override, message", [
    ("peft.dropout=1.5", "peft.dropout=1.5 must be in [0, 1)"),
    ("peft.dropout=-0.1", "peft.dropout=-0.1 must be in [0, 1)"),
    ("peft.targets=q_proj,qkv_proj", "peft.targets: unknown projection(s) qkv_proj"),
    ("peft.targets=", "peft.targets is empty"),
])
def test_lora_settings_are_checked_before_anything_loads(override, message):
    """docs/training.md: settings are checked before anything loads, naming the key. A LoRA dropout out of range or
    an unknown target used to pass the config and fail only once the model had loaded, without naming the key."""
    from gemma3vl.train.config import build_config

    with pytest.raises(Gemma3VLError) as caught:
        build_config("tiny_peft", None, [override])
    assert message in str(caught.value)
    build_config("tiny_sft", None, [override])  # ignored without adapters, as peft.rank is
