"""Batch airway segmentation inside 3D Slicer, without the GUI.

Runs both modules' Logic on every CT given: stage 1 (keeping all components), stage 2 (break
connection), centerlines; saves the refined segmentation (.seg.nrrd), the breakage attention
(.nrrd), the break list and the centerline files per case, then quits Slicer.

    Slicer --no-main-window --python-script examples/batch.py --out OUT_DIR CT [CT ...]

Outside Slicer the same work is one command per CT: ``airway run --in CT --out DIR``.
"""

import argparse
import json
import sys
from pathlib import Path

import slicer

from AirwayRefine import AirwayRefineLogic
from AirwaySegmentation import AirwaySegmentationLogic


def process_case(ct_path: Path, out_dir: Path, device: str) -> None:
    """Stage 1, stage 2 and centerlines of one CT into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    slicer.mrmlScene.Clear()
    volume = slicer.util.loadVolume(str(ct_path))
    stage1 = AirwaySegmentationLogic().process(volume, device=device, keepAllComponents=True, showResult=False)
    refine = AirwayRefineLogic()
    refinement = refine.process(volume, stage1.segmentation, device=device, showAttention=False, showResult=False)
    slicer.util.saveNode(refinement.segmentation, str(out_dir / "airway.seg.nrrd"))
    slicer.util.saveNode(refinement.attention, str(out_dir / "attention.nrrd"))
    (out_dir / "breaks.json").write_text(json.dumps(refinement.result.breaks_document(), indent=1) + "\n")
    refine.exportCenterlines(refinement.segmentation, volume, str(out_dir))
    print(f"{ct_path.name}: {AirwayRefineLogic.summary(refinement)} -> {out_dir}")


def main(argv: list) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="output folder (one subfolder per CT)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("cts", nargs="+", type=Path, help="CT files (NIfTI, NRRD, MHA)")
    args = parser.parse_args(argv)
    AirwaySegmentationLogic().ensureDependencies(askConfirmation=False)
    failed = 0
    for ct_path in args.cts:
        name = ct_path.name.split(".")[0]
        try:
            process_case(ct_path, args.out / name, args.device)
        except Exception as error:  # one bad case does not stop the batch
            failed += 1
            print(f"{ct_path}: failed: {error}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    slicer.util.exit(main(sys.argv[1:]))
