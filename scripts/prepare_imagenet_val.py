#!/usr/bin/env python
"""Sort the flat ImageNet-1k validation folder (ILSVRC2012_val_00000001.JPEG, ...) into one
sub-folder per class (WordNet ID), the layout data.dataset=imagefolder reads.

With the official devkit (ILSVRC2012_devkit_t12.tar.gz, files under data/):

    python scripts/prepare_imagenet_val.py /data/imagenet/val \\
        --ground-truth ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt \\
        --meta ILSVRC2012_devkit_t12/data/meta.mat            # scipy reads it (in requirements.txt)

or with Kaggle's LOC_val_solution.csv (ImageId,PredictionString; the first token is the WNID):

    python scripts/prepare_imagenet_val.py /data/imagenet/val --csv LOC_val_solution.csv

The ground-truth file has one ILSVRC2012_ID (1..1000) per line, line i for image i. ``--meta``
maps IDs to WNIDs: the devkit's meta.mat, or a text file of "ID WNID" lines, of "WNID ID ..."
lines (like map_clsloc.txt of later devkits), or of one WNID per line (line i is ID i).
NB the devkit's IDs are NOT in sorted-WNID order (ID 1 is n02119789), so a sorted synset
list does not fit the devkit's ground-truth file.

Everything is checked before any file moves: the counts of images and labels must match, no
target may exist. ``--dry-run`` only prints the plan; ``--copy`` copies instead of moving;
``--out`` writes the class folders elsewhere (default: inside the val folder).
"""
from __future__ import annotations

import argparse
import csv
import os
import re
import shutil
import sys
from typing import Dict, List, Optional, Tuple

VAL_NAME = re.compile(r"^ILSVRC2012_val_(\d{8})\.(JPEG|jpeg|jpg|JPG|png|PNG)$")
WNID = re.compile(r"^n\d{8}$")


class PrepareError(Exception):
    """A problem with the inputs; printed as one line, nothing has been moved."""


def find_val_images(val_dir: str) -> Dict[int, str]:
    """Image number → file name, for the flat ``ILSVRC2012_val_XXXXXXXX.*`` files in ``val_dir``."""
    if not os.path.isdir(val_dir):
        raise PrepareError(f"val folder {val_dir} does not exist")
    images: Dict[int, str] = {}
    for entry in os.scandir(val_dir):
        m = VAL_NAME.match(entry.name)
        if m and entry.is_file():
            images[int(m.group(1))] = entry.name
    return images


def read_ground_truth(path: str) -> List[int]:
    """ILSVRC2012_IDs, one per line (line i ↔ image i)."""
    try:
        with open(path) as f:
            lines = [ln.strip() for ln in f if ln.strip()]
    except OSError as e:
        raise PrepareError(f"cannot read ground truth {path}: {e.strerror}") from None
    try:
        return [int(ln) for ln in lines]
    except ValueError:
        bad = next(i for i, ln in enumerate(lines, 1) if not ln.isdigit())
        raise PrepareError(f"{path}: line {bad} is {lines[bad - 1]!r}, expected one integer ID per line") from None


def _read_meta_mat(path: str) -> Dict[int, str]:
    try:
        import scipy.io
    except ImportError:
        raise PrepareError(f"reading {path} needs scipy (pip install scipy), or pass a text mapping "
                           "(\"ID WNID\" lines) or --csv LOC_val_solution.csv") from None
    try:
        synsets = scipy.io.loadmat(path, squeeze_me=True)["synsets"]
    except (OSError, ValueError, KeyError) as e:
        raise PrepareError(f"{path}: not a devkit meta.mat with a 'synsets' table ({e})") from None
    # The 1000 leaf synsets (no children) are the classes; the other entries are WordNet parents.
    return {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets if int(s["num_children"]) == 0}


def _read_meta_text(path: str) -> Dict[int, str]:
    try:
        with open(path) as f:
            rows = [ln.split() for ln in f if ln.strip()]
    except OSError as e:
        raise PrepareError(f"cannot read {path}: {e.strerror}") from None
    if all(len(r) == 1 for r in rows):  # one WNID per line: line number is the ID
        mapping = {i: r[0] for i, r in enumerate(rows, 1)}
    elif all(len(r) >= 2 and r[0].isdigit() for r in rows):  # "ID WNID [words...]"
        mapping = {int(r[0]): r[1] for r in rows}
    elif all(len(r) >= 2 and r[1].isdigit() for r in rows):  # "WNID ID [name]", as in map_clsloc.txt
        mapping = {int(r[1]): r[0] for r in rows}
    else:
        raise PrepareError(f"{path}: expected \"ID WNID\" or \"WNID ID\" lines, or one WNID per line")
    bad = [w for w in mapping.values() if not WNID.match(w)]
    if bad:
        raise PrepareError(f"{path}: {bad[0]!r} is not a WordNet ID (n########)")
    return mapping


def read_meta(path: str) -> Dict[int, str]:
    """ILSVRC2012_ID → WNID from meta.mat or a text mapping."""
    return _read_meta_mat(path) if path.endswith(".mat") else _read_meta_text(path)


def read_solution_csv(path: str) -> Dict[str, str]:
    """Image stem (``ILSVRC2012_val_00000001``) → WNID, from Kaggle's LOC_val_solution.csv."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise PrepareError(f"cannot read {path}: {e.strerror}") from None
    if not rows or not {"ImageId", "PredictionString"} <= set(rows[0]):
        raise PrepareError(f"{path}: expected a CSV with columns ImageId,PredictionString")
    out = {}
    for line, row in enumerate(rows, 2):
        tokens = (row["PredictionString"] or "").split()
        if not tokens or not WNID.match(tokens[0]):
            raise PrepareError(f"{path}: line {line}: PredictionString does not start with a WNID")
        out[row["ImageId"].strip()] = tokens[0]
    return out


def plan_from_ground_truth(images: Dict[int, str], labels: List[int], meta: Dict[int, str]) -> List[Tuple[str, str]]:
    """(file name, WNID) per image, image i taking line i of the ground truth."""
    if len(labels) != len(images):
        raise PrepareError(f"the ground truth has {len(labels)} labels but the val folder holds {len(images)} "
                           "ILSVRC2012_val_* images; refusing to guess which belong together")
    missing = sorted(set(range(1, len(labels) + 1)) - set(images))
    if missing:
        raise PrepareError(f"images are not numbered 1..{len(labels)}: e.g. number {missing[0]} is missing")
    unknown = sorted({lab for lab in labels if lab not in meta})
    if unknown:
        raise PrepareError(f"ground-truth ID {unknown[0]} is not in the ID→WNID mapping ({len(meta)} entries)")
    return [(images[i], meta[lab]) for i, lab in enumerate(labels, 1)]


def plan_from_csv(images: Dict[int, str], solution: Dict[str, str]) -> List[Tuple[str, str]]:
    stems = {os.path.splitext(name)[0]: name for name in images.values()}
    if set(stems) != set(solution):
        no_label = sorted(set(stems) - set(solution))
        no_image = sorted(set(solution) - set(stems))
        raise PrepareError(f"the CSV labels {len(solution)} images but the val folder holds {len(stems)}: "
                           f"{len(no_label)} without a label (e.g. {no_label[:1]}), {len(no_image)} labelled "
                           f"but absent (e.g. {no_image[:1]})")
    return [(stems[s], solution[s]) for s in sorted(stems)]


def execute(plan: List[Tuple[str, str]], val_dir: str, out_dir: str, copy: bool, dry_run: bool) -> None:
    targets = [(os.path.join(val_dir, name), os.path.join(out_dir, wnid, name)) for name, wnid in plan]
    existing = [dst for _, dst in targets if os.path.exists(dst)]
    if existing:
        raise PrepareError(f"{len(existing)} target file(s) exist already, e.g. {existing[0]}; refusing to overwrite")
    verb = "copy" if copy else "move"
    classes = sorted({wnid for _, wnid in plan})
    print(f"{'would ' if dry_run else ''}{verb} {len(plan)} images into {len(classes)} class folders under {out_dir}")
    if dry_run:
        for src, dst in targets[:3]:
            print(f"  {src} -> {dst}")
        return
    for wnid in classes:
        os.makedirs(os.path.join(out_dir, wnid), exist_ok=True)
    for src, dst in targets:
        (shutil.copy2 if copy else shutil.move)(src, dst)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("val_dir", help="the flat folder of ILSVRC2012_val_XXXXXXXX.JPEG files")
    p.add_argument("--ground-truth", help="ILSVRC2012_validation_ground_truth.txt (one ID per line)")
    p.add_argument("--meta", help="ID→WNID: devkit meta.mat, or text of 'ID WNID' / 'WNID ID' lines "
                                  "or one WNID per line")
    p.add_argument("--csv", help="LOC_val_solution.csv (alternative to --ground-truth/--meta)")
    p.add_argument("--out", help="where to create the class folders (default: val_dir)")
    p.add_argument("--copy", action="store_true", help="copy instead of move")
    p.add_argument("--dry-run", action="store_true", help="check everything and print the plan; touch nothing")
    args = p.parse_args(argv)
    try:
        devkit = (args.ground_truth, args.meta)
        if (args.csv is None) == all(x is None for x in devkit) or (args.csv is None and None in devkit):
            raise PrepareError("pass either --ground-truth and --meta, or --csv")
        images = find_val_images(args.val_dir)
        if not images:
            raise PrepareError(f"no ILSVRC2012_val_*.JPEG files directly in {args.val_dir} (already sorted?)")
        if args.csv:
            plan = plan_from_csv(images, read_solution_csv(args.csv))
        else:
            plan = plan_from_ground_truth(images, read_ground_truth(args.ground_truth), read_meta(args.meta))
        execute(plan, args.val_dir, args.out or args.val_dir, args.copy, args.dry_run)
    except PrepareError as e:
        print(f"prepare_imagenet_val.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
