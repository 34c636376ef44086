"""``python run_suite.py --help``: the suites and scales with one line each (read off their YAML comments), the
common options (read off suites/config.yaml) and three examples."""
from __future__ import annotations

import re
from pathlib import Path

EXAMPLES = [
    ("the headline CPU study (about 2 h 15 min on 2 cores; resumable)", "python run_suite.py suite=arch_agnostic"),
    ("a one-minute check that everything runs", "python run_suite.py suite=smoke scale=tiny"),
    ("what the paper's table would cost on GPUs, training nothing", "python run_suite.py suite=dit_scaling scale=full plan=true"),
]


def summary(yaml_file: Path, width: int = 100) -> str:
    """The first sentence of the comment at the top of ``yaml_file`` (after ``# @package``), cut at a colon."""
    lines = []
    for line in yaml_file.read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        if text and not text.startswith("@package"):
            lines.append(text)
    pieces = re.split(r"(?<=[A-Za-z0-9)])[.:](?:\s|$)", " ".join(lines))
    text = pieces[0]
    for piece in pieces[1:]:  # a lead-in of a word or two ("The default:") takes the next clause with it
        if len(text.split()) >= 3:
            break
        text = f"{text}: {piece}"
    if text.count("(") > text.count(")"):  # cut inside a parenthesis: drop it
        text = text[:text.rfind("(")].rstrip()
    if len(text) > width:
        cut = max(text.rfind(", ", 0, width), text.rfind(" (", 0, width))
        text = text[:cut if cut > 0 else width].rstrip() + " ..."
    return text


def options(config_file: Path) -> list[tuple[str, str, str]]:
    """(key, default, comment) of each top-level key of suites/config.yaml that has a comment."""
    out = []
    for line in config_file.read_text().splitlines():
        match = re.match(r"^([a-z_]+):\s*(\S.*?)\s+#\s*(.*)$", line)
        if match:
            out.append(match.groups())
    return out


def help_text(suites_dir: str | Path) -> str:
    root = Path(suites_dir)
    suites = sorted(p for p in (root / "suite").glob("*.yaml"))
    scales = sorted(p for p in (root / "scale").glob("*.yaml"))
    name_width = max(len(p.stem) for p in suites + scales) + 2
    out = ["usage: python run_suite.py suite=<name> [scale=<scale>] [key=value ...]", "",
           "Trains and measures diffusion backbones with and without token reduction (TREAD, MaskDiT, SPRINT,",
           "drop-and-discard) and writes the tables under results_dir. Docs: README.md, docs/configuration.md.", "",
           "suites (suites/suite/<name>.yaml):"]
    out += [f"  {p.stem:<{name_width}}{summary(p)}" for p in suites]
    out += ["", "scales (scale=<name>; default auto):"]
    out += [f"  {p.stem:<{name_width}}{summary(p)}" for p in scales]
    out += ["", "common options (key=value):"]
    for key, default, comment in options(root / "config.yaml"):
        out.append(f"  {key + '=' + default:<{name_width + 14}}{comment}")
    out += ["", "examples:"]
    for what, command in EXAMPLES:
        out += [f"  # {what}", f"  {command}"]
    out += ["", "Hydra's own options: python run_suite.py --hydra-help"]
    return "\n".join(out)
