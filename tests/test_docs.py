"""The docs as a newcomer reads them: every shell command in README.md and docs/*.md runs as
written (its script exists and accepts its flags, the config files it names exist, its
key=value overrides are keys of engine/config.py; train.py commands resolve with --print-config,
sweeps with --dry-run), every relative link and image points to a file in git, the configuration
reference equals what scripts/config_reference.py generates, and the README's launch table
computes the global batch and lr as the config and scripts/slurm.sbatch give them."""
import argparse
import contextlib
import glob
import inspect
import os
import re
import shlex
import subprocess

import pytest
import timm

import eval as eval_script
import models  # noqa: F401  (registers our models with timm)
import train
from engine.config import Config, apply_overrides, effective_lr, global_batch, load_config
from helpers import ROOT, load_script

DOCS = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
SHELL_LANGS = ("sh", "bash", "shell", "console")


# ---------------------------------------------------------------- reading the docs

def code_blocks(text):
    """(first line number, language, lines) of every fenced and indented code block."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        fence = re.match(r"^(```+|~~~+)\s*(\w*)", lines[i])
        if fence:
            start, lang, body = i + 1, fence.group(2).lower(), []
            i += 1
            while i < len(lines) and not lines[i].startswith(fence.group(1)):
                body.append(lines[i])
                i += 1
            blocks.append((start + 1, lang, body))
        elif lines[i].startswith("    ") and (i == 0 or not lines[i - 1].strip()):
            start, body = i, []
            while i < len(lines) and (lines[i].startswith("    ") or not lines[i].strip()):
                body.append(lines[i][4:])
                i += 1
            blocks.append((start + 1, "", body))
            continue
        i += 1
    return blocks


def shell_commands(lines):
    """Each command line (continuations joined) as (line offset, text)."""
    out, pending, first = [], "", 0
    for n, line in enumerate(lines):
        if not pending:
            first = n
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        if full:
            out.append((first, full))
    return out


COMMAND_HEADS = ("python", "python3", ".venv/bin/python", "torchrun", ".venv/bin/torchrun", "make", "sbatch", "bash",
                 "sh", ".", "source")


def is_command(words):
    return bool(words) and (words[0] in COMMAND_HEADS or re.match(r"^(\./)?scripts/\S+\.(sh|sbatch)$", words[0]))


def doc_commands():
    """(doc, line, words) of every command in the docs' code blocks. In a sh/bash block every line
    must be a command; elsewhere (indented blocks, Python, YAML) lines that start like one are."""
    found = []
    for doc in DOCS:
        with open(os.path.join(ROOT, doc), encoding="utf-8") as f:
            text = f.read()
        for start, lang, body in code_blocks(text):
            if lang not in ("",) + SHELL_LANGS:
                continue
            for offset, line in shell_commands(body):
                words = shlex.split(line, comments=True)
                while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):  # VAR=value before the command
                    words = words[1:]
                if is_command(words):
                    found.append((doc, start + offset, words))
                elif lang in SHELL_LANGS and words:
                    found.append((doc, start + offset, ["<not a known command>"] + words))
    return found


COMMANDS = doc_commands()


# ---------------------------------------------------------------- checking one command

class Parsed(BaseException):
    """Raised instead of running a script once argparse has accepted its arguments."""

    def __init__(self, namespace):
        self.namespace = namespace


@contextlib.contextmanager
def stop_after_parsing(monkeypatch):
    for name in ("parse_args", "parse_intermixed_args"):
        original = getattr(argparse.ArgumentParser, name)

        def parse(self, args=None, namespace=None, _original=original):
            raise Parsed(_original(self, args, namespace))
        monkeypatch.setattr(argparse.ArgumentParser, name, parse)
    yield


def parse_script_args(script, args, monkeypatch, capsys):
    """The script's arguments as its own argparse reads them (its main() stops right there)."""
    name = os.path.splitext(os.path.relpath(os.path.join(ROOT, script), os.path.join(ROOT, "scripts")))[0]
    main = {"train.py": train.main, "eval.py": eval_script.main}.get(script) or load_script(name).main
    with stop_after_parsing(monkeypatch):
        try:
            if inspect.signature(main).parameters:
                main(list(args))
            else:
                assert not args, f"{script} takes no arguments"
                return argparse.Namespace()
        except Parsed as p:
            return p.namespace
        except SystemExit as e:
            raise AssertionError(f"{script} refuses {shlex.join(args)}: {capsys.readouterr().err.strip()}") from None
    raise AssertionError(f"{script} did not parse its arguments with argparse")


def check_overrides(overrides, config=None):
    items = [o for o in overrides if "=" in o]
    assert len(items) == len(overrides), f"not key=value: {overrides}"
    if config is not None:
        assert os.path.isfile(os.path.join(ROOT, config)), f"no config file {config}"
        load_config(os.path.join(ROOT, config), items)
    else:
        apply_overrides(Config(), items)


def check_model(name):
    if name:
        assert timm.is_model(name), f"timm knows no model {name}"


def check_python(script, args, monkeypatch, capsys):
    if script == "-m":
        assert args[0] == "pytest", args
        for arg in args[1:]:
            if not arg.startswith("-"):
                assert os.path.exists(os.path.join(ROOT, arg.split("::")[0])), arg
        return
    assert os.path.isfile(os.path.join(ROOT, script)), f"no script {script}"
    if script == "train.py":  # the real command, resolved and printed instead of run
        code = train.main([*args, "--print-config"])
        assert code == 0, capsys.readouterr().err
        return
    if script == "scripts/sweep.py":  # the real command, printed instead of run
        code = load_script("sweep").main([*args, "--dry-run"])
        assert code == 0, capsys.readouterr().err
        return
    ns = parse_script_args(script, args, monkeypatch, capsys)
    for attr in ("model", "compare_model"):
        value = getattr(ns, attr, None)
        for name in value if isinstance(value, list) else [value]:
            check_model(name)
    if getattr(ns, "config", None):
        assert os.path.isfile(os.path.join(ROOT, ns.config)), f"no config file {ns.config}"
    if getattr(ns, "overrides", None):
        check_overrides(ns.overrides)
    if script == "scripts/prepare_imagenet_val.py":
        assert ns.csv or (ns.ground_truth and ns.meta), "prepare_imagenet_val.py needs --csv or --ground-truth and --meta"


def makefile_targets():
    with open(os.path.join(ROOT, "Makefile")) as f:
        text = f.read()
    return set(re.findall(r"^([\w.-]+):", text, flags=re.M)), text


def check_command(words, monkeypatch, capsys):
    try:
        _check_command(words, monkeypatch, capsys)
    except SystemExit:  # an argparse refusal outside the scripts' own parsers (torchrun's, gpu_check's)
        raise AssertionError(f"refused: {capsys.readouterr().err.strip()}") from None


def _check_command(words, monkeypatch, capsys):
    head, rest = words[0], words[1:]
    if head == "<not a known command>":
        raise AssertionError(f"not a command this test knows: {shlex.join(rest)}")
    if head in ("python", "python3", ".venv/bin/python"):
        return check_python(rest[0], rest[1:], monkeypatch, capsys)
    if head in ("torchrun", ".venv/bin/torchrun"):
        from torch.distributed.run import get_args_parser

        ns = get_args_parser().parse_args(rest)
        return check_python(ns.training_script, ns.training_script_args, monkeypatch, capsys)
    if head == "make":
        targets, text = makefile_targets()
        for word in rest:
            if "=" in word:
                var, value = word.split("=", 1)
                assert re.search(rf"\$\({var}\)", text), f"the Makefile does not use {var}"
                if var == "ARGS":
                    check_overrides(shlex.split(value))
            else:
                assert word in targets, f"the Makefile has no target {word}"
        return
    if head in (".", "source"):
        assert rest == [".venv/bin/activate"], rest
        assert re.search(r"^VENV \?= \.venv$", makefile_targets()[1], flags=re.M), "make setup's venv is not .venv"
        return
    if head == "sbatch":
        while rest and rest[0].startswith("-"):
            assert re.match(r"^--[a-z-]+=\S+$", rest[0]), f"write sbatch options as --key=value: {rest[0]}"
            rest = rest[1:]
        head, rest = rest[0], rest[1:]
    if head in ("bash", "sh"):
        head, rest = rest[0], rest[1:]
    script = head[2:] if head.startswith("./") else head
    path = os.path.join(ROOT, script)
    assert os.path.isfile(path), f"no script {script}"
    assert subprocess.run(["bash", "-n", path]).returncode == 0, f"{script}: bash syntax error"
    if script == "scripts/gpu_check.sh":
        load_script("gpu_check").parse_args(rest)
    elif script == "scripts/slurm.sbatch":
        check_overrides(rest[1:], rest[0])
    elif script == "scripts/train_imagenet.sh":
        assert rest[1].isdigit(), f"train_imagenet.sh CONFIG NGPUS ...: {rest}"
        check_overrides(rest[2:], rest[0])
    else:
        raise AssertionError(f"no check for {script}: add one to tests/test_docs.py")


def test_the_docs_have_commands():
    heads = {words[0] for _, _, words in COMMANDS}
    assert {"python", "torchrun", "make", "sbatch"} <= heads, heads
    assert all(words[0] != "<not a known command>" for _, _, words in COMMANDS), \
        [f"{d}:{n}: {shlex.join(w[1:])}" for d, n, w in COMMANDS if w[0] == "<not a known command>"]


def test_every_command_runs_as_written(monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(ROOT)
    failures = []
    for doc, line, words in COMMANDS:
        try:
            with monkeypatch.context() as m:
                check_command(words, m, capsys)
        except Exception as e:  # every failing command is listed, not only the first
            failures.append(f"{doc}:{line}: {shlex.join(words)}\n    {type(e).__name__}: {e}")
        capsys.readouterr()
    assert not failures, "\n".join(failures)


def test_a_broken_command_is_caught(monkeypatch, capsys):
    """The checks above can fail: a misspelt flag, key, config file, model or make target each is."""
    monkeypatch.chdir(ROOT)
    for broken in ("python train.py --config configs/quickstart.yaml train.epoch=2",
                   "python train.py --config configs/no_such.yaml",
                   "python eval.py --checkpoint x.pth --no-such-flag",
                   "python eval.py --checkpoint x.pth --model deit_smal_patch16_224",
                   "python scripts/gradcam.py --checkpoint a.pth --dataset-index 0 --target labels",
                   "python scripts/sweep.py configs/sweeps/no_such.yaml",
                   "torchrun --nprocs=8 train.py", "torchrun --nproc_per_node=8 trian.py",
                   "sbatch scripts/slurm.sbatch configs/deit_small_multimax.yaml optim.impl=loop",
                   "scripts/gpu_check.sh --only flex benchmark",
                   "make demos"):
        with pytest.raises(Exception), monkeypatch.context() as m:
            check_command(shlex.split(broken), m, capsys)
        capsys.readouterr()


# ---------------------------------------------------------------- links

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def anchors(path):
    """GitHub's heading anchors of a Markdown file."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    text = re.sub(r"^(```|~~~).*?^\1", "", text, flags=re.M | re.S)
    out = set()
    for heading in re.findall(r"^#+\s+(.*)$", text, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", "")).replace(" ", "-")
        out.add(slug)
    return out


def tracked_files():
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return set(out.splitlines())


def test_every_relative_link_and_image_is_a_file_in_git():
    tracked, problems = tracked_files(), []
    for doc in DOCS:
        with open(os.path.join(ROOT, doc), encoding="utf-8") as f:
            text = re.sub(r"^(```|~~~).*?^\1", "", f.read(), flags=re.M | re.S)
        for target in LINK.findall(text):
            if re.match(r"^[a-z]+:", target):
                continue  # a URL
            path, _, anchor = target.partition("#")
            file = os.path.normpath(os.path.join(os.path.dirname(doc), path)) if path else doc
            if file not in tracked:
                problems.append(f"{doc}: {target}: {file} is not a file in git")
            elif anchor and file.endswith(".md") and anchor not in anchors(os.path.join(ROOT, file)):
                problems.append(f"{doc}: {target}: {file} has no heading #{anchor}")
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------- generated and computed facts

def test_the_configuration_reference_is_generated_from_engine_config():
    ref = load_script("config_reference")
    with open(os.path.join(ROOT, "docs", "CONFIGURATION.md"), encoding="utf-8") as f:
        text = f.read()
    assert ref.BEGIN in text and ref.END in text
    inside = text.split(ref.BEGIN, 1)[1].split(ref.END, 1)[0]
    assert inside.strip() == ref.reference().strip(), \
        "docs/CONFIGURATION.md is stale: paste the output of python scripts/config_reference.py between its markers"


def sbatch_defaults():
    with open(os.path.join(ROOT, "scripts", "slurm.sbatch")) as f:
        opts = dict(re.findall(r"^#SBATCH --([a-z-]+)=(\S+)", f.read(), flags=re.M))
    return int(opts["nodes"]), int(opts["ntasks-per-node"])


def test_the_readmes_launch_table_computes_batch_and_lr_as_the_code_does():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    header = re.search(r"^\| launch of `(configs/\S+\.yaml)` \|.*global batch \| peak lr \|$", text, flags=re.M)
    assert header, "README.md: no launch table"
    rows = re.findall(r"^\| (.+) \| (\d+) \| (\d+) × (\d+) \| (\d+) \| ([\d.e+-]+) \|$",
                      text[header.end():].split("\n\n")[0], flags=re.M)
    assert len(rows) >= 4
    nodes, tasks = sbatch_defaults()
    for launch, procs, batch, accum, glob_batch, lr in rows:
        procs, batch, accum = int(procs), int(batch), int(accum)
        cfg = load_config(os.path.join(ROOT, header.group(1)), [f"data.batch_size={batch}", f"train.accum_steps={accum}"])
        if "slurm.sbatch" in launch:
            assert procs == (int(re.search(r"--nodes=(\d+)", launch).group(1)) if "--nodes=" in launch else nodes) * tasks
        if "nproc_per_node=" in launch:
            assert procs == int(re.search(r"nproc_per_node=(\d+)", launch).group(1))
        if "data.batch_size" not in launch:
            assert batch == load_config(os.path.join(ROOT, header.group(1))).data.batch_size, launch
        assert int(glob_batch) == global_batch(cfg, procs), launch
        assert float(lr) == pytest.approx(effective_lr(cfg, procs)), launch
